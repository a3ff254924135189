"""One DuckDB database file, one writing process: the stream's.

DuckDB lets one process open a database file for writing, and no other process open it at all
meanwhile (not even to read). So the stream process owns the file, and lets go of it between
batches when somebody else needs it:

* a reader (the parity checks, ``rosetta validate``, a test) *asks* by creating a request file
  of its own beside the database (``<file>.read-request.<pid>.<n>``), waits until it can open
  the file read-only,
  reads, closes it and removes the request (:func:`read_access`; the checks do this for each
  statement, so the stream goes on between them);
* the stream's writer (:class:`OwnedDatabase`) closes its connection after a committed batch
  when a request is there, and whenever it has been idle for a second; before it opens the file
  again it waits until no fresh request is left.

A batch is never cut short for a reader: a reader waits at most one batch (and gives up, in
one sentence, after ``READ_WAIT_S``). Within the stream process (the initial load's workers,
its own reads, a test that runs the stream in a thread) connections share the one open
database: DuckDB keeps one instance per process and file, and refuses a read-only connection
beside a writing one, so a reader there takes an ordinary connection instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb

from rosetta_dagster.core.errors import RosettaError

READ_WAIT_S = 60.0
IDLE_RELEASE_S = 1.0
_POLL_S = 0.05


def request_path(path: str) -> Path:
    """A new reader's own request (each reader removes only its own: readers in several
    processes, and the stream's own reads, overlap)."""
    return Path(f"{path}.read-request.{os.getpid()}.{uuid.uuid4().hex[:8]}")


def _fresh_request(path: str) -> bool:
    """A reader is waiting (a request older than ``READ_WAIT_S`` was left by a reader that
    died: ignored)."""
    file = Path(path)
    now = time.time()
    for request in file.parent.glob(f"{glob.escape(file.name)}.read-request.*"):
        try:
            if now - request.stat().st_mtime < READ_WAIT_S:
                return True
        except FileNotFoundError:
            continue  # its reader is done
    return False


def _locked(exc: duckdb.Error) -> bool:
    """Held elsewhere: by another process (a lock), or in this one with the other mode (a
    writer waiting for a reader of its own process)."""
    message = str(exc).lower()
    return "lock" in message or "different configuration" in message


def _open_for_writing_here(exc: duckdb.Error) -> bool:
    """The file is open in this process with another configuration (for writing, when a
    read-only connection was asked for)."""
    return "different configuration" in str(exc).lower()


def catalog(conn: duckdb.DuckDBPyConnection) -> str:
    """The database's catalog name (the file's name without its extension)."""
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None
    return str(row[0])


def connect(path: str, *, read_only: bool = False, wait_s: float = READ_WAIT_S,
            what: str = "the database") -> duckdb.DuckDBPyConnection:
    """Open the file, retrying while another process holds it (up to ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.ConnectionException as exc:
            if read_only and _open_for_writing_here(exc):
                # This process writes the file (the stream's own reads, or a test that runs
                # the stream in a thread): share that open database rather than wait for it.
                try:
                    return duckdb.connect(path)
                except duckdb.ConnectionException as again:
                    # Meanwhile the writer let go and another reader of this process opened
                    # it read-only: the next round joins that one.
                    exc = again
            if not _locked(exc) or time.monotonic() >= deadline:
                raise RosettaError(
                    f"DuckDB file {path} could not be opened for {what}: this process held "
                    f"it otherwise for {wait_s:g}s ({str(exc).splitlines()[0]}).") from None
            time.sleep(_POLL_S)
        except duckdb.IOException as exc:
            if not _locked(exc) or time.monotonic() >= deadline:
                raise RosettaError(
                    f"DuckDB file {path} could not be opened for {what}: another process "
                    f"held it for {wait_s:g}s ({str(exc).splitlines()[0]}).") from None
            time.sleep(_POLL_S)


@contextlib.contextmanager
def read_access(path: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to a database the stream may own (see the module's text)."""
    if not Path(path).exists():
        raise RosettaError(f"DuckDB file {path} does not exist yet (no stream has written it).")
    request = request_path(path)
    request.write_text(str(os.getpid()))
    try:
        conn = connect(path, read_only=True, what="reading")
        try:
            yield conn
        finally:
            conn.close()
    finally:
        with contextlib.suppress(FileNotFoundError):
            request.unlink()


class OwnedDatabase:
    """The stream's connection to its DuckDB file: opened when a batch needs it, closed when a
    reader asks or it has been idle (thread-safe; the stream applies on one thread)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self.in_transaction = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection, held by the caller for the block (no release meanwhile)."""
        with self._lock:
            self._cancel_timer()
            if self._conn is None:
                deadline = time.monotonic() + READ_WAIT_S
                while _fresh_request(self.path) and time.monotonic() < deadline:
                    time.sleep(_POLL_S)  # a reader is at it: let it finish
                self._conn = connect(self.path, what="writing")
            yield self._conn

    def batch_done(self) -> None:
        """A batch committed: let a waiting reader in now, else close when idle."""
        with self._lock:
            if self.in_transaction:
                return
            if _fresh_request(self.path):
                self._close()
                return
            self._cancel_timer()
            self._timer = threading.Timer(IDLE_RELEASE_S, self._release_idle)
            self._timer.daemon = True
            self._timer.start()

    def _release_idle(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a batch is running: it schedules the next release itself
        try:
            if not self.in_transaction:
                self._close()
        finally:
            self._lock.release()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(duckdb.Error):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._cancel_timer()
            self._close()
