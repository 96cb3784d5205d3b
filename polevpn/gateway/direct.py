"""The gateway's direct paths to other offices (issue 18): what gateway.py wires in.

Owns the direct socket (``io.direct_socket.DirectSocket``) and its manager
(``direct.manager.DirectManager``), takes the router's DIRECT_* frames off any router
connection that agreed ``direct``, and hands the manager's messages (DIRECT_CANDIDATES,
DIRECT_STATUS) to whichever connection the gateway gives it. The socket is opened at start
and lives across reconnects; a router without the feature never sends anything here, and
nothing is sent to it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

from polevpn.common.logfmt import kv
from polevpn.config import GatewayConfig
from polevpn.direct import messages as m
from polevpn.direct.keys import KeyMaterialError
from polevpn.direct.manager import DirectManager
from polevpn.direct.messages import (
    DirectMessageError,
    Endpoint,
    EndpointParams,
    Offer,
    Revoke,
    UnsupportedVersion,
)
from polevpn.io.direct_socket import DirectSocket
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.packet.routing import IPAddress
from polevpn.proto.session import DirectFrame

log = logging.getLogger("polevpn.direct")


def local_address_towards(dest: IPAddress) -> IPAddress | None:
    """The source address the kernel picks towards ``dest`` (a connected UDP socket's own
    address; connecting sends nothing)."""
    family = socket.AF_INET6 if dest.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((str(dest), 9))
            addr = ipaddress.ip_address(s.getsockname()[0].split("%")[0])
    except (OSError, ValueError):
        return None
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        return None
    return addr


def peer_address(transport: object) -> IPAddress | None:
    """The router address a connection went to (its peername), as an address."""
    get = getattr(transport, "get_extra_info", None)
    peer = get("peername") if get is not None else None
    if not peer:
        return None
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%")[0])
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:  # type: ignore[union-attr]
        addr = addr.ipv4_mapped  # type: ignore[union-attr]
    return addr


class GatewayDirect:
    def __init__(
        self,
        cfg: GatewayConfig,
        pool: KcpPool,
        deliver: Callable[[list[memoryview]], None],
        send_frames: Callable[[bytes, object | None], bool],
    ) -> None:
        """``deliver``: the peers' packets for the gateway's acls and TUN;
        ``send_frames(data, via)``: writes frames to a router connection that agreed
        ``direct``, preferably ``via`` (the transport whose DIRECT_* frame is being
        handled, or None) (False: none is up, and the messages are dropped)."""
        self.cfg = cfg
        own = {cfg.gateway} | ({cfg.gateway6} if cfg.gateway6 is not None else set())
        self.manager = DirectManager(own, cfg.local_networks, cfg.kcp_params, pool)
        self.socket = DirectSocket(self.manager, deliver, self._send)
        self.send_frames = send_frames
        self.messages_dropped = 0
        self.unsupported = 0
        self.offers_refused_logged = 0
        # the transport whose frame on_frame is handling: what that makes (the candidates
        # in answer to DIRECT_ENDPOINT) goes back on it. It arrives with the REGISTER
        # reply, before the gateway has made that connection its link.
        self._via: object | None = None

    async def open(self) -> None:
        await self.socket.open(self.cfg.direct.port)
        log.info(
            "direct socket open",
            extra=kv(
                port=self.socket.port,
                candidates=",".join(map(str, self.cfg.direct.candidates)) or "auto",
            ),
        )

    def close(self) -> None:
        self.socket.close()

    @property
    def any_direct(self) -> bool:
        return self.manager.any_direct

    def route(self, packets: list, vnet: bool) -> list:
        return self.socket.route(packets, vnet)

    def relayed(self, packets: list, whole: bool) -> None:
        """Packets from a router connection (while some path is direct): a direct peer
        whose packets come this way has given its path up."""
        self.socket.relayed(packets, whole)

    def _send(self, msgs: list[m.Message]) -> None:
        data = b"".join(m.encode(x) for x in msgs)
        if not self.send_frames(data, self._via):
            self.messages_dropped += len(msgs)

    def on_frame(self, frame: DirectFrame, transport: object) -> str | None:
        """A DIRECT_* frame from the router; returns an error when it breaks the protocol
        (the caller closes that connection, as for a malformed REGISTER reply)."""
        try:
            msg = m.decode(frame.command, frame.body)
        except UnsupportedVersion:
            self.unsupported += 1
            return None
        except DirectMessageError as exc:
            return f"bad direct-path message (command {frame.command}): {exc}"
        now = time.monotonic()
        mgr = self.manager
        if isinstance(msg, EndpointParams):
            dialled = peer_address(transport)
            if dialled is None and msg.udp_address is None:
                return None
            router = msg.udp_address if msg.udp_address is not None else dialled
            assert router is not None
            mgr.set_local(self._host_candidates(router))
            mgr.endpoint(msg, router, now)  # type: ignore[arg-type]
        elif isinstance(msg, Offer):
            try:
                mgr.offer(msg, now)
            except KeyMaterialError as exc:
                log.warning("direct offer refused", extra=kv(peer=msg.peer, error=str(exc)))
        elif isinstance(msg, Revoke):
            if mgr.revoke(msg, now):
                log.info(
                    "direct path revoked",
                    extra=kv(pair=msg.pair_id.hex()[:8], reason=msg.reason.name.lower()),
                )
        else:
            # gateway-to-router or gateway-to-gateway messages have no business here
            self.unsupported += 1
            return None
        self._via = transport
        try:
            self.socket._pump()
        finally:
            self._via = None
        return None

    def _host_candidates(self, router: IPAddress) -> list[Endpoint]:
        port = self.socket.port
        addrs = list(self.cfg.direct.candidates)
        if not addrs:
            addr = local_address_towards(router)
            if addr is not None:
                addrs.append(addr)
        out = []
        for a in addrs:
            with contextlib.suppress(DirectMessageError):
                out.append(Endpoint(a, port))
        return out
