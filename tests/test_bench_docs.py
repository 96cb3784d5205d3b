"""docs/benchmarks.{md,json} keep every part when one benchmark rewrites its own.

`make bench` rewrites the whole file and must carry over the sections of `make attack`
(tests/bench_attack.py) and `make soak`; `make attack` replaces only its own section and
its own JSON entries. No measuring here: the writers on a temporary copy.
"""

from __future__ import annotations

import json

import bench
import bench_attack
import soak

SOAK = f"{soak.SOAK_BEGIN}\n## Soak\n\nsoak figures\n{soak.SOAK_END}"


def attack_report(date: str) -> dict:
    return {
        "date": date, "command": "make attack", "git": "abc1234", "runs": 1, "seconds": 4,
        "machine": {"cpu": "cpu", "cores": 2, "kernel": "6", "python": "3.11"},
        "attacks": [], "failed_runs": [], "notes": [], "label": "",
    }


def bench_result() -> dict:
    return {"date": "bench-date", "git": "abc1234", "seconds": 10,
            "machine": {"cpu": "cpu", "cores": 2, "kernel": "6", "python": "3.11",
                        "iperf3": "iperf 3"}}


def test_attack_and_bench_keep_each_others_parts(tmp_path, monkeypatch):
    for mod in (bench, bench_attack, soak):
        monkeypatch.setattr(mod, "DOCS", tmp_path)
    md, js = tmp_path / "benchmarks.md", tmp_path / "benchmarks.json"
    md.write_text(f"# Benchmarks\n\nold throughput\n\n{SOAK}\n")
    js.write_text(json.dumps({"comparison": {"x": 1}}))

    bench_attack.write_docs(attack_report("before-date"), before=True)
    bench_attack.write_docs(attack_report("attack-date"))
    text = md.read_text()
    assert text.count(bench_attack.ATTACK_BEGIN) == 1
    assert "old throughput" in text and text.index("attack-date") < text.index(soak.SOAK_BEGIN)
    assert "### Before the fixes" in text and "before-date" in text
    data = json.loads(js.read_text())
    assert data["comparison"] == {"x": 1}
    assert data["attack"]["date"] == "attack-date"

    # a second `make attack` replaces its section in place, not a second copy
    bench_attack.write_docs(attack_report("attack-date-2"))
    text = md.read_text()
    assert text.count(bench_attack.ATTACK_BEGIN) == 1 and "attack-date-2" in text
    assert "attack-date\n" not in text and "attack-date," not in text

    # `make bench` rewrites the file from its own results and keeps both other sections
    bench.write_docs(bench_result())
    text = md.read_text()
    assert "old throughput" not in text
    assert text.count(bench_attack.ATTACK_BEGIN) == 1 and "attack-date-2" in text
    assert text.count(soak.SOAK_BEGIN) == 1 and "soak figures" in text
    data = json.loads(js.read_text())
    assert data["date"] == "bench-date"
    assert data["attack"]["date"] == "attack-date-2"
    assert data["attack_before"]["date"] == "before-date"


def test_bench_keeps_the_etcd_client_section(tmp_path, monkeypatch):
    """`make bench` rewrites benchmarks.md and carries `make bench-etcd`'s section over."""
    import bench_etcd

    for mod in (bench, bench_attack, soak, bench_etcd):
        monkeypatch.setattr(mod, "DOCS", tmp_path)
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nformer throughput\n")
    report = {
        "date": "etcd-date", "git": "abc1234", "etcd": "3.4.23", "python": "3.11",
        "results": [{"client": "json-gateway", "puts_per_s_txn": 123},
                    {"client": "aetcd", "puts_per_s_txn": 456}],
    }  # fmt: skip
    bench_etcd.write_docs(report)
    assert "| puts/s, 2000 keys, transactions of 128 | 123 | 456 |" in md.read_text()
    bench.write_docs(bench_result())
    text = md.read_text()
    assert text.count(bench_etcd.BEGIN) == 1 and "etcd-date" in text
    assert "former throughput" not in text
    assert bench.ETCD_BEGIN == bench_etcd.BEGIN and bench.ETCD_END == bench_etcd.END


