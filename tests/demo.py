#!/usr/bin/env python3
"""`make demo`: two offices joined through a polevpn router, in five namespaces.

    hostA 198.18.10.2 -- gwA ==tls==> router 198.19.0.1/.5 <==tls== gwB -- hostB 198.18.20.2

The daemons are started from the repository's own sample configs:
``config.json`` (router), ``gateway.json`` (office A, in gwA) and
``gateway/gateway-b.json`` (office B, in gwB).  Keys come from ``keys/``
(created with polevpn-keygen if missing).  Everything the demo creates is
removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import topology as t

REPO = Path(__file__).resolve().parent.parent
ROUTER_CFG = REPO / "config.json"
GW_A_CFG = REPO / "gateway.json"
GW_B_CFG = REPO / "gateway" / "gateway-b.json"
KEYS = REPO / "keys"
KEY_FILES = ("ca.crt", "server.crt", "server.key", "shared.key")


def ensure_keys() -> None:
    if all((KEYS / f).is_file() for f in KEY_FILES):
        return
    print(f"keys/ incomplete: generating with polevpn-keygen --out {KEYS}")
    cmd = [sys.executable, "-m", "polevpn.keygen", "--out", str(KEYS),
           "--san", t.ROUTER_UL_A, "--san", t.ROUTER_UL_B]
    if (KEYS / "ca.crt").exists():
        cmd.append("--force")
    subprocess.run(cmd, check=True, timeout=120, stdout=subprocess.DEVNULL)


def step(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=20, help="TCP transfer size (default 20)")
    ap.add_argument("--keep-logs", action="store_true", help="print where the logs are kept")
    args = ap.parse_args()

    ok, reason = t.have_netns_support()
    if not ok:
        print(f"demo cannot run: {reason}", file=sys.stderr)
        return 2
    missing = [str(p.relative_to(REPO)) for p in (ROUTER_CFG, GW_A_CFG, GW_B_CFG)
               if not p.is_file()]
    if missing:
        print(f"demo cannot run: missing config file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    ensure_keys()

    results: list[tuple[str, bool, str]] = []
    rc = 1
    log_dir = Path(tempfile.mkdtemp(prefix="polevpn-demo-"))
    topo = t.Topology(log_dir=log_dir)
    try:
        step(f"building namespaces {topo.prefix}-{{hostA,gwA,router,gwB,hostB}}")
        topo.setup()

        step(f"router: polevpn-router -configPath={ROUTER_CFG.relative_to(REPO)}")
        router = t.start_router(topo, ROUTER_CFG)
        print("  ", t.find_log_line(router.log_path, "listening").strip())

        for node, cfg in (("gwA", GW_A_CFG), ("gwB", GW_B_CFG)):
            step(f"{node}: polevpn-gateway -configPath={cfg.relative_to(REPO)}")
            gw = t.start_gateway(topo, node, cfg)
            print("  ", t.find_log_line(gw.log_path, "registered").strip())

        waited = topo.wait_ping("hostA", t.HOST_B, deadline=15)
        print(f"\n   tunnel up (first ping answered after {waited or 0:.1f} s)"
              if waited is not None else "\n   tunnel NOT up after 15 s")

        step("routes installed by the gateways")
        for node in ("gwA", "gwB"):
            for fam in ("-4", "-6"):
                out = topo.run(node, ["ip", fam, "route", "show", "dev", "polevpn0"],
                               check=False).stdout.strip()
                for line in out.splitlines():
                    print(f"   {node}: {line}")

        step("ping across the tunnel (ping -c 3 -W 2)")
        for src, dst in (("hostA", t.HOST_B), ("hostB", t.HOST_A),
                         ("hostA", t.HOST_B6), ("hostB", t.HOST_A6)):
            res = topo.ping(src, dst, count=3, wait=2)
            summary = next((ln for ln in res.stdout.splitlines() if "packet loss" in ln), "")
            rtt = next((ln.split("=")[1].strip() for ln in res.stdout.splitlines()
                        if ln.startswith("rtt")), "-")
            passed = res.returncode == 0
            print(f"   {src:5} -> {dst:15} {'OK  ' if passed else 'FAIL'} {summary}; rtt {rtt}")
            results.append((f"ping {src} -> {dst}", passed, summary))

        size = args.size_mb * 1024 * 1024
        step(f"{args.size_mb} MB TCP transfer hostA -> hostB ({t.HOST_B}:5099)")
        try:
            x = topo.transfer("hostA", "hostB", t.HOST_B, size, timeout=120)
            print(f"   sent     {x['sent']['bytes']} bytes sha256 {x['sent']['sha256']}")
            print(f"   received {x['received']['bytes']} bytes sha256 {x['received']['sha256']}")
            print(f"   {'match' if x['ok'] else 'MISMATCH'}; {x['mbit_s']:.1f} Mbit/s "
                  f"({x['sent']['seconds']:.2f} s)")
            results.append((f"{args.size_mb} MB transfer SHA-256", x["ok"],
                            f"{x['mbit_s']:.1f} Mbit/s"))
        except (t.TopologyError, subprocess.TimeoutExpired, ValueError) as exc:
            print(f"   transfer FAILED: {exc}")
            results.append((f"{args.size_mb} MB transfer SHA-256", False, str(exc)[:80]))

        step("summary")
        for name, passed, detail in results:
            print(f"   [{'PASS' if passed else 'FAIL'}] {name}  {detail}")
        all_ok = all(p for _, p, _ in results)
        print(f"\n   demo {'succeeded' if all_ok else 'FAILED'}")
        if not all_ok:
            for path in sorted(log_dir.glob("*.log")):
                print(f"\n----- {path.name} -----\n{t.log_tail(path, 20)}")
        rc = 0 if all_ok else 1
        return rc
    except (t.TopologyError, subprocess.SubprocessError, OSError) as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        step("cleaning up (processes by PID, namespaces)")
        prefix = topo.prefix
        topo.teardown()
        time.sleep(0.1)
        left = t.leftover_namespaces(prefix)
        print(f"   namespaces left: {left or 'none'}")
        if args.keep_logs or rc != 0:
            print(f"   logs kept in {log_dir}")
        else:
            for path in log_dir.glob("*.log"):
                path.unlink()
            log_dir.rmdir()


if __name__ == "__main__":
    sys.exit(main())
