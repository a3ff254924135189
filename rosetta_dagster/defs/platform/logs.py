"""Log lines that must reach both the Dagster UI and the process output (``docker logs``)."""

import logging
from collections.abc import MutableMapping
from typing import Any


class TeeLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Sends every record to a Python logger (process output) and to a Dagster context log."""

    def __init__(self, process_logger: logging.Logger, dagster_log: logging.Logger) -> None:
        super().__init__(process_logger, {})
        self.dagster_log = dagster_log

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        self.logger.log(level, msg, *args, **kwargs)
        self.dagster_log.log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs


def ensure_process_logging() -> None:
    """Rosetta's INFO lines on stderr of the code server and run workers.

    Only where nothing configured logging (the root logger has no handler), so a host that
    did (pytest, an embedding application) keeps its own handling and sees no duplicates.
    """
    rosetta = logging.getLogger("rosetta")
    if rosetta.level == logging.NOTSET:
        rosetta.setLevel(logging.INFO)
    if logging.getLogger().handlers or any(getattr(h, "_rosetta", False) for h in rosetta.handlers):
        return
    handler = logging.StreamHandler()
    # The process id: the code server, the daemon and every run write to the same output.
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    handler._rosetta = True  # type: ignore[attr-defined]
    rosetta.addHandler(handler)
