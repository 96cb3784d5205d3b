#!/usr/bin/env python3
"""KcpLink throughput, clean path, no sockets: a sender's ``write`` into an in-memory pipe
to a receiver's ``feed``/``settle``, ACKs back the same way.

The stream is written in 1,300-byte messages (a tunnel's IP packets) in batches of 64, as a
busy TUN reader does; every batch is pumped both ways once. The figure is stream bytes the
receiver delivered in order per second of this process's CPU time (the machine may be
busy), for both ends together (one process does the work of two). FEC off and FEC adaptive
(on, but no loss: data shards only).

Not a pytest test. ``python tests/bench_kcp_link.py [--seconds S] [--repeat N]`` (best and
median of N runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polevpn.config import FecParams, KcpParams
from polevpn.kcp.kcp_link import KcpLink
from polevpn.kcp.kcp_pool import KcpPool

MSG = 1300
BATCH = 64
RECORD_MTU = 1363


def run(fec_mode: str, seconds: float) -> float:
    params = KcpParams(fec=FecParams(mode=fec_mode))
    pool = KcpPool()
    t0 = 0.0
    a = KcpLink(params, pool, RECORD_MTU, t0)
    b = KcpLink(params, pool, RECORD_MTU, t0)
    msg = bytes(range(256)) * 5 + bytes(MSG - 1280)
    got = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    now = t0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        now = t0 + elapsed
        if a.pending_bytes < 1 << 20:
            for _ in range(BATCH):
                a.write(msg, now)
        for r in a.records_to_send():
            b.feed(r, now)
        got += len(b.settle(now))
        for r in b.records_to_send():
            a.feed(r, now)
        a.settle(now)
        a.poll(now)
        b.poll(now)
    cpu = time.process_time() - cpu0
    a.close()
    b.close()
    # per CPU second, not per wall second: the figure holds on a busy machine too
    return got / cpu / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    for mode in ("off", "adaptive"):
        runs = sorted(run(mode, args.seconds) for _ in range(args.repeat))
        print(
            f"fec={mode:8s} best {runs[-1]:7.1f}  median {runs[len(runs) // 2]:7.1f} "
            "MB of stream delivered per CPU second"
        )


if __name__ == "__main__":
    main()
