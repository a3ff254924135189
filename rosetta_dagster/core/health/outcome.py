"""What a check says: passed or not, how severe, the measured value and its threshold."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rosetta_dagster.core.pipeline_config import (
    TableRef,
)

Severity = Literal["WARN", "ERROR"]


@dataclass(frozen=True)
class KeyRange:
    """Where a table differs from its source, as a backfill can take it: the first key
    column's values from ``first`` through ``last`` (PostgreSQL's text of each); ``column``
    None: the whole table (one without a key)."""

    table: TableRef
    column: str | None
    first: str
    last: str

    def backfill_filter(self) -> list[dict[str, object]]:
        if self.column is None:
            return []
        return [{"column": self.column, "operator": "between", "value": [self.first, self.last]}]

    def command(self, pipeline: str) -> str:
        """The one command that requests the repair."""
        words = ["rosetta", "backfill", "request", pipeline, self.table.qualified]
        if self.column is not None:
            words += ["--key-range", self.column, self.first, self.last]
        return shlex.join(words)


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    severity: Severity  # how bad a failure is (meaningless when passed)
    description: str
    metadata: dict[str, float | int | str] = field(default_factory=dict)
    differing: KeyRange | None = None  # content_parity: the range to repair


def threshold_outcome(
    name: str, value: float, warning: float, critical: float, what: str,
    show: Callable[[float], str] = "{:g}".format,
) -> CheckOutcome:
    """Fails WARN above ``warning`` and ERROR above ``critical``. The description shows the
    figures with ``show`` (human units); the metadata keeps them numeric for the UI's plots."""
    metadata: dict[str, float | int | str] = {
        "value": value, "warning_threshold": warning, "critical_threshold": critical,
    }
    if value > critical:
        return CheckOutcome(name, False, "ERROR", f"{what} is {show(value)} (> {show(critical)}).",
                            metadata)
    if value > warning:
        return CheckOutcome(name, False, "WARN", f"{what} is {show(value)} (> {show(warning)}).",
                            metadata)
    return CheckOutcome(name, True, "WARN", f"{what} is {show(value)}.", metadata)
