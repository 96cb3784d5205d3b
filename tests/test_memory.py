"""polevpn.host.memory: when the router gives freed heap back (TrimPolicy), and the call."""

from polevpn.host.memory import TrimPolicy, malloc_trim


def test_trims_once_the_live_count_falls_and_not_more_often_than_the_interval() -> None:
    p = TrimPolicy(interval=2.0)
    assert [p.due(n, 0.0) for n in (0, 5, 300)] == [False, False, False]  # growing
    assert p.due(250, 0.5)  # fell below its peak: trim
    assert not p.due(10, 1.0)  # fell further, but within the interval
    assert not p.due(10, 1.5)
    assert p.due(10, 2.6)  # still below the peak kept since the last trim
    assert not p.due(10, 5.0)  # nothing fell since: nothing to give back
    assert not p.due(40, 6.0) and p.due(0, 8.7)


def test_malloc_trim_runs_here() -> None:
    trim = malloc_trim()
    assert trim is not None  # the test machines run glibc
    assert trim() in (0, 1)
