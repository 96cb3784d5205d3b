#!/usr/bin/env python3
"""Userspace network impairment element (a small netem in Python) for the netns tests.

How it works
============

The element owns one or more *TUN devices*, one per traffic direction, e.g. ``up`` (gwA ->
router) and ``down`` (router -> gwA).  Policy routing in the middlebox namespace sends every
packet that arrives on a veth into the direction's TUN (``ip rule iif a0 lookup 101`` with
``default dev impu`` in table 101); the element reads the packet, decides its fate and writes
it back into *the same* TUN.  A packet written into a TUN is received by the kernel as if it
had arrived on that device, so it is routed again - now with ``iif impu``, which no rule
matches, so the main table forwards it out of the other veth.  Because each direction has
its own TUN, the element never has to parse addresses to know where a packet is going, and
it works the same for TCP, UDP, ICMP, IPv4 and IPv6.

Per packet and direction, in this order:

1. Gilbert-Elliott bursty loss: a two-state Markov chain (good/bad) steps once per packet
   (``ge_gb_pct`` good->bad, ``ge_bg_pct`` bad->good), then the packet is lost with the new
   state's loss probability (``ge_loss_good_pct`` / ``ge_loss_bad_pct``).
2. Bernoulli loss (``loss_pct``).
3. Duplication (``dup_pct``): the copy is scheduled independently (own jitter).
4. Scheduling: release time = arrival + ``delay_ms`` + jitter (``jitter_ms``, ``uniform`` in
   [-j, +j] or ``normal`` with sigma j; never below zero).  Unless ``jitter_reorder`` is
   set, the release time is raised to the previous packet's, so jitter keeps FIFO order
   (like a real queue).  With probability ``reorder_pct`` a packet is additionally held back
   by ``reorder_ms`` without moving the FIFO mark, so later packets overtake it.

All percentages are 0..100, all times milliseconds.  Released packets wait in a per-direction
heap keyed by (release time, sequence number).  A direction with no impairment at all takes
a fast path: read, write, no heap.

Speed: one thread, one epoll selector.  TUN fds are non-blocking and read until EAGAIN (in
batches, so timers are served between batches); the selector timeout is the earliest release
time.  Randomness comes from one ``random.Random`` per direction seeded from ``--seed`` and the
direction name, so a run is reproducible per direction regardless of interleaving.

Control
=======

``--control PATH`` opens a UNIX stream socket (a pathname socket, so reachable from outside
the network namespace).  Protocol: one JSON object per line in, one JSON line out::

    {"cmd": "set", "dir": "up"|"down"|"both", "params": {...}, "merge": false}
    {"cmd": "get"}                      -> {"ok": true, "params": {"up": {...}, ...}}
    {"cmd": "stats", "reset": false}    -> {"ok": true, "stats": {...}}
    {"cmd": "ping"}                     -> {"ok": true}

``set`` replaces a direction's parameters (unnamed ones fall back to the defaults) unless
``merge`` is true.  SIGUSR1 prints the counters as a JSON line on stdout; SIGTERM/SIGINT print
them and exit 0.  On start the element prints ``{"event": "ready", ...}`` once every TUN is
attached and the control socket listens.

Usage::

    impair.py --tun up=impu --tun down=impd --control /tmp/x/impair.sock --seed 1 \\
              --params '{"delay_ms": 20}' --up '{"loss_pct": 1}'

A TUN that does not exist is created (and vanishes when the element exits); an existing
persistent one (``ip tuntap add dev impu mode tun``) is attached to.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import heapq
import itertools
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
# A TUN without offloads hands out one IP packet per read, at most the MTU; 64 KiB is safe.
READ_SIZE = 65536
# Packets read per fd before timers and other fds get a turn.
BATCH = 256
DEFAULT_LIMIT = 100_000

_PCT_FIELDS = (
    "reorder_pct", "dup_pct", "loss_pct",
    "ge_gb_pct", "ge_bg_pct", "ge_loss_good_pct", "ge_loss_bad_pct",
)
_MS_FIELDS = ("delay_ms", "jitter_ms", "reorder_ms")


@dataclasses.dataclass
class Params:
    """Impairment of one direction.  Percentages 0..100, times in milliseconds."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    jitter_dist: str = "uniform"  # "uniform" | "normal"
    jitter_reorder: bool = False  # False: jitter never reorders (FIFO)
    reorder_pct: float = 0.0
    reorder_ms: float = 10.0
    dup_pct: float = 0.0
    loss_pct: float = 0.0
    ge_gb_pct: float = 0.0  # Gilbert-Elliott: good -> bad per packet (0 = model off)
    ge_bg_pct: float = 0.0  # bad -> good per packet
    ge_loss_good_pct: float = 0.0
    ge_loss_bad_pct: float = 100.0

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Params | None = None) -> Params:
        """Validated Params from ``data``; fields not named come from ``base`` or defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:  # a typo must not silently mean "no impairment"
            raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
        merged = dataclasses.asdict(base) if base is not None else {}
        merged.update(data)
        p = cls(**merged)
        for name in _PCT_FIELDS:
            value = float(getattr(p, name))
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name}={value} is not a percentage 0..100")
            setattr(p, name, value)
        for name in _MS_FIELDS:
            value = float(getattr(p, name))
            if not 0.0 <= value <= 600_000.0:
                raise ValueError(f"{name}={value} ms out of range")
            setattr(p, name, value)
        if p.jitter_dist not in ("uniform", "normal"):
            raise ValueError(f"jitter_dist must be 'uniform' or 'normal', not {p.jitter_dist!r}")
        p.jitter_reorder = bool(p.jitter_reorder)
        if p.ge_gb_pct > 0 and p.ge_bg_pct <= 0:
            raise ValueError("ge_bg_pct must be > 0 when ge_gb_pct > 0 (bad state never ends)")
        return p

    @property
    def passthrough(self) -> bool:
        return not (
            self.delay_ms or self.jitter_ms or self.reorder_pct or self.dup_pct
            or self.loss_pct or self.ge_gb_pct
        )

    @property
    def timed(self) -> bool:
        """True when packets may be held (otherwise they are written at once)."""
        return bool(self.delay_ms or self.jitter_ms or self.reorder_pct)


class Direction:
    """One traffic direction: its TUN fd, parameters, RNG, release heap and counters.

    ``admit`` holds the per-packet decisions and is independent of the TUN, so it can be
    unit-tested with a fake ``write``.
    """

    COUNTERS = (
        "received", "passed", "bytes_received", "bytes_passed",
        "dropped", "dropped_random", "dropped_burst", "dropped_overflow",
        "duplicated", "reordered", "delayed", "write_errors",
    )

    def __init__(
        self,
        name: str,
        write: Callable[[bytes], object],
        seed: int = 1,
        params: Params | None = None,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.name = name
        self._write = write
        # str seeds hash deterministically (sha512), so each direction has its own sequence.
        self.rng = random.Random(f"{seed}/{name}")
        self.limit = limit
        self.heap: list[tuple[float, int, bytes]] = []
        self._seq = itertools.count()
        self._fifo_mark = 0.0  # latest release time handed to an in-order packet
        self.bad = False  # Gilbert-Elliott state
        self.max_queued = 0
        self.reset_stats()
        self.configure(params or Params())

    def reset_stats(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, 0)
        self.max_queued = len(self.heap)

    def configure(self, params: Params) -> None:
        self.params = params
        self.passthrough = params.passthrough
        self.timed = params.timed
        self._delay = params.delay_ms / 1e3
        self._jitter = params.jitter_ms / 1e3
        self._normal = params.jitter_dist == "normal"
        self._fifo = not params.jitter_reorder
        self._reorder = params.reorder_pct / 100.0
        self._hold = params.reorder_ms / 1e3
        self._dup = params.dup_pct / 100.0
        self._loss = params.loss_pct / 100.0
        self._ge = params.ge_gb_pct > 0
        self._gb = params.ge_gb_pct / 100.0
        self._bg = params.ge_bg_pct / 100.0
        self._loss_good = params.ge_loss_good_pct / 100.0
        self._loss_bad = params.ge_loss_bad_pct / 100.0
        if not self._ge:
            self.bad = False

    # ------------------------------------------------------------------ packets
    def emit(self, pkt: bytes) -> None:
        try:
            self._write(pkt)
        except OSError as exc:
            # EINVAL etc.: the kernel refused this packet; a dead fd is fatal.
            if exc.errno in (errno.EBADF, errno.EBADFD):
                raise
            self.write_errors += 1
            return
        self.passed += 1
        self.bytes_passed += len(pkt)

    def admit(self, pkt: bytes, now: float) -> None:
        """Apply loss/duplication and either write ``pkt`` now or queue it."""
        self.received += 1
        self.bytes_received += len(pkt)
        rnd = self.rng.random
        if self._ge:
            if self.bad:
                if rnd() < self._bg:
                    self.bad = False
            elif rnd() < self._gb:
                self.bad = True
            if rnd() < (self._loss_bad if self.bad else self._loss_good):
                self.dropped_burst += 1
                self.dropped += 1
                return
        if self._loss and rnd() < self._loss:
            self.dropped_random += 1
            self.dropped += 1
            return
        copies = 1
        if self._dup and rnd() < self._dup:
            copies = 2
            self.duplicated += 1
        for _ in range(copies):
            if not self.timed and not self.heap:
                self.emit(pkt)
            else:
                self._schedule(pkt, now)

    def _schedule(self, pkt: bytes, now: float) -> None:
        t = now + self._delay
        if self._jitter:
            j = self.rng.gauss(0.0, self._jitter) if self._normal else self.rng.uniform(
                -self._jitter, self._jitter
            )
            t = max(now, t + j)
        if self._reorder and self.rng.random() < self._reorder:
            # held back without moving the FIFO mark: later packets overtake this one
            t += self._hold
            self.reordered += 1
        else:
            if self._fifo and t < self._fifo_mark:
                t = self._fifo_mark
            self._fifo_mark = t
        if len(self.heap) >= self.limit:
            self.dropped_overflow += 1
            self.dropped += 1
            return
        if t > now:
            self.delayed += 1
        heapq.heappush(self.heap, (t, next(self._seq), pkt))
        if len(self.heap) > self.max_queued:
            self.max_queued = len(self.heap)

    def release(self, now: float) -> None:
        """Write every queued packet whose release time has come."""
        heap = self.heap
        pop = heapq.heappop
        while heap and heap[0][0] <= now:
            self.emit(pop(heap)[2])

    def next_release(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def stats(self) -> dict[str, int]:
        out = {name: getattr(self, name) for name in self.COUNTERS}
        out["queued"] = len(self.heap)
        out["max_queued"] = self.max_queued
        out["ge_bad"] = int(self.bad)
        return out


def open_tun(name: str) -> tuple[int, str]:
    """Open (or attach to) TUN ``name`` without packet info; returns (fd, name)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI)
        res = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    return fd, res[:16].rstrip(b"\0").decode()


