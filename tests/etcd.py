"""etcd for tests: Debian's etcd-server, one member or three, in a network namespace of its own.

    [pvXXXX-etcd]  lo: 198.19.250.1 (m1), .2 (m2), .3 (m3)    client :2379, peer :2380

The members listen on addresses of their own namespace's ``lo``, so nothing is added to the
host's namespace. Code under test reaches them in one of two ways:

* :meth:`Etcd.call` runs a function (an ``asyncio.run`` of a store adapter, say) in a thread
  that has joined the etcd namespace (``setns`` changes only the calling thread's namespace),
  so sockets it opens are there;
* :meth:`Etcd.attach` joins another namespace (a router's in a Topology) through a veth pair
  (198.19.251.4n/30), with a route to the members.

Data directories are under a temporary directory; every member is ended by its own PID;
:meth:`Etcd.teardown` (also called when setup fails) ends them, deletes the namespace and the
data. :meth:`Etcd.stop_member` / :meth:`Etcd.start_member` end and restart a member on its
data, and :meth:`Etcd.pause_member` / :meth:`Etcd.resume_member` freeze it (SIGSTOP): the
store failing, for the tests of issue 17.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MEMBER_NET = "198.19.250"
LINK_NET = "198.19.251"
CLIENT_PORT = 2379
PEER_PORT = 2380
_CLONE_NEWNET = 0x40000000


def have_etcd() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return False, "iproute2 'ip' command not found"
    if shutil.which("etcd") is None:
        return False, "etcd not found (Debian's etcd-server; 'make sysdeps' installs it)"
    return True, ""


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Etcd:
    """``members`` etcd members (1 or 3) in the namespace ``<prefix>-etcd``."""

    def __init__(self, members: int = 1, prefix: str | None = None) -> None:
        if members < 1:
            raise ValueError("at least one member")
        self.prefix = prefix or f"pv{secrets.token_hex(2)}"
        self.ns = f"{self.prefix}-etcd"
        self.count = members
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-etcd-"))
        self.token = f"{self.prefix}-{secrets.token_hex(4)}"
        self.procs: dict[int, subprocess.Popen | None] = {i: None for i in range(members)}
        self._created_ns = False
        self._links: list[tuple[str, str]] = []  # (namespace, interface) of attach()
        self._log_files: list[Any] = []

    # ----------------------------------------------------------------- addresses
    def host(self, i: int) -> str:
        return f"{MEMBER_NET}.{i + 1}"

    def endpoint(self, i: int) -> str:
        return f"http://{self.host(i)}:{CLIENT_PORT}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(self.count)]

    def _peer_url(self, i: int) -> str:
        return f"http://{self.host(i)}:{PEER_PORT}"

    # ---------------------------------------------------------------- lifecycle
    def setup(self, timeout: float = 20.0) -> Etcd:
        try:
            self._ip("netns", "add", self.ns)
            self._created_ns = True
            self._exec("ip", "link", "set", "lo", "up")
            for i in range(self.count):
                self._exec("ip", "addr", "add", f"{self.host(i)}/32", "dev", "lo")
            for i in range(self.count):
                self.start_member(i, wait=False)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        for i in list(self.procs):
            # the data goes too: no need for a clean stop, which without quorum takes seconds
            self.stop_member(i, sig=signal.SIGKILL)
        for ns, ifname in self._links:
            subprocess.run(
                ["ip", "netns", "exec", ns, "ip", "link", "del", ifname],
                capture_output=True,
                timeout=10,
            )
        self._links.clear()
        if self._created_ns:
            self._ip("netns", "del", self.ns, check=False)
            self._created_ns = False
        for fh in self._log_files:
            with contextlib.suppress(OSError):
                fh.close()
        self._log_files.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def start_member(self, i: int, wait: bool = True) -> None:
        """Start member ``i`` (again: on its data directory, rejoining its cluster)."""
        proc = self.procs.get(i)
        if proc is not None and proc.poll() is None:
            return
        cluster = ",".join(f"m{j}={self._peer_url(j)}" for j in range(self.count))
        cmd = [
            "ip", "netns", "exec", self.ns, "etcd",
            "--name", f"m{i}",
            "--data-dir", str(self.dir / f"m{i}"),
            "--listen-client-urls", self.endpoint(i),
            "--advertise-client-urls", self.endpoint(i),
            "--listen-peer-urls", self._peer_url(i),
            "--initial-advertise-peer-urls", self._peer_url(i),
            "--initial-cluster", cluster,
            "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            # elections in well under a second, so a test of a lost member stays short
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        log = open(self.dir / f"m{i}.log", "ab")  # noqa: SIM115 - closed in teardown
        self._log_files.append(log)
        self.procs[i] = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if wait:
            self.wait_healthy(members=[i])

    def stop_member(self, i: int, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """End member ``i`` by its PID (``sig`` first, SIGKILL if it lingers)."""
        proc = self.procs.get(i)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a paused member cannot end otherwise
                proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self.procs[i] = None

    def stop(self) -> None:
        """The store gone: every member ended (data kept for :meth:`start`)."""
        for i in range(self.count):
            self.stop_member(i)

    def start(self) -> None:
        for i in range(self.count):
            self.start_member(i, wait=False)
        self.wait_healthy()

    def pause_member(self, i: int) -> None:
        """Freeze member ``i``: its sockets stay open and answer nothing (a hung store)."""
        proc = self.procs[i]
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)

    def resume_member(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        os.kill(proc.pid, signal.SIGCONT)

    def log(self, i: int) -> str:
        path = self.dir / f"m{i}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------ reaching it
    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """``fn()`` in a thread inside the etcd namespace; its result, or its exception."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                _setns(f"/var/run/netns/{self.ns}")
                out["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread
                out["error"] = exc

        t = threading.Thread(target=run, name=f"in-{self.ns}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{fn!r} still running after {timeout}s in {self.ns}")
        if "error" in out:
            raise out["error"]
        return out["value"]

    def attach(self, ns: str) -> str:
        """Join namespace ``ns`` to the members through a veth pair; the address of the
        ``ns`` end (from 198.19.251.4n+2/30), with a route there to the members."""
        n = len(self._links) + 1
        if n > 63:
            raise ValueError("too many attached namespaces")
        here, there = f"{LINK_NET}.{4 * n + 1}", f"{LINK_NET}.{4 * n + 2}"
        a_if, b_if = f"et{n}", "etcd0" if n == 1 else f"etcd{n}"
        self._exec("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if)
        self._exec("ip", "link", "set", b_if, "netns", ns)
        self._links.append((ns, b_if))
        self._exec("ip", "addr", "add", f"{here}/30", "dev", a_if)
        self._exec("ip", "link", "set", a_if, "up")
        for cmd in (
            ("ip", "addr", "add", f"{there}/30", "dev", b_if),
            ("ip", "link", "set", b_if, "up"),
            ("ip", "route", "add", f"{MEMBER_NET}.0/24", "via", here),
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True, capture_output=True)
        return there

    # ---------------------------------------------------------- the store itself
    def request(self, path: str, body: dict[str, Any], member: int = 0) -> dict[str, Any]:
        """One request to the JSON gateway (``/v3/kv/range`` and so on), from inside."""

        def post() -> dict[str, Any]:
            req = urllib.request.Request(
                self.endpoint(member) + path,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read() or b"{}")

        return self.call(post, timeout=10)

    def healthy(self, i: int) -> bool:
        def get() -> bool:
            try:
                with urllib.request.urlopen(self.endpoint(i) + "/health", timeout=1) as resp:
                    return json.loads(resp.read()).get("health") == "true"
            except (OSError, urllib.error.URLError, ValueError):
                return False

        return self.call(get, timeout=5)

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        todo = list(range(self.count) if members is None else members)
        while todo:
            for i in list(todo):
                proc = self.procs[i]
                if proc is None or proc.poll() is not None:
                    raise RuntimeError(f"etcd member {i} is not running:\n{self.log(i)[-2000:]}")
                if self.healthy(i):
                    todo.remove(i)
            if todo and time.monotonic() > deadline:
                raise TimeoutError(f"etcd members {todo} not healthy after {timeout}s")
            if todo:
                time.sleep(0.1)

    def _ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", *args], check=check, capture_output=True, timeout=10)

    def _exec(self, *cmd: str) -> None:
        res = subprocess.run(
            ["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True, timeout=10
        )
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
