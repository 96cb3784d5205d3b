#!/usr/bin/env python3
"""`make direct-bench`: direct office-to-office paths against the router relay (issue 18).

One NAT topology (tests/topology.py ``NatTopology``): each office behind its own nftables
masquerade NAT, the router far away (40 ms each way on each of its links), the two NATs
close (5 ms each way), the delays from the userspace impairment element. The router and
both gateways on kcp:// (``--scheme tls`` for tls://), measured twice in the same run:

* **relayed**: ``"direct": false`` in both gateways' config, every packet through the
  router;
* **direct**: the gateways restarted with ``"direct": true`` (the default), the direct path
  awaited (its ``direct path up`` log line), then the same measurements.

Each: ping hostA -> hostB (``--pings`` of them, 20 ms apart: p50, p99, loss), iperf3 TCP
hostA -> hostB for ``--seconds``, and over the iperf3 run the router process's CPU (from
/proc/<pid>/stat: its share of one core) and what went through the router: the IP bytes it
forwarded between gateways (``bytes_forwarded`` of /api/v1/status) and the bytes on its
public interface (both ways, every packet: control, heartbeats, tunnels). Against the
relayed run that gives the router CPU and bytes the direct path saves.

Without the feature in the installed polevpn (or when the path does not come up within 15
s) the direct half is reported as not measured. Writes the direct section of
docs/benchmarks.md (between BEGIN and END; `make bench` runs this and keeps the section
when it rewrites the file) and docs/direct_bench.json; ``--no-write`` prints only. Needs
root, iproute2, nftables and iperf3; everything is removed again, processes ended by PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # noqa: E402
import soak  # noqa: E402
import topology as t  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BEGIN = "<!-- direct:begin -->"
END = "<!-- direct:end -->"

SECONDS = 10  # each iperf3 run
PINGS = 200
PING_INTERVAL = 0.02
UP_TIMEOUT = 15.0  # for the direct path to come up
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODES = ("relayed", "direct")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], pct: float) -> float | None:
    """The ``pct`` percentile (nearest rank) of ``values``; None without any."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize_pings(rtts: list[float], sent: int) -> dict:
    return {
        "sent": sent,
        "received": len(rtts),
        "loss_pct": round(100 * (sent - len(rtts)) / sent, 1) if sent else None,
        "p50_ms": None if not rtts else round(percentile(rtts, 50), 2),
        "p99_ms": None if not rtts else round(percentile(rtts, 99), 2),
    }


class Bench:
    """The topology, the router, and the gateways started for one mode at a time."""

    def __init__(self, work: Path, keys: Path, scheme: str) -> None:
        self.work, self.keys, self.scheme = work, keys, scheme
        self.topo = t.NatTopology(log_dir=work / "logs")
        self.router: Any = None
        self.gateways: dict[str, Any] = {}

    def __enter__(self) -> Bench:
        try:
            self.topo.setup()
            cfg = t.nat_router_config(self.keys, direct={"enable": True})
            self.router = t.start_router(self.topo, t.write_json(self.work / "router.json",
                                                                 cfg))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        t.teardown_and_warn(self.topo)

    def start_gateways(self, direct: bool) -> None:
        for proc in self.gateways.values():
            t.Topology.stop(proc, timeout=5)
        self.gateways.clear()
        mode = "direct" if direct else "relayed"
        for side in "AB":
            cfg = t.gateway_config(side, self.keys,
                                   route_server=f"{self.scheme}://{t.ROUTER_PUB}:443",
                                   direct=direct, stats_interval=1)
            path = t.write_json(self.work / f"gw{side}-{mode}.json", cfg)
            self.gateways[side] = t.start_gateway(self.topo, f"gw{side}", path,
                                                  log_name=f"gw{side}-{mode}")
        if self.topo.wait_ping("hostA", t.HOST_B, deadline=20) is None:
            raise t.TopologyError("hostA does not reach hostB")

    def wait_direct(self) -> float | None:
        """Seconds until gwA logs its direct path to gwB up (pings flowing), or None."""
        log = self.gateways["A"].log_path
        pings = self.topo.start_pings("hostA", t.HOST_B, count=round(UP_TIMEOUT / 0.1),
                                      interval=0.1)
        start = time.monotonic()
        try:
            while time.monotonic() - start < UP_TIMEOUT:
                if t.find_log_line(log, "direct path up", f"peer={t.GW_B_TUN4}"):
                    return round(time.monotonic() - start, 2)
                time.sleep(0.05)
            return None
        finally:
            t.Topology.stop(pings, timeout=2)

    def router_bytes(self) -> tuple[int, int]:
        """(bytes the router forwarded between gateways, bytes on its public interface)."""
        rx, tx = self.topo.if_bytes("router", "pub0")
        return t.router_forwarded_bytes(self.topo), rx + tx

    def measure(self, seconds: int, pings: int) -> dict:
        proc = self.topo.start_pings("hostA", t.HOST_B, count=pings, interval=PING_INTERVAL)
        proc.wait(timeout=pings * PING_INTERVAL + 15)
        rtts = [r.rtt_ms for r in t.ping_replies(proc.log_path)]
        out: dict[str, Any] = {"ping": summarize_pings(rtts, pings)}
        pid = self.router.pid
        fwd0, wire0 = self.router_bytes()
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        data = self.topo.iperf3("hostA", "hostB", t.HOST_B, seconds=seconds)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        fwd1, wire1 = self.router_bytes()
        end = data["end"]
        out["iperf3"] = {
            "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
            "bytes": end["sum_received"]["bytes"],
            "retransmits": end["sum_sent"].get("retransmits"),
        }
        out["router"] = {
            "cpu_s": round(cpu, 2),
            "cpu_pct": round(100 * cpu / wall, 1),
            "forwarded_bytes": fwd1 - fwd0,
            "wire_bytes": wire1 - wire0,
        }
        return out


