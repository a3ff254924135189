"""``rosetta.yaml``: its records (``records``) and how the file is read and validated
(``loading``). Secrets are written as ``${ENV_VAR}`` references and resolved from the
environment; a literal password in the file is refused. Every error is one sentence naming the
file, the entry and the field.
"""

from rosetta_dagster.core.pipeline_config.loading import (
    CONFIG_PATH_ENV,
    DEFAULT_CONFIG_FILE,
    config_path,
    load_config,
)
from rosetta_dagster.core.pipeline_config.records import (
    APPLY_ERROR_POLICIES,
    CAPTURE_ENGINES,
    IDENTIFIER_PATTERN,
    INITIAL_LOAD_METHODS,
    NAME_PATTERN,
    NO_OPTIONS,
    OFFSET_STORES,
    SEVERITIES,
    Destination,
    NotificationChannel,
    NotificationSettings,
    OperationsSettings,
    PipelineConfigError,
    PipelineDefinition,
    PipelineFile,
    PostgresEndpoint,
    RosettaConfig,
    SnowflakeAccount,
    StreamSettings,
    TableOptions,
    TableRef,
    VerificationSettings,
)

__all__ = [
    "APPLY_ERROR_POLICIES",
    "CAPTURE_ENGINES",
    "CONFIG_PATH_ENV",
    "DEFAULT_CONFIG_FILE",
    "Destination",
    "IDENTIFIER_PATTERN",
    "INITIAL_LOAD_METHODS",
    "NAME_PATTERN",
    "NO_OPTIONS",
    "NotificationChannel",
    "NotificationSettings",
    "OFFSET_STORES",
    "OperationsSettings",
    "PipelineConfigError",
    "PipelineDefinition",
    "PipelineFile",
    "PostgresEndpoint",
    "RosettaConfig",
    "SnowflakeAccount",
    "SEVERITIES",
    "StreamSettings",
    "TableOptions",
    "TableRef",
    "VerificationSettings",
    "config_path",
    "load_config",
]
