"""Backfill jobs: re-copy (part of) a source table into every destination while streaming goes on.

Correctness against the concurrent stream follows DBLog (Netflix; Debezium's incremental
snapshots use the same idea). The whole protocol is in this package, in the order it runs:

1. ``chunk_copy`` (the backfill job, in its own run): for each chunk of primary keys, a *low
   watermark* is written into the WAL (``pg_logical_emit_message``, transactional) and the
   transactions in flight at that moment are waited for; the chunk is read from the source
   with ``COPY (SELECT ...) TO STDOUT`` and COPYed into a staging table (``staging``) in every
   destination; a *high watermark* is written.
2. ``window`` (the stream): the session sees both watermarks in commit order. Between them it
   records the keys of every change it applies to that table.
3. ``chunk_merge`` (the stream, at the high watermark): writes the staged rows that differ,
   deletes the destination rows in the chunk's key range (matching the job's filter) that the
   chunk does not have, both *except* the recorded keys (their streamed values are newer than
   the chunk's), and drops the chunk from staging, in one destination transaction.

A row updated or deleted while the chunk was read can therefore never be put back with an old
value or resurrected, and changes after the high watermark are applied after the chunk, as
usual. Rows move with COPY in and out and three set-wise statements per chunk.

A table without a key (REPLICA IDENTITY FULL, or inserts only) cannot be chunked: the whole
table is one chunk, read by every destination under one REPEATABLE READ snapshot whose
visibility the high watermark carries; the window keeps the table's changes themselves, and at
the high watermark each destination's rows become the chunk and the window's changes that
snapshot did not see are applied again (``window.ChunkWindows._replace``,
``DestinationWriter.replace_rows``).

Progress (``count_record``, the resume point) is written by the stream when it applies a chunk,
so a crashed backfill resumes after the last applied chunk. Backfills therefore need the
pipeline's stream to run (START).
"""

from rosetta_dagster.core.backfill.chunk_copy import (
    BackfillCancelled,
    BackfillError,
    BackfillResult,
    BackfillRunner,
    fail_abandoned_job,
    fetch_pending_jobs,
)

__all__ = [
    "BackfillCancelled",
    "BackfillError",
    "BackfillResult",
    "BackfillRunner",
    "fail_abandoned_job",
    "fetch_pending_jobs",
]
