#!/usr/bin/env python3
"""kcp:// on long, lossy, rate-limited lines, in the link simulator (tests/linksim.py).

No sockets, no root: two ``KcpLink`` objects per flow driven through simulated lines (a
rate, half the RTT of delay each way, a 50 ms drop-tail queue, loss on the wire after the
bottleneck, the same on both directions; 65 bytes of IP/UDP/DTLS overhead per packet). A
bulk source keeps the sender's write buffer between 256 KiB and 1 MiB, as the transport's
water marks do. Figures are virtual-time results and do not depend on the machine; only the
"cpu s" column does (indicative: the machine is shared).

Sections:
  matrix     rate 1, 10, 30, 100 Mbit/s x RTT 20, 80, 260 ms x loss 0, 1, 3, 5, 10 %,
             FEC off and adaptive, 15 s each (``--quick``: loss 0, 1, 5 % only)
  issue      the three rows of issue 16 (30 Mbit/s; 50 ms 1 %, 130 ms 3 %, 260 ms 5 %) and a
             Gilbert-Elliott bursty-loss row, FEC off and adaptive
  sharing    two kcp flows on one 30 Mbit/s line for 30 s: each one's share
  ping       ping every 20 ms while the line is full: through the tunnel (behind the write
             buffer) and beside it on the line (the bottleneck queue only), against the
             base RTT

Columns: goodput = stream payload bytes delivered in order (the tunnel's frames, 1300-byte
messages) per second over the whole run; util = goodput / line rate (a perfect sender gets
93.6 %: KCP's 24 bytes and 65 of overhead per 1300); queue p50 / p99 = the bottleneck's
queue delay (a -> b); qdrop = packets the a -> b queue dropped, of those offered; retx =
data segments sent again / data segments (first sends); closed = when a KcpConnection would
have given up (silence_timeout: nothing heard for 2 s with data unacknowledged), if it would.

``python tests/bench_linksim.py [--quick] [--seconds S] [--jobs N] [--only SECTION...]
[--json PATH|-]``. Not a pytest test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from linksim import FlowSpec, Scenario, run_scenario  # noqa: E402

RATES = (1e6, 10e6, 30e6, 100e6)
RTTS = (20.0, 80.0, 260.0)
LOSSES = (0.0, 1.0, 3.0, 5.0, 10.0)
QUICK_LOSSES = (0.0, 1.0, 5.0)
FECS = ("off", "adaptive")
ISSUE_ROWS = ((50.0, 1.0), (130.0, 3.0), (260.0, 5.0))
# Gilbert-Elliott: bad state 1% of packets entered, 4 packets long on average, loses all:
# 3.8 % loss in bursts
GE = {"ge_gb_pct": 1.0, "ge_bg_pct": 25.0, "ge_loss_good_pct": 0.0, "ge_loss_bad_pct": 100.0}
SECTIONS = ("matrix", "issue", "sharing", "ping")


def _run(job: tuple[str, dict[str, Any], Scenario]) -> tuple[str, dict[str, Any], dict]:
    section, label, sc = job
    r = run_scenario(sc)
    s = r.summary()
    s["label"] = label
    s["section"] = section
    return section, label, s


def jobs_for(
    sections: list[str], seconds: float, matrix_seconds: float, quick: bool
) -> list[tuple[str, dict, Scenario]]:
    jobs: list[tuple[str, dict, Scenario]] = []
    if "matrix" in sections:
        losses = QUICK_LOSSES if quick else LOSSES
        for rate in RATES:
            for rtt in RTTS:
                for loss in losses:
                    for fec in FECS:
                        sc = Scenario(rate_bps=rate, rtt_ms=rtt, loss_pct=loss, fec=fec,
                                      seconds=matrix_seconds)
                        jobs.append(("matrix", {}, sc))
    if "issue" in sections:
        for rtt, loss in ISSUE_ROWS:
            for fec in FECS:
                sc = Scenario(rate_bps=30e6, rtt_ms=rtt, loss_pct=loss, fec=fec, seconds=seconds)
                jobs.append(("issue", {"loss": f"{loss:g}%"}, sc))
        for fec in FECS:
            sc = Scenario(rate_bps=30e6, rtt_ms=130.0, fec=fec, seconds=seconds, **GE)
            jobs.append(("issue", {"loss": "GE 3.8% (bursts of 4)"}, sc))
    if "sharing" in sections:
        for rtt, loss in ((40.0, 0.0), (40.0, 2.0), (130.0, 3.0)):
            for fec in FECS:
                sc = Scenario(rate_bps=30e6, rtt_ms=rtt, loss_pct=loss, fec=fec,
                              seconds=max(seconds, 30.0), flows=2)
                jobs.append(("sharing", {}, sc))
            # the second flow arrives 5 s after the first
            sc = Scenario(rate_bps=30e6, rtt_ms=rtt, loss_pct=loss, fec="adaptive",
                          seconds=max(seconds, 30.0),
                          flow_specs=(FlowSpec(), FlowSpec(start_s=5.0)))
            jobs.append(("sharing", {"second_starts_s": 5.0}, sc))
    if "ping" in sections:
        for rtt, loss in ((40.0, 0.0), *ISSUE_ROWS):
            for fec in FECS:
                sc = Scenario(rate_bps=30e6, rtt_ms=rtt, loss_pct=loss, fec=fec, seconds=seconds,
                              ping_ms=20.0, line_ping_ms=20.0)
                jobs.append(("ping", {}, sc))
    return jobs


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _qdrop(s: dict) -> float:
    up = s["up"]
    return 100.0 * up["queue_drops"] / up["offered"] if up["offered"] else 0.0


def _closed(s: dict) -> str:
    times = [f["silence_at"] for f in s["flows"] if f["silence_at"] is not None]
    dead = [f["dead_at"] for f in s["flows"] if f["dead_at"] is not None]
    if dead:
        return f"dead {min(dead):.1f}s"
    return f"{min(times):.1f}s" if times else ""


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in rows]
    return "\n".join([line, sep, *body])


def perf_row(s: dict) -> list[str]:
    return [
        _f(s["goodput_mbit"], "{:.2f}"),
        _f(100 * s["utilisation"]),
        _f(s["up"]["queue_delay_p50_ms"]),
        _f(s["up"]["queue_delay_p99_ms"]),
        _f(_qdrop(s)),
        _f(s["retransmission_ratio"], "{:.2f}"),
        _closed(s),
        _f(s["cpu_s"], "{:.2f}"),
    ]


PERF_HEADERS = ["goodput Mbit/s", "util %", "queue p50 ms", "queue p99 ms", "qdrop %", "retx",
                "closed", "cpu s"]


def report(results: list[dict], seconds: float, matrix_seconds: float) -> str:
    out: list[str] = []
    by = {sec: [s for s in results if s["section"] == sec] for sec in SECTIONS}
    if by["matrix"]:
        out.append(f"## matrix ({matrix_seconds:g} s each)\n")
        rows = [[_f(s["rate_mbit"], "{:g}"), _f(s["rtt_ms"], "{:g}"), _f(s["loss_pct"], "{:g}"),
                 s["fec"], *perf_row(s)] for s in by["matrix"]]
        out.append(table(["Mbit/s", "RTT ms", "loss %", "FEC", *PERF_HEADERS], rows))
    if by["issue"]:
        out.append(f"\n## issue 16 rows, 30 Mbit/s ({seconds:g} s each)\n")
        rows = [[_f(s["rtt_ms"] / 2, "{:g}"), s["label"]["loss"], s["fec"], *perf_row(s)]
                for s in by["issue"]]
        out.append(table(["one-way ms", "loss", "FEC", *PERF_HEADERS], rows))
    if by["sharing"]:
        out.append("\n## two kcp flows on one 30 Mbit/s line\n")
        rows = []
        for s in by["sharing"]:
            f0, f1 = s["flows"]
            start = s["label"].get("second_starts_s")
            rows.append([
                _f(s["rtt_ms"], "{:g}"), _f(s["loss_pct"], "{:g}"), s["fec"],
                "0 / 0" if start is None else f"0 / {start:g}",
                _f(s["seconds"], "{:g}"),
                _f(f0["goodput_bps"] / 1e6, "{:.2f}"), _f(f1["goodput_bps"] / 1e6, "{:.2f}"),
                _f(100 * f0["share"]), _f(100 * f1["share"]),
                _f(100 * s["utilisation"]), _f(s["up"]["queue_delay_p99_ms"]),
                _f(s["retransmission_ratio"], "{:.2f}"), _closed(s),
            ])
        out.append(table(["RTT ms", "loss %", "FEC", "starts s", "s", "flow 1 Mbit/s",
                          "flow 2 Mbit/s", "share 1 %", "share 2 %", "util %",
                          "queue p99 ms", "retx", "closed"], rows))
    if by["ping"]:
        out.append(f"\n## ping every 20 ms under load, 30 Mbit/s ({seconds:g} s each)\n")
        rows = [[
            _f(s["rtt_ms"], "{:g}"), _f(s["loss_pct"], "{:g}"), s["fec"],
            _f(s["ping_rtt_p50_ms"]), _f(s["ping_rtt_p99_ms"]),
            _f(s["line_ping_rtt_p50_ms"]), _f(s["line_ping_rtt_p99_ms"]),
            _f(100 * s["utilisation"]),
        ] for s in by["ping"]]
        out.append(table(["base RTT ms", "loss %", "FEC", "tunnel p50 ms", "tunnel p99 ms",
                          "line p50 ms", "line p99 ms", "util %"], rows))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="virtual seconds per run (sharing: at least 30)")
    ap.add_argument("--matrix-seconds", type=float, default=15.0,
                    help="virtual seconds per matrix run (keeps the whole under 2 minutes)")
    ap.add_argument("--quick", action="store_true", help="loss 0, 1, 5 %% only in the matrix")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--json", metavar="PATH", help="write every run's figures as JSON ('-': "
                    "stdout, instead of the tables)")
    args = ap.parse_args(argv)
    jobs = jobs_for(args.only, args.seconds, args.matrix_seconds, args.quick)
    t0 = time.monotonic()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=min(args.jobs, os.cpu_count() or 1)) as ex:
            done = list(ex.map(_run, jobs))
    else:
        done = [_run(j) for j in jobs]
    results = [s for _, _, s in done]
    wall = time.monotonic() - t0
    if args.json:
        doc = {"seconds": args.seconds, "matrix_seconds": args.matrix_seconds,
               "wall_s": round(wall, 1), "runs": results}
        text = json.dumps(doc, indent=1)
        if args.json == "-":
            print(text)
            return 0
        Path(args.json).write_text(text + "\n")
    print(report(results, args.seconds, args.matrix_seconds))
    cpu = sum(s["cpu_s"] for s in results)
    print(f"\n{len(results)} runs, {cpu:.0f} s CPU, {wall:.0f} s wall (indicative: shared machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
