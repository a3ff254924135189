"""``notifications``: tells people when a condition starts failing, keeps failing, or recovers.

Each tick gathers what fails now: the latest evaluation of every pipeline and config-store check
that Dagster recorded (from the schedule, the UI or the WAL monitor), and from the config store
pipelines in ERROR, re-syncs under way, FAILED backfills and parked changes. ``core.notify``
turns the differences from the previous tick into webhook posts. The sensor's cursor holds the
state, so a daemon restart neither loses nor repeats alerts.
"""

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckKey,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from rosetta_dagster.core.notify import (
    OUTBOX_RETRY_S,
    Alert,
    Delivery,
    Notifier,
    store_alerts,
)
from rosetta_dagster.core.pipeline_config import PipelineDefinition, RosettaConfig
from rosetta_dagster.defs.naming import AssetNaming
from rosetta_dagster.defs.pipelines.assets import (
    replication_slot_key,
    table_copy_key,
)
from rosetta_dagster.defs.pipelines.checks import SLOT_CHECKS, TABLE_CHECKS
from rosetta_dagster.defs.platform.checks import CONFIG_DB_KEY, POOL_CHECKS
from rosetta_dagster.defs.platform.logs import TeeLogger
from rosetta_dagster.defs.platform.resources import ConfigStoreResource
from rosetta_dagster.defs.replication_set import ReplicationSet, operations_of

notifications_logger = logging.getLogger("rosetta.notifications")

# parked_events is alerted from the config store directly (as soon as a change is parked).
_STREAK_LOOKBACK = 100  # evaluations looked back at for when a failing check began failing
_ALERTED_TABLE_CHECKS = tuple(c for c in TABLE_CHECKS if c != "parked_events")


def _check_keys(pipeline: PipelineDefinition, naming: AssetNaming) -> Iterator[AssetCheckKey]:
    for destination in pipeline.destinations:
        for table in pipeline.tables:
            for check in _ALERTED_TABLE_CHECKS:
                yield AssetCheckKey(naming.key(table_copy_key(pipeline, destination, table)),
                                    check)
    for check in SLOT_CHECKS:
        yield AssetCheckKey(naming.key(replication_slot_key(pipeline)), check)


def check_alerts(context: SensorEvaluationContext, config: RosettaConfig,
                 active: Mapping[str, Mapping[str, Any]], naming: AssetNaming,
                 platform: bool = True) -> list[Alert]:
    """The latest evaluation of each check of ``config``'s pipelines (and of the pool checks
    when ``platform``), where it failed; ``active``: what the cursor already knows failing (its
    start is not looked up again)."""
    owner: dict[AssetCheckKey, str | None] = {
        AssetCheckKey(CONFIG_DB_KEY, check): None for check in POOL_CHECKS} if platform else {}
    for pipeline in config.pipelines.values():
        owner.update({key: pipeline.name for key in _check_keys(pipeline, naming)})
    latest = context.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(owner))
    alerts = []
    for key, record in latest.items():
        evaluation = record.event.asset_check_evaluation if record.event else None
        if evaluation is None or evaluation.passed:
            continue
        severity = evaluation.severity.value
        metadata = {k: v.value for k, v in evaluation.metadata.items()}
        threshold = metadata.get("threshold", metadata.get(
            "critical_threshold" if severity == "ERROR" else "warning_threshold"))
        asset = "/".join(key.asset_key.path)
        pipeline = owner[key]
        where = f"Pipeline {pipeline}: " if pipeline else ""
        alert_key = f"check:{asset}:{key.name}"
        known = active.get(alert_key)
        since = (known["first_seen"] if known and known["severity"] == severity
                 else _failing_since(context, key, record.create_timestamp, severity))
        alerts.append(Alert(
            key=alert_key, severity=severity, kind="check",
            pipeline=pipeline, asset=asset, check=key.name, since=since,
            value=_scalar(metadata.get("value")),
            threshold=_scalar(threshold),
            text=f"{where}{key.name} on {asset}: {evaluation.description or 'failed'}",
            resolved_text=f"{where}{key.name} on {asset} passes again.",
            link=f"/assets/{asset}?view=checks"))
    return alerts


def _failing_since(context: SensorEvaluationContext, key: AssetCheckKey, latest: float,
                   severity: str) -> float:
    """When the check started failing at this severity: the first evaluation of the current
    streak. Derived from Dagster's records, so it is the same after a lost cursor (and the
    notification is recognised as delivered already)."""
    since = latest
    history = context.instance.event_log_storage.get_asset_check_execution_history(
        key, limit=_STREAK_LOOKBACK)
    for record in history:  # newest first
        evaluation = record.event.asset_check_evaluation if record.event else None
        if evaluation is None:
            continue  # planned, not evaluated yet
        if evaluation.passed or evaluation.severity.value != severity:
            break
        since = record.create_timestamp
    return since


def _scalar(value: object) -> float | int | str | None:
    return value if isinstance(value, float | int | str) or value is None else str(value)


def build_notification_sensor(
    sets: Sequence[ReplicationSet], *, outbox_retry_s: float = OUTBOX_RETRY_S
) -> SensorDefinition:
    """Once per code location: each set's conditions go to the channels of its own file (the
    pool checks' to the first set's)."""

    @sensor(
        name="notifications",
        minimum_interval_seconds=operations_of(sets).supervisor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Posts failing checks, pipelines in ERROR, re-syncs, failed backfills and "
        "parked changes to the webhook channels of rosetta.yaml, on state changes only.",
    )
    def notifications(
        context: SensorEvaluationContext, config_store: ConfigStoreResource
    ) -> SensorResult | SkipReason:
        store = config_store.store
        log = TeeLogger(notifications_logger, context.log)
        cursor = json.loads(context.cursor) if context.cursor else {}
        alerts: list[Alert] = []
        deliveries: list[Delivery] = []
        notifying = False
        for index, replication_set in enumerate(sets):
            current = replication_set.file.load()
            settings = current.notifications
            if not settings.channels:
                continue
            notifying = True
            # The first set's state is the cursor itself (as with a single file).
            state = cursor if index == 0 else cursor.setdefault("files", {}).setdefault(
                str(replication_set.file.path), {})
            found = (check_alerts(context, current, state.get("active", {}),
                                  replication_set.naming, platform=index == 0)
                     + store_alerts(store, current.pipelines))
            alerts += found
            deliveries += Notifier(settings, store, log=log,
                                   outbox_retry_s=outbox_retry_s).evaluate(state, found)
        if not notifying:
            return SkipReason("No notification channels in rosetta.yaml.")
        failed = sum(1 for d in deliveries if not d.delivered)
        summary = (f"{len(alerts)} condition(s) failing; {len(deliveries) - failed} "
                   f"notification(s) delivered, {failed} waiting for a retry")
        return SensorResult(skip_reason=SkipReason(summary), cursor=json.dumps(cursor))

    return notifications

