"""Dropped slots, stale offsets, re-snapshot reconciliation and idle-source protection,
against real PostgreSQL and the real Debezium engine (no Dagster: the core the sensors call)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import psycopg2
import pytest
import yaml

from rosetta_dagster.core.capture import CaptureBatch, PositionStore
from rosetta_dagster.core.capture.debezium import OffsetFile
from rosetta_dagster.core.capture.debezium.marking import (
    ENDS_GROUPS,
    NEVER_MARKED,
    OffsetMarking,
    complete_prefix,
)
from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable
from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.events import ChangeEvent
from rosetta_dagster.core.pipeline_config import OperationsSettings
from rosetta_dagster.core.replication import WalSeverity, read_slot, record_reading, source_connection
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    count_rows,
    execute,
    fetch,
    streaming,
    wait_until,
)


def _stream_until_converged(env: StreamingEnv, session: StreamingSession, table: str) -> None:
    """Stream until ``table`` converged and the position is stored, then until the server let
    the slot go: its walsender can outlive the stopped engine by a moment, and a drop
    meanwhile is refused (in use)."""
    with streaming(session):
        wait_until(lambda: env.converged(table), message=f"{table} to converge")
        env.wait_for_stored_position(session.pipeline)
    slot = session.pipeline.slot_name
    wait_until(lambda: not fetch(env.source_url, "SELECT 1 FROM pg_replication_slots WHERE "
                                 "slot_name = %s AND active", (slot,)), 30, "the slot's release")


def _stale_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Delet")
            and "stale" in r.getMessage()]


def _expected_stale_lines(positions: PositionStore, pipeline: str) -> list[str]:
    """Debezium: the checklist's exact lines; pgoutput: the same two, naming its positions."""
    if isinstance(positions, OffsetFile):
        return [f"Deleting stale offset file: {positions.path}",
                "Deleted stale offset. Debezium will start fresh with snapshot mode."]
    if isinstance(positions, OffsetTable):
        return [f"Deleting stale offset: {positions.location}",
                "Deleted stale offset. Debezium will start fresh with snapshot mode."]
    return [f"Deleting stale stream positions of pipeline {pipeline} in {positions.location}",
            "Deleted stale positions. The stream will start fresh with an initial load."]


@pytest.mark.parametrize(("engine", "offset_store"), [
    ("debezium", "file"), ("pgoutput", "file"), ("debezium", "config_db")])
