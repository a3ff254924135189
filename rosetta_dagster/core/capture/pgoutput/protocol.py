"""Decoding pgoutput messages (protocol version 1) into change events.

Values stay exactly the text PostgreSQL sent (each type's output function, under the session
settings the replication connection pins); they are never parsed. See "Logical Replication
Message Formats" in the PostgreSQL documentation.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rosetta_dagster.core.events import (
    BACKFILL_MESSAGE_PREFIX,
    UNCHANGED_TOAST,
    ChangeEvent,
    PositionMarker,
    Watermark,
    watermark_from_message,
)
from rosetta_dagster.core.pipeline_config import TableRef

# PostgreSQL timestamps count microseconds from 2000-01-01; Unix ms of that instant.
_PG_EPOCH_MS = 946_684_800_000

_BEGIN = struct.Struct("!qqI")  # final LSN, commit time, xid
_COMMIT = struct.Struct("!Bqqq")  # flags, commit LSN, end LSN, commit time
_I32 = struct.Struct("!I")
_I16 = struct.Struct("!H")
_MESSAGE = struct.Struct("!Bq")  # flags, LSN
_TYPE = struct.Struct("!Ii")  # type OID, type modifier (-1: none)


class ProtocolError(Exception):
    """A message this decoder does not understand (a bug or an unexpected server)."""


@dataclass(frozen=True)
class Relation:
    table: TableRef
    columns: tuple[str, ...]
    key_flags: tuple[bool, ...]  # part of the replica identity
    types: tuple[tuple[int, int], ...] = ()  # per column: type OID, type modifier


@dataclass(frozen=True)
class Begin:
    commit_lsn: int  # LSN of the commit record
    source_ts_ms: int
    xid: int


@dataclass(frozen=True)
class Commit:
    commit_lsn: int
    end_lsn: int  # just past the commit record: where the stream resumes after this transaction
    source_ts_ms: int


@dataclass(frozen=True)
class Message:
    """A logical message (``pg_logical_emit_message``)."""

    transactional: bool
    lsn: int  # where its WAL record ends (the next record starts there)
    prefix: str
    content: bytes

    def as_item(self, source_ts_ms: int | None) -> Watermark | PositionMarker:
        if self.prefix == BACKFILL_MESSAGE_PREFIX:
            return watermark_from_message(self.content, source_ts_ms)
        return PositionMarker(source_ts_ms)


Decoded = Begin | Commit | Message | list[ChangeEvent] | None


def _cstring(data: memoryview, offset: int) -> tuple[str, int]:
    end = bytes(data[offset:]).index(0) + offset
    return bytes(data[offset:end]).decode(), end + 1


ColumnTypes = Mapping[str, tuple[int, int]]  # column -> type OID, type modifier


def _retyped(before: ColumnTypes, after: Relation) -> bool:
    """True when a column known before has got another type or type modifier."""
    return any(before.get(column, kind) != kind
               for column, kind in zip(after.columns, after.types, strict=True))


class PgoutputDecoder:
    """Stateful decoder of one replication stream (relations are announced once per session)."""

    def __init__(self, known_types: Mapping[TableRef, ColumnTypes] | None = None) -> None:
        """``known_types``: the column types the destinations were prepared with, so that
        even a table's first announcement in this stream can tell a changed type."""
        self.known_types = dict(known_types or {})
        self.relations: dict[int, Relation] = {}
        self._begin: Begin | None = None

    def decode(self, payload: bytes, lsn: int | None = None) -> Decoded:
        """One message; ``lsn`` is its WAL position (XLogData's start), kept on row changes."""
        kind = payload[0:1]
        if kind == b"I" or kind == b"U" or kind == b"D":
            return self._row(kind, payload, lsn)
        data = memoryview(payload)
        if kind == b"B":
            final_lsn, ts, xid = _BEGIN.unpack_from(data, 1)
            self._begin = Begin(final_lsn, _PG_EPOCH_MS + ts // 1000, xid)
            return self._begin
        if kind == b"C":
            _, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, 1)
            self._begin = None
            return Commit(commit_lsn, end_lsn, _PG_EPOCH_MS + ts // 1000)
        if kind == b"R":
            return self._relation(data)
        if kind == b"T":
            return self._truncate(data)
        if kind == b"M":
            flags, lsn = _MESSAGE.unpack_from(data, 1)
            prefix, offset = _cstring(data, 1 + _MESSAGE.size)
            (length,) = _I32.unpack_from(data, offset)
            content = bytes(data[offset + 4: offset + 4 + length])
            return Message(bool(flags & 1), lsn, prefix, content)
        if kind in (b"Y", b"O"):  # type and origin announcements: nothing to apply
            return None
        raise ProtocolError(f"unexpected pgoutput message {kind!r}")

    def _relation(self, data: memoryview) -> list[ChangeEvent] | None:
        """Remember the relation; a column whose type changed since its last announcement
        (ALTER COLUMN TYPE) becomes a schema event, in stream order with the rows."""
        (oid,) = _I32.unpack_from(data, 1)
        namespace, offset = _cstring(data, 5)
        name, offset = _cstring(data, offset)
        offset += 1  # replica identity setting
        (count,) = _I16.unpack_from(data, offset)
        offset += 2
        columns: list[str] = []
        flags: list[bool] = []
        types: list[tuple[int, int]] = []
        for _ in range(count):
            flag = data[offset]
            column, offset = _cstring(data, offset + 1)
            type_oid, type_modifier = _TYPE.unpack_from(data, offset)
            offset += _TYPE.size
            columns.append(column)
            flags.append(bool(flag & 1))
            types.append((type_oid, type_modifier))
        relation = Relation(TableRef(namespace, name), tuple(columns), tuple(flags), tuple(types))
        before = self.relations.get(oid)
        self.relations[oid] = relation
        known = (dict(zip(before.columns, before.types, strict=True)) if before is not None
                 else self.known_types.get(relation.table))
        begin = self._begin
        if known is None or begin is None or not _retyped(known, relation):
            return None
        return [ChangeEvent(relation.table, "s", None, None, begin.source_ts_ms, None, begin.xid,
                            "false", begin.commit_lsn)]

    def _tuple(self, data: bytes, offset: int, relation: Relation) -> tuple[dict[str, Any], int]:
        count = (data[offset] << 8) | data[offset + 1]
        offset += 2
        if count != len(relation.columns):
            raise ProtocolError(
                f"{relation.table.qualified}: a row with {count} columns, the relation has "
                f"{len(relation.columns)}"
            )
        # The hottest loop of the engine: the row is built in place, lengths read directly.
        row: dict[str, Any] = {}
        unpack_length = _I32.unpack_from
        for name in relation.columns:
            kind = data[offset]
            if kind == 0x74:  # 't': text
                start = offset + 5
                offset = start + unpack_length(data, offset + 1)[0]
                row[name] = data[start:offset].decode()
            elif kind == 0x6E:  # 'n': NULL
                row[name] = None
                offset += 1
            elif kind == 0x75:  # 'u': unchanged TOAST value, not sent
                row[name] = UNCHANGED_TOAST
                offset += 1
            else:
                raise ProtocolError(f"{relation.table.qualified}: unexpected column kind {kind!r}")
        return row, offset

    def _row(self, kind: bytes, data: bytes, lsn: int | None) -> list[ChangeEvent]:
        (oid,) = _I32.unpack_from(data, 1)
        relation = self.relations[oid]
        begin = self._begin
        if begin is None:
            raise ProtocolError(f"a change of {relation.table.qualified} outside a transaction")
        marker = data[5]
        offset = 6
        old: dict[str, Any] | None = None
        if marker in (0x4B, 0x4F):  # 'K' old key / 'O' old row
            old, offset = self._tuple(data, offset, relation)
            if marker == 0x4B:  # only the replica identity columns carry values
                old = {c: old[c] for c, key in zip(relation.columns, relation.key_flags,
                                                   strict=True) if key}
            if kind != b"D":
                offset += 1  # the 'N' of the new row
        elif kind == b"D":
            raise ProtocolError(f"a delete of {relation.table.qualified} without its key")
        table, ts, xid, commit_lsn = relation.table, begin.source_ts_ms, begin.xid, begin.commit_lsn
        if kind == b"D":
            return [ChangeEvent(table, "d", old, None, ts, lsn, xid, "false", commit_lsn)]
        new, _ = self._tuple(data, offset, relation)
        if kind == b"I":
            return [ChangeEvent(table, "c", None, new, ts, lsn, xid, "false", commit_lsn)]
        events: list[ChangeEvent] = []
        if old is not None:
            if marker == 0x4F:  # a full old row fills in unchanged TOAST values
                for name, value in new.items():
                    if value is UNCHANGED_TOAST and old.get(name) is not UNCHANGED_TOAST:
                        new[name] = old[name]
            key_changed = any(old.get(c) != new.get(c) for c, key in
                              zip(relation.columns, relation.key_flags, strict=True) if key)
            if key_changed:  # the row moved to another key: the old one goes away
                events.append(ChangeEvent(table, "d", old, None, ts, lsn, xid, "false", commit_lsn))
        events.append(ChangeEvent(table, "u", old, new, ts, lsn, xid, "false", commit_lsn))
        return events

    def _truncate(self, data: memoryview) -> list[ChangeEvent]:
        (count,) = _I32.unpack_from(data, 1)
        offset = 6  # count + options
        begin = self._begin
        events = []
        for _ in range(count):
            (oid,) = _I32.unpack_from(data, offset)
            offset += 4
            events.append(ChangeEvent(
                self.relations[oid].table, "t", None, None,
                source_ts_ms=begin.source_ts_ms if begin else None,
                xid=begin.xid if begin else None, commit_lsn=begin.commit_lsn if begin else None,
            ))
        return events
