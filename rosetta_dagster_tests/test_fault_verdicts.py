"""What the operator sees is true after every fault, on both engines: `rosetta validate` (its
exit code and lines), the checks (severities, metadata) and the API's validation agree: red
while a fault is in effect, green once the pipeline recovered and the replica caught up.

One pipeline goes through the faults in turn, as a deployment would: a source restart, a
destination outage, kill -9 of the run, a dropped slot (re-sync), a refused change (skipped),
a finished backfill. The run is ``rosetta stream`` in its own process; the test plays the
supervisor (it starts a run again once the fault is over).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from rosetta_dagster.cli import main as rosetta
from rosetta_dagster.core.backfill import BackfillRunner
from rosetta_dagster.core.config_store import ConfigStore, PipelineState, PipelineStatus
from rosetta_dagster.core.health import CheckOutcome, evaluate_pipeline
from rosetta_dagster.core.local_postgres import LocalPostgresCluster
from rosetta_dagster.core.pipeline_config import PipelineDefinition, load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.harness import StreamingEnv, execute, fetch, new_streaming_env, wait_until

NAME = "faults"
SLOT = "rosetta_faults"
OPERATIONS = {"heartbeat_timeout_seconds": 10, "parity_window_seconds": 1,
              "parity_chunk_rows": 100}
REFUSING = ("ALTER TABLE replica.items ADD CONSTRAINT v_is_not_refused CHECK (v <> 'refused') "
            "NOT VALID")


class StreamRun:
    """``rosetta stream faults`` in a process of its own, as a streaming run is."""

    def __init__(self, environment: dict[str, str], log: Path) -> None:
        self.environment = environment
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rosetta_dagster.cli", "stream", NAME],
                env=self.environment, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def ended(self, timeout_s: float = 60) -> int:
        """Wait for the run to end by itself (its stream failed or stopped); its exit code."""
        assert self.process is not None
        return self.process.wait(timeout_s)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)
        self.process.wait(60)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGKILL)


class Deployment:
    def __init__(self, env: StreamingEnv, config_url: str, path: Path,
                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        self.env = env
        self.config_url = config_url
        config = load_config(path, {"TEST_PG_PASSWORD": env.cluster.password})
        self.pipeline: PipelineDefinition = config.pipeline(NAME)
        self.operations = config.operations  # as `rosetta validate` reads them
        self.capsys = capsys
        self.environment = env.pipeline_env(path, config_url)
        for key, value in self.environment.items():
            monkeypatch.setenv(key, value)
        self.run = StreamRun(self.environment, path.parent / "stream.log")

    def cli(self, *args: str) -> tuple[int, str]:
        """A ``rosetta`` command in this process (as fast as a call); exit code and output."""
        self.capsys.readouterr()
        code = rosetta([*args])
        return code, self.capsys.readouterr().out

    def validate(self) -> tuple[int, str]:
        return self.cli("validate")

    def checks(self) -> dict[str, CheckOutcome]:
        """The pipeline's checks as its asset checks report them (the stream's, then its
        table's: one table, one destination)."""
        with ResilientConnectionPool(self.config_url, PoolSettings(max_conn=1)) as pool:
            store = ConfigStore(pool)
            return {o.name: o for _, o in evaluate_pipeline(
                self.pipeline, store.get_pipeline(NAME), self.operations,
                failures=store.recent_failures(NAME))}

    def api(self) -> tuple[int, dict[str, str]]:
        """``GET /api/v1/validation``: its status, and each failing check's severity."""
        from fastapi.testclient import TestClient

        from rosetta_dagster.api.app import create_app

        with TestClient(create_app(self.config_url)) as client:
            response = client.get("/api/v1/validation")
        failing = {c["check"]: c["severity"] for c in response.json()["checks"]
                   if not c["passed"]}
        return response.status_code, failing

    def state(self) -> tuple[PipelineStatus, PipelineState]:
        (row,) = fetch(self.config_url, "SELECT p.status, m.state FROM pipelines p JOIN "
                       "pipeline_metadata m ON m.pipeline_id = p.id WHERE p.name = %s", (NAME,))
        return PipelineStatus(row[0]), PipelineState(row[1])

    def streaming(self, change: str, message: str) -> None:
        """Once the run reports RUNNING, ``change`` written at the source arrives: the engine
        streams (not just loaded the table)."""
        wait_until(lambda: self.state() == (PipelineStatus.START, PipelineState.RUNNING), 120,
                   "the run to report RUNNING")
        execute(self.env.source_url, change)
        wait_until(lambda: self.env.converged("public.items"), 120, message)

    def assert_red(self, *lines: str) -> None:
        """``rosetta validate`` exits 1 printing each of ``lines``; the API answers 503."""
        code, out = self.validate()
        assert code == 1, out
        for line in lines:
            assert line in out, f"{line!r} not in:\n{out}"
        assert out.rstrip().endswith("FAILED: at least one ERROR-severity check failed"), out
        status, failing = self.api()
        assert status == 503 and "ERROR" in failing.values(), failing

    def assert_green(self) -> dict[str, CheckOutcome]:
        """Within 90 s, one moment at which ``rosetta validate`` exits 0 with no ERROR, the API
        answers 200 and the checks agree (every table check passes; the stream at most warns of
        failures it recovered from). Not at once: a restart leaves dead connections in the pools,
        found as they are next used, and the checklist counts one in the last minute as
        critical, so the verdict is truthfully red until that minute is over."""
        seen: list[tuple[int, str, int, dict[str, str], dict[str, CheckOutcome]]] = []

        def green() -> bool:
            code, out = self.validate()
            status, failing = self.api()
            seen.append((code, out, status, failing, self.checks()))
            return code == 0 and status == 200

        try:
            wait_until(green, 90, "validate and the API to agree the deployment is healthy")
        except AssertionError:
            code, out, status, failing, _ = seen[-1]
            raise AssertionError(f"validate exit {code}, API {status} {failing}:\n{out}") from None
        code, out, status, failing, checks = seen[-1]
        assert "FAIL ERROR" not in out and out.rstrip().endswith("OK"), out
        # What may still fail, at WARN only: the stream's recovered failures and the closed
        # connections of the last hour (the checklist's WARN threshold: 1 per hour).
        assert set(failing) <= {"stream_health", "closed_connection_errors"}, failing
        assert set(failing.values()) <= {"WARN"}, failing
        assert all(o.passed for name, o in checks.items() if name != "stream_health"), checks
        health = checks["stream_health"]
        assert health.passed or health.severity == "WARN", health
        return checks


