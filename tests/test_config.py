"""Router and gateway configuration: what loads, and errors that name file, field and problem."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from polevpn import cli, keygen
from polevpn.config import (
    ConfigError,
    GatewayConfig,
    RouterConfig,
    load_gateway_config,
    load_router_config,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> keygen.KeygenResult:
    # RSA generation is the slow part: one set for the whole module
    return keygen.generate(tmp_path_factory.mktemp("cfg") / "keys")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> keygen.KeygenResult:
    return keygen.generate(tmp_path_factory.mktemp("cfg-other") / "keys")


def write(path: Path, obj: Any, mode: int = 0o600) -> Path:
    """Config files are written private: most hold a key inline, as PoleVPN's do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
    path.chmod(mode)
    return path


def router_obj(keys: keygen.KeygenResult, **changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "tls": {
            "listen": "0.0.0.0:443",
            "enable": True,
            "cert_file": str(keys.server_cert),
            "key_file": str(keys.server_key),
        },
        "key": "123456",
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not _DROP}


def gateway_obj(keys: keygen.KeygenResult, **changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "route_server": "tls://198.19.0.1:443",
        "key": "123456",
        "gateway": "169.254.0.1",
        "ca_file": str(keys.ca_cert),
        "local_networks": ["198.18.10.0/24"],
        "route_networks": ["198.18.20.0/24"],
        "acls": ["198.18.20.0/24", "169.254.0.0/16"],
    }
    obj.update(changes)
    return {k: v for k, v in obj.items() if v is not _DROP}


_DROP = object()


def assert_config_error(exc: ConfigError, path: Path, field: str, *words: str) -> None:
    text = str(exc)
    assert exc.field == field
    assert exc.path == str(path)
    assert str(path) in text
    assert field in text
    assert exc.problem
    assert exc.problem in text
    for w in words:
        assert w in exc.problem, (w, exc.problem)
    # one line, so it fits one log record
    assert "\n" not in text


def router_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_router_config(path)
    return info.value


def gateway_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    return info.value


# ---- valid configs ----------------------------------------------------------------------


def test_router_valid(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "config.json", router_obj(keys))
    cfg = load_router_config(path)
    assert isinstance(cfg, RouterConfig)
    assert cfg.path == path
    assert cfg.key == "123456"
    assert cfg.tls.enable
    assert (cfg.tls.host, cfg.tls.port) == ("0.0.0.0", 443)
    assert cfg.tls.address == "0.0.0.0:443"
    assert cfg.tls.cert_file == keys.server_cert
    assert not cfg.kcp.enable
    assert cfg.log_level == "info"


