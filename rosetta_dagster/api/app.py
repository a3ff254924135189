"""Rosetta's REST API (FastAPI): pipelines, backfill jobs, health and Prometheus metrics.

Reads and writes the config store only; the Dagster daemon's sensors act on what it records
(desired pipeline status, pending backfill jobs). Mutating endpoints need the bearer token from
``ROSETTA_API_TOKEN`` when one is set; ``rosetta api`` refuses non-loopback addresses without it.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at runtime.
"""

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rosetta_dagster.core.backfill.request import check_backfill_request
from rosetta_dagster.core.config_store import BackfillJob, ConfigStore, ParkedEvent, Pipeline
from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.filters import OPERATORS, FilterError, parse_filter
from rosetta_dagster.core.pipeline_config import TableRef, load_config
from rosetta_dagster.core.pool import PoolSettings, ResilientConnectionPool
from rosetta_dagster.core.replication import application_name
from rosetta_dagster.validation import build_report

logger = logging.getLogger("rosetta.api")
POOL_REPORT_INTERVAL_S = 30.0

API_TOKEN_ENV = "ROSETTA_API_TOKEN"


class PipelineOut(BaseModel):
    id: int
    name: str
    status: Literal["START", "PAUSE"] = Field(description="Desired status, set by users.")
    state: Literal["RUNNING", "PAUSED", "ERROR"] = Field(description="Observed streaming state.")
    last_error: str | None
    destinations: list[str]
    tables: list[str]
    heartbeat_at: datetime | None
    last_start_at: datetime | None
    stopped_on: dict[str, Any] | None = Field(
        default=None, description="The change a destination refused that the pipeline stopped "
        "on: pipeline, destination, table, key, operation, position, source_time, column, "
        "sqlstate, message.")
    lag_seconds: float | None = Field(
        default=None, description="Replication lag at the last measurement: 0 when nothing is "
        "pending, else the age of the oldest source commit not yet applied (None: not measured).")
    lag_bytes: int | None = Field(
        default=None, description="Source WAL between its current position and the position "
        "applied, at the last measurement.")
    lag_measured_at: datetime | None = None

    @classmethod
    def of(cls, pipeline: Pipeline) -> "PipelineOut":
        return cls(
            id=pipeline.id, name=pipeline.name, status=pipeline.status.value,
            state=pipeline.state.value, last_error=pipeline.last_error,
            destinations=pipeline.destinations, tables=pipeline.tables,
            heartbeat_at=pipeline.heartbeat_at, last_start_at=pipeline.last_start_at,
            stopped_on=(pipeline.last_apply_error.as_dict()
                        if pipeline.last_apply_error is not None else None),
            lag_seconds=pipeline.lag.seconds if pipeline.lag else None,
            lag_bytes=pipeline.lag.bytes if pipeline.lag else None,
            lag_measured_at=pipeline.lag_measured_at,
        )


class NotificationOut(BaseModel):
    id: int
    channel: str = Field(description="The channel's name in rosetta.yaml (never its URL).")
    alert_key: str
    pipeline: str | None
    transition: Literal["FIRING", "REPEAT", "RESOLVED", "TEST"]
    severity: str
    text: str
    attempt: int
    delivered: bool
    http_status: int | None
    error: str | None
    created_at: datetime


class ParkedOut(BaseModel):
    id: int
    pipeline: str
    destination: str
    table: str
    key: dict[str, Any]
    operation: str
    position: str | None
    error: str
    sqlstate: str | None
    attempts: int
    retry_requested_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, parked: ParkedEvent) -> "ParkedOut":
        return cls(id=parked.id, pipeline=parked.pipeline, destination=parked.destination,
                   table=parked.table_name, key=parked.key, operation=parked.operation,
                   position=parked.position, error=parked.error, sqlstate=parked.sqlstate,
                   attempts=parked.attempts, retry_requested_at=parked.retry_requested_at,
                   created_at=parked.created_at)


class ParkedSelection(BaseModel):
    table: str | None = Field(default=None, description="schema.table (default: every table).")
    key: dict[str, Any] | None = Field(default=None, description='One key, e.g. {"id": "7"}.')


class ParkedChanged(BaseModel):
    count: int = Field(description="Parked changes asked to replay, or discarded.")


