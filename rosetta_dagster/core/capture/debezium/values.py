"""Debezium JSON values (``converter.schemas.enable=false``) to PostgreSQL COPY text fields.

Messages carry no schema (smaller, faster to decode); each column's converter is chosen once from
the source catalog instead. The connector runs with ``decimal.handling.mode=string``,
``interval.handling.mode=string``, ``binary.handling.mode=hex`` and the default
``time.precision.mode=adaptive_time_microseconds``, so:

* numeric, money, interval (ISO 8601), timestamptz and timetz (ISO, UTC), uuid, json, jsonb,
  inet, cidr, enums and text types arrive as strings that PostgreSQL parses back exactly;
* date arrives as days since 1970-01-01, time as microseconds since midnight, timestamp as
  microseconds since the epoch;
* bytea arrives as hex; bit/bit varying as little-endian bytes (base64);
* float NaN/Infinity arrive as strings; arrays as JSON lists.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
import re
from collections.abc import Callable
from typing import Any

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.events import UNCHANGED_TOAST
from rosetta_dagster.core.table_schema import NESTED_XML_REFUSAL, Column, nested_xml
from rosetta_dagster.core.values import Converter, SourceText, ValueCodec

# Debezium's value for an unchanged TOASTed column that the WAL record does not carry.
UNAVAILABLE_VALUE = "__debezium_unavailable_value"
_UNAVAILABLE_HEX = UNAVAILABLE_VALUE.encode().hex()
_UNAVAILABLE_BASE64 = base64.b64encode(UNAVAILABLE_VALUE.encode()).decode()

_EPOCH_DATE = dt.date(1970, 1, 1)
_EPOCH = dt.datetime(1970, 1, 1)


class UnsupportedValueError(RosettaError):
    """A value cannot be represented on the destination exactly."""


def is_unavailable(value: Any) -> bool:
    """True for Debezium's unchanged-TOAST placeholder in any of its encodings (and for the
    engine-neutral marker: a re-read value of a row gone from the source, core.capture.reread)."""
    if value is UNCHANGED_TOAST:
        return True
    if isinstance(value, str):
        return value in (UNAVAILABLE_VALUE, _UNAVAILABLE_HEX, _UNAVAILABLE_BASE64)
    if isinstance(value, list) and len(value) == 1:
        return is_unavailable(value[0])
    return False


def _text(value: Any) -> str:
    return str(value)


# decimal.handling.mode=string spells numeric's infinities as Java's constants.
_NUMERIC_SPECIALS = {"POSITIVE_INFINITY": "Infinity", "NEGATIVE_INFINITY": "-Infinity"}


def _numeric(value: Any) -> str:
    return _NUMERIC_SPECIALS.get(value, str(value)) if isinstance(value, str) else str(value)


def _boolean(value: Any) -> str:
    return "t" if value else "f"


def _number(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    return str(value)


def _bytea(value: Any) -> str:
    return "\\x" + value


def _date(value: Any) -> str:
    return (_EPOCH_DATE + dt.timedelta(days=value)).isoformat()


def _time(value: Any) -> str:
    seconds, micros = divmod(int(value), 1_000_000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{hour:02d}:{minute:02d}:{second:02d}.{micros:06d}"


def _timestamp(value: Any) -> str:
    return (_EPOCH + dt.timedelta(microseconds=value)).isoformat(sep=" ")


def _bits(length: int | None) -> Converter:
    def convert(value: Any) -> str:
        if isinstance(value, bool):  # bit(1) arrives as a boolean
            return "1" if value else "0"
        number = int.from_bytes(base64.b64decode(value), "little")
        bits = format(number, "b") if number else "0"
        return bits.zfill(length) if length else bits

    return convert


def _scalar_converter(column: Column) -> Converter:
    base = column.base_type
    if base in ("int2", "int4", "int8", "float4", "float8", "oid"):
        return _number
    if base == "numeric":
        return _numeric
    if base == "bool":
        return _boolean
    if base == "bytea":
        return _bytea
    if base == "date":
        return _date
    if base == "time":
        return _time
    if base == "timestamp":
        return _timestamp
    if base == "bit":
        return _bits(column.type_modifier if column.type_modifier > 0 else None)
    if base == "varbit":
        return _bits(None)
    return _text


def _array_element(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def converter_for(column: Column) -> Converter:
    """The function turning this column's Debezium JSON value into PostgreSQL text input."""
    scalar = _scalar_converter(column)
    if not column.is_array:
        return scalar

    def convert_array(value: Any) -> str:
        if not isinstance(value, list):
            raise UnsupportedValueError(
                f"Column {column.name} expected an array, got {type(value).__name__}."
            )
        parts = ["NULL" if v is None else _array_element(scalar(v)) for v in value]
        return "{" + ",".join(parts) + "}"

    return convert_array