def have_direct() -> bool:
    import polevpn
    import polevpn.config

    return ((Path(polevpn.__file__).parent / "direct" / "rendezvous.py").is_file()
            and hasattr(polevpn.config, "DirectConfig"))


def run(work: Path, keys: Path, scheme: str, seconds: int, pings: int, report: dict) -> int:
    rc = 0
    with Bench(work, keys, scheme) as b:
        for mode in MODES:
            direct = mode == "direct"
            print(f"{mode} ({scheme}://) ...", flush=True)
            try:
                b.start_gateways(direct=direct)
                if direct:
                    up = b.wait_direct()
                    report["direct_up_s"] = up
                    if up is None:
                        why = ("the installed polevpn has no direct paths" if not have_direct()
                               else f"no direct path within {UP_TIMEOUT:g} s")
                        report["errors"].append(f"direct: {why}")
                        print(f"  {why}", flush=True)
                        continue
                    time.sleep(0.5)
                report[mode] = b.measure(seconds, pings)
                r = report[mode]
                print(f"  ping p50 {r['ping']['p50_ms']} p99 {r['ping']['p99_ms']} ms, "
                      f"{r['iperf3']['mbit_s']} Mbit/s, router {r['router']}", flush=True)
            except (t.TopologyError, AssertionError, subprocess.SubprocessError, OSError,
                    KeyError, ValueError) as exc:
                t.print_failure(mode, exc, b.topo.log_dir)
                report["errors"].append(f"{mode}: {str(exc)[:300]}")
                rc = 1
    rel, dir_ = report.get("relayed"), report.get("direct")
    if rel and dir_:
        saved = rel["router"]["forwarded_bytes"] - dir_["router"]["forwarded_bytes"]
        report["saved"] = {
            "forwarded_bytes": saved,
            "forwarded_share": round(saved / rel["router"]["forwarded_bytes"], 3)
            if rel["router"]["forwarded_bytes"] else None,
            "router_cpu_s": round(rel["router"]["cpu_s"] - dir_["router"]["cpu_s"], 2),
        }
    return rc


# ---------------------------------------------------------------------------- docs


