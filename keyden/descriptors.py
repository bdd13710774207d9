"""Closing descriptors a client sent us, without ever waiting on a thread that serves others.

close(2) can block.  The last close of a TCP socket whose sender set
SO_LINGER waits until its unsent data is acknowledged or the linger time it
chose runs out (an hour, if it likes), and a file on FUSE or NFS waits for
its server.  Closed on the daemon's loop, one such descriptor would stop
every client.  So a socket's blocking linger is turned off first (the close
is then immediate; the kernel sends what is left in the background), and
the close itself runs on one closer thread: even a file whose close hangs
holds up nothing but the closes queued behind it.
"""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
from typing import Iterable

_LINGER = struct.Struct("ii")
_LINGER_OFF = _LINGER.pack(0, 0)

_queue: "queue.SimpleQueue[int | threading.Event]" = queue.SimpleQueue()
_started = threading.Lock()
_closer: threading.Thread | None = None


def release(fds: Iterable[int]) -> None:
    """Close descriptors the daemon owns and a client chose, later, on the closer thread."""
    for fd in fds:
        _unlinger(fd)
        _queue.put(fd)
    _start()


def release_socket(sock: socket.socket) -> None:
    """``release`` for a socket object's descriptor (the object lets go of it; an ``SSLSocket`` too)."""
    fd = sock.detach()
    if fd >= 0:
        release((fd,))


def drain(timeout: float = 5.0) -> bool:
    """Wait until everything released so far is closed (tests; shutdown).  False if a close still hangs."""
    done = threading.Event()
    _queue.put(done)
    _start()
    return done.wait(timeout)


def _unlinger(fd: int) -> None:
    """A socket set to linger (SO_LINGER on, with a time) gets linger off; RST-on-close (a time of 0) and
    other descriptors are left as they are."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:  # not a socket (or not one Python knows): nothing lingers
        return
    try:
        on, seconds = _LINGER.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.size))
        if on and seconds:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_OFF)
    except OSError:  # no SO_LINGER here (a Unix socket has it, but a peer may have gone): close as it is
        pass
    finally:
        sock.detach()


def _start() -> None:
    global _closer
    if _closer is not None:
        return
    with _started:
        if _closer is None:
            _closer = threading.Thread(target=_close_forever, name="keyden-closer", daemon=True)
            _closer.start()


def _close_forever() -> None:
    while True:
        fd = _queue.get()
        if isinstance(fd, threading.Event):
            fd.set()
            continue
        try:
            os.close(fd)
        except OSError:
            pass