# Base types whose Debezium JSON values the converters above turn into exact text.
SUPPORTED_BASE_TYPES = frozenset(
    {
        "int2", "int4", "int8", "numeric", "float4", "float8", "bool", "text", "varchar",
        "bpchar", "name", "bytea", "date", "time", "timetz", "timestamp", "timestamptz",
        "interval", "uuid", "json", "jsonb", "inet", "cidr", "macaddr", "macaddr8", "money",
        "bit", "varbit", "xml", "citext", "oid",
    }
)


# Types Debezium carries, but not exactly: the offset (timetz), leading zeros (varbit), long
# values (name: NULL when updated), the XML declaration (xml: the output function drops a
# default one). Columns of these types, of arrays (dimensions, lower bounds, NaN elements) and
# of types Debezium does not model are left out of its events and re-read from the source by
# key (see core.capture.reread).
REREAD_BASE_TYPES = frozenset({"timetz", "varbit", "name", "xml"})
# Carried exactly in their ordinary range; a value outside it (BC years, ±infinity, years past
# 9999) makes its row's columns be re-read from the source.
_DAY_RANGE = (-719_162, 2_932_896)  # 0001-01-01 .. 9999-12-31, days since 1970-01-01
_MICROSECOND_RANGE = (-62_135_596_800_000_000, 253_402_300_799_999_999)
_ISO_YEAR_1_TO_9999 = re.compile(r"^(?!0000)\d{4}-")


def _ordinary_day(value: Any) -> bool:
    return isinstance(value, int) and _DAY_RANGE[0] <= value <= _DAY_RANGE[1]


def _ordinary_microsecond(value: Any) -> bool:
    return isinstance(value, int) and _MICROSECOND_RANGE[0] <= value <= _MICROSECOND_RANGE[1]


def _ordinary_timestamptz(value: Any) -> bool:
    return isinstance(value, str) and _ISO_YEAR_1_TO_9999.match(value) is not None


ORDINARY_VALUE = {"date": _ordinary_day, "timestamp": _ordinary_microsecond,
                  "timestamptz": _ordinary_timestamptz}


def reread_when(column: Column) -> Callable[[Any], bool] | None:
    """For a column Debezium carries in an ordinary range only: the test of a value."""
    return None if column.is_array else ORDINARY_VALUE.get(column.base_type)


def reread_in_snapshot(column: Column) -> bool:
    """Debezium's snapshot reads a ``date`` through JDBC and drops its era: '4713-01-01 BC'
    arrives as the day number of 4713-01-01 AD, in the ordinary range (its stream parses the
    text and keeps the era). Every date of a snapshot is therefore read from the source."""
    return not column.is_array and column.base_type == "date"


_NAMES_SOURCE_OBJECTS = frozenset({"regclass", "regproc", "regprocedure", "regoper",
                                   "regoperator", "regnamespace", "regrole", "regcollation"})


def always_reread(column: Column) -> bool:
    return (column.is_array or column.base_type in REREAD_BASE_TYPES
            or (column.enum_name is None and column.base_type not in SUPPORTED_BASE_TYPES))


def needs_reread(column: Column) -> bool:
    """Whether the column's value may come from the source instead of Debezium."""
    return always_reread(column) or reread_when(column) is not None


def refusal(column: Column, key: bool) -> str | None:
    if column.base_type in _NAMES_SOURCE_OBJECTS:
        return "its text names an object of the source database"
    if nested_xml(column):
        return NESTED_XML_REFUSAL
    if key and column.enum_name is None and column.base_type not in SUPPORTED_BASE_TYPES:
        return ("a primary key column of a type Debezium does not carry; the pgoutput engine "
                "does (streaming.engine: pgoutput)")
    return None


def _converter(column: Column) -> Converter:
    """Debezium's value converted, or text as it is: re-read from the source, or a parked
    change replayed (both already PostgreSQL's text form)."""
    convert = converter_for(column)

    def source_text_or_converted(value: Any) -> str:
        return value if type(value) is SourceText else convert(value)

    return source_text_or_converted


DEBEZIUM_VALUES = ValueCodec(converter_for=_converter, is_unchanged=is_unavailable,
                             refusal=refusal, reread=needs_reread, always_reread=always_reread,
                             reread_when=reread_when, reread_in_snapshot=reread_in_snapshot)
