"""pytest's caplog shows records as the daemons write them: logfmt lines, fields included.

Without this, ``caplog.text`` would hold only the messages, and a field (a peer's address,
a key that must never be logged) would be invisible to the tests that look for it.

Tests marked ``bench`` (speed measurements: long, or varying too much for an assertion
in CI) are skipped unless the ``-m``
expression names them (``pytest -m bench tests/test_longhaul.py``), so `make test` stays short.
"""

from __future__ import annotations

import pytest

from polevpn.common.logfmt import LogfmtFormatter


@pytest.hookimpl(trylast=True)  # after pytest's own logging plugin exists
def pytest_configure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is not None:
        plugin.caplog_handler.setFormatter(LogfmtFormatter())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "bench" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="a speed measurement: run with -m bench")
    for item in items:
        if item.get_closest_marker("bench") is not None:
            item.add_marker(skip)
