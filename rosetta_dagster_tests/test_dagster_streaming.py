"""The streaming job launched and terminated through a real Dagster instance (dagster dev)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster_graphql import DagsterGraphQLClient

from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.local_stack import write_dagster_instance_yaml
from rosetta_dagster_tests.streaming_support import (
    StreamingEnv,
    execute,
    fetch,
    new_streaming_env,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


class DagsterDev:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process, self.port, self.log = process, port, log
        self.client = DagsterGraphQLClient("127.0.0.1", port_number=port)

    def wait_loaded(self, timeout_s: float = 120) -> None:
        query = "{ workspaceOrError { ... on Workspace { locationEntries { loadStatus } } } }"

        def loaded() -> bool:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/server_info", timeout=2)
                entries = self.client._execute(query)["workspaceOrError"]["locationEntries"]
            except Exception:  # noqa: BLE001 - still starting
                return False
            return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)

        wait_until(loaded, timeout_s, "dagster dev to load the code location")

    def status(self, run_id: str) -> str:
        return self.client.get_run_status(run_id).value


@pytest.fixture
def env(pg_cluster: LocalPostgresCluster, pg_root: Path) -> StreamingEnv:
    return new_streaming_env(pg_cluster, pg_root)


@pytest.fixture
def dagster_dev(env: StreamingEnv, pg_root: Path) -> Iterator[DagsterDev]:
    cluster = env.cluster
    workdir = pg_root / f"dagster-{env.source_db}"
    workdir.mkdir()
    storage_db = f"dagster_{env.source_db}"
    cluster.create_database(storage_db)
    config_db = f"config_{env.source_db}"
    cluster.create_database(config_db)
    write_dagster_instance_yaml(workdir / "home", cluster, storage_db, "TEST_PG_PASSWORD")
    pipeline_file = env.write_pipeline_file(workdir / "rosetta.yaml", "orders", ["public.orders"])
    port = find_free_port()
    log = workdir / "dagster-dev.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=workdir, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**env.pipeline_env(pipeline_file, cluster.dsn(config_db)),
             "DAGSTER_HOME": str(workdir / "home")},
    )
    dev = DagsterDev(process, port, log)
    dev.config_url = cluster.dsn(config_db)  # type: ignore[attr-defined]
    try:
        yield dev
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_terminating_the_run_cancels_cleanly_and_restart_does_not_resnapshot(
    env: StreamingEnv, dagster_dev: DagsterDev
) -> None:
    execute(env.source_url,
            "CREATE TABLE public.orders (id int PRIMARY KEY, amount numeric(10,2), note text)",
            "INSERT INTO public.orders SELECT g, g, 'n' FROM generate_series(1, 200) g")
    dagster_dev.wait_loaded()
    first = dagster_dev.client.submit_job_execution("stream_orders")
    wait_until(lambda: env.converged("public.orders"), 120, "the snapshot through Dagster")
    execute(env.source_url, "UPDATE public.orders SET note = 'updated' WHERE id <= 20",
            "DELETE FROM public.orders WHERE id > 190")
    wait_until(lambda: env.converged("public.orders"), 60, "streamed changes")
    assert dagster_dev.status(first) == "STARTED"
    config_url = dagster_dev.config_url  # type: ignore[attr-defined]
    assert fetch(config_url, "SELECT m.state FROM pipeline_metadata m") == [("RUNNING",)]

    dagster_dev.client.terminate_run(first)
    started = time.monotonic()
    wait_until(lambda: dagster_dev.status(first) in TERMINAL, 30, "the run to end")
    assert dagster_dev.status(first) == "CANCELED"
    assert time.monotonic() - started < 10
    slot = "SELECT active FROM pg_replication_slots WHERE slot_name = 'rosetta_orders'"
    wait_until(lambda: fetch(env.source_url, slot) == [(False,)], 10, "the slot to be released")
    assert fetch(config_url, "SELECT m.state FROM pipeline_metadata m") == [("PAUSED",)]
    applied_first = fetch(config_url, "SELECT sum(record_count) FROM data_flow_record_monitoring")
    assert applied_first == [(230,)]  # 200 snapshot rows + 20 updates + 10 deletes

    # Changes while stopped; the next run resumes from the offsets: no second snapshot.
    execute(env.source_url, "INSERT INTO public.orders VALUES (1000, 1, 'late')",
            "UPDATE public.orders SET amount = 0 WHERE id = 1")
    second = dagster_dev.client.submit_job_execution("stream_orders")
    wait_until(lambda: env.converged("public.orders"), 120, "the resumed stream")
    total = fetch(config_url, "SELECT sum(record_count) FROM data_flow_record_monitoring")[0][0]
    # A snapshot would add 201 rows. At-least-once delivery may replay the last streamed
    # transactions whose commit was not yet confirmed (no heartbeat since), nothing more.
    assert 232 <= total <= 262, total
    dagster_dev.client.terminate_run(second)
    wait_until(lambda: dagster_dev.status(second) in TERMINAL, 30, "the second run to end")
    assert dagster_dev.status(second) == "CANCELED"
