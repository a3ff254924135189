"""`rosetta validate`: the checklist's Post-Deployment Validation, from real data.

Instead of grepping container logs, every section reads the config store (and the sources and
destinations for the live checks). The report is a dict so ``--json`` prints it as is.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from rosetta_dagster.core.config_store import ConfigStore
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.health import (
    CheckOutcome,
    CheckTarget,
    evaluate_config_store,
    evaluate_pipeline,
)
from rosetta_dagster.core.pipeline_config import RosettaConfig


def _check_row(target: str, outcome: CheckOutcome) -> dict[str, Any]:
    return {"target": target, "check": outcome.name, "passed": outcome.passed,
            "severity": outcome.severity, "description": outcome.description,
            "metadata": outcome.metadata}


def build_report(store: ConfigStore, config: RosettaConfig) -> dict[str, Any]:
    now = datetime.now(UTC)
    hour_ago = now - timedelta(hours=1)
    pipelines = store.list_pipelines()
    events_hour = store.pool_event_counts(3600)
    stats = store.pool.stats()
    checks = [_check_row("config_db", o) for o in evaluate_config_store(
        store, config.operations, list(config.pipelines.values()))]
    stored = {p.name: p for p in pipelines}
    parked_counts = store.parked_counts()
    for name, pipeline in config.pipelines.items():
        if name not in stored:
            store.sync_pipeline(pipeline)
            stored[name] = store.get_pipeline(name)
        try:
            checks.extend(_check_row(target.label, outcome)
                          for target, outcome in evaluate_pipeline(
                              pipeline, stored[name], config.operations,
                              {(d, t): n for p, d, t, n in parked_counts if p == name},
                              store.recent_failures(name)))
        except RosettaError as exc:  # e.g. an unreachable source: that is a failure, not a crash
            target = CheckTarget("replication_slot", name)
            checks.append(_check_row(target.label, CheckOutcome(
                "reachable", False, "ERROR", str(exc))))
    backfills = store.list_backfill_jobs()
    last_backfill = max(backfills, key=lambda j: j.updated_at, default=None)
    return {
        "checked_at": now.isoformat(),
        "connection_pool": {
            "initialized_on_attempt": stats.init_attempts,
            "max_conn": stats.max_conn,
            "init_retries_last_hour": events_hour.get("init_retried", 0),
        },
        "errors_last_hour": {
            "pipelines_failed": [
                {"pipeline": p.name, "at": p.last_error_at.isoformat(), "error": p.last_error}
                for p in pipelines if p.last_error_at and p.last_error_at > hour_ago
            ],
            "pool_events": events_hour,
        },
        "closed_connection_errors_last_hour": events_hour.get("closed_connection", 0)
        + events_hour.get("dead_connection", 0),
        "pipelines": [
            {"id": p.id, "name": p.name, "status": p.status.value, "state": p.state.value,
             "heartbeat_at": p.heartbeat_at.isoformat() if p.heartbeat_at else None}
            for p in store.list_pipelines()
        ],
        "config_store_connections": store.database_connections(),
        "last_backfill_job": None if last_backfill is None else {
            "id": last_backfill.id, "pipeline": last_backfill.pipeline,
            "status": last_backfill.status.value, "updated_at": last_backfill.updated_at.isoformat(),
        },
        "offset_cleanups": [
            {"pipeline": c.pipeline, "offset_file": c.offset_file, "reason": c.reason,
             "at": c.created_at.isoformat()}
            for c in store.list_offset_cleanups(limit=3)
        ],
        "checks": checks,
        "ok": not any(not c["passed"] and c["severity"] == "ERROR" for c in checks),
    }


def format_report(report: dict[str, Any]) -> str:
    pool = report["connection_pool"]
    lines = ["=== Connection Pool Health ===",
             f"Connection pool initialized successfully on attempt {pool['initialized_on_attempt']}"
             f" (max {pool['max_conn']}); init retries in the last hour: "
             f"{pool['init_retries_last_hour']}",
             "", "=== Error Count (last hour) ==="]
    errors = report["errors_last_hour"]
    lines.append(f"{len(errors['pipelines_failed'])} pipeline failure(s)")
    lines += [f"  {e['pipeline']} at {e['at']}: {e['error']}" for e in errors["pipelines_failed"]]
    lines += ["", "=== 'Closed Connection' Errors ===",
              str(report["closed_connection_errors_last_hour"]), "", "=== Active Pipelines ==="]
    lines += [f"{p['id']}\t{p['name']}\t{p['status']}\t{p['state']}" for p in report["pipelines"]]
    lines += ["", "=== Database Connections ===",
              f"active_connections: {report['config_store_connections']}",
              "", "=== Last backfill job ==="]
    job = report["last_backfill_job"]
    lines.append("none" if job is None else
                 f"{job['id']} {job['pipeline']} {job['status']} at {job['updated_at']}")
    lines += ["", "=== Offset cleanup history ==="]
    lines += [f"{c['at']} {c['pipeline']}: deleted {c['offset_file']} ({c['reason']})"
              for c in report["offset_cleanups"]] or ["none"]
    lines += ["", "=== Checks ==="]
    for check in report["checks"]:
        verdict = "PASS" if check["passed"] else f"FAIL {check['severity']}"
        lines.append(f"{verdict:10} {check['target']} {check['check']}: {check['description']}")
    lines += ["", "OK" if report["ok"] else "FAILED: at least one ERROR-severity check failed"]
    return "\n".join(lines)
