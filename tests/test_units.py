"""The shipped systemd units: valid, hardened, and with the privileges the issue allows."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = {
    "router": ROOT / "router" / "polevpn-router.service",
    "gateway": ROOT / "gateway" / "polevpn-gateway.service",
}
# systemd-analyze's exposure scale: 0 best, 10 worst; below 3 it calls a unit "OK"
MAX_EXPOSURE = 3.0

needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(\w+)=(.*)$", line.strip())
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


def local_copy(which: str, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's script, so verify finds it."""
    exe = shutil.which(f"polevpn-{which}") or str(ROOT / ".venv" / "bin" / f"polevpn-{which}")
    text = UNITS[which].read_text().replace(f"/opt/polevpn/bin/polevpn-{which}", exe)
    out = tmp_path / UNITS[which].name
    out.write_text(text)
    return out


def test_router_runs_unprivileged_with_only_the_port_capability() -> None:
    s = settings(UNITS["router"])
    assert s["User"] == ["polevpn"] and s["Group"] == ["polevpn"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["PrivateDevices"] == ["yes"]


def test_gateway_keeps_only_net_admin_and_the_tun_device() -> None:
    s = settings(UNITS["gateway"])
    assert s["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert "AmbientCapabilities" not in s
    assert s["NoNewPrivileges"] == ["yes"]
    assert s["DeviceAllow"] == ["/dev/net/tun rw"] and s["DevicePolicy"] == ["closed"]
    # /proc/sys read-only but for the two files "forwarding": true writes
    assert s["ProtectKernelTunables"] == ["yes"]
    assert s["ReadWritePaths"] == [
        "/proc/sys/net/ipv4/ip_forward -/proc/sys/net/ipv6/conf/all/forwarding"
    ]


@pytest.mark.parametrize("which", sorted(UNITS))
def test_both_units_protect_the_system(which: str) -> None:
    s = settings(UNITS[which])
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID"):
        assert key in s, f"{which} unit lacks {key}"
    assert s["ProtectSystem"] == ["strict"]
    assert s["Restart"] == ["on-failure"]


@needs_systemd
@pytest.mark.parametrize("which", sorted(UNITS))
def test_systemd_accepts_the_unit(which: str, tmp_path: Path) -> None:
    unit = local_copy(which, tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert unit.name not in res.stderr, res.stderr  # warnings name the unit file


@needs_systemd
@pytest.mark.parametrize("which", sorted(UNITS))
def test_exposure_score(which: str, tmp_path: Path) -> None:
    unit = local_copy(which, tmp_path)
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", res.stdout)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security check: {res.stderr[:200]}")
    score = float(m.group(1))
    print(f"{which}: exposure {score}")
    assert score <= MAX_EXPOSURE, res.stdout