def test_dropped_slot_deletes_the_offset_and_the_new_snapshot_removes_deleted_rows(
    env: StreamingEnv, store: ConfigStore, caplog: pytest.LogCaptureFixture, offset_store: str,
    database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONFIG_DATABASE_URL", database_url)  # config_db offsets live there
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text)",
            "INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 500) g")
    pipeline = env.pipeline("dropped", ["public.items"], offset_store=offset_store)
    store.sync_pipeline(pipeline)
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.items")
    positions = env.positions(pipeline)
    assert positions.exists()
    if env.engine == "debezium":
        where = (f" file: {env.offsets_dir / 'dropped.dat'}" if offset_store == "file" else
                 ': config_db debezium_offsets key ["rosetta-dropped",{"server":"rosetta_dropped"}]')
        assert _expected_stale_lines(positions, "dropped") == [
            f"Deleting stale offset{where}",
            "Deleted stale offset. Debezium will start fresh with snapshot mode."]
        assert list(env.offsets_dir.glob("*.dat")) == ([] if offset_store == "config_db" else
                                                       [env.offsets_dir / "dropped.dat"])

    # While nothing streams, the slot is dropped and the source changes: those changes are
    # in no slot, so only a fresh snapshot can bring them, deletions included.
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_dropped')",
            "DELETE FROM public.items WHERE id % 10 = 0",
            "UPDATE public.items SET v = 'changed' WHERE id % 7 = 0",
            "INSERT INTO public.items VALUES (1000, 'new')")
    caplog.set_level(logging.INFO)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    _stream_until_converged(env, session, "public.items")

    assert _stale_lines(caplog) == _expected_stale_lines(positions, "dropped")
    assert count_rows(env.destination_url, "replica.items") == 451
    # A full copy under the new slot's snapshot replaced the destination's rows.
    assert any("public.items -> dst complete: 451 rows" in r.getMessage() and "(swap)" in
               r.getMessage() for r in caplog.records)
    history = store.list_offset_cleanups()
    assert [(h.pipeline, h.offset_file, h.slot_name) for h in history] == [
        ("dropped", positions.location, "rosetta_dropped")
    ]
    assert "no longer exists" in history[0].reason
    assert not any(name.startswith("_rosetta_resync") for (name,) in fetch(
        env.destination_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'replica'"))

    # With the slot in place, a restart resumes: the offset is kept and nothing is re-read.
    caplog.clear()
    resumed = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(resumed):
        execute(env.source_url, "DELETE FROM public.items WHERE id = 1")
        wait_until(lambda: env.converged("public.items"), message="the resumed stream")
    assert _stale_lines(caplog) == []
    assert resumed.progress.events_applied == 1
    assert len(store.list_offset_cleanups()) == 1


def test_a_snapshot_of_an_emptied_table_empties_the_destination(
    env: StreamingEnv, store: ConfigStore
) -> None:
    """No snapshot record arrives at all; the first heartbeat ends the snapshot instead."""
    execute(env.source_url, "CREATE TABLE public.gone (id int PRIMARY KEY)",
            "INSERT INTO public.gone SELECT generate_series(1, 50)")
    pipeline = env.pipeline("emptied", ["public.gone"])
    store.sync_pipeline(pipeline)
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.gone")
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_emptied')",
            "DELETE FROM public.gone")
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.gone")
    assert count_rows(env.destination_url, "replica.gone") == 0


def test_an_offset_the_server_no_longer_has_is_replaced_by_a_fresh_snapshot(
    env: StreamingEnv, store: ConfigStore, caplog: pytest.LogCaptureFixture
) -> None:
    """The slot was dropped and re-created behind Rosetta's back (so the prepare check sees a
    slot): Debezium refuses the old offset, and the outcome is the same as for a dropped slot."""
    execute(env.source_url, "CREATE TABLE public.rows (id int PRIMARY KEY, v int)",
            "INSERT INTO public.rows SELECT g, g FROM generate_series(1, 200) g")
    pipeline = env.pipeline("recreated", ["public.rows"])
    store.sync_pipeline(pipeline)
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.rows")
    execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_recreated')",
            "DELETE FROM public.rows WHERE id > 150", "UPDATE public.rows SET v = 0 WHERE id = 1",
            "SELECT pg_create_logical_replication_slot('rosetta_recreated', 'pgoutput')")
    caplog.set_level(logging.INFO)
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.rows")
    assert _stale_lines(caplog) == _expected_stale_lines(env.positions(pipeline), pipeline.name)
    assert "no longer available on the server" in store.list_offset_cleanups()[0].reason
    assert count_rows(env.destination_url, "replica.rows") == 150


def test_heartbeats_keep_the_slot_moving_while_only_other_tables_change(
    env: StreamingEnv, store: ConfigStore, caplog: pytest.LogCaptureFixture
) -> None:
    execute(env.source_url, "CREATE TABLE public.quiet (id int PRIMARY KEY)",
            "CREATE TABLE public.busy (id bigserial PRIMARY KEY, payload text)",
            "INSERT INTO public.quiet VALUES (1)")
    pipeline = env.pipeline("idle", ["public.quiet"])
    store.sync_pipeline(pipeline)
    operations = OperationsSettings(wal_warning_mb=16, wal_critical_mb=64)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
    with streaming(session):
        wait_until(lambda: env.converged("public.quiet"), message="the snapshot")
        # ~64 MB of WAL for a table the pipeline does not capture.
        for _ in range(16):
            execute(env.source_url,
                    "INSERT INTO public.busy (payload) SELECT repeat('x', 300) "
                    "FROM generate_series(1, 10000)")
        written = fetch(env.source_url, "SELECT pg_current_wal_lsn()")[0][0]

        def confirmed_past_writes() -> bool:
            rows = fetch(env.source_url,
                         "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
                         "WHERE slot_name = 'rosetta_idle'", (written,))
            return rows == [(True,)]

        wait_until(confirmed_past_writes, timeout_s=30, message="the slot to confirm past the writes")
        execute(env.source_url, "CHECKPOINT")
        wait_until(lambda: _retained(env, pipeline) < 16 * 1024 * 1024, timeout_s=30,
                   message="retained WAL to shrink below 16 MB")
        with source_connection(pipeline) as conn:
            reading = read_slot(conn, pipeline)
        assert reading.exists and reading.active and reading.wal_status == "reserved"
        assert record_reading(store, reading, operations) is WalSeverity.OK
    # The stored position kept up with the slot: a restart resumes, it does not re-sync.
    caplog.set_level(logging.INFO)
    caplog.clear()
    execute(env.source_url, "INSERT INTO public.quiet VALUES (2)")
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: env.converged("public.quiet"), message="the resumed stream")
    assert _stale_lines(caplog) == []
    assert not any("Initial load" in r.getMessage() for r in caplog.records)


