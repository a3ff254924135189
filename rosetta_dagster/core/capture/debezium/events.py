"""Debezium's JSON change envelopes (schemas disabled) decoded into change events."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from rosetta_dagster.core.events import (
    BACKFILL_MESSAGE_PREFIX,
    ChangeEvent,
    PositionMarker,
    Watermark,
    watermark_from_message,
)
from rosetta_dagster.core.pipeline_config import TableRef


class TimerHeartbeat(PositionMarker):
    """Debezium's heartbeat record (``heartbeat.interval.ms``): made by a timer, not read from
    the WAL, so a restart never delivers it again."""

    __slots__ = ()


def decode_batch(values: str) -> list[dict[str, Any] | None]:
    """A batch of Debezium JSON envelopes joined as one JSON array (one parse, see
    engine._values_as_json_array); a record without a value is None."""
    decoded: list[dict[str, Any] | None] = orjson.loads(values)
    return decoded


def decode_event(payload: dict[str, Any], tables: dict[tuple[str, str], TableRef] | None = None
                 ) -> ChangeEvent | PositionMarker | Watermark:
    """One parsed Debezium JSON envelope (schemas disabled) as a change, marker or watermark.
    ``tables``: the pipeline's tables by (schema, name), so that a change names the same
    TableRef object every table-keyed dict holds (found by identity, not by comparison);
    another table is added to it.

    Logical messages (op ``m``) are the heartbeat action's ``pg_logical_emit_message``: they
    move the slot forward but carry no row; Debezium's heartbeat records (no ``op``) neither.
    """
    op = payload.get("op")
    if op is None:  # a heartbeat record: {"ts_ms": ...}
        return TimerHeartbeat(payload.get("ts_ms"))
    if op == "m":
        ts_ms = payload.get("source", {}).get("ts_ms")
        message = payload.get("message") or {}
        if message.get("prefix") == BACKFILL_MESSAGE_PREFIX:
            # binary.handling.mode=hex: the content arrives hex-encoded
            return watermark_from_message(bytes.fromhex(message["content"]), ts_ms)
        return PositionMarker(ts_ms)
    source = payload["source"]
    name = (source["schema"], source["table"])
    table = None if tables is None else tables.get(name)
    if table is None:
        table = TableRef(*name)
        if tables is not None:
            tables[name] = table
    return ChangeEvent(
        table=table,
        op=payload["op"],
        before=payload.get("before"),
        after=payload.get("after"),
        source_ts_ms=source.get("ts_ms"),
        lsn=source.get("lsn"),
        xid=source.get("txId"),
        snapshot=str(source.get("snapshot") or "false"),
    )


def mark_key_changes(items: list[ChangeEvent | Watermark]) -> list[ChangeEvent | Watermark]:
    """Debezium delivers an UPDATE that changes the primary key as a delete of the old key and
    a create at the new one, both at the UPDATE's position; the create gets the old key as its
    ``before`` (as pgoutput's update carries it), so the values it leaves out (unchanged TOAST)
    are taken from the row at the old key."""
    marked = items
    previous: ChangeEvent | Watermark | None = None
    for index, item in enumerate(items):
        if (isinstance(item, ChangeEvent) and item.op == "c" and item.before is None
                and isinstance(previous, ChangeEvent) and previous.op == "d"
                and previous.lsn is not None and previous.lsn == item.lsn
                and previous.table == item.table and previous.before is not None):
            if marked is items:
                marked = list(items)
            marked[index] = dataclasses.replace(item, before=previous.before)
        previous = item
    return marked
