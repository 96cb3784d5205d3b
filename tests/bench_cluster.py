#!/usr/bin/env python3
"""`make cluster-bench`: a cluster of two routers (issue 17), measured in one run.

The end-to-end topology with a second router and two more offices (tests/topology.py:
``add_router2``, ``add_office("C")``, ``add_office("D")``), etcd in a namespace of its own
(tests/etcd.py), r1 in the router namespace and r2 in router2, linked over tls://; every
gateway on tls://. In order:

* **same router against across routers**: gwA and gwC at r1, gwB at r2; iperf3 TCP
  hostA -> hostC (through r1 alone) and hostA -> hostB (r1, the router link, r2), with one
  and with four streams;
* **one router against two**: four offices, two pairs sending at once (hostA -> hostB and
  hostC -> hostD, an iperf3 each): all four gateways at r1, then gwA and gwB at r1 and gwC
  and gwD at r2; the aggregate and each router's CPU share;
* **failover**: gwC with a link to each router (the one to r2 its backup, so that its
  traffic certainly takes r1), pings hostC -> hostB (gwB at r2) every PING_INTERVAL; r1 is
  SIGKILLed by its PID LEAD s in, and the time from the kill until the first answer to a
  ping sent after it is taken; r1 is started again and gwC's link to it awaited between
  runs; FAILOVER_RUNS runs, their median and worst; then as many with r1 frozen (SIGSTOP:
  a hung host, whose connections nobody resets) instead;
* **scale**: tests/test_cluster_scale.py's 2000 protocol-level gateways over two router
  processes (connect, convergence, RSS, etcd keys).

Writes the cluster section of docs/benchmarks.md (between BEGIN and END; `make bench`
runs this and keeps the section when it rewrites the file) and docs/cluster_bench.json.
``--seconds``, ``--runs``, ``--no-scale`` and ``--no-write`` for trying it out. Needs root,
iproute2, iperf3 and etcd-server; everything is removed again, processes ended by PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import etcd as etcd_fixture  # noqa: E402
import hostinfo  # noqa: E402
import soak  # noqa: E402
import topology as t  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
BEGIN = "<!-- cluster:begin -->"
END = "<!-- cluster:end -->"

SECONDS = 10  # each iperf3 run
FAILOVER_RUNS = 5
PING_INTERVAL = 0.02
PING_SECONDS = 4.0
LEAD = 1.5  # s of pings before the kill
LEASE_TTL = 3
PEER_KEY = "a-cluster-credential-for-the-bench"
C, D = t.OFFICES["C"], t.OFFICES["D"]
# where each office's gateway dials each router (its own link to it)
SERVERS = {
    ("A", "r1"): t.ROUTER_UL_A,
    ("B", "r1"): t.ROUTER_UL_B,
    ("B", "r2"): t.ROUTER2_UL_B,
    ("C", "r1"): C.router_ul,
    ("C", "r2"): C.router2_ul,
    ("D", "r1"): D.router_ul,
    ("D", "r2"): D.router2_ul,
}
HOSTS = {"A": t.HOST_A, "B": t.HOST_B, "C": C.host, "D": D.host}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def summarize(data: dict) -> dict:
    end = data["end"]
    return {
        "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "retransmits": end["sum_sent"].get("retransmits"),
    }


class Cluster:
    """The topology, etcd, both routers, and the gateways placed where a phase wants them."""

    def __init__(self, work: Path, keys: Path) -> None:
        self.work, self.keys = work, keys
        self.topo = t.Topology(log_dir=work / "logs")
        self.etcd = etcd_fixture.Etcd()
        self.routers: dict[str, Any] = {}
        self.gateways: dict[str, Any] = {}
        self.where: dict[str, str | None] = {}  # office -> where place() put it
        self.configs: dict[str, Path] = {}

    def __enter__(self) -> Cluster:
        try:
            self.etcd.setup()
            self.topo.setup()
            self.topo.add_router2()
            self.topo.add_office("C")
            self.topo.add_office("D")
            for node in ("router", t.ROUTER2):
                self.etcd.attach(self.topo.name(node))
            for rid, addr in (("r1", t.ROUTER_RR), ("r2", t.ROUTER2_RR)):
                cfg = t.router_config(self.keys, stats_interval=1, cluster={
                    "name": "bench", "router_id": rid,
                    "etcd": {"endpoints": self.etcd.endpoints}, "lease_ttl": LEASE_TTL,
                    "peer_address": f"{addr}:443", "peer_key": PEER_KEY,
                })  # fmt: skip
                self.configs[rid] = t.write_json(self.work / f"{rid}.json", cfg)
            self.start_router("r1")
            self.start_router("r2")
            t.wait_for_log(self.routers["r1"], "router link up", "router=r2", timeout=15)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        t.teardown_and_warn(self.topo)
        self.etcd.teardown()

    def start_router(self, rid: str) -> Any:
        node = "router" if rid == "r1" else t.ROUTER2
        proc = t.start_router(self.topo, self.configs[rid], log_name=rid, node=node)
        self.routers[rid] = proc
        return proc

    def place(self, **where: str | None) -> None:
        """Gateways of offices at routers: ``place(A="r1", B="r2", C=None)``; None stops
        it, "both" gives it a link to each router with the one to r2 as its backup. Every
        gateway named is (re)started; the others stay as they are."""
        for side, rid in where.items():
            self.where[side] = rid
            old = self.gateways.pop(side, None)
            if old is not None:
                t.Topology.stop(old)
            if rid is None:
                continue
            peers = "".join(s for s in "ABCD" if s != side)
            if rid == "both":
                links = [
                    {"name": "r1", "route_server": f"tls://{SERVERS[side, 'r1']}:443"},
                    {"name": "r2", "route_server": f"tls://{SERVERS[side, 'r2']}:443",
                     "backup": True},
                ]
                cfg = t.gateway_config(side, self.keys, peers=peers, links=links,
                                       link_heartbeat_interval=0.25, link_timeout=1.0)
                del cfg["route_server"]
            else:
                cfg = t.gateway_config(side, self.keys, peers=peers,
                                       route_server=f"tls://{SERVERS[side, rid]}:443")
            path = t.write_json(self.work / f"gw{side}-{rid}.json", cfg)
            self.gateways[side] = t.start_gateway(self.topo, f"gw{side}", path,
                                                  log_name=f"gw{side}-{rid}")

    def reach(self, src: str, dst: str) -> None:
        if self.topo.wait_ping(f"host{src}", HOSTS[dst], deadline=20) is None:
            raise t.TopologyError(f"host{src} does not reach host{dst}")


def throughput(cl: Cluster, seconds: int) -> dict:
    """hostA -> hostC (both at r1) against hostA -> hostB (gwB at r2), 1 and 4 streams."""
    print("same router against across routers ...", flush=True)
    cl.place(A="r1", B="r2", C="r1", D=None)
    cl.reach("A", "C")
    cl.reach("A", "B")
    rows = []
    for streams in (1, 4):
        same = summarize(cl.topo.iperf3("hostA", "hostC", C.host, seconds, streams=streams))
        cross = summarize(cl.topo.iperf3("hostA", "hostB", t.HOST_B, seconds,
                                         streams=streams))
        ratio = round(cross["mbit_s"] / same["mbit_s"], 3) if same["mbit_s"] else None
        rows.append({"streams": streams, "same": same, "cross": cross, "ratio": ratio})
        print(f"  {streams} stream(s): same {same['mbit_s']} cross {cross['mbit_s']} Mbit/s",
              flush=True)
    return {"seconds": seconds, "rows": rows}


def _two_flows(cl: Cluster, seconds: int) -> dict:
    """hostA -> hostB and hostC -> hostD at once; each one's figures, the sum, router CPU."""
    results: dict[str, Any] = {}

    def run(key: str, src: str, dst: str, port: int) -> None:
        try:
            results[key] = summarize(cl.topo.iperf3(f"host{src}", f"host{dst}", HOSTS[dst],
                                                    seconds, port=port))
        except Exception as exc:  # reported below, the other flow still ends
            results[key] = exc

    pids = {rid: p.pid for rid, p in cl.routers.items()}
    cpu0 = {rid: cpu_seconds(pid) for rid, pid in pids.items()}
    t0 = time.monotonic()
    flows = [threading.Thread(target=run, args=("AB", "A", "B", 5201)),
             threading.Thread(target=run, args=("CD", "C", "D", 5202))]
    for th in flows:
        th.start()
    for th in flows:
        th.join(seconds + 60)
    wall = time.monotonic() - t0
    for key, value in results.items():
        if isinstance(value, Exception):
            raise t.TopologyError(f"flow {key}: {value}")
    cpu = {rid: round(100 * (cpu_seconds(pid) - cpu0[rid]) / wall) for rid, pid in pids.items()}
    total = round(results["AB"]["mbit_s"] + results["CD"]["mbit_s"], 1)
    return {**results, "total": total, "cpu_pct": cpu}


