"""Where one small request's time goes, on the client and in the daemon.

    python -m bench.profile_request [--request ping|read|sign-ed25519|sign-rsa2048] [--calls N] [--top K]

1. A breakdown measured without a profiler: the whole round trip against a real daemon, with the
   CPU time each side spent; the daemon's Python work alone (``Connection.receive`` on the encoded
   request, no socket, audited to a file as by default, and without audit); the
   client's Python work alone (the real client answering from a canned response, no socket); the
   rest is the kernel: two socket writes, two reads, two wake-ups (compare the C ping-pong floor).
2. cProfile of both sides over the same calls: the client in this process, the daemon's
   I/O loop in a daemon started with a profiling hook.  Profiling inflates Python call
   costs; read it for proportions.  Time in recv_into is waiting for the other side.
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import itertools
import os
import pstats
import shutil
import struct
import sys
import tempfile
import time
from typing import Callable

import keyden
from bench.daemon import BenchDaemon
from keyden import protocol as W
from keyden.client.common import key_id
from keyden.client.operations import Operations, Ref

#: request name -> given a client, (method, args) of the call to study (keys made here).
REQUESTS: dict[str, Callable] = {
    "ping": lambda c: ("ping", (b"",)),
    "read": lambda c: ("read", (c.add("user", "bench-read", b"x" * 32),)),
    "sign-ed25519": lambda c: ("pkey_sign", (c.generate("ed25519", "bench-profile"), "", bytes(64))),
    "sign-rsa2048": lambda c: ("pkey_sign", (c.generate("rsa:2048", "bench-profile"), "enc=pkcs1 hash=sha256",
                                             bytes(32))),
}


# --------------------------------------------------- the daemon, with profiling

def serve_profiled(argv: list[str]) -> int:
    """`keyden serve`, with its I/O loop profiled; a snapshot goes to OUTDIR each time a connection ends."""
    from keyden.cli.serve import serve
    from keyden.server.reactor import Reactor

    out_dir, serve_args = argv[0], argv[1:]
    plain_run, plain_release = Reactor.run, Reactor._release
    counter = itertools.count()
    prof = cProfile.Profile()

    def run(self, listener):
        prof.enable()
        try:
            plain_run(self, listener)
        finally:
            prof.disable()

    def release(self, ch):
        plain_release(self, ch)
        prof.disable()  # dump_stats needs the profiler stopped
        path = os.path.join(out_dir, f"snapshot-{next(counter)}.prof")
        prof.dump_stats(path + ".tmp")
        os.rename(path + ".tmp", path)
        prof.enable()

    Reactor.run, Reactor._release = run, release
    return serve(serve_args)


# ------------------------------------------------------- Python work, no sockets

class InProcess(Operations):
    """A client talking straight to a server-side ``Connection``: the daemon's work without IO.

    With ``audit_dir`` each request is audited to a file there, as the daemon does by default.
    """

    def __init__(self, audit_dir: str | None = None):
        from keyden.core.store import KeyStore
        from keyden.server.audit import AuditLog
        from keyden.server.connection import Connection
        from keyden.server.peer import Peer

        me = Peer(os.getpid(), os.getuid(), os.getgid(), frozenset(), -1)
        audit = AuditLog.open("audit.log", audit_dir).connection(me.pid, me.uid, me.gid) if audit_dir else None
        self.conn = Connection(KeyStore(), me, audit=audit)
        self._exchange(W.Op.HELLO, (W.MIN_VERSION, W.VERSION, "", "bench"))

    def _exchange(self, op, args) -> W.Frame:
        self.last_request = W.encode_request(1, op, *args)
        self.last_response = self.conn.receive(self.last_request)
        decoder = W.FrameDecoder()
        decoder.feed(self.last_response)
        return next(decoder.frames())

    def _call(self, op, *args):
        args = tuple(key_id(a.value) if isinstance(a, Ref) else a for a in args)
        frame = self._exchange(op, args)
        if frame.status:
            raise W.error_of(frame)
        return W.response_schema(op).decode(frame.body)[0]


class CannedSocket:
    """Stands in for the daemon's socket: answers every request with one canned response."""

    def __init__(self, response: bytes):
        self.response = bytearray(response)

    def send(self, data) -> int:
        struct.pack_into("<I", self.response, 4, W.HEADER.unpack_from(data)[1])  # echo the request id
        return len(data)

    def sendall(self, data) -> None:
        self.send(data)

    def recv_into(self, view) -> int:
        n = len(self.response)
        view[:n] = self.response
        return n

    def close(self) -> None:
        pass


