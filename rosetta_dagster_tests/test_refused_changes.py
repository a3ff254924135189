"""Changes a destination refuses, against real servers and both engines: the run names the
change exactly, applies everything before it, and then stops (resumable, skippable) or parks
it with its key's later changes; transient errors are retried in place."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg2
import pytest

from rosetta_dagster.cli import main as rosetta
from rosetta_dagster.core.config_store import ConfigStore, PipelineState, PipelineStatus
from rosetta_dagster.core.health import CheckOutcome, evaluate_pipeline
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import OperationsSettings
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.core.streaming.refused import StoppedOnRefusedChange
from rosetta_dagster.harness import (
    StreamingEnv,
    drop_slots,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    wait_until,
)

CHECK = "ALTER TABLE replica.acct ADD CONSTRAINT amount_below_a_million CHECK (amount < 1000000) NOT VALID"
ROWS = ("INSERT INTO public.acct SELECT g, CASE WHEN g = 7000 THEN 1000000 ELSE g END, "
        "E'n\\\\''' || g FROM generate_series(1, 10000) g")


@pytest.fixture
def env(pg_cluster: LocalPostgresCluster, pg_root: Path, engine: str) -> Iterator[StreamingEnv]:
    env = new_streaming_env(pg_cluster, pg_root, engine)
    execute(env.source_url, "CREATE TABLE public.acct (id int PRIMARY KEY, amount int, note text)",
            "INSERT INTO public.acct VALUES (0, 0, 'first')")
    yield env
    shutil.rmtree(env.offsets_dir, ignore_errors=True)
    drop_slots(env)


def _session(env: StreamingEnv, store: ConfigStore, **settings: object) -> StreamingSession:
    pipeline = env.pipeline("refuse", ["public.acct"], **settings)
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("refuse", PipelineStatus.START)
    return StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)


def _loaded(env: StreamingEnv) -> None:
    wait_until(lambda: env.converged("public.acct"), 60, "the initial load")


def _run_until_it_stops(session: StreamingSession, before: list[str], env: StreamingEnv,
                        then: list[str]) -> StoppedOnRefusedChange:
    """Stream; once loaded, run ``before`` on the destination and ``then`` on the source;
    return the stop the session ends with by itself."""
    with pytest.raises(StoppedOnRefusedChange) as raised, streaming(session) as thread:
        _loaded(env)
        execute(env.destination_url, *before)
        execute(env.source_url, *then)
        thread.join(120)
        assert not thread.is_alive(), "the session must stop on the refused change"
    return raised.value


def _checks(env: StreamingEnv, store: ConfigStore, **settings: object) -> dict[str, CheckOutcome]:
    """The pipeline's health checks for its one destination table, by name."""
    pipeline = env.pipeline("refuse", ["public.acct"], **settings)
    parked = {(d, t): n for p, d, t, n in store.parked_counts() if p == "refuse"}
    return {outcome.name: outcome for target, outcome in evaluate_pipeline(
        pipeline, store.get_pipeline("refuse"), OperationsSettings(parity_window_seconds=1), parked)
        if target.kind == "destination_table"}


def _db_args(database_url: str) -> list[str]:
    return ["--database-url", database_url]


