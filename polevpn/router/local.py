"""The router's own TUN as a pseudo-gateway, "local": the router host joins the network.

``LocalEndpoint`` is what ``forwarding.forward`` sees of the TUN, an Endpoint like a
gateway's connection: always registered, holding the tun's addresses and the networks behind
the router host (``RouterTun.prefixes``). Packets to those go to it (``send_batch`` writes
them to the TUN); packets read from the TUN are forwarded with it as their source, so the
same longest-prefix match and the same anti-spoofing check apply. It never negotiates
super-packets: the TUN is opened without offloads, and forwarding cuts gateways'
super-packets for it as it does for a gateway without them. No I/O beyond the Tun it is
given (an in-memory fake in tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from polevpn.config import RouterTun
from polevpn.io.tun import Tun
from polevpn.packet.routing import IPNetwork, NetworkSet


class LocalEndpoint:
    """The TUN as a destination and a source of ``forward``."""

    transport_name = "tun"
    # never a link of a multi-link site, nor a link to another router
    site = None
    router_link = False

    def __init__(
        self,
        cfg: RouterTun,
        tun: Tun,
        stats: object,
        failed: Callable[[str, OSError], None],
    ) -> None:
        self.cfg = cfg
        self.tun = tun
        # RouterStats: packets_forwarded and the tun_* counters
        self.stats = stats
        # called when a write finds the device gone: the router withdraws "local"
        self.failed = failed
        self.gateway = cfg.gateway
        self.prefixes: tuple[IPNetwork, ...] = cfg.prefixes
        # what the router host may send from: its tunnel addresses and the networks behind it
        self.sources = NetworkSet(self.prefixes)
        self.packets_in = 0
        self.packets_out = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def __repr__(self) -> str:
        return f"<local tun {self.tun.name} {self.gateway}>"

    @property
    def super_packets(self) -> bool:
        return False

    def send_batch(self, parts: list[bytes | memoryview], supers: int) -> None:
        """Frames from ``forward`` (headers and bodies, alternating; never SUPER_IPDATA):
        the bodies, plain IP packets, are written to the TUN one each. The TUN drops and
        counts what the kernel does not take; OSError means the device is gone."""
        stats = self.stats
        tun = self.tun
        write = tun.write
        n = 0
        try:
            for i in range(1, len(parts), 2):
                pkt = parts[i]
                write(pkt)
                n += len(pkt)
        except OSError as exc:
            # the device is gone: not the sending gateway's fault, whose connection goes on
            self.failed("write", exc)
            return
        stats.tun_write_dropped = tun.write_dropped  # type: ignore[attr-defined]
        stats.tun_write_errors = tun.write_errors  # type: ignore[attr-defined]
        count = len(parts) // 2
        self.packets_out += count
        self.bytes_out += n
        stats.tun_packets_out += count  # type: ignore[attr-defined]
        stats.tun_bytes_out += n  # type: ignore[attr-defined]
        stats.packets_forwarded += count  # type: ignore[attr-defined]
        stats.bytes_forwarded += n  # type: ignore[attr-defined]


def conflict(
    tun: RouterTun,
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address,
    networks: Iterable[IPNetwork],
) -> str | None:
    """Why a REGISTER of ``gateway`` and ``networks`` may not be installed next to the
    router's own tun, or None: nothing of the tun's addresses and networks is anyone
    else's, whatever key a gateway holds."""
    own = tun.prefixes
    for net in (ipaddress.ip_network(gateway), *networks):
        for mine in own:
            if mine.version == net.version and net.overlaps(mine):  # type: ignore[arg-type]
                return f"network {net} belongs to the router's tun ({mine})"
    return None