def per_call_us(fn: Callable[[], object], calls: int, batches: int = 5) -> float:
    """Fastest of several batches: Python work alone, as little disturbed by other load as we can."""
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(calls // batches):
            fn()
        best = min(best, (time.perf_counter() - t0) / (calls // batches))
    return best * 1e6


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds a process has used so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def round_trip(call: Callable[[], object], calls: int, daemon_pid: int) -> dict[str, float]:
    """Wall time per call, and the CPU time each side spent on it (user and kernel), in µs."""
    for _ in range(calls // 10):
        call()
    me, daemon = cpu_seconds(os.getpid()), cpu_seconds(daemon_pid)
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    wall = time.perf_counter() - t0
    me_after, daemon_after = cpu_seconds(os.getpid()), cpu_seconds(daemon_pid)
    per = 1e6 / calls
    return {"wall": wall * per,
            "client user": (me_after[0] - me[0]) * per, "client sys": (me_after[1] - me[1]) * per,
            "daemon user": (daemon_after[0] - daemon[0]) * per, "daemon sys": (daemon_after[1] - daemon[1]) * per}


# --------------------------------------------------------------------- report

def top_functions(stats: pstats.Stats, calls: int, k: int) -> list[str]:
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:k]  # by own time
    lines = [f"{'µs/request':>11} {'cum µs':>8} {'calls/req':>9}  function"]
    for (path, line, func), (_cc, ncalls, own, cum, _callers) in rows:
        where = f"{os.path.basename(path)}:{line}" if line else ""
        lines.append(f"{own / calls * 1e6:11.2f} {cum / calls * 1e6:8.2f} {ncalls / calls:9.2f}  {func} {where}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-profiled"]:
        return serve_profiled(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.profile_request", description=__doc__.split("\n\n")[0])
    p.add_argument("--request", choices=REQUESTS, default="ping")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    n = args.calls

    daemon_us = {}
    with tempfile.TemporaryDirectory(prefix="keyden-profile-audit-") as audit_dir:
        for audit in ("off", "on"):
            local = InProcess(audit_dir if audit == "on" else None)
            method, call_args = REQUESTS[args.request](local)
            getattr(local, method)(*call_args)
            request = local.last_request
            daemon_us[audit] = per_call_us(lambda: local.conn.receive(request), n)
    canned = local.last_response

    with BenchDaemon() as daemon, keyden.connect(daemon.socket) as c:
        method, call_args = REQUESTS[args.request](c)
        call = getattr(c, method)
        trip = round_trip(lambda: call(*call_args), n, daemon.proc.pid)
        real_sock, c._sock = c._sock, CannedSocket(canned)
        try:
            client_us = per_call_us(lambda: call(*call_args), n)
        finally:
            c._sock = real_sock

    print(f"request: client.{method}{tuple(type(a).__name__ for a in call_args)}  ({n} calls)\n")
    print(f"  round trip against the daemon      {trip['wall']:7.1f} µs wall")
    print(f"    CPU: client user {trip['client user']:.1f} + sys {trip['client sys']:.1f}, "
          f"daemon user {trip['daemon user']:.1f} + sys {trip['daemon sys']:.1f} µs")
    print(f"  daemon Python (Connection.receive) {daemon_us['on']:7.1f} µs  (audit off: {daemon_us['off']:.1f})")
    print(f"  client Python (canned socket)      {client_us:7.1f} µs")
    print(f"  the rest: pump, kernel, wake-ups   {trip['wall'] - daemon_us['on'] - client_us:7.1f} µs\n")

    out_dir = tempfile.mkdtemp(prefix="keyden-profile-")
    try:
        client_stats, daemon_stats, daemon_requests = profile_both_sides(args.request, n, out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    print(f"client, cProfile, top {args.top} by own time:")
    print("\n".join(top_functions(client_stats, n, args.top)))
    print(f"\ndaemon I/O loop, cProfile, top {args.top} by own time:")
    print("\n".join(top_functions(daemon_stats, daemon_requests, args.top)))
    return 0


def profile_both_sides(request: str, n: int, out_dir: str) -> tuple[pstats.Stats, pstats.Stats, int]:
    """cProfile of n calls in this process and in the daemon's thread serving them."""
    with BenchDaemon(command=("-m", "bench.profile_request", "--serve-profiled", out_dir)) as daemon:
        before = set(glob.glob(os.path.join(out_dir, "*.prof")))  # the startup probes' connections
        c = keyden.connect(daemon.socket)
        method, call_args = REQUESTS[request](c)
        call = getattr(c, method)
        warmup = n // 10
        for _ in range(warmup):
            call(*call_args)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            call(*call_args)
        prof.disable()
        c.close()
        daemon_stats = wait_for_profile(out_dir, before, n)
        # the daemon's profile covers the whole connection: hello, set-up, warm-up and the n calls
        return pstats.Stats(prof), daemon_stats, n + warmup + 2


def wait_for_profile(out_dir: str, before: set[str], calls: int, timeout: float = 10) -> pstats.Stats:
    """The profile the daemon dumped for our connection: the new one that saw at least ``calls`` calls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in set(glob.glob(os.path.join(out_dir, "*.prof"))) - before:
            stats = pstats.Stats(path)
            if stats.total_calls >= calls:
                return stats
        time.sleep(0.05)
    raise RuntimeError("the daemon wrote no profile for the benchmark's connection")


if __name__ == "__main__":
    sys.exit(main())