def test_router_key_file_relative_paths_ipv6_listen(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    # the layout of the shipped config.json: paths relative to the config's own directory
    conf_dir = tmp_path / "etc" / "polevpn"
    (conf_dir / "keys").mkdir(parents=True)
    for p in (keys.server_cert, keys.server_key, keys.shared_key):
        shutil.copy(p, conf_dir / "keys" / p.name)
    obj = {
        "tls": {
            "listen": "[::]:8443",
            "enable": True,
            "cert_file": "keys/server.crt",
            "key_file": "keys/server.key",
        },
        "kcp": {
            "listen": "0.0.0.0:443",
            "enable": False,
            "cert_file": "keys/server.crt",
            "key_file": "keys/server.key",
        },
        "key_file": "keys/shared.key",
        "idle_timeout": 90,
        "auth_timeout": 5,
        "log_level": "DEBUG",
    }
    path = write(conf_dir / "config.json", obj)
    cfg = load_router_config(path)
    assert cfg.key == keys.shared_key.read_text().strip()
    assert len(cfg.key) == 64
    assert cfg.tls.cert_file == conf_dir / "keys" / "server.crt"
    assert cfg.tls.key_file == conf_dir / "keys" / "server.key"
    assert (cfg.tls.host, cfg.tls.port) == ("::", 8443)
    assert cfg.tls.address == "[::]:8443"
    assert cfg.kcp.enable is False
    assert cfg.idle_timeout == 90.0
    assert cfg.auth_timeout == 5.0
    assert cfg.log_level == "debug"


def test_relative_paths_do_not_depend_on_cwd(
    tmp_path: Path, keys: keygen.KeygenResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    (conf_dir / "k").mkdir(parents=True)
    shutil.copy(keys.server_cert, conf_dir / "k" / "s.crt")
    shutil.copy(keys.server_key, conf_dir / "k" / "s.key")
    obj = router_obj(keys)
    obj["tls"].update(cert_file="k/s.crt", key_file="k/s.key")
    path = write(conf_dir / "router.json", obj)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_router_config(path)
    assert cfg.tls.cert_file == conf_dir / "k" / "s.crt"


def test_gateway_valid(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(
        keys,
        gateway6="2001:db8:ff::1",
        local_networks=["198.18.10.0/24", "2001:db8:10::/64"],
        route_networks=["198.18.20.0/24", "2001:db8:20::/64"],
        acls=["198.18.20.0/24", "2001:db8:20::/64", "169.254.0.0/16"],
        server_name="polevpn-router",
        mtu=1400,
    )
    path = write(tmp_path / "gateway.json", obj)
    cfg = load_gateway_config(path)
    assert isinstance(cfg, GatewayConfig)
    assert cfg.route_server.scheme == "tls"
    assert (cfg.route_server.host, cfg.route_server.port) == ("198.19.0.1", 443)
    assert cfg.gateway == ipaddress.IPv4Address("169.254.0.1")
    assert cfg.gateway6 == ipaddress.IPv6Address("2001:db8:ff::1")
    assert cfg.local_networks == (
        ipaddress.ip_network("198.18.10.0/24"),
        ipaddress.ip_network("2001:db8:10::/64"),
    )
    # REGISTER only has an IPv4 gateway field: the IPv6 one is announced as a host route
    assert cfg.announced == ["198.18.10.0/24", "2001:db8:10::/64", "2001:db8:ff::1/128"]
    assert [str(n) for n in cfg.route_networks] == ["198.18.20.0/24", "2001:db8:20::/64"]
    assert len(cfg.acls) == 3
    assert cfg.ca_file == keys.ca_cert
    assert cfg.server_name == "polevpn-router"
    assert cfg.mtu == 1400
    assert cfg.key == "123456"
    assert cfg.warnings == ()


def test_gateway_key_file_and_relative_ca(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    # like gateway/gateway-b.json: paths that climb out of the config's directory
    shutil.copytree(keys.out_dir, tmp_path / "keys")
    obj = gateway_obj(keys, ca_file="../keys/ca.crt", key="", key_file="../keys/shared.key")
    path = write(tmp_path / "gateway" / "gateway-b.json", obj)
    cfg = load_gateway_config(path)
    assert cfg.ca_file is not None
    assert cfg.ca_file.resolve() == (tmp_path / "keys" / "ca.crt").resolve()
    assert cfg.key == keys.shared_key.read_text().strip()


def test_gateway_network_as_single_string(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, local_networks="198.18.10.0/24", route_networks=" 198.18.0.0/15 ")
    cfg = load_gateway_config(write(tmp_path / "g.json", obj))
    assert cfg.local_networks == (ipaddress.ip_network("198.18.10.0/24"),)
    assert cfg.route_networks == (ipaddress.ip_network("198.18.0.0/15"),)


def test_gateway_cert_pin_forms(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    fp = keys.fingerprint
    colons = ":".join(fp[i : i + 2] for i in range(0, 64, 2)).upper()
    for pin in (fp, colons, "sha256/" + fp):
        obj = gateway_obj(keys, ca_file=_DROP, cert_pin=pin)
        cfg = load_gateway_config(write(tmp_path / "g.json", obj))
        assert cfg.cert_pin == bytes.fromhex(fp)
        assert cfg.ca_file is None


def test_gateway_insecure_warns(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, ca_file=_DROP, insecure_skip_verify=True, acls=[])
    cfg = load_gateway_config(write(tmp_path / "g.json", obj))
    assert cfg.insecure_skip_verify
    assert any("insecure_skip_verify" in w for w in cfg.warnings)
    assert any("acls" in w for w in cfg.warnings)


def test_shipped_sample_configs_parse_shape(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    # the sample configs at the repository root, with their keys/ directory supplied here
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(keys.out_dir, tmp_path / "keys")
    for name, loader in (("config.json", load_router_config), ("gateway.json", None)):
        src = root / name
        if not src.exists():
            pytest.skip(f"{name} not present")
        dst = tmp_path / name
        shutil.copy(src, dst)
        if loader is not None:
            loader(dst)
        else:
            cfg = load_gateway_config(dst)
            assert cfg.gateway == ipaddress.IPv4Address("169.254.0.1")


# ---- errors: file level -----------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "config.json"
    assert_config_error(router_error(path), path, "(file)", "cannot read")
    assert_config_error(gateway_error(path), path, "(file)", "cannot read")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "config.json", '{\n  "key": "x",\n  oops\n}\n')
    exc = router_error(path)
    assert_config_error(exc, path, "(file)", "invalid JSON", "line 3", "column 3")
    exc = gateway_error(path)
    assert_config_error(exc, path, "(file)", "line 3", "column 3")


@pytest.mark.parametrize("text", ["[]", '"x"', "null", "42"])
def test_top_level_not_object(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "config.json", text)
    assert_config_error(router_error(path), path, "(file)", "object")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"key": "\xff\xfe"}')
    assert_config_error(router_error(path), path, "(file)")


def test_deeply_nested_json(tmp_path: Path) -> None:
    path = write(tmp_path / "config.json", '{"key":' + "[" * 100000 + "]" * 100000 + "}")
    assert_config_error(router_error(path), path, "(file)")


def test_cli_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe{}")
    assert cli.router_main([f"-configPath={path}"]) == 2
    assert str(path) in capsys.readouterr().err


def test_file_field_unknown_user_home(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["cert_file"] = "~no-such-user-polevpn/server.crt"
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.cert_file")


def test_file_field_with_nul(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["cert_file"] = "server\u0000.crt"
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.cert_file")


# ---- errors: router ---------------------------------------------------------------------


def test_router_missing_key(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    del obj["key"]
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "key", "missing")


def test_router_empty_key(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, key=""))
    assert_config_error(router_error(path), path, "key", "empty")


def test_router_key_file_unreadable(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys, key_file="missing/shared.key")
    path = write(tmp_path / "config.json", obj)
    exc = router_error(path)
    assert_config_error(exc, path, "key_file", "cannot read")
    # the resolved path, so the operator sees where it looked
    assert str(tmp_path / "missing" / "shared.key") in exc.problem


def test_router_key_file_empty(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    write(tmp_path / "empty.key", "\n")
    path = write(tmp_path / "config.json", router_obj(keys, key_file="empty.key"))
    assert_config_error(router_error(path), path, "key_file", "empty")


def test_router_cert_file_unreadable(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["cert_file"] = "no/such/server.crt"
    path = write(tmp_path / "config.json", obj)
    exc = router_error(path)
    assert_config_error(exc, path, "tls.cert_file", "cannot read")
    assert str(tmp_path / "no" / "such" / "server.crt") in exc.problem


def test_router_cert_file_is_a_directory(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["cert_file"] = str(tmp_path)
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.cert_file", "cannot read")


def test_router_cert_file_missing_field(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    del obj["tls"]["key_file"]
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.key_file", "missing")


def test_router_cert_key_mismatch(
    tmp_path: Path, keys: keygen.KeygenResult, other_keys: keygen.KeygenResult
) -> None:
    obj = router_obj(keys)
    obj["tls"]["key_file"] = str(other_keys.server_key)
    path = write(tmp_path / "config.json", obj)
    exc = router_error(path)
    assert_config_error(exc, path, "tls.cert_file", "cannot load")
    assert str(other_keys.server_key) in exc.problem


def test_router_cert_is_not_a_cert(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["cert_file"] = str(keys.shared_key)
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.cert_file", "cannot load")


@pytest.mark.parametrize(
    "listen", ["0.0.0.0", "0.0.0.0:http", "0.0.0.0:70000", "[::]", "[::]443", "router.lan:443"]
)
def test_router_bad_listen(tmp_path: Path, keys: keygen.KeygenResult, listen: str) -> None:
    obj = router_obj(keys)
    obj["tls"]["listen"] = listen
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.listen")


def test_router_no_listener_enabled(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["enable"] = False
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.enable", "kcp", "no listener")


def test_router_tls_enable_not_bool(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["tls"]["enable"] = "yes"
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls.enable", "true or false")


def test_router_tls_missing(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    del obj["tls"]
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "tls", "missing")


def test_router_log_level_unknown(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, log_level="verbose"))
    assert_config_error(router_error(path), path, "log_level", "'verbose'", "debug")


@pytest.mark.parametrize(
    ("field", "value", "word"),
    [
        ("idle_timeout", 0, "outside"),
        ("idle_timeout", "60", "number"),
        ("auth_timeout", True, "number"),
        ("send_queue_bytes", 100, "outside"),
        ("send_queue_bytes", 100000.5, "whole"),
    ],
)
def test_router_bad_numbers(
    tmp_path: Path, keys: keygen.KeygenResult, field: str, value: Any, word: str
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, **{field: value}))
    assert_config_error(router_error(path), path, field, word)


# ---- errors: gateway --------------------------------------------------------------------


def test_gateway_bad_cidr_index(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, local_networks=["198.18.10.0/24", "198.18.300.0/24"])
    path = write(tmp_path / "gateway.json", obj)
    exc = gateway_error(path)
    assert_config_error(exc, path, "local_networks[1]", "'198.18.300.0/24'", "CIDR")


def test_gateway_cidr_not_string(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, acls=["198.18.20.0/24", "169.254.0.0/16", 10])
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, "acls[2]", "CIDR")


def test_gateway_networks_not_list(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, route_networks={"a": "198.18.0.0/15"})
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, "route_networks", "list")


@pytest.mark.parametrize("gw", ["2001:db8::1", "169.254.0", "gateway.lan", ""])
def test_gateway_not_ipv4(tmp_path: Path, keys: keygen.KeygenResult, gw: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, gateway=gw))
    assert_config_error(gateway_error(path), path, "gateway", "IPv4")


def test_gateway_not_a_string(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, gateway=[169, 254, 0, 1]))
    assert_config_error(gateway_error(path), path, "gateway", "string")


def test_gateway6_not_ipv6(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, gateway6="169.254.0.1"))
    assert_config_error(gateway_error(path), path, "gateway6", "IPv6")


@pytest.mark.parametrize(
    "url", ["http://198.19.0.1:443", "198.19.0.1:443", "udp://198.19.0.1:443", "tcp://x:1"]
)
def test_route_server_bad_scheme(tmp_path: Path, keys: keygen.KeygenResult, url: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=url))
    exc = gateway_error(path)
    assert_config_error(exc, path, "route_server", "scheme")


@pytest.mark.parametrize("url", ["tls://198.19.0.1", "tls://198.19.0.1:", "tls://:443"])
def test_route_server_no_port_or_host(tmp_path: Path, keys: keygen.KeygenResult, url: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=url))
    assert_config_error(gateway_error(path), path, "route_server", "host:port")


def test_route_server_port_out_of_range(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server="tls://h:99999"))
    assert_config_error(gateway_error(path), path, "route_server")


def test_route_server_ipv6(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(
        tmp_path / "gateway.json", gateway_obj(keys, route_server="tls://[2001:db8::1]:443")
    )
    cfg = load_gateway_config(path)
    assert (cfg.route_server.host, cfg.route_server.port) == ("2001:db8::1", 443)


def test_route_server_kcp(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, route_server="kcp://198.19.0.1:443")
    cfg = load_gateway_config(write(tmp_path / "gateway.json", obj))
    assert cfg.route_server.scheme == "kcp"
    assert len(cfg.route_servers) == 1
    # PoleVPN's fast mode and our FEC defaults
    p = cfg.kcp_params
    assert (p.nodelay, p.interval, p.resend, p.no_congestion_window) == (True, 10, 2, True)
    assert (p.send_window, p.receive_window, p.dtls_mtu) == (512, 2048, 1400)
    assert (p.fec.mode, p.fec.data_shards, p.fec.parity_shards) == ("adaptive", 10, 3)
    assert p.fec.group_timeout == pytest.approx(0.020)
    assert p.unordered == "light"


@pytest.mark.parametrize(
    "value,mode", [(True, "all"), (False, "off"), ("all", "all"), ("light", "light"),
                   ("off", "off")]
)
def test_kcp_unordered(
    tmp_path: Path, keys: keygen.KeygenResult, value: object, mode: str
) -> None:
    obj = gateway_obj(keys, route_server="kcp://198.19.0.1:443")
    obj["kcp"] = {"unordered": value}
    assert load_gateway_config(write(tmp_path / "gateway.json", obj)).kcp_params.unordered == mode
    robj = router_obj(keys)
    robj["kcp"] = dict(robj["tls"], listen="0.0.0.0:4443", unordered=value)
    assert load_router_config(write(tmp_path / "config.json", robj)).kcp_params.unordered == mode


def test_route_servers_in_order(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, route_server=_DROP)
    obj["route_servers"] = ["kcp://198.19.0.1:443", "tls://[2001:db8::1]:443"]
    obj["preferred_retry_interval"] = 5
    cfg = load_gateway_config(write(tmp_path / "gateway.json", obj))
    assert [s.scheme for s in cfg.route_servers] == ["kcp", "tls"]
    assert cfg.route_server.host == "198.19.0.1"
    assert cfg.route_servers[1].host == "2001:db8::1"
    assert cfg.preferred_retry_interval == 5.0


@pytest.mark.parametrize(
    "value,words",
    [
        ([], ["non-empty"]),
        (["tls://h:1", 5], ["route_servers[1]", "URL"]),
        (["udp://h:1"], ["route_servers[0]", "scheme"]),
    ],
)
def test_route_servers_bad(
    tmp_path: Path, keys: keygen.KeygenResult, value: object, words: list[str]
) -> None:
    obj = gateway_obj(keys, route_server=_DROP)
    obj["route_servers"] = value
    path = write(tmp_path / "gateway.json", obj)
    exc = gateway_error(path)
    text = str(exc)
    for w in words:
        assert w in text, (w, text)


def test_gateway_kcp_section(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, route_server="kcp://198.19.0.1:443")
    obj["kcp"] = {
        "interval": 20,
        "send_window": 256,
        "receive_window": 1024,
        "dtls_mtu": 1280,
        "fec": {"mode": "fixed", "data_shards": 8, "parity_shards": 2, "group_timeout_ms": 5},
    }
    cfg = load_gateway_config(write(tmp_path / "gateway.json", obj))
    p = cfg.kcp_params
    assert (p.interval, p.send_window, p.receive_window, p.dtls_mtu) == (20, 256, 1024, 1280)
    assert (p.fec.mode, p.fec.data_shards, p.fec.parity_shards) == ("fixed", 8, 2)
    assert p.fec.group_timeout == pytest.approx(0.005)
    assert p.fec.enabled


@pytest.mark.parametrize(
    "kcp,field,words",
    [
        ({"fec": {"mode": "always"}}, "kcp.fec.mode", ["not one of"]),
        ({"fec": {"mode": "fixed", "parity_shards": 0}}, "kcp.fec.parity_shards", ["fixed"]),
        ({"fec": {"data_shards": 0}}, "kcp.fec.data_shards", ["outside"]),
        ({"send_window": 1}, "kcp.send_window", ["outside"]),
        ({"dtls_mtu": "big"}, "kcp.dtls_mtu", ["number"]),
        ({"fec": []}, "kcp.fec", ["object"]),
        ({"unordered": "some"}, "kcp.unordered", ["light", "'some'"]),
        ({"unordered": 1}, "kcp.unordered", ["true, false"]),
    ],
)
def test_gateway_kcp_section_errors(
    tmp_path: Path, keys: keygen.KeygenResult, kcp: dict, field: str, words: list[str]
) -> None:
    obj = gateway_obj(keys, route_server="kcp://198.19.0.1:443")
    obj["kcp"] = kcp
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, field, *words)


def test_router_kcp_only(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["kcp"] = dict(obj["tls"], listen="0.0.0.0:4443", fec={"mode": "off"})
    obj["tls"]["enable"] = False
    cfg = load_router_config(write(tmp_path / "config.json", obj))
    assert cfg.kcp.enable and not cfg.tls.enable
    assert cfg.kcp.port == 4443
    assert not cfg.kcp_params.fec.enabled


@pytest.mark.parametrize("mtu", [0, 575, 65528, 100000, -1])
def test_mtu_out_of_range(tmp_path: Path, keys: keygen.KeygenResult, mtu: int) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, mtu=mtu))
    assert_config_error(gateway_error(path), path, "mtu", "outside", str(mtu))


@pytest.mark.parametrize("mtu", [576, 1400, 65527])
def test_mtu_in_range(tmp_path: Path, keys: keygen.KeygenResult, mtu: int) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, mtu=mtu))
    assert load_gateway_config(path).mtu == mtu


