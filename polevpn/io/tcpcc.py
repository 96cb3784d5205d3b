"""TCP congestion control of the tls:// tunnel sockets (TCP_CONGESTION).

One TCP connection carries all of an office's traffic over what is often a long, lossy line,
where a loss-based algorithm (cubic, the usual kernel default) backs off on every random
loss and BBR does not; PoleVPN promises TLS with BBR. ``tcp_congestion`` in the config
chooses the algorithm: absent, bbr where the kernel has it; "" or "default", the kernel's.

Which one is used is decided once, at start (``choose``, sans-IO, from what ``usable`` found
out about the kernel), and set on every tunnel socket from then on:

- the router sets it on its listening sockets, before it drops privileges; Linux gives an
  accepted socket its listener's algorithm, and a process without CAP_NET_ADMIN could not
  set one outside net.ipv4.tcp_allowed_congestion_control (cubic, often) itself;
- the gateway keeps CAP_NET_ADMIN and sets it on each connection it makes.

An algorithm the kernel lists as allowed but has not loaded is loaded by the kernel on the
first setsockopt from a process with CAP_NET_ADMIN (root), so ``usable`` tries the one
asked for on a throwaway socket instead of trusting the list alone.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from polevpn.common.logfmt import kv

PROC = Path("/proc/sys/net/ipv4")
# Linux's number (13) for Pythons built without the constant
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
# TCP_CA_NAME_MAX: the name with its NUL
NAME_MAX = 16
# what an absent tcp_congestion asks for, when the kernel has it
PREFERRED = "bbr"


@dataclass(frozen=True)
class Choice:
    # to set on the tunnel sockets; None: leave the kernel's default
    algorithm: str | None
    # what the tunnel sockets use: ``algorithm``, or the kernel's default
    used: str
    # what was asked for: None when the config does not say
    requested: str | None
    # what was asked for is not available: the kernel's default is used instead
    unavailable: bool = False
    # what this process can set (for the warning)
    available: tuple[str, ...] = ()

    def fields(self) -> dict[str, str]:
        """For the start-up log line."""
        asked = {None: "unset", "": "default"}.get(self.requested, self.requested)
        return {"algorithm": self.used, "requested": str(asked)}

    def log(self, log: logging.Logger, config: Path) -> None:
        """The start-up lines: a warning if the request could not be met, then which
        algorithm the tls:// sockets use."""
        if self.unavailable:
            log.warning(
                "tcp_congestion is not available: tls:// sockets use the kernel default",
                extra=kv(
                    config=config,
                    requested=self.requested,
                    algorithm=self.used,
                    available=" ".join(self.available) or "none",
                ),
            )
        log.info("tcp congestion control", extra=kv(transport="tls", **self.fields()))


def choose(requested: str | None, available: Collection[str], default: str) -> Choice:
    """The algorithm for the tunnel sockets (sans-IO).

    ``requested``: the config's tcp_congestion (None: absent, "": the kernel's default);
    ``available``: what this process can set; ``default``: the kernel's default
    (net.ipv4.tcp_congestion_control, "" when unknown).
    """
    shown = default or "the kernel default"
    if requested is None:
        # bbr where there is bbr; no warning where there is not, nobody asked for it
        if PREFERRED in available:
            return Choice(PREFERRED, PREFERRED, None)
        return Choice(None, shown, None)
    if requested == "":
        return Choice(None, shown, "")
    if requested in available:
        return Choice(requested, requested, requested)
    return Choice(None, shown, requested, unavailable=True, available=tuple(sorted(available)))


def _read_proc(name: str, proc: Path) -> str:
    try:
        return (proc / name).read_text().strip()
    except OSError:
        return ""


def try_set(sock: socket.socket, algorithm: str) -> bool:
    """Set ``algorithm`` on ``sock``; False if the kernel refuses it (not there, or not
    allowed without CAP_NET_ADMIN)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, algorithm.encode())
    except OSError:
        return False
    return True


def usable(requested: str | None, proc: Path = PROC) -> tuple[list[str], str]:
    """What this process can set, and the kernel's default: the kernel's list, corrected
    for the one algorithm asked for by trying it on a throwaway socket (which loads its
    module when we are root, or finds it refused when we are not)."""
    available = _read_proc("tcp_available_congestion_control", proc).split()
    default = _read_proc("tcp_congestion_control", proc)
    wanted = PREFERRED if requested is None else requested
    if wanted:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
            ok = try_set(probe, wanted)
        if ok and wanted not in available:
            available.append(wanted)
        elif not ok and wanted in available:
            available.remove(wanted)
    return available, default


def decide(requested: str | None, proc: Path = PROC) -> Choice:
    """``choose`` with what the kernel offers this process: once, at start."""
    available, default = usable(requested, proc)
    return choose(requested, available, default)


def apply(sock: socket.socket | None, choice: Choice) -> None:
    """Set the chosen algorithm on a tunnel socket (a TCP one; others are left alone)."""
    if choice.algorithm is None or sock is None or sock.type != socket.SOCK_STREAM:
        return
    # checked at start; a refusal now (a module unloaded since) leaves the kernel's
    try_set(sock, choice.algorithm)


def current(sock: socket.socket) -> str | None:
    """The algorithm ``sock`` uses; None where the kernel does not say."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, NAME_MAX)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode("ascii", "replace") or None