def _retained(env: StreamingEnv, pipeline: object) -> int:
    execute(env.source_url, "CHECKPOINT")
    rows = fetch(env.source_url, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
                 "FROM pg_replication_slots WHERE slot_name = 'rosetta_idle'")
    return int(rows[0][0])  # type: ignore[call-overload]


@pytest.mark.parametrize("engine", ["pgoutput"])  # no stream runs: the engine does not matter
@pytest.mark.parametrize(("warning_mb", "critical_mb", "severity", "passed", "check_severity"), [
    (1, 100, "WARNING", False, "WARN"),
    (1, 2, "CRITICAL", False, "ERROR"),
    (100, 500, "OK", True, "WARN"),
])
def test_the_wal_monitor_sensor_reports_each_threshold_at_its_severity(
    env: StreamingEnv, store: ConfigStore, database_url: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    warning_mb: int, critical_mb: int, severity: str, passed: bool, check_severity: str,
) -> None:
    # A slot nobody consumes, then ~4 MB of WAL: it retains all of it. Slot names are per
    # cluster, so each case drops it again (finally) for the next.
    execute(env.source_url, "CREATE TABLE public.t (id int PRIMARY KEY)",
            "SELECT pg_create_logical_replication_slot('rosetta_walpipe', 'pgoutput')")
    try:
        _evaluate_wal_monitor(env, store, database_url, tmp_path, caplog, warning_mb, critical_mb,
                              severity, passed, check_severity)
    finally:
        execute(env.source_url, "SELECT pg_drop_replication_slot('rosetta_walpipe')")


def _evaluate_wal_monitor(
    env: StreamingEnv, store: ConfigStore, database_url: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    warning_mb: int, critical_mb: int, severity: str, passed: bool, check_severity: str,
) -> None:
    from dagster import AssetCheckEvaluation, AssetObservation, DagsterInstance, build_sensor_context

    from rosetta_dagster.core.pipeline_config import load_config
    from rosetta_dagster.defs.pipelines.sensors import build_wal_monitor_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    execute(env.source_url,
            "CREATE TABLE public.filler (payload text)",
            "INSERT INTO public.filler SELECT repeat('x', 400) FROM generate_series(1, 8000)")
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "walpipe", ["public.t"])
    document = yaml.safe_load(path.read_text())
    document["operations"] = {"wal_warning_mb": warning_mb, "wal_critical_mb": critical_mb}
    path.write_text(yaml.safe_dump(document))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TEST_PG_PASSWORD", env.cluster.password)
        config = load_config(path)
        store.sync_pipeline(config.pipeline("walpipe"))  # the supervisor's job in a deployment
        sensor = build_wal_monitor_sensor([ReplicationSet.of(config)])
        caplog.set_level(logging.INFO)
        with build_sensor_context(
            instance=DagsterInstance.ephemeral(),
            resources={"config_store": ConfigStoreResource(database_url=database_url)},
        ) as context:
            result = sensor(context)
    observation = next(e for e in result.asset_events if isinstance(e, AssetObservation))
    assert observation.asset_key.path == ["replication_slot", "walpipe"]
    retained = observation.metadata["retained_wal_bytes"].value
    assert retained > 2 * 1024 * 1024
    check = next(e for e in result.asset_events if isinstance(e, AssetCheckEvaluation))
    assert (check.check_name, check.passed, check.severity.value) == (
        "retained_wal", passed, check_severity)
    assert check.metadata["warning_threshold"].value == warning_mb * 1024 * 1024
    readings = store.latest_wal_readings()
    assert [(r.pipeline, r.slot_name, r.status, r.active) for r in readings] == [
        ("walpipe", "rosetta_walpipe", severity, False)]
    line = next(r for r in caplog.records if "wal_size=" in r.getMessage())
    assert line.levelname == {"OK": "INFO", "WARNING": "WARNING", "CRITICAL": "ERROR"}[severity]


