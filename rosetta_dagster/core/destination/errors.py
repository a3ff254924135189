"""Destination errors sorted by what to do about them, and the report of a refused change.

*Transient* errors go away by themselves (a lost connection, a restart, a deadlock, a timeout,
a full disk being cleaned): the same batch is retried. *Data* errors are the destination
refusing one change (a constraint, a value, a permission, a missing table): retrying cannot
help, so the change is isolated and the pipeline's ``on_apply_error`` policy decides. Anything
else fails the run as before. Decided per SQLSTATE (class or exact code); docs/manual.md lists them.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psycopg2

from rosetta_dagster.core.errors import DatabaseConnectionError, RosettaError
from rosetta_dagster.core.events import ChangeEvent, format_lsn
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.values import SourceText

ErrorKind = Literal["transient", "data", "other"]

# Where a COPY failed: "COPY <table>, line N, column C: ..." in the error's context.
COPY_CONTEXT = re.compile(r", line (\d+)(?:, column (\S+?))?(?::|$)")

TRANSIENT_SQLSTATES: dict[str, str] = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
    "57014": "statement timeout or query canceled",
    "57P01": "administrator shutdown",
    "57P02": "crash shutdown",
    "57P03": "server starting or stopping",
    "57P05": "idle session timeout",
    "25P03": "idle-in-transaction timeout",
    "53100": "disk full",
    "53200": "out of memory",
    "53300": "too many connections",
    "58030": "I/O error",
}
TRANSIENT_CLASSES: dict[str, str] = {"08": "connection exception"}
DATA_CLASSES: dict[str, str] = {
    "22": "data exception (value out of range, invalid text, string too long, ...)",
    "23": "integrity constraint violation (CHECK, UNIQUE, NOT NULL, foreign key, exclusion)",
    "42": "access rule or schema violation (permission denied, missing table or column, "
          "datatype mismatch)",
    "44": "WITH CHECK OPTION violation",
    "54": "program limit exceeded (row or index entry too large)",
    "0A": "feature not supported",
    "09": "triggered action exception",
    "27": "triggered data change violation",
    "2F": "SQL routine exception (a trigger)",
    "38": "external routine exception (a trigger)",
    "39": "external routine invocation exception (a trigger)",
    "P0": "PL/pgSQL error (a trigger's RAISE)",
}


def classify(exc: BaseException) -> ErrorKind:
    """What an error raised while applying to a destination calls for."""
    if isinstance(exc, ApplyError):
        return classify_sqlstate(exc.sqlstate) if exc.sqlstate else "data"
    if isinstance(exc, DatabaseConnectionError):
        return "transient"
    if isinstance(exc, psycopg2.Error):
        if exc.pgcode:
            return classify_sqlstate(exc.pgcode)
        # No SQLSTATE: the connection broke (server gone, network) rather than a statement;
        # psycopg2 reports that as OperationalError, InterfaceError or a bare DatabaseError.
        if type(exc) in (psycopg2.OperationalError, psycopg2.InterfaceError,
                         psycopg2.DatabaseError):
            return "transient"
    return "other"


def classify_sqlstate(code: str) -> ErrorKind:
    if code in TRANSIENT_SQLSTATES or code[:2] in TRANSIENT_CLASSES:
        return "transient"
    if code[:2] in DATA_CLASSES:
        return "data"
    return "other"


class ApplyError(RosettaError):
    """A destination refused a change; the message names source table, key and column."""

    def __init__(self, message: str, *, sqlstate: str | None = None,
                 column: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.column = column
        self.reason = reason or message


def error_parts(exc: BaseException) -> tuple[str | None, str | None, str]:
    """``(sqlstate, column, PostgreSQL's message)`` of an apply error."""
    if isinstance(exc, ApplyError):
        return exc.sqlstate, exc.column, exc.reason
    if isinstance(exc, psycopg2.Error):
        diag = exc.diag
        message = diag.message_primary or str(exc).strip().splitlines()[0]
        if diag.message_detail:
            message += f" ({diag.message_detail})"
        return exc.pgcode, diag.column_name, message
    return None, None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


OPERATIONS = {"c": "insert", "r": "insert", "u": "update", "d": "delete", "t": "truncate",
              "s": "column type change"}


@dataclass(frozen=True)
class RefusedChange:
    """Everything a person needs to find and judge one change a destination refused."""

    pipeline: str
    destination: str
    table: str
    key: dict[str, str | None]
    operation: str
    position: str | None  # the change's source LSN (or its transaction's commit LSN)
    source_time: str | None  # commit time on the source, UTC ISO 8601
    column: str | None
    sqlstate: str | None
    message: str

    @classmethod
    def of(cls, pipeline: str, destination: str, event: ChangeEvent,
           key: dict[str, str | None], exc: BaseException) -> RefusedChange:
        sqlstate, column, message = error_parts(exc)
        when = (datetime.datetime.fromtimestamp(event.source_ts_ms / 1000, datetime.UTC)
                .isoformat(timespec="milliseconds") if event.source_ts_ms is not None else None)
        return cls(pipeline, destination, event.table.qualified, key,
                   OPERATIONS.get(event.op, event.op), event_position(event),
                   when, column, sqlstate, message)

    def sentence(self) -> str:
        key = ", ".join(f"{k}={v}" for k, v in self.key.items())
        where = f" at source position {self.position}" if self.position else ""
        when = f" (committed {self.source_time})" if self.source_time else ""
        column = f", column {self.column}" if self.column else ""
        code = f" [SQLSTATE {self.sqlstate}]" if self.sqlstate else ""
        return (f"Pipeline {self.pipeline}: destination {self.destination} refused the "
                f"{self.operation} of {self.table} key ({key}){where}{when}{column}: "
                f"{self.message.rstrip('.')}{code}.")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RefusedChange:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]


def event_position(event: ChangeEvent) -> str | None:
    """Where a change is in the source's WAL: its own LSN, else its transaction's commit."""
    lsn = event.lsn if event.lsn is not None else event.commit_lsn
    return format_lsn(lsn) if lsn is not None else None


def event_from_text(data: dict[str, Any]) -> ChangeEvent:
    """A change stored by ``DestinationWriter.event_as_text``, its values marked as text."""
    def values(row: dict[str, str | None] | None) -> dict[str, Any] | None:
        if row is None:
            return None
        return {name: None if value is None else SourceText(value) for name, value in row.items()}

    return ChangeEvent(TableRef.parse(data["table"]), data["op"], values(data.get("before")),
                       values(data.get("after")), source_ts_ms=data.get("source_ts_ms"),
                       lsn=data.get("lsn"), xid=data.get("xid"), commit_lsn=data.get("commit_lsn"))
