"""Structured row filters of backfill jobs: parsed, validated and compiled to SQL safely.

A filter is a list of ``{"column", "operator", "value"}`` conditions joined with AND. Columns
become ``psycopg2.sql.Identifier`` after being checked against the table's real columns, values
are always query parameters, and operators come from a fixed table; nothing the user typed is
ever formatted into SQL text.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg2 import sql

from rosetta_dagster.core.errors import RosettaError

# operator -> how many values it takes: 1, "list" (1+), 2 (between), 0 (null tests)
OPERATORS: Mapping[str, int | str] = {
    "=": 1, "!=": 1, "<": 1, "<=": 1, ">": 1, ">=": 1, "like": 1,
    "in": "list", "between": 2, "is null": 0, "is not null": 0,
}
Scalar = str | int | float | bool


class FilterError(RosettaError):
    """A backfill filter is malformed or names a column the table does not have."""


@dataclass(frozen=True)
class Condition:
    column: str
    operator: str
    value: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "operator": self.operator, "value": self.value}


def _is_scalar(value: Any) -> bool:
    return isinstance(value, Scalar)


def parse_filter(raw: Any) -> list[Condition]:
    """Validate the shape of a filter (no database needed); errors name the condition."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise FilterError("The filter must be a list of {column, operator, value} conditions.")
    conditions = []
    for index, item in enumerate(raw):
        where = f"filter[{index}]"
        if not isinstance(item, Mapping):
            raise FilterError(f"{where} must be an object with column, operator and value.")
        unknown = set(item) - {"column", "operator", "value"}
        if unknown:
            raise FilterError(f"{where} has unknown field '{sorted(unknown)[0]}'.")
        column, operator = item.get("column"), item.get("operator")
        if not isinstance(column, str) or not column:
            raise FilterError(f"{where}.column must be a column name.")
        if not isinstance(operator, str) or operator.lower() not in OPERATORS:
            raise FilterError(
                f"{where}.operator must be one of {', '.join(OPERATORS)}; got {operator!r}."
            )
        operator = operator.lower()
        value = item.get("value")
        arity = OPERATORS[operator]
        if arity == 0 and value is not None:
            raise FilterError(f"{where}: '{operator}' takes no value.")
        if arity == 1 and not _is_scalar(value):
            raise FilterError(f"{where}: '{operator}' needs one value (string or number).")
        if arity == "list" and (
            not isinstance(value, list) or not value or not all(map(_is_scalar, value))
        ):
            raise FilterError(f"{where}: 'in' needs a non-empty list of values.")
        if arity == 2 and (
            not isinstance(value, list) or len(value) != 2 or not all(map(_is_scalar, value))
        ):
            raise FilterError(f"{where}: 'between' needs a list of two values.")
        conditions.append(Condition(column, operator, value))
    return conditions


def check_columns(conditions: Sequence[Condition], columns: Collection[str], table: str) -> None:
    for index, condition in enumerate(conditions):
        if condition.column not in columns:
            raise FilterError(
                f"filter[{index}].column: table {table} has no column '{condition.column}'."
            )


def compile_filter(
    conditions: Sequence[Condition], columns: Collection[str], table: str, alias: str | None = None
) -> tuple[sql.Composable, list[Any]]:
    """``(condition SQL, parameters)`` for a WHERE clause; ``TRUE`` for an empty filter."""
    check_columns(conditions, columns, table)
    parts: list[sql.Composable] = []
    params: list[Any] = []
    for condition in conditions:
        column = (
            sql.Identifier(alias, condition.column) if alias else sql.Identifier(condition.column)
        )
        operator = condition.operator
        if operator == "is null":
            parts.append(sql.SQL("{} IS NULL").format(column))
        elif operator == "is not null":
            parts.append(sql.SQL("{} IS NOT NULL").format(column))
        elif operator == "in":
            # A tuple renders as (v1, v2, ...): untyped literals, coerced to the column's type.
            parts.append(sql.SQL("{} IN %s").format(column))
            params.append(tuple(condition.value))
        elif operator == "between":
            parts.append(sql.SQL("{} BETWEEN %s AND %s").format(column))
            params.extend(condition.value)
        else:
            keyword = "LIKE" if operator == "like" else operator
            parts.append(sql.SQL("{} " + keyword + " %s").format(column))  # keyword from OPERATORS
            params.append(condition.value)
    if not parts:
        return sql.SQL("TRUE"), []
    return sql.SQL(" AND ").join(parts), params
