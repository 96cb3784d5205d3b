"""Base for the daemons' counter sets, which are logged as fields of one line."""

from __future__ import annotations

from dataclasses import fields


class Counters:
    def summary(self, prefix: str = "") -> str:
        return " ".join(f"{k}={v}" for k, v in self.fields(prefix).items())

    def fields(self, prefix: str = "") -> dict[str, object]:
        """The counters as log fields (``extra=kv(**c.fields())``), in declaration order."""
        return {
            f"{prefix}{f.name}": getattr(self, f.name)
            for f in fields(self)  # type: ignore[arg-type]
        }
