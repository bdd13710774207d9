"""Logging helpers shared by the server and the persistence layer (which must not import the server)."""

from __future__ import annotations

import logging
import time


def reason(exc: Exception) -> str:
    """What went wrong, in the system's or the library's words ("database or disk is full"), for a log line.
    No key material can be in it: records are sealed before they are written, and SQLite never quotes
    bound values."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class Throttled:
    """A warning (or error) logged at most once per interval (with a count of those suppressed): a flood of
    refused connections, or a full disk failing every request, must not become a flood of log lines."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0):
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args) -> None:
        self._log(logging.WARNING, msg, args)

    def error(self, msg: str, *args) -> None:
        self._log(logging.ERROR, msg, args)

    def _log(self, level: int, msg: str, args: tuple) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" (and {self._suppressed} more like it)"
        self._next, self._suppressed = now + self.interval, 0
        self.logger.log(level, msg, *args)
