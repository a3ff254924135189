"""Alerts reach people: the notification sensor posts to real local HTTP servers on state
changes only (one per transition, resolution sent, nothing repeated across a restart), retries
a failing endpoint and records every attempt, respects severity and pipeline filters, and never
logs a channel's secret URL."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from rosetta_dagster.core.config_store import (
    BackfillStatus,
    ConfigStore,
    ParkedRow,
    PipelineState,
)
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.core.notify import FIRING, REPEAT, Alert, advance, store_alerts
from rosetta_dagster.core.pipeline_config import PipelineConfigError, load_config
from rosetta_dagster.harness import StreamingEnv, execute, new_streaming_env

SECRET_PATH = "/hooks/T0SECRET/B0SECRET/xoxb-0123456789"


@dataclass
class Receiver:
    """A local webhook endpoint: records each post; answers 500 to the first ``failures``."""

    failures: int = 0
    posts: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    attempts: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{SECRET_PATH}"

    def texts(self) -> list[str]:
        return [post["text"] for post in self.posts]


@pytest.fixture
def receivers() -> Iterator[dict[str, Receiver]]:
    started: dict[str, Receiver] = {}

    def serve(receiver: Receiver) -> Receiver:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.attempts += 1
                if receiver.attempts <= receiver.failures:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.posts.append(body)
                receiver.headers.append(dict(self.headers))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        receiver.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
        return receiver

    started.update(ops=serve(Receiver()), pager=serve(Receiver()), other=serve(Receiver()),
                   flaky=serve(Receiver(failures=2)))
    yield started
    for receiver in started.values():
        assert receiver.server is not None
        receiver.server.shutdown()


@pytest.fixture
def env(pg_cluster: LocalPostgresCluster, pg_root: Path) -> StreamingEnv:
    environment = new_streaming_env(pg_cluster, pg_root, "pgoutput")
    execute(environment.source_url, "CREATE TABLE public.orders (id int PRIMARY KEY)",
            "CREATE TABLE public.stock (id int PRIMARY KEY)")
    return environment


def _config_file(env: StreamingEnv, tmp_path: Path, receivers: dict[str, Receiver],
                 down_port: int) -> Path:
    path = env.write_pipeline_file(tmp_path / "rosetta.yaml", "orders", ["public.orders"])
    document = yaml.safe_load(path.read_text())
    document["pipelines"]["stock"] = {**document["pipelines"]["orders"], "tables": ["public.stock"]}
    document["notifications"] = {
        "dagster_ui_url": "http://dagster.example:3000/",
        "repeat_minutes": 60,
        "channels": [
            {"name": "ops", "url": "${HOOK_OPS}",
             "headers": {"Authorization": "Bearer ${HOOK_TOKEN}"}},
            {"name": "pager", "url": "${HOOK_PAGER}", "min_severity": "ERROR"},
            {"name": "stock-team", "url": "${HOOK_OTHER}", "pipelines": ["stock"]},
            {"name": "flaky", "url": "${HOOK_FLAKY}", "pipelines": ["orders"]},
            {"name": "down", "url": "${HOOK_DOWN}", "min_severity": "ERROR"},
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
def deployment(env: StreamingEnv, tmp_path: Path, receivers: dict[str, Receiver],
               monkeypatch: pytest.MonkeyPatch, store: ConfigStore) -> Path:
    down_port = find_free_port()  # nothing listens there
    path = _config_file(env, tmp_path, receivers, down_port)
    for variable, value in {
        "TEST_PG_PASSWORD": env.cluster.password, "HOOK_TOKEN": "s3cret-token",
        "HOOK_OPS": receivers["ops"].url, "HOOK_PAGER": receivers["pager"].url,
        "HOOK_OTHER": receivers["other"].url, "HOOK_FLAKY": receivers["flaky"].url,
        "HOOK_DOWN": f"http://127.0.0.1:{down_port}{SECRET_PATH}",
        "ROSETTA_CONFIG": str(path),
    }.items():
        monkeypatch.setenv(variable, value)
    for pipeline in load_config(path).pipelines.values():
        store.sync_pipeline(pipeline)
    return path


def test_one_notification_per_transition_with_filters_retries_and_no_repeats_after_restart(
    deployment: Path, receivers: dict[str, Receiver], store: ConfigStore, database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dagster import (
        AssetCheckEvaluation,
        AssetCheckSeverity,
        AssetKey,
        DagsterInstance,
        build_sensor_context,
    )

    from rosetta_dagster.defs.alerts.sensors import build_notification_sensor
    from rosetta_dagster.defs.platform.resources import ConfigStoreResource
    from rosetta_dagster.defs.replication_set import ReplicationSet

    caplog.set_level("INFO")
    config = load_config(deployment)
    sensor = build_notification_sensor([ReplicationSet.of(config)], outbox_retry_s=0)
    instance = DagsterInstance.ephemeral()
    resources = {"config_store": ConfigStoreResource(database_url=database_url)}
    lag_asset = AssetKey(["destination", "dst", "replica", "orders"])

    def report(passed: bool, severity: AssetCheckSeverity, value: float) -> None:
        instance.report_runless_asset_event(AssetCheckEvaluation(
            asset_key=lag_asset, check_name="replication_lag", passed=passed, severity=severity,
            description=f"Replication lag is {value:g}s.",
            metadata={"value": value, "warning_threshold": 60, "critical_threshold": 300}))

    def tick(cursor: str | None) -> str | None:
        with build_sensor_context(instance=instance, cursor=cursor, resources=resources) as ctx:
            return sensor(ctx).cursor

    # Nothing failing: nothing sent.
    report(True, AssetCheckSeverity.WARN, 0)
    cursor = tick(None)
    assert all(not r.posts for r in receivers.values())

    # A check goes WARN: one post to the channels taking WARN for this pipeline.
    report(False, AssetCheckSeverity.WARN, 75)
    cursor = tick(cursor)
    ops = receivers["ops"].posts
    assert len(ops) == 1
    assert ops[0]["text"] == ("[WARN] Pipeline orders: replication_lag on "
                              "destination/dst/replica/orders: Replication lag is 75s.")
    assert {k: ops[0][k] for k in ("status", "transition", "severity", "pipeline", "check",
                                   "value", "threshold")} == {
        "status": "firing", "transition": FIRING, "severity": "WARN", "pipeline": "orders",
        "check": "replication_lag", "value": 75, "threshold": 60}
    assert ops[0]["url"] == ("http://dagster.example:3000/assets/destination/dst/replica/orders"
                             "?view=checks")
    assert ops[0]["first_seen"]
    assert receivers["ops"].headers[0]["Authorization"] == "Bearer s3cret-token"
    assert receivers["pager"].posts == []  # ERROR and up only
    assert receivers["other"].posts == []  # another pipeline only
    # The flaky endpoint failed twice and took the third attempt; every attempt is recorded.
    assert len(receivers["flaky"].posts) == 1
    flaky = [r for r in store.list_notifications() if r.channel == "flaky"]
    assert [(r.attempt, r.delivered, r.http_status) for r in reversed(flaky)] == [
        (1, False, 500), (2, False, 500), (3, True, 200)]

    # Still failing, evaluated again: no repeat before repeat_minutes; nor after a restart
    # that lost the cursor (the delivered notification is known by its key).
    report(False, AssetCheckSeverity.WARN, 80)
    cursor = tick(cursor)
    tick(None)
    assert len(receivers["ops"].posts) == 1

    # The pipeline goes ERROR: pager and ops get it; the unreachable channel is retried and
    # recorded, with the reason and never the URL.
    store.record_pipeline_state("orders", PipelineState.ERROR, error="destination dst refused")
    cursor = tick(cursor)
    assert receivers["pager"].texts() == [
        "[ERROR] Pipeline orders is in ERROR: destination dst refused"]
    assert receivers["ops"].texts()[-1] == receivers["pager"].texts()[-1]
    down = [r for r in store.list_notifications() if r.channel == "down"]
    assert len(down) == 3 and not any(r.delivered for r in down)
    cursor = tick(cursor)  # retried from the outbox (no wait in this test)
    down = [r for r in store.list_notifications() if r.channel == "down"]
    assert [r.attempt for r in reversed(down)] == [1, 2, 3, 4, 5, 6]
    assert all("refused" in (r.error or "").lower() for r in down)

    # Both conditions recover: one RESOLVED each, to the channels that got the alert.
    report(True, AssetCheckSeverity.WARN, 0)
    store.record_pipeline_state("orders", PipelineState.RUNNING)
    cursor = tick(cursor)
    assert receivers["ops"].texts()[-2:] == [
        "[RESOLVED] Pipeline orders: replication_lag on destination/dst/replica/orders passes "
        "again.", "[RESOLVED] Pipeline orders recovered from ERROR."]
    assert receivers["pager"].texts()[-1] == "[RESOLVED] Pipeline orders recovered from ERROR."
    assert receivers["ops"].posts[-1]["status"] == "resolved"
    tick(cursor)
    assert len(receivers["ops"].posts) == 4 and len(receivers["pager"].posts) == 2
    assert receivers["other"].posts == []

    # The secret URLs reached neither a log nor the notification log.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    stored = json.dumps([dataclasses.asdict(r) for r in store.list_notifications(1000)],
                        default=str)
    assert "SECRET" not in logged and "SECRET" not in stored
    assert "s3cret-token" not in logged and "s3cret-token" not in stored


def test_the_config_store_conditions_fire_and_resolve(
    deployment: Path, store: ConfigStore
) -> None:
    pipelines = ["orders", "stock"]
    assert store_alerts(store, pipelines) == []
    store.record_offset_cleanup(pipeline="orders", offset_file="tmp/offsets/orders.dat",
                                slot_name="rosetta_orders", reason="replication slot gone")
    job = store.create_backfill_job("stock", "public.stock")
    store.set_backfill_status(job.id, BackfillStatus.FAILED, error="source unreachable")
    store.park_events("stock", [ParkedRow("dst", "public.stock", {"id": "7"}, "insert",
                                          "0/16B3748", {"op": "c"}, "violates check", "23514")])
    alerts = {a.key: a for a in store_alerts(store, pipelines)}
    assert set(alerts) == {"resync:orders", f"backfill:{job.id}", "parked:stock:dst:public.stock"}
    assert alerts["resync:orders"].text == (
        "Pipeline orders: replication slot gone; its stale offset (tmp/offsets/orders.dat) was "
        "deleted and it re-syncs from a fresh snapshot.")
    assert alerts[f"backfill:{job.id}"].severity == "ERROR"
    assert "source unreachable" in alerts[f"backfill:{job.id}"].text
    assert alerts["parked:stock:dst:public.stock"].value == 1
    # The re-sync is over once the pipeline streams again; the others once dealt with.
    store.record_pipeline_state("orders", PipelineState.RUNNING)
    store.retry_backfill_job(job.id)
    store.discard_parked("stock")
    assert store_alerts(store, pipelines) == []


def test_transitions_repeat_at_most_every_repeat_interval() -> None:
    state: dict[str, Any] = {}
    lag = Alert("check:x:replication_lag", "WARN", "lag is 75s", since=1000.0)
    assert [n.transition for n in advance(state, [lag], 1000, 3600)] == [FIRING]
    assert advance(state, [lag], 2000, 3600) == []
    repeated = advance(state, [lag], 4700, 3600)
    assert [(n.transition, n.sequence, n.first_seen) for n in repeated] == [(REPEAT, 1, 1000.0)]
    assert repeated[0].text.startswith("[WARN, failing since 1970-01-01T00:16:40+00:00]")
    worse = Alert("check:x:replication_lag", "ERROR", "lag is 400s", since=4800.0)
    assert [(n.transition, n.alert.severity, n.first_seen)
            for n in advance(state, [worse], 4800, 3600)] == [(FIRING, "ERROR", 4800.0)]
    assert [n.text for n in advance(state, [], 4900, 3600)] == ["[RESOLVED] lag is 400s"]
    assert state["active"] == {}


def test_cli_api_and_config_validation(
    deployment: Path, receivers: dict[str, Receiver], store: ConfigStore, database_url: str,
    tmp_path: Path,
) -> None:
    from fastapi.testclient import TestClient

    from rosetta_dagster.api.app import create_app

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "rosetta_dagster.cli", *args],
                              env={**os.environ, "CONFIG_DATABASE_URL": database_url},
                              capture_output=True, text=True, timeout=60)

    sent = cli("notifications", "test", "--channel", "ops")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "ops: delivered"
    assert receivers["ops"].texts() == [
        "[ERROR] Rosetta test notification: this channel receives Rosetta's alerts."]
    listed = cli("notifications", "list")
    assert "ops\tTEST\tattempt 1\tdelivered" in listed.stdout
    assert "SECRET" not in sent.stdout + sent.stderr + listed.stdout + listed.stderr
    unknown = cli("notifications", "test", "--channel", "nope")
    assert unknown.returncode == 2
    assert "no notification channel named 'nope'" in unknown.stderr
    with TestClient(create_app(database_url)) as client:
        rows = client.get("/api/v1/notifications").json()
    assert [(r["channel"], r["transition"], r["delivered"]) for r in rows] == [
        ("ops", "TEST", True)]

    # Bad notification settings: one sentence naming the file, the channel and the field.
    document = yaml.safe_load(deployment.read_text())
    for channel, problem in (
        ({"name": "x", "url": "https://hooks.example/literal"},
         "notification channel 'x' field 'url' must be an ${ENV_VAR} reference"),
        ({"name": "x", "url": "${HOOK_OPS}", "min_severity": "INFO"},
         "field 'min_severity' must be one of WARN, ERROR"),
        ({"name": "x", "url": "${HOOK_OPS}", "pipelines": ["nope"]},
         "field 'pipelines' names the unknown pipeline 'nope'"),
        ({"name": "x", "url": "${NOT_SET_ANYWHERE}"},
         "refers to the environment variable NOT_SET_ANYWHERE, which is not set"),
    ):
        document["notifications"]["channels"] = [channel]
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(document))
        with pytest.raises(PipelineConfigError, match=problem.replace("$", r"\$")
                           .replace("{", r"\{").replace("}", r"\}")):
            load_config(bad)
