"""Backfill jobs against real PostgreSQL and the real engine: the copy runs here, the stream
applies each chunk at its high watermark (DBLog), concurrent writers included."""

from __future__ import annotations

import random
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from rosetta_dagster.core.backfill import BackfillCancelled, BackfillError, BackfillRunner
from rosetta_dagster.core.config_store import BackfillStatus, ConfigStore, PipelineStatus
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import PipelineDefinition, PipelineFile
from rosetta_dagster.core.streaming import StreamingSession
from rosetta_dagster.harness import (
    StreamingEnv,
    count_rows,
    drop_slots,
    execute,
    fetch,
    new_streaming_env,
    streaming,
    table_fingerprint,
    wait_until,
)
from rosetta_dagster.harness.type_matrix import pinned_connection


@pytest.fixture
def streamed(request: pytest.FixtureRequest, pg_cluster: LocalPostgresCluster, pg_root: Path,
             store: ConfigStore, engine: str) -> Iterator[tuple[StreamingEnv, PipelineDefinition]]:
    """`public.big` (20,000 rows unless parametrized) streaming into the replica (both engines:
    the watermarks arrive as Debezium's message records or as pgoutput's logical messages)."""
    rows = getattr(request, "param", 20_000)
    env = new_streaming_env(pg_cluster, pg_root, engine)
    execute(env.source_url, "CREATE TABLE public.big (id int PRIMARY KEY, v int, note text)",
            "INSERT INTO public.big SELECT g, g, 'n' || g FROM generate_series(1, %s) g",
            params=(rows,))
    pipeline = env.pipeline("bf", ["public.big"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("bf", PipelineStatus.START)
    with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
        wait_until(lambda: env.converged("public.big"), 120, "the snapshot")
        yield env, pipeline
    shutil.rmtree(env.offsets_dir, ignore_errors=True)
    drop_slots(env)


def _runner(pipeline: PipelineDefinition, store: ConfigStore, job_id: int, **kwargs: object
            ) -> BackfillRunner:
    return BackfillRunner(pipeline, store, job_id, chunk_timeout_s=60, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_filtered_backfill_repairs_exactly_the_matching_rows(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    env, pipeline = streamed
    # Damage the replica behind the stream's back: rows missing and rows wrong.
    execute(env.destination_url, "DELETE FROM replica.big WHERE id % 100 = 0",
            "UPDATE replica.big SET note = 'wrong' WHERE id % 100 = 1")
    job = store.create_backfill_job("bf", "public.big",
                                    [{"column": "id", "operator": "<=", "value": 10000}])
    result = _runner(pipeline, store, job.id, chunk_rows=3000).run()
    assert (result.total, result.rows, result.chunks) == (10000, 10000, 4)
    finished = store.get_backfill_job(job.id)
    assert (finished.status, finished.count_record, finished.total_record) == (
        BackfillStatus.COMPLETED, 10000, 10000)
    repaired = fetch(env.destination_url, "SELECT count(*) FILTER (WHERE note = 'wrong'), "
                     "count(*) FROM replica.big WHERE id <= 10000")
    assert repaired == [(0, 10000)]
    untouched = fetch(env.destination_url, "SELECT count(*) FILTER (WHERE note = 'wrong'), "
                      "count(*) FROM replica.big WHERE id > 10000")
    assert untouched == [(100, 9900)]  # outside the filter: not copied
    assert not fetch(env.destination_url,
                     "SELECT 1 FROM pg_tables WHERE tablename LIKE '_rosetta_backfill_%'")


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
@pytest.mark.parametrize("streamed", [200_000], indirect=True)
def test_a_backfill_racing_concurrent_updates_and_deletes_converges(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    """The naive race: a chunk read before an update and written after it would put the old
    value back; a row deleted meanwhile would be resurrected. Repeated to shake timings."""
    env, pipeline = streamed
    execute(env.source_url, "DELETE FROM public.big WHERE id BETWEEN 11 AND 15")
    for round_number in range(3):
        # What an incident leaves: rows the source does not have, below, inside and above its
        # key span (the writer only appends after the source's largest key).
        wait_until(lambda: env.converged("public.big"), 60, "the stream before planting")
        execute(env.destination_url,
                "INSERT INTO replica.big SELECT g, 0, 'extra' FROM unnest(%s::int[]) g",
                params=([-1 - round_number, 11, 13, 15, 10_000_000 + round_number],))
        stop = threading.Event()
        writes = [0]
        thread = threading.Thread(target=_write_randomly,
                                  args=(env.source_url, round_number, stop, writes, 200_000),
                                  daemon=True)
        thread.start()
        try:
            job = store.create_backfill_job("bf", "public.big")
            _runner(pipeline, store, job.id, chunk_rows=20_000).run()
        finally:
            stop.set()
            thread.join(30)
        assert writes[0] > 5, "the writer must overlap the backfill"
        try:
            wait_until(lambda: env.converged("public.big"), 60, f"convergence, round {round_number}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; differing rows: {_differences(env)[:10]}") from None
        source = table_fingerprint(env.source_url, "public", "big")
        assert source == table_fingerprint(env.destination_url, "replica", "big")


def _differences(env: StreamingEnv) -> list[tuple[object, object, object]]:
    query = "SELECT id, v::text || ' ' || note FROM {}.big"
    source = dict(fetch(env.source_url, query.format("public")))  # type: ignore[arg-type]
    target = dict(fetch(env.destination_url, query.format("replica")))  # type: ignore[arg-type]
    return [(k, source.get(k), target.get(k)) for k in sorted(source.keys() | target.keys())
            if source.get(k) != target.get(k)]


def _write_randomly(
    url: str, seed: int, stop: threading.Event, writes: list[int], rows: int = 20_000,
    low: int = 1,
) -> None:
    """Update 15 and delete 5 random rows (ids ``low``..``rows``), insert one after the largest
    key, per transaction, until stopped."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    rng = random.Random(seed)
    with conn.cursor() as cursor:
        while not stop.is_set():
            ids = [rng.randint(low, rows) for _ in range(20)]
            cursor.execute("UPDATE public.big SET v = v + 1, note = 'u' || v WHERE id = ANY(%s)",
                           (ids[:15],))
            cursor.execute("DELETE FROM public.big WHERE id = ANY(%s)", (ids[15:],))
            cursor.execute("INSERT INTO public.big SELECT max(id) + 1, 0, 'new' FROM public.big")
            writes[0] += 1
    conn.close()


@contextmanager
def _writing(url: str, low: int = 1, rows: int = 20_000) -> Iterator[list[int]]:
    """A concurrent writer (see ``_write_randomly``) for the duration of the block."""
    stop = threading.Event()
    writes = [0]
    thread = threading.Thread(target=_write_randomly, args=(url, 7, stop, writes, rows, low),
                              daemon=True)
    thread.start()
    try:
        yield writes
    finally:
        stop.set()
        thread.join(30)
    assert writes[0] > 5, "the writer must overlap the backfill"


def _subset(url: str, schema: str, where: str) -> tuple[int, str]:
    rows = fetch(url, f"SELECT count(*), md5(string_agg(t::text, E'\\n' ORDER BY id)) "  # noqa: S608
                      f"FROM {schema}.big t WHERE {where}")
    return int(rows[0][0]), str(rows[0][1])  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_backfill_removes_what_the_source_no_longer_has_inside_and_outside_its_key_span(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    """Missing, stale and extra rows (below, inside and above the source's keys; matching the
    filter or not): a filtered backfill repairs exactly the matching ones, a whole-table
    backfill the rest, both while the source is written to."""
    env, pipeline = streamed
    execute(env.source_url, "DELETE FROM public.big WHERE id IN (5000, 15000)")
    wait_until(lambda: env.converged("public.big"), 60, "the stream before the damage")
    # v = id on the source, so the filter v <= 10000 matches ids 1..10000 (and the writer's
    # inserts, v = 0). The writer never touches the planted keys.
    execute(env.destination_url,
            "DELETE FROM replica.big WHERE id IN (100, 12000)",
            "UPDATE replica.big SET note = 'wrong' WHERE id IN (200, 13000)",
            "INSERT INTO replica.big VALUES (-7, 1, 'below'), (0, 2, 'zero'), "
            "(5000, 3, 'inside'), (15000, 99999, 'inside, not matching'), "
            "(1000000, 4, 'above'), (1000001, 50000, 'above, not matching')")
    job = store.create_backfill_job("bf", "public.big",
                                    [{"column": "v", "operator": "<=", "value": 10000}])
    with _writing(env.source_url, low=1000, rows=4000):
        result = _runner(pipeline, store, job.id, chunk_rows=3000).run()
    assert (result.inserted, result.updated, result.deleted) == (1, 1, 4)
    finished = store.get_backfill_job(job.id)
    assert (finished.rows_inserted, finished.rows_updated, finished.rows_deleted) == (1, 1, 4)
    wait_until(lambda: _subset(env.source_url, "public", "v <= 10000")
               == _subset(env.destination_url, "replica", "v <= 10000"), 60,
               "the filtered rows to be equal")
    # Outside the filter nothing was touched: the extras, the missing and the stale row stay.
    assert fetch(env.destination_url, "SELECT id, note FROM replica.big WHERE id IN "
                 "(12000, 13000, 15000, 1000001) ORDER BY id") == [
        (13000, "wrong"), (15000, "inside, not matching"), (1000001, "above, not matching")]

    execute(env.destination_url, "INSERT INTO replica.big VALUES (-100, 0, 'below'), "
            "(2000000, 0, 'above')")
    whole = store.create_backfill_job("bf", "public.big")
    with _writing(env.source_url, low=1000, rows=4000):
        result = _runner(pipeline, store, whole.id, chunk_rows=3000).run()
    # 12000; 13000; 15000, 1000001, -100, 2000000
    assert (result.inserted, result.updated, result.deleted) == (1, 1, 4)
    wait_until(lambda: env.converged("public.big"), 60, "the whole table to be equal")
    jobs = {line.split("\t")[0]: line for line in _backfill_list(store)}
    assert "+1 ~1 -4" in jobs[str(job.id)]


def _backfill_list(store: ConfigStore) -> list[str]:
    return [f"{j.id}\t+{j.rows_inserted} ~{j.rows_updated} -{j.rows_deleted}"
            for j in store.list_backfill_jobs(pipeline="bf")]


def test_chunk_bounds_hold_for_hostile_keys(
    pg_cluster: LocalPostgresCluster, pg_root: Path, store: ConfigStore, engine: str
) -> None:
    """Chunks bounded by ±infinity, BC, quotes, backslashes, newlines and emoji keys: every
    bound travels as text and is cast back on each server, so nothing is skipped or kept."""
    env = new_streaming_env(pg_cluster, pg_root, engine)
    execute(env.source_url,
            "CREATE TABLE public.odd (at timestamptz, label text, v numeric, PRIMARY KEY (at, label))",
            "INSERT INTO public.odd SELECT at::timestamptz, label, CASE at WHEN '-infinity' "
            "THEN 1.0 WHEN 'infinity' THEN 'NaN' ELSE -0.000 END FROM "
            "unnest(ARRAY['-infinity', '4713-01-01 00:00:00+00 BC', '1999-12-31 23:59:59.999999+00',"
            " 'infinity']) at, unnest(ARRAY['', 'quote''s', 'back\\slash', E'new\\nline', '😀', "
            "E'tab\\there']) label")
    pipeline = env.pipeline("odd", ["public.odd"])
    store.sync_pipeline(pipeline)
    store.set_pipeline_status("odd", PipelineStatus.START)
    try:
        with streaming(StreamingSession(pipeline, offsets_dir=env.offsets_dir, config_store=store)):
            wait_until(lambda: _odd(env.destination_url, "replica")
                       == _odd(env.source_url, "public"), 60, "odd's load")
            execute(env.destination_url,
                    "DELETE FROM replica.odd WHERE label = '😀' AND at = 'infinity'",
                    "UPDATE replica.odd SET v = 1.00 WHERE at = '-infinity'",  # 1.0 is not 1.00
                    "INSERT INTO replica.odd VALUES ('-infinity', 'back\\slash\\', 1), "
                    "('4714-11-24 00:00:00+00 BC', 'before all', 2), "
                    "('1999-12-31 23:59:59.999999+00', 'quote''s too', 3), ('infinity', '~', 4)")
            job = store.create_backfill_job("odd", "public.odd")
            result = _runner(pipeline, store, job.id, chunk_rows=5).run()
            # One missing row, the six -infinity rows, the four planted ones.
            assert (result.inserted, result.updated, result.deleted) == (1, 6, 4)
            assert _odd(env.destination_url, "replica") == _odd(env.source_url, "public")
    finally:
        shutil.rmtree(env.offsets_dir, ignore_errors=True)
        drop_slots(env)


def _odd(url: str, schema: str) -> list[str]:
    conn = pinned_connection(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT ROW(t.*)::text FROM {}.odd t").format(
                sql.Identifier(schema)))
            return sorted(row[0] for row in cursor.fetchall())
    except psycopg2.errors.UndefinedTable:
        return []  # not loaded yet
    finally:
        conn.close()


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_cancelling_stops_within_a_chunk(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    _, pipeline = streamed
    job = store.create_backfill_job("bf", "public.big")
    runner = _runner(pipeline, store, job.id, chunk_rows=1000)
    original = runner._wait_applied
    waited = [0]

    def cancel_after_two(chunk: int) -> bool:
        applied = original(chunk)
        waited[0] += 1
        if waited[0] == 2:
            store.cancel_backfill_job(job.id)
        return applied

    runner._wait_applied = cancel_after_two  # type: ignore[method-assign]
    with pytest.raises(BackfillCancelled):
        runner.run()
    cancelled = store.get_backfill_job(job.id)
    assert cancelled.status is BackfillStatus.CANCELLED
    # Two chunks applied, then it stopped; the one read while the second was applied may land.
    assert cancelled.count_record in (2000, 3000)
    wait_until(lambda: store.get_backfill_job(job.id).count_record in (2000, 3000), 5, "steady")


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_crashed_backfill_resumes_after_its_last_applied_chunk_and_attempts_run_out(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    env, pipeline = streamed
    execute(env.destination_url, "UPDATE replica.big SET note = 'stale'")
    job = store.create_backfill_job("bf", "public.big")
    crashing = _runner(pipeline, store, job.id, chunk_rows=4000)
    original = crashing._wait_applied

    def crash_on_third(chunk: int) -> bool:
        if chunk == 3:
            raise KeyboardInterrupt  # the process dies: nothing marks the job
        return original(chunk)

    crashing._wait_applied = crash_on_third  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    interrupted = store.get_backfill_job(job.id)
    assert interrupted.status is BackfillStatus.EXECUTING
    # Chunk 4 was read and staged while chunk 3 was applied: both land.
    wait_until(lambda: store.get_backfill_job(job.id).resume_position.get("chunk") == 4, 30,
               "the stream to apply the chunks staged before the crash")

    resumed = _runner(pipeline, store, job.id, chunk_rows=4000).run()
    assert resumed.chunks == 2  # chunk 5 and the (empty) tail after the last key; not 1-4
    done = store.get_backfill_job(job.id)
    assert (done.status, done.count_record, done.attempts) == (BackfillStatus.COMPLETED, 20000, 2)
    wait_until(lambda: env.converged("public.big"), 60, "the repaired replica")

    # A job whose attempts are used up fails with a clear error instead of running again.
    again = store.create_backfill_job("bf", "public.big")
    for _ in range(2):
        store.set_backfill_status(again.id, BackfillStatus.EXECUTING)
    store.set_backfill_status(again.id, BackfillStatus.FAILED, error="destination full")
    with pytest.raises(BackfillError, match="failed after 2 attempts .* last error: destination full"):
        _runner(pipeline, store, again.id, max_attempts=2).run()
    assert store.get_backfill_job(again.id).status is BackfillStatus.FAILED


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
@pytest.mark.parametrize(("table", "filter", "message"), [
    ("public.nope", [], "pipeline bf has no table public.nope"),
    ("public.big", [{"column": "nope", "operator": "=", "value": 1}],
     "rejected: filter[0].column: table public.big has no column 'nope'"),
    ("public.big", [{"column": "id; DROP TABLE big; --", "operator": "=", "value": 1}],
     "has no column 'id; DROP TABLE big; --'"),
])
def test_bad_jobs_are_rejected_and_nothing_runs(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore,
    table: str, filter: list, message: str,
) -> None:
    env, pipeline = streamed
    job = store.create_backfill_job("bf", table, filter)
    with pytest.raises(BackfillError, match=re.escape(message)):
        _runner(pipeline, store, job.id).run()
    failed = store.get_backfill_job(job.id)
    assert failed.status is BackfillStatus.FAILED and message in (failed.error or "")
    assert count_rows(env.source_url, "public.big") == 20000


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_hostile_filter_value_is_only_a_value(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    env, pipeline = streamed
    job = store.create_backfill_job("bf", "public.big", [
        {"column": "note", "operator": "=", "value": "'; DROP TABLE public.big; --"}])
    result = _runner(pipeline, store, job.id).run()
    assert (result.total, result.rows) == (0, 0)
    assert count_rows(env.source_url, "public.big") == 20000


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_the_sensor_queues_a_partition_run_and_materializing_it_completes_the_job(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore, database_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """Through Dagster: sensor evaluation -> dynamic partition + run request -> the partition's
    materialization copies the rows (the stream applies them) -> COMPLETED with counts."""
    import logging

    from dagster import (
        DagsterInstance,
        Definitions,
        build_sensor_context,
        materialize,
        partition_loading_context,
    )

    from rosetta_dagster.core.pipeline_config import load_config
    from rosetta_dagster.defs.backfills.assets import build_backfill_asset
    from rosetta_dagster.defs.backfills.sensors import build_backfill_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    env, pipeline = streamed
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "bf", ["public.big"])
    for key, value in env.pipeline_env(path, database_url).items():
        monkeypatch.setenv(key, value)
    execute(env.destination_url, "DELETE FROM replica.big WHERE id > 15000",
            "INSERT INTO replica.big VALUES (15001, 0, 'stale'), (90000, 0, 'extra')")
    job = store.create_backfill_job("bf", "public.big",
                                    [{"column": "id", "operator": ">", "value": 15000}])
    resources = {"config_store": ConfigStoreResource(database_url=database_url)}
    config = load_config(path)
    caplog.set_level(logging.INFO)
    with DagsterInstance.ephemeral() as instance:
        sensor = build_backfill_sensor([ReplicationSet.of(config)])
        # Known to the instance up front: outside the daemon, evaluate_tick validates partition
        # keys against the instance before applying the tick's own partition requests.
        instance.add_dynamic_partitions("backfill_jobs_bf", [str(job.id)])
        definitions = Definitions(assets=[build_backfill_asset(pipeline, PipelineFile(path))],
                                  sensors=[sensor], resources=resources)
        with build_sensor_context(instance=instance, definitions=definitions,
                                  resources=resources) as context:
            # evaluate_tick, as the daemon does: it also checks every request has a target.
            with partition_loading_context(dynamic_partitions_store=instance):
                result = sensor.evaluate_tick(context)
        assert "Successfully fetched 1 pending jobs" in caplog.text
        (request,) = result.run_requests
        assert (request.partition_key, request.run_key) == (str(job.id), f"backfill-{job.id}-attempt-1")
        (added,) = result.dynamic_partitions_requests
        assert (added.partitions_def_name, list(added.partition_keys)) == ("backfill_jobs_bf",
                                                                          [str(job.id)])
        assert store.get_backfill_job(job.id).status is BackfillStatus.QUEUED
        # A later tick requests the still-QUEUED job again under the same run key (a no-op
        # for the daemon), so a tick that failed after claiming cannot strand it.
        with build_sensor_context(instance=instance, definitions=definitions,
                                  resources=resources) as context:
            with partition_loading_context(dynamic_partitions_store=instance):
                again = sensor.evaluate_tick(context)
        assert [r.run_key for r in again.run_requests] == [request.run_key]
        outcome = materialize([build_backfill_asset(pipeline, PipelineFile(path))], partition_key=str(job.id),
                              instance=instance, resources=resources)
    assert outcome.success
    metadata = outcome.asset_materializations_for_node("backfill__bf")[0].metadata
    assert metadata["rows"].value == 5000 and metadata["source_rows_matching"].value == 5000
    assert metadata["rows_per_second"].value > 0
    assert [metadata[f"rows_{kind}"].value for kind in ("inserted", "updated", "deleted")] == [
        4999, 1, 1]
    checks = {e.check_name: e for e in outcome.get_asset_check_evaluations()}
    assert checks["row_count"].passed and checks["row_count"].metadata["source_rows"].value == 5000
    assert checks["retry_attempts"].passed and checks["retry_attempts"].metadata["value"].value == 1
    done = store.get_backfill_job(job.id)
    assert (done.status, done.count_record, done.total_record) == (BackfillStatus.COMPLETED, 5000,
                                                                    5000)
    assert env.converged("public.big")


def test_fetching_pending_jobs_survives_a_config_store_restart_with_the_exact_lines(
    dedicated_cluster: LocalPostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Checklist scenario 3: the connections are cut while the sensor fetches jobs."""
    import logging

    from rosetta_dagster.core.backfill import fetch_pending_jobs
    from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool

    dedicated_cluster.create_database("config_db")
    with ResilientConnectionPool(dedicated_cluster.dsn("config_db"),
                                 PoolSettings.from_env(max_conn=2)) as pool:
        store = ConfigStore(pool)
        store.upgrade()
        dedicated_cluster.stop()
        restarted = threading.Timer(1.0, dedicated_cluster.start)
        restarted.start()
        caplog.set_level(logging.INFO, logger="rosetta.backfill")
        try:
            jobs = fetch_pending_jobs(store)
        finally:
            restarted.join()
    lines = [r.getMessage() for r in caplog.records if r.name == "rosetta.backfill"]
    assert lines[0].startswith("Database connection error fetching pending jobs (attempt 1/3): ")
    assert dedicated_cluster.password not in lines[0]
    assert lines[1] == "Retrying in 2s..."
    assert lines[-1] == "Successfully fetched 0 pending jobs"
    assert jobs == []


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_write_failure_fails_the_job_instead_of_completing_it(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore
) -> None:
    env, pipeline = streamed
    job = store.create_backfill_job("bf", "public.big")
    # The destination refuses what the job writes (here: a marks table nothing can enter).
    execute(env.destination_url, f"CREATE TABLE replica._rosetta_backfill_{job.id}_chunks "
            "(chunk int PRIMARY KEY CHECK (false))")
    with pytest.raises(BackfillError, match="database error: .*check constraint"):
        _runner(pipeline, store, job.id).run()
    failed = store.get_backfill_job(job.id)
    assert failed.status is BackfillStatus.FAILED and "check constraint" in (failed.error or "")
    assert failed.count_record == 0


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_terminating_the_backfill_run_cancels_the_job(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore, database_url: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster import DagsterExecutionInterruptedError, DagsterInstance, materialize

    from rosetta_dagster.defs.backfills.assets import build_backfill_asset
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource

    env, pipeline = streamed
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "bf", ["public.big"])
    for key, value in env.pipeline_env(path, database_url).items():
        monkeypatch.setenv(key, value)
    job = store.create_backfill_job("bf", "public.big")

    def interrupted(self: BackfillRunner, chunk: int) -> bool:
        raise DagsterExecutionInterruptedError()  # what a terminated run raises in the step

    monkeypatch.setattr(BackfillRunner, "_wait_applied", interrupted)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("backfill_jobs_bf", [str(job.id)])
        outcome = materialize([build_backfill_asset(pipeline, PipelineFile(path))], partition_key=str(job.id),
                              instance=instance, raise_on_error=False,
                              resources={"config_store": ConfigStoreResource(database_url=database_url)})
    assert not outcome.success
    assert store.get_backfill_job(job.id).status is BackfillStatus.CANCELLED


@pytest.mark.parametrize("engine", ["pgoutput"])  # above the capture (test_capture_contract)
def test_a_completed_job_stays_completed_when_its_staging_cannot_be_dropped(
    streamed: tuple[StreamingEnv, PipelineDefinition], store: ConfigStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Dropping staging comes after COMPLETED: a destination that refuses it (here: a view
    depends on a staged table; in the fuzzer: a destination restarting) keeps the tables until
    the pipeline's next job sweeps them, and the job does not fail after completing."""
    import logging

    env, pipeline = streamed
    first = store.create_backfill_job("bf", "public.big", [
        {"column": "id", "operator": "<=", "value": 100}])
    leftover = f"_rosetta_backfill_{first.id}_leftover"
    table = sql.Identifier("replica", leftover)
    execute(env.destination_url, sql.SQL("CREATE TABLE {} (x int)").format(table),
            sql.SQL("CREATE VIEW replica.pins_leftover AS SELECT x FROM {}").format(table))
    caplog.set_level(logging.WARNING, logger="rosetta.backfill")
    result = _runner(pipeline, store, first.id).run()
    assert result.rows == 100 and store.get_backfill_job(first.id).status is BackfillStatus.COMPLETED
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "rosetta.backfill"]
    assert warning.startswith(f"Backfill job {first.id}: the staging tables of completed jobs are "
                              "left in destination dst until the pipeline's next backfill: ")
    assert "depend" in warning
    staged = "SELECT tablename FROM pg_tables WHERE tablename LIKE '\\_rosetta\\_backfill\\_%' " \
             "ORDER BY 1"
    assert fetch(env.destination_url, staged) == [(f"_rosetta_backfill_{first.id}_chunks",),
                                                  (leftover,)]
    execute(env.destination_url, "DROP VIEW replica.pins_leftover")
    second = store.create_backfill_job("bf", "public.big", [
        {"column": "id", "operator": "<=", "value": 10}])
    assert _runner(pipeline, store, second.id).run().rows == 10
    assert fetch(env.destination_url, staged) == []
    assert env.converged("public.big")


@pytest.mark.parametrize("engine", ["pgoutput"])
def test_the_sensor_fails_a_job_whose_run_ended_without_recording_an_outcome(
    env: StreamingEnv, store: ConfigStore, database_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """A run whose attempt failed while the config store was unreachable could record neither
    FAILED nor CANCELLED: once the run has ended, the sensor fails the job (so it can be
    retried); a job whose run is still going is left alone."""
    import logging

    from dagster import (
        DagsterInstance,
        DagsterRunStatus,
        Definitions,
        RunsFilter,
        asset,
        build_sensor_context,
        materialize,
    )

    from rosetta_dagster.core.pipeline_config import load_config
    from rosetta_dagster.defs.backfills.sensors import JOB_TAG, build_backfill_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    execute(env.source_url, "CREATE TABLE public.big (id int PRIMARY KEY)")
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "bf", ["public.big"])
    for key, value in env.pipeline_env(path, database_url).items():
        monkeypatch.setenv(key, value)
    config = load_config(path)
    store.sync_pipeline(config.pipeline("bf"))
    ended, going = (store.create_backfill_job("bf", "public.big") for _ in range(2))
    for job in (ended, going):
        store.set_backfill_status(job.id, BackfillStatus.EXECUTING)
    copying_started, release = threading.Event(), threading.Event()

    @asset
    def lost_the_store() -> None:
        raise RuntimeError("config store unreachable")

    @asset
    def still_copying() -> None:
        copying_started.set()
        release.wait(60)

    resources = {"config_store": ConfigStoreResource(database_url=database_url)}
    caplog.set_level(logging.WARNING, logger="rosetta.backfill")
    with DagsterInstance.ephemeral() as instance:
        failed = materialize([lost_the_store], instance=instance, raise_on_error=False,
                             tags={JOB_TAG: str(ended.id)})
        assert not failed.success
        copying = threading.Thread(target=materialize, args=([still_copying],), kwargs={
            "instance": instance, "tags": {JOB_TAG: str(going.id)}})
        copying.start()
        try:
            # Told by the asset itself, not by polling the instance: the ephemeral instance's
            # in-memory SQLite refuses a read while the run's thread writes ("table is locked").
            assert copying_started.wait(30), "the still-copying run did not start"
            assert instance.get_run_records(RunsFilter(
                tags={JOB_TAG: str(going.id)}, statuses=[DagsterRunStatus.STARTED]))
            sensor = build_backfill_sensor([ReplicationSet.of(config)])
            definitions = Definitions(sensors=[sensor], resources=resources)
            with build_sensor_context(instance=instance, definitions=definitions,
                                      resources=resources) as context:
                sensor.evaluate_tick(context)
        finally:
            release.set()
            copying.join()
    message = (f"Backfill job {ended.id} (attempt 1): its run ended without recording an outcome "
               "(was the config store unreachable?); see the run's logs.")
    failed_job = store.get_backfill_job(ended.id)
    assert (failed_job.status, failed_job.error) == (BackfillStatus.FAILED, message)
    assert message in [r.getMessage() for r in caplog.records]
    assert store.get_backfill_job(going.id).status is BackfillStatus.EXECUTING
    assert store.retry_backfill_job(ended.id).status is BackfillStatus.PENDING
    # The run recorded its outcome after the sensor read the job: the sensor changes nothing.
    store.set_backfill_status(going.id, BackfillStatus.COMPLETED)
    assert not store.fail_abandoned_backfill_job(going.id, 1, message)
    assert store.get_backfill_job(going.id).status is BackfillStatus.COMPLETED
