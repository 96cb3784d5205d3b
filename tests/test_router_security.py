"""The router on loopback under per-gateway credentials, anti-spoofing and admission limits.

In-process router (its counters are read directly), protocol-level gateways as in
test_router_loopback: what a hostile or broken peer can and cannot do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
import ssl
import struct
from pathlib import Path

import pytest
from test_router_loopback import (
    KCP_PARAMS,
    ProtoGateway,
    frame,
    ipv4_packet,
    ipv6_packet,
    router_config,
    run,
    started,
)

from polevpn import keygen
from polevpn.common.logfmt import pairs
from polevpn.config import load_router_config
from polevpn.io import kcp_transport
from polevpn.kcp import dtls
from polevpn.kcp.kcp_pool import KcpPool
from polevpn.proto.auth import GatewayGrant
from polevpn.proto.session import REGISTER_BURST
from polevpn.router.limits import LimitParams
from polevpn.router.router import Router

A, B = "169.254.0.1", "169.254.0.2"
LAN_A, LAN_B = "198.18.10.0/24", "198.18.20.0/24"
LAN_A6 = "2001:db8:10::/64"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("seckeys")
    res = keygen.generate(out)
    creds = keygen.issue_gateways(
        out, [f"{A}={LAN_A},{LAN_A6}", f"{B}={LAN_B}"], client_certs=True, days=1
    )
    return res, {c.address: c for c in creds}


def grants(creds, mode: str = "key") -> tuple[GatewayGrant, ...]:
    """The table for A and B: by key, by certificate, or both."""
    out = []
    for addr, c in creds.items():
        entry = c.router_entry()
        key = Path(c.key_file).read_text().strip() if mode in ("key", "both") else None
        fp = bytes.fromhex(entry["cert_fingerprint"]) if mode in ("cert", "both") else None
        nets = tuple(ipaddress.ip_network(n) for n in c.networks)
        out.append(GatewayGrant(ipaddress.ip_address(addr), key, fp, nets))
    return tuple(out)


def key_of(creds, addr: str) -> str:
    return Path(creds[addr].key_file).read_text().strip()


def cfg(keys, mode: str = "key", shared: str | None = None, **kw):
    res, creds = keys
    extra = {}
    if mode in ("cert", "both"):
        extra["client_ca_file"] = res.ca_cert
    return router_config(res, key=shared, gateways=grants(creds, mode), **extra, **kw)


async def tls_gateway(
    router: Router, source: str = "127.0.0.1", cert: tuple[Path, Path] | None = None
) -> ProtoGateway:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(*cert)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", router.tls_port, ssl=ctx, server_hostname="polevpn.com", local_addr=(source, 0)
    )
    return ProtoGateway(reader, writer)


async def kcp_gateway(router: Router, cert: tuple[Path, Path] | None = None) -> ProtoGateway:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    proto = asyncio.StreamReaderProtocol(reader)
    verify = dtls.Verification(insecure=True)
    ctx = dtls.client_context(verify, *(cert or (None, None)))
    transport = await kcp_transport.connect(
        proto, "127.0.0.1", router.kcp_port, ctx, verify, KCP_PARAMS, KcpPool(), timeout=3
    )
    return ProtoGateway(reader, asyncio.StreamWriter(transport, proto, reader, loop))  # type: ignore[arg-type]


async def gateway(router: Router, transport: str, **kw) -> ProtoGateway:
    if transport == "kcp":
        kw.pop("source", None)
        return await kcp_gateway(router, **kw)
    return await tls_gateway(router, **kw)


async def auth(gw: ProtoGateway, key: str) -> dict:
    await gw.send(frame(0, json.dumps({"key": key}).encode()))
    cmd, _, body = await gw.recv_frame()
    assert cmd == 0
    return json.loads(body)


async def register(gw: ProtoGateway, addr: str, key: str, nets: list[str]) -> dict:
    body = json.dumps({"gateway": addr, "key": key, "network": nets}).encode()
    await gw.send(frame(1, body, 9))
    cmd, seq, reply = await gw.recv_frame()
    assert (cmd, seq) == (1, 9)
    return json.loads(reply)


def routes(router: Router) -> dict[str, str]:
    return {str(n): str(c.gateway) for n, c in router.routes.routes()}


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_register_outside_grant_is_refused_and_nothing_installed(keys, transport, caplog):
    _, creds = keys

    async def scenario():
        router = await started(cfg(keys))
        b = await gateway(router, transport)
        assert await auth(b, key_of(creds, B)) == {}
        assert await register(b, B, key_of(creds, B), [LAN_B]) == {}
        before = routes(router)
        # A's valid key, announcing B's office as well as its own
        a = await gateway(router, transport)
        assert await auth(a, key_of(creds, A)) == {}
        reply = await register(a, A, key_of(creds, A), [LAN_A, LAN_B])
        assert reply == {"error": f"network {LAN_B} is not granted to gateway {A}"}
        assert await a.closed_by_peer()
        assert routes(router) == before, "nothing of a refused REGISTER may be installed"
        # A's key used to register as B
        a2 = await gateway(router, transport)
        assert await auth(a2, key_of(creds, A)) == {}
        reply = await register(a2, B, key_of(creds, A), [LAN_B])
        assert reply == {"error": f"invalid credentials for gateway {B}"}
        assert routes(router) == before
        assert router.stats.register_refused == 2
        # B is untouched and still reachable
        good = await gateway(router, transport)
        await auth(good, key_of(creds, A))
        assert await register(good, A, key_of(creds, A), [LAN_A, LAN_A6]) == {}
        pkt = ipv4_packet("198.18.10.2", "198.18.20.2")
        await good.send(frame(3, pkt))
        assert await b.recv_frame() == (2, 0, pkt)
        await router.stop()

    with caplog.at_level("WARNING", logger="polevpn.router"):
        run(scenario())
    refused = [ln for ln in caplog.text.splitlines() if 'msg="registration refused"' in ln]
    assert len(refused) == 2 and f"gateway={A}" in refused[0], refused
    for addr in (A, B):
        assert key_of(creds, addr) not in caplog.text, "a key reached the log"


def test_unlisted_gateway_and_shared_key_rules(keys):
    _, creds = keys

    async def scenario():
        # per-gateway only: no shared key to fall back on
        router = await started(cfg(keys))
        gw = await tls_gateway(router)
        assert await auth(gw, "123456") == {"error": "invalid key"}
        assert await gw.closed_by_peer()
        gw = await tls_gateway(router)
        await auth(gw, key_of(creds, A))
        assert await register(gw, "169.254.0.9", key_of(creds, A), []) == {
            "error": "gateway 169.254.0.9 is not configured on this router"
        }
        await router.stop()
        # with the shared key too: it registers unlisted gateways, but not a listed network
        router = await started(cfg(keys, shared="123456"))
        gw = await tls_gateway(router)
        await auth(gw, "123456")
        assert await register(gw, "169.254.0.9", "123456", [LAN_A]) == {
            "error": f"network {LAN_A} belongs to gateway {A}"
        }
        gw = await tls_gateway(router)
        await auth(gw, "123456")
        assert await register(gw, "169.254.0.9", "123456", ["198.18.30.0/24"]) == {}
        assert routes(router)["198.18.30.0/24"] == "169.254.0.9"
        # nor may the shared key replace a listed gateway's registration
        gw2 = await tls_gateway(router)
        await auth(gw2, "123456")
        assert "error" in await register(gw2, A, "123456", [])
        await router.stop()

    run(scenario())


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_spoofed_sources_are_dropped_and_counted(keys, transport):
    _, creds = keys

    async def scenario():
        router = await started(cfg(keys))
        a = await gateway(router, transport)
        b = await gateway(router, transport)
        await auth(a, key_of(creds, A))
        await register(a, A, key_of(creds, A), [LAN_A, LAN_A6])
        await auth(b, key_of(creds, B))
        await register(b, B, key_of(creds, B), [LAN_B])
        spoofed = [
            ipv4_packet("198.18.20.9", "198.18.20.2"),  # B's own network, sent by A
            ipv4_packet("198.18.30.1", "198.18.20.2"),  # nobody's
            ipv4_packet("169.254.0.2", "198.18.20.2"),  # B's gateway address
            ipv6_packet("2001:db8:20::9", "2001:db8:10::2"),
            ipv6_packet("2001:db8:20::9", "ff02::16"),  # multicast, but from B's network
        ]
        # the host's MLD report from :: and a solicitation: not forwarded, and no attack
        chatter = [ipv6_packet("::", "ff02::16"), ipv6_packet("fe80::1", "ff02::2")]
        legit = ipv4_packet("198.18.10.2", "198.18.20.2")
        own = ipv4_packet(A, "198.18.20.2")
        frames = [frame(3, p) for p in [*spoofed, *chatter, legit, own]]
        await a.send(b"".join(frames))
        assert await b.recv_frame() == (2, 0, legit)
        assert await b.recv_frame() == (2, 0, own)
        assert router.stats.dropped_spoofed == 5
        assert router.stats.dropped_link_local == 2
        await router.stop()

    run(scenario())


def test_anti_spoofing_can_be_turned_off(keys):
    _, creds = keys

    async def scenario():
        router = await started(cfg(keys, anti_spoofing=False))
        a, b = await tls_gateway(router), await tls_gateway(router)
        await auth(a, key_of(creds, A))
        await register(a, A, key_of(creds, A), [LAN_A])
        await auth(b, key_of(creds, B))
        await register(b, B, key_of(creds, B), [LAN_B])
        pkt = ipv4_packet("198.18.30.1", "198.18.20.2")
        await a.send(frame(3, pkt))
        assert await b.recv_frame() == (2, 0, pkt)
        assert router.stats.dropped_spoofed == 0
        await router.stop()

    run(scenario())


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_client_certificate_identifies_the_gateway(keys, transport):
    _, creds = keys
    cert_a = (Path(creds[A].client_cert_file), Path(creds[A].client_key_file))
    cert_b = (Path(creds[B].client_cert_file), Path(creds[B].client_key_file))

    async def scenario():
        router = await started(cfg(keys, mode="cert"))
        a = await gateway(router, transport, cert=cert_a)
        assert await auth(a, "") == {}
        assert await register(a, A, "", [LAN_A]) == {}
        # B's certificate does not register A
        b = await gateway(router, transport, cert=cert_b)
        assert await auth(b, "") == {}
        assert await register(b, A, "", [LAN_A]) == {
            "error": f"invalid credentials for gateway {A}"
        }
        # no certificate: nothing to authenticate with
        n = await gateway(router, transport)
        assert await auth(n, key_of(creds, A)) == {"error": "invalid key"}
        assert routes(router) == {f"{A}/32": A, LAN_A: A}
        await router.stop()

    run(scenario())


def test_key_and_certificate_both_required_when_both_listed(keys):
    _, creds = keys
    cert_a = (Path(creds[A].client_cert_file), Path(creds[A].client_key_file))

    async def scenario():
        router = await started(cfg(keys, mode="both"))
        a = await tls_gateway(router, cert=cert_a)
        await auth(a, key_of(creds, A))
        assert await register(a, A, key_of(creds, A), [LAN_A]) == {}
        a2 = await tls_gateway(router)
        await auth(a2, key_of(creds, A))
        assert "error" in await register(a2, A, key_of(creds, A), [LAN_A])
        await router.stop()

    run(scenario())


def test_a_certificate_from_another_ca_fails_the_handshake(keys, tmp_path):
    other = keygen.generate(tmp_path / "other")
    foreign = keygen.issue_gateways(tmp_path / "other", [f"{A}={LAN_A}"], client_certs=True)[0]

    async def scenario():
        router = await started(cfg(keys, mode="cert"))
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            gw = await tls_gateway(
                router, cert=(Path(foreign.client_cert_file), Path(foreign.client_key_file))
            )
            # TLS 1.3: the client learns of the refusal on its first read
            await auth(gw, "")
        await asyncio.sleep(0.1)
        assert router.stats.handshake_failures + router.stats.auth_failures >= 1
        assert router.admission.pending == 0
        await router.stop()

    assert other.ca_cert.exists()
    run(scenario())


# ---- admission limits ----------------------------------------------------------------------


async def raw_tcp(router: Router, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", router.tls_port, local_addr=(source, 0))


async def refused(reader: asyncio.StreamReader) -> bool:
    """The router closed (reset) this connection without a word."""
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except ConnectionError:
        return True


def test_pending_connections_are_capped_per_source_and_in_total(keys):
    # every source here is in 127.0.0.0/24, and none is known: no share of either
    limits = LimitParams(
        max_pending=5,
        max_pending_per_source=2,
        max_pending_share_per_net=1,
        reserved_share_known=0,
    )

    async def scenario():
        router = await started(cfg(keys, limits=limits, auth_timeout=3))
        held = [await raw_tcp(router, "127.0.0.5") for _ in range(2)]
        await asyncio.sleep(0.1)
        r, _ = await raw_tcp(router, "127.0.0.5")
        assert await refused(r)
        assert router.admission.stats.refused_pending_per_source == 1
        # another source is still welcome, until the total is reached
        held += [await raw_tcp(router, f"127.0.0.{i}") for i in (6, 6, 7)]
        await asyncio.sleep(0.1)
        assert router.admission.pending == 5
        r, _ = await raw_tcp(router, "127.0.0.8")
        assert await refused(r)
        assert router.admission.stats.refused_pending == 1
        for _, w in held:
            w.close()
        await asyncio.sleep(0.3)
        assert router.admission.pending == 0
        # slots came back: a real gateway from the capped source gets in
        gw = await tls_gateway(router, "127.0.0.5")
        assert await auth(gw, key_of(keys[1], A)) == {}
        await router.stop()

    run(scenario())


def test_a_registered_gateway_no_longer_counts_as_pending(keys):
    limits = LimitParams(max_pending=2, max_pending_per_source=2)

    async def scenario():
        router = await started(cfg(keys, limits=limits))
        gws = []
        for addr in (A, B):
            gw = await tls_gateway(router)
            await auth(gw, key_of(keys[1], addr))
            assert await register(gw, addr, key_of(keys[1], addr), []) == {}
            gws.append(gw)
        assert router.admission.pending == 0
        third = await tls_gateway(router)
        assert await auth(third, "wrong") == {"error": "invalid key"}
        await router.stop()

    run(scenario())


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_failed_auth_is_rate_limited_per_source(keys, transport):
    window = 5.0  # three refused AUTHs must fit in it even on a loaded machine
    limits = LimitParams(auth_failures=3, auth_failure_window=window)

    async def scenario():
        router = await started(cfg(keys, limits=limits))
        for _ in range(3):
            gw = await gateway(router, transport, source="127.0.0.9")
            assert await auth(gw, "guess") == {"error": "invalid key"}
        await asyncio.sleep(0.1)
        # the right key from the same source is turned away now...
        if transport == "tls":
            r, _ = await raw_tcp(router, "127.0.0.9")
            assert await refused(r)
        else:
            with pytest.raises((TimeoutError, OSError, dtls.DtlsError)):
                await kcp_gateway(router)
        assert router.admission.stats.refused_rate_limited >= 1
        if transport == "tls":
            # ...while other sources are not
            ok = await tls_gateway(router, "127.0.0.10")
            assert await auth(ok, key_of(keys[1], A)) == {}
        await asyncio.sleep(window + 0.1)
        gw = await gateway(router, transport, source="127.0.0.9")
        assert await auth(gw, key_of(keys[1], A)) == {}
        await router.stop()

    run(scenario())


def test_silent_connection_is_closed_at_the_handshake_deadline(keys):
    async def scenario():
        router = await started(cfg(keys, auth_timeout=0.5))
        r, _ = await raw_tcp(router, "127.0.0.11")
        assert router.admission.pending <= 1
        assert await refused(r)
        await asyncio.sleep(0.1)
        assert router.stats.handshake_timeouts == 1
        assert router.admission.pending == 0
        await router.stop()

    run(scenario())


def test_silent_tcp_gives_its_slot_back_at_the_pre_tls_deadline(keys):
    """Issue 20 finding 5: idle TCP connections that send no TLS held their pending slot
    for the whole auth_timeout; now for limits.pre_tls_timeout."""
    limits = LimitParams(pre_tls_timeout=0.3)

    async def scenario():
        router = await started(cfg(keys, limits=limits, auth_timeout=5))
        t0 = asyncio.get_running_loop().time()
        held = [await raw_tcp(router, "127.0.0.12") for _ in range(3)]
        for _ in range(20):  # until the router has accepted all three (well within 0.3 s)
            if router.admission.pending == 3:
                break
            await asyncio.sleep(0.005)
        assert router.admission.pending == 3
        for r, _ in held:
            assert await refused(r)
        assert asyncio.get_running_loop().time() - t0 < 1.5
        await asyncio.sleep(0.05)
        assert router.admission.pending == 0
        assert router.admission.stats.pre_tls_timeouts == 3
        assert router.stats.handshake_timeouts == 3
        # bytes that are not a TLS handshake record are refused at once
        r, w = await raw_tcp(router, "127.0.0.12")
        w.write(b"GET / HTTP/1.0\r\n\r\n")
        assert await refused(r)
        # and a real gateway, slower than that to start its handshake only by a little, is in
        gw = await tls_gateway(router, "127.0.0.12")
        assert await auth(gw, key_of(keys[1], A)) == {}
        for _, w in held:
            w.close()
        await router.stop()

    run(scenario())


def test_known_gateways_keep_a_share_strangers_cannot_take(keys):
    limits = LimitParams(
        max_pending=4,
        max_pending_per_source=4,
        max_pending_share_per_net=1,
        reserved_share_known=0.5,
        pre_tls_timeout=5,
    )

    async def scenario():
        router = await started(cfg(keys, limits=limits))
        # a gateway from 127.0.0.20 passes AUTH: its address is known from now on
        gw = await tls_gateway(router, "127.0.0.20")
        assert await auth(gw, key_of(keys[1], A)) == {}
        assert await register(gw, A, key_of(keys[1], A), [LAN_A]) == {}
        assert router.admission.pending == 0
        # strangers take the shared half, and no more
        held = [await raw_tcp(router, "127.0.0.21") for _ in range(2)]
        await asyncio.sleep(0.1)
        r, _ = await raw_tcp(router, "127.0.0.22")
        assert await refused(r)
        assert router.admission.stats.refused_pending == 1
        # the known gateway reconnects (a second link, say) all the same
        again = await tls_gateway(router, "127.0.0.20")
        assert await auth(again, key_of(keys[1], A)) == {}
        assert router.admission.stats.admitted_known == 1
        for _, w in held:
            w.close()
        await router.stop()

    run(scenario())


def test_oversized_frame_closes_and_is_counted(keys):
    async def scenario():
        router = await started(cfg(keys))
        gw = await tls_gateway(router)
        await auth(gw, key_of(keys[1], A))
        await register(gw, A, key_of(keys[1], A), [LAN_A])
        await gw.send(struct.pack(">HHI", 8, 16, 1 << 20))
        assert await gw.closed_by_peer()
        assert router.stats.oversized_frames == 1
        await asyncio.sleep(0.1)  # connection_lost runs after the close the client saw
        assert routes(router) == {}
        await router.stop()

    run(scenario())


def test_a_peer_supplied_name_cannot_forge_log_fields(keys, caplog):
    """Issue 19 bug 7: a gateway field that reads like pairs, with ESC and a newline, was
    turned into fields (``peer=198.18.9.9``) of the router's log line."""
    forged = "2001:db8:55::1%x\x1b[31m peer=198.18.9.9 gateway=169.254.0.1\nlevel=error"

    async def scenario():
        router = await started(cfg(keys))
        gw = await tls_gateway(router)
        assert await auth(gw, key_of(keys[1], A)) == {}
        body = json.dumps({"gateway": forged, "key": key_of(keys[1], A), "network": []})
        await gw.send(frame(1, body.encode(), 9))
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await gw.recv_frame()
        gw.close()
        await router.stop()

    with caplog.at_level("DEBUG", logger="polevpn.router"):
        run(scenario())
    lines = caplog.text.splitlines()
    assert len(lines) == len(caplog.records)  # one line per record
    assert "\x1b" not in caplog.text
    for line in lines:
        fields = pairs(line)
        assert [k for k, _ in fields].count("peer") <= 1, line
        assert ("peer", "198.18.9.9") not in fields, line
        assert ("level", "error") not in fields, line
    # where it is logged (as the gateway, or inside the reason a zone ID is refused for), it
    # stays inside the value of one field
    logged = [ln for ln in lines if "198.18.9.9" in ln]
    assert logged, lines
    for ln in logged:
        assert sum("198.18.9.9" in v for _, v in pairs(ln)) == 1, ln


