"""polevpn: layer-3 site-to-site VPN router and gateway, wire-compatible with PoleVPN.

The package is layered; a module imports only from its own subpackage and the layers below
it (tests/test_layers.py checks this on every run):

    cli, keygen                     the entry points: wire the parts together
    ops                             REST API, dashboard, metrics, polevpn-ctl
    router | gateway                the two orchestrators and their own sans-IO parts
    cluster                         routers sharing routes through etcd, and their links
    io | host                       asyncio adapters and sockets | changes to the host
    kcp | proto | packet | config   sans-IO: DTLS/KCP/FEC | wire protocol | IP packets | config
    | direct                        | direct gateway-to-gateway paths (DTLS+KCP sessions)
    common                          logging, counters

Parts of one layer do not import each other (router and gateway, io and host, cli and
keygen), except within the sans-IO layer: kcp and config may import proto and packet,
proto may import packet and config, kcp may import config, and direct may import proto,
packet, config and kcp. Function-level and TYPE_CHECKING imports count too. ops never
imports the orchestrator modules (router/router.py, gateway/gateway.py): it reads them
through their read models (router/view.py, gateway/view.py), handed to it by cli, which
starts the ops servers.
"""

__version__ = "0.1.0"
