"""JSON-lines structured logging (one object per line on stderr)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Final, TextIO

_STANDARD: Final = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object; ``extra=`` fields become keys."""

    def __init__(self, node_id: str = "") -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node_id:
            doc["node"] = self.node_id
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


def setup(level: str = "info", node_id: str = "", stream: TextIO | None = None) -> None:
    """Send every ``plexichat`` log record to *stream* (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger("plexichat")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    logging.Formatter.converter = time.gmtime
