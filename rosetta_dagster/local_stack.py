"""The local stack behind ``rosetta dev``: one PostgreSQL cluster and a Dagster home.

The cluster holds ``config_db`` (Rosetta's config store) and ``dagster`` (Dagster's run and
event storage, via dagster-postgres, which avoids SQLite locking under concurrent writers).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from rosetta_dagster.core.local_postgres import LocalPostgresCluster

CONFIG_DB = "config_db"
DAGSTER_DB = "dagster"


@dataclass(frozen=True)
class LocalStack:
    root: Path

    @property
    def cluster_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    def _password(self) -> str:
        # A random password per machine, kept beside the cluster with owner-only permissions.
        path = self.root / "postgres.password"
        if not path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def cluster(self) -> LocalPostgresCluster:
        return LocalPostgresCluster(self.cluster_dir, password=self._password())

    def up(self) -> LocalPostgresCluster:
        cluster = self.cluster().start()
        cluster.create_database(CONFIG_DB)
        cluster.create_database(DAGSTER_DB)
        self._write_dagster_yaml(cluster)
        self.write_env_file(cluster)
        return cluster

    def write_env_file(self, cluster: LocalPostgresCluster) -> Path:
        """``env.sh`` exporting the local URLs, to ``source`` in a shell (owner-only)."""
        path = self.root / "env.sh"
        path.touch(mode=0o600)
        path.write_text(
            f"export CONFIG_DATABASE_URL='{cluster.dsn(CONFIG_DB)}'\n"
            f"export DAGSTER_HOME='{self.dagster_home}'\n"
        )
        return path

    def down(self) -> None:
        cluster = self.cluster()
        if cluster.is_initialized:
            cluster.stop()

    def _write_dagster_yaml(self, cluster: LocalPostgresCluster) -> None:
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        instance = {
            "storage": {
                "postgres": {
                    "postgres_db": {
                        "hostname": "127.0.0.1",
                        "port": cluster.port,
                        "username": cluster.superuser,
                        "password": cluster.password,
                        "db_name": DAGSTER_DB,
                        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg3, not installed here.
                        "scheme": "postgresql+psycopg2",
                    }
                }
            },
            "telemetry": {"enabled": False},
        }
        path = self.dagster_home / "dagster.yaml"
        path.touch(mode=0o600)
        path.write_text(yaml.safe_dump(instance, sort_keys=False))