class TunDirection(Direction):
    """A Direction bound to a TUN fd, with a batched non-blocking reader."""

    def __init__(self, name: str, fd: int, ifname: str, **kw: Any) -> None:
        self.fd = fd
        self.ifname = ifname
        super().__init__(name, lambda pkt: os.write(fd, pkt), **kw)

    def on_readable(self) -> None:
        fd = self.fd
        read = os.read
        if self.passthrough and not self.heap:
            # Fast path: nothing to decide, no heap; keep per-packet work minimal.
            write = os.write
            n = nbytes = errors = 0
            for _ in range(BATCH):
                try:
                    pkt = read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                try:
                    write(fd, pkt)
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EBADFD):
                        raise
                    errors += 1
                    continue
                n += 1
                nbytes += len(pkt)
            self.received += n + errors
            self.passed += n
            self.bytes_received += nbytes
            self.bytes_passed += nbytes
            self.write_errors += errors
            return
        now = time.monotonic()
        admit = self.admit
        for _ in range(BATCH):
            try:
                pkt = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            admit(pkt, now)


class Element:
    """The event loop: TUN directions, control socket and signals on one selector."""

    def __init__(
        self,
        tuns: dict[str, str],
        control: str | None = None,
        seed: int = 1,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.sel = selectors.DefaultSelector()
        self.dirs: dict[str, TunDirection] = {}
        self.control_path = control
        self.running = True
        self._conns: dict[socket.socket, bytearray] = {}
        self._pending_signals: list[int] = []
        for dname, ifname in tuns.items():
            fd, real = open_tun(ifname)
            d = TunDirection(dname, fd, real, seed=seed, limit=limit)
            self.dirs[dname] = d
            self.sel.register(fd, selectors.EVENT_READ, d.on_readable)
        # Self-pipe: with PEP 475 select() silently resumes after a signal handler, so the
        # handler only records the signal and the wakeup fd makes select() return.
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        self.sel.register(self._sig_r, selectors.EVENT_READ, self._drain_signals)
        self._server: socket.socket | None = None
        if control:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(control)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(control)
            srv.listen(8)
            srv.setblocking(False)
            self._server = srv
            self.sel.register(srv, selectors.EVENT_READ, self._accept)

    # ---------------------------------------------------------------- control
    def set_params(self, direction: str, params: dict[str, Any], merge: bool = False) -> None:
        names = list(self.dirs) if direction == "both" else [direction]
        for name in names:
            if name not in self.dirs:
                raise ValueError(f"unknown direction {name!r} (have {', '.join(self.dirs)})")
        # validate for every direction first, so a bad request changes nothing
        new = {
            n: Params.from_dict(params, self.dirs[n].params if merge else None) for n in names
        }
        for name, p in new.items():
            self.dirs[name].configure(p)

    def params(self) -> dict[str, dict[str, Any]]:
        return {n: dataclasses.asdict(d.params) for n, d in self.dirs.items()}

    def stats(self, reset: bool = False) -> dict[str, Any]:
        per = {n: d.stats() for n, d in self.dirs.items()}
        total: dict[str, int] = {}
        for s in per.values():
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        if reset:
            for d in self.dirs.values():
                d.reset_stats()
        return {"dirs": per, "total": total}

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "set":
            self.set_params(req.get("dir", "both"), req.get("params", {}), req.get("merge", False))
            return {"ok": True, "params": self.params()}
        if cmd == "get":
            return {"ok": True, "params": self.params()}
        if cmd == "stats":
            return {"ok": True, "stats": self.stats(bool(req.get("reset", False)))}
        if cmd == "ping":
            return {"ok": True}
        raise ValueError(f"unknown cmd {cmd!r}")

    def _accept(self) -> None:
        assert self._server is not None
        try:
            conn, _ = self._server.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._conns[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, lambda c=conn: self._on_conn(c))

    def _close_conn(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self._conns.pop(conn, None)
        conn.close()

    def _on_conn(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_conn(conn)
            return
        buf = self._conns[conn]
        buf += data
        if len(buf) > 1 << 20:  # nobody sends a megabyte of control; drop the client
            self._close_conn(conn)
            return
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if not line.strip():
                continue
            try:
                reply = self.handle(json.loads(line))
            except (ValueError, TypeError) as exc:
                reply = {"ok": False, "error": str(exc)}
            try:
                # replies are small; a short blocking send is simpler than write buffering
                conn.settimeout(2.0)
                conn.sendall(json.dumps(reply).encode() + b"\n")
                conn.setblocking(False)
            except OSError:
                self._close_conn(conn)
                return

    # ---------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending_signals.append(signum)

    def _drain_signals(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._sig_r.recv(4096):
                pass
        while self._pending_signals:
            sig = self._pending_signals.pop(0)
            if sig == signal.SIGUSR1:
                self.print_stats("stats")
            else:
                self.running = False

    def print_stats(self, event: str) -> None:
        line = {"event": event, "time": time.time(), **self.stats()}
        print(json.dumps(line, separators=(",", ":")), flush=True)

    # ------------------------------------------------------------------- loop
    def run(self) -> None:
        dirs = list(self.dirs.values())
        select = self.sel.select
        monotonic = time.monotonic
        print(
            json.dumps(
                {
                    "event": "ready",
                    "pid": os.getpid(),
                    "tuns": {n: d.ifname for n, d in self.dirs.items()},
                    "control": self.control_path,
                    "params": self.params(),
                }
            ),
            flush=True,
        )
        while self.running:
            deadline = None
            for d in dirs:
                if d.heap and (deadline is None or d.heap[0][0] < deadline):
                    deadline = d.heap[0][0]
            timeout = None if deadline is None else max(0.0, deadline - monotonic())
            for key, _ in select(timeout):
                key.data()
            now = monotonic()
            for d in dirs:
                if d.heap and d.heap[0][0] <= now:
                    d.release(now)
        self.print_stats("final")

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for conn in list(self._conns):
            self._close_conn(conn)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.control_path or "")
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                os.close(d.fd)
        self._sig_r.close()
        self._sig_w.close()
        self.sel.close()


def _json_arg(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--tun", action="append", required=True, metavar="DIR=IFNAME",
        help="direction name and its TUN device (repeatable), e.g. up=impu",
    )
    ap.add_argument("--control", help="UNIX socket path for runtime control")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="max queued per direction")
    ap.add_argument("--params", type=_json_arg, default={}, help="JSON params, every direction")
    ap.add_argument(
        "--dir", action="append", default=[], metavar="DIR=JSON",
        help="JSON params merged over --params for one direction (repeatable)",
    )
    args = ap.parse_args(argv)
    tuns: dict[str, str] = {}
    for spec in args.tun:
        dname, sep, ifname = spec.partition("=")
        if not sep or not dname or not ifname or dname == "both":
            ap.error(f"bad --tun {spec!r}; want DIR=IFNAME")
        tuns[dname] = ifname
    per_dir: list[tuple[str, dict[str, Any]]] = []
    for spec in args.dir:
        dname, sep, text = spec.partition("=")
        try:
            per_dir.append((dname, _json_arg(text)))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            ap.error(f"bad --dir {spec!r}: {exc}")
    element = Element(tuns, control=args.control, seed=args.seed, limit=args.limit)
    try:
        element.set_params("both", args.params)
        for dname, params in per_dir:
            element.set_params(dname, params, merge=True)
        element.run()
    except ValueError as exc:
        print(json.dumps({"event": "error", "error": str(exc)}), flush=True)
        return 2
    finally:
        element.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
