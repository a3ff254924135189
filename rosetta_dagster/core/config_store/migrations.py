"""Versioned SQL migrations for the config store, applied idempotently.

Migrations are ``migrations/NNNN_name.sql`` files. All pending ones are applied in one
transaction under a transaction-scoped advisory lock, so concurrent starters (webserver, daemon,
code server, CLI) never race and a failed migration leaves nothing half-applied.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg2.extensions

logger = logging.getLogger("rosetta.config_store")

# Arbitrary constant key for pg_advisory_xact_lock: "rosetta migrations".
_MIGRATION_LOCK_KEY = 0x526F7365_7461
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    folder = resources.files("rosetta_dagster.core.config_store") / "migrations"
    migrations = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            migrations.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"Duplicate config store migration versions: {versions}.")
    return migrations


def apply_migrations(conn: psycopg2.extensions.connection) -> list[Migration]:
    """Apply pending migrations and commit; returns those applied (empty when up to date)."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
        cursor.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cursor.execute("SELECT version, checksum FROM schema_migrations")
        applied = dict(cursor.fetchall())
        pending = []
        for migration in load_migrations():
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    logger.warning(
                        "Config store migration %04d_%s changed after it was applied; "
                        "write a new migration instead of editing an applied one",
                        migration.version,
                        migration.name,
                    )
                continue
            cursor.execute(migration.sql)
            cursor.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            pending.append(migration)
    conn.commit()
    for migration in pending:
        logger.info("Applied config store migration %04d_%s", migration.version, migration.name)
    return pending


def current_version(conn: psycopg2.extensions.connection) -> int:
    """Highest applied migration version, 0 for a database that was never migrated."""
    with conn.cursor() as cursor:
        cursor.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        row = cursor.fetchone()
        if not row or not row[0]:
            return 0
        cursor.execute("SELECT coalesce(max(version), 0) FROM schema_migrations")
        result = cursor.fetchone()
        return int(result[0]) if result else 0
