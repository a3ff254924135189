"""What ``rosetta.yaml`` declares, as typed records: endpoints, tables and their options,
pipelines, operations and notification settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from rosetta_dagster.core.errors import RosettaError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
IDENTIFIER_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


class PipelineConfigError(RosettaError):
    """rosetta.yaml is missing, malformed or inconsistent."""



@dataclass(frozen=True)
class TableRef:
    schema: str
    name: str

    def __post_init__(self) -> None:
        # Looked up in dicts for every change applied: hashed once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.schema, self.name)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined,no-any-return]

    def __reduce__(self) -> tuple[type[TableRef], tuple[str, str]]:
        # Rebuilt, not restored: string hashes differ between processes.
        return TableRef, (self.schema, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @classmethod
    def parse(cls, text: str) -> TableRef:
        parts = text.split(".")
        if len(parts) != 2 or not all(IDENTIFIER_PATTERN.match(p) for p in parts):
            raise ValueError(text)
        return cls(parts[0], parts[1])


@dataclass(frozen=True)
class TableOptions:
    """Per-table replication options: a projection, a row filter, where rows are written.

    The column list and row filter go into the pipeline's publication (PostgreSQL 15+), so the
    source sends only what is wanted; loads, backfills and checks read the same projection."""

    columns: tuple[str, ...] | None = None  # only these (the key is always kept)
    exclude_columns: tuple[str, ...] = ()
    where: str | None = None  # SQL boolean expression over the source table's columns
    # ``replicate: inserts_only``: only INSERTs are published and applied (a table without a
    # replica identity, whose UPDATEs and DELETEs a publication would make fail).
    inserts_only: bool = False
    # The destination table written, per destination name (absent: same name, its schema).
    targets: tuple[tuple[str, TableRef], ...] = ()

    @property
    def filters_rows_or_columns(self) -> bool:
        return self.columns is not None or bool(self.exclude_columns) or self.where is not None

    def target(self, table: TableRef, destination: Destination) -> TableRef:
        return dict(self.targets).get(destination.name, TableRef(destination.schema, table.name))


NO_OPTIONS = TableOptions()


@dataclass(frozen=True)
class PostgresEndpoint:
    """A PostgreSQL database Rosetta reads from or writes to."""

    name: str
    host: str
    port: int
    database: str
    user: str
    password: str | None = field(repr=False, default=None)

    def dsn(self) -> str:
        if self.password is None:
            raise PipelineConfigError(f"The password of '{self.name}' has not been resolved.")
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@"
            f"{self.host}:{self.port}/{quote(self.database, safe='')}"
        )

    @property
    def description(self) -> str:
        return f"{self.user}@{self.host}:{self.port}/{self.database}"


DESTINATION_KINDS = ("postgres", "duckdb", "snowflake")
SNOWFLAKE_PROTOCOLS = ("https", "http")


@dataclass(frozen=True)
class SnowflakeAccount:
    """A Snowflake destination's account settings (the endpoint holds user, database and the
    password; host and port only for an explicit endpoint)."""

    account: str
    warehouse: str | None = None
    role: str | None = None
    # Key-pair authentication: a PEM private key file, its passphrase from ${VAR} (optional).
    private_key_file: str | None = None
    private_key_passphrase: str | None = field(repr=False, default=None)
    protocol: str = "https"


@dataclass(frozen=True)
class Destination(PostgresEndpoint):
    schema: str = "public"
    # ``type:`` in rosetta.yaml: "postgres" (the endpoint's fields), "duckdb" (``path``: a
    # database file; the endpoint's fields are empty) or "snowflake" (``snowflake``: the
    # account; user, database and password in the endpoint's fields).
    kind: str = "postgres"
    path: str | None = None
    snowflake: SnowflakeAccount | None = None

    @property
    def description(self) -> str:
        if self.kind == "duckdb":
            return f"duckdb:{self.path}"
        if self.kind == "snowflake" and self.snowflake is not None:
            return f"snowflake:{self.user}@{self.snowflake.account}/{self.database}"
        return super().description


INITIAL_LOAD_METHODS = ("copy", "debezium")
REPLICATE_MODES = ("all", "inserts_only")
CAPTURE_ENGINES = ("debezium", "pgoutput")
APPLY_ERROR_POLICIES = ("stop", "park")
OFFSET_STORES = ("file", "config_db")


# A Debezium stream's two polling threads (its WAL reader, the engine's queue poll) wake every
# poll interval even when idle, one JVM per pipeline. With more Debezium pipelines than this in
# one configuration (one host, in a Dagster deployment) the interval is longer unless set:
# 20 pipelines x 5 tables at 500 changes/s on 2 cores, lag p50/p99 2.3/10.5 s at 20 ms and
# 0.36/3.1 s at 50 ms (benchmarks/scale.py, the same hour; docs/benchmarks.md).
BUSY_HOST_DEBEZIUM_PIPELINES = 10
BUSY_HOST_POLL_INTERVAL_MS = 50


def default_poll_interval_ms(debezium_pipelines: int) -> int:
    """``poll_interval_ms`` of a pipeline that does not set it, for a configuration with this
    many Debezium pipelines."""
    if debezium_pipelines > BUSY_HOST_DEBEZIUM_PIPELINES:
        return BUSY_HOST_POLL_INTERVAL_MS
    return StreamSettings.poll_interval_ms


@dataclass(frozen=True)
class StreamSettings:
    """Capture engine tunables; defaults measured on a 2-core machine (see docs/benchmarks.md)."""

    # "debezium": the embedded Debezium engine (offsets in a local file); "pgoutput": the slot
    # read over the replication protocol, values kept as PostgreSQL's text, positions kept in
    # the destinations.
    engine: str = "debezium"
    # Where the debezium engine keeps its offsets: "file" (<offsets_dir>/<pipeline>.dat on the
    # host that streams) or "config_db" (the config store: a stream resumes on any host).
    offset_store: str = "file"
    max_batch_size: int = 8192
    max_queue_size: int = 32768
    # Bounds the engine's queue by memory too, so wide rows cannot exhaust the JVM heap (with
    # pgoutput: the decoded changes held in memory; larger transactions apply in pieces).
    max_queue_mb: int = 64
    # Debezium waits up to this long for a batch to fill: the floor of the latency (measured
    # p50/p99 at 20 commits/s: 100 ms -> ~100/190 ms, 50 ms -> ~58/108 ms, 25 ms -> ~28/53 ms,
    # 20 ms -> ~24/43 ms, 15 ms -> ~20/38 ms; capacity unchanged). Its reader also sleeps
    # this long when idle. Unset, it depends on the configuration's Debezium pipelines (see
    # default_poll_interval_ms).
    poll_interval_ms: int = 20
    offset_flush_interval_ms: int = 1000
    heartbeat_interval_ms: int = 10_000
    # Measured peak RSS of the streaming process under W1 load: 512m -> ~610 MB, 320m -> ~495 MB,
    # 256m -> ~445 MB, at the same throughput and CPU per event (see docs/benchmarks.md).
    jvm_max_heap: str = "256m"
    snapshot_mode: str = "initial"
    # "copy": COPY under the new slot's exported snapshot, then stream (fast); "debezium":
    # Debezium's own snapshot (rows through the engine, ~15x slower; kept as a fallback).
    initial_load: str = "copy"
    initial_load_workers: int = 2
    initial_load_range_rows: int = 250_000
    # A change a destination refuses (constraint, type, permission): "stop" the pipeline on it
    # (resume with `rosetta pipeline start` after fixing the destination, or skip it), or
    # "park" it (and the key's later changes) in the config store and keep streaming.
    on_apply_error: str = "stop"
    # Transient destination errors (connection lost, restart, deadlock, timeouts, disk full)
    # are retried in the run, same batch, with backoff, for this long before the run fails.
    apply_retry_seconds: int = 300


@dataclass(frozen=True)
class VerificationSettings:
    """``verification:`` of a pipeline: what the health checks do about a divergence."""

    # A key range content_parity finds differing is backfilled without a person asking (once
    # per range); the check still fails and notifies: a divergence is a bug to report.
    repair: bool = False


@dataclass(frozen=True)
class PipelineDefinition:
    name: str
    source: PostgresEndpoint
    destinations: tuple[Destination, ...]
    tables: tuple[TableRef, ...]
    settings: StreamSettings = StreamSettings()
    # Options of the tables that have any (see TableOptions); the others are mirrored whole.
    table_options: tuple[tuple[TableRef, TableOptions], ...] = ()
    verification: VerificationSettings = VerificationSettings()

    def options(self, table: TableRef) -> TableOptions:
        return dict(self.table_options).get(table, NO_OPTIONS)

    def target(self, table: TableRef, destination: Destination) -> TableRef:
        """The destination table ``table`` is written to in ``destination``."""
        return self.options(table).target(table, destination)

    @property
    def filters_rows_or_columns(self) -> bool:
        return any(o.filters_rows_or_columns for _, o in self.table_options)

    @property
    def slot_name(self) -> str:
        return f"rosetta_{self.name}"

    @property
    def publication_name(self) -> str:
        return f"rosetta_{self.name}"

    @property
    def inserts_publication_name(self) -> str:
        """The publication of the tables that replicate their inserts only (``publish =
        'insert'``: a table without a replica identity keeps its UPDATEs and DELETEs)."""
        return f"rosetta_{self.name}_inserts"

    @property
    def publication_names(self) -> str:
        """The publications the slot is read with, as pgoutput's ``publication_names`` option
        takes them (comma-separated)."""
        if any(options.inserts_only for _, options in self.table_options):
            return f"{self.publication_name},{self.inserts_publication_name}"
        return self.publication_name


@dataclass(frozen=True)
class OperationsSettings:
    """How the Dagster daemon operates the streams (``operations:`` in rosetta.yaml)."""

    supervisor_interval_seconds: int = 15
    # A STARTED run whose pipeline heartbeat is older than this is treated as dead.
    heartbeat_timeout_seconds: int = 60
    # A run that has not heartbeat yet (its process still starting) is dead only after this.
    run_start_timeout_seconds: int = 180
    # At most this many runs starting at once (launched, not heartbeating yet); more wait.
    max_starting_runs: int = 4
    restart_backoff_initial_seconds: int = 10
    restart_backoff_max_seconds: int = 600
    # A run that streamed at least this long resets its pipeline's restart backoff.
    restart_backoff_reset_seconds: int = 300
    wal_monitor_interval_seconds: int = 60
    wal_warning_mb: int = 100  # checklist "Debezium WAL lag": warning > 100 MB
    wal_critical_mb: int = 500  # critical > 500 MB
    lag_warning_seconds: int = 60
    lag_critical_seconds: int = 300
    pool_warning_connections: int = 8  # checklist "Connection pool size": warning > 8 active
    pool_critical_connections: int = 9  # critical > 9 active
    # Sessions on a server (config_db, a source, a destination) against its max_connections.
    server_connections_warning_percent: int = 80
    server_connections_critical_percent: int = 95
    parity_window_seconds: int = 30  # how long parity checks wait for rows in flight
    parity_chunk_rows: int = 10_000
    health_check_interval_minutes: int = 5
    backfill_sensor_interval_seconds: int = 30
    backfill_chunk_rows: int = 50_000
    backfill_max_attempts: int = 3  # checklist: > 1 retry per job warns, > 2 is critical
    backfill_partition_retention_days: int = 7

    @property
    def wal_warning_bytes(self) -> int:
        return self.wal_warning_mb * 1024 * 1024

    @property
    def wal_critical_bytes(self) -> int:
        return self.wal_critical_mb * 1024 * 1024


SEVERITIES = ("WARN", "ERROR")


@dataclass(frozen=True)
class NotificationChannel:
    """A webhook that receives alerts (``notifications.channels`` in rosetta.yaml)."""

    name: str
    url: str | None  # from ${ENV_VAR}; None when secrets are not resolved. Never logged.
    headers: tuple[tuple[str, str], ...] = ()
    min_severity: str = "WARN"
    pipelines: tuple[str, ...] = ()  # empty: every pipeline, and alerts of no pipeline

    def accepts(self, severity: str, pipeline: str | None) -> bool:
        if SEVERITIES.index(severity) < SEVERITIES.index(self.min_severity):
            return False
        return not self.pipelines or pipeline in self.pipelines


@dataclass(frozen=True)
class NotificationSettings:
    channels: tuple[NotificationChannel, ...] = ()
    dagster_ui_url: str | None = None  # links in alerts to the run or asset
    repeat_minutes: int = 60  # a condition still failing is sent again at most this often


@dataclass(frozen=True)
class PipelineFile:
    """A pipeline file and which of its pipelines a Dagster code location runs (all of them when
    ``selected`` is None): what the definitions are built from, and what their runs, checks and
    sensors read again (for the secrets, resolved at run time), never ``$ROSETTA_CONFIG``."""

    path: Path
    selected: frozenset[str] | None = None

    def load(self, *, resolve_secrets: bool = True) -> RosettaConfig:
        from rosetta_dagster.core.pipeline_config.loading import load_config

        config = load_config(self.path, resolve_secrets=resolve_secrets)
        if self.selected is None:
            return config
        unknown = sorted(self.selected - set(config.pipelines))
        if unknown:
            raise PipelineConfigError(f"{self.path}: pipeline '{unknown[0]}' is not declared.")
        return replace(config, selected=self.selected, pipelines={
            name: pipeline for name, pipeline in config.pipelines.items() if name in self.selected})


@dataclass(frozen=True)
class RosettaConfig:
    path: Path
    pipelines: dict[str, PipelineDefinition]
    operations: OperationsSettings = OperationsSettings()
    notifications: NotificationSettings = NotificationSettings()
    selected: frozenset[str] | None = None  # pipelines kept from the file (None: all)

    @property
    def file(self) -> PipelineFile:
        """Where this came from, to read it again (with the secrets, at run time)."""
        return PipelineFile(self.path, self.selected)

    def pipeline(self, name: str) -> PipelineDefinition:
        try:
            return self.pipelines[name]
        except KeyError:
            raise PipelineConfigError(
                f"{self.path}: pipeline '{name}' is not declared."
            ) from None
