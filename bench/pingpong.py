"""The ping-pong floor in plain Python, for machines without a C compiler.

Same interface and output as pingpong.c: ``python -m bench.pingpong ROUND_TRIPS REPETITIONS``
prints microseconds per 1-byte round trip over a socketpair between two processes, one line per
repetition.  Python's own overhead makes this floor higher (easier to meet) than the C one.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def round_trips(sock: socket.socket, n: int) -> None:
    for _ in range(n):
        sock.sendall(b"x")
        sock.recv(1)


def main(argv: list[str]) -> int:
    n, reps = int(argv[0]), int(argv[1])
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        parent.close()
        while (b := child.recv(1)):
            child.sendall(b)
        os._exit(0)
    child.close()
    round_trips(parent, n // 10 + 1)
    for _ in range(reps):
        t0 = time.perf_counter()
        round_trips(parent, n)
        print(f"{(time.perf_counter() - t0) / n * 1e6:.3f}", flush=True)
    parent.close()
    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
