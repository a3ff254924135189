"""Exceptions raised by Rosetta's cores. Messages are one sentence and never contain secrets."""


class RosettaError(Exception):
    """Base class for every error Rosetta raises on purpose."""


class DatabaseConfigError(RosettaError):
    """A database connection setting is malformed."""


class DatabaseConnectionError(RosettaError):
    """A database could not be reached or refused the connection."""


class PoolExhaustedError(RosettaError):
    """Every pooled connection stayed in use for longer than the checkout wait bound."""


class StatementTimeoutError(RosettaError):
    """A statement ran longer than the configured statement_timeout and was cancelled."""


class LocalPostgresError(RosettaError):
    """A local throwaway PostgreSQL cluster could not be created, started or stopped."""


class ConfigStoreError(RosettaError):
    """The config store rejected a request (unknown pipeline, invalid status, ...)."""