def aggregate(cl: Cluster, seconds: int) -> dict:
    print("four offices, one router against two ...", flush=True)
    cl.place(A="r1", B="r1", C="r1", D="r1")
    cl.reach("A", "B")
    cl.reach("C", "D")
    one = _two_flows(cl, seconds)
    print(f"  one router: {one['total']} Mbit/s, CPU {one['cpu_pct']}", flush=True)
    cl.place(C="r2", D="r2")
    cl.reach("C", "D")
    two = _two_flows(cl, seconds)
    print(f"  two routers: {two['total']} Mbit/s, CPU {two['cpu_pct']}", flush=True)
    ratio = round(two["total"] / one["total"], 3) if one["total"] else None
    return {"seconds": seconds, "one": one, "two": two, "ratio": ratio}


def failover(cl: Cluster, runs: int, freeze: bool = False) -> dict:
    """gwC on both routers (r2 its backup), pings hostC -> hostB, r1 SIGKILLed each run
    (``freeze``: SIGSTOPped, a hung host that resets nothing, and killed once the pings
    are over)."""
    how = "frozen (SIGSTOP)" if freeze else "SIGKILLed"
    print(f"failover of a dual-homed office, r1 {how}, {runs} runs ...", flush=True)
    if cl.where.get("C") != "both" or cl.where.get("B") != "r2":
        cl.place(A=None, D=None, B="r2", C="both")
    gw = cl.gateways["C"]
    t.wait_log_lines(gw.log_path, 1, 'msg="link up"', " link=r1 ", timeout=20)
    t.wait_log_lines(gw.log_path, 1, 'msg="link up"', " link=r2 ", timeout=20)
    out = []
    for i in range(runs):
        cl.reach("C", "B")
        ups = t.count_log_lines(gw.log_path, 'msg="link up"', " link=r1 ")
        pings = cl.topo.start_pings("hostC", t.HOST_B, count=round(PING_SECONDS / PING_INTERVAL),
                                    interval=PING_INTERVAL)
        time.sleep(LEAD)
        carrier, grown = cl.topo.busiest_link("gwC", ["wan0", "wan1"], 0.2)
        if carrier != "wan0":
            raise t.TopologyError(f"gwC's pings do not take r1: {grown}")
        r1 = cl.routers["r1"]
        killed = time.time()
        if freeze:
            r1.send_signal(signal.SIGSTOP)
        else:
            t.Topology.stop(r1, sig=signal.SIGKILL)
        try:
            pings.wait(timeout=PING_SECONDS + 15)
        finally:
            if freeze:  # SIGKILL ends a stopped process too
                t.Topology.stop(r1, sig=signal.SIGKILL)
        back = t.recovery_time(t.ping_replies(pings.log_path), killed)
        out.append(None if back is None else round(back, 3))
        print(f"  run {i + 1}: pings answered again after {out[-1]} s", flush=True)
        r1 = cl.start_router("r1")
        t.wait_for_log(r1, "router link up", "router=r2", timeout=15)
        t.wait_log_lines(gw.log_path, ups + 1, 'msg="link up"', " link=r1 ", timeout=20)
    done = [x for x in out if x is not None]
    return {
        "runs": out,
        "median": round(statistics.median(done), 3) if done else None,
        "worst": None if None in out or not out else max(done),
        "ping_interval": PING_INTERVAL,
        "lead": LEAD,
        "link_timeout": 1.0,
        "link_heartbeat_interval": 0.25,
    }