@pytest.mark.parametrize("engine", ["debezium"])  # pgoutput keeps positions in destinations
def test_switching_the_offset_store_carries_the_position_over_both_ways(
    env: StreamingEnv, store: ConfigStore, caplog: pytest.LogCaptureFixture, database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rosetta_dagster.core.capture.debezium.offset_table import OffsetTable

    monkeypatch.setenv("CONFIG_DATABASE_URL", database_url)
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text)",
            "INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 200) g")
    in_file = env.pipeline("switched", ["public.items"])
    in_table = env.pipeline("switched", ["public.items"], offset_store="config_db")
    store.sync_pipeline(in_file)
    _stream_until_converged(env, StreamingSession(in_file, offsets_dir=env.offsets_dir,
                                                  config_store=store), "public.items")
    offsets_file = env.offsets_dir / "switched.dat"
    assert offsets_file.exists()
    caplog.set_level(logging.INFO)
    for round_, (pipeline, store_name) in enumerate(((in_table, "config_db"), (in_file, "file"))):
        # Changes while nothing streams: only the slot has them.
        execute(env.source_url, "UPDATE public.items SET v = %s WHERE id <= 10",
                params=(f"round {round_}",))
        execute(env.source_url, "INSERT INTO public.items VALUES (%s, 'new')",
                params=(1000 + round_,))
        caplog.clear()
        session = StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)
        _stream_until_converged(env, session, "public.items")
        messages = [r.getMessage() for r in caplog.records]
        moved = [m for m in messages if "moved its Debezium offset" in m]
        assert len(moved) == 1 and f"(offset_store: {store_name})" in moved[0], messages
        assert not any("Initial load of pipeline switched" in m for m in messages)
        # Resumed where the other store stood (11 changes; plus, when the stop came before a
        # heartbeat told the last change's LSN group complete, that change once more).
        assert session.progress.events_applied in (11, 12)
        table = OffsetTable(in_table, database_url, env.positions(in_file))  # type: ignore[arg-type]
        assert table.exists() == (store_name == "config_db")
        assert offsets_file.exists() == (store_name == "file")
    assert (env.offsets_dir / "switched.dat.moved-to-config-db").exists()  # kept, not read


@pytest.mark.parametrize("engine", ["debezium"])  # no stream runs: the guard alone
def test_the_slot_guard_sensor_deletes_config_db_offsets_whose_slot_is_gone(
    env: StreamingEnv, store: ConfigStore, database_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from dagster import DagsterInstance, build_sensor_context

    from rosetta_dagster.core.capture.debezium.offsets import start_offset_value
    from rosetta_dagster.core.pipeline_config import load_config
    from rosetta_dagster.defs.pipelines.sensors import build_slot_guard_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    monkeypatch.setenv("CONFIG_DATABASE_URL", database_url)
    monkeypatch.setenv("TEST_PG_PASSWORD", env.cluster.password)
    monkeypatch.setenv("ROSETTA_OFFSETS_DIR", str(env.offsets_dir))
    execute(env.source_url, "CREATE TABLE public.t (id int PRIMARY KEY)")
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "guarded", ["public.t"],
                                   {"offset_store": "config_db"})
    config = load_config(path)
    store.sync_pipeline(config.pipeline("guarded"))
    positions = env.positions(config.pipeline("guarded"))
    positions.write_value(start_offset_value(0x16B3748))  # type: ignore[attr-defined]
    assert positions.exists()
    caplog.set_level(logging.INFO)
    with build_sensor_context(
        instance=DagsterInstance.ephemeral(),
        resources={"config_store": ConfigStoreResource(database_url=database_url)},
    ) as context:
        result = build_slot_guard_sensor([ReplicationSet.of(config)])(context)
    assert "Deleted stale offsets of guarded" in str(result.skip_message)
    assert not positions.exists()
    assert _stale_lines(caplog) == [
        'Deleting stale offset: config_db debezium_offsets key '
        '["rosetta-guarded",{"server":"rosetta_guarded"}]',
        "Deleted stale offset. Debezium will start fresh with snapshot mode."]
    assert [(h.pipeline, h.offset_file) for h in store.list_offset_cleanups()] == [
        ("guarded", positions.location)]


class _CrashAfterFirstPiece(RuntimeError):
    pass


