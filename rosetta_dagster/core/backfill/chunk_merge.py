"""Backfill, part 3 of the protocol: at a chunk's high watermark, one destination's rows in the
chunk's key range are made equal to the staged chunk, except the keys the stream changed inside
the window (see the package's docstring for the whole).

What the merge must do, on every kind of destination (``DestinationWriter.merge_chunk``):

* staged rows that differ from the destination's are written; identical ones are left alone;
* destination rows inside the chunk's bounds (``after < key <= through``; None = open) that
  match the job's filter but are not in the chunk are deleted; bounds None (unknown) deletes
  nothing;
* keys in ``excluded`` (changed by the stream inside the chunk's window) are not touched:
  their streamed state is newer than the chunk's;
* ``skip_all`` (the table was truncated inside the window) writes nothing;
* all of it in one destination transaction that also consumes the chunk from staging, so a
  replayed high watermark changes nothing (None: the chunk is not staged - applied already,
  or lost with the unlogged staging in a server crash).

PostgreSQL's merge is ``destination.postgres.staging.merge_chunk`` (statements:
``statements.chunk_merge_statements``).
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg2 import sql

from rosetta_dagster.core.destination import ChunkCounts, DestinationWriter, KeyBounds
from rosetta_dagster.core.pipeline_config import TableRef

logger = logging.getLogger("rosetta.apply")


def apply_chunk(
    writer: DestinationWriter,
    table: TableRef,
    job_id: int,
    chunk: int,
    *,
    excluded: set[tuple[Any, ...]],
    skip_all: bool = False,
    bounds: KeyBounds | None = None,
    row_filter: tuple[sql.Composable, list[Any]] = (sql.SQL("TRUE"), []),
) -> ChunkCounts | None:
    """Merge one staged chunk into one destination (see the module's docstring)."""
    counts = writer.merge_chunk(table, job_id, chunk, excluded=excluded, skip_all=skip_all,
                                bounds=bounds, row_filter=row_filter)
    if counts is not None:
        logger.info("Destination %s: backfill chunk %d of %s applied (%d inserted, %d updated, "
                    "%d deleted, %d keys left to the stream%s)", writer.name, chunk,
                    table.qualified, counts.inserted, counts.updated, counts.deleted,
                    len(excluded), ", table truncated meanwhile" if skip_all else "")
    return counts
