"""A site's links at the router: replacing, adding, limits, and which link a packet takes."""

from __future__ import annotations

import pytest
from test_multipath import v4

from polevpn.router.sitelinks import MAX_LINKS, LinkInfo, SiteLinks, TooManyLinks

PLAIN = LinkInfo()


def test_a_plain_registration_replaces_the_whole_site() -> None:
    site: SiteLinks[str] = SiteLinks()
    assert site.register("c1", LinkInfo("isp1")) == []
    assert site.register("c2", LinkInfo("isp2")) == []
    assert sorted(site.register("c3", PLAIN)) == ["c1", "c2"]
    assert site.connections() == ["c3"]
    # and the reverse: named links push out a plain registration of the address
    assert site.register("c4", LinkInfo("isp1")) == ["c3"]
    assert site.connections() == ["c4"]


def test_a_reconnected_link_replaces_only_its_old_connection() -> None:
    site: SiteLinks[str] = SiteLinks()
    site.register("a1", LinkInfo("isp1"))
    site.register("b1", LinkInfo("isp2"))
    table = list(site.flows.table)
    assert site.register("a2", LinkInfo("isp1")) == ["a1"]
    assert sorted(site.connections()) == ["a2", "b1"]
    # the link kept its path: every flow is where it was
    assert site.flows.table == table


def test_the_same_connection_registering_again_keeps_its_place() -> None:
    site: SiteLinks[str] = SiteLinks()
    site.register("a", LinkInfo("isp1"))
    site.register("b", LinkInfo("isp2"))
    assert site.register("a", LinkInfo("isp1")) == []
    assert site.register("a", LinkInfo("renamed")) == []
    assert sorted(site.connections()) == ["a", "b"]


def test_link_limit_changes_nothing_when_hit() -> None:
    site: SiteLinks[int] = SiteLinks()
    for i in range(MAX_LINKS):
        site.register(i, LinkInfo(f"l{i}"))
    with pytest.raises(TooManyLinks):
        site.register(99, LinkInfo("one-too-many"))
    assert sorted(site.connections()) == list(range(MAX_LINKS))
    # replacing an existing link is still fine at the limit
    assert site.register(100, LinkInfo("l0")) == [0]


def test_names_seen_are_bounded() -> None:
    site: SiteLinks[str] = SiteLinks()
    for i in range(1000):
        site.register("c", LinkInfo(f"name{i}"))
    assert len(site._ids) <= 4 * MAX_LINKS and site.connections() == ["c"]


def test_packets_follow_flows_and_health() -> None:
    site: SiteLinks[str] = SiteLinks()
    site.register("a", LinkInfo("isp1"))
    assert site.pick(v4("198.18.10.2", "198.18.20.2")) == "a"
    site.register("b", LinkInfo("isp2", weight=3.0))
    site.register("z", LinkInfo("lte", backup=True))
    flows = [v4(f"198.18.10.{i % 200 + 1}", "198.18.20.2", sport=2000 + i) for i in range(2000)]
    picks = [site.pick(p) for p in flows]
    assert set(picks) == {"a", "b"} and picks.count("b") / len(picks) == pytest.approx(
        0.75, abs=0.05
    )
    assert [site.pick(p) for p in flows] == picks  # the same flow, the same link
    assert site.set_up("b", False)
    assert {site.pick(p) for p in flows} == {"a"}
    site.set_up("a", False)
    assert {site.pick(p) for p in flows} == {"z"}  # backup only now
    site.set_up("a", True)
    site.set_up("b", True)
    assert [site.pick(p) for p in flows] == picks
    assert not site.set_up("nobody", False)


def test_unregister() -> None:
    site: SiteLinks[str] = SiteLinks()
    site.register("a", LinkInfo("isp1"))
    site.register("b", LinkInfo("isp2"))
    assert not site.unregister("a")
    assert site.pick(v4("198.18.10.2", "198.18.20.2")) == "b"
    assert site.unregister("b") and site.pick(v4("198.18.10.2", "198.18.20.2")) is None
    assert site.connections() == []


def test_a_single_link_that_is_down_carries_nothing() -> None:
    site: SiteLinks[str] = SiteLinks()
    site.register("a", PLAIN)
    site.set_up("a", False)
    assert site.pick(v4("198.18.10.2", "198.18.20.2")) is None
