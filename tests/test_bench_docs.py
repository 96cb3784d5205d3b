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
