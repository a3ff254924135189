"""How one table is staged and merged in a PostgreSQL destination (its plan, built once per
schema version), and the COPY text of a batch's net changes."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql

from rosetta_dagster.core.destination.net_changes import Origin
from rosetta_dagster.core.destination.postgres.statements import (
    BatchStatements,
    KeylessStatements,
    ResyncStatements,
)
from rosetta_dagster.core.events import ChangeEvent
from rosetta_dagster.core.pipeline_config import TableRef
from rosetta_dagster.core.table_schema import TableSchema
from rosetta_dagster.core.values import (
    COPY_NULL,
    ROW_NULL,
    Converter,
    ValueCodec,
    copy_field,
    copy_row,
)


@dataclass
class TablePlan:
    """Everything needed to stage and merge one table, built once per schema version."""

    schema: TableSchema
    target: sql.Identifier
    stage_name: str
    converters: list[tuple[str, Converter]]
    statements: BatchStatements
    resync: ResyncStatements
    keyless: KeylessStatements | None = None  # a table without a key
    known_columns: frozenset[str] = field(init=False)
    converter_of: dict[str, Converter] = field(init=False)  # by column name
    column_names: tuple[str, ...] = field(init=False)  # in COPY order
    key_of: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(init=False)

    def __post_init__(self) -> None:
        # Columns the options leave out are known too: ignored, not a schema change.
        self.known_columns = frozenset(self.schema.column_names) | self.schema.ignored_columns
        self.converter_of = dict(self.converters)
        self.column_names = tuple(name for name, _ in self.converters)
        key = self.schema.key_columns
        self.key_of = lambda row: tuple(map(row.get, key))  # a row's key

    def row_line(self, values: Mapping[str, Any]) -> str:
        """A whole row as its COPY text line: what identifies a row of a table without a key.
        A column the change lacks (added on the source after it) has the value the source's
        rows got when it was added."""
        fields = []
        for column, (name, convert) in zip(self.schema.columns, self.converters, strict=True):
            if name in values:
                value = values[name]
                fields.append(COPY_NULL if value is None else copy_field(convert(value)))
            else:
                missing = column.missing_value
                fields.append(COPY_NULL if missing is None else copy_field(missing))
        return "\t".join(fields)


def key_text(plan: TablePlan | None, event: ChangeEvent) -> dict[str, str | None]:
    """The event's key in PostgreSQL's text form, by column; a row without a key is told by
    all its columns."""
    if plan is None:
        return {k: None if v is None else str(v) for k, v in event.row.items()}
    converters = plan.converter_of
    row = event.row
    names = plan.schema.key_columns or tuple(n for n in plan.column_names if n in row)
    return {k: None if row.get(k) is None else converters[k](row[k]) for k in names}


def keys_table_name(table: TableRef) -> str:
    """Key table of a re-snapshot; hashed suffix keeps long names unique within 63 bytes."""
    digest = hashlib.sha1(table.qualified.encode()).hexdigest()[:8]
    return f"_rosetta_resync_{table.name[:30]}_{digest}"


def keyless_lines(counts: Mapping[str, int], *, staged: bool) -> io.StringIO:
    """COPY text of a keyless batch's rows: each row with its net count (``staged``), or each
    row as many times as it is added (a batch that only adds rows)."""
    buffer = io.StringIO()
    write = buffer.write
    for line, count in counts.items():
        if staged:
            write(f"{line}\t{count}\n")
        else:
            write(f"{line}\n" * count)
    buffer.seek(0)
    return buffer


def copy_lines(plan: TablePlan, events: list[ChangeEvent], codec: ValueCodec, *,
               origins: Mapping[tuple[Any, ...], Origin] | None = None, staged: bool
               ) -> tuple[io.StringIO, int, int, int]:
    """COPY text of ``events``: the table's columns (``staged``: then the operation, the
    columns left out and where their values come from, for the staging table). Returns it
    with its rows, the unchanged TOAST values it leaves out and all values left out."""
    buffer = io.StringIO()
    write = buffer.write
    key_columns = set(plan.schema.key_columns)
    names = plan.column_names
    rows = 0
    unchanged_toast = 0
    left_out = 0
    is_unchanged = codec.is_unchanged
    whole_rows = codec.text_as_sent
    # The stage's origin columns of a change that keeps the destination row's values.
    keep_suffix = "\tt" + "\t\\N" * len(plan.schema.key_columns)
    for event in events:
        values = event.row
        delete = event.is_delete
        unchanged: list[str] = []
        line: str | None = None
        if whole_rows:
            # Every column present as text or NULL: the row escaped in one call; anything
            # else (an unchanged TOAST value, an absent column) takes the path below.
            try:
                if delete:
                    line = copy_row([v if n in key_columns and (v := values.get(n)) is not None
                                     else ROW_NULL for n in names])
                else:
                    line = copy_row([ROW_NULL if (v := values[n]) is None else v
                                     for n in names])
            except (KeyError, TypeError):
                line = None
        if line is None:
            fields = []
            for name, convert in plan.converters:
                if name not in values:
                    # Absent (added later on the source, or dropped): keep the current value.
                    if not delete:
                        unchanged.append(name)
                    fields.append(COPY_NULL)
                    continue
                value = values[name]
                if value is None or (delete and name not in key_columns):
                    fields.append(COPY_NULL)
                elif is_unchanged(value):
                    unchanged_toast += 1
                    unchanged.append(name)
                    fields.append(COPY_NULL)
                else:
                    fields.append(copy_field(convert(value)))
            line = "\t".join(fields)
        write(line)
        left_out += len(unchanged)
        if staged:
            write("\td\t" if delete else "\tu\t")
            if unchanged:
                write(copy_field("{" + ",".join('"' + n.replace('"', '\\"') + '"'
                                                for n in unchanged) + "}"))
                origin = origins.get(plan.key_of(values)) if origins else None
                write(keep_suffix if origin is None else _origin_fields(plan, origin))
            else:
                write(COPY_NULL)
                write(keep_suffix)
        write("\n")
        rows += 1
    buffer.seek(0)
    return buffer, rows, unchanged_toast, left_out

def _origin_fields(plan: TablePlan, origin: Origin) -> str:
    """The stage's ``keep`` and old-key fields of a change whose left-out values come from
    elsewhere than the destination row at its key."""
    fields = ["t" if origin.keep else "f"]
    if origin.moved_from is None:
        fields.extend(COPY_NULL for _ in plan.schema.key_columns)
    else:
        converters = plan.converter_of
        fields.extend(COPY_NULL if value is None else copy_field(converters[name](value))
                      for name, value in zip(plan.schema.key_columns, origin.moved_from,
                                             strict=True))
    return "\t" + "\t".join(fields)


def note_run(counts: dict[TableRef, int], last_ts: dict[TableRef, int], table: TableRef,
             events: int, source_ts_ms: int | None) -> None:
    """Count a run of consecutive events of one table (per run, not per event)."""
    counts[table] = counts.get(table, 0) + events
    if source_ts_ms is not None:
        last_ts[table] = source_ts_ms