def test_stop_names_the_change_applies_what_came_before_and_resumes_or_skips(
    env: StreamingEnv, store: ConfigStore, database_url: str, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    stopped = _run_until_it_stops(_session(env, store), [CHECK], env, [ROWS])
    report = stopped.report
    assert (report.table, report.key, report.operation, report.destination, report.sqlstate) == (
        "public.acct", {"id": "7000"}, "insert", "dst", "23514")
    assert "amount_below_a_million" in report.message and report.position
    assert report.source_time is not None
    # Everything before the refused change is there, in order; nothing after it.
    assert fetch(env.destination_url, "SELECT count(*), max(id) FROM replica.acct") == [(7000, 6999)]
    stored = store.get_pipeline("refuse")
    assert (stored.status, stored.state) == (PipelineStatus.PAUSE, PipelineState.ERROR)
    assert stored.last_error == str(stopped)
    assert stored.last_apply_error == report
    assert "key (id=7000)" in str(stopped) and "rosetta pipeline skip refuse" in str(stopped)
    check = _checks(env, store)["apply_errors"]
    assert not check.passed and check.severity == "ERROR" and check.description == report.sentence()
    assert (check.metadata["key"], check.metadata["sqlstate"], check.metadata["position"]) == (
        '{"id": "7000"}', "23514", report.position)
    assert rosetta(["pipeline", *_db_args(database_url), "status", "refuse"]) == 1
    assert f"insert of public.acct (id=7000) at {report.position} on dst" in capsys.readouterr().out
    if env.engine == "pgoutput":
        # The slot may already be confirmed up to the refused transaction (psycopg2 confirms a
        # keepalive's WAL end by itself once all it received was confirmed): the stop moved the
        # destination's position to that transaction (past what came before it), so the next
        # start resumes on it instead of reading the slot as re-created (a reload).
        [(position,)] = fetch(env.destination_url, "SELECT position::text FROM "
                              "replica._rosetta_positions WHERE pipeline = 'refuse'")
        assert fetch(env.destination_url, "SELECT %s::pg_lsn > %s::pg_lsn",
                     (position, report.position)) == [(True,)]
        execute(env.source_url, "SELECT pg_replication_slot_advance(slot_name, %s) FROM "
                "pg_replication_slots WHERE slot_name = %s AND confirmed_flush_lsn < %s",
                params=(position, env.pipeline("refuse", ["public.acct"]).slot_name, position))

    # The user fixes the destination and starts again: nothing was lost, nothing reloaded.
    execute(env.destination_url, "ALTER TABLE replica.acct DROP CONSTRAINT amount_below_a_million")
    with streaming(_session(env, store)):
        wait_until(lambda: env.converged("public.acct"), 60, "the resumed stream")
        # Cleared in the config store once the batch past it committed at the destination.
        wait_until(lambda: store.get_pipeline("refuse").last_apply_error is None, 30,
                   "the stop to be cleared")
    assert not [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]

    # Refused again; this time the user skips exactly that change, after confirming.
    stopped = _run_until_it_stops(_session(env, store), [CHECK], env, [
        "UPDATE public.acct SET amount = 2000000 WHERE id = 5",
        "UPDATE public.acct SET note = 'after' WHERE id = 6"])
    position = stopped.report.position
    assert position is not None
    assert rosetta(["pipeline", *_db_args(database_url), "skip", "refuse", "--position", "0/1"]) == 2
    assert rosetta(["pipeline", *_db_args(database_url), "skip", "refuse", "--position", position,
                    "--yes", "--by", "ops@example.com"]) == 0
    with streaming(_session(env, store)):
        wait_until(lambda: fetch(env.destination_url, "SELECT note FROM replica.acct WHERE id = 6")
                   == [("after",)], 60, "the changes after the skipped one")
    # Exactly the skipped update is missing; what came after it is applied.
    assert fetch(env.destination_url, "SELECT amount, note FROM replica.acct WHERE id = 5") == [
        (5, "n\\'5")]
    skips = store.list_skips("refuse")
    assert [(s.position, s.requested_by, s.skipped_at is not None) for s in skips] == [
        (position, "ops@example.com", True)]


@pytest.mark.parametrize("engine", ["pgoutput"])  # tables without a key: pgoutput only
def test_a_stop_inside_a_transaction_adds_no_row_of_a_keyless_table_twice(
    env: StreamingEnv, store: ConfigStore
) -> None:
    """The refused transaction's earlier rows of a table without a key wait for its replay;
    the transactions before it are applied once, with the position past them."""
    execute(env.source_url, "CREATE TABLE public.log (note text)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL", "INSERT INTO public.log VALUES ('a')")
    pipeline = env.pipeline("refuse", ["public.acct", "public.log"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("refuse", PipelineStatus.START)

    def session() -> StreamingSession:
        return StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)

    def notes() -> list[tuple[object, ...]]:
        return fetch(env.destination_url, "SELECT note FROM replica.log ORDER BY note")

    stopped = _run_until_it_stops(session(), [CHECK], env, [
        "INSERT INTO public.log VALUES ('b'), ('b')",
        "INSERT INTO public.log VALUES ('c'); INSERT INTO public.acct VALUES (1, 2000000, 'no'); "
        "INSERT INTO public.log VALUES ('d')"])
    assert stopped.report.key == {"id": "1"}
    wait_until(lambda: notes() == [("a",), ("b",), ("b",)], 10, "what came before, once")
    execute(env.destination_url, "ALTER TABLE replica.acct DROP CONSTRAINT amount_below_a_million")
    with streaming(session()):
        wait_until(lambda: notes() == [("a",), ("b",), ("b",), ("c",), ("d",)], 60,
                   "the replayed transaction, once")
        wait_until(lambda: env.converged("public.acct"), 60, "the refused row")


@pytest.mark.parametrize("engine", ["debezium"])  # above the capture (test_capture_contract)
def test_park_keeps_streaming_parks_the_key_behind_and_replays_in_order(
    env: StreamingEnv, store: ConfigStore, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    session = _session(env, store, on_apply_error="park")
    with streaming(session):
        _loaded(env)
        execute(env.destination_url, CHECK)
        execute(env.source_url, ROWS)
        wait_until(lambda: fetch(env.destination_url, "SELECT count(*) FROM replica.acct")
                   == [(10000,)], 60, "everything but the refused row")
        # Three later changes of the parked key wait behind it; other keys go on streaming.
        execute(env.source_url, "UPDATE public.acct SET note = 'second' WHERE id = 7000",
                "UPDATE public.acct SET amount = 7000 WHERE id = 7000",
                "UPDATE public.acct SET note = 'fourth' WHERE id IN (7000, 7001)")
        wait_until(lambda: fetch(env.destination_url, "SELECT note FROM replica.acct "
                                 "WHERE id = 7001") == [("fourth",)], 60, "the other key")
        wait_until(lambda: len(store.list_parked("refuse")) == 4, 30, "four parked changes")
        parked = store.list_parked("refuse")
        assert [(p.table_name, p.key, p.operation) for p in parked] == [
            ("public.acct", {"id": "7000"}, op) for op in ("insert", "update", "update", "update")]
        assert "amount_below_a_million" in parked[0].error and parked[0].sqlstate == "23514"
        assert all("behind" in p.error for p in parked[1:])
        assert fetch(env.destination_url, "SELECT count(*) FROM replica.acct WHERE id = 7000") == [
            (0,)]
        check = _checks(env, store, on_apply_error="park")["parked_events"]
        assert (check.passed, check.severity, check.metadata["value"]) == (False, "ERROR", 4)
        assert rosetta(["parked", *_db_args(database_url), "list", "--pipeline", "refuse"]) == 0
        assert capsys.readouterr().out.count('{"id": "7000"}') == 4

        # A retry while the constraint is still there fails again and keeps everything.
        assert rosetta(["parked", *_db_args(database_url), "retry", "refuse"]) == 0
        wait_until(lambda: all(p.attempts == 2 for p in store.list_parked("refuse")), 30,
                   "the failed replay")
        execute(env.destination_url, "ALTER TABLE replica.acct DROP CONSTRAINT "
                "amount_below_a_million")
        assert rosetta(["parked", *_db_args(database_url), "retry", "refuse", "--key",
                        '{"id": "7000"}']) == 0
        wait_until(lambda: store.list_parked("refuse") == [], 30, "the replay")
        wait_until(lambda: env.converged("public.acct"), 60, "destination == source")
        # The key streams again.
        execute(env.source_url, "UPDATE public.acct SET note = 'fifth' WHERE id = 7000")
        wait_until(lambda: env.converged("public.acct"), 60, "the released key")
        assert _checks(env, store, on_apply_error="park")["parked_events"].passed


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_destination_restart_mid_batch_is_retried_in_place(
    pg_cluster: LocalPostgresCluster, pg_root: Path, store: ConfigStore, engine: str,
    dedicated_cluster: LocalPostgresCluster, caplog: pytest.LogCaptureFixture,
) -> None:
    env = new_streaming_env(pg_cluster, pg_root, engine, destination_cluster=dedicated_cluster)
    execute(env.source_url, "CREATE TABLE public.acct (id int PRIMARY KEY, amount int, note text)")
    try:
        with streaming(_session(env, store)) as thread:
            execute(env.source_url, "INSERT INTO public.acct VALUES (0, 0, 'streamed')")
            wait_until(lambda: env.converged("public.acct"), 60, "streaming")
            # A lock holds the batch inside its destination transaction; then the server
            # restarts under it.
            locker = psycopg2.connect(env.destination_url)
            locker.cursor().execute("LOCK TABLE replica.acct IN ACCESS EXCLUSIVE MODE")
            execute(env.source_url, "INSERT INTO public.acct SELECT g, g, 'w' FROM "
                    "generate_series(1, 5000) g")
            wait_until(lambda: fetch(env.destination_url, "SELECT count(*) FROM pg_stat_activity "
                                     "WHERE wait_event_type = 'Lock'") == [(1,)], 60,
                       "the batch waiting inside its transaction")
            dedicated_cluster.restart()
            locker.close()
            execute(env.source_url, "UPDATE public.acct SET note = 'after' WHERE id % 7 = 0")
            wait_until(lambda: env.converged("public.acct"), 120, "convergence after the restart")
            assert thread.is_alive(), "the run must not fail on a transient error"
        assert "transient error" in caplog.text
        assert "refused the" not in caplog.text  # retried, not isolated
        assert store.get_pipeline("refuse").last_apply_error is None
        assert store.list_parked("refuse") == []
    finally:
        shutil.rmtree(env.offsets_dir, ignore_errors=True)
        drop_slots(env)


def _exists(env: StreamingEnv) -> bool:
    return fetch(env.destination_url, "SELECT to_regclass('replica.acct') IS NOT NULL") == [(True,)]


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_revoked_permission_is_reported_for_that_table_only(
    env: StreamingEnv, store: ConfigStore
) -> None:
    """The destination is written by an ordinary role; INSERT on one table is revoked."""
    role = f"writer_{env.destination_db}"
    execute(env.source_url, "CREATE TABLE public.other (id int PRIMARY KEY, v text)")
    execute(env.destination_url, f"CREATE ROLE {role} LOGIN PASSWORD 'writer-pw'",
            f"GRANT CREATE ON DATABASE {env.destination_db} TO {role}",
            f"CREATE SCHEMA replica AUTHORIZATION {role}")
    pipeline = env.pipeline("refuse", ["public.acct", "public.other"], on_apply_error="park")
    pipeline = replace(pipeline, destinations=tuple(
        replace(d, user=role, password="writer-pw") for d in pipeline.destinations))
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("refuse", PipelineStatus.START)
    try:
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                        config_store=store)):
            _loaded(env)
            execute(env.destination_url, f"REVOKE INSERT ON replica.acct FROM {role}")
            execute(env.source_url, "INSERT INTO public.acct VALUES (1, 1, 'a')",
                    "INSERT INTO public.other VALUES (1, 'b')",
                    "UPDATE public.acct SET note = 'z' WHERE id = 0")
            wait_until(lambda: env.converged("public.other"), 60, "the other table")
            # MERGE needs INSERT for updates too: both changes of acct are refused.
            wait_until(lambda: len(store.list_parked("refuse")) == 2, 30, "the refused changes")
            execute(env.source_url, "INSERT INTO public.other VALUES (2, 'c')")
            wait_until(lambda: env.converged("public.other"), 60, "the other table, still")
        parked = store.list_parked("refuse")
        assert [(p.table_name, p.key, p.operation, p.sqlstate) for p in parked] == [
            ("public.acct", {"id": "1"}, "insert", "42501"),
            ("public.acct", {"id": "0"}, "update", "42501")]
        assert "permission denied for table acct" in parked[0].error
        assert "public.acct key (id=1)" in parked[0].error and "destination dst" in parked[0].error
    finally:
        execute(env.destination_url, "DROP SCHEMA replica CASCADE", f"DROP OWNED BY {role}",
                f"DROP ROLE {role}")
