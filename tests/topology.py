"""Five-namespace test topology for polevpn end-to-end tests, demo and benchmark.

    hostA --LAN A-- gwA ==underlay== router ==underlay== gwB --LAN B-- hostB

Addresses (documentation/benchmark ranges only):

* LAN A:    hostA 198.18.10.2/24, 2001:db8:10::2/64; gwA 198.18.10.1/24, 2001:db8:10::1/64
* LAN B:    hostB 198.18.20.2/24, 2001:db8:20::2/64; gwB 198.18.20.1/24, 2001:db8:20::1/64
* Underlay: gwA 198.19.0.2/30 <-> router 198.19.0.1/30
            gwB 198.19.0.6/30 <-> router 198.19.0.5/30

Every namespace name carries a per-instance random prefix (``pv<4 hex>-``), so
parallel or leftover runs never collide.  ``teardown()`` kills every process
started through :meth:`Topology.popen` by PID and deletes every namespace
(deleting a namespace removes the veth pairs inside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

NODES = ("hostA", "gwA", "router", "gwB", "hostB")

HOST_A = "198.18.10.2"
GW_A_LAN = "198.18.10.1"
HOST_B = "198.18.20.2"
GW_B_LAN = "198.18.20.1"
HOST_A6 = "2001:db8:10::2"
GW_A_LAN6 = "2001:db8:10::1"
HOST_B6 = "2001:db8:20::2"
GW_B_LAN6 = "2001:db8:20::1"
LAN_A = "198.18.10.0/24"
LAN_B = "198.18.20.0/24"
LAN_A6 = "2001:db8:10::/64"
LAN_B6 = "2001:db8:20::/64"

GW_A_UL = "198.19.0.2"
ROUTER_UL_A = "198.19.0.1"
GW_B_UL = "198.19.0.6"
ROUTER_UL_B = "198.19.0.5"

# (namespace, route) pairs for plain-routing mode (no tunnel).
PLAIN_ROUTES = (
    ("gwA", f"{LAN_B} via {ROUTER_UL_A}"),
    ("router", f"{LAN_A} via {GW_A_UL}"),
    ("router", f"{LAN_B} via {GW_B_UL}"),
    ("gwB", f"{LAN_A} via {ROUTER_UL_B}"),
)


# Bounded TCP sender / receiver, run with sys.executable inside a namespace.
_RECEIVER = r"""
import hashlib, json, socket, sys, time
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(1); srv.settimeout(timeout)
print("ready", flush=True)
conn, peer = srv.accept(); conn.settimeout(timeout)
h = hashlib.sha256(); n = 0; t0 = time.monotonic()
while True:
    b = conn.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
dt = time.monotonic() - t0
print(json.dumps({"bytes": n, "sha256": h.hexdigest(), "seconds": dt}), flush=True)
"""

_SENDER = r"""
import hashlib, json, os, socket, sys, time
host, port, size, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 10
while True:
    try:
        s = socket.create_connection((host, port), timeout=timeout); break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
h = hashlib.sha256(); sent = 0; t0 = time.monotonic()
while sent < size:
    b = os.urandom(min(1 << 16, size - sent))
    s.sendall(b); h.update(b); sent += len(b)
s.shutdown(socket.SHUT_WR)
s.settimeout(timeout)
while s.recv(4096):
    pass
