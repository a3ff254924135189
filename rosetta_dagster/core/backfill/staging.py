"""Names of a backfill job's staging tables in a destination (in the target schema)."""

from __future__ import annotations


def job_prefix(job_id: int) -> str:
    """Every staging table of a job starts with this (dropped together when the job ends)."""
    return f"_rosetta_backfill_{int(job_id)}_"


def chunk_table(job_id: int, chunk: int) -> str:
    """Where a job stages one chunk."""
    return f"{job_prefix(job_id)}{int(chunk)}"


def marks_table(job_id: int) -> str:
    """The job's chunks that are staged and not yet applied."""
    return f"{job_prefix(job_id)}chunks"
