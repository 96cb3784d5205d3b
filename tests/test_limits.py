"""Admission control: pending caps per source and in total, and the AUTH failure limit."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from polevpn.limits import (
    REFUSED_RATE,
    REFUSED_SOURCE,
    REFUSED_TOTAL,
    Admission,
    LimitParams,
    source_key,
)


@pytest.mark.parametrize(
    "host,key",
    [
        ("198.18.0.7", "198.18.0.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9%eth0", "2001:db8:1:2::/64"),
        ("::ffff:198.18.0.7", "198.18.0.7"),
        ("not an address", "not an address"),
    ],
)
def test_source_key(host: str, key: str) -> None:
    assert source_key(host) == key


def test_per_source_and_total_caps() -> None:
    adm = Admission(LimitParams(max_pending=4, max_pending_per_source=2))
    assert adm.admit("a", 0) is None
    assert adm.admit("a", 0) is None
    assert adm.admit("a", 0) == REFUSED_SOURCE
    assert adm.admit("b", 0) is None
    assert adm.admit("c", 0) is None
    assert adm.admit("d", 0) == REFUSED_TOTAL
    assert adm.pending == 4
    adm.release("a")
    assert adm.admit("d", 0) is None
    assert adm.stats.refused_pending == 1
    assert adm.stats.refused_pending_per_source == 1
    for s in ("a", "b", "c", "d"):
        adm.release(s)
    assert adm.pending == 0 and adm.by_source == {}
    # releasing what was never admitted changes nothing
    adm.release("zzz")
    assert adm.pending == 0


def test_auth_failures_block_a_source_for_the_window() -> None:
    adm = Admission(LimitParams(auth_failures=3, auth_failure_window=10))
    assert not adm.failure("a", 0)
    assert not adm.failure("a", 1)
    assert adm.failure("a", 2)  # the third one blocks
    assert adm.admit("a", 3) == REFUSED_RATE
    assert adm.admit("b", 3) is None
    # the first failure ages out at t=10: two left in the window, below the limit
    assert adm.admit("a", 10.5) is None
    assert adm.stats.refused_rate_limited == 1
    # and once all have aged out the source is forgotten
    assert not adm.blocked("a", 100)
    assert "a" not in adm.failures


def test_failure_table_is_bounded() -> None:
    adm = Admission(LimitParams(auth_failures=2, max_tracked_sources=100))
    for i in range(10_000):
        adm.failure(f"s{i}", 0)
    assert len(adm.failures) == 100
    # the newest are the ones kept
    assert "s9999" in adm.failures and "s0" not in adm.failures


@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "release", "fail"]), st.integers(0, 5)), max_size=200
    )
)
def test_counts_stay_consistent(ops) -> None:
    adm = Admission(LimitParams(max_pending=5, max_pending_per_source=3, auth_failures=2))
    held: dict[str, int] = {}
    t = 0.0
    for op, n in ops:
        src = f"s{n}"
        t += 1
        if op == "admit":
            if adm.admit(src, t) is None:
                held[src] = held.get(src, 0) + 1
        elif op == "release":
            adm.release(src)
            if held.get(src):
                held[src] -= 1
        else:
            adm.failure(src, t)
        assert adm.pending == sum(held.values()) <= 5
        assert all(v <= 3 for v in adm.by_source.values())
        assert {k: v for k, v in held.items() if v} == adm.by_source