def test_mtu_not_whole(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, mtu=1400.5))
    assert_config_error(gateway_error(path), path, "mtu", "whole")


def test_gateway_log_level_unknown(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, log_level="trace"))
    assert_config_error(gateway_error(path), path, "log_level", "'trace'")


@pytest.mark.parametrize(
    ("interval", "timeout"), [(10, 10), (10, 5), (30, None), (None, 10), (None, 5)]
)
def test_heartbeat_timeout_not_longer_than_interval(
    tmp_path: Path, keys: keygen.KeygenResult, interval: Any, timeout: Any
) -> None:
    changes = {}
    if interval is not None:
        changes["heartbeat_interval"] = interval
    if timeout is not None:
        changes["heartbeat_timeout"] = timeout
    path = write(tmp_path / "gateway.json", gateway_obj(keys, **changes))
    assert_config_error(gateway_error(path), path, "heartbeat_timeout", "heartbeat_interval")


def test_heartbeat_timeout_longer_is_fine(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, heartbeat_interval=2, heartbeat_timeout=2.5)
    cfg = load_gateway_config(write(tmp_path / "gateway.json", obj))
    assert (cfg.heartbeat_interval, cfg.heartbeat_timeout) == (2.0, 2.5)


def test_reconnect_delays_ordered(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, reconnect_min_delay=5, reconnect_max_delay=1)
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, "reconnect_max_delay")


