"""Loading and validating ``rosetta.yaml``: sources, destinations and pipelines.

Secrets are written as ``${ENV_VAR}`` references and resolved from the environment; a literal
password in the file is refused. Every error is one sentence naming the file, the entry and
the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from rosetta_dagster.core.pipeline_config.records import (
    APPLY_ERROR_POLICIES,
    CAPTURE_ENGINES,
    DESTINATION_KINDS,
    IDENTIFIER_PATTERN,
    INITIAL_LOAD_METHODS,
    NAME_PATTERN,
    NO_OPTIONS,
    OFFSET_STORES,
    REPLICATE_MODES,
    SEVERITIES,
    SNOWFLAKE_PROTOCOLS,
    Destination,
    NotificationChannel,
    NotificationSettings,
    OperationsSettings,
    PipelineConfigError,
    PipelineDefinition,
    PostgresEndpoint,
    RosettaConfig,
    SnowflakeAccount,
    StreamSettings,
    TableOptions,
    TableRef,
    VerificationSettings,
    default_poll_interval_ms,
)

CONFIG_PATH_ENV = "ROSETTA_CONFIG"
DEFAULT_CONFIG_FILE = "rosetta.yaml"
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(key)
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise _DuplicateKeyError(str(key), key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)



# (minimum, maximum) of each operations setting; values outside are refused at load time.
_OPERATIONS_RANGES = {
    "supervisor_interval_seconds": (5, 3600),
    "heartbeat_timeout_seconds": (10, 86400),
    "run_start_timeout_seconds": (10, 86400),
    "max_starting_runs": (1, 1000),
    "restart_backoff_initial_seconds": (1, 3600),
    "restart_backoff_max_seconds": (1, 86400),
    "restart_backoff_reset_seconds": (10, 86400),
    "wal_monitor_interval_seconds": (10, 3600),
    "wal_warning_mb": (1, 1024 * 1024),
    "wal_critical_mb": (1, 1024 * 1024),
    "lag_warning_seconds": (1, 86400),
    "lag_critical_seconds": (1, 86400),
    "pool_warning_connections": (1, 10000),
    "pool_critical_connections": (1, 10000),
    "server_connections_warning_percent": (1, 100),
    "server_connections_critical_percent": (1, 100),
    "parity_window_seconds": (0, 3600),
    "parity_chunk_rows": (100, 10_000_000),
    "health_check_interval_minutes": (1, 1440),
    "backfill_sensor_interval_seconds": (5, 3600),
    "backfill_chunk_rows": (100, 10_000_000),
    "backfill_max_attempts": (1, 100),
    "backfill_partition_retention_days": (1, 3650),
}



def config_path(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    return Path(environ.get(CONFIG_PATH_ENV) or DEFAULT_CONFIG_FILE).resolve()


class _Reader:
    """Validates one section entry, producing errors that name file, entry and field."""

    def __init__(self, path: Path, where: str, data: Any, environ: Mapping[str, str] | None):
        self.path, self.where, self.environ = path, where, environ
        if not isinstance(data, dict):
            self.fail("", "must be a mapping")
        self.data: dict[str, Any] = data

    def fail(self, key: str, problem: str) -> None:
        field_part = f" field '{key}'" if key else ""
        raise PipelineConfigError(f"{self.path}: {self.where}{field_part} {problem}.")

    def text(self, key: str, default: str | None = None) -> str:
        value = self.data.get(key, default)
        if value is None:
            self.fail(key, "is required")
        if not isinstance(value, str | int) or isinstance(value, bool) or str(value) == "":
            self.fail(key, "must be a non-empty string")
        return str(value)

    def choice(self, key: str, default: str, choices: Sequence[str], upper: bool = False) -> str:
        value = self.text(key, default).upper() if upper else self.text(key, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false")
        return value

    def integer(self, key: str, default: int, minimum: int = 1, maximum: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(key, f"must be an integer >= {minimum}")
        if maximum is not None and value > maximum:
            self.fail(key, f"must be an integer between {minimum} and {maximum}")
        return int(value)

    def secret(self, key: str) -> str | None:
        """``${VAR}`` reference resolved from the environment (None when not resolving)."""
        raw = self.text(key)
        match = _ENV_REFERENCE.fullmatch(raw)
        if match is None:
            self.fail(key, "must be an ${ENV_VAR} reference, not a literal secret")
        if self.environ is None:
            return None
        variable = match.group(1)
        if variable not in self.environ:
            self.fail(key, f"refers to the environment variable {variable}, which is not set")
        return self.environ[variable]

    def endpoint_kwargs(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "host": self.text("host"),
            "port": self.integer("port", 5432),
            "database": self.text("database"),
            "user": self.text("user"),
            "password": self.secret("password"),
        }


def _duckdb_path(reader: _Reader, base: Path) -> str:
    """A DuckDB destination's database file (relative: to the pipeline file's folder). One
    process writes it for as long as the stream runs, so an in-memory database (gone with that
    process, unreadable by the checks) is refused."""
    raw = reader.text("path")
    if raw.strip() == ":memory:" or raw.startswith(":memory:"):
        reader.fail("path", "is ':memory:', which no other process can read and which is lost "
                            "when the stream stops; give a database file path")
    return str((base / raw).resolve())


_SNOWFLAKE_KEYS = frozenset({"type", "schema", "account", "user", "password", "private_key_file",
                             "private_key_passphrase", "database", "warehouse", "role", "host",
                             "port", "protocol"})


def _snowflake_destination(reader: _Reader, name: str, schema: str) -> Destination:
    """``type: snowflake``: the account, user and database; a password or a key pair (each a
    ${VAR} reference); warehouse and role optional; host, port and protocol only for an explicit
    endpoint (private connectivity, or an emulator)."""
    unknown = sorted(set(reader.data) - _SNOWFLAKE_KEYS)
    if unknown:
        reader.fail(unknown[0], "is not a Snowflake setting")
    with_password = "password" in reader.data
    with_key = "private_key_file" in reader.data
    if with_password == with_key:
        reader.fail("", "needs exactly one of 'password' and 'private_key_file'")
    if "private_key_passphrase" in reader.data and not with_key:
        reader.fail("private_key_passphrase", "is set without 'private_key_file'")
    host = reader.text("host") if "host" in reader.data else ""
    account = SnowflakeAccount(
        account=reader.text("account"),
        warehouse=reader.text("warehouse") if "warehouse" in reader.data else None,
        role=reader.text("role") if "role" in reader.data else None,
        private_key_file=str(Path(reader.text("private_key_file")).expanduser())
        if with_key else None,
        private_key_passphrase=reader.secret("private_key_passphrase")
        if "private_key_passphrase" in reader.data else None,
        protocol=reader.choice("protocol", "https", SNOWFLAKE_PROTOCOLS))
    return Destination(
        name=name, host=host, port=reader.integer("port", 443, maximum=65535) if host else 0,
        database=reader.text("database"), user=reader.text("user"),
        password=reader.secret("password") if with_password else None, schema=schema,
        kind="snowflake", snowflake=account)


def load_config(
    path: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    resolve_secrets: bool = True,
) -> RosettaConfig:
    """Load and validate the pipeline file.

    With ``resolve_secrets=False`` secrets stay unresolved (for building Dagster definitions
    on a machine without them); the streaming run resolves them and fails clearly if missing.
    """
    path = Path(path).resolve() if path else config_path(environ)
    environ = (os.environ if environ is None else environ) if resolve_secrets else None
    try:
        document = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (safe loader)
    except _DuplicateKeyError as exc:
        raise PipelineConfigError(
            f"{path}: '{exc.key}' is declared twice (line {exc.line}); names must be unique."
        ) from None
    except FileNotFoundError:
        raise PipelineConfigError(
            f"{path}: file not found (set {CONFIG_PATH_ENV} to the pipeline file)."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineConfigError(f"{path}: not valid YAML{where}.") from None
    top = _Reader(path, "the file", document or {}, environ)

    sources: dict[str, PostgresEndpoint] = {}
    for name, data in (top.data.get("sources") or {}).items():
        reader = _Reader(path, f"source '{name}'", data, environ)
        sources[name] = PostgresEndpoint(**reader.endpoint_kwargs(name))

    destinations: dict[str, Destination] = {}
    for name, data in (top.data.get("destinations") or {}).items():
        reader = _Reader(path, f"destination '{name}'", data, environ)
        kind = reader.choice("type", "postgres", DESTINATION_KINDS)
        schema = reader.text("schema", "public" if kind == "postgres" else "main")
        if not IDENTIFIER_PATTERN.match(schema):
            reader.fail("schema", f"'{schema}' is not a valid schema name")
        if kind == "duckdb":
            destinations[name] = Destination(
                name=name, host="", port=0, database="", user="", schema=schema, kind=kind,
                path=_duckdb_path(reader, path.parent))
        elif kind == "snowflake":
            destinations[name] = _snowflake_destination(reader, name, schema)
        else:
            destinations[name] = Destination(**reader.endpoint_kwargs(name), schema=schema)

    raw_pipelines = top.data.get("pipelines")
    if not isinstance(raw_pipelines, dict) or not raw_pipelines:
        top.fail("pipelines", "must declare at least one pipeline")
    pipelines: dict[str, PipelineDefinition] = {}
    poll_interval_ms = default_poll_interval_ms(sum(
        1 for data in raw_pipelines.values() if isinstance(data, dict)
        and isinstance(data.get("streaming") or {}, dict)
        and (data.get("streaming") or {}).get("engine", StreamSettings.engine) == "debezium"))
    for name, data in raw_pipelines.items():
        reader = _Reader(path, f"pipeline '{name}'", data, environ)
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            reader.fail("", "has an invalid name: use lowercase letters, digits and _ (max 40)")
        unknown = sorted(set(reader.data) - _PIPELINE_KEYS)
        if unknown:  # a misspelt section would otherwise be silently ignored
            reader.fail(unknown[0], "is not a known setting")
        source_name = reader.text("source")
        if source_name not in sources:
            reader.fail("source", f"names the unknown source '{source_name}'")
        destination_names = data.get("destinations")
        if not isinstance(destination_names, list) or not destination_names:
            reader.fail("destinations", "must list at least one destination")
        for destination_name in destination_names:
            if destination_name not in destinations:
                reader.fail("destinations", f"names the unknown destination '{destination_name}'")
        raw_tables = data.get("tables")
        if not isinstance(raw_tables, list) or not raw_tables:
            reader.fail("tables", "must list at least one schema.table")
        tables: list[TableRef] = []
        table_options: list[tuple[TableRef, TableOptions]] = []
        chosen = [destinations[d] for d in destination_names]
        for raw in raw_tables:
            table, options = _table_entry(path, name, raw, chosen)
            tables.append(table)
            if options != NO_OPTIONS:
                table_options.append((table, options))
        if len(set(tables)) != len(tables):
            reader.fail("tables", "lists a table twice")
        stream = _Reader(path, f"pipeline '{name}' streaming", data.get("streaming") or {}, None)
        unknown = sorted(set(stream.data) - {f.name for f in fields(StreamSettings)})
        if unknown:  # a misspelt setting would otherwise be silently left at its default
            stream.fail(unknown[0], "is not a known setting")
        settings = StreamSettings(
            engine=stream.choice("engine", StreamSettings.engine, CAPTURE_ENGINES),
            offset_store=stream.choice("offset_store", StreamSettings.offset_store,
                                       OFFSET_STORES),
            max_batch_size=stream.integer("max_batch_size", StreamSettings.max_batch_size),
            max_queue_size=stream.integer("max_queue_size", StreamSettings.max_queue_size),
            max_queue_mb=stream.integer("max_queue_mb", StreamSettings.max_queue_mb, maximum=4096),
            poll_interval_ms=stream.integer("poll_interval_ms", poll_interval_ms),
            offset_flush_interval_ms=stream.integer(
                "offset_flush_interval_ms", StreamSettings.offset_flush_interval_ms
            ),
            heartbeat_interval_ms=stream.integer(
                "heartbeat_interval_ms", StreamSettings.heartbeat_interval_ms
            ),
            jvm_max_heap=stream.text("jvm_max_heap", StreamSettings.jvm_max_heap),
            initial_load=stream.choice("initial_load", StreamSettings.initial_load,
                                       INITIAL_LOAD_METHODS),
            initial_load_workers=stream.integer(
                "initial_load_workers", StreamSettings.initial_load_workers, maximum=64
            ),
            initial_load_range_rows=stream.integer(
                "initial_load_range_rows", StreamSettings.initial_load_range_rows, minimum=1000
            ),
            on_apply_error=stream.choice("on_apply_error", StreamSettings.on_apply_error,
                                         APPLY_ERROR_POLICIES),
            apply_retry_seconds=stream.integer(
                "apply_retry_seconds", StreamSettings.apply_retry_seconds, minimum=0
            ),
        )
        if settings.engine == "pgoutput" and settings.offset_store != "file":
            stream.fail("offset_store", "applies to the debezium engine only (pgoutput keeps "
                        "its positions in the destinations)")
        if settings.engine == "pgoutput" and settings.initial_load != "copy":
            stream.fail("initial_load", "must be copy with the pgoutput engine")
        if settings.max_queue_size <= settings.max_batch_size:
            stream.fail("max_queue_size", "must be larger than max_batch_size")
        if not re.fullmatch(r"\d+[kmgKMG]?", settings.jvm_max_heap):
            stream.fail("jvm_max_heap", "must look like 512m or 1g")
        verification = _Reader(path, f"pipeline '{name}' verification",
                               data.get("verification") or {}, None)
        unknown = sorted(set(verification.data) - {"repair"})
        if unknown:
            verification.fail(unknown[0], "is not a known setting")
        pipelines[name] = PipelineDefinition(
            name=name,
            source=sources[source_name],
            destinations=tuple(destinations[d] for d in destination_names),
            tables=tuple(tables),
            settings=settings,
            table_options=tuple(table_options),
            verification=VerificationSettings(repair=verification.boolean("repair", False)),
        )
        if settings.initial_load != "copy" and pipelines[name].filters_rows_or_columns:
            stream.fail("initial_load", "must be copy when a table has columns, exclude_columns "
                        "or where")
    _refuse_shared_destination_tables(path, pipelines)
    return RosettaConfig(path=path, pipelines=pipelines, operations=_operations(path, top),
                         notifications=_notifications(path, top, environ, set(pipelines)))


def _notifications(path: Path, top: _Reader, environ: Mapping[str, str] | None,
                   pipelines: set[str]) -> NotificationSettings:
    reader = _Reader(path, "notifications", top.data.get("notifications") or {}, environ)
    unknown = sorted(set(reader.data) - {"channels", "dagster_ui_url", "repeat_minutes"})
    if unknown:
        reader.fail(unknown[0], "is not a known setting")
    ui_url = reader.data.get("dagster_ui_url")
    if ui_url is not None and not re.fullmatch(r"https?://\S+", str(ui_url)):
        reader.fail("dagster_ui_url", "must be an http(s) URL")
    entries = reader.data.get("channels") or []
    if not isinstance(entries, list):
        reader.fail("channels", "must be a list of webhook channels")
    channels: list[NotificationChannel] = []
    for index, data in enumerate(entries):
        name = data.get("name", f"channel {index + 1}") if isinstance(data, dict) else index + 1
        channel = _Reader(path, f"notification channel '{name}'", data, environ)
        unknown = sorted(set(channel.data) - {"name", "url", "headers", "min_severity",
                                              "pipelines"})
        if unknown:
            channel.fail(unknown[0], "is not a known setting")
        headers = channel.data.get("headers") or {}
        if not isinstance(headers, dict):
            channel.fail("headers", "must be a mapping of header names to values")
        severity = channel.choice("min_severity", "WARN", SEVERITIES, upper=True)
        names = channel.data.get("pipelines") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            channel.fail("pipelines", "must be a list of pipeline names")
        for pipeline in names:
            if pipeline not in pipelines:
                channel.fail("pipelines", f"names the unknown pipeline '{pipeline}'")
        channels.append(NotificationChannel(
            name=str(name), url=channel.secret("url"),
            headers=tuple((str(k), _resolve_references(channel, f"headers.{k}", str(v)))
                          for k, v in headers.items()),
            min_severity=severity, pipelines=tuple(names),
        ))
    if len({c.name for c in channels}) < len(channels):
        reader.fail("channels", "must have unique names")
    return NotificationSettings(
        channels=tuple(channels), dagster_ui_url=str(ui_url).rstrip("/") if ui_url else None,
        repeat_minutes=reader.integer("repeat_minutes", NotificationSettings.repeat_minutes,
                                      maximum=7 * 24 * 60),
    )


def _resolve_references(reader: _Reader, key: str, value: str) -> str:
    """``${VAR}`` references inside a value (a header such as ``Bearer ${TOKEN}``); kept
    as written when secrets are not resolved."""
    if reader.environ is None:
        return value
    for variable in _ENV_REFERENCE.findall(value):
        if variable not in reader.environ:
            reader.fail(key, f"refers to the environment variable {variable}, which is not set")
    return _ENV_REFERENCE.sub(lambda m: reader.environ[m.group(1)], value)  # type: ignore[index]


_TABLE_KEYS = {"name", "columns", "exclude_columns", "where", "target", "replicate"}
_PIPELINE_KEYS = {"source", "destinations", "tables", "streaming", "verification"}


def _table_entry(path: Path, pipeline: str, raw: Any, destinations: Sequence[Destination]
                 ) -> tuple[TableRef, TableOptions]:
    """A ``tables:`` entry: ``schema.table``, or a mapping with a name and its options."""
    if not isinstance(raw, dict):
        try:
            return TableRef.parse(str(raw)), NO_OPTIONS
        except ValueError:
            raise PipelineConfigError(f"{path}: pipeline '{pipeline}' field 'tables' has "
                                      f"'{raw}', which is not a schema.table name.") from None
    reader = _Reader(path, f"pipeline '{pipeline}' table '{raw.get('name', '?')}'", raw, None)
    unknown = sorted(set(reader.data) - _TABLE_KEYS)
    if unknown:
        reader.fail(unknown[0], f"is not a table option (use {', '.join(sorted(_TABLE_KEYS))})")
    try:
        table = TableRef.parse(reader.text("name"))
    except ValueError:
        reader.fail("name", "must be a schema.table name")
    columns = _column_names(reader, "columns") if "columns" in reader.data else None
    excluded = _column_names(reader, "exclude_columns") if "exclude_columns" in reader.data else ()
    if columns is not None and excluded:
        reader.fail("exclude_columns", "cannot be combined with columns; use one of them")
    where = reader.text("where") if "where" in reader.data else None
    if where is not None and (problem := _expression_problem(where)) is not None:
        reader.fail("where", f"must be one boolean expression ({problem})")
    replicate = reader.choice("replicate", "all", REPLICATE_MODES)
    return table, TableOptions(columns=columns, exclude_columns=excluded, where=where,
                               targets=_targets(reader, table, destinations),
                               inserts_only=replicate == "inserts_only")


def _expression_problem(text: str) -> str | None:
    """Why ``text`` is not one self-contained expression (it is written inside ``WHERE (...)``
    of several statements): unbalanced parentheses, ``;``, comments or dollar quotes outside
    string literals. PostgreSQL judges the rest when the publication is created."""
    depth, index, length = 0, 0, len(text)
    while index < length:
        char = text[index]
        if char in "'\"":
            escapes = char == "'" and index > 0 and text[index - 1] in "eE"
            index += 1
            while index < length:
                if escapes and text[index] == "\\":
                    index += 2
                    continue
                if text[index] == char:
                    if index + 1 < length and text[index + 1] == char:  # doubled: escaped
                        index += 2
                        continue
                    break
                index += 1
            if index >= length:
                return "an unterminated quote"
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                return "a ')' without its '('"
        elif char == ";" or char == "$" or text.startswith(("--", "/*"), index):
            return f"'{text[index:index + 2].strip()}' outside a string literal"
        index += 1
    return "a '(' without its ')'" if depth else None


def _column_names(reader: _Reader, key: str) -> tuple[str, ...]:
    names = reader.data[key]
    if (not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names)):
        reader.fail(key, "must be a non-empty list of column names")
    if len(set(names)) != len(names):
        reader.fail(key, "lists a column twice")
    return tuple(names)


def _targets(reader: _Reader, table: TableRef, destinations: Sequence[Destination]
             ) -> tuple[tuple[str, TableRef], ...]:
    """``target: name | schema.name`` for every destination, or a mapping per destination."""
    raw = reader.data.get("target")
    if raw is None:
        return ()
    by_destination = raw if isinstance(raw, dict) else {d.name: raw for d in destinations}
    known = {d.name: d for d in destinations}
    targets = []
    for name, text in by_destination.items():
        if name not in known:
            reader.fail("target", f"names '{name}', which is not a destination of the pipeline")
        parts = str(text).split(".") if isinstance(text, str) else []
        if not 1 <= len(parts) <= 2 or not all(IDENTIFIER_PATTERN.match(p) for p in parts):
            reader.fail("target", f"has '{text}', which is not a table or schema.table name")
        target = TableRef(*parts) if len(parts) == 2 else TableRef(known[name].schema, parts[0])
        targets.append((name, target))
    return tuple(targets)


def _refuse_shared_destination_tables(path: Path, pipelines: Mapping[str, PipelineDefinition]) -> None:
    """Two tables (of one pipeline or two) writing one destination table would undo each
    other's changes."""
    writers: dict[tuple[str, TableRef], tuple[str, TableRef]] = {}
    for pipeline in pipelines.values():
        for destination in pipeline.destinations:
            for table in pipeline.tables:
                target = pipeline.target(table, destination)
                other = writers.setdefault((destination.name, target), (pipeline.name, table))
                if other == (pipeline.name, table):
                    continue
                writer = (f"pipelines '{other[0]}' and '{pipeline.name}' both write"
                          if other[0] != pipeline.name else
                          f"pipeline '{pipeline.name}' writes {other[1].qualified} and "
                          f"{table.qualified} to")
                raise PipelineConfigError(
                    f"{path}: {writer} {target.qualified} in destination '{destination.name}'; "
                    "give one of them another target or destination schema."
                )


