"""The pgoutput engine's stream position, kept in every destination with the data.

Each destination has a small table of Rosetta's own, ``<schema>._rosetta_positions``, with one
row per pipeline: the position the destination has committed (updated in the same transaction
as every batch) and the tables the stream covers with their load fences. Nothing is kept on
the host that runs the stream, so a stream can start on any machine and resume exactly.
"""

from __future__ import annotations

from psycopg2 import sql

from rosetta_dagster.core.capture import Log, StoredPosition
from rosetta_dagster.core.destination import destination_kind
from rosetta_dagster.core.load_fences import LoadState
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition
from rosetta_dagster.core.position_tracking import PositionTracking

POSITIONS_TABLE = "_rosetta_positions"


class DestinationPositions:
    """One position row per destination (kept by its kind: ``DestinationKind.position_row``);
    the stream resumes from the lowest."""

    def __init__(self, pipeline: PipelineDefinition) -> None:
        self.pipeline = pipeline
        self.rows = {d.name: destination_kind(d).position_row(pipeline, d)
                     for d in pipeline.destinations}

    @staticmethod
    def table(destination: Destination) -> sql.Identifier:
        return sql.Identifier(destination.schema, POSITIONS_TABLE)

    @property
    def location(self) -> str:
        return ", ".join(f"{d.name} ({d.schema}.{POSITIONS_TABLE})"
                         for d in self.pipeline.destinations)

    def read_each(self) -> dict[str, tuple[int, LoadState] | None]:
        """Each destination's committed position and load state (None where it has none)."""
        found: dict[str, tuple[int, LoadState] | None] = {}
        for name, row in self.rows.items():
            stored = row.read()
            found[name] = None if stored is None else (stored[0], LoadState.from_document(stored[1]))
        return found

    def prepare(self, log: Log) -> None:
        """Nothing to carry over: positions only ever live in the destinations."""

    def exists(self) -> bool:
        return any(found is not None for found in self.read_each().values())

    def read(self) -> StoredPosition | None:
        """The lowest destination position; None unless every destination has one (a load
        interrupted between destinations is loaded again)."""
        each = self.read_each()
        if any(found is None for found in each.values()):
            return None
        lowest = min((found for found in each.values() if found is not None), key=lambda f: f[0])
        return StoredPosition(lowest[0], lowest[1])

    def write_start(self, lsn: int, loads: LoadState) -> None:
        for row in self.rows.values():
            row.write_start(self.pipeline.slot_name, lsn, loads.document())

    def write_loads(self, loads: LoadState) -> None:
        for row in self.rows.values():
            row.write_loads(loads.document())

    def delete(self, log: Log) -> bool:
        log.warning("Deleting stale stream positions of pipeline %s in %s", self.pipeline.name,
                    self.location)
        deleted = False
        for row in self.rows.values():
            deleted = row.delete() or deleted
        log.warning("Deleted stale positions. The stream will start fresh with an initial load.")
        return deleted

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        """Only the lowest destination position is ever confirmed, so a slot past it was
        dropped and re-created (or advanced by hand): the changes in between are gone."""
        stored = self.read()
        if stored is None or slot_confirmed_lsn <= stored.position:
            return None
        return stored.position

    def tracking(self, destination: Destination) -> PositionTracking:
        return PositionTracking(self.pipeline.name, self.table(destination))

    def resumes_after(self) -> None:
        return None  # applies each change once: nothing is delivered again
