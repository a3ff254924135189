"""Debezium's stored offset of a pipeline, read and written the way the engine stores it.

The engine keeps offsets in Kafka's ``FileOffsetBackingStore``: a Java-serialized
``HashMap<byte[], byte[]>`` of JSON key -> JSON value. Writing the start offset ourselves lets
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

import jpype

from rosetta_dagster.core.capture.debezium.jvm import ensure_jvm
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import PipelineDefinition


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


def read_offset(path: Path, pipeline: PipelineDefinition) -> StoredOffset | None:
    """The pipeline's stored offset; None when there is none."""
    if not path.exists():
        return None
    ensure_jvm(pipeline.settings.jvm_max_heap)
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
            value = json.loads(bytes(stored.get(key)).decode())
            lsn, processed = value.get("lsn"), value.get("lsn_proc")
            return StoredOffset(None if lsn is None else int(lsn),
                                None if processed is None else int(processed))
    return None


def write_start_offset(path: Path, pipeline: PipelineDefinition, lsn: int) -> None:
    """Store an offset that makes the engine stream from ``lsn`` with nothing processed yet.

    Only ``lsn`` is set: without ``lsn_proc``/``lsn_commit`` Debezium skips nothing it
    receives from that position. Written to a temporary file and renamed, so a crash leaves
    either no offset or a whole one.
    """
    ensure_jvm(pipeline.settings.jvm_max_heap)
    value = json.dumps({"lsn": lsn, "ts_usec": int(time.time() * 1_000_000)},
                       separators=(",", ":")).encode()
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
