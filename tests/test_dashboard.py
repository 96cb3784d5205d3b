"""The router's web dashboard (polevpn/ops/web/index.html) in headless Chromium, end to end.

The first test runs the real daemons in network namespaces; the second an in-process router
with protocol-level gateways on loopback (test_api's ThreadedRouter), one of them
registering two links, and checks the link rows under that gateway's row.

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


def start_chromium(profile: Path):
    """Headless chromium at WIDTH x HEIGHT through chromium-driver; ``profile`` is a fresh
    directory, so even a killed browser leaves nothing behind."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
                f"--window-size={WIDTH},{HEIGHT}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "chromedriver"), options=opts
    )
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(10)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                            "mobile": False})
    return driver


def browse(url: str, out: Path, png: Path, hold: float, profile: Path) -> None:
    """Drive chromium against ``url`` (with its ``#token=``); write what the page showed.

    Runs in the router namespace, as this file's ``--browse`` mode; ``profile`` is a fresh
    directory under the test's tmp_path, so even a killed browser leaves nothing behind.
    """
    result: dict = {}
    driver = None
    try:
        try:
            driver = start_chromium(profile)
        except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
            result["skip"] = f"chromium did not start: {exc}".splitlines()[0]
            return
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


def _need_browser() -> None:
    pytest.importorskip("selenium", reason="selenium not installed (make venv)")
    for exe, pkg in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(exe) is None:
            pytest.skip(f"{exe} not found (Debian package {pkg}; make sysdeps)")


@pytest.mark.netns
@pytest.mark.skipif(not _ok, reason=_reason)
def test_dashboard_shows_live_gateways_routes_and_traffic(tmp_path):
    _need_browser()
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


# -- a multi-link gateway, on loopback

# every row of the gateways table: a gateway's (data-gateway) or a link's (data-link)
_ROWS_JS = r"""
const val = (c) => c.dataset.value === undefined || c.dataset.value === "" ? null
  : Number(c.dataset.value);
return [...document.querySelectorAll("#gateway-rows tr")].map((tr) => {
  const f = {};
  for (const c of tr.querySelectorAll("[data-field]")) {
    f[c.dataset.field] = {text: c.textContent, value: val(c)};
  }
  return {gateway: tr.dataset.gateway ?? null, link: tr.dataset.link ?? null,
          up: tr.dataset.up ?? null, backup: tr.dataset.backup ?? null,
          down: tr.classList.contains("down"), fields: f};
});
"""


