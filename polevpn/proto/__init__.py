"""The PoleVPN wire protocol, sans-IO: frames (wire), AUTH/REGISTER messages, the
session state machines of both ends, the authority that grants networks, and TLS
contexts and certificate checks (tlsconf).

Layers: polevpn/__init__.py says which may import which.
"""
