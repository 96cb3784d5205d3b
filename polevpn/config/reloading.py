"""What a config reload changes, decided without touching anything (sans-IO).

A reload re-reads the whole file with the start-up parser, so a broken file is refused with
the same one-line error and the running config stays. Of a valid file, a daemon takes what
it can apply while running; what needs a socket, device or privilege set up only at start
(listening addresses, the TUN device, the user to run as) keeps its running value and is
reported as waiting for a restart, so the config in force is always the one described.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from polevpn.common.logfmt import kv
from polevpn.config import ClusterConfig, GatewayConfig, LinkConfig, Listener, RouterConfig

C = TypeVar("C", RouterConfig, GatewayConfig)

# bound or set up at start; a changed value waits for a restart
# the tun: opened, addressed and routed before privileges are dropped
# tcp_congestion: set on the tls:// listeners, and checked once, at start (polevpn.io.tcpcc)
ROUTER_RESTART = frozenset(
    {"kcp_params", "user", "metrics_listen", "api_listen", "tun", "tcp_congestion"}
)
LISTENER_RESTART = ("enable", "host", "port")
GATEWAY_RESTART = frozenset(
    {
        "gateway",
        "gateway6",
        "tun_name",
        "mtu",
        "offload",
        "metrics_listen",
        "forwarding",
        "masquerade",
        # every link's REGISTER carries these, and the router holds them per connection
        "link_heartbeat_interval",
        "link_timeout",
        # checked against the kernel once, at start (polevpn.io.tcpcc)
        "tcp_congestion",
        # the direct socket is bound at start, and AUTH offers the feature per connection
        "direct",
    }
)
# not settings: the file's path and the parser's warnings
_IGNORED = frozenset({"path", "warnings"})
# secrets: a change is reported by name only
_SECRET = frozenset({"key", "api_token", "metrics_token"})


class ReloadError(Exception):
    """A valid new config that could not be applied; the running one stays."""


@dataclass(frozen=True)
class Reload(Generic[C]):
    # the config to run with from now on: the new file, with restart-only fields kept
    config: C
    # one line per applied change, for the log and the API
    changes: tuple[str, ...]
    # fields that changed in the file but keep their running value until a restart
    needs_restart: tuple[str, ...]
    # names of the applied fields that changed (``tls`` for its certificate, say)
    fields: frozenset[str] = frozenset()

    def changed(self, *names: str) -> bool:
        return not self.fields.isdisjoint(names)

    def describe(self) -> list[str]:
        later = [f"{n}: changed, takes effect after a restart" for n in self.needs_restart]
        return [*self.changes, *later]


def log_changes(log: logging.Logger, path: Path, changes: list[str]) -> None:
    """One line per change, then the line that says the reload is done (last, so that
    whoever waits for it finds the changes already written)."""
    for line in changes:
        log.info("reload", extra=kv(change=line))
    log.info("reloaded", extra=kv(config=path, changes=len(changes)))


def _fmt(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None else str(value)


def _listener(name: str, old: Listener, new: Listener) -> tuple[Listener, list[str], list[str]]:
    keep = {f: getattr(old, f) for f in LISTENER_RESTART}
    merged = dataclasses.replace(new, **keep)
    restart = [f"{name}.{f}" for f in LISTENER_RESTART if getattr(old, f) != getattr(new, f)]
    changes = [
        f"{name}.{f}: {_fmt(getattr(old, f))} -> {_fmt(getattr(new, f))}"
        for f in ("cert_file", "key_file")
        if getattr(old, f) != getattr(new, f)
    ]
    return merged, changes, restart


def _gateways(old: RouterConfig, new: RouterConfig) -> str:
    before = {g.gateway: g for g in old.gateways}
    after = {g.gateway: g for g in new.gateways}
    parts = []
    for what, addrs in (
        ("added", [a for a in after if a not in before]),
        ("removed", [a for a in before if a not in after]),
        ("changed", [a for a in after if a in before and after[a] != before[a]]),
    ):
        if addrs:
            parts.append(f"{what} {','.join(str(a) for a in sorted(addrs, key=str))}")
    return f"gateways: {'; '.join(parts) or 'reordered'}"


# the cluster's secrets: a change is reported by name only
_CLUSTER_SECRET = frozenset({"etcd_password", "peer_key", "peer_key_previous"})


def _cluster(old: ClusterConfig | None, new: ClusterConfig | None) -> str:
    """A cluster section added, removed or changed (applied while running: the router
    leaves the cluster, joins it, or re-connects with the new settings)."""
    if old is None or new is None:
        return f"cluster: {'joined' if old is None else 'left'}" + (
            f" {new.name} as {new.router_id}" if new is not None else ""
        )
    parts = []
    for f in dataclasses.fields(new):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a != b:
            parts.append(
                f"{f.name} changed" if f.name in _CLUSTER_SECRET else f"{f.name} {_fmt(a)} -> "
                f"{_fmt(b)}"
            )
    return f"cluster: {'; '.join(parts)}"


def _links_apply(old: GatewayConfig, new: GatewayConfig) -> bool:
    """A reload changes a gateway's links in place while it has several before and after."""
    return old.multi_link and new.multi_link


def _fmt_links(links: tuple[LinkConfig, ...]) -> str:
    return ", ".join(
        # no "=": a log line would read name=url as a field of its own
        f"{link.name} {link.server.url}"
        + (f" from {link.bind}" if link.bind else "")
        + (f" via {link.interface}" if link.interface else "")
        + (f" weight {link.weight:g}" if link.weight != 1 else "")
        + (" backup" if link.backup else "")
        for link in links
    ) or "none"


def plan(old: C, new: C) -> Reload[C]:
    """How ``new`` (a freshly parsed file) replaces ``old`` (the config in force)."""
    restart_fields = ROUTER_RESTART if isinstance(old, RouterConfig) else GATEWAY_RESTART
    keep: dict[str, Any] = {}
    changes: list[str] = []
    restart: list[str] = []
    fields: set[str] = set()
    for f in dataclasses.fields(old):
        name = f.name
        a, b = getattr(old, name), getattr(new, name)
        if name in _IGNORED or a == b:
            continue
        if name == "route_servers" and old.links != new.links:  # type: ignore[union-attr]
            # with links, the servers are the links' own: they change with them, or not at all
            if not _links_apply(old, new):  # type: ignore[arg-type]
                keep[name] = a
            continue
        if name == "links" and not _links_apply(old, new):  # type: ignore[arg-type]
            # a plain gateway becoming a multi-link one, or back, is another way of running
            keep[name] = a
            restart.append(name)
            continue
        if name == "links":
            changes.append(f"links: {_fmt_links(a)} -> {_fmt_links(b)}")
            fields.add(name)
            continue
        if name in restart_fields:
            keep[name] = a
            restart.append(name)
        elif isinstance(a, Listener):
            keep[name], ch, rs = _listener(name, a, b)
            changes += ch
            restart += rs
            if ch:
                fields.add(name)
        elif name == "gateways":
            changes.append(_gateways(old, new))  # type: ignore[arg-type]
            fields.add(name)
        elif name == "cluster":
            changes.append(_cluster(a, b))
            fields.add(name)
        else:
            shown = "changed" if name in _SECRET else f"{_fmt(a)} -> {_fmt(b)}"
            changes.append(f"{name}: {shown}")
            fields.add(name)
    merged = dataclasses.replace(new, **keep)
    return Reload(merged, tuple(changes), tuple(restart), frozenset(fields))
