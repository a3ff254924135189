"""Reading a DuckDB table for the parity checks (``warehouse.reader``), one statement at a time
through the hand-off (``database.read_access``): the stream goes on between them, so a count
re-taken while rows are in flight sees them land."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from rosetta_dagster.core.destination.duckdb.database import catalog, read_access
from rosetta_dagster.core.destination.duckdb.statements import quote
from rosetta_dagster.core.destination.duckdb.types import duck_type, ordered_like_postgres
from rosetta_dagster.core.destination.warehouse.reader import WarehouseTableReader, row_text
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.table_schema import Column

__all__ = ["DuckDBTableReader", "row_text"]


class DuckDBTableReader(WarehouseTableReader):
    kind: ClassVar[str] = "DuckDB"

    def __init__(self, path: str) -> None:
        self.path = path

    def kept(self, column: Column) -> KeptType:
        return duck_type(column)

    def ordered_like_postgres(self, column: Column) -> bool:
        return ordered_like_postgres(column)

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[Any, str]]:
        with read_access(self.path) as conn:
            yield conn, quote(catalog(conn)) + "."
