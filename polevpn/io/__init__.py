"""asyncio adapters and sockets: the kcp:// transport and listener, batched and
source-aware UDP, TUN devices, per-socket path statistics.

Layers: polevpn/__init__.py says which may import which.
"""
