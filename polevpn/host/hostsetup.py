"""Host settings the gateway makes for its office on request and takes back on exit.

``forwarding``: the office LAN reaches the tunnel through this host, so the kernel must
forward between them. The gateway writes 1 to the forwarding sysctls of the families in use
through /proc/sys (the kernel's own interface; nothing under /etc is touched) and writes the
previous value back on exit, only where it changed one. Root keeps the right to write these
root-owned 0644 files after dropping to CAP_NET_ADMIN: writing needs file ownership, not
CAP_DAC_OVERRIDE.

``masquerade``: traffic leaving into the tunnel takes the gateway's tunnel address as source,
for offices whose LAN the far side must not (or cannot) route back to. One nftables table of
our own, ``inet polevpn_<tun>``, holds the rule; it is loaded with ``nft -f -`` as a single
transaction and deleted on exit. A table of that name found at start was left by a gateway
that could not clean up (SIGKILL, power loss) and is replaced in the same transaction.
"""

from __future__ import annotations

import errno
import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from polevpn.common.logfmt import kv

log = logging.getLogger("polevpn.hostsetup")

PROC_SYS = Path("/proc/sys")
IPV4_FORWARD = "net/ipv4/ip_forward"
IPV6_FORWARD = "net/ipv6/conf/all/forwarding"
NFT_TIMEOUT = 10.0


class HostSetupError(Exception):
    pass


def table_name(tun_name: str) -> str:
    """nftables identifiers allow letters, digits, '_' and '.', so the rest becomes '_'."""
    return "polevpn_" + re.sub(r"[^A-Za-z0-9_]", "_", tun_name)


def masquerade_ruleset(tun_name: str) -> str:
    """The nft script installing our table; an existing one of that name is replaced.

    ``table`` before ``delete`` makes the delete succeed whether or not a stale table exists;
    the whole script is one transaction, so there is never a moment without the rule, and a
    failure leaves whatever was there before.
    """
    if '"' in tun_name or "\\" in tun_name:
        raise HostSetupError(f"cannot masquerade: interface name {tun_name!r} has quotes")
    table = table_name(tun_name)
    return (
        f"table inet {table}\n"
        f"delete table inet {table}\n"
        f"table inet {table} {{\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "{tun_name}" masquerade\n'
        "  }\n"
        "}\n"
    )


def _nft(args: list[str], script: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["nft", *args],
            input=script,
            capture_output=True,
            text=True,
            timeout=NFT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise HostSetupError("cannot run nft: not installed (package nftables)") from None
    except subprocess.TimeoutExpired:
        raise HostSetupError(f"nft {' '.join(args)} took longer than {NFT_TIMEOUT:g}s") from None
    except OSError as exc:
        raise HostSetupError(f"cannot run nft: {exc.strerror or exc}") from None


def _nft_error(res: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in (res.stderr or res.stdout).strip().splitlines() if line.strip()]
    return lines[0] if lines else f"exit status {res.returncode}"


@dataclass
class HostSetup:
    tun_name: str
    forwarding: bool = False
    masquerade: bool = False
    ipv6: bool = False
    proc_sys: Path = PROC_SYS
    # sysctl path -> the value found before we wrote 1
    _saved: dict[Path, str] = field(default_factory=dict)
    _table: str | None = None

    def apply(self) -> None:
        """Make the settings; on any failure undo the part already made and raise."""
        try:
            if self.forwarding:
                self._forward(IPV4_FORWARD)
                if self.ipv6:
                    self._forward(IPV6_FORWARD)
            if self.masquerade:
                self._add_table()
        except HostSetupError:
            self.undo()
            raise

    def undo(self) -> None:
        """Take back what apply made; logs, never raises (runs on the way out)."""
        if self._table is not None:
            try:
                res = _nft(["delete", "table", "inet", self._table])
                if res.returncode != 0:
                    log.warning(
                        "cannot delete nftables table",
                        extra=kv(table=self._table, error=_nft_error(res)),
                    )
                else:
                    log.info("removed nftables table", extra=kv(table=f"inet {self._table}"))
            except HostSetupError as exc:
                log.warning("cannot delete nftables table", extra=kv(table=self._table, error=exc))
            self._table = None
        for path, old in reversed(list(self._saved.items())):
            try:
                path.write_text(old + "\n")
                log.info("restored", extra=kv(path=path, value=old))
            except OSError as exc:
                log.warning(
                    "cannot restore", extra=kv(path=path, value=old, error=exc.strerror or exc)
                )
        self._saved.clear()

    def _forward(self, key: str) -> None:
        path = self.proc_sys / key
        try:
            old = path.read_text().strip()
            if old == "1":
                return
            path.write_text("1\n")
        except OSError as exc:
            ro = exc.errno == errno.EROFS
            hint = " (read-only /proc/sys: ProtectKernelTunables?)" if ro else ""
            raise HostSetupError(
                f"cannot enable forwarding in {path}: {exc.strerror or exc}{hint}"
            ) from None
        self._saved[path] = old
        log.info("enabled forwarding", extra=kv(path=path, value=1, was=old))

    def _add_table(self) -> None:
        table = table_name(self.tun_name)
        script = masquerade_ruleset(self.tun_name)
        stale = _nft(["list", "table", "inet", table]).returncode == 0
        res = _nft(["-f", "-"], script)
        if res.returncode != 0:
            raise HostSetupError(f"cannot add nftables table inet {table}: {_nft_error(res)}")
        self._table = table
        if stale:
            log.warning(
                "replaced nftables table left by an earlier run", extra=kv(table=f"inet {table}")
            )
        log.info("masquerading", extra=kv(tun=self.tun_name, table=f"inet {table}"))
