#!/usr/bin/env python3
"""Interop runs against the original Go PoleVPN binaries (issue 15), by hand, not in CI.

    sudo .venv/bin/python tests/interop_go.py \\
        --go-router /path/to/polevpn_router --go-gateway /path/to/polevpn_gateway \\
        [--only go-gw/ours-router:kcp:clean ...] [--json out.jsonl] [--log-dir DIR]

The Go binaries come from ``--go-router`` / ``--go-gateway`` or the environment variables
``POLEVPN_GO_ROUTER`` / ``POLEVPN_GO_GATEWAY``; without them (or without root) the script
says why and exits 0 without running anything.  They are never part of this repository.
pytest does not collect this file (its name does not start with ``test_``).

Each row builds a fresh five-namespace topology (``Topology(impair=True)``, IPv4 only: Go
PoleVPN has no IPv6), starts the router and both gateways of its pairing, applies its
condition and runs the checks:

pairings
    ``go-gw/ours-router``   Go gwA and gwB, our router
    ``ours-gw/go-router``   our gwA and gwB, the Go router
    ``mixed/ours-router``   Go gwA on kcp://, our gwB on tls://, our router (our gwB's TUN
                            super-packets must be cut for the Go side)
    ``go-sample/ours-router`` Go gwA (kcp://) and gwB (tls://), our router started with Go's own
                            sample config ``config_dev.json`` (paths and key adapted)
    ``go-gw/go-router``     Go only: the baseline the other rows' figures compare with
conditions
    ``clean``       nothing
    ``loss``        5 % loss and 20 ms delay each way on gwA's underlay (tests/impair.py),
                    switched on once the tunnel is up (the handshake under loss is the
                    ``first-lost`` row's business)
    ``first-lost``  the first datagram (kcp://) or TCP SYN (tls://) each gateway sends to the
                    router is dropped: a one-shot nftables rule per source address
    ``restart``     the router is killed (SIGKILL, by PID) under running gateways and started
                    again; ``recovery_s`` is the time from the new start to the first
                    hostA -> hostB echo reply
checks (a row is ok when all pass)
    20 pings hostA -> hostB and back, every one answered (late replies count: KCP delivers
    a lost one after a retransmission timeout); a 20 MB TCP transfer hostA -> hostB compared
    by SHA-256; iperf3 (10 s, one stream) hostA -> hostB and hostB -> hostA; no gateway
    exited.
figures recorded besides
    ``registered_s`` (both gateways started -> registered), ``recovery_s`` (restart rows),
    per iperf3 run the TCP retransmissions inside the tunnel, the CPU seconds of each daemon,
    and on loss rows the datagrams and bytes that crossed gwA's underlay and their ratio to
    the iperf3 payload (``wire_per_payload``: KCP headers, DTLS, resends); ``router_segmented``
    (our router's super-packets cut for a peer that did not negotiate them).

Options for experiments: ``--our-kcp JSON`` (extra "kcp" settings for our router and
gateways), ``--rate-mbit N`` (loss rows: shape gwA's underlay to N Mbit/s both ways).
``--table results.jsonl`` prints the markdown table docs/interop.md carries.

Figures depend on the machine and its load; correctness is what a row asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import topology as t  # noqa: E402

ROUTER_PORT = 443
LAN = {"A": t.LAN_A, "B": t.LAN_B}
OTHER = {"A": "B", "B": "A"}
NODE = {"A": "gwA", "B": "gwB"}
GW_ADDR = {"A": t.GW_A_TUN4, "B": t.GW_B_TUN4}
ROUTER_ADDR = {"A": t.ROUTER_UL_A, "B": t.ROUTER_UL_B}
TRANSFER_BYTES = 20_000_000
PINGS = 20
LOSS = {"delay_ms": 20, "loss_pct": 5}

# Go PoleVPN's polevpn_router/config_dev.json (3090979), as shipped: both listeners on
# 0.0.0.0:443, the key inline.  The go-sample row feeds it to our router with only the
# certificate paths and the key replaced.
GO_SAMPLE_ROUTER_CONFIG = {
    "kcp": {"listen": "0.0.0.0:443", "enable": True,
            "cert_file": "./keys/server.crt", "key_file": "./keys/server.key"},
    "tls": {"listen": "0.0.0.0:443", "enable": True,
            "cert_file": "./keys/server.crt", "key_file": "./keys/server.key"},
    "key": "123456",
}

PAIRINGS = ("go-gw/ours-router", "ours-gw/go-router", "mixed/ours-router",
            "go-sample/ours-router", "go-gw/go-router")
CONDITIONS = ("clean", "loss", "first-lost", "restart")


@dataclass(frozen=True)
class Row:
    pairing: str
    scheme: str  # gwA's scheme; gwB uses the same except in the mixed / go-sample rows
    condition: str

    @property
    def name(self) -> str:
        return f"{self.pairing}:{self.scheme}:{self.condition}"

    def gateway_kind(self, side: str) -> str:
        """"go" or "ours" for gwA / gwB."""
        if self.pairing.startswith("ours-gw"):
            return "ours"
        if self.pairing.startswith("mixed"):
            return "go" if side == "A" else "ours"
        return "go"

    def gateway_scheme(self, side: str) -> str:
        if self.pairing.startswith(("mixed", "go-sample")):
            return "kcp" if side == "A" else "tls"
        return self.scheme

    @property
    def router_kind(self) -> str:
        return "go" if self.pairing.endswith("go-router") else "ours"


def all_rows() -> list[Row]:
    rows = []
    for pairing in PAIRINGS[:2]:
        for scheme in ("tls", "kcp"):
            for cond in CONDITIONS:
                rows.append(Row(pairing, scheme, cond))
    rows += [Row("mixed/ours-router", "kcp", c) for c in CONDITIONS]
    rows.append(Row("go-sample/ours-router", "kcp", "clean"))
    rows += [Row("go-gw/go-router", s, c) for s in ("tls", "kcp") for c in ("clean", "loss")]
    return rows


@dataclass
class Result:
    row: str
    ok: bool = False
    checks: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------ configs
class Fleet:
    """Keys, config files and daemon processes of one row in one topology."""

    def __init__(self, topo: t.Topology, row: Row, keys: Path, go_router: str,
                 go_gateway: str, cfg_dir: Path, our_kcp: dict | None = None) -> None:
        self.topo, self.row, self.keys = topo, row, keys
        self.our_kcp = our_kcp
        self.go_router, self.go_gateway = go_router, go_gateway
        self.cfg_dir = cfg_dir
        self.shared = (keys / "shared.key").read_text().strip()
        self.router: subprocess.Popen | None = None
        self.gateways: dict[str, subprocess.Popen] = {}

    # our router: tls and kcp on 0.0.0.0:443, a stats line every second (segmented counter)
    def our_router_config(self) -> Path:
        if self.row.pairing.startswith("go-sample"):
            cfg = json.loads(json.dumps(GO_SAMPLE_ROUTER_CONFIG))
            for section in ("kcp", "tls"):
                cfg[section]["cert_file"] = str(self.keys / "server.crt")
                cfg[section]["key_file"] = str(self.keys / "server.key")
            cfg["key"] = self.shared
        else:
            cfg = t.router_config(self.keys, listen=f"0.0.0.0:{ROUTER_PORT}",
                                  stats_interval=1)
            cfg["kcp"]["enable"] = True
            cfg["kcp"].update(self.our_kcp or {})
        return t.write_json(self.cfg_dir / "router.json", cfg)

    def go_router_config(self) -> Path:
        listener = {"listen": f"0.0.0.0:{ROUTER_PORT}", "enable": True,
                    "cert_file": str(self.keys / "server.crt"),
                    "key_file": str(self.keys / "server.key")}
        cfg = {"kcp": dict(listener), "tls": dict(listener), "key": self.shared}
        return t.write_json(self.cfg_dir / "go-router.json", cfg)

    def our_gateway_config(self, side: str) -> Path:
        scheme = self.row.gateway_scheme(side)
        cfg = t.gateway_config(
            side, self.keys,
            route_server=f"{scheme}://{ROUTER_ADDR[side]}:{ROUTER_PORT}",
            local_networks=[LAN[side]], route_networks=[LAN[OTHER[side]]],
            acls=[LAN[OTHER[side]], "169.254.0.0/16"],
        )
        del cfg["gateway6"]  # Go PoleVPN has no IPv6
        cfg["stats_interval"] = 1
        if self.our_kcp:
            cfg["kcp"] = self.our_kcp
        return t.write_json(self.cfg_dir / f"gw{side}.json", cfg)

    def go_gateway_config(self, side: str) -> Path:
        scheme = self.row.gateway_scheme(side)
        cfg = {
            "route_server": f"{scheme}://{ROUTER_ADDR[side]}:{ROUTER_PORT}",
            "key": self.shared,
            "gateway": GW_ADDR[side],
            "local_networks": [LAN[side]],
            "acls": [LAN[OTHER[side]], "169.254.0.0/16"],
            "route_networks": [LAN[OTHER[side]]],
        }
        return t.write_json(self.cfg_dir / f"go-gw{side}.json", cfg)

    # ----------------------------------------------------------------------- processes
    def start_router(self) -> subprocess.Popen:
        if self.row.router_kind == "go":
            cmd = [self.go_router, "-config", str(self.go_router_config()),
                   "-logToStderr=true"]
            name = "go-router"
        else:
            exe = t.console_script("polevpn-router")
            assert exe, "polevpn-router not installed (make venv)"
            cmd = [exe, f"-configPath={self.our_router_config()}"]
            name = "router"
        # cwd: the Go binaries write log files into their working directory
        proc = self.topo.popen("router", cmd, log_name=name, cwd=self.cfg_dir)
        wait_listening(self.topo, proc)
        self.router = proc
        return proc

    def start_gateway(self, side: str) -> subprocess.Popen:
        node = NODE[side]
        if self.row.gateway_kind(side) == "go":
            cmd = [self.go_gateway, "-config", str(self.go_gateway_config(side)),
                   "-logToStderr=true"]
            name = f"go-gw{side}"
        else:
            exe = t.console_script("polevpn-gateway")
            assert exe, "polevpn-gateway not installed (make venv)"
            cmd = [exe, f"-configPath={self.our_gateway_config(side)}"]
            name = f"gw{side}"
        proc = self.topo.popen(node, cmd, log_name=name, cwd=self.cfg_dir)
        self.gateways[side] = proc
        return proc

    def wait_registered(self, side: str, timeout: float = 30) -> None:
        proc = self.gateways[side]
        if self.row.gateway_kind(side) == "go":
            t.wait_for_log(proc, "received register route response", timeout=timeout)
        else:
            t.wait_for_log(proc, "registered", timeout=timeout)

    def cpu_seconds(self) -> dict[str, float]:
        """user + system CPU seconds of the router and each gateway process so far."""
        procs = {"router": self.router, **{f"gw{k}": v for k, v in self.gateways.items()}}
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, proc in procs.items():
            if proc is None or proc.poll() is not None:
                continue
            try:  # `ip netns exec` execs the daemon: the PID is the daemon's own
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / tick
        return out

    def kill_router(self) -> None:
        assert self.router is not None
        self.topo.stop(self.router, timeout=5, sig=signal.SIGKILL)
        self.router = None


def wait_listening(topo: t.Topology, proc: subprocess.Popen, timeout: float = 15) -> None:
    """Until something listens on TCP and UDP port 443 in the router namespace."""
    deadline = time.monotonic() + timeout
    while True:
        tcp = topo.run("router", ["ss", "-Hlnt", f"sport = :{ROUTER_PORT}"], check=False)
        udp = topo.run("router", ["ss", "-Hlnu", f"sport = :{ROUTER_PORT}"], check=False)
        if tcp.stdout.strip() and udp.stdout.strip():
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise t.TopologyError(
                f"router not listening on :{ROUTER_PORT} (rc={proc.poll()}):\n"
                f"{t.log_tail(proc.log_path)}")
        time.sleep(0.1)


# ----------------------------------------------------------------------- first-lost rule
FIRST_LOST_TABLE = "pvfirst"


def install_first_lost(topo: t.Topology) -> None:
    """Drop the first UDP datagram and the first TCP SYN each source sends to router :443.

    One-shot per source address: the first such packet adds its source to a set and is
    dropped; a source already in the set passes.  Hooked in the router's prerouting at raw
    priority (before conntrack), on both underlay links.
    """
    script = f"""table ip {FIRST_LOST_TABLE}