class FilterCondition(BaseModel):
    column: str = Field(min_length=1, description="A column of the table.")
    operator: Literal[tuple(OPERATORS)]  # type: ignore[valid-type]
    value: Any = Field(default=None, description="Scalar; a list for 'in' and 'between'.")


class BackfillRequest(BaseModel):
    table: str = Field(description="schema.table, one of the pipeline's tables.")
    filter: list[FilterCondition] = Field(default_factory=list)


class BackfillOut(BaseModel):
    id: int
    pipeline: str
    table: str
    filter: list[dict[str, Any]]
    status: str
    count_record: int
    total_record: int | None
    rows_inserted: int = Field(description="Destination rows the job inserted (all destinations).")
    rows_updated: int = Field(description="Destination rows it rewrote because they differed.")
    rows_deleted: int = Field(description="Destination rows it deleted: not in the source.")
    attempts: int
    error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, job: BackfillJob) -> "BackfillOut":
        return cls(
            id=job.id, pipeline=job.pipeline, table=job.table_name, filter=job.filter,
            status=job.status.value, count_record=job.count_record, total_record=job.total_record,
            rows_inserted=job.rows_inserted, rows_updated=job.rows_updated,
            rows_deleted=job.rows_deleted, attempts=job.attempts, error=job.error, created_at=job.created_at,
            updated_at=job.updated_at,
        )


class ErrorOut(BaseModel):
    error: str


