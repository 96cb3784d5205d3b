"""IP packets, sans-IO: headers, super-packets (gso), MSS clamping, longest-prefix
route tables and flow hashing (multipath).

Layers: polevpn/__init__.py says which may import which.
"""
