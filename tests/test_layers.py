"""The package's layers (polevpn/__init__.py states the rule): every import of every module
under polevpn/, function-level and ``TYPE_CHECKING`` ones included, read with ``ast``.

    cli, keygen                     entry
    ops                             not router.router nor gateway.gateway: their views
    router | gateway                not each other
    cluster
    io | host                       not each other
    kcp | proto | packet | config | direct   sans-IO: only the lateral edges in SANS_IO_EDGES
    common

A module may import its own subpackage and any layer below its own; ``from polevpn import
__version__`` (the package itself) is allowed everywhere.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "polevpn"

LAYERS: dict[str, int] = {
    "cli": 6,
    "keygen": 6,
    "ops": 5,
    "router": 4,
    "gateway": 4,
    "cluster": 3,
    "io": 2,
    "host": 2,
    "kcp": 1,
    "proto": 1,
    "packet": 1,
    "config": 1,
    "direct": 1,
    "common": 0,
}
# the imports allowed between parts of the sans-IO layer
SANS_IO_EDGES = {
    ("kcp", "proto"),
    ("kcp", "packet"),
    ("kcp", "config"),
    ("config", "proto"),
    ("config", "packet"),
    ("proto", "packet"),
    ("proto", "config"),
    ("direct", "proto"),
    ("direct", "packet"),
    ("direct", "config"),
    ("direct", "kcp"),
}
# the orchestrators, which ops never imports: it reads them through their read models
# (router/view.py, gateway/view.py) and is handed those by the entry point
ORCHESTRATORS = {"polevpn.router.router", "polevpn.gateway.gateway"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    statement: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.statement}  ({self.reason})"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _part(module: str) -> str | None:
    """The layer unit of a module under polevpn: its subpackage, or cli/keygen; None for
    the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _is_module(root: Path, name: str) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, root: Path
) -> list[str]:
    """The polevpn modules ``node`` imports (absolute names)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "polevpn"]
    base = node.module or ""
    if node.level:
        # relative: from the module's package, up level - 1 more
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join([*pkg, *([base] if base else [])])
    if base.split(".")[0] != "polevpn":
        return []
    # "from polevpn.x import y" may name a module y: then y is checked too
    names = [f"{base}.{a.name}" for a in node.names if a.name != "*"]
    return [base, *(n for n in names if _is_module(root, n))]


def check_import(source: str, target: str) -> str | None:
    """Why ``source`` may not import ``target`` (module names), or None when it may."""
    src, dst = _part(source), _part(target)
    if dst is None or src == dst:
        return None
    if dst not in LAYERS:
        return f"{dst} is in no layer: add it to polevpn/__init__.py and LAYERS"
    if src not in LAYERS:
        return f"{src} is in no layer: add it to polevpn/__init__.py and LAYERS"
    s, d = LAYERS[src], LAYERS[dst]
    if src == "ops" and target in ORCHESTRATORS:
        return f"ops reads {dst} only through its read model (polevpn.{dst}.view)"
    if d < s:
        return None
    if d == s and (src, dst) in SANS_IO_EDGES:
        return None
    return f"{src} (layer {s}) must not import {dst} (layer {d})"


def violations(root: Path = PACKAGE) -> list[Violation]:
    out = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _targets(node, module, path.name == "__init__.py", root):
                reason = check_import(module, target)
                if reason is not None:
                    out.append(
                        Violation(
                            str(path.relative_to(root.parent)),
                            node.lineno,
                            ast.unparse(node),
                            reason,
                        )
                    )
                    break  # one report per statement
    return out


def test_every_import_keeps_to_the_layers():
    found = violations()
    assert not found, "imports against the layers (polevpn/__init__.py):\n" + "\n".join(
        str(v) for v in found
    )


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "polevpn"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_reports_what_breaks_the_rule(tmp_path):
    """Each kind of offence, at any depth of the module (TYPE_CHECKING, inside a function,
    relative), is reported with its file and line; what the rule allows is not."""
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "router/__init__.py": "",
            "router/router.py": (
                "from typing import TYPE_CHECKING\n"
                "from polevpn import __version__\n"
                "from polevpn.io import pathstats\n"
                "from . import view\n"
                "if TYPE_CHECKING:\n"
                "    from polevpn.ops import metrics\n"
                "def f():\n"
                "    import polevpn.gateway.gateway\n"
            ),
            "router/view.py": "from ..common import counters\n",
            "ops/__init__.py": "",
            "ops/api.py": (
                "from polevpn.router.view import RouterView\n"
                "from polevpn.router import router\n"
                "from polevpn.gateway.gateway import Gateway\n"
                "from polevpn.router.limits import ClientSlots\n"
            ),
            "proto/__init__.py": "",
            "proto/wire.py": "from polevpn.config import X\nfrom polevpn.kcp import fec\n",
            "io/__init__.py": "",
            "io/tun.py": "from polevpn.host import netconf\n",
        },
    )
    got = {(v.path, v.line): v.reason for v in violations(root)}
    assert got == {
        ("polevpn/router/router.py", 6): "router (layer 4) must not import ops (layer 5)",
        ("polevpn/router/router.py", 8): "router (layer 4) must not import gateway (layer 4)",
        ("polevpn/ops/api.py", 2): "ops reads router only through its read model "
        "(polevpn.router.view)",
        ("polevpn/ops/api.py", 3): "ops reads gateway only through its read model "
        "(polevpn.gateway.view)",
        ("polevpn/proto/wire.py", 2): "proto (layer 1) must not import kcp (layer 1)",
        ("polevpn/io/tun.py", 1): "io (layer 2) must not import host (layer 2)",
    }


def test_direct_is_sans_io():
    """polevpn.direct (direct paths) is sans-IO: it may use the wire protocol, the packet
    helpers, the config types and the sans-IO DTLS+KCP connection (a direct session is
    one), nothing with sockets, processes or the daemons."""
    for target in (
        "polevpn.proto.wire",
        "polevpn.packet.routing",
        "polevpn.common.counters",
        "polevpn.kcp.dtls",
        "polevpn.kcp.connection",
        "polevpn.config",
    ):
        assert check_import("polevpn.direct.punch", target) is None, target
    for target in (
        "polevpn.io.udpsock",
        "polevpn.io.direct_socket",
        "polevpn.host.netconf",
        "polevpn.router.router",
        "polevpn.gateway.gateway",
        "polevpn.ops.metrics",
        "polevpn.cluster.state",
    ):
        assert check_import("polevpn.direct.punch", target) is not None, target
    # and nothing below it reaches up into it
    assert check_import("polevpn.proto.session", "polevpn.direct.messages") is not None
