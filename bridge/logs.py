"""Structured logging for the bridge: one JSON object per line, so operators can grep and parse.

The server, the scale-out broker and their helpers log through `log_event`; `sdkit serve`
installs `json_log_handler` on the ``sdkit.bridge`` logger.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("sdkit.bridge")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "bridge", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def json_log_handler(stream: Any = None, level: int = logging.INFO) -> logging.Handler:
    """A handler writing JSON lines (the CLI installs it on the ``sdkit.bridge`` logger)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.setLevel(level)
    return handler


def log_event(level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with its fields (they become keys of the JSON line)."""
    if log.isEnabledFor(level):
        log.log(level, event, extra={"bridge": fields})


def client_label(client: bytes) -> str:
    """A short, printable form of a routing id."""
    return client.hex()[:16]
