"""kcp:// below the sockets, sans-IO: DTLS over memory BIOs, KCP (the vendored ikcp.c in
``_ikcp``), FEC and its GF(2^8) codec.

Layers: polevpn/__init__.py says which may import which.
"""
