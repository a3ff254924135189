"""The fences of initial loads: which tables the stream covers, and for a table loaded while
the stream ran, which transactions its snapshot already contained (kept with the position, so
the stream skips exactly those; see ``core.initial_load``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rosetta_dagster.core.events import format_lsn
from rosetta_dagster.core.pipeline_config import TableRef

_XID_SPACE = 1 << 32


@dataclass(frozen=True)
class SnapshotVisibility:
    """Which transactions an exported snapshot sees (``pg_current_snapshot()`` under it)."""

    xmin: int
    xmax: int
    xip: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, text: str) -> SnapshotVisibility:
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))

    def __str__(self) -> str:
        return f"{self.xmin}:{self.xmax}:{','.join(str(x) for x in sorted(self.xip))}"

    def includes(self, xid: int) -> bool:
        """True when the committed transaction ``xid`` (32-bit, as in the WAL) is visible."""
        # Widen to the snapshot's 64-bit xid space: the transaction is within 2^31 of xmax
        # (either side), which fixes its epoch.
        full = (self.xmax & ~(_XID_SPACE - 1)) | (xid & (_XID_SPACE - 1))
        if full > self.xmax + _XID_SPACE // 2:
            full -= _XID_SPACE
        elif full < self.xmax - _XID_SPACE // 2:
            full += _XID_SPACE
        if full < self.xmin:
            return True
        return full < self.xmax and full not in self.xip


@dataclass(frozen=True)
class LoadFence:
    """A table's load: its rows are the snapshot's; the stream applies only later commits."""

    visibility: SnapshotVisibility
    consistent_lsn: int


@dataclass
class LoadState:
    """Which tables the stream covers and the fences of their loads (kept with the position).

    It is what tells a table added to the pipeline (not listed) from one the stream has
    covered since its load.
    """

    tables: dict[TableRef, LoadFence | None] = field(default_factory=dict)

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> LoadState:
        tables: dict[TableRef, LoadFence | None] = {}
        for name, fence in document.get("tables", {}).items():
            tables[TableRef.parse(name)] = None if fence is None else LoadFence(
                SnapshotVisibility.parse(fence["snapshot"]), int(fence["consistent_lsn"])
            )
        return cls(tables)

    def document(self) -> dict[str, Any]:
        return {"tables": {
            table.qualified: None if fence is None else {
                "snapshot": str(fence.visibility), "consistent_lsn": fence.consistent_lsn,
                "consistent_point": format_lsn(fence.consistent_lsn),
            }
            for table, fence in sorted(self.tables.items(), key=lambda item: item[0].qualified)
        }}

    def drop_passed_fences(self, stream_lsn: int | None) -> None:
        """A stream whose stored offset is at or past a load's consistent point can no longer
        deliver a transaction the load contained: the fence is no longer needed."""
        if stream_lsn is None:
            return
        for table, fence in self.tables.items():
            if fence is not None and fence.consistent_lsn <= stream_lsn:
                self.tables[table] = None