def _n(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def section(r: dict) -> str:
    m = r["machine"]
    lines = [
        BEGIN,
        "## Direct paths between offices (issue 18)",
        "",
        f"`{r['command']}` (`tests/bench_direct.py`"
        + ("; `make direct-bench` runs just this" if r["command"] != "make direct-bench"
           else "")
        + f"), {r['date']}, polevpn {r['git']}. Each office behind its own nftables "
        f"masquerade NAT, the router {r['router_delay_ms']:g} ms each way from each NAT, the "
        f"NATs {r['peer_delay_ms']:g} ms each way from each other (tests/topology.py "
        f"`NatTopology`, the delays from the userspace impairment element); gateways and "
        f"router on {r['scheme']}://. **relayed**: `\"direct\": false` in both gateways; "
        "**direct**: the default, measured once the direct path is up"
        + (f" ({r['direct_up_s']:.2f} s after the first ping)"
           if r.get("direct_up_s") is not None else "")
        + f". Ping hostA -> hostB ({r['pings']} pings, {PING_INTERVAL * 1000:.0f} ms "
        f"apart), then iperf3 TCP hostA -> hostB for {r['seconds']} s, during which the "
        "router process's CPU (share of one core, /proc) and what went through the router: "
        "the IP bytes it forwarded between gateways (`bytes_forwarded`, /api/v1/status) and "
        "the bytes on its public interface (both ways, all traffic). Everything shares the "
        f"machine's {m['cores']} cores ({m['cpu']}), the impairment element (Python) "
        "included, which bounds the throughput of both: compare within one run.",
        "",
        "| path | ping p50 (ms) | ping p99 (ms) | loss | iperf3 (Mbit/s) | router CPU | "
        "router forwarded (MB) | router interface (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        x = r.get(mode)
        if not x:
            lines.append(f"| {mode} | not measured | | | | | | |")
            continue
        p, ip, ro = x["ping"], x["iperf3"], x["router"]
        lines.append(
            f"| {mode} | {_n(p['p50_ms'])} | {_n(p['p99_ms'])} | {_n(p['loss_pct'])} % | "
            f"{_n(ip['mbit_s'])} | {_n(ro['cpu_pct'])} % | {_mb(ro['forwarded_bytes'])} | "
            f"{_mb(ro['wire_bytes'])} |")
    lines.append("")
    saved = r.get("saved")
    if saved:
        share = saved["forwarded_share"]
        lines += [
            f"Saved at the router by the direct path: {_mb(saved['forwarded_bytes'])} MB "
            "forwarded" + (f" ({share:.0%} of the relayed run's)" if share is not None else "")
            + f", {saved['router_cpu_s']:.2f} CPU seconds over the iperf3 run.",
            "",
        ]
    lines += [line for note in r.get("notes", []) for line in (note, "")]
    if r.get("errors"):
        lines += [f"Not measured: {e}" for e in r["errors"]] + [""]
    lines.append(END)
    return "\n".join(lines)


def write_docs(report: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "direct_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    md = DOCS / "benchmarks.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    md.write_text(soak.with_section(text, BEGIN, END, section(report)))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: teardown, temp dir removal


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=SECONDS, help="each iperf3 run")
    ap.add_argument("--pings", type=int, default=PINGS, help="pings per mode")
    ap.add_argument("--scheme", choices=("kcp", "tls"), default="kcp")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--command", default="make direct-bench", help="named in the docs")
    ap.add_argument("--note", action="append", default=[],
                    help="a paragraph for the docs section (repeatable)")
    args = ap.parse_args()
    ok, why = t.daemons_ready()
    for cmd in ("iperf3", "nft"):
        if ok and shutil.which(cmd) is None:
            ok, why = False, f"{cmd} not installed"
    if not ok:
        print(f"direct bench cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="polevpn-direct-bench-"))
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "git": hostinfo.git_rev(),
        "machine": hostinfo.machine(),
        "scheme": args.scheme,
        "seconds": args.seconds,
        "pings": args.pings,
        "router_delay_ms": t.NAT_ROUTER_DELAY_MS,
        "peer_delay_ms": t.NAT_PEER_DELAY_MS,
        "notes": args.note,
        "errors": [],
    }
    try:
        from polevpn.keygen import generate

        keys = generate(work / "keys").out_dir
        rc = run(work, keys, args.scheme, args.seconds, args.pings, report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + section(report))
    if not args.no_write:
        write_docs(report)
        print(f"wrote the direct section of {DOCS / 'benchmarks.md'} and "
              f"{DOCS / 'direct_bench.json'}")
    print(f"direct bench wall time {time.monotonic() - started:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
