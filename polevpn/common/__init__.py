"""Logging (logfmt) and counters: used by every layer, importing none of polevpn.

Layers: polevpn/__init__.py says which may import which.
"""