def test_no_verification_configured(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, ca_file=_DROP))
    exc = gateway_error(path)
    assert_config_error(exc, path, "ca_file", "cert_pin", "insecure_skip_verify")


def test_insecure_false_is_not_verification(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, ca_file=_DROP, insecure_skip_verify=False)
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, "ca_file")


@pytest.mark.parametrize(
    "pin",
    ["abc", "zz" * 32, "ab" * 31, "ab" * 33, "", "sha1/" + "ab" * 32],
)
def test_cert_pin_not_64_hex(tmp_path: Path, keys: keygen.KeygenResult, pin: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, ca_file=_DROP, cert_pin=pin))
    assert_config_error(gateway_error(path), path, "cert_pin", "64 hex")


def test_ca_file_unreadable(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, ca_file="keys/ca.crt"))
    exc = gateway_error(path)
    assert_config_error(exc, path, "ca_file", "cannot read")
    assert str(tmp_path / "keys" / "ca.crt") in exc.problem


def test_ca_file_not_a_certificate(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, ca_file=str(keys.shared_key)))
    assert_config_error(gateway_error(path), path, "ca_file", "cannot load")


@pytest.mark.parametrize("name", ["", "a" * 16, "tun/0", "tun 0"])
def test_bad_tun_name(tmp_path: Path, keys: keygen.KeygenResult, name: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, tun_name=name))
    assert_config_error(gateway_error(path), path, "tun_name")


def test_gateway_missing_key(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, key=_DROP))
    assert_config_error(gateway_error(path), path, "key", "missing")


def test_gateway_missing_route_server(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=_DROP))
    assert_config_error(gateway_error(path), path, "route_server", "missing")


# ---- command line -----------------------------------------------------------------------


def test_router_cli_missing_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.router_main(["-configPath=/nonexistent.json"]) == cli.EXIT_CONFIG == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert "/nonexistent.json" in lines[0]
    assert lines[0].startswith("polevpn-router:")


def test_gateway_cli_missing_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.gateway_main(["-config", "/nonexistent-gw.json"]) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    assert "/nonexistent-gw.json" in err
    assert err.startswith("polevpn-gateway:")


def _argv(form: str, path: Path) -> list[str]:
    if form.endswith("="):
        return [f"{form}{path}"]
    return [form, str(path)]


@pytest.mark.parametrize(
    "form", ["-configPath=", "-configPath", "-config", "-config=", "--config", "--config="]
)
def test_router_cli_config_flag_forms(
    tmp_path: Path, keys: keygen.KeygenResult, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    path = write(tmp_path / "bad-router.json", router_obj(keys, log_level="loud"))
    assert cli.router_main(_argv(form, path)) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    assert str(path) in err
    assert "log_level" in err
    assert "'loud'" in err


@pytest.mark.parametrize("form", ["-configPath=", "-config", "--config"])
def test_gateway_cli_config_flag_forms(
    tmp_path: Path, keys: keygen.KeygenResult, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    path = write(tmp_path / "bad-gateway.json", gateway_obj(keys, mtu=10))
    assert cli.gateway_main(_argv(form, path)) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1
    assert str(path) in err
    assert "mtu" in err


def test_router_cli_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no config.json here
    assert cli.router_main([]) == 2
    _, err = capsys.readouterr()
    assert "config.json" in err


def test_offload_and_super_packets_default_on_and_can_be_turned_off(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    assert load_router_config(write(tmp_path / "r.json", router_obj(keys))).super_packets
    off = write(tmp_path / "r-off.json", router_obj(keys, super_packets=False))
    assert not load_router_config(off).super_packets
    assert load_gateway_config(write(tmp_path / "g.json", gateway_obj(keys))).offload
    off = write(tmp_path / "g-off.json", gateway_obj(keys, offload=False))
    assert not load_gateway_config(off).offload
    err = gateway_error(write(tmp_path / "g-bad.json", gateway_obj(keys, offload="yes")))
    assert_config_error(err, tmp_path / "g-bad.json", "offload")


def test_malloc_tunables_for_the_environment() -> None:
    tuned = cli.MALLOC_TUNABLES
    assert tuned == "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=33554432"
    assert cli.malloc_tunables({}, "glibc") == tuned
    other = "glibc.malloc.tcache_count=0"
    assert cli.malloc_tunables({"GLIBC_TUNABLES": other}, "glibc") == f"{other}:{tuned}"
    # already there, the operator's own, or not glibc: run as we are (no loop of re-execs)
    assert cli.malloc_tunables({"GLIBC_TUNABLES": tuned}, "glibc") is None
    own = "glibc.malloc.mmap_threshold=131072"
    assert cli.malloc_tunables({"GLIBC_TUNABLES": own}, "glibc") is None
    assert cli.malloc_tunables({}, "musl") is None


def test_daemon_sets_malloc_tunables_in_its_own_environment(tmp_path: Path) -> None:
    """The console script starts itself again with GLIBC_TUNABLES (same PID); the process
    that ran it, like this test process, is not retuned."""
    import platform
    import subprocess

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("GLIBC_TUNABLES is glibc's")
    assert "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", "")
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)  # the daemon blocks reading its config: time to look at its environment
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    exe = Path(sys.executable).parent / "polevpn-router"
    proc = subprocess.Popen([str(exe), f"-configPath={fifo}"], env=env, stderr=subprocess.PIPE)
    try:
        environ = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b"GLIBC_TUNABLES=" not in environ:
            time.sleep(0.05)
            with contextlib.suppress(OSError):
                environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        # (glibc's own parsing may leave a NUL where the ':' was: it has read them)
        assert b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4194304" in environ
        assert b"glibc.malloc.trim_threshold=33554432" in environ
        fd = -1
        while fd < 0 and time.monotonic() < deadline:
            try:  # non-blocking: fails while the daemon has not opened it for reading
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.05)
        assert fd >= 0, "the daemon never read its config"
        os.write(fd, b"{")  # a broken config: exit status 2 as always
        os.close(fd)
        assert proc.wait(20) == cli.EXIT_CONFIG
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# ---- per-gateway credentials, limits, privileges, permissions -----------------------------