delete table ip {FIRST_LOST_TABLE}
table ip {FIRST_LOST_TABLE} {{
  set seen_udp {{ type ipv4_addr; flags dynamic; }}
  set seen_syn {{ type ipv4_addr; flags dynamic; }}
  chain pre {{
    type filter hook prerouting priority -300;
    udp dport {ROUTER_PORT} ip saddr @seen_udp accept
    udp dport {ROUTER_PORT} add @seen_udp {{ ip saddr }} counter drop
    tcp dport {ROUTER_PORT} tcp flags & (syn | ack) == syn ip saddr @seen_syn accept
    tcp dport {ROUTER_PORT} tcp flags & (syn | ack) == syn add @seen_syn {{ ip saddr }} \\
counter drop
  }}
}}
"""
    topo.run("router", ["nft", "-f", "-"], input=script)


def first_lost_drops(topo: t.Topology) -> int:
    res = topo.run("router", ["nft", "-j", "list", "table", "ip", FIRST_LOST_TABLE],
                   check=False)
    if res.returncode != 0:
        return 0
    total = 0
    for item in json.loads(res.stdout).get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                total += expr["counter"]["packets"]
    return total


def remove_first_lost(topo: t.Topology) -> None:
    topo.run("router", ["nft", "delete", "table", "ip", FIRST_LOST_TABLE], check=False)


# ------------------------------------------------------------------------------- checks
def tun_drops(topo: t.Topology, node: str) -> int:
    """tx + rx drops of every TUN device (link type none) in ``node``."""
    res = topo.run(node, ["ip", "-s", "-j", "link", "show"], check=False)
    total = 0
    for link in json.loads(res.stdout or "[]"):
        if link.get("link_type") == "none" and "stats64" in link:
            st = link["stats64"]
            total += st["tx"].get("dropped", 0) + st["rx"].get("dropped", 0)
    return total


def mbit(data: dict) -> float:
    return round(data["end"]["sum_received"]["bits_per_second"] / 1e6, 1)


def checks(topo: t.Topology, fleet: Fleet, res: Result, iperf_seconds: int,
           transfer_bytes: int) -> None:
    c = res.checks
    for src, dst, key in (("hostA", t.HOST_B, "ping_a_to_b"), ("hostB", t.HOST_A,
                                                               "ping_b_to_a")):
        # -w: wait for PINGS replies (iputils otherwise lingers only 2 x the largest RTT after
        # the last request, and a reply KCP delivers after a retransmission timeout would
        # count as lost); ping keeps sending meanwhile, so what counts is how many of the
        # first PINGS requests were answered, late or not
        ping = topo.run(src, ["ping", "-n", "-c", str(PINGS), "-i", "0.05", "-W", "2",
                              "-w", "15", dst], check=False, timeout=30)
        answered = {int(n) for n in re.findall(r"icmp_seq=(\d+)", ping.stdout)}
        c[key] = f"{len(answered & set(range(1, PINGS + 1)))}/{PINGS}"
    x = topo.transfer("hostA", "hostB", t.HOST_B, transfer_bytes, timeout=180)
    c["sha256_ok"] = x["ok"]
    c["transfer_mbit"] = round(x["mbit_s"], 1)
    impaired = topo.impair_proc is not None and topo.impair_proc.poll() is None
    for client, server, addr, key in (("hostA", "hostB", t.HOST_B, "iperf_a_to_b"),
                                      ("hostB", "hostA", t.HOST_A, "iperf_b_to_a")):
        if impaired:
            topo.impair_stats(reset=True)
        cpu0 = fleet.cpu_seconds()
        try:
            data = topo.iperf3(client, server, addr, seconds=iperf_seconds)
        except t.TopologyError as exc:
            c[key] = f"failed: {str(exc)[:200]}"
            continue
        c[key] = mbit(data)
        cpu1 = fleet.cpu_seconds()
        # CPU seconds each daemon spent on this run (the machine's load shows up here)
        c[f"{key}_cpu_s"] = {n: round(cpu1[n] - cpu0[n], 2) for n in cpu1 if n in cpu0}
        # TCP retransmissions inside the tunnel: packets the tunnel lost or dropped
        c[f"{key}_tcp_retr"] = data["end"]["sum_sent"].get("retransmits")
        if impaired:
            # what crossed gwA's underlay for this run: KCP's own overhead and resends
            st = topo.impair_stats()
            payload = data["end"]["sum_sent"]["bytes"]
            c[f"{key}_wire"] = {
                d: {"pkts": st[d]["received"], "bytes": st[d]["bytes_received"],
                    "dropped": st[d]["dropped"]} for d in ("up", "down")}
            sender = "up" if client == "hostA" else "down"
            c[f"{key}_wire_per_payload"] = round(st[sender]["bytes_received"]
                                                 / max(payload, 1), 3)
    if fleet.row.router_kind == "ours" and fleet.router is not None:
        time.sleep(1.2)  # one more stats line
        stats = t.last_stats(fleet.router.log_path)
        if "segmented" in stats:
            c["router_segmented"] = int(stats["segmented"])
    for side, proc in fleet.gateways.items():
        if fleet.row.gateway_kind(side) == "ours":
            stats = t.last_stats(proc.log_path)
            if stats.get("transport") == "kcp":
                c[f"gw{side}_kcp"] = {k: v for k, v in stats.items()
                                      if k in ("fec", "srtt_ms", "fec_recovered")}
    for side, proc in fleet.gateways.items():
        if proc.poll() is not None:
            c[f"gw{side}_exited"] = proc.returncode
        # packets the kernel dropped at the gateway's TUN (a gateway reading its TUN more
        # slowly than the LAN sends): the inner TCP's retransmissions come from here
        c[f"gw{side}_tun_drops"] = tun_drops(topo, NODE[side])
    pings_ok = all(int(v.split("/")[0]) >= PINGS for k, v in c.items() if k.startswith("ping_"))
    res.ok = (pings_ok and bool(c["sha256_ok"])
              and all(isinstance(c[k], float) for k in ("iperf_a_to_b", "iperf_b_to_a"))
              and not any(k.endswith("_exited") for k in c))


def run_row(row: Row, go_router: str, go_gateway: str, keys: Path, log_root: Path,
            iperf_seconds: int, transfer_bytes: int, our_kcp: dict | None = None,
            rate_mbit: float | None = None) -> Result:
    res = Result(row.name)
    started = time.monotonic()
    log_dir = log_root / row.name.replace("/", "_").replace(":", "-")
    topo = t.Topology(log_dir=log_dir, impair=True)
    try:
        with t.built(topo):
            fleet = Fleet(topo, row, keys, go_router, go_gateway, log_dir, our_kcp)
            fleet.start_router()
            if row.condition == "first-lost":
                install_first_lost(topo)
            t_start = time.monotonic()
            for side in ("A", "B"):
                fleet.start_gateway(side)
            for side in ("A", "B"):
                fleet.wait_registered(side)
            res.checks["registered_s"] = round(time.monotonic() - t_start, 2)
            up = topo.first_reply("hostA", t.HOST_B, deadline=20)
            res.checks["first_reply_s"] = None if up is None else round(up, 2)
            if row.condition == "first-lost":
                res.checks["first_lost_dropped"] = first_lost_drops(topo)
                remove_first_lost(topo)
            if up is None:
                raise t.TopologyError("no echo reply hostA -> hostB within 20 s of start")
            if row.condition == "loss":
                topo.start_impair(seed=15, **LOSS)
                if rate_mbit:
                    # a bandwidth-limited path: resends then cost goodput, not just CPU
                    topo.rate_limit("gwA", t.GW_A_UL_IF, rate_mbit)
                    topo.rate_limit("router", t.ROUTER_UL_A_IF, rate_mbit)
                    res.checks["rate_mbit"] = rate_mbit
            if row.condition == "restart":
                fleet.kill_router()
                t0 = time.monotonic()
                fleet.start_router()
                back = topo.first_reply("hostA", t.HOST_B, deadline=90)
                res.checks["recovery_s"] = (None if back is None
                                            else round(time.monotonic() - t0, 1))
                if back is None:
                    raise t.TopologyError("no echo reply within 90 s of the router restart")
            checks(topo, fleet, res, iperf_seconds, transfer_bytes)
            if row.condition == "loss":
                res.checks["impair"] = {k: v for k, v in topo.stop_impair().items()
                                        if k in ("up", "down")}
    except Exception as exc:  # one row's failure never stops the others
        res.ok = False
        res.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    res.seconds = round(time.monotonic() - started, 1)
    return res


# ------------------------------------------------------------------------------- report
def table(lines: list[dict]) -> str:
    """A markdown table of result lines (as --json writes them)."""
    out = ["| row | result | gw up s | recovery s | pings a>b / b>a | 20 MB SHA-256 "
           "| Mbit/s a>b | Mbit/s b>a | wire/payload a>b | note |",
           "|---|---|---:|---:|---|---|---:|---:|---:|---|"]
    for d in lines:
        note = []
        if "first_lost_dropped" in d:
            note.append(f"{d['first_lost_dropped']} dropped")
        if d.get("router_segmented"):
            note.append(f"router cut {d['router_segmented']} super-packets")
        if d.get("error"):
            err = [ln for ln in d["error"].splitlines() if ln.strip()]
            text = err[0][:100] + (f" ... {err[-1][-140:]}" if len(err) > 1 else "")
            note.append(text.replace("|", "/"))
        sha = d.get("sha256_ok")
        out.append("| " + " | ".join(str(x) for x in (
            f"`{d['row']}`", "ok" if d["ok"] else "**FAIL**", d.get("registered_s", "-"),
            d.get("recovery_s", "-"),
            f"{d.get('ping_a_to_b', '-')} / {d.get('ping_b_to_a', '-')}",
            "-" if sha is None else ("ok" if sha else "**mismatch**"),
            d.get("iperf_a_to_b", "-"), d.get("iperf_b_to_a", "-"),
            d.get("iperf_a_to_b_wire_per_payload", "-"), "; ".join(note))) + " |")
    return "\n".join(out)


# --------------------------------------------------------------------------------- main
def skip(reason: str) -> int:
    print(f"interop_go: skipped: {reason}")
    return 0


def version_of(path: str) -> str:
    return f"{Path(path).name} ({Path(path).stat().st_size} bytes)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--go-router", default=os.environ.get("POLEVPN_GO_ROUTER"))
    ap.add_argument("--go-gateway", default=os.environ.get("POLEVPN_GO_GATEWAY"))
    ap.add_argument("--only", nargs="*", default=None,
                    help="row names (pairing:scheme:condition) or substrings of them")
    ap.add_argument("--list", action="store_true", help="list the rows and exit")
    ap.add_argument("--table", metavar="JSONL",
                    help="print a markdown table of the results in JSONL (from --json) and exit")
    ap.add_argument("--json", help="append one JSON line per row to this file")
    ap.add_argument("--log-dir", help="keep every daemon log here (default: a temp dir)")
    ap.add_argument("--iperf-seconds", type=int, default=10)
    ap.add_argument("--transfer-bytes", type=int, default=TRANSFER_BYTES)
    ap.add_argument("--rate-mbit", type=float, default=None,
                    help="loss rows: also shape gwA's underlay to this rate, both ways")
    ap.add_argument("--our-kcp", type=json.loads, default=None, metavar="JSON",
                    help='extra "kcp" settings for our daemons, e.g. \'{"send_window": 2048}\'')
    args = ap.parse_args(argv)

    if args.table:
        with open(args.table) as fh:
            print(table([json.loads(line) for line in fh if line.strip()]))
        return 0
    rows = all_rows()
    if args.only:
        rows = [r for r in rows if any(o == r.name or o in r.name for o in args.only)]
    if args.list:
        print("\n".join(r.name for r in rows))
        return 0
    for opt, path in (("--go-router/POLEVPN_GO_ROUTER", args.go_router),
                      ("--go-gateway/POLEVPN_GO_GATEWAY", args.go_gateway)):
        if not path:
            return skip(f"no Go binary given ({opt})")
        if not os.access(path, os.X_OK):
            return skip(f"{path} is not an executable")
    ok, why = t.daemons_ready()
    if not ok:
        return skip(why)

    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="interop-go-"))
    log_root.mkdir(parents=True, exist_ok=True)
    print(f"interop_go: logs in {log_root}", flush=True)
    keys = log_root / "keys"
    if not (keys / "ca.crt").exists():
        keygen = t.console_script("polevpn-keygen")
        assert keygen, "polevpn-keygen not installed (make venv)"
        subprocess.run([keygen, "--out", str(keys), "--san", t.ROUTER_UL_A, "--san",
                        t.ROUTER_UL_B], check=True, capture_output=True, timeout=60)
    header = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "go_router": version_of(args.go_router),
              "go_gateway": version_of(args.go_gateway), "our_kcp": args.our_kcp}
    print(json.dumps(header), flush=True)
    results = []
    for row in rows:
        print(f"--- {row.name}", flush=True)
        res = run_row(row, args.go_router, args.go_gateway, keys, log_root,
                      args.iperf_seconds, args.transfer_bytes, args.our_kcp,
                      args.rate_mbit)
        line = {"row": res.row, "ok": res.ok, "seconds": res.seconds, **res.checks}
        if res.error:
            line["error"] = res.error
        print(json.dumps(line), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({**header, **line}) + "\n")
        results.append(res)
    failed = [r.row for r in results if not r.ok]
    print(f"interop_go: {len(results) - len(failed)}/{len(results)} rows ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
