"""Giving up what the daemons do not need, for hosts that start them as root.

The router needs no privilege once its sockets are bound: started as root with ``user`` set,
it becomes that user. The gateway needs CAP_NET_ADMIN for its TUN device, addresses and
routes, and nothing else: started as root, it keeps only that capability, before any thread
exists (capabilities are per thread). Both set no_new_privs, so nothing they might execute
can gain privilege back. The systemd units in router/ and gateway/ impose the same from
outside; this covers hosts that run the daemons some other way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import pwd
from pathlib import Path

CAP_NET_ADMIN = 12
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(OSError):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 40


def no_new_privs() -> None:
    _check(_libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def keep_only(cap: int = CAP_NET_ADMIN) -> None:
    """Drop every capability but ``cap`` from all sets of this (single) thread."""
    libc = _libc()
    for c in range(_last_cap() + 1):
        if c == cap:
            continue
        # EINVAL: a capability this kernel does not know; nothing to drop
        if libc.prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"PR_CAPBSET_DROP {c}")
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[cap // 32].effective = data[cap // 32].permitted = 1 << (cap % 32)
    _check(libc.capset(ctypes.byref(header), data), "capset")
    no_new_privs()


def effective_caps(pid: int | str = "self") -> dict[str, int]:
    """CapInh/CapPrm/CapEff/CapBnd/CapAmb of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cap"):
            name, value = line.split(":")
            out[name] = int(value.strip(), 16)
    return out


def drop_to_user(name: str) -> tuple[int, int]:
    """Become ``name`` (its uid, gid and no supplementary groups); returns (uid, gid)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(0, f"no such user {name!r}") from None
    if pw.pw_uid == 0:
        raise PrivilegeError(0, f"user {name!r} is root")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() == 0 or os.geteuid() == 0:  # pragma: no cover - setuid cannot half-work
        raise PrivilegeError(0, "still root after setuid")
    no_new_privs()
    return pw.pw_uid, pw.pw_gid