@pytest.fixture
def destination_cluster(pg_root: Path) -> Iterator[LocalPostgresCluster]:
    """The destination's own server: it goes down in the test while the source stays up."""
    from rosetta_dagster_tests.conftest import TEST_PASSWORD

    cluster = LocalPostgresCluster(pg_root / f"destination-{uuid.uuid4().hex[:8]}",
                                   password=TEST_PASSWORD).start()
    yield cluster
    cluster.destroy()


@pytest.mark.parametrize("engine", ["pgoutput", "debezium"])
def test_each_fault_is_red_while_in_effect_and_green_once_recovered(
    engine: str, dedicated_cluster: LocalPostgresCluster,
    destination_cluster: LocalPostgresCluster, pg_cluster: LocalPostgresCluster, pg_root: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    env = new_streaming_env(dedicated_cluster, pg_root, engine, destination_cluster)
    config_url = pg_cluster.create_database(f"faults_{engine}_{uuid.uuid4().hex[:8]}")
    execute(env.source_url, "CREATE TABLE public.items (id int PRIMARY KEY, v text)",
            "INSERT INTO public.items SELECT g, 'v' || g FROM generate_series(1, 300) g")
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", NAME, ["public.items"],
                                   streaming={"heartbeat_interval_ms": 1000})
    document = yaml.safe_load(path.read_text())
    document["operations"] = OPERATIONS
    path.write_text(yaml.safe_dump(document))
    deployment = Deployment(env, config_url, path, monkeypatch, capsys)
    run = deployment.run
    slot_line = f"replication_slot/{NAME}"
    try:
        assert deployment.cli("pipeline", "sync")[0] == 0
        assert deployment.cli("pipeline", "start", NAME)[0] == 0
        run.start()
        deployment.streaming("UPDATE public.items SET v = 'streamed' WHERE id <= 5",
                             "the initial load and a streamed change")
        checks = deployment.assert_green()
        assert checks["stream_health"].passed  # nothing has failed yet

        # 1. Source restart: the run's stream fails; red while the source is down.
        dedicated_cluster.stop("fast")
        assert run.ended() != 0
        deployment.assert_red(
            f"FAIL ERROR {slot_line} stream_health: Pipeline {NAME} should stream and does "
            "not: its state is ERROR. Last failure at",
            f"FAIL ERROR {slot_line} reachable: ")
        dedicated_cluster.start()
        run.start()
        deployment.streaming("UPDATE public.items SET v = 'after restart' WHERE id <= 10",
                             "the stream after the source restart")
        checks = deployment.assert_green()
        assert not checks["stream_health"].passed
        assert checks["stream_health"].description.startswith(
            f"Pipeline {NAME} recovered at ")
        assert checks["stream_health"].metadata["failures_last_hour"] == 1

        # 2. Destination outage: the run keeps retrying its batch (it does not fail); red
        # while the destination is unreachable, green once the run caught up by itself.
        destination_cluster.stop("fast")
        execute(env.source_url, "UPDATE public.items SET v = 'while dst down' WHERE id <= 20")
        deployment.assert_red(f"FAIL ERROR {slot_line} reachable: Pipeline {NAME}: could not "
                              "connect to destination dst at ")
        destination_cluster.start()
        deployment.streaming("UPDATE public.items SET v = 'dst back' WHERE id = 1",
                             "the stream after the destination outage")
        deployment.assert_green()

        # 3. kill -9 of the run: nothing records it; its heartbeat goes stale.
        run.signal(signal.SIGKILL)
        wait_until(lambda: deployment.checks()["stream_health"].severity == "ERROR", 60,
                   "the dead run's heartbeat to go stale")
        deployment.assert_red(f"FAIL ERROR {slot_line} stream_health: Pipeline {NAME} should "
                              "stream and does not: its run stopped heartbeating.")
        stale = deployment.checks()["stream_health"].metadata
        assert float(stale["heartbeat_age_seconds"]) > OPERATIONS["heartbeat_timeout_seconds"]
        assert stale["state"] == "RUNNING"  # as the killed run left it: only the age tells
        run.start()
        deployment.streaming("UPDATE public.items SET v = 'after kill' WHERE id <= 30",
                             "the run after kill -9")
        deployment.assert_green()

        # 4. The slot dropped while the run was stopped: red until a new run re-synced.
        run.signal(signal.SIGTERM)
        wait_until(lambda: fetch(env.source_url, "SELECT active FROM pg_replication_slots "
                                 "WHERE slot_name = %s", (SLOT,)) == [(False,)], 30,
                   "the slot's release")
        execute(env.source_url, f"SELECT pg_drop_replication_slot('{SLOT}')",
                "DELETE FROM public.items WHERE id BETWEEN 200 AND 220",
                "UPDATE public.items SET v = 'while no slot' WHERE id <= 40")
        deployment.assert_red(
            f"FAIL ERROR {slot_line} stream_health: Pipeline {NAME} should stream and does "
            "not: its state is PAUSED.",
            f"FAIL ERROR {slot_line} slot_active: ")
        run.start()
        deployment.streaming("UPDATE public.items SET v = 'after re-sync' WHERE id = 2",
                             "the re-sync after the dropped slot")
        deployment.assert_green()

        # 5. A change the destination refuses: the run stops on it; red until it is skipped
        # (and the source row was fixed, so the tables are equal again).
        execute(env.destination_url, REFUSING)
        execute(env.source_url, "UPDATE public.items SET v = 'refused' WHERE id = 7")
        assert run.ended() != 0
        assert deployment.state() == (PipelineStatus.PAUSE, PipelineState.ERROR)
        refused = deployment.checks()["apply_errors"]
        assert (refused.passed, refused.severity, refused.metadata["key"]) == (
            False, "ERROR", '{"id": "7"}')
        deployment.assert_red(
            f"FAIL ERROR destination/dst/replica/items apply_errors: Pipeline {NAME}: destination "
            "dst refused the update of public.items key (id=7) at source position ")
        position = str(refused.metadata["position"])
        assert deployment.cli("pipeline", "skip", NAME, "--position", position, "--yes")[0] == 0
        assert deployment.cli("pipeline", "start", NAME)[0] == 0
        run.start()
        deployment.streaming("UPDATE public.items SET v = 'fixed' WHERE id = 7",
                             "the stream after the skipped change")
        deployment.assert_green()

        # 6. A backfill of the table, finished while the stream runs.
        code, out = deployment.cli("backfill", "request", NAME, "public.items")
        assert code == 0, out
        (job_id,) = fetch(config_url, "SELECT max(id) FROM backfill_jobs")[0]
        with ResilientConnectionPool(config_url, PoolSettings(max_conn=2)) as pool:
            BackfillRunner(deployment.pipeline, ConfigStore(pool), int(job_id)).run()
        wait_until(lambda: env.converged("public.items"), 60, "the backfilled table")
        code, out = deployment.validate()
        assert f"{job_id} {NAME} COMPLETED at " in out, out
        deployment.assert_green()
    finally:
        run.close()
        if run.log.exists():
            print(run.log.read_text(errors="replace")[-6000:])  # shown when the test failed