def _error(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


class _ConfigStoreCollector:
    """Prometheus metrics read from the config store at scrape time."""

    def __init__(self, store: ConfigStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Any]:
        metrics = self.store.metrics_snapshot()
        events = CounterMetricFamily(
            "rosetta_events_applied", "Change events applied, per pipeline, destination and table.",
            labels=["pipeline", "destination", "table"],
        )
        for flow in metrics.flows:
            events.add_metric([flow.pipeline, flow.destination, flow.table_name],
                              float(flow.events))
        yield events
        lag = GaugeMetricFamily(
            "rosetta_replication_lag_seconds",
            "0 when nothing is pending, else the age of the oldest source commit not yet "
            "applied (last measurement, see rosetta_replication_lag_measured_timestamp).",
            labels=["pipeline"],
        )
        lag_bytes = GaugeMetricFamily(
            "rosetta_replication_lag_bytes",
            "Source WAL between its current position and the position applied.",
            labels=["pipeline"],
        )
        measured = GaugeMetricFamily("rosetta_replication_lag_measured_timestamp",
                                     "When the lag was last measured (Unix time).",
                                     labels=["pipeline"])
        up = GaugeMetricFamily("rosetta_pipeline_running", "1 while the pipeline streams.",
                               labels=["pipeline", "status", "state"])
        for pipeline in metrics.pipelines:
            up.add_metric([pipeline.name, pipeline.status, pipeline.state],
                          1.0 if pipeline.state == "RUNNING" else 0.0)
            if pipeline.lag_measured_at is None:
                continue
            measured.add_metric([pipeline.name], pipeline.lag_measured_at.timestamp())
            if pipeline.lag_seconds is not None:
                lag.add_metric([pipeline.name], float(pipeline.lag_seconds))
            if pipeline.lag_bytes is not None:
                lag_bytes.add_metric([pipeline.name], float(pipeline.lag_bytes))
        yield up
        yield lag
        yield lag_bytes
        yield measured
        stopped = GaugeMetricFamily(
            "rosetta_pipeline_stopped_on_refused_change",
            "1 while the pipeline is stopped on a change a destination refused.",
            labels=["pipeline"])
        for pipeline in metrics.pipelines:
            stopped.add_metric([pipeline.name], 1.0 if pipeline.stopped_on_refused_change else 0.0)
        yield stopped
        parked = GaugeMetricFamily("rosetta_parked_events",
                                   "Changes parked because a destination refused them.",
                                   labels=["pipeline", "destination", "table"])
        for count in metrics.parked:
            parked.add_metric([count.pipeline, count.destination, count.table_name],
                              float(count.count))
        yield parked
        wal = GaugeMetricFamily("rosetta_retained_wal_bytes",
                                "WAL retained by each pipeline's slot (latest WAL monitor reading).",
                                labels=["pipeline", "source", "slot"])
        for reading in metrics.wal:
            if reading.retained_wal_bytes is not None:
                wal.add_metric([reading.pipeline or "", reading.source, reading.slot_name],
                               float(reading.retained_wal_bytes))
        yield wal
        backfill = CounterMetricFamily("rosetta_backfill_rows", "Rows copied by backfill jobs.",
                                       labels=["pipeline", "status"])
        for rows in metrics.backfills:
            backfill.add_metric([rows.pipeline, rows.status], float(rows.rows))
        yield backfill
        stats = self.store.pool.stats()
        pool = GaugeMetricFamily("rosetta_api_pool_connections",
                                 "Config store connections of this API process.", labels=["kind"])
        pool.add_metric(["in_use"], float(stats.in_use))
        pool.add_metric(["idle"], float(stats.idle))
        pool.add_metric(["max"], float(stats.max_conn))
        yield pool


async def _report_pool(store: ConfigStore) -> None:
    """The API's pool health and utilisation, for the pool checks (as every process does)."""
    while True:
        await asyncio.sleep(POOL_REPORT_INTERVAL_S)
        try:
            await asyncio.to_thread(store.flush_pool_events)
        except RosettaError as exc:
            logger.warning("Could not record the API's pool usage: %s", exc)


def create_app(database_url: str, *, token: str | None = None) -> FastAPI:
    """The API over the config store at ``database_url`` (opened at startup, with retries)."""
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        pool = ResilientConnectionPool(
            database_url,
            PoolSettings.from_env(max_conn=4, application_name=application_name("api")),
            label="config_db", setting="CONFIG_DATABASE_URL",
        ).open()
        store = ConfigStore(pool)
        store.upgrade()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_ConfigStoreCollector(store))  # type: ignore[arg-type]
        state.update(store=store, registry=registry)
        reporter = asyncio.create_task(_report_pool(store))
        try:
            yield
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            pool.close()

    app = FastAPI(
        title="Rosetta API",
        version="1",
        description="Pipelines and backfill jobs of Rosetta, a PostgreSQL CDC platform on Dagster.",
        lifespan=lifespan,
        responses={401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut}},
    )

    def store() -> ConfigStore:
        return state["store"]

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        if token is None:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token.encode()):
            raise _error(401, "This endpoint needs 'Authorization: Bearer <ROSETTA_API_TOKEN>'.")

    Store = Annotated[ConfigStore, Depends(store)]

    def pipeline_or_404(config_store: ConfigStore, name: str) -> Pipeline:
        pipeline = config_store.find_pipeline(name)
        if pipeline is None:
            raise _error(404, f"Pipeline '{name}' does not exist.")
        return pipeline

    @app.exception_handler(StarletteHTTPException)  # also unknown routes and methods
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"] if part != "body")
        return JSONResponse(
            {"error": f"Invalid request: field '{field}': {first['msg']}.",
             "fields": [".".join(str(p) for p in e["loc"] if p != "body") for e in exc.errors()]},
            status_code=422,
        )

    @app.exception_handler(RosettaError)
    async def rosetta_error(_request: Request, exc: RosettaError) -> JSONResponse:
        return JSONResponse({"error": mask_secrets(str(exc))}, status_code=503)

    @app.get("/healthz", tags=["health"], responses={503: {"model": ErrorOut}})
    def healthz(config_store: Store) -> dict[str, Any]:
        """Healthy when the config store answers (a real query through the pool)."""
        return {"status": "ok", "config_store_schema_version": config_store.schema_version()}

    @app.get("/api/v1/validation", tags=["health"], responses={503: {"model": ErrorOut}})
    def validation(config_store: Store) -> JSONResponse:
        """The checklist's post-deployment validation, as `rosetta validate --json` prints it
        (the same checks, so both agree): 200 when no ERROR-severity check fails, else 503.
        Needs the pipeline file (ROSETTA_CONFIG) for the live checks."""
        report = build_report(config_store, load_config())
        return JSONResponse(json.loads(json.dumps(report, default=str)),
                            status_code=200 if report["ok"] else 503)

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(generate_latest(state["registry"]).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/api/v1/pipelines", tags=["pipelines"])
    def list_pipelines(config_store: Store) -> list[PipelineOut]:
        return [PipelineOut.of(p) for p in config_store.list_pipelines()]

    @app.get("/api/v1/pipelines/{name}", tags=["pipelines"])
    def get_pipeline(name: str, config_store: Store) -> PipelineOut:
        return PipelineOut.of(pipeline_or_404(config_store, name))

    def set_status(config_store: ConfigStore, name: str, status: str) -> PipelineOut:
        pipeline_or_404(config_store, name)
        return PipelineOut.of(config_store.set_pipeline_status(name, status))

    @app.post("/api/v1/pipelines/{name}/start", tags=["pipelines"],
              dependencies=[Depends(require_token)])
    def start_pipeline(name: str, config_store: Store) -> PipelineOut:
        """Desired status START; the supervisor sensor launches the stream on its next tick."""
        return set_status(config_store, name, "START")

    @app.post("/api/v1/pipelines/{name}/pause", tags=["pipelines"],
              dependencies=[Depends(require_token)])
    def pause_pipeline(name: str, config_store: Store) -> PipelineOut:
        """Desired status PAUSE; the supervisor sensor stops the stream on its next tick."""
        return set_status(config_store, name, "PAUSE")

    @app.get("/api/v1/pipelines/{name}/parked", tags=["parked"])
    def list_parked(name: str, config_store: Store, table: str | None = None) -> list[ParkedOut]:
        """Changes parked for this pipeline, oldest first (on_apply_error: park)."""
        pipeline_or_404(config_store, name)
        return [ParkedOut.of(p) for p in config_store.list_parked(name, table)]

    @app.post("/api/v1/pipelines/{name}/parked/retry", tags=["parked"],
              dependencies=[Depends(require_token)])
    def retry_parked(name: str, body: ParkedSelection, config_store: Store) -> ParkedChanged:
        """Ask the stream to replay parked changes in order and release their keys."""
        pipeline_or_404(config_store, name)
        return ParkedChanged(count=config_store.request_parked_retry(name, body.table, body.key))

    @app.post("/api/v1/pipelines/{name}/parked/discard", tags=["parked"],
              dependencies=[Depends(require_token)])
    def discard_parked(name: str, body: ParkedSelection, config_store: Store) -> ParkedChanged:
        """Delete parked changes; their keys stream again."""
        pipeline_or_404(config_store, name)
        return ParkedChanged(count=config_store.discard_parked(name, body.table, body.key))

    @app.get("/api/v1/notifications", tags=["notifications"])
    def list_notifications(config_store: Store, pipeline: str | None = None,
                           limit: int = 50) -> list[NotificationOut]:
        """Delivery attempts of alerts (notification_log), newest first."""
        return [NotificationOut(**dataclasses.asdict(row))
                for row in config_store.list_notifications(min(max(limit, 1), 1000), pipeline)]

    @app.post("/api/v1/pipelines/{name}/backfills", tags=["backfills"], status_code=201,
              dependencies=[Depends(require_token)])
    def request_backfill(name: str, body: BackfillRequest, config_store: Store) -> BackfillOut:
        """Queue a backfill job (PENDING); the backfill sensor picks it up."""
        pipeline = pipeline_or_404(config_store, name)
        if body.table not in pipeline.tables:
            raise _error(422, f"Invalid request: field 'table': pipeline '{name}' has no table "
                              f"'{body.table}' (it has {', '.join(pipeline.tables)}).")
        try:
            conditions = parse_filter([c.model_dump() for c in body.filter])
            check_backfill_request(name, TableRef.parse(body.table), conditions)
        except FilterError as exc:
            raise _error(422, f"Invalid request: {exc}") from None
        job = config_store.create_backfill_job(name, body.table, [c.as_dict() for c in conditions])
        return BackfillOut.of(job)

    @app.get("/api/v1/backfills/{job_id}", tags=["backfills"])
    def get_backfill(job_id: int, config_store: Store) -> BackfillOut:
        job = config_store.find_backfill_job(job_id)
        if job is None:
            raise _error(404, f"Backfill job {job_id} does not exist.")
        return BackfillOut.of(job)

    @app.post("/api/v1/backfills/{job_id}/cancel", tags=["backfills"],
              dependencies=[Depends(require_token)])
    def cancel_backfill(job_id: int, config_store: Store) -> BackfillOut:
        """Cancel a job that has not finished; a running copy stops within one chunk."""
        if config_store.find_backfill_job(job_id) is None:
            raise _error(404, f"Backfill job {job_id} does not exist.")
        return BackfillOut.of(config_store.cancel_backfill_job(job_id))

    return app
