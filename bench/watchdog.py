"""A time limit for one benchmark, so a hung benchmark costs one row instead of the whole run.

The main thread may be blocked in a C call (a socket read), which only a signal delivered to that
very thread interrupts: when the limit passes, a timer thread prints every thread's stack (to show
where it hung) and sends SIGALRM to the main thread, whose handler raises ``BenchmarkTimeout``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import signal
import sys
import threading
from typing import Iterator


class BenchmarkTimeout(Exception):
    pass


class Watchdog:
    """Use from the main thread: ``with watchdog.limit(60): run_one()``."""

    def __init__(self):
        self._armed: object | None = None  # the current limit's token
        self._fired: object | None = None  # the token of the limit that expired
        self._seconds = 0.0
        signal.signal(signal.SIGALRM, self._expired)

    @contextlib.contextmanager
    def limit(self, seconds: float) -> Iterator[None]:
        token = object()
        self._armed, self._seconds = token, seconds
        timer = threading.Timer(seconds, self._fire, args=(token,))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            self._armed = None  # a late signal now finds nothing armed and is ignored
            timer.cancel()

    def _fire(self, token: object) -> None:
        if self._armed is not token:
            return
        self._fired = token
        print(f"benchmark still running after {self._seconds:g} s; where every thread is:", file=sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

    def _expired(self, signum, frame) -> None:
        if self._fired is not None and self._fired is self._armed:
            raise BenchmarkTimeout(f"no result within {self._seconds:g} s (stacks on stderr)")