dt = time.monotonic() - t0
print(json.dumps({"bytes": sent, "sha256": h.hexdigest(), "seconds": dt}), flush=True)
"""


class TopologyError(RuntimeError):
    pass


def have_netns_support() -> tuple[bool, str]:
    """Return (ok, reason) telling whether this machine can build a Topology."""
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, TUN devices)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' command not found"
    return True, ""


class Topology:
    """Builds and tears down hostA / gwA / router / gwB / hostB namespaces."""

    def __init__(self, prefix: str | None = None, log_dir: str | os.PathLike | None = None):
        self.prefix = prefix or f"pv{secrets.token_hex(2)}"
        self.ns = {node: f"{self.prefix}-{node}" for node in NODES}
        # Without an explicit log_dir the logs go to a private temp dir that
        # teardown() removes again.
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._log_files: list = []
        self.plain_routing = False
        # Interface names (inside their namespaces; short to fit IFNAMSIZ).
        self.if_hosta = "eth0"  # in hostA, peer of gwA's "lan0"
        self.if_hostb = "eth0"

    # ------------------------------------------------------------------ helpers
    def name(self, node: str) -> str:
        return self.ns[node]

    def _ip(
        self, *args: str, check: bool = True, timeout: float = 10
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", *args], check=check, capture_output=True, text=True, timeout=timeout
        )

    def run(
        self,
        node: str,
        cmd: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | bytes | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside ``node``'s namespace and wait (bounded by ``timeout``)."""
        full = ["ip", "netns", "exec", self.ns[node], *cmd]
        if input is not None and not text and isinstance(input, str):
            input = input.encode()
        res = subprocess.run(
            full, capture_output=True, text=text, timeout=timeout, input=input
        )
        if check and res.returncode != 0:
            raise TopologyError(
                f"[{node}] {' '.join(cmd)} -> rc={res.returncode}\n"
                f"stdout: {res.stdout}\nstderr: {res.stderr}"
            )
        return res

    def popen(
        self,
        node: str,
        cmd: Sequence[str],
        log_name: str | None = None,
        env: dict | None = None,
        cwd: str | os.PathLike | None = None,
    ) -> subprocess.Popen:
        """Start ``cmd`` in the background in ``node``'s namespace.

        stdout and stderr go to ``<log_dir>/<log_name>[-N].log`` (a new file per
        start); the process is tracked and killed by PID on teardown.  ``proc.log_path`` is set.
        """
        log_name = log_name or f"{node}-{Path(cmd[0]).name}"
        log_path = self.log_dir / f"{log_name}.log"
        n = 1
        while log_path.exists():  # a restart gets a fresh log: no stale matches
            n += 1
            log_path = self.log_dir / f"{log_name}-{n}.log"
        fh = open(log_path, "wb")  # noqa: SIM115 - closed in teardown
        self._log_files.append(fh)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[node], *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        proc.log_path = log_path  # type: ignore[attr-defined]
        self._procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 5, sig: int = signal.SIGTERM) -> int | None:
        """Stop one process by PID: ``sig`` first, SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
        return proc.returncode

    # ------------------------------------------------------------------- build
    def setup(self) -> Topology:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _add_ns(self, node: str) -> None:
        ns = self.ns[node]
        self._ip("netns", "add", ns)
        self._created.append(ns)
        self.run(node, ["ip", "link", "set", "lo", "up"])

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        # Create both ends in a's namespace with final names, then move b's end.
        tmp = f"{self.prefix}t{secrets.token_hex(2)}"[:15]
        self.run(a, ["ip", "link", "add", a_if, "type", "veth", "peer", "name", tmp])
        self.run(a, ["ip", "link", "set", tmp, "netns", self.ns[b]])
        self.run(b, ["ip", "link", "set", tmp, "name", b_if])
        self.run(a, ["ip", "link", "set", a_if, "up"])
        self.run(b, ["ip", "link", "set", b_if, "up"])

    def _addr(self, node: str, ifname: str, cidr: str) -> None:
        cmd = ["ip", "addr", "add", cidr, "dev", ifname]
        if ":" in cidr:
            cmd.append("nodad")
        self.run(node, cmd)

    def _sysctl(self, node: str, key: str, value: str) -> None:
        self.run(node, ["sysctl", "-q", "-w", f"{key}={value}"])

    def _setup(self) -> None:
        for node in NODES:
            self._add_ns(node)

        # LAN A
        self._veth("gwA", "lan0", "hostA", "eth0")
        self._addr("gwA", "lan0", f"{GW_A_LAN}/24")
        self._addr("gwA", "lan0", f"{GW_A_LAN6}/64")
        self._addr("hostA", "eth0", f"{HOST_A}/24")
        self._addr("hostA", "eth0", f"{HOST_A6}/64")
        self.run("hostA", ["ip", "route", "add", "default", "via", GW_A_LAN])
        self.run("hostA", ["ip", "-6", "route", "add", "default", "via", GW_A_LAN6])

        # LAN B
        self._veth("gwB", "lan0", "hostB", "eth0")
        self._addr("gwB", "lan0", f"{GW_B_LAN}/24")
        self._addr("gwB", "lan0", f"{GW_B_LAN6}/64")
        self._addr("hostB", "eth0", f"{HOST_B}/24")
        self._addr("hostB", "eth0", f"{HOST_B6}/64")
        self.run("hostB", ["ip", "route", "add", "default", "via", GW_B_LAN])
        self.run("hostB", ["ip", "-6", "route", "add", "default", "via", GW_B_LAN6])

        # Underlay
        self._veth("gwA", "wan0", "router", "ul-a")
        self._addr("gwA", "wan0", f"{GW_A_UL}/30")
        self._addr("router", "ul-a", f"{ROUTER_UL_A}/30")
        self._veth("gwB", "wan0", "router", "ul-b")
        self._addr("gwB", "wan0", f"{GW_B_UL}/30")
        self._addr("router", "ul-b", f"{ROUTER_UL_B}/30")

        for gw in ("gwA", "gwB"):
            self._sysctl(gw, "net.ipv4.ip_forward", "1")
            self._sysctl(gw, "net.ipv6.conf.all.forwarding", "1")

    # ------------------------------------------------------------ plain routes
    def enable_plain_routing(self) -> None:
        """Route LAN A <-> LAN B over the underlay without any tunnel (IPv4 only)."""
        if self.plain_routing:
            return
        self._sysctl("router", "net.ipv4.ip_forward", "1")
        for node, route in PLAIN_ROUTES:
            self.run(node, ["ip", "route", "replace", *route.split()])
        self.plain_routing = True

    def disable_plain_routing(self) -> None:
        for node, route in PLAIN_ROUTES:
            self.run(node, ["ip", "route", "del", *route.split()], check=False)
        self._sysctl("router", "net.ipv4.ip_forward", "0")
        self.plain_routing = False

    # ------------------------------------------------------------------ checks
    def ping(
        self, node: str, dst: str, count: int = 3, wait: int = 2, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Bounded ping; returns the CompletedProcess (check ``returncode``)."""
        cmd = ["ping", "-n", "-c", str(count), "-W", str(wait), "-w", str(count * wait + 2)]
        if ":" in dst:
            cmd.insert(1, "-6")
        cmd.append(dst)
        return self.run(node, cmd, check=False, timeout=timeout or count * wait + 10)

    def wait_ping(self, node: str, dst: str, deadline: float = 10.0) -> float | None:
        """Ping once a second until it answers; return seconds taken or None."""
        start = time.monotonic()
        while time.monotonic() - start < deadline:
            if self.ping(node, dst, count=1, wait=1).returncode == 0:
                return time.monotonic() - start
            time.sleep(0.2)
        return None

    # ---------------------------------------------------------------- traffic
    def transfer(
        self,
        src: str,
        dst: str,
        dst_addr: str,
        size: int,
        port: int = 5099,
        timeout: float = 120,
    ) -> dict:
        """Send ``size`` random bytes over TCP from ``src`` to ``dst_addr`` (in ``dst``).

        Returns ``{"sent": {...}, "received": {...}, "ok": bool, "mbit_s": float}``
        where each side reports bytes, sha256 and seconds.
        """
        rx = self.popen(
            dst,
            [sys.executable, "-c", _RECEIVER, dst_addr, str(port), str(timeout)],
            log_name=f"xfer-rx-{secrets.token_hex(2)}",
        )
        try:
            deadline = time.monotonic() + 10
            while b"ready" not in rx.log_path.read_bytes():
                if rx.poll() is not None or time.monotonic() > deadline:
                    raise TopologyError(
                        f"receiver did not start: {rx.log_path.read_text(errors='replace')}"
                    )
                time.sleep(0.05)
            tx = self.run(
                src,
                [sys.executable, "-c", _SENDER, dst_addr, str(port), str(size), str(timeout)],
                timeout=timeout + 15,
            )
            sent = json.loads(tx.stdout.strip().splitlines()[-1])
            rx.wait(timeout=timeout)
            lines = rx.log_path.read_text(errors="replace").strip().splitlines()
            received = json.loads(lines[-1])
        finally:
            self.stop(rx, timeout=2)
        ok = sent["sha256"] == received["sha256"] and sent["bytes"] == received["bytes"] == size
        mbit_s = size * 8 / max(sent["seconds"], 1e-9) / 1e6
        return {"sent": sent, "received": received, "ok": ok, "mbit_s": mbit_s}

    def iperf3(
        self, client: str, server: str, server_addr: str, seconds: int = 10, port: int = 5201
    ) -> dict:
        """Bounded iperf3 TCP run (client -> server); returns parsed JSON result."""
        srv = self.popen(
            server,
            ["iperf3", "-s", "-1", "-B", server_addr, "-p", str(port)],
            log_name=f"iperf3-server-{secrets.token_hex(2)}",
        )
        try:
            time.sleep(0.5)
            res = None
            for _ in range(10):  # server may need a moment to bind
                res = self.run(
                    client,
                    ["iperf3", "-c", server_addr, "-p", str(port), "-t", str(seconds), "-J",
                     "--connect-timeout", "3000"],
                    check=False,
                    timeout=seconds + 30,
                )
                if res.returncode == 0:
                    break
                time.sleep(0.5)
            if res is None or res.returncode != 0:
                detail = f"{res.stdout} {res.stderr}" if res else ""
                raise TopologyError(f"iperf3 failed: {detail}")
            data = json.loads(res.stdout)
        finally:
            self.stop(srv, timeout=2)
        return data

    # ---------------------------------------------------------------- teardown
    def teardown(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):  # keep tearing down
                self.stop(proc, timeout=3)
        self._procs.clear()
        for fh in self._log_files:
            with contextlib.suppress(Exception):
                fh.close()
        self._log_files.clear()
        for ns in reversed(self._created):
            self._ip("netns", "del", ns, check=False)
        self._created.clear()
        if self._own_log_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()


