"""The REST API served by `rosetta api` (uvicorn), called over HTTP, on a real config store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from rosetta_dagster.core.config_store import ConfigStore, ParkedRow, PipelineState
from rosetta_dagster.core.destination.errors import RefusedChange
from rosetta_dagster.core.local_postgres import LocalPostgresCluster, find_free_port
from rosetta_dagster.core.pipeline_config import Destination, PipelineDefinition, PostgresEndpoint, TableRef
from rosetta_dagster.harness import execute, new_streaming_env, wait_until

TOKEN = "test-token-0123456789"


@dataclass
class Api:
    url: str
    process: subprocess.Popen[str]

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)

    def post(self, path: str, json: object = None, token: str | None = TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.url + path, json=json, headers=headers, timeout=10)


def _serve(database_url: str, *args: str, token: str | None = TOKEN,
           environment: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**(environment or os.environ), "CONFIG_DATABASE_URL": database_url}
    env.pop("ROSETTA_API_TOKEN", None)
    if token:
        env["ROSETTA_API_TOKEN"] = token
    return subprocess.Popen([sys.executable, "-m", "rosetta_dagster.cli", "api", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture
def api(store: ConfigStore, database_url: str) -> Iterator[Api]:
    endpoint = PostgresEndpoint(name="src", host="127.0.0.1", port=5432, database="shop",
                                user="replicator", password=None)
    store.sync_pipeline(PipelineDefinition(
        name="orders", source=endpoint,
        destinations=(Destination(name="warehouse", host="127.0.0.1", port=5433, database="w",
                                  user="u", password=None),),
        tables=(TableRef("public", "orders"), TableRef("public", "customers")),
    ))
    with _served(database_url) as served:
        yield served


@contextmanager
def _served(database_url: str, environment: Mapping[str, str] | None = None) -> Iterator[Api]:
    port = find_free_port()
    process = _serve(database_url, "--port", str(port), environment=environment)
    served = Api(f"http://127.0.0.1:{port}", process)

    def up() -> bool:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            return served.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, 60, "the API to serve")
        yield served
    finally:
        process.terminate()
        process.wait(10)


def test_pipelines_can_be_listed_read_started_and_paused(api: Api, store: ConfigStore) -> None:
    store.record_pipeline_state("orders", PipelineState.ERROR, error="source unreachable")
    listed = api.get("/api/v1/pipelines")
    assert listed.status_code == 200
    (orders,) = listed.json()
    assert {k: orders[k] for k in ("name", "status", "state", "last_error", "destinations",
                                   "tables")} == {
        "name": "orders", "status": "PAUSE", "state": "ERROR", "last_error": "source unreachable",
        "destinations": ["warehouse"], "tables": ["public.orders", "public.customers"]}
    assert isinstance(orders["id"], int)

    started = api.post("/api/v1/pipelines/orders/start")
    assert started.status_code == 200 and started.json()["status"] == "START"
    assert store.get_pipeline("orders").status.value == "START"
    assert api.post("/api/v1/pipelines/orders/pause").json()["status"] == "PAUSE"
    assert api.get("/api/v1/pipelines/orders").json()["status"] == "PAUSE"

    missing = api.get("/api/v1/pipelines/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "Pipeline 'nope' does not exist."}
    assert api.post("/api/v1/pipelines/nope/start").status_code == 404
    unknown_route = api.post("/api/v1/pipelines/orders/explode")
    assert unknown_route.status_code in (404, 405) and "error" in unknown_route.json()


def test_mutating_endpoints_need_the_bearer_token(api: Api, store: ConfigStore) -> None:
    for token in (None, "wrong-token"):
        refused = api.post("/api/v1/pipelines/orders/start", token=token)
        assert refused.status_code == 401
        assert "Bearer" in refused.json()["error"]
    assert store.get_pipeline("orders").status.value == "PAUSE"
    assert api.get("/api/v1/pipelines").status_code == 200  # reading needs none


def test_backfills_are_requested_read_and_cancelled(api: Api, store: ConfigStore) -> None:
    body = {"table": "public.orders",
            "filter": [{"column": "id", "operator": "between", "value": [1, 100]},
                       {"column": "note", "operator": "=", "value": "'; DROP TABLE x; --"}]}
    created = api.post("/api/v1/pipelines/orders/backfills", body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert (job["pipeline"], job["table"], job["status"]) == ("orders", "public.orders", "PENDING")
    assert job["filter"][1]["value"] == "'; DROP TABLE x; --"  # kept as a plain value
    assert api.get(f"/api/v1/backfills/{job['id']}").json()["status"] == "PENDING"
    cancelled = api.post(f"/api/v1/backfills/{job['id']}/cancel")
    assert cancelled.json()["status"] == "CANCELLED"
    assert store.get_backfill_job(job["id"]).status.value == "CANCELLED"
    assert api.get("/api/v1/backfills/999999").status_code == 404
    assert api.post("/api/v1/backfills/999999/cancel").status_code == 404


def test_a_filtered_backfill_of_a_table_without_a_key_is_refused_before_it_is_queued(
    pg_cluster: LocalPostgresCluster, pg_root: Path, store: ConfigStore, database_url: str,
    tmp_path: Path,
) -> None:
    """The API reads the source table's key with the pipeline file, as the CLI does."""
    env = new_streaming_env(pg_cluster, pg_root, "pgoutput")
    execute(env.source_url, "CREATE TABLE public.log (note text)",
            "ALTER TABLE public.log REPLICA IDENTITY FULL")
    pipeline_file = env.write_pipeline_file(tmp_path / "rosetta.yaml", "logs", ["public.log"])
    store.sync_pipeline(env.load_pipeline(pipeline_file, "logs"))
    with _served(database_url, env.pipeline_env(pipeline_file, database_url)) as api:
        filtered = api.post("/api/v1/pipelines/logs/backfills", {
            "table": "public.log", "filter": [{"column": "note", "operator": "=", "value": "x"}]})
        assert (filtered.status_code, filtered.json()) == (422, {
            "error": "Invalid request: public.log has no key, so a backfill re-copies the whole "
                     "table (one chunk, replaced at once); request it without a filter."})
        assert store.list_backfill_jobs(pipeline="logs") == []
        whole = api.post("/api/v1/pipelines/logs/backfills", {"table": "public.log"})
        assert whole.status_code == 201, whole.text


