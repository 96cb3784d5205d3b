"""The gateway: its orchestrator (gateway.py) and its read model for operations (view.py).

Layers: polevpn/__init__.py says which may import which.
"""
