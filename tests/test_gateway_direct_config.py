"""The gateway's `direct` setting (issue 18): what loads, and errors that name file, field
and problem (the CLI exits 2 on them, as on every ConfigError)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
from test_config import assert_config_error, gateway_error, gateway_obj, write

from polevpn import keygen
from polevpn.config import DirectConfig, load_gateway_config
from polevpn.config.reloading import plan


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> keygen.KeygenResult:
    return keygen.generate(tmp_path_factory.mktemp("cfg-direct") / "keys")


def _load(tmp_path: Path, keys: keygen.KeygenResult, direct: Any) -> DirectConfig:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, direct=direct))
    return load_gateway_config(path).direct


def test_default_is_on_with_an_ephemeral_port(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys))
    assert load_gateway_config(path).direct == DirectConfig(True, 0, ())


@pytest.mark.parametrize("value", [True, False])
def test_boolean_form(tmp_path: Path, keys: keygen.KeygenResult, value: bool) -> None:
    assert _load(tmp_path, keys, value) == DirectConfig(enable=value)


def test_object_form(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    got = _load(
        tmp_path,
        keys,
        {"enable": True, "port": 40001, "candidates": ["198.18.1.2", " 2001:db8::2 "]},
    )
    assert got == DirectConfig(
        True,
        40001,
        (ipaddress.ip_address("198.18.1.2"), ipaddress.ip_address("2001:db8::2")),
    )
    # each key has its default
    assert _load(tmp_path, keys, {}) == DirectConfig()
    assert _load(tmp_path, keys, {"enable": False}) == DirectConfig(enable=False)


@pytest.mark.parametrize(
    "direct, field, words",
    [
        ("yes", "direct", ["true, false or an object"]),
        (1, "direct", ["true, false or an object"]),
        ({"enable": "yes"}, "direct.enable", ["true or false"]),
        ({"port": 70000}, "direct.port", ["outside 0..65535"]),
        ({"port": -1}, "direct.port", ["outside"]),
        ({"port": 1.5}, "direct.port", ["whole number"]),
        ({"candidates": "198.18.1.2"}, "direct.candidates", ["list of addresses"]),
        ({"candidates": [7]}, "direct.candidates[0]", ["address string"]),
        ({"candidates": ["198.18.1.0/24"]}, "direct.candidates[0]", ["not an IP address"]),
        ({"candidates": ["0.0.0.0"]}, "direct.candidates[0]", ["cannot be reached"]),
        ({"candidates": ["127.0.0.1"]}, "direct.candidates[0]", ["cannot be reached"]),
        ({"candidates": ["::ffff:198.18.1.2"]}, "direct.candidates[0]", ["IPv4-mapped"]),
        (
            {"candidates": ["198.18.1.2", "198.18.1.2"]},
            "direct.candidates[1]",
            ["listed twice"],
        ),
        ({"candidates": [f"198.18.1.{i}" for i in range(1, 10)]}, "direct.candidates", ["8"]),
        ({"prot": 1}, "direct.prot", ["unknown setting"]),
    ],
)
def test_errors_name_file_field_and_problem(
    tmp_path: Path, keys: keygen.KeygenResult, direct: Any, field: str, words: list[str]
) -> None:
    path = write(tmp_path / "gateway.json", gateway_obj(keys, direct=direct))
    assert_config_error(gateway_error(path), path, field, *words)


def test_a_reload_keeps_direct_until_a_restart(tmp_path: Path, keys: keygen.KeygenResult) -> None:
    """The direct socket is bound at start: a changed `direct` waits for a restart."""
    old = load_gateway_config(write(tmp_path / "a.json", gateway_obj(keys)))
    new = load_gateway_config(
        write(tmp_path / "b.json", gateway_obj(keys, direct={"enable": False}))
    )
    p = plan(old, new)
    assert p.config.direct == DirectConfig()
    assert "direct" in p.needs_restart
