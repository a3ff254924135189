"""Parsing PostgreSQL connection URLs and describing connection failures without leaking secrets."""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg2
import psycopg2.extensions

from rosetta_dagster.core.errors import DatabaseConfigError

# Settings that change how values are written as text or read back from it. Every connection
# whose values the product reads or writes as text pins them (PostgreSQL's own subscriber pins
# DateStyle, IntervalStyle and extra_float_digits on its replication connection), so copies and
# comparisons are exact whatever the servers are configured with.
PINNED_SETTINGS = (
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
)


def pinned_options(*extra: str) -> str:
    """libpq ``options`` that pin :data:`PINNED_SETTINGS` (plus ``extra`` ``-c`` settings)."""
    return " ".join([*(f"-c {name}={value}" for name, value in PINNED_SETTINGS), *extra])


_URL_PASSWORD = re.compile(r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")
_KEYWORD_PASSWORD = re.compile(r"(?P<prefix>password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_LIBPQ_SERVER_PREFIX = re.compile(r'^connection to server (at|on) .*? failed:\s*')
_SEVERITY_PREFIX = re.compile(r"^(FATAL|ERROR):\s+")


def mask_secrets(text: str) -> str:
    """Replace passwords in URLs (``user:secret@``) and key/value DSNs (``password=secret``)."""
    text = _URL_PASSWORD.sub(r"\g<prefix>***@", text)
    return _KEYWORD_PASSWORD.sub(r"\g<prefix>***", text)


def summarize_connection_error(exc: BaseException) -> str:
    """The first meaningful line of a libpq/psycopg2 error, without host prefixes or secrets.

    ``connection to server at "127.0.0.1", port 5432 failed: Connection refused`` becomes
    ``Connection refused``, matching the log lines of the deployment checklist.
    """
    for raw_line in str(exc).splitlines():
        line = _SEVERITY_PREFIX.sub("", _LIBPQ_SERVER_PREFIX.sub("", raw_line.strip())).strip()
        if line:
            return mask_secrets(line)
    return mask_secrets(type(exc).__name__)


def is_authentication_error(exc: BaseException) -> bool:
    """Errors that retrying cannot fix: wrong credentials, unknown role or database, pg_hba refusal."""
    text = str(exc)
    return any(
        marker in text
        for marker in (
            "password authentication failed",
            "no password supplied",
            "no pg_hba.conf entry",
            "does not exist",
        )
    )


@dataclass(frozen=True)
class DatabaseTarget:
    """Where a pool connects, with a printable description that never includes the password."""

    label: str
    dsn: str
    params: dict[str, str]

    @property
    def description(self) -> str:
        host = self.params.get("host", "localhost")
        port = self.params.get("port", "5432")
        database = self.params.get("dbname", self.params.get("user", ""))
        user = self.params.get("user", "")
        where = f"{host}:{port}/{database}"
        return f"{user}@{where}" if user else where


def parse_database_url(url: str | None, *, label: str, setting: str) -> DatabaseTarget:
    """Validate a PostgreSQL URL (``postgresql://user:password@host:port/db``) or key/value DSN.

    ``setting`` names where the value came from (e.g. ``CONFIG_DATABASE_URL``) so the error can
    point the user at it.
    """
    if url is None or not url.strip():
        raise DatabaseConfigError(f"{setting} for {label} is not set.")
    dsn = url.strip()
    # SQLAlchemy-style driver suffixes (postgresql+psycopg2://) are not understood by libpq.
    dsn = re.sub(r"^postgres(ql)?\+[a-z0-9_]+://", "postgresql://", dsn)
    if "://" in dsn and not re.match(r"^postgres(ql)?://", dsn):
        scheme = dsn.split("://", 1)[0]
        raise DatabaseConfigError(
            f"{setting} for {label} uses the scheme '{scheme}://' but must be a PostgreSQL URL "
            "(postgresql://user:password@host:port/database)."
        )
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as exc:
        reason = mask_secrets(str(exc).strip().splitlines()[0]).removeprefix("invalid dsn: ")
        raise DatabaseConfigError(
            f"{setting} for {label} is not a valid PostgreSQL connection URL: {reason}."
        ) from None
    if "port" in params and not params["port"].isdigit():
        raise DatabaseConfigError(
            f"{setting} for {label} is not a valid PostgreSQL connection URL: port "
            f"'{params['port']}' is not a number."
        )
    return DatabaseTarget(label=label, dsn=dsn, params=params)
