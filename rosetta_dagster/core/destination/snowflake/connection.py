"""Connections to a Snowflake destination: the account's settings from ``rosetta.yaml`` (a
password or a key pair, each from a ``${VAR}`` reference), and the session settings every
statement relies on. Errors name the destination and account, never a secret."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import snowflake.connector
from snowflake.connector import SnowflakeConnection
from snowflake.connector.cursor import SnowflakeCursor

from rosetta_dagster.core.dsn import mask_secrets
from rosetta_dagster.core.errors import RosettaError
from rosetta_dagster.core.pipeline_config import Destination

# Session settings: quoted names stay case-sensitive (PostgreSQL's names, as they are), no
# stage is created for large bindings (DDL would commit the batch's open transaction: rows
# are sent in slices instead), times print in UTC.
SESSION_PARAMETERS: dict[str, Any] = {
    "QUOTED_IDENTIFIERS_IGNORE_CASE": False,
    "CLIENT_STAGE_ARRAY_BINDING_THRESHOLD": 0,
    "TIMEZONE": "UTC",
    "CLIENT_OUT_OF_BAND_TELEMETRY_ENABLED": False,
}


def _private_key(destination: Destination) -> bytes:
    """The key pair's private key as DER (the connector's form), from its PEM file."""
    from cryptography.hazmat.primitives import serialization

    account = destination.snowflake
    assert account is not None and account.private_key_file is not None
    try:
        pem = Path(account.private_key_file).read_bytes()
    except OSError as exc:
        raise RosettaError(f"Destination {destination.name}: its private key file "
                           f"{account.private_key_file} cannot be read ({exc.strerror}).") from None
    passphrase = account.private_key_passphrase
    try:
        key = serialization.load_pem_private_key(
            pem, password=passphrase.encode() if passphrase else None)
    except (ValueError, TypeError) as exc:
        raise RosettaError(f"Destination {destination.name}: its private key file "
                           f"{account.private_key_file} is not a usable PEM key "
                           f"({type(exc).__name__}; a wrong or missing passphrase?).") from None
    return key.private_bytes(encoding=serialization.Encoding.DER,
                             format=serialization.PrivateFormat.PKCS8,
                             encryption_algorithm=serialization.NoEncryption())


def connect(destination: Destination) -> SnowflakeConnection:
    """A connection in autocommit mode (a batch says BEGIN ... COMMIT itself)."""
    account = destination.snowflake
    assert account is not None
    options: dict[str, Any] = {
        # No session schema: every name is qualified (a schema name given here would be taken
        # unquoted, in upper case).
        "account": account.account, "user": destination.user, "database": destination.database,
        "paramstyle": "qmark", "autocommit": True,
        "client_session_keep_alive": True, "login_timeout": 60, "network_timeout": 300,
        "session_parameters": dict(SESSION_PARAMETERS), "application": "Rosetta",
        # No probes of cloud metadata endpoints (the login's client-environment report): up
        # to 0.2 s per connection, and longer where those addresses are dropped rather than
        # refused (DNS and AWS credential lookups run to their own timeouts).
        "platform_detection_timeout_seconds": 0.0,
    }
    for key, value in (("warehouse", account.warehouse), ("role", account.role)):
        if value:
            options[key] = value
    if destination.host:  # an explicit endpoint (private link, or an emulator in tests)
        options.update(host=destination.host, port=destination.port, protocol=account.protocol)
    if account.private_key_file is not None:
        options["private_key"] = _private_key(destination)
    else:
        options["password"] = destination.password
    try:
        return snowflake.connector.connect(**options)
    except snowflake.connector.Error as exc:
        first = mask_secrets(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise RosettaError(f"Destination {destination.name}: could not connect to Snowflake "
                           f"account {account.account} as {destination.user} ({first}).") from None


class SnowflakeSession:
    """A writer's connection to Snowflake, opened when first needed and kept (the session's
    keep-alive holds it); one cursor, used on the stream's thread."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self._conn: SnowflakeConnection | None = None
        self._cursor: SnowflakeCursor | None = None
        self._lock = threading.RLock()
        self.in_transaction = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[SnowflakeCursor]:
        with self._lock:
            if self._conn is None or self._conn.is_closed():
                self._conn = connect(self.destination)
                self._cursor = self._conn.cursor()
            assert self._cursor is not None
            yield self._cursor

    def batch_done(self) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(snowflake.connector.Error):
                    self._conn.close()
            self._conn = self._cursor = None


@contextlib.contextmanager
def cursor(destination: Destination) -> Iterator[SnowflakeCursor]:
    """A cursor on a connection of its own, closed with the block."""
    conn = connect(destination)
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        with contextlib.suppress(snowflake.connector.Error):
            conn.close()
