"""Sensors the Dagster daemon runs to operate the streams.

- ``pipeline_supervisor``: one streaming run per START pipeline, none per PAUSE pipeline; dead
  runs (stale heartbeat) are failed and replaced with a per-pipeline exponential backoff.
- ``replication_slot_guard``: a pipeline whose slot is gone loses its stale offset file (its run
  is stopped first), so the next start snapshots afresh and reconciles the destinations.
- ``wal_monitor``: retained WAL of every pipeline's slot, stored, logged and observed, and
  its replication lag measured (``replication_lag`` on each destination table).

Every pipeline is handled on its own: one failing pipeline is logged and the others go on.
"""

import json
import logging
import time
from collections.abc import Callable, Sequence

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    JobDefinition,
    MetadataValue,
    RunRecord,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from rosetta_dagster.core.capture import capture_engine
from rosetta_dagster.core.config_store import PipelineState, PipelineStatus
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.health import measure_and_record_lag
from rosetta_dagster.core.pipeline_config import OperationsSettings, PipelineDefinition
from rosetta_dagster.core.replication import (
    delete_stale_offset,
    missing_slot_reason,
    read_slot,
    reading_metadata,
    record_reading,
    slot_exists,
    source_connection,
)
from rosetta_dagster.core.supervision import (
    ACTIVE_STATUSES,
    PipelineHealth,
    RunStatus,
    StreamRun,
    decide,
    is_starting,
    launch_budget,
)
from rosetta_dagster.defs.pipelines.assets import replication_slot_key
from rosetta_dagster.defs.pipelines.checks import lag_evaluations, retained_wal_evaluation
from rosetta_dagster.defs.pipelines.jobs import PIPELINE_TAG, stream_job_name
from rosetta_dagster.defs.platform.logs import TeeLogger
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.defs.replication_set import (
    ReplicationSet,
    current_pipelines,
    operations_of,
)
from rosetta_dagster.settings import offsets_dir

supervisor_logger = logging.getLogger("rosetta.supervisor")
replication_logger = logging.getLogger("rosetta.replication")

RECENT_RUNS = 20  # enough history for the backoff, which saturates well before
RUN_STOP_WAIT_S = 20.0  # how long the slot guard waits for a stopped run to finish


def recent_stream_runs(context: SensorEvaluationContext, pipeline: str) -> list[RunRecord]:
    return list(
        context.instance.get_run_records(
            RunsFilter(tags={PIPELINE_TAG: pipeline}), limit=RECENT_RUNS
        )
    )


def _stream_run(record: RunRecord) -> StreamRun:
    return StreamRun(
        run_id=record.dagster_run.run_id,
        status=RunStatus(record.dagster_run.status.value),
        created_at=record.create_timestamp.timestamp(),
        started_at=record.start_time,
        ended_at=record.end_time,
    )


def _for_each_pipeline(
    pipelines: Sequence[PipelineDefinition],
    log: logging.Logger | logging.LoggerAdapter,  # type: ignore[type-arg]
    handle: Callable[[PipelineDefinition], None],
) -> None:
    for pipeline in pipelines:
        try:
            handle(pipeline)
        except RosettaError as exc:  # its message names the pipeline and what failed
            log.warning("%s", exc)
        except Exception as exc:  # noqa: BLE001 - one pipeline must not stop the others
            log.exception("Pipeline %s: unexpected %s: %s", pipeline.name, type(exc).__name__, exc)


def _daemon_id(context: SensorEvaluationContext) -> str | None:
    heartbeats = context.instance.get_daemon_heartbeats()
    beat = heartbeats.get("SENSOR")
    return beat.daemon_id if beat is not None else None


