"""The router: its orchestrator (router.py), its read model for operations (view.py) and
the sans-IO parts only it uses: forwarding, multi-link sites and admission limits.

Layers: polevpn/__init__.py says which may import which.
"""
