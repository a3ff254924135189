"""Replication lag means what it says, for both engines: 0 when caught up on an idle source,
the age of the oldest pending commit while paused with writes pending, 0 again after resuming;
the same figure from the check, the WAL monitor sensor, the stored reading and /metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rosetta_dagster.core.config_store import ConfigStore, PipelineStatus
from rosetta_dagster.core.health import CheckOutcome, measure_and_record_lag, replication_lag
from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineDefinition
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    execute,
    fetch,
    streaming,
    wait_until,
)

OPERATIONS = OperationsSettings(lag_warning_seconds=3, lag_critical_seconds=30)


def _lag(pipeline: PipelineDefinition, store: ConfigStore) -> CheckOutcome:
    stored = store.get_pipeline(pipeline.name)
    reading = measure_and_record_lag(pipeline, store, stored.source_position_at,
                                     stored.applied_lsn)
    return replication_lag(stored, OPERATIONS, reading)


def _caught_up(pipeline: PipelineDefinition, store: ConfigStore) -> bool:
    outcome = _lag(pipeline, store)
    return outcome.passed and outcome.metadata["value"] == 0


def test_lag_is_zero_when_caught_up_and_the_age_of_the_oldest_pending_commit_otherwise(
    env: StreamingEnv, store: ConfigStore
) -> None:
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text)",
            "INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 100) g",
            "CREATE TABLE public.other (id int PRIMARY KEY)")
    pipeline = env.pipeline("lagged", ["public.items"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status(pipeline.name, PipelineStatus.START)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        wait_until(lambda: env.converged("public.items"), message="the initial load")
        # Caught up: 0 within one heartbeat of the applied position (not the heartbeat interval).
        execute(env.source_url, "INSERT INTO public.items VALUES (101, 'new')")
        wait_until(lambda: env.converged("public.items"), message="the insert")
        wait_until(lambda: _caught_up(pipeline, store), 5, "lag 0 once caught up")
        # Idle for longer than the heartbeat message interval (1 s here): still 0, and a
        # table outside the pipeline (and our own heartbeat messages) is not pending.
        execute(env.source_url, "INSERT INTO public.other SELECT generate_series(1, 100)")
        time.sleep(3)
        wait_until(lambda: _caught_up(pipeline, store), 5, "lag 0 on an idle source")
    store.set_pipeline_status(pipeline.name, PipelineStatus.PAUSE)

    # Paused with writes pending: the age of the oldest pending commit, growing.
    execute(env.source_url, "INSERT INTO public.items VALUES (102, 'while paused')")
    oldest = time.time()
    time.sleep(1.5)
    execute(env.source_url, "UPDATE public.items SET v = 'later' WHERE id = 1")
    time.sleep(2.0)
    first = _lag(pipeline, store)
    waited = time.time() - oldest
    assert first.passed, "a paused pipeline's lag is measured, not judged"
    assert "paused" in first.description
    assert waited - 1.0 <= first.metadata["value"] <= waited + 0.5
    assert first.metadata["pending_transactions"] == 2
    assert first.metadata["lag_bytes"] > 0
    time.sleep(2.0)
    second = _lag(pipeline, store)
    assert second.metadata["value"] >= first.metadata["value"] + 1.5
    stored = store.get_pipeline(pipeline.name)
    assert stored.lag is not None and stored.lag.seconds == pytest.approx(
        second.metadata["value"], abs=0.1)

    # Judged once START again (here: before the stream catches up), then back to 0.
    store.set_pipeline_status(pipeline.name, PipelineStatus.START)
    behind = _lag(pipeline, store)
    assert (behind.passed, behind.severity) == (False, "WARN")
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: env.converged("public.items"), message="the pending writes")
        wait_until(lambda: _caught_up(pipeline, store), 10, "lag 0 after resuming")
    assert fetch(env.source_url, "SELECT count(*) FROM pg_replication_slots "
                 "WHERE slot_name LIKE 'rosettalag%'") == [(0,)], "temporary copies are gone"


@pytest.mark.parametrize("engine", ["pgoutput"])  # no stream runs: the engine does not matter
def test_the_wal_monitor_reports_the_lag_of_a_paused_pipeline_on_each_table(
    env: StreamingEnv, store: ConfigStore, database_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster import AssetCheckEvaluation, DagsterInstance, build_sensor_context
    from fastapi.testclient import TestClient

    from rosetta_dagster.api.app import create_app
    from rosetta_dagster.core.pipeline_config import load_config
    from rosetta_dagster.defs.pipelines.sensors import build_wal_monitor_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    execute(env.source_url, "CREATE TABLE public.a (id int PRIMARY KEY)",
            "CREATE TABLE public.b (id int PRIMARY KEY)")
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "walpipe", ["public.a", "public.b"])
    monkeypatch.setenv("TEST_PG_PASSWORD", env.cluster.password)
    config = load_config(path)
    pipeline = config.pipeline("walpipe")
    store.sync_pipeline(pipeline)
    # The publication and slot a stream would have created, then a write nobody applies.
    execute(env.source_url, f"CREATE PUBLICATION {pipeline.publication_name} FOR TABLE a, b",
            "SELECT pg_create_logical_replication_slot('rosetta_walpipe', 'pgoutput')",
            "INSERT INTO public.b VALUES (1)")
    time.sleep(1.0)
    with build_sensor_context(
        instance=DagsterInstance.ephemeral(),
        resources={"config_store": ConfigStoreResource(database_url=database_url)},
    ) as context:
        result = build_wal_monitor_sensor([ReplicationSet.of(config)])(context)
    lags = [e for e in result.asset_events
            if isinstance(e, AssetCheckEvaluation) and e.check_name == "replication_lag"]
    assert sorted(e.asset_key.path[-1] for e in lags) == ["a", "b"]
    assert all(e.metadata["value"].value >= 1.0 and e.metadata["pending_transactions"].value == 1
               for e in lags)
    with TestClient(create_app(database_url)) as client:
        metrics = client.get("/metrics").text
        assert 'rosetta_replication_lag_bytes{pipeline="walpipe"}' in metrics
        line = next(m for m in metrics.splitlines()
                    if m.startswith('rosetta_replication_lag_seconds{pipeline="walpipe"}'))
        assert float(line.split()[-1]) >= 1.0
        body = client.get("/api/v1/pipelines/walpipe").json()
        assert body["lag_seconds"] >= 1.0 and body["lag_bytes"] > 0


@pytest.mark.parametrize("engine", ["pgoutput"])  # no stream runs: the engine does not matter
def test_applied_changes_the_slot_was_not_told_about_are_not_pending(
    env: StreamingEnv, store: ConfigStore
) -> None:
    """More applied-but-unconfirmed changes than the first peek decodes come before the one
    pending commit: the peek grows until it finds it, and says 0 once it is applied too."""
    from datetime import UTC, datetime

    from rosetta_dagster.core.events import parse_lsn
    from rosetta_dagster.core.lag import measure_lag
    from rosetta_dagster.core.replication import source_connection

    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY)")
    pipeline = env.pipeline("unconfirmed", ["public.items"])
    execute(env.source_url, f"CREATE PUBLICATION {pipeline.publication_name} FOR TABLE public.items",
            "SELECT pg_create_logical_replication_slot('rosetta_unconfirmed', 'pgoutput')",
            "INSERT INTO public.items SELECT generate_series(1, 1500)",
            "INSERT INTO public.items SELECT generate_series(1501, 3000)")
    applied_at = datetime.now(UTC)
    applied_lsn = parse_lsn(str(fetch(env.source_url, "SELECT pg_current_wal_lsn()")[0][0]))
    execute(env.source_url, "INSERT INTO public.items VALUES (0)")
    time.sleep(1.0)  # the pending commit's age
    with source_connection(pipeline) as conn:
        behind = measure_lag(conn, pipeline, applied_at, applied_lsn)
        assert behind.pending_transactions == 1 and behind.seconds is not None
        assert 0.9 <= behind.seconds < 10
        caught_up = measure_lag(conn, pipeline, datetime.now(UTC),
                                parse_lsn(str(fetch(env.source_url,
                                                    "SELECT pg_current_wal_lsn()")[0][0])))
        assert (caught_up.seconds, caught_up.pending_transactions) == (0.0, 0)