FP = "ab" * 32


def gateways_obj(tmp_path: Path) -> dict[str, Any]:
    write(tmp_path / "gw-b.key", "secret-b\n")
    colons = ":".join(FP[i : i + 2] for i in range(0, 64, 2))
    return {
        "169.254.0.1": {"key": "secret-a", "networks": ["198.18.10.0/24", "2001:db8:10::/64"]},
        "169.254.0.2": {
            "key_file": "gw-b.key",
            "cert_fingerprint": FP.upper(),
            "networks": "198.18.20.0/24",
        },
        "169.254.0.3": {"cert_fingerprint": "sha256/" + colons, "networks": []},
    }


def test_router_gateways_table(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(
        keys, key=_DROP, gateways=gateways_obj(tmp_path), client_ca_file=str(keys.ca_cert)
    )
    cfg = load_router_config(write(tmp_path / "config.json", obj))
    assert cfg.key is None
    by_addr = {str(g.gateway): g for g in cfg.gateways}
    assert by_addr["169.254.0.1"].key == "secret-a"
    assert [str(n) for n in by_addr["169.254.0.1"].networks] == [
        "198.18.10.0/24",
        "2001:db8:10::/64",
    ]
    assert by_addr["169.254.0.2"].key == "secret-b"
    assert by_addr["169.254.0.2"].cert_fingerprint == bytes.fromhex(FP)
    assert by_addr["169.254.0.3"].cert_fingerprint == bytes.fromhex(FP)
    assert by_addr["169.254.0.3"].key is None
    assert cfg.client_ca_file == keys.ca_cert
    assert not any("share" in w for w in cfg.warnings)
    auth = cfg.authority()
    assert auth.per_gateway and auth.shared_key is None


def test_router_shared_key_warns(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cfg = load_router_config(write(tmp_path / "c.json", router_obj(keys)))
    assert any("any holder of it may register any network" in w for w in cfg.warnings)
    obj = router_obj(
        keys,
        gateways={
            "169.254.0.1": {"key": "a", "networks": ["198.18.0.0/16"]},
            "169.254.0.2": {"key": "b", "networks": ["198.18.20.0/24"]},
        },
    )
    cfg = load_router_config(write(tmp_path / "d.json", obj))
    assert any("shared key is still accepted" in w for w in cfg.warnings)
    assert any("169.254.0.1 and 169.254.0.2 are both granted" in w for w in cfg.warnings)


@pytest.mark.parametrize(
    "table,field,words",
    [
        ({"nope": {"key": "k", "networks": []}}, "gateways.nope", ["not an IP address"]),
        ({"169.254.0.1": "k"}, "gateways.169.254.0.1", ["expected an object"]),
        (
            {"169.254.0.1": {"networks": []}},
            "gateways.169.254.0.1.key",
            ["key_file or cert_fingerprint"],
        ),
        ({"169.254.0.1": {"key": "k"}}, "gateways.169.254.0.1.networks", ["missing"]),
        (
            {"169.254.0.1": {"key": "k", "networks": ["x"]}},
            "gateways.169.254.0.1.networks[0]",
            ["not a valid CIDR"],
        ),
        ({"169.254.0.1": {"key": "", "networks": []}}, "gateways.169.254.0.1.key", ["empty"]),
        (
            {"169.254.0.1": {"cert_fingerprint": "abc", "networks": []}},
            "gateways.169.254.0.1.cert_fingerprint",
            ["64 hex digits"],
        ),
        (
            {"169.254.0.1": {"key_file": "missing.key", "networks": []}},
            "gateways.169.254.0.1.key_file",
            ["cannot read"],
        ),
        ([], "gateways", ["expected an object"]),
    ],
)
def test_router_gateways_errors(
    tmp_path: Path, keys: keygen.KeygenResult, table: Any, field: str, words: list[str]
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, gateways=table))
    assert_config_error(router_error(path), path, field, *words)


def test_router_fingerprints_need_the_client_ca(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    table = {"169.254.0.1": {"cert_fingerprint": FP, "networks": []}}
    path = write(tmp_path / "config.json", router_obj(keys, gateways=table))
    assert_config_error(router_error(path), path, "client_ca_file", "missing")
    path = write(
        tmp_path / "config.json",
        router_obj(keys, gateways=table, client_ca_file=str(keys.server_key)),
    )
    assert_config_error(router_error(path), path, "client_ca_file", "cannot load")


def test_router_no_key_and_no_table(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, key=_DROP, gateways={}))
    assert_config_error(router_error(path), path, "key", "missing")


def test_router_limits_and_user(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(
        keys,
        limits={
            "max_pending": 10,
            "max_pending_per_source": 2,
            "auth_failures": 4,
            "auth_failure_window": 30,
            "max_networks_per_gateway": 20,
            "max_prefix_lengths_per_gateway": 3,
            "max_pending_share_per_net": 0.5,
            "max_pending_share_per_site": 0.75,
            "reserved_share_known": 0.2,
            "known_source_ttl": 3600,
            "pre_tls_timeout": 2.5,
        },
        user="nobody",
        anti_spoofing=False,
    )
    cfg = load_router_config(write(tmp_path / "config.json", obj))
    assert (cfg.limits.max_pending, cfg.limits.max_pending_per_source) == (10, 2)
    assert (cfg.limits.auth_failures, cfg.limits.auth_failure_window) == (4, 30)
    assert cfg.limits.max_networks_per_gateway == 20
    assert cfg.limits.max_prefix_lengths_per_gateway == 3
    assert (cfg.limits.net_cap(), cfg.limits.site_cap(), cfg.limits.shared()) == (5, 8, 8)
    assert (cfg.limits.known_source_ttl, cfg.limits.pre_tls_timeout) == (3600, 2.5)
    assert cfg.user == "nobody"
    assert not cfg.anti_spoofing
    assert any("anti_spoofing is off" in w for w in cfg.warnings)
    default = load_router_config(write(tmp_path / "d.json", router_obj(keys)))
    assert default.anti_spoofing and default.user is None and default.auth_timeout == 5
    assert default.limits.max_networks_per_gateway == 256
    assert default.limits.max_prefix_lengths_per_gateway == 16


@pytest.mark.parametrize(
    "changes,field,words",
    [
        ({"limits": {"max_pending": 0}}, "limits.max_pending", ["outside"]),
        ({"limits": {"auth_failures": "3"}}, "limits.auth_failures", ["expected a number"]),
        ({"limits": 5}, "limits", ["expected an object"]),
        (
            {"limits": {"max_prefix_lengths_per_gateway": 0}},
            "limits.max_prefix_lengths_per_gateway",
            ["outside"],
        ),
        ({"limits": {"max_networks_per_gateway": 0}}, "limits.max_networks_per_gateway", []),
        ({"limits": {"reserved_share_known": 1}}, "limits.reserved_share_known", ["outside"]),
        ({"limits": {"pre_tls_timeout": 0}}, "limits.pre_tls_timeout", ["outside"]),
        ({"user": "no-such-user-here"}, "user", ["no such user"]),
        ({"user": "root"}, "user", ["is root"]),
        ({"anti_spoofing": "yes"}, "anti_spoofing", ["true or false"]),
    ],
)
def test_router_limits_errors(
    tmp_path: Path, keys: keygen.KeygenResult, changes: dict, field: str, words: list[str]
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, **changes))
    assert_config_error(router_error(path), path, field, *words)


def _kcp(keys: keygen.KeygenResult, **fields: Any) -> dict[str, Any]:
    return {
        "listen": "0.0.0.0:443",
        "cert_file": str(keys.server_cert),
        "key_file": str(keys.server_key),
        **fields,
    }


def test_router_kcp_handshake_limits(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    default = load_router_config(write(tmp_path / "d.json", router_obj(keys, kcp=_kcp(keys))))
    assert (default.kcp_handshakes.max_handshakes, default.kcp_handshakes.max_per_prefix) == (
        256,
        32,
    )
    obj = router_obj(keys, kcp=_kcp(keys, max_handshakes=64, max_handshakes_per_prefix=4))
    cfg = load_router_config(write(tmp_path / "c.json", obj))
    assert (cfg.kcp_handshakes.max_handshakes, cfg.kcp_handshakes.max_per_prefix) == (64, 4)
    # a small table: the per-prefix default follows it down
    obj = router_obj(keys, kcp=_kcp(keys, max_handshakes=8))
    assert load_router_config(write(tmp_path / "s.json", obj)).kcp_handshakes.max_per_prefix == 8


@pytest.mark.parametrize(
    "fields,field,words",
    [
        ({"max_handshakes": 0}, "kcp.max_handshakes", ["outside"]),
        ({"max_handshakes": 2.5}, "kcp.max_handshakes", ["whole number"]),
        ({"max_handshakes": "256"}, "kcp.max_handshakes", ["expected a number"]),
        (
            {"max_handshakes": 16, "max_handshakes_per_prefix": 17},
            "kcp.max_handshakes_per_prefix",
            ["outside"],
        ),
    ],
)
def test_router_kcp_handshake_limit_errors(
    tmp_path: Path, keys: keygen.KeygenResult, fields: dict, field: str, words: list[str]
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, kcp=_kcp(keys, **fields)))
    assert_config_error(router_error(path), path, field, *words)


def test_gateway_client_certificate(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cred = keygen.issue_gateways(
        keys.out_dir, ["169.254.0.7=198.18.70.0/24"], client_certs=True, days=1, force=True
    )[0]
    obj = gateway_obj(
        keys,
        key=_DROP,
        client_cert_file=str(cred.client_cert_file),
        client_key_file=str(cred.client_key_file),
    )
    cfg = load_gateway_config(write(tmp_path / "gw.json", obj))
    assert cfg.key == "" and cfg.client_cert_file == cred.client_cert_file
    # a certificate without its key, and a key that is not the certificate's
    path = write(
        tmp_path / "gw.json", gateway_obj(keys, client_cert_file=str(cred.client_cert_file))
    )
    assert_config_error(gateway_error(path), path, "client_key_file", "missing")
    path = write(
        tmp_path / "gw.json",
        gateway_obj(
            keys, client_cert_file=str(keys.server_cert), client_key_file=str(cred.client_key_file)
        ),
    )
    assert_config_error(gateway_error(path), path, "client_cert_file", "cannot load")


def test_loose_permissions_warn_and_name_the_file(
    tmp_path: Path, keys: keygen.KeygenResult
) -> None:
    key = write(tmp_path / "shared.key", "s3cret\n", mode=0o644)
    path = write(tmp_path / "config.json", router_obj(keys, key=_DROP, key_file=str(key)))
    cfg = load_router_config(path)
    loose = [w for w in cfg.warnings if "readable by group or others" in w]
    assert loose and str(key) in loose[0] and "0644" in loose[0]
    assert "s3cret" not in " ".join(cfg.warnings)
    # an inline key makes the config file itself a secret
    path = write(tmp_path / "gw.json", gateway_obj(keys), mode=0o640)
    cfg = load_gateway_config(path)
    assert any(str(path) in w and "0640" in w for w in cfg.warnings)
    key.chmod(0o600)
    path = write(tmp_path / "config.json", router_obj(keys, key=_DROP, key_file=str(key)))
    assert not [w for w in load_router_config(path).warnings if "readable" in w and "shared" in w]


def test_connect_timeout_default_and_cap(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cfg = load_gateway_config(write(tmp_path / "gw.json", gateway_obj(keys)))
    assert cfg.connect_timeout == 5.0
    obj = gateway_obj(keys, connect_timeout=30, heartbeat_interval=1, heartbeat_timeout=3)
    assert load_gateway_config(write(tmp_path / "gw.json", obj)).connect_timeout == 3.0
    path = write(tmp_path / "gw.json", gateway_obj(keys, connect_timeout=0))
    assert_config_error(gateway_error(path), path, "connect_timeout", "outside")


# ---- multi-link: "links" ------------------------------------------------------------------


def links_obj(keys: keygen.KeygenResult, links: Any, **changes: Any) -> dict[str, Any]:
    return gateway_obj(keys, **{"route_server": _DROP, "links": links, **changes})


def test_gateway_links(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    links = [
        {"name": "v4", "route_server": "tls://198.19.0.1:4433", "interface": "wan0", "weight": 1},
        {
            "name": "v6",
            "route_server": "kcp://[2001:db8:ff01::1]:4433",
            "bind": "2001:db8:ff01::2",
            "weight": 2.5,
            "backup": False,
        },
        {"name": "lte.backup", "route_server": "tls://198.19.1.1:443", "backup": True},
    ]
    obj = links_obj(keys, links, link_heartbeat_interval=0.1, link_timeout=0.5)
    cfg = load_gateway_config(write(tmp_path / "gateway.json", obj))
    assert cfg.multi_link
    assert [link.name for link in cfg.links] == ["v4", "v6", "lte.backup"]
    v4, v6, lte = cfg.links
    assert (v4.server.scheme, v4.server.host, v4.server.port) == ("tls", "198.19.0.1", 4433)
    assert (v4.interface, v4.bind, v4.weight, v4.backup) == ("wan0", None, 1.0, False)
    assert (v6.server.scheme, v6.server.host) == ("kcp", "2001:db8:ff01::1")
    assert (v6.bind, v6.interface, v6.weight, v6.backup) == ("2001:db8:ff01::2", None, 2.5, False)
    assert (lte.weight, lte.backup) == (1.0, True)
    # the route servers are the links' own, in order
    assert cfg.route_servers == (v4.server, v6.server, lte.server)
    assert cfg.route_server == v4.server
    assert (cfg.link_heartbeat_interval, cfg.link_timeout) == (0.1, 0.5)


def test_gateway_links_default_names_and_timing(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    links = [{"route_server": f"tls://198.19.0.{i}:443", "bind": f"198.18.0.{i}"} for i in (1, 2)]
    cfg = load_gateway_config(write(tmp_path / "gateway.json", links_obj(keys, links)))
    assert [link.name for link in cfg.links] == ["link1", "link2"]
    assert [link.bind for link in cfg.links] == ["198.18.0.1", "198.18.0.2"]
    assert (cfg.link_heartbeat_interval, cfg.link_timeout) == (0.25, 1.0)


def test_gateway_eight_links(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    links = [{"route_server": f"tls://198.19.0.{i}:443"} for i in range(1, 9)]
    cfg = load_gateway_config(write(tmp_path / "gateway.json", links_obj(keys, links)))
    assert len(cfg.links) == 8 and cfg.links[-1].name == "link8"


@pytest.mark.parametrize("backup", [False, True])
def test_gateway_one_link_is_plain(tmp_path: Path, keys: keygen.KeygenResult, backup: bool) -> None:
    links = [
        {
            "name": "only",
            "route_server": "kcp://198.19.0.1:443",
            "bind": "198.18.0.2",
            "interface": "wan0",
            "backup": backup,
        }
    ]
    cfg = load_gateway_config(write(tmp_path / "gateway.json", links_obj(keys, links)))
    # one link: no multi-link negotiation, but its bind and interface still apply
    assert not cfg.multi_link
    assert len(cfg.links) == 1
    assert (cfg.links[0].bind, cfg.links[0].interface) == ("198.18.0.2", "wan0")
    assert cfg.route_servers == (cfg.links[0].server,)
    assert cfg.route_server.scheme == "kcp"


def test_gateway_without_links(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    cfg = load_gateway_config(write(tmp_path / "gateway.json", gateway_obj(keys)))
    assert cfg.links == () and not cfg.multi_link
    assert (cfg.link_heartbeat_interval, cfg.link_timeout) == (0.25, 1.0)


_SERVER = "tls://198.19.0.1:443"


@pytest.mark.parametrize(
    "links,field,words",
    [
        ([], "links", ["non-empty"]),
        ("tls://198.19.0.1:443", "links", ["non-empty"]),
        ({"name": "v4", "route_server": _SERVER}, "links", ["non-empty"]),
        ([5], "links[0]", ["object", "int"]),
        ([{"route_server": _SERVER}, "v6"], "links[1]", ["object", "str"]),
        (
            [{"name": "v4", "route_server": _SERVER}, {"name": "v4", "route_server": _SERVER}],
            "links[1].name",
            ["'v4'", "another link"],
        ),
        # the second link's default name is the first one's explicit name
        (
            [{"name": "link2", "route_server": _SERVER}, {"route_server": _SERVER}],
            "links[1].name",
            ["'link2'", "another link"],
        ),
        ([{"name": "has space", "route_server": _SERVER}], "links[0].name", ["'has space'"]),
        ([{"name": "a" * 33, "route_server": _SERVER}], "links[0].name", ["1-32"]),
        ([{"name": "", "route_server": _SERVER}], "links[0].name", ["1-32"]),
        ([{"name": "v/4", "route_server": _SERVER}], "links[0].name", ["1-32"]),
        ([{"name": 4, "route_server": _SERVER}], "links[0].name", ["string"]),
        ([{"name": "v4"}], "links[0].route_server", ["missing"]),
        ([{"route_server": "udp://198.19.0.1:443"}], "links[0].route_server", ["scheme"]),
        ([{"route_server": "tls://198.19.0.1"}], "links[0].route_server", []),
        ([{"route_server": _SERVER, "bind": "wan0"}], "links[0].bind", ["not an IP address"]),
        (
            [{"route_server": _SERVER, "bind": "198.18.0.0/15"}],
            "links[0].bind",
            ["not an IP address"],
        ),
        ([{"route_server": _SERVER, "bind": 5}], "links[0].bind", ["string"]),
        (
            [{"route_server": _SERVER, "bind": "2001:db8:ff01::2"}],
            "links[0].bind",
            ["another address family"],
        ),
        (
            [{"route_server": "kcp://[2001:db8:ff01::1]:443", "bind": "198.18.0.2"}],
            "links[0].bind",
            ["another address family"],
        ),
        ([{"route_server": _SERVER, "interface": ""}], "links[0].interface", ["not a valid"]),
        ([{"route_server": _SERVER, "interface": "w" * 16}], "links[0].interface", ["valid"]),
        ([{"route_server": _SERVER, "interface": "wan/0"}], "links[0].interface", ["valid"]),
        ([{"route_server": _SERVER, "interface": "wan 0"}], "links[0].interface", ["valid"]),
        ([{"route_server": _SERVER, "weight": 0}], "links[0].weight", ["outside"]),
        ([{"route_server": _SERVER, "weight": 1001}], "links[0].weight", ["outside"]),
        ([{"route_server": _SERVER, "weight": -1}], "links[0].weight", ["outside"]),
        ([{"route_server": _SERVER, "weight": "2"}], "links[0].weight", ["number"]),
        ([{"route_server": _SERVER, "weight": True}], "links[0].weight", ["number"]),
        ([{"route_server": _SERVER, "backup": "yes"}], "links[0].backup", ["true or false"]),
        (
            [{"route_server": _SERVER, "backup": True}, {"route_server": _SERVER, "backup": True}],
            "links",
            ["every link is a backup"],
        ),
        ([{"route_server": _SERVER}] * 9, "links", ["9 links", "at most 8"]),
    ],
)
def test_gateway_links_errors(
    tmp_path: Path, keys: keygen.KeygenResult, links: Any, field: str, words: list[str]
) -> None:
    path = write(tmp_path / "gateway.json", links_obj(keys, links))
    assert_config_error(gateway_error(path), path, field, *words)


@pytest.mark.parametrize(
    "servers", [{"route_server": _SERVER}, {"route_servers": [_SERVER, "kcp://198.19.0.2:443"]}]
)
def test_gateway_links_and_route_server_is_an_error(
    tmp_path: Path, keys: keygen.KeygenResult, servers: dict[str, Any]
) -> None:
    links = [{"route_server": _SERVER}, {"route_server": "tls://198.19.0.2:443"}]
    path = write(tmp_path / "gateway.json", links_obj(keys, links, **servers))
    assert_config_error(gateway_error(path), path, "links", "not both")


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"link_heartbeat_interval": 1, "link_timeout": 1}, "link_timeout", ["longer"]),
        ({"link_heartbeat_interval": 2}, "link_timeout", ["link_heartbeat_interval"]),
        ({"link_timeout": 0.2}, "link_timeout", ["longer"]),
        ({"link_timeout": 0.05}, "link_timeout", ["outside"]),
        ({"link_timeout": 601}, "link_timeout", ["outside"]),
        ({"link_heartbeat_interval": 0.001}, "link_heartbeat_interval", ["outside"]),
        ({"link_heartbeat_interval": 61}, "link_heartbeat_interval", ["outside"]),
        ({"link_heartbeat_interval": "fast"}, "link_heartbeat_interval", ["number"]),
    ],
)
def test_gateway_link_timing_errors(
    tmp_path: Path, keys: keygen.KeygenResult, changes: dict[str, Any], field: str, words: list
) -> None:
    links = [{"route_server": _SERVER}, {"route_server": "tls://198.19.0.2:443"}]
    path = write(tmp_path / "gateway.json", links_obj(keys, links, **changes))
    assert_config_error(gateway_error(path), path, field, *words)


# ---- host names (issue 19 bug 10: an over-long label raised UnicodeError at connect) ------


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("a" * 64 + ".example", ["64 characters", "at most 63"]),
        ("router..example", ["empty label"]),
        ("router.example.", ["empty label"]),
        ("-router.example", ["'-router'", "hyphens"]),
        ("router example", ["'router example'"]),
        (("a" * 60 + ".") * 5 + "com", ["at most 253"]),
    ],
)
def test_server_name_must_be_a_host_name(
    tmp_path: Path, keys: keygen.KeygenResult, name: str, words: list[str]
) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, server_name=name))
    assert_config_error(gateway_error(path), path, "server_name", "valid host name", *words)