def build_supervisor_sensor(
    sets: Sequence[ReplicationSet], stream_jobs: Sequence[JobDefinition]
) -> SensorDefinition:
    operations = operations_of(sets)

    @sensor(
        name="pipeline_supervisor",
        jobs=list(stream_jobs),
        minimum_interval_seconds=operations.supervisor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Keeps one streaming run per START pipeline and none per PAUSE pipeline; "
        "replaces dead runs with exponential backoff.",
    )
    def pipeline_supervisor(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SensorResult:
        log = TeeLogger(supervisor_logger, context.log)
        store = config_store.store
        # Each pipeline with its own file's settings (backoff, heartbeat timeout).
        settings: dict[str, OperationsSettings] = {}
        declared: dict[str, PipelineDefinition] = {}
        for _, config, pipeline in current_pipelines(sets, resolve_secrets=False):
            declared[pipeline.name] = pipeline
            settings[pipeline.name] = config.operations
            store.sync_pipeline(pipeline)
        statuses = {p.name: p for p in store.list_pipelines() if p.name in declared}

        cursor = json.loads(context.cursor) if context.cursor else {}
        daemon = _daemon_id(context)
        if cursor.get("daemon") != daemon or "daemon" not in cursor:
            active = sum(1 for p in statuses.values() if p.status is PipelineStatus.START)
            log.info("Pipeline manager started with %d active pipelines", active)
            cursor["daemon"] = daemon

        requests: list[RunRequest] = []
        launches: list[tuple[str, int]] = []  # (pipeline, failures before), launched below
        starting = 0  # runs launched that do not heartbeat yet, over every pipeline
        now = time.time()

        def supervise(pipeline: PipelineDefinition) -> None:
            stored = statuses[pipeline.name]
            records = recent_stream_runs(context, pipeline.name)
            health = PipelineHealth(
                name=pipeline.name,
                status=stored.status,
                heartbeat_at=stored.heartbeat_at.timestamp() if stored.heartbeat_at else None,
                heartbeat_run_id=stored.run_id,
            )
            runs = [_stream_run(r) for r in records]
            decision = decide(health, runs, now, settings[pipeline.name])
            nonlocal starting
            starting += sum(1 for run in runs if is_starting(health, run)
                            and run.run_id not in {dead for dead, _ in decision.dead})
            by_id = {r.dagster_run.run_id: r.dagster_run for r in records}
            for run_id, reason in decision.dead:
                log.error("%s Marking it failed.", reason)
                context.instance.report_run_failed(by_id[run_id], message=reason)
                store.record_pipeline_state(
                    pipeline.name, PipelineState.ERROR, error=reason, run_id=run_id
                )
            for run_id in decision.terminate:
                log.info("Pipeline %s is %s: terminating run %s", pipeline.name,
                         stored.status.value, run_id)
                context.instance.run_coordinator.cancel_run(run_id)
            if decision.waiting_reason:
                log.info("%s", decision.waiting_reason)
            if decision.launch:
                launches.append((pipeline.name, decision.consecutive_failures))

        _for_each_pipeline(
            [p for p in declared.values() if p.name in statuses], log, supervise
        )
        budget = launch_budget(starting, operations)
        for name, attempt in launches[:budget]:
            log.info("Pipeline %s is START without a run: launching %s%s", name,
                     stream_job_name(name), f" (restart after {attempt} failure(s))" if attempt else "")
            requests.append(RunRequest(
                job_name=stream_job_name(name),
                tags={PIPELINE_TAG: name, "rosetta/launched_by": "supervisor"},
            ))
        for name, _ in launches[budget:]:
            log.info("Pipeline %s is START without a run: waiting, %d run(s) are starting "
                     "(max_starting_runs %d)", name, starting + budget,
                     operations.max_starting_runs)
        return SensorResult(run_requests=requests, cursor=json.dumps(cursor))

    return pipeline_supervisor


def _active_runs(context: SensorEvaluationContext, pipeline: str) -> list[RunRecord]:
    return [
        r for r in recent_stream_runs(context, pipeline)
        if RunStatus(r.dagster_run.status.value) in ACTIVE_STATUSES
    ]


def build_slot_guard_sensor(sets: Sequence[ReplicationSet]) -> SensorDefinition:
    @sensor(
        name="replication_slot_guard",
        minimum_interval_seconds=operations_of(sets).supervisor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Deletes the offset file of a pipeline whose replication slot is gone "
        "(stopping its run first), so it restarts with a fresh snapshot.",
    )
    def replication_slot_guard(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SkipReason:
        log = TeeLogger(replication_logger, context.log)
        store = config_store.store
        cleaned: list[str] = []

        def guard(pipeline: PipelineDefinition) -> None:
            positions = capture_engine(pipeline.settings.engine).position_store(
                pipeline, offsets_dir())
            if not positions.exists():
                return  # nothing stale can exist: the next start loads anyway
            with source_connection(pipeline) as conn:
                if slot_exists(conn, pipeline.slot_name):
                    return
            active = _active_runs(context, pipeline.name)
            for record in active:
                log.warning("Pipeline %s: slot %s is gone; stopping run %s before deleting "
                            "its offset", pipeline.name, pipeline.slot_name,
                            record.dagster_run.run_id)
                context.instance.run_coordinator.cancel_run(record.dagster_run.run_id)
            deadline = time.monotonic() + RUN_STOP_WAIT_S
            while active and time.monotonic() < deadline:
                time.sleep(1.0)
                active = _active_runs(context, pipeline.name)
            if active:
                log.info("Pipeline %s: run still stopping; offset cleanup on the next tick",
                         pipeline.name)
                return
            if delete_stale_offset(pipeline, positions, reason=missing_slot_reason(pipeline),
                                   config_store=store, log=log):
                cleaned.append(pipeline.name)

        _for_each_pipeline([p for _, _, p in current_pipelines(sets)], log, guard)
        if cleaned:
            return SkipReason(f"Deleted stale offsets of {', '.join(cleaned)}")
        return SkipReason("Every pipeline with an offset file has its replication slot.")

    return replication_slot_guard


def build_wal_monitor_sensor(sets: Sequence[ReplicationSet]) -> SensorDefinition:
    @sensor(
        name="wal_monitor",
        minimum_interval_seconds=operations_of(sets).wal_monitor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Reads every pipeline slot's retained WAL, stores it in wal_monitor and "
        "reports it on the pipeline's replication_slot asset.",
    )
    def wal_monitor(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SensorResult:
        log = TeeLogger(replication_logger, context.log)
        store = config_store.store
        events: list = []
        current = {p.name: (s, config, p) for s, config, p in current_pipelines(sets)}

        def monitor(pipeline: PipelineDefinition) -> None:
            replication_set, config, _ = current[pipeline.name]
            naming, operations = replication_set.naming, config.operations
            with source_connection(pipeline) as conn:
                reading = read_slot(conn, pipeline)
            severity = record_reading(store, reading, operations, log)
            metadata = {k: MetadataValue.int(v) for k, v in reading_metadata(reading).items()}
            metadata["severity"] = MetadataValue.text(severity.value)
            events.append(AssetObservation(asset_key=naming.key(replication_slot_key(pipeline)),
                                           metadata=metadata))
            events.append(retained_wal_evaluation(reading, operations, naming))
            # The lag too, paused pipelines included: a slot can fall behind while nobody reads.
            stored = store.get_pipeline(pipeline.name)
            lag = measure_and_record_lag(pipeline, store, stored.source_position_at,
                                         stored.applied_lsn)
            events.extend(lag_evaluations(pipeline, stored, lag, operations, naming))

        _for_each_pipeline([p for _, _, p in current.values()], log, monitor)
        return SensorResult(asset_events=events)

    return wal_monitor


def build_operation_sensors(
    sets: Sequence[ReplicationSet], stream_jobs: Sequence[JobDefinition]
) -> list[SensorDefinition]:
    """Once per code location, for every set's pipelines (the WAL monitor reports to each
    set's keys)."""
    return [
        build_supervisor_sensor(sets, stream_jobs),
        build_slot_guard_sensor(sets),
        build_wal_monitor_sensor(sets),
    ]
