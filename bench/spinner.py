"""A process that keeps another CPU busy on demand, for the ``busy-cpu-*`` reference rows.

On this kind of machine two vCPUs can share one physical core: Python (and OpenSSL) on one of them
runs slower while the other is busy.  Every keyden row with client processes runs that way, while
the in-process baselines run with the other CPU idle; this measures the difference by itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from typing import Iterator


def _spin(running, wake) -> None:
    """Plain Python work while ``running`` is set; asleep otherwise."""
    while True:
        wake.wait()
        while running.value:
            for _ in range(1000):
                pass


class Spinner:
    """A context manager owning the spinning process; ``busy()`` spins it for the length of a block."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self._running = ctx.Value("b", 0, lock=False)
        self._wake = ctx.Event()
        self._proc = ctx.Process(target=_spin, args=(self._running, self._wake), daemon=True)

    def __enter__(self) -> "Spinner":
        self._proc.start()
        return self

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._running.value = 1
        self._wake.set()
        try:
            yield
        finally:
            self._running.value = 0
            self._wake.clear()

    def __exit__(self, *exc) -> None:
        self._proc.kill()
        self._proc.join()
