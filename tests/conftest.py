"""pytest's caplog shows records as the daemons write them: logfmt lines, fields included.

Without this, ``caplog.text`` would hold only the messages, and a field (a peer's address,
a key that must never be logged) would be invisible to the tests that look for it.
"""

from __future__ import annotations

import pytest

from polevpn.common.logfmt import LogfmtFormatter


@pytest.hookimpl(trylast=True)  # after pytest's own logging plugin exists
def pytest_configure(config: pytest.Config) -> None:
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is not None:
        plugin.caplog_handler.setFormatter(LogfmtFormatter())