def test_dashboard_shows_the_links_of_a_multi_link_gateway(tmp_path, monkeypatch):
    _need_browser()
    import test_router_loopback as loopback
    from test_api import TOKEN, ThreadedRouter, api_config, get, shut_down
    from test_metrics import Keepalive, flows_to, login_link, wait_until
    from test_router_loopback import ProtoGateway, frame, started_ops

    from polevpn.keygen import generate

    monkeypatch.setitem(loopback._transport, "mode", "tls")
    monkeypatch.setenv("SE_OFFLINE", "true")
    a_addr, b_addr = "169.254.0.1", "169.254.0.2"
    keys = generate(tmp_path / "keys")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    tr = ThreadedRouter()
    router, ops = tr.call(started_ops(api_config(keys)))
    port = ops.api.port
    gws: list = []
    alive: list = []
    driver = None

    async def site() -> dict:
        return (await get(port, f"/api/v1/gateways/{a_addr}"))[2]

    def rows_when(ready, what: str, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = driver.execute_script(_ROWS_JS)
            if ready(rows):
                return rows
            assert time.monotonic() < deadline, f"page never showed {what}: {rows}"
            time.sleep(0.2)

    try:

        async def setup() -> None:
            gb = await ProtoGateway.connect(router)
            gws.append(gb)
            await gb.login(b_addr, ["198.18.20.0/24"])
            for name, backup in (("v4", False), ("v6", True)):
                gw = await ProtoGateway.connect(router)
                gws.append(gw)
                await login_link(gw, a_addr, ["198.18.10.0/24"], name, backup=backup)
                alive.append(Keepalive(gw))
            to_a = flows_to("198.18.10", "198.18.20", 10)
            await gb.send(b"".join(frame(3, x) for x in to_a))
            await gws[2].send(b"".join(frame(3, x) for x in flows_to("198.18.20", "198.18.10", 4)))

            async def handled():
                g = await site()
                return g["packets_out"] == 10 and g["packets_in"] == 4

            # the counters are still from here on (heartbeats are not packets)
            await wait_until(handled, "the packets to and from A counted")

        tr.call(setup())
        try:
            driver = start_chromium(profile)
        except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
            pytest.skip(f"chromium did not start: {exc}".splitlines()[0])
        driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")

        def links_with_rates(rows: list[dict]) -> bool:
            links = [r for r in rows if r["link"]]
            return len(links) == 2 and all(r["fields"]["rate_in"]["value"] is not None
                                           for r in links)

        rows = rows_when(links_with_rates, "two links with rates")
        api = tr.call(site())
        # A's row, its links right under it by name, then B's
        order = [r["gateway"] or r["link"] for r in rows]
        assert order == [a_addr, f"{a_addr}/v4", f"{a_addr}/v6", b_addr], order
        row_a, v4, v6 = rows[0]["fields"], rows[1], rows[2]
        assert row_a["peer"]["text"] == "2 links, 2 up"
        assert driver.find_element("id", "link-count").text == "2 of 2"
        for name in ("packets_in", "packets_out", "bytes_in", "bytes_out"):
            assert row_a[name]["value"] == api[name], name
        for row, link in zip((v4, v6), api["links"], strict=True):
            f = row["fields"]
            assert row["up"] == "true" and not row["down"]
            assert f["link"]["text"].startswith(link["name"])
            assert f["peer"]["text"] == link["peer"] and f["transport"]["text"] == "tls"
            assert f["state"]["text"].startswith("up")
            assert f["rtt"]["text"].endswith(" ms")
            for name in ("packets_in", "packets_out", "bytes_in", "bytes_out"):
                assert f[name]["value"] == link[name], (link["name"], name)
        assert (v4["backup"], v6["backup"]) == ("false", "true")
        assert "backup" in v6["fields"] and "backup" not in v4["fields"]
        assert v6["fields"]["bytes_in"]["value"] > 0

        # v6 falls silent: its row says so, and A's counts one link up
        tr.call(alive[1].stop())

        def v6_down(rows: list[dict]) -> bool:
            return any(r["link"] == f"{a_addr}/v6" and r["up"] == "false" for r in rows)

        rows = rows_when(v6_down, "v6 down")
        v6 = next(r for r in rows if r["link"] == f"{a_addr}/v6")
        assert v6["down"] and v6["fields"]["state"]["text"].startswith("down")
        assert "1 down" in v6["fields"]["state"]["text"]
        assert rows[0]["fields"]["peer"]["text"] == "2 links, 1 up"
        assert driver.find_element("id", "link-count").text == "1 of 2"
        # for a human looking into a failure (the test's tmp_path)
        driver.save_screenshot(str(tmp_path / "links.png"))

        # a link that closes leaves the table
        gws[2].close()
        rows_when(lambda rows: [r["link"] for r in rows if r["link"]] == [f"{a_addr}/v4"],
                  "v6 gone")
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        shut_down(tr, router, alive, gws)


def test_dashboard_shows_the_cluster_panel(tmp_path, monkeypatch):
    """A router in a cluster whose etcd cannot be reached (nothing listens on the endpoint):
    the dashboard shows the cluster panel, its name and router id, and the store in warning
    colours with what went wrong; the same figures as /api/v1/cluster (issue 17)."""
    _need_browser()
    from test_api import TOKEN, ThreadedRouter, api_config, get, shut_down
    from test_router_loopback import started_ops

    from polevpn.config import ClusterConfig
    from polevpn.keygen import generate

    monkeypatch.setenv("SE_OFFLINE", "true")
    keys = generate(tmp_path / "keys")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    cluster = ClusterConfig(name="offices", router_id="r1",
                            etcd_endpoints=("http://127.0.0.1:9",),
                            peer_address=("127.0.0.1", 443), peer_key="k" * 24)
    tr = ThreadedRouter()
    router, ops = tr.call(started_ops(api_config(keys, cluster=cluster)))
    port = ops.api.port
    driver = None
    try:
        try:
            driver = start_chromium(profile)
        except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
            pytest.skip(f"chromium did not start: {exc}".splitlines()[0])
        driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")
        deadline = time.monotonic() + 20
        while True:
            shown = driver.execute_script(
                "const c = document.getElementById('cluster');"
                "return c && !c.hidden ? [document.getElementById('cluster-name').textContent,"
                " document.getElementById('cluster-store').textContent,"
                " document.getElementById('cluster-store').className] : null;")
            if shown and "store" in shown[1] and "connected" not in shown[1].split("(")[0]:
                break
            assert time.monotonic() < deadline, f"no cluster panel with its store: {shown}"
            time.sleep(0.2)
        name, store, cls = shown
        api = tr.call(get(port, "/api/v1/cluster"))[2]
        assert name == "offices / r1" == f"{api['name']} / {api['router_id']}"
        assert store.startswith(f"store {api['store']['state']}") and "warn" in cls
        assert "127.0.0.1:9" in store
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
        shut_down(tr, router, [], [])


def test_dashboard_shows_the_direct_panel(tmp_path, monkeypatch):
    """Two gateways with a direct pair, one of them reporting its path direct: the panel
    shows both sides of the pair as /api/v1/direct has them (issue 18)."""
    _need_browser()
    from test_api import TOKEN, ThreadedRouter, api_config, get, shut_down
    from test_direct_router import direct_pair
    from test_router_loopback import _transport, started_ops

    from polevpn.keygen import generate

    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setitem(_transport, "mode", "tls")
    keys = generate(tmp_path / "keys")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    tr = ThreadedRouter()
    router, ops = tr.call(started_ops(api_config(keys)))
    pair: list = []
    port = ops.api.port
    driver = None
    try:
        pair = tr.call(direct_pair(router))
        try:
            driver = start_chromium(profile)
        except Exception as exc:  # noqa: BLE001 - any failure to start means: cannot test here
            pytest.skip(f"chromium did not start: {exc}".splitlines()[0])
        driver.get(f"http://127.0.0.1:{port}/#token={TOKEN}")
        deadline = time.monotonic() + 20
        while True:
            rows = driver.execute_script(
                "const d = document.getElementById('direct');"
                "return d && !d.hidden ? [...document.querySelectorAll('#direct-rows tr')]"
                ".map((tr) => [...tr.querySelectorAll('[data-field]')].map((c) => c.textContent))"
                " : null;")
            if rows and len(rows) == 2:
                break
            assert time.monotonic() < deadline, f"no direct panel with the pair: {rows}"
            time.sleep(0.2)
        api = tr.call(get(port, "/api/v1/direct"))[2]
        (p,) = api["pairs"]
        a, b = p["sides"]
        assert rows[0][:4] == [p["pair_id"][:8], a["gateway"], "direct", "none"]
        assert rows[0][4] == "4.2 ms" and rows[0][5] == a["endpoint"]
        assert rows[1][:4] == ["", b["gateway"], "relayed", "unreported"]
        summary = driver.find_element("id", "direct-summary").text
        assert summary == "1 pairs, 0 direct; 2 gateways with direct paths."
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()

        async def close() -> None:
            for g in pair:
                g.close()

        with contextlib.suppress(Exception):
            tr.call(close())
        shut_down(tr, router, [], [])


if __name__ == "__main__" and sys.argv[1:2] == ["--browse"]:
    browse(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]),
           Path(sys.argv[6]))

