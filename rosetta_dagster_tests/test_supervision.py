"""The supervisor's decisions (pure): one run per START pipeline, none per PAUSE, dead runs,
exponential backoff. The sensors carrying them out run against Dagster in test_operations."""

from __future__ import annotations

from rosetta_dagster.core.config_store import PipelineStatus
from rosetta_dagster.core.pipeline_config import OperationsSettings
from rosetta_dagster.core.supervision import (
    PipelineHealth,
    RunStatus,
    StreamRun,
    backoff_seconds,
    decide,
    is_starting,
    launch_budget,
)

OPS = OperationsSettings(heartbeat_timeout_seconds=60, restart_backoff_initial_seconds=10,
                         restart_backoff_max_seconds=80, restart_backoff_reset_seconds=300)
NOW = 1_000_000.0


def _health(status: PipelineStatus = PipelineStatus.START, heartbeat_at: float | None = None,
            run_id: str | None = None) -> PipelineHealth:
    return PipelineHealth("orders", status, heartbeat_at, run_id)


def _failed(run_id: str, ended_ago: float, lasted: float = 5.0) -> StreamRun:
    end = NOW - ended_ago
    return StreamRun(run_id, RunStatus.FAILURE, end - lasted - 1, end - lasted, end)


def test_start_without_a_run_launches_and_pause_terminates_every_active_run() -> None:
    assert decide(_health(), [], NOW, OPS).launch
    ended = StreamRun("old", RunStatus.CANCELED, NOW - 100, NOW - 99, NOW - 50)
    assert decide(_health(), [ended], NOW, OPS).launch

    queued = StreamRun("q", RunStatus.QUEUED, NOW - 1)
    canceling = StreamRun("c", RunStatus.CANCELING, NOW - 5, NOW - 4)
    paused = decide(_health(PipelineStatus.PAUSE), [queued, canceling], NOW, OPS)
    assert paused.terminate == ["q"] and not paused.launch


def test_never_a_second_run_while_one_is_queued_starting_or_running() -> None:
    for status in (RunStatus.QUEUED, RunStatus.NOT_STARTED, RunStatus.STARTING,
                   RunStatus.STARTED, RunStatus.CANCELING):
        run = StreamRun("r", status, NOW - 5, NOW - 4)
        decision = decide(_health(heartbeat_at=NOW - 1, run_id="r"), [run], NOW, OPS)
        assert not decision.launch and not decision.terminate and not decision.dead, status
    # A launch that died half-way leaves a run NOT_STARTED for ever: it must not block.
    stuck = StreamRun("s", RunStatus.NOT_STARTED, NOW - 3600)
    unblocked = decide(_health(), [stuck], NOW, OPS)
    assert [run_id for run_id, _ in unblocked.dead] == ["s"] and unblocked.launch
    newer = StreamRun("b", RunStatus.QUEUED, NOW - 1)
    older = StreamRun("a", RunStatus.STARTED, NOW - 50, NOW - 49)
    decision = decide(_health(heartbeat_at=NOW - 1, run_id="a"), [newer, older], NOW, OPS)
    assert decision.terminate == ["b"] and not decision.launch


def test_a_run_with_a_stale_heartbeat_is_dead_and_replaced_after_the_first_backoff() -> None:
    run = StreamRun("r", RunStatus.STARTED, NOW - 90, NOW - 89)
    fresh = decide(_health(heartbeat_at=NOW - 30, run_id="r"), [run], NOW, OPS)
    assert not fresh.dead and not fresh.launch
    stale = decide(_health(heartbeat_at=NOW - 61, run_id="r"), [run], NOW, OPS)
    assert [run_id for run_id, _ in stale.dead] == ["r"]
    assert "stopped heartbeating (61s since its last heartbeat; limit 60s; Dagster still shows " \
        "it STARTED)" in stale.dead[0][1]
    assert not stale.launch and stale.consecutive_failures == 1  # waits 10 s from now
    # Another run's heartbeat says nothing about this one: its launch counts instead, judged
    # by the start timeout (its process may still be starting, with many others).
    other = decide(_health(heartbeat_at=NOW, run_id="other"), [run], NOW, OPS)
    assert not other.dead
    starting = StreamRun("s", RunStatus.STARTING, NOW - 181)
    never = decide(_health(heartbeat_at=NOW, run_id="other"), [starting], NOW, OPS)
    assert [run_id for run_id, _ in never.dead] == ["s"]
    assert "never heartbeat (181s since it was launched; limit 180s; Dagster still shows it " \
        "STARTING)" in never.dead[0][1]
    # A run that had streamed past the reset period is replaced at once.
    veteran = StreamRun("v", RunStatus.STARTED, NOW - 900, NOW - 899)
    replaced = decide(_health(heartbeat_at=NOW - 61, run_id="v"), [veteran], NOW, OPS)
    assert replaced.dead and replaced.launch


def test_restarts_back_off_exponentially_up_to_the_cap_and_reset_after_a_long_run() -> None:
    assert [backoff_seconds(n, OPS) for n in range(6)] == [0, 10, 20, 40, 80, 80]
    three_failures = [_failed("c", ended_ago=30), _failed("b", 100), _failed("a", 200)]
    waiting = decide(_health(), three_failures, NOW, OPS)
    assert not waiting.launch and waiting.consecutive_failures == 3
    assert "restarting in 10s (backoff 40s)" in (waiting.waiting_reason or "")
    assert decide(_health(), three_failures, NOW + 10, OPS).launch

    # A run that streamed longer than the reset period ends the streak.
    long_run = _failed("b", ended_ago=100, lasted=400)
    after_long = decide(_health(), [_failed("c", ended_ago=5), long_run], NOW, OPS)
    assert after_long.consecutive_failures == 1 and not after_long.launch
    assert decide(_health(), [_failed("c", ended_ago=11), long_run], NOW, OPS).launch


def test_launches_wait_while_max_starting_runs_are_still_starting() -> None:
    """A run counts as starting from its launch until its first heartbeat of its own."""
    queued = StreamRun("q", RunStatus.QUEUED, NOW - 5)
    started = StreamRun("s", RunStatus.STARTED, NOW - 30, NOW - 20)
    assert is_starting(_health(), queued)
    assert is_starting(_health(heartbeat_at=NOW, run_id="other"), started)
    assert not is_starting(_health(heartbeat_at=NOW, run_id="s"), started)
    assert not is_starting(_health(), _failed("f", 10))
    assert launch_budget(0, OPS) == 4 and launch_budget(3, OPS) == 1
    assert launch_budget(4, OPS) == 0 and launch_budget(9, OPS) == 0
