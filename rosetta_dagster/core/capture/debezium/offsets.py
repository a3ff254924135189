"""Debezium's stored offset of a pipeline, read and written the way the engine stores it.

With ``offset_store: file`` the engine keeps offsets in Kafka's ``FileOffsetBackingStore``: a
Java-serialized ``HashMap<byte[], byte[]>`` of JSON key -> JSON value (``offset_table`` keeps the
same key and value in the config store). Writing the start offset ourselves lets
the stream begin exactly at the consistent point of a slot whose snapshot Rosetta copied (with
no offset, Debezium would start at the server's current WAL position and skip what was written
during the copy).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import PipelineDefinition


def _jvm(pipeline: PipelineDefinition) -> Any:
    """JPype with the JVM started: only the offsets file needs it (imported when used, so the
    pure helpers here cost nothing to import)."""
    import jpype

    from rosetta_dagster.core.capture.debezium.jvm import ensure_jvm

    ensure_jvm(pipeline.settings.jvm_max_heap)
    return jpype


class OffsetFileError(RosettaError):
    """The offsets file could not be read or written."""


def offset_key(pipeline: PipelineDefinition) -> bytes:
    """The engine's key: ``[engine name, source partition]`` as compact JSON."""
    partition = {"server": f"rosetta_{pipeline.name}"}
    return json.dumps([f"rosetta-{pipeline.name}", partition], separators=(",", ":")).encode()


@dataclass(frozen=True)
class StoredOffset:
    lsn: int | None
    # Set by the engine once it processed an event; absent in an offset Rosetta wrote at a
    # load's consistent point (nothing processed yet).
    processed_lsn: int | None

    @property
    def position(self) -> int | None:
        return self.processed_lsn if self.processed_lsn is not None else self.lsn

    def behind_slot(self, slot_confirmed_lsn: int) -> int | None:
        """Debezium's own stale-offset check needs a processed position, which an offset
        written at a load's consistent point lacks: that one is compared here. (Offsets the
        engine wrote are left to the engine's check.)"""
        if self.processed_lsn is not None or self.lsn is None:
            return None
        return self.lsn if slot_confirmed_lsn > self.lsn else None


def parse_offset_value(value: bytes) -> StoredOffset:
    """The positions in an offset value (the engine's JSON)."""
    document = json.loads(value.decode())
    lsn, processed = document.get("lsn"), document.get("lsn_proc")
    return StoredOffset(None if lsn is None else int(lsn),
                        None if processed is None else int(processed))


def start_offset_value(lsn: int) -> bytes:
    """An offset that makes the engine stream from ``lsn`` with nothing processed yet: only
    ``lsn`` is set, and without ``lsn_proc``/``lsn_commit`` Debezium skips nothing it receives
    from that position."""
    return json.dumps({"lsn": lsn, "ts_usec": int(time.time() * 1_000_000)},
                      separators=(",", ":")).encode()


def read_offset_value(path: Path, pipeline: PipelineDefinition) -> bytes | None:
    """The pipeline's offset value in an offsets file; None when there is none."""
    if not path.exists():
        return None
    jpype = _jvm(pipeline)
    stream_class = jpype.JClass("java.io.ObjectInputStream")
    file_class = jpype.JClass("java.io.FileInputStream")
    try:
        stream = stream_class(file_class(str(path)))
        try:
            stored = stream.readObject()
        finally:
            stream.close()
    except jpype.JException as exc:
        raise OffsetFileError(f"Pipeline {pipeline.name}: cannot read offsets {path}: {exc}") from None
    wanted = offset_key(pipeline)
    for key in stored.keySet():
        if bytes(key) == wanted:
            return bytes(stored.get(key))
    return None


def read_offset(path: Path, pipeline: PipelineDefinition) -> StoredOffset | None:
    """The pipeline's stored offset; None when there is none."""
    value = read_offset_value(path, pipeline)
    return None if value is None else parse_offset_value(value)


def write_offset_value(path: Path, pipeline: PipelineDefinition, value: bytes) -> None:
    """Store the pipeline's offset value as the engine's file store does. Written to a
    temporary file and renamed, so a crash leaves either no offset or a whole one."""
    jpype = _jvm(pipeline)
    stored = jpype.JClass("java.util.HashMap")()
    byte_array = jpype.JArray(jpype.JByte)
    stored.put(byte_array(offset_key(pipeline)), byte_array(value))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    stream_class = jpype.JClass("java.io.ObjectOutputStream")
    file_class = jpype.JClass("java.io.FileOutputStream")
    try:
        stream = stream_class(file_class(str(partial)))
        try:
            stream.writeObject(stored)
        finally:
            stream.close()
    except jpype.JException as exc:
        raise OffsetFileError(f"Pipeline {pipeline.name}: cannot write offsets {path}: {exc}") from None
    os.replace(partial, path)


# The offset entries that place a record; the others (times, snapshot flags) do not.
_PLACING_KEYS = ("lsn", "lsn_proc", "lsn_commit", "txId")


def record_identity(offset: Any) -> str:
    """A record's place as its stored offset names it (the engine's Java map, or the stored
    JSON read back): the records of one WAL record share it."""
    return "/".join("" if (value := offset.get(key)) is None else str(int(value))
                    for key in _PLACING_KEYS)