def cluster_report(date: str) -> dict:
    """What tests/bench_cluster.py reports, with figures made up for the layout."""
    flow = {"mbit_s": 600.0, "retransmits": 3}
    return {
        "date": date, "command": "make cluster-bench", "git": "abc1234", "etcd": "3.4.23",
        "lease_ttl": 3, "mtu": 1400, "notes": ["a note on the run"], "errors": [],
        "machine": {"cpu": "cpu", "cores": 2, "kernel": "6", "python": "3.11"},
        "throughput": {"seconds": 10, "rows": [
            {"streams": 1, "same": {"mbit_s": 900.0}, "cross": {"mbit_s": 700.0},
             "ratio": 0.778}]},
        "aggregate": {"seconds": 10, "ratio": 1.5,
                      "one": {"AB": flow, "CD": flow, "total": 1200.0,
                              "cpu_pct": {"r1": 90, "r2": 0}},
                      "two": {"AB": flow, "CD": flow, "total": 1800.0,
                              "cpu_pct": {"r1": 60, "r2": 60}}},
        "failover": {"runs": [0.03, 0.05, None], "median": 0.04, "worst": None,
                     "ping_interval": 0.02, "lead": 1.5, "link_timeout": 1.0,
                     "link_heartbeat_interval": 0.25},
        "failover_hung": {"runs": [1.1], "median": 1.1, "worst": 1.1, "ping_interval": 0.02,
                          "lead": 1.5, "link_timeout": 1.0, "link_heartbeat_interval": 0.25},
        "scale": {"gateways": 2000, "rss_limit_mb": 150, "connect_s": 3.0,
                  "converge_s": 1.0, "etcd_keys": 4002, "received": 4000,
                  "rss_idle_mb": {"r1": 54, "r2": 54}, "hwm_mb": {"r1": 99, "r2": 98}},
    }  # fmt: skip


def test_the_cluster_section_is_replaced_in_place_and_kept_by_bench(tmp_path, monkeypatch):
    """`make cluster-bench` writes its section (again in place, not a second copy), and
    `make bench` rewrites benchmarks.md and carries it over."""
    import bench_cluster

    for mod in (bench, bench_attack, soak, bench_cluster):
        monkeypatch.setattr(mod, "DOCS", tmp_path)
    md = tmp_path / "benchmarks.md"
    md.write_text(f"# Benchmarks\n\nformer throughput\n\n{SOAK}\n")
    bench_cluster.write_docs(cluster_report("cluster-date"))
    bench_cluster.write_docs(cluster_report("cluster-date-2"))
    text = md.read_text()
    assert text.count(bench_cluster.BEGIN) == 1 and "cluster-date-2" in text
    assert "cluster-date," not in text and "former throughput" in text
    assert "| 1 | 900.0 | 700.0 | 0.78 |" in text
    assert "| one (r1) | 600.0 | 600.0 | 1200.0 | 90 % | 0 % |" in text
    assert "| SIGKILL | 0.03, 0.05, - | 0.04 | - |" in text
    assert "| SIGSTOP (hung) | 1.10 | 1.10 | 1.10 |" in text
    assert "| 3.0 | 1.0 | 4002 | 4000 of 4000 | 54 / 99 | 54 / 98 |" in text
    assert "a note on the run" in text
    assert json.loads((tmp_path / "cluster_bench.json").read_text())["date"] == "cluster-date-2"
    bench.write_docs(bench_result())
    text = md.read_text()
    assert "former throughput" not in text and text.count(soak.SOAK_BEGIN) == 1
    assert text.count(bench_cluster.BEGIN) == 1 and "cluster-date-2" in text
    assert (bench.CLUSTER_BEGIN, bench.CLUSTER_END) == (bench_cluster.BEGIN, bench_cluster.END)
