"""Base for the daemons' counter sets, which are logged as one key=value line."""

from __future__ import annotations

from dataclasses import fields


class Counters:
    def summary(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))  # type: ignore[arg-type]
