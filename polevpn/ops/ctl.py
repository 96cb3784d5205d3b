"""``polevpn-ctl``: the router's REST API (polevpn.ops.api) in a terminal.

    polevpn-ctl [-configPath=config.json] [--url URL] [--token-file F]
                status|gateways|routes|cluster|direct|reload [--json]

The API's address and token come from the router's config file (api_listen, api_token or
api_token_file) unless --url and --token-file (or $POLEVPN_API_TOKEN) say otherwise; only
those fields are read, so the router's keys need not be readable. Exit status: 0 done,
1 the API could not be reached or answered an error (one line on stderr), 2 usage or config
error. Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from polevpn import __version__
from polevpn.common.logfmt import endpoint
from polevpn.config import ConfigError, load_api_access

EXIT_API = 1
EXIT_USAGE = 2
TIMEOUT = 10.0
COMMANDS = ("status", "gateways", "routes", "cluster", "direct", "reload")


class CtlError(Exception):
    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.code = code


# -- formatting


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(n) < 1000 or unit == "G":
            return f"{n:.0f}" if not unit else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds:.1f}s"


def _rtt(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms >= 1 or ms == 0 else f"{ms:.2f} ms"


def table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    right = right or set()
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: list[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _endpoint(listener: dict[str, Any]) -> str:
    return f"{listener['transport']}://{endpoint((listener['address'], listener['port']))}"


def _loss(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    percent = ratio * 100
    if percent == 0:
        return "0%"
    if percent < 0.01:
        return "<0.01%"
    return f"{percent:.1f}%" if percent >= 1 else f"{percent:.2f}%"


def _traffic(x: dict[str, Any]) -> list[str]:
    return [
        human_count(x["packets_in"]),
        human_count(x["packets_out"]),
        human_bytes(x["bytes_in"]),
        human_bytes(x["bytes_out"]),
    ]


def _link_label(link: dict[str, Any]) -> str:
    """A link's row under its gateway: indented name, state, and how the gateway uses it."""
    label = f"  {link['name']} {'up' if link['up'] else 'DOWN'}"
    if link["backup"]:
        label += " backup"
    if link["weight"] != 1:
        label += f" weight {link['weight']:g}"
    return label


def format_gateways(gateways: list[dict[str, Any]]) -> str:
    if not gateways:
        return "no gateways registered"
    rows = []
    for g in gateways:
        links = g.get("links") or []
        # a multi-link gateway's peers are in its links' rows; its own says how many are up
        peer = f"{sum(1 for x in links if x['up'])}/{len(links)} links up" if links else g["peer"]
        rows.append(
            [
                g["gateway"],
                g["transport"],
                peer,
                ",".join(g["networks"]) or "-",
                human_duration(g["uptime"]),
                _rtt(g["rtt_ms"]),
                "-",
                *_traffic(g),
            ]
        )
        for link in links:
            rows.append(
                [
                    _link_label(link),
                    link["transport"],
                    link["peer"],
                    "",
                    human_duration(link["uptime"]),
                    _rtt(link["rtt_ms"]),
                    _loss(link["loss"]),
                    *_traffic(link),
                ]
            )
    headers = ["GATEWAY", "TRANSPORT", "PEER", "NETWORKS", "UPTIME", "RTT", "LOSS"]
    headers += ["PKTS IN", "PKTS OUT", "BYTES IN", "BYTES OUT"]
    return table(headers, rows, right={4, 5, 6, 7, 8, 9, 10})


def format_status(status: dict[str, Any], gateways: list[dict[str, Any]]) -> str:
    listen = ", ".join(_endpoint(x) for x in status["listen"]) or "-"
    lines = [
        f"polevpn router {status['version']}, up {human_duration(status['uptime'])} "
        f"(since {status['started_at']})",
        f"listening: {listen}",
        f"gateways: {status['gateways']}  routes: {status['routes']}  "
        f"connections: {status['connections']}  pending: {status['pending']}"
        + (f"  links: {status['links_up']}/{status['links']} up" if status.get("links") else ""),
        "",
        format_gateways(gateways),
    ]
    drops = {k: v for k, v in status["drops"].items() if v}
    lines.append("")
    if drops:
        lines.append("drops: " + "  ".join(f"{k}={v}" for k, v in sorted(drops.items())))
    else:
        lines.append("drops: none")
    return "\n".join(lines)


def format_routes(routes: list[dict[str, Any]]) -> str:
    if not routes:
        return "no routes"
    rows = [[r["network"], r["gateway"], r["transport"]] for r in routes]
    return table(["NETWORK", "GATEWAY", "TRANSPORT"], rows)


