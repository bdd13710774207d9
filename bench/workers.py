"""Client processes that hammer the daemon together, for throughput benchmarks.

A separate module (not bench.run) so 'spawn' children import only what they need.  Processes
start once per pool and run several timed rounds; each round starts on a barrier, so every client
runs over the same window, and the pool's rate is the sum of the clients' rates.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
from typing import Any

WARMUP_CALLS = 50
STARTUP_TIMEOUT = 60.0


def _connect(socket_path: str, session: str | None):
    """A keyden client; without a session, a client of bench/echo.py's plain echo server."""
    if session is None:
        from bench.echo import EchoClient

        return EchoClient(socket_path)
    import keyden

    return keyden.connect(socket_path, session=session)


def _client_loop(socket_path: str, session: str | None, method: str, args: tuple, commands, results, barrier) -> None:
    try:
        client = _connect(socket_path, session)
        call = getattr(client, method)
        for _ in range(WARMUP_CALLS):
            call(*args)
    except BaseException as exc:  # report rather than leave the parent waiting
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    results.put(("ready", None))
    with client:
        while (duration := commands.get()) is not None:
            barrier.wait()
            calls = 0
            start = time.perf_counter()
            deadline = start + duration
            while True:
                call(*args)
                calls += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            results.put(("rate", calls / (now - start)))


class ClientPool:
    """``n`` client processes each calling ``client.<method>(*args)`` in a loop during a round."""

    def __init__(self, n: int, socket_path: str, session: str | None, method: str, args: tuple[Any, ...] = ()):
        ctx = multiprocessing.get_context("spawn")
        self.n = n
        self._commands = ctx.Queue()
        self._results = ctx.Queue()
        self._barrier = ctx.Barrier(n + 1)
        self._procs = [ctx.Process(target=_client_loop, daemon=True,
                                   args=(socket_path, session, method, args, self._commands, self._results,
                                         self._barrier))
                       for _ in range(n)]

    def __enter__(self) -> "ClientPool":
        for p in self._procs:
            p.start()
        try:
            self._collect("ready", STARTUP_TIMEOUT)
        except BaseException:
            self.__exit__()
            raise
        return self

    def round(self, duration: float) -> float:
        """One timed round: the clients' summed calls per second."""
        for _ in self._procs:
            self._commands.put(duration)
        self._barrier.wait(timeout=STARTUP_TIMEOUT)
        return sum(self._collect("rate", duration + STARTUP_TIMEOUT))

    def _collect(self, kind: str, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        values = []
        while len(values) < self.n:
            try:
                got, value = self._results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [p.exitcode for p in self._procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"client processes failed (exit codes {dead}) or timed out") from None
                continue
            if got == "error":
                raise RuntimeError(f"a client process failed: {value}")
            values.append(value)
        return values

    def __exit__(self, *exc) -> None:
        for _ in self._procs:
            self._commands.put(None)
        for p in self._procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
