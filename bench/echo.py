"""The smallest possible Python server, to show what CPython itself allows on this machine.

A plain epoll echo server (no protocol, no keys, no audit) in its own process, and client processes
that send 16 bytes and wait for them back.  bench.run measures it exactly as it measures keyden's
``ping`` and ``concurrency`` rows, so the reference rows say how much of keyden's distance to a
target is keyden's own and how much any Python daemon would have here.  With ``sign=True`` it
answers each read with its Ed25519 signature, signed on the loop: the same for ``sign-ed25519-8``.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import socket

MESSAGE = b"x" * 16


def serve(path: str, ready, sign: bool = False) -> None:
    """Echo every read back (or its signature) on the same connection, all connections from one epoll loop."""
    if sign:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        answer = ed25519.Ed25519PrivateKey.generate().sign
    else:
        answer = bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    listener.setblocking(False)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, socket.socket] = {}
    buf = memoryview(bytearray(65536))
    ready.set()
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                conn, _ = listener.accept()
                conn.setblocking(False)
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                n = conn.recv_into(buf)
            except BlockingIOError:
                continue
            if n == 0:
                poller.unregister(fd)
                conns.pop(fd).close()
            else:
                conn.send(answer(buf[:n]))


class EchoServer:
    """The echo server process, on a socket in ``workdir``; a context manager."""

    def __init__(self, workdir: str, sign: bool = False):
        self.path = os.path.join(workdir, "sign.sock" if sign else "echo.sock")
        ctx = multiprocessing.get_context("spawn")
        self._ready = ctx.Event()
        self._proc = ctx.Process(target=serve, args=(self.path, self._ready, sign), daemon=True)

    def __enter__(self) -> "EchoServer":
        self._proc.start()
        if not self._ready.wait(30):
            self._proc.kill()
            raise RuntimeError("the echo server did not start")
        return self

    def __exit__(self, *exc) -> None:
        self._proc.kill()
        self._proc.join()


class EchoClient:
    """Quacks like a keyden client for ClientPool: ``ping()`` is one 16-byte round trip, ``pkey_sign()`` one
    signature from a ``sign=True`` server."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self._buf = bytearray(64)

    def ping(self, _data: bytes = b"") -> None:
        self._round_trip(MESSAGE, len(MESSAGE))

    def pkey_sign(self, _serial: int, _info: str, message: bytes) -> bytes:
        return self._round_trip(message, 64)

    def _round_trip(self, message: bytes, reply_size: int) -> bytes:
        self.sock.sendall(message)
        got = 0
        while got < reply_size:
            got += self.sock.recv_into(memoryview(self._buf)[got:])
        return bytes(self._buf[:got])

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "EchoClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
