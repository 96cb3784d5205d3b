"""The router's optional ``cluster`` section (polevpn.config.ClusterConfig): what loads, the
defaults, and errors that name file, field and problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_config import (
    assert_config_error,
    router_error,
    router_obj,
    write,
)

from polevpn import keygen
from polevpn.config import ClusterConfig, load_router_config
from polevpn.config.reloading import plan

PEER_KEY = "0123456789abcdef0123"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> keygen.KeygenResult:
    return keygen.generate(tmp_path_factory.mktemp("cluster-cfg") / "keys")


def cluster_obj(**changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "name": "office-net",
        "router_id": "r1",
        "etcd": {"endpoints": ["http://198.18.0.10:2379"]},
        "peer_address": "198.18.0.1:443",
        "peer_key": PEER_KEY,
    }
    obj.update(changes)
    return obj


def load(tmp_path: Path, keys: keygen.KeygenResult, cluster: Any) -> Path:
    return write(tmp_path / "config.json", router_obj(keys, cluster=cluster))


def test_no_cluster_section_means_none(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cfg = load_router_config(write(tmp_path / "config.json", router_obj(keys)))
    assert cfg.cluster is None


def test_minimal_cluster_and_defaults(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cfg = load_router_config(load(tmp_path, keys, cluster_obj()))
    c = cfg.cluster
    assert isinstance(c, ClusterConfig)
    assert (c.name, c.router_id) == ("office-net", "r1")
    assert c.etcd_endpoints == ("http://198.18.0.10:2379",)
    assert (c.etcd_username, c.etcd_password) == (None, None)
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == (None, None, None)
    assert c.prefix == "/polevpn"
    assert c.lease_ttl == 5
    assert c.peer_address == ("198.18.0.1", 443)
    assert c.peer_key == PEER_KEY
    assert c.peer_key_previous is None
    # secrets stay out of logs that print the config
    assert PEER_KEY not in repr(cfg)


def test_full_cluster(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    write(tmp_path / "peer.key", PEER_KEY[::-1] + "\n")
    obj = cluster_obj(
        etcd={
            "endpoints": ["https://198.18.0.10:2379", "https://[2001:db8::10]:2379/"],
            "username": "polevpn",
            "password": "s3cret-pw",
            "ca": str(keys.ca_cert),
            "cert": str(keys.server_cert),
            "key": str(keys.server_key),
            "prefix": "/vpn/prod/",
        },
        lease_ttl=10,
        peer_address="[2001:db8::1]:8443",
        peer_key=None,
        peer_key_file="peer.key",
        peer_key_previous=PEER_KEY,
    )
    c = load_router_config(load(tmp_path, keys, obj)).cluster
    assert c is not None
    assert c.etcd_endpoints == ("https://198.18.0.10:2379", "https://[2001:db8::10]:2379")
    assert (c.etcd_username, c.etcd_password) == ("polevpn", "s3cret-pw")
    assert (c.etcd_ca, c.etcd_cert, c.etcd_key) == (keys.ca_cert, keys.server_cert, keys.server_key)
    assert c.prefix == "/vpn/prod"
    assert c.lease_ttl == 10
    assert c.peer_address == ("2001:db8::1", 8443)
    assert c.peer_address_text == "[2001:db8::1]:8443"
    assert c.peer_key == PEER_KEY[::-1]
    assert c.peer_key_previous == PEER_KEY
    assert "s3cret-pw" not in repr(c)


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"name": None}, "cluster.name", ["missing"]),
        ({"name": "a/b"}, "cluster.name", ["A-Z"]),
        ({"router_id": "r" * 65}, "cluster.router_id", ["1-64"]),
        ({"router_id": ".."}, "cluster.router_id", ["1-64"]),
        ({"etcd": None}, "cluster.etcd", ["missing"]),
        ({"etcd": {}}, "cluster.etcd.endpoints", ["missing"]),
        ({"etcd": {"endpoints": []}}, "cluster.etcd.endpoints", ["empty"]),
        ({"etcd": {"endpoints": ["198.18.0.10:2379"]}}, "cluster.etcd.endpoints[0]", ["http"]),
        ({"etcd": {"endpoints": ["grpc://h:1"]}}, "cluster.etcd.endpoints[0]", ["http"]),
        ({"etcd": {"endpoints": ["http://h"]}}, "cluster.etcd.endpoints[0]", ["host:port"]),
        ({"etcd": {"endpoints": ["http://h:1/v3"]}}, "cluster.etcd.endpoints[0]", ["nothing"]),
        ({"etcd": {"endpoints": [5]}}, "cluster.etcd.endpoints[0]", ["URL"]),
        (
            {"etcd": {"endpoints": ["http://a:1", "https://b:1"]}},
            "cluster.etcd.endpoints",
            ["mixes"],
        ),
        (
            {"etcd": {"endpoints": ["http://a:1"], "username": "u"}},
            "cluster.etcd.password",
            ["missing"],
        ),
        (
            {"etcd": {"endpoints": ["http://a:1"], "prefix": "polevpn"}},
            "cluster.etcd.prefix",
            ["expected"],
        ),
        (
            {"etcd": {"endpoints": ["http://a:1"], "prefix": "/a b"}},
            "cluster.etcd.prefix",
            ["expected"],
        ),
        (
            {"etcd": {"endpoints": ["http://a:1"], "ca": "/nonexistent/ca.crt"}},
            "cluster.etcd.ca",
            ["cannot read"],
        ),
        ({"lease_ttl": 1}, "cluster.lease_ttl", ["outside"]),
        ({"lease_ttl": 61}, "cluster.lease_ttl", ["outside"]),
        ({"lease_ttl": 2.5}, "cluster.lease_ttl", ["whole"]),
        ({"peer_address": None}, "cluster.peer_address", ["missing"]),
        ({"peer_address": "198.18.0.1"}, "cluster.peer_address", ["host:port"]),
        ({"peer_address": ":443"}, "cluster.peer_address", ["dial"]),
        ({"peer_address": "198.18.0.1:0"}, "cluster.peer_address", ["dial"]),
        ({"peer_key": None}, "cluster.peer_key", ["missing", "16"]),
        ({"peer_key": "short"}, "cluster.peer_key", ["5 characters", "16"]),
        ({"peer_key": "x" * 15}, "cluster.peer_key", ["15 characters"]),
        ({"peer_key": "x" * 16 + " "}, "cluster.peer_key", ["printable"]),
        ({"peer_key_previous": "short"}, "cluster.peer_key_previous", ["16"]),
        ({"peer_key_file": "x.key"}, "cluster.peer_key", ["not both"]),
    ],
)
def test_cluster_errors_name_the_field(
    tmp_path: Path,
    keys: keygen.KeygenResult,
    changes: dict[str, Any],
    field: str,
    words: list[str],
) -> None:
    obj = {k: v for k, v in cluster_obj(**changes).items() if v is not None}
    path = load(tmp_path, keys, obj)
    assert_config_error(router_error(path), path, field, *words)


def test_cluster_tls_needs_https_and_a_tls_listener(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    obj = cluster_obj(etcd={"endpoints": ["http://a:1"], "ca": str(keys.ca_cert)})
    path = load(tmp_path, keys, obj)
    assert_config_error(router_error(path), path, "cluster.etcd.ca", "http://")
    # peers reach a router on its tls listener
    kcp = {
        "listen": "0.0.0.0:443",
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
    }
    path = write(
        tmp_path / "config.json",
        router_obj(keys, tls={"enable": False}, kcp=kcp, cluster=cluster_obj()),
    )
    assert_config_error(router_error(path), path, "cluster", "enable tls")


def test_cluster_not_an_object(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = load(tmp_path, keys, ["r1"])
    assert_config_error(router_error(path), path, "cluster", "object")


def test_cluster_secret_file_readable_by_others_warns(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    write(tmp_path / "peer.key", PEER_KEY, mode=0o644)
    obj = cluster_obj(peer_key=None, peer_key_file="peer.key")
    obj = {k: v for k, v in obj.items() if v is not None}
    cfg = load_router_config(load(tmp_path, keys, obj))
    assert any("peer.key" in w and "chmod 600" in w for w in cfg.warnings)


def test_reload_plan_applies_cluster_changes_and_hides_secrets(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    alone = load_router_config(write(tmp_path / "a.json", router_obj(keys)))
    joined = load_router_config(load(tmp_path, keys, cluster_obj()))
    rotated = load_router_config(
        load(tmp_path, keys, cluster_obj(peer_key="f" * 20, peer_key_previous=PEER_KEY))
    )
    p = plan(alone, joined)
    assert p.changed("cluster") and not p.needs_restart
    assert p.config.cluster == joined.cluster
    assert p.changes == ("cluster: joined office-net as r1",)
    p = plan(joined, rotated)
    assert p.changes == ("cluster: peer_key changed; peer_key_previous changed",)
    assert PEER_KEY not in " ".join(p.describe())
    p = plan(rotated, alone)
    assert p.changes == ("cluster: left",) and p.config.cluster is None
    moved = load_router_config(
        load(tmp_path, keys, cluster_obj(etcd={"endpoints": ["http://198.18.0.11:2379"]}))
    )
    assert plan(joined, moved).changes == (
        "cluster: etcd_endpoints http://198.18.0.10:2379 -> http://198.18.0.11:2379",
    )