def test_a_long_frame_before_auth_is_not_buffered(keys):
    """A connection that has not authenticated may not make the router hold a partial
    65 KB frame for it: its first frame is at most PRE_AUTH_MAX_FRAME bytes."""

    async def scenario():
        router = await started(cfg(keys))
        gws = [await tls_gateway(router) for _ in range(3)]
        for gw in gws:
            await gw.send(struct.pack(">HHI", 0xFFFF, 0, 0) + b"{" * 2000)
        for gw in gws:
            assert await gw.closed_by_peer()
        assert router.stats.oversized_frames == 3
        await asyncio.sleep(0.1)
        assert router.admission.pending == 0
        await router.stop()

    run(scenario())


def test_peer_that_does_not_read_its_replies_is_closed(keys):
    """Heartbeats are echoed; a peer that sends them without reading must not grow our buffer."""

    async def scenario():
        router = await started(cfg(keys, send_queue_bytes=65536))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", router.tls_port))
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="polevpn.com", limit=4096
        )
        gw = ProtoGateway(reader, writer)
        await auth(gw, key_of(keys[1], A))
        await register(gw, A, key_of(keys[1], A), [LAN_A])
        beats = struct.pack(">HHI", 8, 4, 0) * 8192
        for _ in range(200):  # at most 12.5 MB of echoes owed
            if router.stats.closed_unread:
                break
            writer.write(beats)
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        assert router.stats.closed_unread == 1
        assert routes(router) == {}
        writer.transport.abort()
        await router.stop()

    run(scenario())


