"""The gateway: its orchestrator (gateway.py).

Layers: polevpn/__init__.py says which may import which.
"""
