"""How captured values become COPY text, whichever engine captured them.

Each engine hands the applier a :class:`ValueCodec`: a converter per destination column (chosen
once per schema version, off the per-value path) and a test for the engine's "unchanged TOAST
value" marker, which is never written (the column keeps the destination's value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rosetta_dagster.core.table_schema import Column

COPY_NULL = "\\N"
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})

Converter = Callable[[Any], str]


def copy_field(text: str) -> str:
    """Escape a text value for COPY ... FROM STDIN (text format)."""
    return text.translate(_COPY_ESCAPES)


# One translate per row instead of one escape per value, for values that are PostgreSQL's own
# text decoded as strict UTF-8 (ValueCodec.text_as_sent): such text never holds NUL (no
# PostgreSQL text type can) nor a lone surrogate (strict decoding rejects them), so NUL joins
# the fields (becoming the tab) and a lone surrogate stands for NULL (becoming \N).
_ROW_SEPARATOR = "\x00"
ROW_NULL = "\ud800"
_ROW_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                              _ROW_SEPARATOR: "\t", ROW_NULL: COPY_NULL})


def copy_row(fields: list[str]) -> str:
    """A COPY text line (without its newline) from text values, ``ROW_NULL`` for NULL; raises
    TypeError when a value is not text (the caller then takes the field-by-field path)."""
    return _ROW_SEPARATOR.join(fields).translate(_ROW_ESCAPES)


class SourceText(str):
    """A value already in its PostgreSQL text form (under the pinned settings): re-read from
    the source, or a parked change being replayed. Every engine's converters pass it as is."""

    __slots__ = ()


@dataclass(frozen=True)
class ValueCodec:
    """An engine's event values -> PostgreSQL text input, column by column."""

    converter_for: Callable[[Column], Converter]
    is_unchanged: Callable[[Any], bool]
    # Why a column (a primary key column when the flag is set) cannot be carried exactly by
    # this engine (None: it can).
    refusal: Callable[[Column, bool], str | None]
    # True when the engine's own value may not be used: the column is re-read from the source
    # by key (see core.capture.reread): in every event (always_reread), or when a value is
    # outside the range the engine carries exactly (reread_when: the test of a value).
    reread: Callable[[Column], bool] = lambda column: False
    always_reread: Callable[[Column], bool] = lambda column: False
    reread_when: Callable[[Column], Callable[[Any], bool] | None] = lambda column: None
    # Re-read in every event of the engine's own snapshot (a value it reads there cannot be
    # told from another one, e.g. Debezium's BC dates, which its snapshot reads as AD).
    reread_in_snapshot: Callable[[Column], bool] = lambda column: False
    # Every converter passes values through unchanged and values are str decoded as strict
    # UTF-8 (or None / the unchanged marker): rows may be escaped whole (copy_row).
    text_as_sent: bool = False