def test_route_server_host_must_be_a_host_name(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    url = f"kcp://{'r' * 70}.example:443"
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=url))
    assert_config_error(gateway_error(path), path, "route_server", "70 characters")
    links = [{"name": "v4", "route_server": url}]
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=_DROP, links=links))
    assert_config_error(gateway_error(path), path, "links[0].route_server", "70 characters")


@pytest.mark.parametrize(
    "name", ["polevpn-router", "router.example.com", "bücher.example", "polevpn_router", "r" * 63]
)
def test_server_name_host_names_taken(tmp_path: Path, keys: keygen.KeygenResult, name: str) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, server_name=name))
    assert load_gateway_config(path).server_name == name
    url = f"tls://{name}:443"
    path = write(tmp_path / "gateway.json", gateway_obj(keys, route_server=url))
    assert load_gateway_config(path).route_server.host == name.lower()


# ---- IPv6 needs an MTU of 1280 (issue 19 item 14) ------------------------------------------


def test_gateway6_needs_an_mtu_of_1280(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = gateway_obj(keys, gateway6="2001:db8:1::1", mtu=1279)
    path = write(tmp_path / "gateway.json", obj)
    assert_config_error(gateway_error(path), path, "mtu", "1279", "IPv6", "1280")
    obj = gateway_obj(keys, gateway6="2001:db8:1::1", mtu=1280)
    assert load_gateway_config(write(tmp_path / "gateway.json", obj)).mtu == 1280
    # IPv4 alone goes lower
    obj = gateway_obj(keys, mtu=1000)
    assert load_gateway_config(write(tmp_path / "gateway.json", obj)).mtu == 1000


# ---- tcp_congestion of the tls:// sockets (issue 16 item 3) ---------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    # null counts as absent, as for every field
    [(_DROP, None), (None, None), ("", ""), ("default", ""), ("bbr", "bbr"), ("my_cc2", "my_cc2")],
)
def test_tcp_congestion_parsed(
    tmp_path: Path, keys: keygen.KeygenResult, value: object, parsed: str | None
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, tcp_congestion=value))
    assert load_router_config(path).tcp_congestion == parsed
    path = write(tmp_path / "gateway.json", gateway_obj(keys, tcp_congestion=value))
    assert load_gateway_config(path).tcp_congestion == parsed


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("BBR", ["'BBR'", "a-z"]),
        ("bbr ", ["'bbr '"]),
        ("b-b-r", ["'b-b-r'"]),
        ("x" * 16, ["1-15"]),
        (1, ["expected a string"]),
    ],
)
def test_tcp_congestion_refused(
    tmp_path: Path, keys: keygen.KeygenResult, value: object, words: list[str]
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, tcp_congestion=value))
    assert_config_error(router_error(path), path, "tcp_congestion", *words)
    path = write(tmp_path / "gateway.json", gateway_obj(keys, tcp_congestion=value))
    assert_config_error(gateway_error(path), path, "tcp_congestion", *words)


