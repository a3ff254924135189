"""What the supervisor should do for one pipeline, decided from its desired status, its recent
streaming runs and its heartbeat. Pure Python: the Dagster sensor gathers the inputs and carries
out the decision.

- START: exactly one active run. A missing run is launched, unless the pipeline's recent runs
  failed, in which case the launch waits ``initial * 2**(failures-1)`` seconds (capped) after the
  last failure. A run that streamed ``restart_backoff_reset_seconds`` or longer resets the count.
- PAUSE: no active run; active ones are terminated.
- Launches are spread out: while ``max_starting_runs`` runs are still starting (launched, no
  heartbeat of their own yet), further launches wait for a later evaluation, so twenty
  pipelines started together do not share two cores twenty ways and all time out.
- A run that should have a process (starting, started, canceling) but whose heartbeat is older
  than ``heartbeat_timeout_seconds`` (or, before its first heartbeat, whose launch is older than
  ``run_start_timeout_seconds``) is dead (its process was killed without Dagster noticing): it is
  marked failed and counts as a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from rosetta_dagster.core.config_store import PipelineStatus
from rosetta_dagster.core.pipeline_config import OperationsSettings


class RunStatus(StrEnum):
    """The Dagster run statuses the supervisor distinguishes (same spelling as Dagster's)."""

    QUEUED = "QUEUED"
    NOT_STARTED = "NOT_STARTED"
    STARTING = "STARTING"
    STARTED = "STARTED"
    CANCELING = "CANCELING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    CANCELED = "CANCELED"
    MANAGED = "MANAGED"


ACTIVE_STATUSES = frozenset(
    {RunStatus.QUEUED, RunStatus.NOT_STARTED, RunStatus.STARTING, RunStatus.STARTED,
     RunStatus.CANCELING}
)


# Statuses in which a run has (or should long have) a process: stuck there without a heartbeat
# means the process is gone (killed, host lost, launch died half-way). QUEUED runs have none yet.
_MUST_HEARTBEAT = frozenset(
    {RunStatus.NOT_STARTED, RunStatus.STARTING, RunStatus.STARTED, RunStatus.CANCELING}
)


@dataclass(frozen=True)
class StreamRun:
    run_id: str
    status: RunStatus
    created_at: float  # epoch seconds
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class PipelineHealth:
    name: str
    status: PipelineStatus
    heartbeat_at: float | None  # epoch seconds of the last heartbeat
    heartbeat_run_id: str | None  # the run that wrote it


@dataclass
class SupervisorDecision:
    launch: bool = False
    terminate: list[str] = field(default_factory=list)
    dead: list[tuple[str, str]] = field(default_factory=list)  # (run id, reason)
    consecutive_failures: int = 0
    waiting_reason: str | None = None


def backoff_seconds(failures: int, operations: OperationsSettings) -> float:
    if failures <= 0:
        return 0.0
    delay = operations.restart_backoff_initial_seconds * 2 ** min(failures - 1, 30)
    return float(min(delay, operations.restart_backoff_max_seconds))


def decide(
    pipeline: PipelineHealth,
    runs: Sequence[StreamRun],
    now: float,
    operations: OperationsSettings,
) -> SupervisorDecision:
    """``runs``: the pipeline's recent streaming runs, newest first."""
    decision = SupervisorDecision()
    alive: list[StreamRun] = []
    history: list[StreamRun] = []
    for run in runs:
        if run.status in _MUST_HEARTBEAT and _heartbeat_is_stale(pipeline, run, now, operations):
            last = _last_sign_of_life(pipeline, run)
            reason = (
                f"Streaming run {run.run_id} of pipeline {pipeline.name} stopped heartbeating "
                f"({now - last:.0f}s since its last heartbeat; limit "
                f"{operations.heartbeat_timeout_seconds}s; Dagster still shows it "
                f"{run.status.value}): its process is gone."
            ) if _has_own_heartbeat(pipeline, run) else (
                f"Streaming run {run.run_id} of pipeline {pipeline.name} never heartbeat "
                f"({now - last:.0f}s since it was launched; limit "
                f"{operations.run_start_timeout_seconds}s; Dagster still shows it "
                f"{run.status.value}): its process is gone."
            )
            decision.dead.append((run.run_id, reason))
            history.append(StreamRun(run.run_id, RunStatus.FAILURE, run.created_at,
                                     run.started_at, now))
        elif run.status in ACTIVE_STATUSES:
            alive.append(run)
        else:
            history.append(run)

    if pipeline.status is PipelineStatus.PAUSE:
        decision.terminate = [r.run_id for r in alive if r.status is not RunStatus.CANCELING]
        return decision

    if alive:
        # Never more than one: keep the oldest, terminate any extra (the instance's tag
        # concurrency limit keeps extras queued, so this is a safety net).
        oldest_first = sorted(alive, key=lambda r: r.created_at)
        decision.terminate = [r.run_id for r in oldest_first[1:]
                              if r.status is not RunStatus.CANCELING]
        return decision

    failures, last_failure_end = _consecutive_failures(history, operations)
    decision.consecutive_failures = failures
    wait = backoff_seconds(failures, operations)
    ready_at = (last_failure_end or 0.0) + wait
    if failures and now < ready_at:
        decision.waiting_reason = (
            f"Pipeline {pipeline.name}: {failures} failed run(s) in a row; restarting in "
            f"{ready_at - now:.0f}s (backoff {wait:.0f}s)."
        )
        return decision
    decision.launch = True
    return decision


def _has_own_heartbeat(pipeline: PipelineHealth, run: StreamRun) -> bool:
    return pipeline.heartbeat_at is not None and pipeline.heartbeat_run_id == run.run_id


def _last_sign_of_life(pipeline: PipelineHealth, run: StreamRun) -> float:
    signs = [run.started_at or run.created_at]
    if _has_own_heartbeat(pipeline, run):
        signs.append(pipeline.heartbeat_at)  # type: ignore[arg-type]
    return max(signs)


def _heartbeat_is_stale(
    pipeline: PipelineHealth, run: StreamRun, now: float, operations: OperationsSettings
) -> bool:
    """A run that heartbeat is judged by ``heartbeat_timeout_seconds``; one that never did yet
    (its process still starting: many runs launched at once share the machine's cores) by
    ``run_start_timeout_seconds`` from its launch."""
    if _has_own_heartbeat(pipeline, run):
        return now - _last_sign_of_life(pipeline, run) > operations.heartbeat_timeout_seconds
    return now - _last_sign_of_life(pipeline, run) > operations.run_start_timeout_seconds


def _consecutive_failures(
    history: Sequence[StreamRun], operations: OperationsSettings
) -> tuple[int, float | None]:
    failures = 0
    last_end: float | None = None
    for run in sorted(history, key=lambda r: r.created_at, reverse=True):
        if run.status is not RunStatus.FAILURE:
            break
        duration = (run.ended_at or run.created_at) - (run.started_at or run.created_at)
        if duration >= operations.restart_backoff_reset_seconds:
            break
        if last_end is None:
            last_end = run.ended_at or run.created_at
        failures += 1
    return failures, last_end


def is_starting(pipeline: PipelineHealth, run: StreamRun) -> bool:
    """Launched but not yet heartbeating (its process is still starting up)."""
    return run.status in ACTIVE_STATUSES and run.status is not RunStatus.CANCELING and (
        not _has_own_heartbeat(pipeline, run))


def launch_budget(starting: int, operations: OperationsSettings) -> int:
    """How many more runs may be launched now, with ``starting`` runs still starting."""
    return max(0, operations.max_starting_runs - starting)