def scale(work: Path) -> dict:
    print("2000 gateways on two routers ...", flush=True)
    import test_cluster_scale as sc

    work.mkdir(parents=True, exist_ok=True)
    with etcd_fixture.Etcd() as etcd:
        out = sc.run_scale(etcd, work)
    return {"gateways": sc.N, "rss_limit_mb": sc.RSS_LIMIT_MB, **out}


# ---------------------------------------------------------------------------- docs


def _n(value: Any, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def section(r: dict) -> str:
    m = r["machine"]
    lines = [
        BEGIN,
        "## Router cluster (issue 17)",
        "",
        f"`{r['command']}` (`tests/bench_cluster.py`"
        + ("; `make cluster-bench` runs just this" if r["command"] != "make cluster-bench"
           else "")
        + f"), {r['date']}, polevpn {r['git']}, etcd {r['etcd']}.",
        "Two router processes, r1 and r2, in namespaces of the end-to-end topology "
        f"(`add_router2`, `add_office`), sharing their routes through one etcd member (lease "
        f"{r['lease_ttl']} s) and linked over tls://; every gateway on tls://, TUN MTU "
        f"{r['mtu']}. Everything here (the iperf3 ends, up to four gateways, both routers) "
        f"shares the machine's {m['cores']} cores ({m['cpu']}): compare figures within "
        "one run.",
        "",
        *[line for note in r.get("notes", []) for line in (note, "")],
    ]
    tp = r.get("throughput")
    if tp:
        lines += [
            "### The same router against across the router link",
            "",
            f"iperf3 TCP for {tp['seconds']} s: hostA -> hostC with gwA and gwC at r1 (one "
            "router), and hostA -> hostB with gwB at r2 (r1, the router link, r2).",
            "",
            "| streams | same router (Mbit/s) | across routers (Mbit/s) | across / same |",
            "|---:|---:|---:|---:|",
        ]
        for row in tp["rows"]:
            lines.append(f"| {row['streams']} | {_n(row['same']['mbit_s'])} | "
                         f"{_n(row['cross']['mbit_s'])} | {_n(row['ratio'], '{:.2f}')} |")
        lines.append("")
    ag = r.get("aggregate")
    if ag:
        lines += [
            "### Four offices: one router against two",
            "",
            f"Two iperf3 TCP flows at once for {ag['seconds']} s, hostA -> hostB and "
            "hostC -> hostD: all four gateways at r1, then gwA and gwB at r1 and gwC and gwD "
            "at r2 (each pair within one router). CPU: each router process's share of one "
            "core over the run.",
            "",
            "| routers | A -> B (Mbit/s) | C -> D (Mbit/s) | aggregate (Mbit/s) | r1 CPU | "
            "r2 CPU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for label, key in (("one (r1)", "one"), ("two (r1, r2)", "two")):
            x = ag[key]
            lines.append(f"| {label} | {_n(x['AB']['mbit_s'])} | {_n(x['CD']['mbit_s'])} | "
                         f"{_n(x['total'])} | {x['cpu_pct']['r1']} % | {x['cpu_pct']['r2']} % |")
        lines += ["", f"Two routers against one: {_n(ag['ratio'], '{:.2f}')}x.", ""]
    fo, hung = r.get("failover"), r.get("failover_hung")
    if fo or hung:
        info = fo or hung
        lines += [
            "### Failover of a dual-homed office",
            "",
            "gwC with a link to each router (heartbeats every "
            f"{info['link_heartbeat_interval'] * 1000:.0f} ms, a link down after "
            f"{info['link_timeout'] * 1000:.0f} ms of silence; the link to r2 its backup, so "
            "that its traffic takes r1), pings hostC -> hostB (gwB at r2) every "
            f"{info['ping_interval'] * 1000:.0f} ms; r1 SIGKILLed by its PID, or frozen with "
            f"SIGSTOP (a hung host: nothing resets the connections), {info['lead']:g} s in. "
            "The time from then until the first answer to a ping sent after it (a gap "
            "shorter than the ping interval: nothing lost); r1 started again, and gwC's link "
            "to it back up, between runs. A killed router's kernel closes its connections, so "
            "the gateway moves at once; a hung one is left after the link timeout.",
            "",
            "| r1 | runs (s) | median (s) | worst (s) |",
            "|---|---|---:|---:|",
        ]
        for label, x in (("SIGKILL", fo), ("SIGSTOP (hung)", hung)):
            if x:
                runs = ", ".join(_n(v, "{:.2f}") for v in x["runs"])
                lines.append(f"| {label} | {runs} | {_n(x['median'], '{:.2f}')} | "
                             f"{_n(x['worst'], '{:.2f}')} |")
        lines.append("")
    sc = r.get("scale")
    if sc:
        lines += [
            f"### {sc['gateways']} gateways",
            "",
            f"`tests/test_cluster_scale.py` (in the test suite too): {sc['gateways']} "
            "protocol-level gateways on tls://, half at each router process, each registering "
            "its address and a /28; one packet from each to a gateway at the other router and "
            "one to a gateway at its own.",
            "",
            "| connect all (s) | every route at both routers (s) | etcd keys | packets "
            "delivered | r1 RSS idle / peak (MB) | r2 RSS idle / peak (MB) |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {sc['connect_s']} | {sc['converge_s']} | {sc['etcd_keys']} | "
            f"{sc['received']} of {2 * sc['gateways']} | {sc['rss_idle_mb']['r1']} / "
            f"{sc['hwm_mb']['r1']} | {sc['rss_idle_mb']['r2']} / {sc['hwm_mb']['r2']} |",
            "",
            f"Target: under {sc['rss_limit_mb']} MB per router.",
            "",
        ]
    if r.get("errors"):
        lines += [f"Not measured: {e}" for e in r["errors"]] + [""]
    lines.append(END)
    return "\n".join(lines)


def write_docs(report: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "cluster_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    md = DOCS / "benchmarks.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    md.write_text(soak.with_section(text, BEGIN, END, section(report)))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: teardown, temp dir removal


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=SECONDS, help="each iperf3 run")
    ap.add_argument("--runs", type=int, default=FAILOVER_RUNS, help="failover runs")
    ap.add_argument("--no-scale", action="store_true", help="skip the 2000 gateways")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--command", default="make cluster-bench", help="named in the docs")
    ap.add_argument("--note", action="append", default=[],
                    help="a paragraph for the docs section (repeatable)")
    args = ap.parse_args()
    ok, why = t.daemons_ready()
    if ok:
        ok, why = etcd_fixture.have_etcd()
    if ok and shutil.which("iperf3") is None:
        ok, why = False, "iperf3 not installed"
    if not ok:
        print(f"cluster bench cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="polevpn-cluster-bench-"))
    etcd_version = subprocess.run(["etcd", "--version"], capture_output=True, text=True,
                                  timeout=10).stdout.split("\n")[0].split()[-1]
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": args.command,
        "git": hostinfo.git_rev(),
        "machine": hostinfo.machine(),
        "etcd": etcd_version,
        "lease_ttl": LEASE_TTL,
        "mtu": t.gateway_config("A", work)["mtu"],
        "notes": args.note,
        "errors": [],
    }
    rc = 0
    try:
        from polevpn.keygen import generate

        keys = generate(work / "keys").out_dir
        phases = (("throughput", lambda cl: throughput(cl, args.seconds)),
                  ("aggregate", lambda cl: aggregate(cl, args.seconds)),
                  ("failover", lambda cl: failover(cl, args.runs)),
                  ("failover_hung", lambda cl: failover(cl, args.runs, freeze=True)))
        with Cluster(work, keys) as cl:
            for name, phase in phases:
                try:
                    report[name] = phase(cl)
                except (t.TopologyError, AssertionError, subprocess.SubprocessError,
                        OSError, KeyError, ValueError) as exc:
                    print(f"{name} FAILED: {exc}", file=sys.stderr, flush=True)
                    report["errors"].append(f"{name}: {str(exc)[:300]}")
                    rc = 1
        if not args.no_scale:
            try:
                report["scale"] = scale(work / "scale")
            except (AssertionError, RuntimeError, OSError, TimeoutError) as exc:
                print(f"scale FAILED: {exc}", file=sys.stderr, flush=True)
                report["errors"].append(f"scale: {str(exc)[:300]}")
                rc = 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + section(report))
    if not args.no_write:
        write_docs(report)
        print(f"wrote the cluster section of {DOCS / 'benchmarks.md'} and "
              f"{DOCS / 'cluster_bench.json'}")
    print(f"cluster bench wall time {time.monotonic() - started:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
