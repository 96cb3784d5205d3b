"""The router's web dashboard (polevpn/web/index.html) in headless Chromium, end to end.

    hostA -- gwA ==tls==> router <==tls== gwB -- hostB
                          api on 127.0.0.1 (router namespace) <- chromium (router namespace)

A router with its HTTP API on loopback, two gateways and a paced TCP stream each way.  The
browser has to run where the API listens, so this file doubles as the browser script: the
test starts ``python test_dashboard.py --browse ...`` inside the router namespace (its own
process group, killed as a whole afterwards), which drives Debian's chromium through
chromium-driver with selenium, reads the page's DOM twice a few seconds apart, takes a
screenshot and writes what it saw as JSON; the test then checks that against the API.

``POLEVPN_DASHBOARD_SCREENSHOT=docs/dashboard.png`` (``make screenshot``) keeps the page open
longer, so the graphs have some history, and copies the screenshot there.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:  # tests/ is on sys.path (pytest rootdir-less import mode) ...
    import topology as t
except ImportError:  # ... or tests/ is a package
    from tests import topology as t

_ok, _reason = t.daemons_ready()

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not _ok, reason=_reason)]

API_PORT = 9480
WIDTH, HEIGHT = 1280, 800
SCREENSHOT_ENV = "POLEVPN_DASHBOARD_SCREENSHOT"
# bytes/s of the two paced streams: enough to see, far below what the tunnel carries
RATE_AB, RATE_BA = 1_500_000, 400_000

# Everything the checks need, read in one go so no poll can land halfway through.
_SNAPSHOT_JS = r"""
const val = (e) => e === null ? null : (e.dataset.value === "" ? null : Number(e.dataset.value));
const gateways = {};
for (const tr of document.querySelectorAll("#gateway-rows tr[data-gateway]")) {
  const g = {};
  for (const c of tr.querySelectorAll("[data-field]")) {
    g[c.dataset.field] = {text: c.textContent, value: "value" in c.dataset ? val(c) : null};
  }
  gateways[tr.dataset.gateway] = g;
}
const graphs = {};
for (const f of document.querySelectorAll("#graphs [data-gateway]")) {
  graphs[f.dataset.gateway] = {
    in_points: f.querySelector('[data-series="in"]').getAttribute("points").trim()
      .split(/\s+/).filter(Boolean).length,
    out_points: f.querySelector('[data-series="out"]').getAttribute("points").trim()
      .split(/\s+/).filter(Boolean).length,
    legend: f.querySelector(".legend").textContent,
  };
}
const routes = [...document.querySelectorAll("#route-rows tr[data-network]")].map((tr) => ({
  network: tr.querySelector('[data-field="network"]').textContent,
  gateway: tr.querySelector('[data-field="gateway"]').textContent,
  transport: tr.querySelector('[data-field="transport"]').textContent,
}));
const drops = {};
for (const tr of document.querySelectorAll("#drop-rows tr[data-drop]")) {
  drops[tr.dataset.drop] = {value: val(tr.querySelector('[data-field="count"]')),
                            highlighted: tr.classList.contains("nonzero")};
}
const text = (id) => document.getElementById(id).textContent;
return {
  url: location.href, gateways, graphs, routes, drops,
  header: Object.fromEntries(["version", "uptime", "listeners", "connections",
    "gateway-count", "route-count", "pending"].map((id) => [id, text(id)])),
  banner_hidden: document.getElementById("banner").hidden,
  form_hidden: document.getElementById("token-form").hidden,
  token_error: text("token-error"),
  stored_token: sessionStorage.getItem("polevpn-token") !== null,
};
"""


def browse(url: str, out: Path, png: Path, hold: float, profile: Path) -> None:
    """Drive chromium against ``url`` (with its ``#token=``); write what the page showed.

    Runs in the router namespace, as this file's ``--browse`` mode; ``profile`` is a fresh
    directory under the test's tmp_path, so even a killed browser leaves nothing behind.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    result: dict = {}
    driver = None
    try:
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "chromium"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                    f"--window-size={WIDTH},{HEIGHT}"):
            opts.add_argument(arg)
        try:
            driver = webdriver.Chrome(
                service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts
            )
        except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
            result["skip"] = f"chromium did not start: {exc}".splitlines()[0]
            return
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                "mobile": False})
        driver.get(url)

        def snapshot() -> dict:
            return driver.execute_script(_SNAPSHOT_JS)

        # Both gateways listed, each with a rate (so at least two polls went through).
        deadline = time.monotonic() + 30
        while True:
            snap = snapshot()
            gws = snap["gateways"]
            if len(gws) >= 2 and all(g["rate_in"]["value"] is not None for g in gws.values()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        result["first"] = snap
        time.sleep(4)
        result["second"] = snapshot()
        if hold:
            time.sleep(hold)
        driver.save_screenshot(str(png))
        result["screenshot"] = snapshot()
        # before the refused token below, whose 401 the browser reports as an error
        result["console"] = [e.get("message", "") for e in driver.get_log("browser")
                             if e.get("level") == "SEVERE"]
        # A token the router refuses: the page asks for one instead of showing data.
        driver.get("about:blank")  # a fresh load: only the fragment differs from url
        driver.get(url.split("#")[0] + "#token=not-the-token")
        deadline = time.monotonic() + 15
        while True:
            snap = snapshot()
            if not snap["form_hidden"] or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        result["wrong_token"] = snap
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        out.write_text(json.dumps(result))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (raises on anything that is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


_API_GET = r"""
import json, sys, urllib.request
out = {}
for path in ("status", "gateways", "routes"):
    req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/v1/{path}",
                                 headers={"Authorization": "Bearer " + sys.argv[2]})
    out[path] = json.load(urllib.request.urlopen(req, timeout=5))
print(json.dumps(out))
"""


def _kill_group(proc: subprocess.Popen) -> None:
    """The browser script, chromedriver and chromium share the group the script leads."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def test_dashboard_shows_live_gateways_routes_and_traffic(tmp_path):
    pytest.importorskip("selenium", reason="selenium not installed (make venv)")
    for exe, pkg in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(exe) is None:
            pytest.skip(f"{exe} not found (Debian package {pkg}; make sysdeps)")
    from test_e2e import running_vpn

    from polevpn.keygen import generate

    keys = tmp_path / "keys"
    generate(keys)
    token = secrets.token_urlsafe(24)
    router = t.router_config(keys, api_listen=f"127.0.0.1:{API_PORT}", api_token=token)
    screenshot_to = os.environ.get(SCREENSHOT_ENV)
    hold = 45.0 if screenshot_to else 0.0
    seconds = hold + 60  # every stream ends by itself even if teardown never came
    out, png = tmp_path / "browser.json", tmp_path / "dashboard.png"
    profile = tmp_path / "chromium-profile"
    profile.mkdir()

    with running_vpn(tmp_path, keys, router=router) as vpn:
        topo = vpn.topo
        topo.start_transfer("hostA", "hostB", t.HOST_B, int(RATE_AB * seconds), RATE_AB,
                            port=5097, timeout=seconds)
        topo.start_transfer("hostB", "hostA", t.HOST_A, int(RATE_BA * seconds), RATE_BA,
                            port=5096, timeout=seconds)
        browser = topo.popen(
            "router",
            [sys.executable, str(Path(__file__).resolve()), "--browse",
             f"http://127.0.0.1:{API_PORT}/#token={token}", str(out), str(png), str(hold),
             str(profile)],
            env={**os.environ, "SE_OFFLINE": "true"},
            log_name="browser",
        )
        try:
            browser.wait(timeout=hold + 120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"browser script did not finish\n{t.log_tail(browser.log_path)}")
        finally:
            _kill_group(browser)
        api = json.loads(topo.run("router", [sys.executable, "-c", _API_GET, str(API_PORT),
                                             token]).stdout)
        logs = f"{t.log_tail(browser.log_path)}\n{vpn.logs()}"

    assert out.is_file(), f"browser script wrote nothing\n{logs}"
    seen = json.loads(out.read_text())
    if "skip" in seen:
        pytest.skip(seen["skip"])
    assert "wrong_token" in seen, f"browser script failed part way: {seen}\n{logs}"
    first, second = seen["first"], seen["second"]

    # the token left the address bar (and stays in sessionStorage)
    assert "token" not in first["url"], first["url"]
    assert first["stored_token"] and first["form_hidden"] and first["banner_hidden"]

    gws = (t.GW_A_TUN4, t.GW_B_TUN4)
    assert sorted(first["gateways"]) == sorted(gws), first
    api_gws = {g["gateway"]: g for g in api["gateways"]["gateways"]}
    for gw in gws:
        a, b = first["gateways"][gw], second["gateways"][gw]
        assert b["transport"]["text"] == "tls"
        assert b["peer"]["text"] == api_gws[gw]["peer"]
        for name in ("bytes_in", "bytes_out", "packets_in", "packets_out"):
            # each gateway carries one stream's data one way and its ACKs the other way
            assert b[name]["value"] > a[name]["value"] > 0, (gw, name, a[name], b[name])
            # the page shows the API's counters (which only grow), not something of its own
            assert b[name]["value"] <= api_gws[gw][name], (gw, name, b[name], api_gws[gw])
        for name in ("rate_in", "rate_out"):
            assert b[name]["value"] > 0 and b[name]["text"].endswith("bit/s"), (gw, b[name])
        assert b["bytes_in"]["text"].endswith("B"), b["bytes_in"]
        graph = second["graphs"][gw]
        assert graph["in_points"] >= 2 and graph["out_points"] >= 2, (gw, graph)
    lan = {t.GW_A_TUN4: t.LAN_A, t.GW_B_TUN4: t.LAN_B}
    for gw, net in lan.items():
        assert net in second["gateways"][gw]["networks"]["text"]
        assert {"network": net, "gateway": gw, "transport": "tls"} in second["routes"], second

    header = second["header"]
    assert header["version"] == api["status"]["version"]
    assert header["gateway-count"] == "2" and header["connections"] == "2", header
    assert "tls://0.0.0.0:443" in header["listeners"], header
    drops = api["status"]["drops"]
    assert sorted(second["drops"]) == sorted(drops), (second["drops"], drops)
    for reason, shown in second["drops"].items():
        assert shown["value"] <= drops[reason]
        assert shown["highlighted"] == (shown["value"] > 0)

    wrong = seen["wrong_token"]
    assert not wrong["form_hidden"] and "rejected" in wrong["token_error"], wrong
    assert not wrong["gateways"] and not wrong["stored_token"], wrong
    assert not seen["console"], seen["console"]

    assert png_size(png) == (WIDTH, HEIGHT)
    assert png.stat().st_size > 10_000  # a blank page compresses to far less
    if screenshot_to:
        shutil.copyfile(png, screenshot_to)


if __name__ == "__main__" and sys.argv[1:2] == ["--browse"]:
    browse(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]),
           Path(sys.argv[6]))