def test_router_config_table_from_keygen_snippet(keys, tmp_path):
    """What keygen prints for the router loads as the table the tests above use."""
    res, creds = keys
    obj = {
        "tls": {
            "listen": "127.0.0.1:0",
            "cert_file": str(res.server_cert),
            "key_file": str(res.server_key),
        },
        "client_ca_file": str(res.ca_cert),
        "gateways": keygen.router_gateways_table(list(creds.values())),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(obj))
    path.chmod(0o600)
    loaded = load_router_config(path)
    assert loaded.key is None
    assert {str(g.gateway) for g in loaded.gateways} == {A, B}
    assert set(loaded.gateways) == set(grants(creds, "both"))


@pytest.mark.parametrize("transport", ["tls", "kcp"])
def test_register_flood_closes_the_connection_and_bounds_the_work(keys, transport):
    """Issue 20 finding 8: 3,000 multi-link REGISTERs in one write cost the router 5.7 s of
    CPU (a flow-table rebuild each) and delayed everyone's traffic. Past a small burst the
    connection is closed; the others' traffic goes on."""
    _, creds = keys

    async def scenario():
        router = await started(cfg(keys))
        b = await gateway(router, transport)
        await auth(b, key_of(creds, B))
        await register(b, B, key_of(creds, B), [LAN_B])
        a = await gateway(router, transport)
        body = {"key": key_of(creds, A), "features": ["multi-link"]}
        await a.send(frame(0, json.dumps(body).encode()))
        await a.recv_frame()
        reg = {"gateway": A, "key": key_of(creds, A), "network": [LAN_A]}
        flood = b"".join(
            frame(1, json.dumps({**reg, "link": {"name": f"l{i % 8}"}}).encode(), i)
            for i in range(3000)
        )
        loop = asyncio.get_running_loop()
        start = loop.time()
        await a.send(flood)
        assert await a.closed_by_peer()
        assert loop.time() - start < 2.0
        assert router.stats.register_flood == 1
        assert router.stats.registrations == 1 + REGISTER_BURST
        pkt = ipv4_packet("198.18.20.2", "198.18.10.2")
        await b.send(frame(3, pkt))
        await asyncio.sleep(0.1)
        assert router.stats.dropped_no_route == 1  # A's routes went with its connection
        await router.stop()

    run(scenario())


def test_register_with_too_many_prefix_lengths_or_networks_is_refused(keys):
    """Issue 20 finding 12: one shared-key REGISTER with about 118 distinct IPv6 prefix
    lengths doubled the per-packet lookup cost. Both counts are bounded per gateway."""
    lengths = [f"2001:db8:{0x8000 + i:x}::/{i + 8}" for i in range(25, 120)]
    networks = [f"198.18.{i // 256}.{i % 256}/32" for i in range(300)]

    async def scenario():
        router = await started(cfg(keys, shared="123456"))
        for nets, reason in (
            (lengths, "95 distinct IPv6 prefix lengths (at most 16)"),
            (networks, "300 networks (at most 256)"),
        ):
            gw = await tls_gateway(router)
            await auth(gw, "123456")
            assert await register(gw, "169.254.0.9", "123456", nets) == {"error": reason}
            assert await gw.closed_by_peer()
        assert len(router.routes) == 0
        assert router.stats.register_refused == 2
        # within the bounds, fine; and no AUTH failure was counted against the source
        gw = await tls_gateway(router)
        await auth(gw, "123456")
        assert await register(gw, "169.254.0.9", "123456", lengths[:15]) == {}
        assert not router.admission.failures
        await router.stop()

    run(scenario())
