"""Peer VPNs for the throughput comparison of `make bench` (tests/bench.py).

Each peer builds the same hub-and-spoke shape as polevpn in a fresh
tests/topology.py Topology: the hub runs in the ``router`` namespace, one
spoke in ``gwA`` (office LAN A) and one in ``gwB`` (office LAN B), and
LAN A <-> LAN B goes gwA -> hub -> gwB.  The hub never forwards between its
two underlay links (see :func:`isolate_hub`), so a direct spoke-to-spoke path
is impossible and every packet is relayed by the hub.

    OpenVpn      OpenVPN 2.6, UDP, AES-256-GCM, client-to-client, iroute per office
    WireGuardGo  userspace wireguard-go in all three namespaces, hub forwards wg -> wg
    Tinc         tinc 1.0 in router mode, spokes ConnectTo the hub only

Interface: ``peer.available()`` installs the Debian packages when a command is
missing (``apt-get update`` once per run) and returns ``(ok, reason)``;
``peer.setup(topo, work_dir)`` starts everything and waits until the tunnel
forwards, returning the started processes (hub first; all started with
``Topology.popen`` so ``Topology.teardown`` also stops them by PID);
``peer.teardown(topo, procs)`` stops them by PID and removes what the peer left
outside the namespaces.  Only the address ranges 198.18.0.0/15 (LANs, underlay,
from topology.py) and 169.254.0.0/16 (tunnel subnets below) are used.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import time
from pathlib import Path

import topology as t

# Tunnel subnets (169.254.0.1/.2 and 2001:db8:ff::/64 belong to polevpn in topology.py).
OVPN_NET = "169.254.101.0"  # /24, the hub is .1, clients get pool addresses
WG_NET = "169.254.102"  # hub .1, gwA .2, gwB .3
TINC_NET = "169.254.103"  # hub .1, gwA .2, gwB .3

OVPN_PORT = 1194
WG_PORT = 51820
TINC_PORT = 655

SPOKES = {  # node -> (hub address on its underlay, own LAN, other LAN, host number)
    "gwA": (t.ROUTER_UL_A, t.LAN_A, t.LAN_B, 2),
    "gwB": (t.ROUTER_UL_B, t.LAN_B, t.LAN_A, 3),
}
UNDERLAY_IFS = ("ul-a", "ul-b")  # the router's two underlay links

_apt_updated = False


def _mask(cidr: str) -> tuple[str, str]:
    net, bits = cidr.split("/")
    m = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
    return net, ".".join(str((m >> s) & 0xFF) for s in (24, 16, 8, 0))


def ensure_packages(commands: dict[str, str]) -> tuple[bool, str]:
    """Install the Debian package of every missing command (``{command: package}``)."""
    global _apt_updated
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return True, ""
    if shutil.which("apt-get") is None:
        return False, f"missing {' '.join(missing)} and no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        if not _apt_updated:
            print("apt-get update ...", flush=True)
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300,
                           env=env, check=False)
            _apt_updated = True
        print(f"apt-get install {' '.join(missing)} ...", flush=True)
        res = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True,
                             text=True, timeout=600, env=env, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"apt-get failed: {exc}"
    if res.returncode != 0:
        tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or [""]
        return False, f"could not install {' '.join(missing)}: {tail[0][:160]}"
    still = sorted(cmd for cmd in commands if shutil.which(cmd) is None)
    if still:
        return False, f"{' '.join(still)} not found after installing {' '.join(missing)}"
    return True, ""


def package_version(package: str) -> str:
    res = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                         text=True, timeout=10, check=False)
    return res.stdout.strip() or "?"


def isolate_hub(topo: t.Topology, forward_ifs: tuple[str, ...] = ()) -> None:
    """No kernel forwarding in the hub except for packets received on ``forward_ifs``.

    ``net.ipv4.conf.<if>.forwarding`` decides whether packets *received* on <if>
    may be forwarded; the underlay links always get 0, so with no plain routes
    and this, gwA cannot reach anything behind gwB (or gwB itself) except
    through the VPN process / VPN interface.
    """
    topo.disable_plain_routing()  # removes plain routes, router ip_forward=0
    topo.run("router", ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=0"])
    if forward_ifs:
        topo.run("router", ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        for ifname in forward_ifs:
            topo.run("router", ["sysctl", "-q", "-w", f"net.ipv4.conf.{ifname}.forwarding=1"])
    for ifname in UNDERLAY_IFS:
        topo.run("router", ["sysctl", "-q", "-w", f"net.ipv4.conf.{ifname}.forwarding=0"])


def hub_forwards_underlay(topo: t.Topology) -> bool:
    """True if gwA reaches gwB's underlay address through the hub's kernel.

    Temporarily routes the other /30 via the hub on both spokes and pings
    198.19.0.2 -> 198.19.0.6; the routes are removed again.
    """
    routes = (("gwA", f"{t.GW_B_UL}/32 via {t.ROUTER_UL_A}"),
              ("gwB", f"{t.GW_A_UL}/32 via {t.ROUTER_UL_B}"))
    for node, route in routes:
        topo.run(node, ["ip", "route", "replace", *route.split()])
    try:
        return topo.ping("gwA", t.GW_B_UL, count=2, wait=1).returncode == 0
    finally:
        for node, route in routes:
            topo.run(node, ["ip", "route", "del", *route.split()], check=False)


def _wait_ping(topo: t.Topology, what: str, deadline: float = 30) -> None:
    if topo.wait_ping("hostA", t.HOST_B, deadline=deadline) is None:
        raise t.TopologyError(f"{what}: hostA cannot ping hostB through the tunnel")


class Peer:
    name = "?"
    label = "?"
    commands: dict[str, str] = {}
    packages: tuple[str, ...] = ()

    def available(self) -> tuple[bool, str]:
        return ensure_packages(self.commands)

    def version(self) -> str:
        return ", ".join(f"{p} {package_version(p)}" for p in self.packages)

    def setup(self, topo: t.Topology, work: Path) -> list[subprocess.Popen]:
        raise NotImplementedError

    def teardown(self, topo: t.Topology, procs: list[subprocess.Popen]) -> None:
        for proc in reversed(procs):
            t.Topology.stop(proc, timeout=5)

    describe = ""


# ----------------------------------------------------------------- OpenVPN
def make_pki(out: Path, clients: tuple[str, ...]) -> None:
    """CA, server and client certificates (ECDSA P-256) for OpenVPN, into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench-ovpn-ca")).issuer_name(name("bench-ovpn-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                     False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (out / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cn, eku in (("hub", ExtendedKeyUsageOID.SERVER_AUTH),
                    *((c, ExtendedKeyUsageOID.CLIENT_AUTH) for c in clients)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # digitalSignature + keyAgreement (0x88), what remote-cert-tls expects for EC
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (out / f"{cn}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, out / f"{cn}.key")


class OpenVpn(Peer):
    name = "openvpn"
    label = "OpenVPN 2.6"
    commands = {"openvpn": "openvpn"}
    packages = ("openvpn",)
    # 2 MiB socket buffers and a longer TUN queue: without them the hub's UDP socket drops
    # bursts and TCP through the tunnel sees ~20000 retransmits in 10 s (and ~30% less).
    tuning: tuple[str, ...] = ("sndbuf 2097152", "rcvbuf 2097152", "txqueuelen 1000")
    describe = (
        "userspace (`disable-dco`); server in the router namespace, `dev tun`, "
        "`proto udp`, `topology subnet`, `server 169.254.101.0/24`, `cipher`/`data-ciphers "
        "AES-256-GCM`, TLS with an ECDSA P-256 CA and certificates made for the run, "
        "`dh none`, `client-to-client`, `sndbuf`/`rcvbuf` 2 MiB and `txqueuelen 1000` on "
        "both ends (without them the hub's UDP socket drops bursts: ~20000 TCP retransmits "
        "in 10 s, a third less throughput).  client-config-dir gives each office an "
        "`iroute` for its LAN and a pushed route to the other office's LAN; the server has "
        "`route`s for both LANs.  Clients (`client`, `remote-cert-tls server`) in gwA and "
        "gwB.  With client-to-client the hub relays LAN A <-> LAN B inside the openvpn "
        "process; the hub namespace has IP forwarding off."
    )

    def setup(self, topo: t.Topology, work: Path) -> list[subprocess.Popen]:
        d = work / "openvpn"
        pki = d / "pki"
        make_pki(pki, tuple(SPOKES))
        ccd = d / "ccd"
        ccd.mkdir(parents=True)
        common = [
            "dev-type tun",
            "proto udp",
            "cipher AES-256-GCM",
            "data-ciphers AES-256-GCM",
            "disable-dco",
            "verb 3",
            f"ca {pki / 'ca.crt'}",
            *self.tuning,
        ]
        server = [
            *common,
            "dev ovpnhub",
            f"port {OVPN_PORT}",
            "topology subnet",
            f"server {OVPN_NET} 255.255.255.0",
            "client-to-client",
            f"client-config-dir {ccd}",
            f"route {' '.join(_mask(t.LAN_A))}",
            f"route {' '.join(_mask(t.LAN_B))}",
            "keepalive 10 60",
            "dh none",
            f"cert {pki / 'hub.crt'}",
            f"key {pki / 'hub.key'}",
        ]
        (d / "server.conf").write_text("\n".join(server) + "\n")
        for node, (_hub, own, other, _n) in SPOKES.items():
            (ccd / node).write_text(
                f"iroute {' '.join(_mask(own))}\n"
                f'push "route {" ".join(_mask(other))}"\n'
            )
        isolate_hub(topo)
        procs = [topo.popen("router", ["openvpn", "--config", str(d / "server.conf")],
                            log_name="openvpn-hub")]
        t.wait_for_log(procs[0], "Initialization Sequence Completed", timeout=20)
        for node, (hub, *_rest) in SPOKES.items():
            client = [
                *common,
                "client",
                "dev ovpn0",
                f"remote {hub} {OVPN_PORT}",
                "nobind",
                "remote-cert-tls server",
                f"cert {pki / (node + '.crt')}",
                f"key {pki / (node + '.key')}",
            ]
            conf = d / f"{node}.conf"
            conf.write_text("\n".join(client) + "\n")
            procs.append(topo.popen(node, ["openvpn", "--config", str(conf)],
                                    log_name=f"openvpn-{node}"))
        for proc in procs[1:]:
            t.wait_for_log(proc, "Initialization Sequence Completed", timeout=30)
        _wait_ping(topo, self.name)
        return procs


# ------------------------------------------------------------ wireguard-go
def wg_keypair() -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    key = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    priv = key.private_bytes(raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    return base64.b64encode(priv).decode(), base64.b64encode(pub).decode()


WG_RUN_DIR = Path("/var/run/wireguard")  # wireguard-go's UAPI sockets (not per namespace)


class WireGuardGo(Peer):
    name = "wireguard-go"
    label = "wireguard-go"
    commands = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
    packages = ("wireguard-go", "wireguard-tools")
    describe = (
        "userspace (`wireguard-go -f`, configured with `wg set` and `ip`); one interface in "
        "each of router, gwA and gwB, tunnel net 169.254.102.0/24.  The hub "
        "has one peer per office with AllowedIPs = that office's LAN + its tunnel /32 and "
        "routes both LANs into its wg interface; each office has one peer, the hub, with "
        "AllowedIPs = the other office's LAN + the tunnel /24 (PersistentKeepalive 25).  "
        "The hub namespace forwards wg -> wg in the kernel: `net.ipv4.ip_forward=1` but "
        "`net.ipv4.conf.{ul-a,ul-b}.forwarding=0`, so nothing received on an underlay link "
        "is ever forwarded (checked by a probe).  Debian 12's wireguard-go 0.0.20220316 "
        "predates the 2023 GSO/GRO and socket-buffer work in wireguard-go and has no "
        "buffer option, and the buffer sysctls cannot be set per namespace; so that its "
        "sockets are not stuck at 208 KiB (the hub then dropped about 40,000 datagrams a "
        "run), the bench raises `net.core.rmem_default`/`wmem_default` machine-wide to "
        "4 MiB (at most `rmem_max`) while wireguard-go starts and runs, and restores them "
        "(`udp_rcvbuf_errors` in benchmarks.json)."
    )

    _SYSCTLS = (Path("/proc/sys/net/core/rmem_default"), Path("/proc/sys/net/core/wmem_default"))

    def _raise_default_buffers(self) -> None:
        self._saved = {p: p.read_text().strip() for p in self._SYSCTLS}
        cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
        for p in self._SYSCTLS:
            p.write_text(str(min(4 << 20, max(cap, int(self._saved[p])))))

    def _restore_default_buffers(self) -> None:
        for p, value in getattr(self, "_saved", {}).items():
            with contextlib.suppress(OSError):
                p.write_text(value)
        self._saved = {}

    def setup(self, topo: t.Topology, work: Path) -> list[subprocess.Popen]:
        d = work / "wireguard"
        d.mkdir(parents=True)
        ifs = {"router": f"{topo.prefix}wr", "gwA": f"{topo.prefix}wa",
               "gwB": f"{topo.prefix}wb"}
        self._socks = [WG_RUN_DIR / f"{i}.sock" for i in ifs.values()]
        keys = {node: wg_keypair() for node in ifs}
        for node, (priv, _pub) in keys.items():
            (d / f"{node}.key").write_text(priv + "\n")
            (d / f"{node}.key").chmod(0o600)
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        self._raise_default_buffers()
        procs = []
        for node, ifname in ifs.items():
            procs.append(topo.popen(node, ["wireguard-go", "-f", ifname], env=env,
                                    log_name=f"wireguard-go-{node}"))
        deadline = time.monotonic() + 15
        for proc, sock in zip(procs, self._socks, strict=True):
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise t.TopologyError(f"wireguard-go did not create {sock}:\n"
                                          f"{t.log_tail(proc.log_path)}")
                time.sleep(0.05)
        hub_if = ifs["router"]
        isolate_hub(topo, forward_ifs=(hub_if,))
        topo.run("router", ["wg", "set", hub_if, "private-key", str(d / "router.key"),
                            "listen-port", str(WG_PORT)])
        topo.run("router", ["ip", "addr", "add", f"{WG_NET}.1/24", "dev", hub_if])
        topo.run("router", ["ip", "link", "set", hub_if, "up"])
        for node, (hub, own, other, n) in SPOKES.items():
            ifname = ifs[node]
            topo.run("router", ["wg", "set", hub_if, "peer", keys[node][1],
                                "allowed-ips", f"{own},{WG_NET}.{n}/32"])
            topo.run("router", ["ip", "route", "add", own, "dev", hub_if])
            topo.run(node, ["wg", "set", ifname, "private-key", str(d / f"{node}.key"),
                            "peer", keys["router"][1], "endpoint", f"{hub}:{WG_PORT}",
                            "allowed-ips", f"{other},{WG_NET}.0/24",
                            "persistent-keepalive", "25"])
            topo.run(node, ["ip", "addr", "add", f"{WG_NET}.{n}/24", "dev", ifname])
            topo.run(node, ["ip", "link", "set", ifname, "up"])
            topo.run(node, ["ip", "route", "add", other, "dev", ifname])
        for node in SPOKES:  # both handshakes, so the hub knows both endpoints
            if topo.wait_ping(node, f"{WG_NET}.1", deadline=15) is None:
                raise t.TopologyError(f"wireguard-go: {node} cannot reach the hub")
        _wait_ping(topo, self.name)
        return procs

    def teardown(self, topo: t.Topology, procs: list[subprocess.Popen]) -> None:
        super().teardown(topo, procs)
        self._restore_default_buffers()
        for sock in getattr(self, "_socks", []):
            with contextlib.suppress(OSError):
                sock.unlink()


# -------------------------------------------------------------------- tinc
def rsa_pem_pair(bits: int = 2048) -> tuple[bytes, bytes]:
    """(private, public) RSA keys in the PKCS#1 PEM forms tinc 1.0 reads."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv = key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.PKCS1)
    return priv, pub


class Tinc(Peer):
    name = "tinc"
    label = "tinc 1.0"
    commands = {"tincd": "tinc"}
    packages = ("tinc",)
    describe = (
        "`tincd -D` with its own config dir and pidfile, `Mode = router`, hub `hub` in the "
        "router namespace, spokes `gwa`/`gwb` with `ConnectTo = hub` only, `Subnet` = the "
        "office's LAN (+ a tunnel /32 in 169.254.103.0/24), RSA-2048 keys written with "
        "python cryptography, `Cipher = aes-256-cbc`, `Digest = sha256` (tinc 1.0 has no AEAD "
        "ciphers), `UDPRcvBuf`/`UDPSndBuf` 2 MiB.  The spokes' host "
        "files say `IndirectData = yes` (they cannot reach each other: the hub does not "
        "forward the underlay), so data between them takes the default UDP data path "
        "gwA -> hub -> gwB and tincd on the hub relays it; no TCPOnly.  The hub namespace "
        "has IP forwarding off."
    )

    def setup(self, topo: t.Topology, work: Path) -> list[subprocess.Popen]:
        d = work / "tinc"
        names = {"router": "hub", "gwA": "gwa", "gwB": "gwb"}
        addr = {"router": f"{TINC_NET}.1", "gwA": f"{TINC_NET}.2", "gwB": f"{TINC_NET}.3"}
        keys = {node: rsa_pem_pair() for node in names}
        isolate_hub(topo)
        procs = []
        for node, me in names.items():
            conf = d / node
            (conf / "hosts").mkdir(parents=True)
            lines = [f"Name = {me}", "Mode = router", f"Interface = tinc{me}",
                     "AddressFamily = ipv4", f"Port = {TINC_PORT}",
                     "PingInterval = 10",
                     # as for OpenVPN: 2 MiB UDP socket buffers, else the hub drops bursts
                     "UDPRcvBuf = 2097152", "UDPSndBuf = 2097152"]
            if node != "router":
                lines.append("ConnectTo = hub")
            (conf / "tinc.conf").write_text("\n".join(lines) + "\n")
            (conf / "rsa_key.priv").write_bytes(keys[node][0])
            (conf / "rsa_key.priv").chmod(0o600)
            for other, oname in names.items():
                host = ["Cipher = aes-256-cbc", "Digest = sha256", f"Port = {TINC_PORT}",
                        f"Subnet = {addr[other]}/32"]
                if other == "router":
                    # the hub's address as seen from this spoke's underlay
                    if node in SPOKES:
                        host.append(f"Address = {SPOKES[node][0]}")
                else:
                    host += [f"Subnet = {SPOKES[other][1]}", "IndirectData = yes"]
                (conf / "hosts" / oname).write_text(
                    "\n".join(host) + "\n\n" + keys[other][1].decode())
            up = ["#!/bin/sh", "ip link set \"$INTERFACE\" up",
                  f"ip addr add {addr[node]}/24 dev \"$INTERFACE\""]
            if node in SPOKES:  # the hub relays inside tincd, it needs no LAN routes
                up.append(f"ip route add {SPOKES[node][2]} dev \"$INTERFACE\"")
            (conf / "tinc-up").write_text("\n".join(up) + "\n")
            (conf / "tinc-up").chmod(0o755)
            procs.append(topo.popen(
                node,
                ["tincd", "-c", str(conf), "-D", "-d1", f"--pidfile={conf / 'tinc.pid'}"],
                log_name=f"tincd-{node}",
            ))
            t.wait_for_log(procs[-1], "Ready", timeout=15)
        _wait_ping(topo, self.name)
        return procs


PEERS: dict[str, Peer] = {p.name: p for p in (OpenVpn(), WireGuardGo(), Tinc())}
