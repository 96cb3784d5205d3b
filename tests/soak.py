#!/usr/bin/env python3
"""`make soak`: does the router give back what a gateway's connection took?

For each transport (tls://, then kcp://) a fresh ``polevpn-router`` process on 127.0.0.1 and
one persistent echo gateway (registered 198.18.99.0/24; it sends every packet it gets back
to its sender), then CYCLES connect/disconnect cycles, CONCURRENCY at a time, each from its
own loopback source address (so per-source caps never matter):

    connect, AUTH, REGISTER 169.254.(10+w).x with 198.18.(100+w).x/32, two packets (one
    IPv4, one IPv6 to 2001:db8:99::/64) to the echo gateway, both echoes back, close

Router VmRSS is sampled after WARMUP cycles (the start), every SAMPLE_EVERY cycles, and at
the end, once the router reports every cycle's connection closed. Pass: growth from start
to end below GROWTH_LIMIT_MB per transport, and the router's open descriptors after the
cycles equal those after the warm-up. A KCP object left to the ``kcp`` package's dealloc
leaks about 4 KB (polevpn/kcp/kcp_pool.py), which 1000 kcp:// cycles would show as ~4 MB.

Prints a summary and writes docs/soak.json and the soak section of docs/benchmarks.md
(between SOAK_BEGIN and SOAK_END; `make bench` keeps that section when it rewrites the
file). Exit status 1 if a criterion is missed. ``--cycles N`` and ``--no-write`` for
trying it out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from polevpn.keygen import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostinfo  # noqa: E402
from protoclient import (  # noqa: E402
    ProtoClient,
    RouterProcess,
    marker,
    router_config,
    udp_packet,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SOAK_BEGIN = "<!-- soak:begin -->"
SOAK_END = "<!-- soak:end -->"

CYCLES = 1000
WARMUP = 50
SAMPLE_EVERY = 100
CONCURRENCY = 4
GROWTH_LIMIT_MB = 5.0
ECHO_GW = "169.254.9.1"
ECHO_NET4, ECHO_HOST4 = "198.18.99.0/24", "198.18.99.1"
ECHO_NET6, ECHO_HOST6 = "2001:db8:99::/64", "2001:db8:99::1"


class EchoGateway(ProtoClient):
    """Sends every packet back with source and destination swapped (UDP payload unchanged)."""

    def _packet(self, pkt: memoryview) -> None:
        super()._packet(pkt)
        p = bytes(pkt)
        if p[0] >> 4 == 4:
            src, dst = p[12:16], p[16:20]
            back = p[:12] + dst + src + p[20:]  # the checksums are sums: unchanged by a swap
        else:
            src, dst = p[8:24], p[24:40]
            back = p[:8] + dst + src + p[40:]
        self.send_packets([back])


@dataclass
class TransportResult:
    transport: str
    cycles: int
    warmup: int
    concurrency: int
    seconds: float = 0.0
    cycle_ms_median: float = 0.0
    cycle_ms_p99: float = 0.0
    # (cycles done, VmRSS kB); the first sample is the start, taken after the warm-up
    rss_samples: list[tuple[int, int]] = field(default_factory=list)
    rss_start_kb: int = 0
    rss_end_kb: int = 0
    growth_kb: int = 0
    vm_hwm_kb: int = 0
    fds_before: int = 0
    fds_after: int = 0
    router_cpu_s: float = 0.0
    router_stats: dict[str, str] = field(default_factory=dict)
    passed: bool = False


async def cycle(router: RouterProcess, transport: str, key: str, w: int, k: int) -> float:
    # not loop.time(): uvloop's clock counts whole milliseconds
    t0 = time.monotonic()
    x = 1 + k % 250
    source = f"127.0.{10 + w}.{x}"
    port = router.ports[transport]
    if transport == "kcp":
        c = await ProtoClient.connect_kcp("127.0.0.1", port, source=source, keep_packets=True)
    else:
        c = await ProtoClient.connect_tls("127.0.0.1", port, source=source, keep_packets=True)
    try:
        host4, host6 = f"198.18.{100 + w}.{x}", f"2001:db8:{100 + w:x}::{x:x}"
        await c.login(key, f"169.254.{10 + w}.{x}", [f"{host4}/32", f"{host6}/128"])
        c.send_packets([udp_packet(host4, ECHO_HOST4, w, k), udp_packet(host6, ECHO_HOST6, w, k)])
        assert c.inbox is not None
        for _ in range(2):
            back = await asyncio.wait_for(c.inbox.get(), 10)
            assert marker(back) == (w, k), f"echo {marker(back)} is not ({w}, {k})"
    finally:
        c.close()
    if not await c.wait_closed(10):
        raise TimeoutError(f"cycle {w}/{k}: connection did not close")
    return time.monotonic() - t0


async def soak_transport(router: RouterProcess, transport: str, key: str, cycles: int):
    result = TransportResult(transport, cycles, WARMUP, CONCURRENCY)
    port = router.ports[transport]
    if transport == "kcp":
        echo = await EchoGateway.connect_kcp("127.0.0.1", port, source="127.0.9.1")
    else:
        echo = await EchoGateway.connect_tls("127.0.0.1", port, source="127.0.9.1")
    await echo.login(key, ECHO_GW, [ECHO_NET4, ECHO_NET6])
    echo.start_heartbeats(5)

    durations: list[float] = []
    next_k = [0] * CONCURRENCY
    done = 0

    async def run(n: int) -> None:
        """n more cycles, CONCURRENCY at a time."""
        nonlocal done
        target = done + n

        async def worker(w: int) -> None:
            nonlocal done
            while done < target:
                done += 1
                durations.append(await cycle(router, transport, key, w, next_k[w]))
                next_k[w] += 1

        await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))

    async def settled() -> None:
        # every cycle's connection is gone on the router's side too (the echo remains)
        await asyncio.to_thread(router.wait_stats, lambda s: s.get("connections") == "1", 30)

    await run(WARMUP)
    await settled()
    result.fds_before = router.fd_count()
    result.rss_samples.append((done, router.rss_kb()))
    cpu0 = router.cpu_seconds()
    busy = 0.0  # the cycles' own time, without the waits for stats lines
    while done < WARMUP + cycles:
        t0 = time.monotonic()
        await run(min(SAMPLE_EVERY, WARMUP + cycles - done))
        busy += time.monotonic() - t0
        result.rss_samples.append((done, router.rss_kb()))
        print(
            f"  {transport}: {done - WARMUP}/{cycles} cycles, VmRSS "
            f"{result.rss_samples[-1][1] / 1024:.1f} MB",
            flush=True,
        )
    await settled()
    result.seconds = round(busy, 1)
    result.router_cpu_s = round(router.cpu_seconds() - cpu0, 1)
    result.rss_samples.append((done, router.rss_kb()))
    deadline = time.monotonic() + 10
    result.fds_after = router.fd_count()
    while result.fds_after != result.fds_before and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        result.fds_after = router.fd_count()
    echo.close()
    await echo.wait_closed()
    assert echo.recv.packets == 2 * done, f"echo got {echo.recv.packets} of {2 * done}"

    ms = sorted(d * 1000 for d in durations[WARMUP:])
    result.cycle_ms_median = round(statistics.median(ms), 1)
    result.cycle_ms_p99 = round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 1)
    result.rss_start_kb = result.rss_samples[0][1]
    result.rss_end_kb = result.rss_samples[-1][1]
    result.growth_kb = result.rss_end_kb - result.rss_start_kb
    result.vm_hwm_kb = router.status()["VmHWM"]
    result.router_stats = router.stats()
    result.passed = (
        result.growth_kb < GROWTH_LIMIT_MB * 1024 and result.fds_after == result.fds_before
    )
    return result


def run_transport(transport: str, cycles: int, workdir: Path) -> TransportResult:
    keys = generate(workdir / "keys")
    key = keys.shared_key.read_text().strip()
    cfg = router_config(keys, limits={"max_pending": 1024, "max_pending_per_source": 1024})
    cfg["tls" if transport == "kcp" else "kcp"]["enable"] = False
    router = RouterProcess.start(cfg, workdir)
    try:
        return uvloop.run(asyncio.wait_for(soak_transport(router, transport, key, cycles), 1800))
    except BaseException:
        print(f"router log tail:\n{router.log_path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        router.stop()


# ---- output ---------------------------------------------------------------------------------


def mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def section(report: dict) -> str:
    m = report["machine"]
    results = [TransportResult(**r) for r in report["transports"]]
    lines = [
        SOAK_BEGIN,
        "## Soak: gateways connecting and leaving (`make soak`)",
        "",
        "Written by `make soak` (`tests/soak.py`), raw data in `soak.json`; `make bench` leaves",
        "this section alone.",
        "",
        f"{report['date']}, {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, "
        f"Python {m['python']}, polevpn {report['git']}.",
        "",
        f"Per transport, one `polevpn-router` process on 127.0.0.1 and one persistent echo "
        f"gateway, then {report['warmup']} warm-up and {report['cycles']} measured cycles, "
        f"{report['concurrency']} at a time, each from its own loopback source address: "
        "connect, AUTH, REGISTER a /32 and a /128, one IPv4 and one IPv6 packet to the echo "
        "gateway and both echoes back, disconnect. Router VmRSS after the warm-up (start), "
        f"every {report['sample_every']} cycles, and once the router has closed every cycle's "
        f"connection (end). Pass: growth below {report['growth_limit_mb']:g} MB and the "
        "router's open descriptors after the cycles equal to those after the warm-up.",
        "",
        "| transport | cycles | cycles took s | cycle median / p99 ms | router CPU s "
        "| RSS start MB | RSS end MB | growth MB | KB/cycle | VmHWM MB | fds before / after "
        "| result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.transport}:// | {r.cycles} | {r.seconds} | {r.cycle_ms_median} / "
            f"{r.cycle_ms_p99} | {r.router_cpu_s} | {mb(r.rss_start_kb)} | {mb(r.rss_end_kb)} "
            f"| {r.growth_kb / 1024:+.2f} | {r.growth_kb / r.cycles:+.2f} | {mb(r.vm_hwm_kb)} "
            f"| {r.fds_before} / {r.fds_after} | {'pass' if r.passed else 'FAIL'} |"
        )
    lines.append("")
    for r in results:
        samples = [f"{n - r.warmup}: {mb(kb)}" for n, kb in r.rss_samples[:-1]]
        samples.append(f"end: {mb(r.rss_samples[-1][1])}")
        lines.append(f"VmRSS MB after n cycles, {r.transport}://: {', '.join(samples)}.")
        lines.append("")
    if report.get("notes"):
        lines += [*report["notes"], ""]
    lines.append(SOAK_END)
    return "\n".join(lines)


def marked_section(path: Path | None, begin: str, end: str) -> str | None:
    """The section between the markers ``begin`` and ``end`` (both included) in the file at
    ``path``, or None when there is none."""
    old = path.read_text() if path is not None and path.exists() else ""
    a, b = old.find(begin), old.find(end)
    if a < 0 or b < a:
        return None
    return old[a : b + len(end)]


def replace_marked(text: str, begin: str, end: str, section_text: str) -> str | None:
    """``text`` with its section between ``begin`` and ``end`` replaced by
    ``section_text``, or None when ``text`` has no such section."""
    a, b = text.find(begin), text.find(end)
    if 0 <= a < b:
        return text[:a] + section_text + text[b + len(end) :]
    return None


def with_section(
    text: str, begin: str, end: str, section_text: str | None = None, path: Path | None = None
) -> str:
    """``text`` (a benchmarks.md without the section marked ``begin``/``end``, or with an
    old one) with that section: ``section_text``, or the one in the file at ``path`` (what
    `make bench` keeps). The section replaces the old one in place, or goes at the end."""
    if section_text is None:
        section_text = marked_section(path, begin, end)
        if section_text is None:
            return text
    replaced = replace_marked(text, begin, end, section_text)
    if replaced is not None:
        return replaced
    return text.rstrip("\n") + "\n\n" + section_text + "\n"


def with_soak_section(text: str, section_text: str | None = None, path: Path | None = None) -> str:
    """``text`` with the soak section (see with_section)."""
    return with_section(text, SOAK_BEGIN, SOAK_END, section_text, path)


def write_docs(report: dict) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    md = DOCS / "benchmarks.md"
    old = md.read_text() if md.exists() else "# Benchmarks\n"
    md.write_text(with_soak_section(old, section(report)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=CYCLES)
    ap.add_argument("--only", choices=("tls", "kcp"))
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--note", action="append", default=[], help="a paragraph for the docs section (repeatable)"
    )
    args = ap.parse_args()
    report: dict = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": hostinfo.git_rev(),
        "machine": hostinfo.machine(),
        "cycles": args.cycles,
        "warmup": WARMUP,
        "sample_every": SAMPLE_EVERY,
        "concurrency": CONCURRENCY,
        "growth_limit_mb": GROWTH_LIMIT_MB,
        "transports": [],
        "notes": args.note,
    }
    for transport in ("tls", "kcp"):
        if args.only and transport != args.only:
            continue
        print(f"{transport}://: {WARMUP} warm-up + {args.cycles} cycles", flush=True)
        with tempfile.TemporaryDirectory(prefix="polevpn-soak-") as tmp:
            r = run_transport(transport, args.cycles, Path(tmp))
        report["transports"].append(asdict(r))
        print(
            f"{transport}://: {r.cycles} cycles in {r.seconds} s (median {r.cycle_ms_median} "
            f"ms, p99 {r.cycle_ms_p99} ms); router VmRSS {mb(r.rss_start_kb)} -> "
            f"{mb(r.rss_end_kb)} MB ({r.growth_kb / 1024:+.2f} MB, {r.growth_kb / r.cycles:+.2f} "
            f"KB/cycle), VmHWM {mb(r.vm_hwm_kb)} MB; fds {r.fds_before} -> {r.fds_after}; "
            f"{'pass' if r.passed else 'FAIL'}",
            flush=True,
        )
    if not args.no_write:
        write_docs(report)
        print(f"wrote {DOCS / 'soak.json'} and the soak section of {DOCS / 'benchmarks.md'}")
    return 0 if all(r["passed"] for r in report["transports"]) else 1


if __name__ == "__main__":
    sys.exit(main())
