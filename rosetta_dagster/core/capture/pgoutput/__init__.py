"""The pgoutput engine: the slot read over the replication protocol, values kept as the text
PostgreSQL sent, positions committed in each destination with the data (nothing on local disk).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg2.extensions

from rosetta_dagster.core.capture import BatchHandler, Capture, PositionStore
from rosetta_dagster.core.capture.pgoutput.positions import DestinationPositions
from rosetta_dagster.core.events import UNCHANGED_TOAST
from rosetta_dagster.core.pipeline_config import PipelineDefinition, TableRef
from rosetta_dagster.core.table_schema import (
    NESTED_XML_REFUSAL,
    Column,
    TableSchema,
    nested_xml,
    xml_as_text,
)
from rosetta_dagster.core.values import ValueCodec


def _as_sent(value: Any) -> str:
    return value  # type: ignore[no-any-return]  # already the type's text output


# Object-identifier types print the name of an object of the source database; the same text
# would name another object (or none) on the destination. regtype, regconfig and
# regdictionary name built-in objects as often as not and are carried.
_NAMES_SOURCE_OBJECTS = frozenset({"regclass", "regproc", "regprocedure", "regoper",
                                   "regoperator", "regnamespace", "regrole", "regcollation"})


def _refusal(column: Column, key: bool) -> str | None:
    if column.base_type in _NAMES_SOURCE_OBJECTS:
        return "its text names an object of the source database, which the destination lacks"
    if nested_xml(column):
        return NESTED_XML_REFUSAL
    return None


# xml: the output function pgoutput sends drops a default XML declaration; its text is read
# back from the source (core.capture.reread).
PGOUTPUT_VALUES = ValueCodec(converter_for=lambda column: _as_sent,
                             is_unchanged=lambda value: value is UNCHANGED_TOAST,
                             refusal=_refusal, reread=xml_as_text, always_reread=xml_as_text,
                             text_as_sent=True)


class PgoutputEngine:
    name = "pgoutput"
    values = PGOUTPUT_VALUES
    applies_once = True  # each destination commits its position with the batch

    def source_refusal(self, conn: psycopg2.extensions.connection) -> str | None:
        return None

    def position_store(self, pipeline: PipelineDefinition, offsets_dir: Path) -> PositionStore:
        return DestinationPositions(pipeline)

    def capture(
        self,
        pipeline: PipelineDefinition,
        positions: PositionStore,
        on_batch: BatchHandler,
        *,
        schemas: Mapping[TableRef, TableSchema],
        start: int | None,
    ) -> Capture:
        from rosetta_dagster.core.capture.pgoutput.engine import PgoutputCapture

        assert start is not None, "the pgoutput engine starts from a stored position"
        from rosetta_dagster.core.capture.reread import SourceReread
        from rosetta_dagster.core.replication import read_source_schema

        known_types = {table: schema.column_types for table, schema in schemas.items()}
        return PgoutputCapture(pipeline, start, on_batch, known_types,
                               reread=SourceReread(
                                   schemas, PGOUTPUT_VALUES,
                                   read_schema=lambda t: read_source_schema(pipeline, t)))


PGOUTPUT = PgoutputEngine()