def _operations(path: Path, top: _Reader) -> OperationsSettings:
    reader = _Reader(path, "operations", top.data.get("operations") or {}, None)
    unknown = sorted(set(reader.data) - set(_OPERATIONS_RANGES))
    if unknown:
        reader.fail(unknown[0], "is not a known setting")
    values = {
        key: reader.integer(key, getattr(OperationsSettings, key), minimum, maximum)
        for key, (minimum, maximum) in _OPERATIONS_RANGES.items()
    }
    settings = OperationsSettings(**values)
    if settings.wal_critical_mb <= settings.wal_warning_mb:
        reader.fail("wal_critical_mb", "must be larger than wal_warning_mb")
    if settings.lag_critical_seconds <= settings.lag_warning_seconds:
        reader.fail("lag_critical_seconds", "must be larger than lag_warning_seconds")
    if settings.pool_critical_connections <= settings.pool_warning_connections:
        reader.fail("pool_critical_connections", "must be larger than pool_warning_connections")
    if settings.server_connections_critical_percent <= settings.server_connections_warning_percent:
        reader.fail("server_connections_critical_percent",
                    "must be larger than server_connections_warning_percent")
    if settings.restart_backoff_max_seconds < settings.restart_backoff_initial_seconds:
        reader.fail("restart_backoff_max_seconds", "must be at least restart_backoff_initial_seconds")
    return settings
