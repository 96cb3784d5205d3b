"""Base for the daemons' counter sets, which are logged as one key=value line."""

from __future__ import annotations

from dataclasses import fields


class Counters:
    def summary(self, prefix: str = "") -> str:
        return " ".join(
            f"{prefix}{f.name}={getattr(self, f.name)}"
            for f in fields(self)  # type: ignore[arg-type]
        )