def test_offsets_are_stored_only_at_the_end_of_a_complete_lsn_group() -> None:
    # Records 0-1 at LSN 10, 2-4 share LSN 20 (a page of COPY rows), 5 a heartbeat in it.
    assert complete_prefix([10, 10, 20, 20, 20, 20]) == 2
    assert complete_prefix([10, 20, 30]) == 2
    assert complete_prefix([10, 20, ENDS_GROUPS]) == 3  # a heartbeat after the commit
    assert complete_prefix([ENDS_GROUPS, 20, 20]) == 1
    assert complete_prefix([20]) == 0 and complete_prefix([]) == 0
    # The last record of the complete prefix is marked (the engine keeps the latest offset).
    marking = OffsetMarking()
    assert marking.markable(["a", "b", "c"], [10, 20, 20]) == "a"
    assert marking.markable(["d"], [20]) is None  # the group goes on in the next batch
    assert marking.markable(["e", "f"], [30, 40]) == "e"
    assert marking.markable(["g"], [ENDS_GROUPS]) == "g"
    # Timer heartbeats (where replays are told apart) are passed over and never marked.
    assert complete_prefix([10, NEVER_MARKED, 10, 20]) == 3
    assert complete_prefix([10, NEVER_MARKED, 20]) == 2
    assert marking.markable(["h", "i", "j", "k"], [50, NEVER_MARKED, 60, NEVER_MARKED]) == "h"
    assert marking.markable(["l"], [NEVER_MARKED]) is None  # j's group may go on
    assert marking.markable(["m"], [ENDS_GROUPS]) == "m"
    assert marking.markable(["n", "o"], [70, NEVER_MARKED]) is None

@pytest.mark.parametrize("engine", ["debezium"])
@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "keyless"])
def test_a_stream_that_ends_inside_a_copy_resumes_without_losing_its_rows(
    env: StreamingEnv, keyed: bool
) -> None:
    """COPY writes a page of rows as one WAL record, so its changes share one LSN; a stream
    that ends after applying part of such a group (here: its offsets flushed after the first
    batch, then a failure) delivers the rest of the group when it resumes. (Debezium resumed
    after the LSN of its stored offset and lost the rest of the page: 184 rows. pgoutput
    commits its position with a transaction's last piece: a partly applied transaction is
    rolled back whole.) The whole group is delivered again: a table without a key (every
    row twice here) takes only the rows after the ones it recorded as taken."""
    execute(env.source_url, "CREATE TABLE public.bulk (id int PRIMARY KEY, v text)" if keyed
            else "CREATE TABLE public.bulk (id int, v text) ; "
                 "ALTER TABLE public.bulk REPLICA IDENTITY FULL")
    pipeline = env.pipeline("bulk", ["public.bulk"], max_batch_size=100, max_queue_size=400,
                            offset_flush_interval_ms=0)
    session = StreamingSession(pipeline, offsets_dir=env.offsets_dir)
    apply_batch = session.batches.on_batch
    pieces: list[int] = []

    def crash_after_first_piece(batch: CaptureBatch) -> int | None:
        rows = sum(isinstance(i, ChangeEvent) and i.table.name == "bulk" for i in batch.items)
        if rows and pieces:
            raise _CrashAfterFirstPiece("the process ends here")
        position = apply_batch(batch)
        if rows:
            pieces.append(rows)
        return position

    session.batches.on_batch = crash_after_first_piece  # type: ignore[method-assign]
    with pytest.raises(Exception, match="the process ends here"), streaming(session) as thread:
        wait_until(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots "
                                 "WHERE slot_name = %s", (pipeline.slot_name,)) == [(True,)],
                   message="the stream to start")
        conn = psycopg2.connect(env.source_url)
        with conn, conn.cursor() as cursor:
            cursor.copy_expert("COPY public.bulk FROM STDIN", io.StringIO(
                "".join(f"{n}\trow {n}\n" for n in range(1, 3001) if keyed or n <= 1500
                        for _ in range(1 if keyed else 2))))
        conn.close()
        wait_until(lambda: pieces, message="the first piece of the COPY")
        wait_until(lambda: not thread.is_alive(), 60, "the failure")
    assert 0 < pieces[0] < 1000 and count_rows(env.destination_url, "replica.bulk") == pieces[0]
    _stream_until_converged(env, StreamingSession(pipeline, offsets_dir=env.offsets_dir),
                            "public.bulk")
