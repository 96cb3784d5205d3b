"""polevpn: layer-3 site-to-site VPN router and gateway, wire-compatible with PoleVPN.

The package is layered; a module imports only from its own subpackage and the layers below
it (tests/test_layers.py checks this on every run):

    cli, keygen                     the entry points: wire the parts together
    ops                             REST API, dashboard, metrics, polevpn-ctl
    router | gateway                the two orchestrators and their own sans-IO parts
    io | host                       asyncio adapters and sockets | changes to the host
    kcp | proto | packet | config   sans-IO: DTLS/KCP/FEC | wire protocol | IP packets | config
    common                          logging, counters

Within the sans-IO layer, kcp and config may import proto and packet, proto may import
packet and config, and kcp may import config; nothing there imports upwards.
"""

__version__ = "0.1.0"
