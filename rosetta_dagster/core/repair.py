"""A divergence found is a divergence repaired: the backfill of the key range content_parity
reports, requested once per range for pipelines with ``verification: {repair: true}``.

The check still fails (and notifies) on the evaluation that found it: a divergence is a bug to
report even when it is repaired. The same range is not requested again while a request for it
is under way or was made in the last day (a repair that did not help is for a person to look
at, not a loop of backfills).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from rosetta_dagster.core.config_store import BackfillJob, BackfillStatus, ConfigStore
from rosetta_dagster.core.health import KeyRange

logger = logging.getLogger("rosetta.repair")
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

REPEAT_AFTER = timedelta(days=1)


def request_repair(store: ConfigStore, pipeline: str, differing: KeyRange,
                   log: Log = logger) -> tuple[BackfillJob, bool]:
    """The backfill job that repairs ``differing``, and whether it was requested now (False:
    the same range was already requested)."""
    wanted = differing.backfill_filter()
    recent = datetime.now(UTC) - REPEAT_AFTER
    for job in store.list_backfill_jobs(pipeline=pipeline):
        if (job.table_name == differing.table.qualified and job.filter == wanted
                and job.status not in (BackfillStatus.FAILED, BackfillStatus.CANCELLED)
                and job.created_at >= recent):
            return job, False
    job = store.create_backfill_job(pipeline, differing.table.qualified, wanted)
    log.warning("Pipeline %s: %s differs from its source where %s is between %s and %s; "
                "backfill job %d requested to repair it (verification.repair)", pipeline,
                differing.table.qualified, differing.column, differing.first, differing.last,
                job.id)
    return job, True