def test_tcp_congestion_error_exits_2(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, tcp_congestion="Cubic"))
    assert cli.router_main(["-config", str(path)]) == cli.EXIT_CONFIG == 2
    path = write(tmp_path / "gateway.json", gateway_obj(keys, tcp_congestion="Cubic"))
    assert cli.gateway_main(["-config", str(path)]) == 2


def test_router_direct_section(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    """``direct``: on by default; an object, or a bare true/false; a grant's own flag."""
    from polevpn.config import RouterDirectConfig

    cfg = load_router_config(write(tmp_path / "a.json", router_obj(keys)))
    assert cfg.direct == RouterDirectConfig(True, 3600, 4096)
    obj = router_obj(keys, direct={"enable": True, "lifetime": 600, "max_pairs": 10})
    obj["gateways"] = {
        "169.254.0.1": {"key": "k-1", "networks": ["198.18.10.0/24"], "direct": False},
        "169.254.0.2": {"key": "k-2", "networks": ["198.18.20.0/24"]},
    }
    cfg = load_router_config(write(tmp_path / "b.json", obj))
    assert cfg.direct == RouterDirectConfig(True, 600, 10)
    assert [g.direct for g in cfg.gateways] == [False, True]
    cfg = load_router_config(write(tmp_path / "c.json", router_obj(keys, direct=False)))
    assert not cfg.direct.enable and str(cfg.direct) == "off"


@pytest.mark.parametrize(
    "value,field,words",
    [
        ({"lifetime": 10}, "direct.lifetime", ("outside",)),
        ({"lifetime": 100000}, "direct.lifetime", ("outside",)),
        ({"max_pairs": 0}, "direct.max_pairs", ("outside",)),
        ({"enable": "yes"}, "direct.enable", ("true or false",)),
        ({"port": 1}, "direct.port", ("unknown",)),
        ("on", "direct", ("true, false or an object",)),
    ],
)
def test_router_direct_errors(
    tmp_path: Path, keys: keygen.KeygenResult, value: Any, field: str, words: tuple[str, ...]
) -> None:
    path = write(tmp_path / "config.json", router_obj(keys, direct=value))
    assert_config_error(router_error(path), path, field, *words)


def test_router_grant_direct_must_be_a_boolean(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    obj = router_obj(keys)
    obj["gateways"] = {"169.254.0.1": {"key": "k", "networks": [], "direct": 1}}
    path = write(tmp_path / "config.json", obj)
    assert_config_error(router_error(path), path, "gateways.169.254.0.1.direct", "true or false")