def leftover_namespaces(prefix: str) -> list[str]:
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return [line.split()[0] for line in res.stdout.splitlines() if line.startswith(prefix)]


# --------------------------------------------------------------------------
# polevpn daemon helpers shared by test_e2e.py, demo.py and bench.py
# --------------------------------------------------------------------------
GW_A_TUN4 = "169.254.0.1"
GW_B_TUN4 = "169.254.0.2"
GW_A_TUN6 = "2001:db8:ff::1"
GW_B_TUN6 = "2001:db8:ff::2"


def console_script(name: str) -> str | None:
    """Path of a console script installed next to the running interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(path, os.X_OK):
        return path
    return shutil.which(name)


def log_tail(path: str | os.PathLike, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def find_log_line(path: str | os.PathLike, *needles: str) -> str | None:
    """First line of the log containing every needle (case-insensitive)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    low = [n.lower() for n in needles]
    for line in text.splitlines():
        ll = line.lower()
        if all(n in ll for n in low):
            return line
    return None


def wait_for_log(
    proc: subprocess.Popen, *needles: str, timeout: float = 15.0, allow_exit: bool = False
) -> str:
    """Poll ``proc.log_path`` until one line contains all ``needles``; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        line = find_log_line(proc.log_path, *needles)
        if line is not None:
            return line
        if proc.poll() is not None and not allow_exit:
            raise TopologyError(
                f"process exited (rc={proc.returncode}) before logging {needles!r}; "
                f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        if time.monotonic() > deadline:
            raise TopologyError(
                f"timeout ({timeout}s) waiting for {needles!r}; "
                f"log {proc.log_path}:\n{log_tail(proc.log_path)}"
            )
        time.sleep(0.1)


def router_config(keys_dir: str | os.PathLike, **overrides) -> dict:
    keys = Path(keys_dir)
    cfg = {
        "tls": {
            "listen": "0.0.0.0:443",
            "enable": True,
            "cert_file": str(keys / "server.crt"),
            "key_file": str(keys / "server.key"),
        },
        "kcp": {
            "listen": "0.0.0.0:443",
            "enable": False,
            "cert_file": str(keys / "server.crt"),
            "key_file": str(keys / "server.key"),
        },
        "key_file": str(keys / "shared.key"),
        "log_level": "info",
        "idle_timeout": 60,
        "auth_timeout": 10,
    }
    cfg.update(overrides)
    return cfg


def gateway_config(side: str, keys_dir: str | os.PathLike, **overrides) -> dict:
    """Gateway config for office ``"A"`` (gwA) or ``"B"`` (gwB)."""
    keys = Path(keys_dir)
    if side == "A":
        server, gw4, gw6 = ROUTER_UL_A, GW_A_TUN4, GW_A_TUN6
        local, remote = [LAN_A, LAN_A6], [LAN_B, LAN_B6]
    elif side == "B":
        server, gw4, gw6 = ROUTER_UL_B, GW_B_TUN4, GW_B_TUN6
        local, remote = [LAN_B, LAN_B6], [LAN_A, LAN_A6]
    else:
        raise ValueError(side)
    cfg = {
        "route_server": f"tls://{server}:443",
        "key_file": str(keys / "shared.key"),
        "gateway": gw4,
        "gateway6": gw6,
        "local_networks": local,
        "route_networks": remote,
        "acls": [*remote, "169.254.0.0/16", "2001:db8:ff::/64"],
        "ca_file": str(keys / "ca.crt"),
        "server_name": "polevpn-router",
        "tun_name": "polevpn0",
        "mtu": 1400,
        "heartbeat_interval": 10,
        "heartbeat_timeout": 20,
        "reconnect_min_delay": 0.2,
        "reconnect_max_delay": 2,
        "log_level": "info",
    }
    cfg.update(overrides)
    return cfg


def write_json(path: str | os.PathLike, obj: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def start_router(topo: Topology, config: str | os.PathLike, log_name: str = "router",
                 timeout: float = 15.0) -> subprocess.Popen:
    """Start polevpn-router in the router namespace and wait for its listening line."""
    exe = console_script("polevpn-router")
    if exe is None:
        raise TopologyError("polevpn-router console script not found")
    proc = topo.popen("router", [exe, f"-configPath={config}"], log_name=log_name)
    wait_for_log(proc, "listening", "tls", timeout=timeout)
    return proc


def start_gateway(topo: Topology, node: str, config: str | os.PathLike,
                  log_name: str | None = None, wait: bool = True,
                  timeout: float = 20.0) -> subprocess.Popen:
    """Start polevpn-gateway in ``node`` and (optionally) wait until registered."""
    exe = console_script("polevpn-gateway")
    if exe is None:
        raise TopologyError("polevpn-gateway console script not found")
    proc = topo.popen(node, [exe, f"-configPath={config}"], log_name=log_name or node)
    if wait:
        wait_for_log(proc, "registered", timeout=timeout)
    return proc


if __name__ == "__main__":  # manual smoke test: plain routing only
    with Topology() as topo:
        topo.enable_plain_routing()
        for src, dst in (("hostA", HOST_B), ("hostB", HOST_A), ("hostA", GW_A_LAN6)):
            r = topo.ping(src, dst, count=2, wait=1)
            print(f"{src} -> {dst}: rc={r.returncode}")
        x = topo.transfer("hostA", "hostB", HOST_B, 5_000_000)
        print("transfer ok:", x["ok"], f"{x['mbit_s']:.0f} Mbit/s")
        d = topo.iperf3("hostA", "hostB", HOST_B, seconds=2)
        print("iperf3:", d["end"]["sum_received"]["bits_per_second"] / 1e6, "Mbit/s")
        topo.disable_plain_routing()
        r = topo.ping("hostA", HOST_B, count=1, wait=1)
        print(f"after disable hostA -> {HOST_B}: rc={r.returncode} (expected != 0)")
        left = topo.prefix
    print("leftover:", leftover_namespaces(left))
