"""A streaming session: capture + apply to every destination + config-store bookkeeping.

Pure Python (no Dagster). The Dagster op creates a session, calls :meth:`StreamingSession.run`
and passes a ``tick`` callback for observations; the CLI does the same without Dagster. The
session does not know which capture engine runs: it talks to ``core.capture``'s interface.

* ``session`` - the run loop (its own thread): prepare, start and restart the capture,
  heartbeats, the pipeline's state;
* ``batches`` - the engine thread's side: batches in stream order, watermarks, fences,
  re-snapshot reconciliation, progress;
* ``load_handoff`` - the initial load and where the stream takes over;
* ``prestream`` - what is refused before anything is written, stale positions forgotten;
* ``fanout`` - one writer per destination, down destinations out of rotation;
* ``catalog_watch`` - columns added (or retyped) on the source without a change event;
* ``progress`` - counters for observations.

The backfill windows (DBLog) are in ``core.backfill.window``.
"""

from rosetta_dagster.core.streaming.progress import StreamProgress, TableProgress
from rosetta_dagster.core.streaming.session import StreamingSession

__all__ = ["StreamProgress", "StreamingSession", "TableProgress"]