@pytest.mark.parametrize(("body", "field"), [
    ({"filter": []}, "table"),
    ({"table": "public.nope"}, "table"),
    ({"table": "public.orders", "filter": [{"column": "id", "operator": "drop", "value": 1}]},
     "filter.0.operator"),
    ({"table": "public.orders", "filter": [{"column": "id", "operator": "in", "value": 3}]},
     "filter[0]"),
    ({"table": "public.orders", "filter": [{"operator": "=", "value": 1}]}, "filter.0.column"),
])
def test_a_bad_backfill_body_is_422_naming_the_field(api: Api, body: dict, field: str) -> None:
    response = api.post("/api/v1/pipelines/orders/backfills", body)
    assert response.status_code == 422, response.text
    assert f"field '{field}'" in response.json()["error"] or field in response.json()["error"]


def test_health_metrics_and_openapi(api: Api, store: ConfigStore) -> None:
    assert api.get("/healthz").json()["status"] == "ok"
    store.record_flows("orders", [("warehouse", "public.orders", 42)])
    store.record_wal_reading(source="src", slot_name="rosetta_orders", status="OK",
                             pipeline="orders", retained_wal_bytes=123456)
    text = api.get("/metrics").text
    assert ('rosetta_events_applied_total{destination="warehouse",pipeline="orders",'
            'table="public.orders"} 42.0') in text
    assert 'rosetta_retained_wal_bytes{pipeline="orders",slot="rosetta_orders",source="src"} ' \
        "123456.0" in text
    assert 'rosetta_api_pool_connections{kind="max"} 4.0' in text
    spec = api.get("/openapi.json").json()
    assert {"/api/v1/pipelines", "/api/v1/pipelines/{name}/backfills", "/api/v1/backfills/{job_id}",
            "/healthz", "/metrics"} <= set(spec["paths"])


def test_healthz_fails_when_the_config_store_is_gone(
    dedicated_cluster: LocalPostgresCluster, tmp_path: Path
) -> None:
    cluster = dedicated_cluster
    cluster.create_database("config_api")
    port = find_free_port()
    process = _serve(cluster.dsn("config_api"), "--port", str(port))
    api = Api(f"http://127.0.0.1:{port}", process)
    try:
        wait_until(lambda: _status(api) == 200, 60, "the API to serve")
        cluster.stop()
        response = api.get("/healthz")
        assert response.status_code == 503
        assert "config_db" in response.json()["error"] or "connect" in response.json()["error"]
        assert cluster.password not in response.text
    finally:
        process.terminate()
        process.wait(10)


def _status(api: Api) -> int:
    try:
        return api.get("/healthz").status_code
    except httpx.HTTPError:
        return 0


def test_the_api_refuses_a_non_loopback_address_without_a_token(database_url: str) -> None:
    process = _serve(database_url, "--host", "0.0.0.0", "--port", str(find_free_port()),  # noqa: S104
                     token=None)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "refusing to serve the API on 0.0.0.0 without ROSETTA_API_TOKEN" in output


def test_refused_and_parked_changes_are_reported_and_handled(api: Api, store: ConfigStore) -> None:
    report = {"pipeline": "orders", "destination": "warehouse", "table": "public.orders",
              "key": {"id": "7"}, "operation": "update", "position": "0/16B3F28",
              "source_time": "2026-11-30T10:00:00.000+00:00", "column": None,
              "sqlstate": "23514", "message": 'new row violates check constraint "c"'}
    store.record_apply_error("orders", RefusedChange.from_dict(report))
    store.park_events("orders", [ParkedRow("warehouse", "public.orders", {"id": str(i)}, "insert",
                                           "0/1", {"op": "c"}, "refused", "23514")
                                 for i in (1, 1, 2)])
    assert api.get("/api/v1/pipelines/orders").json()["stopped_on"] == report
    parked = api.get("/api/v1/pipelines/orders/parked").json()
    assert [(p["table"], p["key"], p["attempts"]) for p in parked] == [
        ("public.orders", {"id": "1"}, 1), ("public.orders", {"id": "1"}, 1),
        ("public.orders", {"id": "2"}, 1)]
    metrics = api.get("/metrics").text
    assert ('rosetta_parked_events{destination="warehouse",pipeline="orders",'
            'table="public.orders"} 3.0') in metrics
    assert 'rosetta_pipeline_stopped_on_refused_change{pipeline="orders"} 1.0' in metrics
    assert api.post("/api/v1/pipelines/orders/parked/retry", {"key": {"id": "1"}},
                    token=None).status_code == 401
    assert api.post("/api/v1/pipelines/orders/parked/retry", {"key": {"id": "1"}}).json() == {
        "count": 2}
    assert [p.retry_requested_at is not None for p in store.list_parked("orders")] == [
        True, True, False]
    assert api.post("/api/v1/pipelines/orders/parked/discard",
                    {"table": "public.orders", "key": {"id": "2"}}).json() == {"count": 1}
    assert len(store.list_parked("orders")) == 2
    assert api.get("/api/v1/pipelines/nope/parked").status_code == 404
