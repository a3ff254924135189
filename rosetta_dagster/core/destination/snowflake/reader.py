"""Reading a Snowflake table for the parity checks (``warehouse.reader``), on a connection of
the reader's own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

from rosetta_dagster.core.destination.snowflake.statements import TEXT_PARAMETER
from rosetta_dagster.core.destination.snowflake.types import ordered_like_postgres, snow_type
from rosetta_dagster.core.destination.warehouse.reader import WarehouseTableReader
from rosetta_dagster.core.destination.warehouse.types import KeptType
from rosetta_dagster.core.table_schema import Column


class SnowflakeTableReader(WarehouseTableReader):
    kind: ClassVar[str] = "Snowflake"
    text_parameter: ClassVar[str] = TEXT_PARAMETER

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def kept(self, column: Column) -> KeptType:
        return snow_type(column)

    def ordered_like_postgres(self, column: Column) -> bool:
        return ordered_like_postgres(column)

    @contextlib.contextmanager
    def _read(self) -> Iterator[tuple[Any, str]]:
        yield self.cursor, ""
