"""Alerts that reach people: failing conditions become webhook notifications on state changes.

An :class:`Alert` is a condition failing now (a check at WARN/ERROR, a pipeline in ERROR, a
re-sync under way, a FAILED backfill, parked changes), identified by a stable key. Each
evaluation compares the alerts with the previous state (:func:`advance`): a new alert, or one
whose severity changed, is FIRING; one still failing is sent again every ``repeat_minutes``
(REPEAT); one gone is RESOLVED. The state is a plain dict the Dagster sensor keeps in its
cursor; every delivery attempt is written to ``notification_log``, whose key per notification
(channel, condition, transition, since when) keeps a replayed tick from sending it twice.

Pure Python; the notification sensor and ``rosetta notifications`` call it. A channel's URL is
a secret: it is never logged, stored or put in an error.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from rosetta_dagster.core.config_store import (
    BackfillStatus,
    ConfigStore,
    OffsetCleanup,
    PipelineState,
)
from rosetta_dagster.core.pipeline_config import (
    NotificationChannel,
    NotificationSettings,
)

logger = logging.getLogger("rosetta.notifications")
Log = logging.Logger | logging.LoggerAdapter[logging.Logger]

FIRING, REPEAT, RESOLVED, TEST = "FIRING", "REPEAT", "RESOLVED", "TEST"
ATTEMPTS_PER_TICK = 3  # delivery attempts of one notification within one evaluation
ATTEMPT_BACKOFF_S = (0.5, 1.0)  # waits between those attempts
OUTBOX_RETRY_S = 30.0  # then retried on later evaluations, waiting twice as long each time
OUTBOX_RETRY_MAX_S = 900.0
OUTBOX_MAX_AGE_S = 24 * 3600.0  # an undeliverable notification is dropped (logged) after this
TICK_BUDGET_S = 40.0  # deliveries left when an evaluation has run this long wait in the outbox
HTTP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Alert:
    key: str  # stable identity of the condition, e.g. "check:destination/dst/replica/items:..."
    severity: str  # WARN | ERROR
    text: str  # one human line
    since: float  # when the condition began, as far as the data says (epoch seconds)
    pipeline: str | None = None
    kind: str = "check"  # check | pipeline_state | resync | backfill | parked | test
    asset: str | None = None
    check: str | None = None
    value: float | int | str | None = None
    threshold: float | int | str | None = None
    link: str | None = None  # path in the Dagster UI: /runs/<id>, /assets/<key>
    resolved_text: str | None = None  # what RESOLVED says (default: "<text>" resolved)


@dataclass(frozen=True)
class Notification:
    alert: Alert
    transition: str  # FIRING | REPEAT | RESOLVED | TEST
    first_seen: float
    sequence: int = 0  # REPEAT: how many times it was sent again

    @property
    def text(self) -> str:
        alert = self.alert
        if self.transition == RESOLVED:
            return f"[RESOLVED] {alert.resolved_text or alert.text}"
        if self.transition == REPEAT:
            return f"[{alert.severity}, failing since {_iso(self.first_seen)}] {alert.text}"
        return f"[{alert.severity}] {alert.text}"

    def dedupe_key(self, channel: str) -> str:
        alert = self.alert
        return (f"{channel}|{alert.key}|{self.transition}|{alert.severity}|"
                f"{self.first_seen:.3f}|{self.sequence}")

    def payload(self, ui_url: str | None) -> dict[str, Any]:
        alert = self.alert
        return {
            "text": self.text,
            "status": "resolved" if self.transition == RESOLVED else "firing",
            "transition": self.transition,
            "severity": alert.severity,
            "pipeline": alert.pipeline,
            "kind": alert.kind,
            "asset": alert.asset,
            "check": alert.check,
            "value": alert.value,
            "threshold": alert.threshold,
            "first_seen": _iso(self.first_seen),
            "url": f"{ui_url}{alert.link}" if ui_url and alert.link else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {"alert": asdict(self.alert), "transition": self.transition,
                "first_seen": self.first_seen, "sequence": self.sequence}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Notification:
        return cls(Alert(**data["alert"]), data["transition"], data["first_seen"],
                   data.get("sequence", 0))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def advance(state: dict[str, Any], alerts: Iterable[Alert], now: float, repeat_s: float
            ) -> list[Notification]:
    """Compare what fails now with ``state`` (updated in place): the notifications to send."""
    active: dict[str, Any] = state.setdefault("active", {})
    current = {alert.key: alert for alert in alerts}
    notifications: list[Notification] = []
    for key, alert in current.items():
        seen = active.get(key)
        if seen is None or seen["severity"] != alert.severity:
            first_seen = alert.since  # from the data: the same after a lost cursor
            active[key] = {"severity": alert.severity, "first_seen": first_seen,
                           "last_sent": now, "repeats": 0, "alert": asdict(alert)}
            notifications.append(Notification(alert, FIRING, first_seen))
            continue
        seen["alert"] = asdict(alert)
        if now - seen["last_sent"] >= repeat_s:
            seen["repeats"] += 1
            seen["last_sent"] = now
            notifications.append(Notification(alert, REPEAT, seen["first_seen"], seen["repeats"]))
    for key in [k for k in active if k not in current]:
        seen = active.pop(key)
        notifications.append(Notification(Alert(**seen["alert"]), RESOLVED, seen["first_seen"]))
    return notifications


@dataclass(frozen=True)
class Delivery:
    channel: str
    delivered: bool
    attempts: int
    error: str | None = None


class Notifier:
    """Sends notifications to the channels that accept them, with retries and a log."""

    def __init__(
        self, settings: NotificationSettings, store: ConfigStore, *, log: Log = logger,
        sleep: Callable[[float], None] = time.sleep, outbox_retry_s: float = OUTBOX_RETRY_S,
    ) -> None:
        self.settings, self.store, self.log, self.sleep = settings, store, log, sleep
        self.outbox_retry_s = outbox_retry_s
        self.channels = {channel.name: channel for channel in settings.channels}

    def evaluate(self, state: dict[str, Any], alerts: Iterable[Alert],
                 now: float | None = None) -> list[Delivery]:
        """One evaluation: the outbox's due retries, then this evaluation's transitions."""
        now = time.time() if now is None else now
        deadline = time.monotonic() + TICK_BUDGET_S
        notifications = advance(state, alerts, now, self.settings.repeat_minutes * 60)
        outbox: list[dict[str, Any]] = state.setdefault("outbox", [])
        waiting: list[dict[str, Any]] = []
        deliveries: list[Delivery] = []
        work = [(entry, Notification.from_json(entry["notification"])) for entry in outbox]
        work += [({"channel": channel.name, "notification": n.to_json(), "attempts": 0,
                   "created": now, "next_at": now}, n)
                 for n in notifications for channel in self.settings.channels
                 if channel.accepts(n.alert.severity, n.alert.pipeline)]
        for entry, notification in work:
            channel = self.channels.get(entry["channel"])
            if channel is None:
                continue  # the channel was removed from rosetta.yaml
            if entry["next_at"] > now or time.monotonic() > deadline:
                waiting.append(entry)
                continue
            delivery = self.deliver(channel, notification, first_attempt=entry["attempts"] + 1)
            deliveries.append(delivery)
            if delivery.delivered:
                continue
            entry["attempts"] += delivery.attempts
            if now - entry["created"] > OUTBOX_MAX_AGE_S:
                self.log.error("Notification %s %s to channel %s dropped after %d attempts: %s",
                               notification.transition, notification.alert.key, channel.name,
                               entry["attempts"], delivery.error)
                continue
            retries = entry["attempts"] // ATTEMPTS_PER_TICK
            entry["next_at"] = now + min(OUTBOX_RETRY_MAX_S,
                                         self.outbox_retry_s * 2 ** max(0, retries - 1))
            waiting.append(entry)
        state["outbox"] = waiting
        return deliveries

    def deliver(self, channel: NotificationChannel, notification: Notification,
                first_attempt: int = 1) -> Delivery:
        """Up to ATTEMPTS_PER_TICK posts, each recorded; nothing when it was delivered before."""
        key = notification.dedupe_key(channel.name)
        if notification.transition != TEST and self.store.notification_delivered(key):
            return Delivery(channel.name, True, 0)
        alert = notification.alert
        error: str | None = None
        for index in range(ATTEMPTS_PER_TICK):
            if index:
                self.sleep(ATTEMPT_BACKOFF_S[min(index - 1, len(ATTEMPT_BACKOFF_S) - 1)])
            status, error = self._post(channel, notification.payload(self.settings.dagster_ui_url))
            delivered = error is None
            self.store.record_notification_attempt(
                channel=channel.name, dedupe_key=key, alert_key=alert.key,
                pipeline=alert.pipeline, transition=notification.transition,
                severity=alert.severity, text=notification.text, attempt=first_attempt + index,
                delivered=delivered, http_status=status, error=error)
            if delivered:
                self.log.info("Notification %s sent to channel %s: %s", notification.transition,
                              channel.name, notification.text)
                return Delivery(channel.name, True, index + 1)
            self.log.warning("Notification %s to channel %s failed (attempt %d): %s",
                             notification.transition, channel.name, first_attempt + index, error)
        return Delivery(channel.name, False, ATTEMPTS_PER_TICK, error)

    def _post(self, channel: NotificationChannel, payload: dict[str, Any]
              ) -> tuple[int | None, str | None]:
        """(HTTP status, error or None). The URL never appears in the error."""
        if not channel.url:
            return None, "the channel's URL is not set"
        request = urllib.request.Request(  # noqa: S310 - http(s) from the operator's config
            channel.url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "rosetta",
                     **dict(channel.headers)})
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:  # noqa: S310
                return response.status, None
        except urllib.error.HTTPError as exc:
            return exc.code, f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return None, str(reason).replace(channel.url, "<channel url>")

    def send_test(self, channel_names: Sequence[str] = ()) -> list[Delivery]:
        """`rosetta notifications test`: one TEST notification to each (named) channel."""
        alert = Alert(key="test", severity="ERROR", kind="test", since=time.time(),
                      text="Rosetta test notification: this channel receives Rosetta's alerts.")
        return [self.deliver(channel, Notification(alert, TEST, alert.since))
                for channel in self.settings.channels
                if not channel_names or channel.name in channel_names]


# -- conditions the config store knows ----------------------------------------------------


def store_alerts(store: ConfigStore, pipelines: Iterable[str]) -> list[Alert]:
    """Pipelines in ERROR, re-syncs under way, FAILED backfills and parked changes of the
    declared ``pipelines`` (check results come from Dagster, see the notification sensor)."""
    declared = set(pipelines)
    alerts: list[Alert] = []
    stored = {p.name: p for p in store.list_pipelines() if p.name in declared}
    for pipeline in stored.values():
        if pipeline.state is PipelineState.ERROR:
            since = pipeline.last_error_at or pipeline.updated_at
            alerts.append(Alert(
                key=f"pipeline_state:{pipeline.name}", severity="ERROR", kind="pipeline_state",
                pipeline=pipeline.name, since=since.timestamp(), value="ERROR",
                text=f"Pipeline {pipeline.name} is in ERROR: {pipeline.last_error or 'no message'}",
                resolved_text=f"Pipeline {pipeline.name} recovered from ERROR.",
                link=f"/runs/{pipeline.run_id}" if pipeline.run_id else None))
    latest_cleanup: dict[str | None, OffsetCleanup] = {}
    for cleanup in store.list_offset_cleanups(limit=500):  # newest first
        latest_cleanup.setdefault(cleanup.pipeline, cleanup)
    for name, cleanup in latest_cleanup.items():
        pipeline = stored.get(name) if name is not None else None
        if pipeline is None or (pipeline.last_start_at is not None
                                and pipeline.last_start_at > cleanup.created_at):
            continue
        alerts.append(Alert(
            key=f"resync:{name}", severity="WARN", kind="resync", pipeline=name,
            since=cleanup.created_at.timestamp(),
            text=(f"Pipeline {name}: {cleanup.reason}; its stale offset "
                  f"({cleanup.offset_file}) was deleted and it re-syncs from a fresh snapshot."),
            resolved_text=f"Pipeline {name} re-synced after its stale offset was deleted: "
                          "streaming again."))
    for job in store.list_backfill_jobs(status=BackfillStatus.FAILED):
        if job.pipeline not in declared:
            continue
        alerts.append(Alert(
            key=f"backfill:{job.id}", severity="ERROR", kind="backfill", pipeline=job.pipeline,
            since=job.updated_at.timestamp(), value=job.attempts,
            text=(f"Backfill job {job.id} of pipeline {job.pipeline} ({job.table_name}) FAILED "
                  f"after {job.attempts} attempt(s): {job.error or 'no message'}"),
            resolved_text=f"Backfill job {job.id} of pipeline {job.pipeline} is no longer FAILED.",
            link=f"/runs/{job.run_id}" if job.run_id else None))
    for (name, destination, table), (count, since) in sorted(store.parked_since().items()):
        if name not in declared:
            continue
        alerts.append(Alert(
            key=f"parked:{name}:{destination}:{table}", severity="ERROR", kind="parked",
            pipeline=name, since=since.timestamp(), value=count, threshold=0,
            text=(f"Pipeline {name}: changes of {table} refused by destination {destination} "
                  f"are parked ({count} now); see `rosetta parked list {name}`."),
            resolved_text=f"Pipeline {name}: nothing of {table} is parked on {destination} "
                          "any more."))
    return alerts
