"""Structured log lines (one JSON object per line) for every long-running process.

Library code only gets loggers; the command line calls :func:`configure` once per process. Repeated
warnings and errors (a library retrying while a dependency is away logs the same error several times a
second) are summarised by :class:`RepeatFilter`: one line a minute per kind, with how many were held back."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else was passed through ``extra=`` and belongs in the line.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class RepeatFilter(logging.Filter):
    """Lets through the first record of a kind (same logger, level and message template) at ``level`` or
    above, then at most one per ``window_s``; the one let through after a window carries ``repeated``,
    how many of its kind were held back since the last one through. Records below ``level`` always pass.
    Thread-safe (Faust's consumer thread and the main loop log through the same handler)."""

    MAX_KINDS = 1000
    """Kinds remembered at most; past that, those quiet for a window are forgotten."""

    def __init__(
        self,
        window_s: float = 60.0,
        level: int | str = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.level = logging.getLevelName(level) if isinstance(level, str) else level
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, int, str], list[float | int]] = {}
        """kind -> [when one last went through, how many were held back since]"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        kind = (record.name, record.levelno, _template(record))
        now = self._clock()
        with self._lock:
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.window_s:
                seen[1] += 1
                return False
            if seen is None and len(self._kinds) >= self.MAX_KINDS:
                self._forget_quiet(now)
            self._kinds[kind] = [now, 0]
        if seen is not None and seen[1]:
            record.repeated = seen[1]
            record.repeated_window_s = self.window_s
        return True

    def _forget_quiet(self, now: float) -> None:
        for kind in [k for k, (last, _) in self._kinds.items() if now - last >= self.window_s]:
            del self._kinds[kind]


def _template(record: logging.LogRecord) -> str:
    """The message before its arguments are filled in; its first line only (asyncio's "Future exception
    was never retrieved" carries the future's repr on the next ones)."""
    return str(record.msg).split("\n", 1)[0][:200]


def configure(level: str = "INFO", service: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    if service:
        handler.addFilter(_ServiceTag(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class _ServiceTag(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        return True
