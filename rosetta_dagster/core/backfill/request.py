"""What a backfill request is told before its job is queued (the CLI and the API alike): a
table without a key is re-copied whole, so a filter on it is refused at once rather than by
the job's run later."""

from __future__ import annotations

import psycopg2

from rosetta_dagster.core.backfill.chunk_copy import keyless_backfill
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.filters import Condition, FilterError
from rosetta_dagster.core.pipeline_config import TableRef, load_config
from rosetta_dagster.core.replication import source_connection
from rosetta_dagster.core.table_schema import read_table_schema

KEYLESS_NOTE = "no key: the whole table is re-copied in one chunk and replaced at once"


def keyless_source_table(pipeline_name: str, table: TableRef) -> bool:
    """Whether the source table has no key, read with the pipeline file. False when there is
    no pipeline file here or the source is out of reach: the job is queued as asked, and its
    run refuses a filter on a table without a key."""
    try:
        pipeline = load_config().pipeline(pipeline_name)
        with source_connection(pipeline) as conn:
            return read_table_schema(conn, table, f"source {pipeline.source.name}",
                                     pipeline.options(table)).keyless
    except (RosettaError, psycopg2.Error):
        return False


def check_backfill_request(pipeline_name: str, table: TableRef,
                           conditions: list[Condition]) -> bool:
    """Raise ``FilterError`` for a filter on a table without a key; True when the table has
    none (the whole table will be re-copied)."""
    keyless = keyless_source_table(pipeline_name, table)
    if keyless and conditions:
        raise FilterError(keyless_backfill(table))
    return keyless