def format_cluster(c: dict[str, Any]) -> str:
    """The cluster as this router knows it: the store, the routers, the links to them and
    the remote routes."""
    st = c["store"]
    state = st["state"] + (" (stale)" if st["stale"] and st["state"] != "lost" else "")
    lines = [
        f"cluster {c['name']}, router {c['router_id']} at {c['peer_address']}",
        f"store {state} since {st['since'] or '-'}, {st['endpoint']}, revision "
        f"{st['revision']}, lease {st['lease'] or '-'} ttl {st['lease_ttl']}s, "
        f"{st['keys']} keys",
    ]
    if st["last_error"] and st["state"] != "connected":
        lines.append(f"last error: {st['last_error']}")
    lines.append("")
    lines.append(
        table(
            ["ROUTER", "ADDRESS", "STATE", "ROUTES", "VERSION"],
            [
                [r["router_id"], r["peer_address"] or "-", r["state"], str(r["routes"]),
                 r["version"] or "-"]
                for r in c["routers"]
            ],  # fmt: skip
            right={3},
        )
    )
    if c["peer_links"]:
        lines.append("")
        lines.append(
            table(
                ["LINK", "ADDRESS", "STATE", "RTT", "PKTS IN", "PKTS OUT", "IN", "OUT"],
                [
                    [p["router_id"], p["address"], p["state"], _rtt(p["rtt_ms"]), *_traffic(p)]
                    for p in c["peer_links"]
                ],
                right={3, 4, 5, 6, 7},
            )
        )
    lines.append("")
    if c["remote_routes"]:
        lines.append(
            table(
                ["NETWORK", "ROUTER", "GATEWAY", "SITE"],
                [[r["network"], r["router_id"], r["gateway"], r["site"]]
                 for r in c["remote_routes"]],
            )  # fmt: skip
        )
    else:
        lines.append("no remote routes")
    return "\n".join(lines)


def format_direct(d: dict[str, Any]) -> str:
    """Direct paths: each pair and both its sides as they report them, then the
    endpoints the router knows."""
    if not d["enabled"] and not d["pairs"]:
        return "direct paths off"
    lines = []
    if d["pairs"]:
        rows = []
        for p in d["pairs"]:
            for i, side in enumerate(p["sides"]):
                rows.append(
                    [
                        p["pair_id"][:8] if i == 0 else "",
                        side["gateway"],
                        side["state"],
                        side["cause"],
                        _rtt(side["rtt_ms"]),
                        side["endpoint"] or "-",
                        human_bytes(side["bytes_sent"]),
                        human_bytes(side["bytes_received"]),
                        str(side["refused"]),
                    ]
                )
        lines.append(
            table(
                ["PAIR", "GATEWAY", "STATE", "CAUSE", "RTT", "PEER ENDPOINT", "SENT", "RECEIVED",
                 "REFUSED"],
                rows,
                right={4, 6, 7, 8},
            )  # fmt: skip
        )
    else:
        lines.append("no direct pairs")
    lines.append("")
    if d["endpoints"]:
        lines.append(
            table(
                ["GATEWAY", "PUBLIC", "HOST"],
                [[e["gateway"], e["public"] or "-", ", ".join(e["host"]) or "-"]
                 for e in d["endpoints"]],
            )  # fmt: skip
        )
    else:
        lines.append("no gateway with direct paths")
    return "\n".join(lines)


def format_reload(reply: dict[str, Any]) -> str:
    changes = reply["changes"]
    if not changes:
        return "reloaded: no changes"
    return "reloaded:\n" + "\n".join(f"  {c}" for c in changes)


# -- the API


class Client:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str) -> Any:
        req = urllib.request.Request(
            f"{self.url}/api/v1/{path}",
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"},
            data=b"" if method == "POST" else None,
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                message = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise CtlError(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(f"cannot reach the router's API at {self.url}: {reason}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise CtlError(f"{method} {path}: the reply is not JSON") from None


def _url_for(host: str, port: int) -> str:
    # a wildcard listen address is reached on loopback
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"http://{host}:{port}"


def _read_token(path: str) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"cannot read token file {path}: {exc}", EXIT_USAGE) from None
    if not token:
        raise CtlError(f"token file {path} is empty", EXIT_USAGE)
    return token


def client_for(args: argparse.Namespace) -> Client:
    url = args.url
    token = _read_token(args.token_file) if args.token_file else None
    token = token or os.environ.get("POLEVPN_API_TOKEN") or None
    if url is None or token is None:
        try:
            access = load_api_access(args.config)
        except ConfigError as exc:
            raise CtlError(str(exc), EXIT_USAGE) from None
        url = url or _url_for(access.host, access.port)
        token = token or access.token
    return Client(url, token)


def run(args: argparse.Namespace) -> str:
    client = client_for(args)
    if args.command == "status":
        status = client.call("GET", "status")
        gateways = client.call("GET", "gateways")
        if args.json:
            return json.dumps({"status": status, **gateways}, indent=2)
        return format_status(status, gateways["gateways"])
    if args.command == "gateways":
        reply = client.call("GET", "gateways")
        return json.dumps(reply, indent=2) if args.json else format_gateways(reply["gateways"])
    if args.command == "routes":
        reply = client.call("GET", "routes")
        return json.dumps(reply, indent=2) if args.json else format_routes(reply["routes"])
    if args.command == "cluster":
        reply = client.call("GET", "cluster")
        return json.dumps(reply, indent=2) if args.json else format_cluster(reply)
    if args.command == "direct":
        reply = client.call("GET", "direct")
        return json.dumps(reply, indent=2) if args.json else format_direct(reply)
    assert args.command == "reload"
    reply = client.call("POST", "reload")
    return json.dumps(reply, indent=2) if args.json else format_reload(reply)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polevpn-ctl",
        description="Show the router's status from its REST API, or ask it to reload.",
        allow_abbrev=False,
    )
    p.add_argument(
        "-configPath",
        "-config",
        "--config",
        "--configPath",
        dest="config",
        default="config.json",
        metavar="FILE",
        help="the router's config file, for api_listen and the token (default: config.json)",
    )
    p.add_argument("--url", help="the API's base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--token-file", help="file holding the bearer token (or set $POLEVPN_API_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("command", choices=COMMANDS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = run(args)
    except CtlError as exc:
        print(f"polevpn-ctl: {exc}", file=sys.stderr)
        return exc.code
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
