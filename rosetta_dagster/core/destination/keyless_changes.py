"""A batch of a table without a key, as a net count per row.

Without a key (replica identity FULL, or a table that replicates its inserts only), a table's
rows are a multiset: PostgreSQL's own subscriber applies an UPDATE or DELETE to **one** row
equal to the old row (every column), and duplicates stay duplicates. A batch's changes then
compose into one count per distinct row: +1 for each row inserted (or an UPDATE's new row),
-1 for each row removed (a DELETE's or an UPDATE's old row). The order inside the batch does
not matter for the result (a removal in the source's order always finds its row), so the
destination applies the counts set-wise: remove that many equal rows, insert that many copies.

A row is its COPY text line (every column's PostgreSQL text, NULL as ``\\N``), which is exact
and hashable. Pure Python: no database here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import ChangeEvent

RowLine = Callable[[Mapping[str, Any]], str]


class KeylessChangeError(RosettaError):
    """A change of a table without a key that cannot be applied exactly."""


class KeylessChanges:
    """The net count per row of one keyless table in one batch (rows in first-seen order)."""

    def __init__(self, row_line: RowLine, is_unchanged: Callable[[Any], bool],
                 table: str) -> None:
        self.row_line = row_line
        self.is_unchanged = is_unchanged
        self.table = table
        self.counts: dict[str, int] = {}
        self.events = 0
        self._previous: ChangeEvent | None = None

    def add(self, event: ChangeEvent) -> None:
        """The next change of the table, in stream order."""
        previous, self._previous = self._previous, event
        self.events += 1
        if event.op == "d":
            self._count(self._old_row(event), -1)
            return
        after = event.after or {}
        if event.op in ("c", "r"):
            self._count(after, +1)
            return
        before = self._old_row(event)
        # pgoutput delivers an UPDATE of a FULL table as a delete of the old row and the new
        # row, both at the UPDATE's position: the old row was removed once already.
        split = (previous is not None and previous.op == "d" and previous.lsn == event.lsn
                 and previous.before == event.before)
        if not split:
            self._count(before, -1)
        self._count(self._complete(after, before), +1)

    def _old_row(self, event: ChangeEvent) -> Mapping[str, Any]:
        if not event.before:
            raise KeylessChangeError(
                f"A change of {self.table}, which has no key, came without its old row, so "
                "the row it changes cannot be found; give the table REPLICA IDENTITY FULL.")
        return event.before

    def _complete(self, after: Mapping[str, Any], before: Mapping[str, Any]) -> Mapping[str, Any]:
        """The new row with the values it left out (unchanged TOAST) taken from the old row,
        which replica identity FULL carries whole."""
        is_unchanged = self.is_unchanged
        left_out = [name for name, value in after.items() if is_unchanged(value)]
        if not left_out:
            return after
        values = dict(after)
        for name in left_out:
            old = before.get(name)
            if old is not None and is_unchanged(old):
                raise KeylessChangeError(
                    f"An UPDATE of {self.table}, which has no key, left column {name} out "
                    "(an unchanged TOASTed value) and its old row does not hold it either.")
            values[name] = old
        return values

    def _count(self, row: Mapping[str, Any], delta: int) -> None:
        line = self.row_line(row)
        counts = self.counts
        net = counts.get(line, 0) + delta
        if net:
            counts[line] = net
        else:
            del counts[line]

    @property
    def removes_rows(self) -> bool:
        return any(count < 0 for count in self.counts.values())
