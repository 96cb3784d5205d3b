"""Addresses and routes on the gateway's TUN device, through netlink (pyroute2).

pyroute2's asyncio API failed under uvloop on our machines, so these are plain blocking
calls that the gateway runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from polevpn.packet.routing import IPAddress, IPNetwork

IFA_F_NODAD = 0x02
ADDR_GEN_NONE = 1  # IN6_ADDR_GEN_MODE_NONE


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"interface {ifname} does not exist")
    return found[0]


def _route(ipr: IPRoute, op: str, net: IPNetwork, idx: int) -> None:
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    ipr.route(op, dst=str(net.network_address), dst_len=net.prefixlen, oif=idx, family=family)


def configure_tun(
    ifname: str,
    mtu: int,
    addresses: list[IPAddress],
    routes: list[IPNetwork],
) -> None:
    """Bring the device up with ``mtu``, host addresses and routes into it (idempotent)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        ipr.link("set", index=idx, mtu=mtu)
        # no IPv6 link-local address: the kernel would send router solicitations and MLD
        # reports from it into the tunnel, which the router drops as spoofed sources.
        # (IPv6 disabled on this host refuses the setting; nothing would be sent anyway.)
        inet6 = {"attrs": [("IFLA_INET6_ADDR_GEN_MODE", ADDR_GEN_NONE)]}
        with contextlib.suppress(NetlinkError):
            ipr.link("set", index=idx, IFLA_AF_SPEC={"attrs": [("AF_INET6", inet6)]})
        ipr.link("set", index=idx, state="up")
        for addr in addresses:
            family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
            plen = 32 if addr.version == 4 else 128
            try:
                # no duplicate address detection: a point-to-point TUN has no neighbours, and
                # DAD would hold the address tentative for a second or more
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(addr),
                    prefixlen=plen,
                    family=family,
                    flags=IFA_F_NODAD if addr.version == 6 else 0,
                )
            except NetlinkError as exc:
                if exc.code != 17:  # EEXIST: already there from an earlier run
                    raise
        for net in routes:
            _route(ipr, "replace", net, idx)


def update_routes(ifname: str, add: list[IPNetwork], remove: list[IPNetwork]) -> None:
    """Routes into the device for ``add`` and none for ``remove`` (a reload's difference)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        for net in remove:
            try:
                _route(ipr, "del", net, idx)
            except NetlinkError as exc:
                if exc.code != 3:  # ESRCH: someone removed it already
                    raise
        for net in add:
            _route(ipr, "replace", net, idx)
