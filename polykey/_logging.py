"""Log formats for ``python -m polykey node``: text for people, or one JSON
object per line for log collectors (``--log-format json``).

A JSON line carries ``time`` (ISO 8601, UTC), ``level``, ``logger`` and
``message``, plus ``nodeId`` (the node's own, once it is known), every
field a log call passes in ``extra`` (a connection's ``peer``, ``address``,
``path``, ``direction``; a seed's...), and ``error`` with the exception's
type and message when there is one (no traceback: it would not be one line).
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Final

__all__ = ["JSONFormatter", "configure_logging", "set_context"]

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else came in ``extra``.
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


#: Fields every JSON line carries (set_context: the node's own NodeId).
_CONTEXT: dict[str, str] = {}


def set_context(**fields: str) -> None:
    """Fields for every JSON log line from now on (e.g. ``nodeId``)."""
    _CONTEXT.update(fields)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_CONTEXT,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = (
                    value
                    if isinstance(value, int | float | bool | None)
                    else str(value)
                )
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            entry["error"] = f"{type(exc).__name__}: {exc}"
        return json.dumps(entry)


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
