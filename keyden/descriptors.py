"""Closing descriptors a client sent us, without ever waiting on a thread that serves others.

close(2) can block.  The last close of a TCP socket whose sender set
SO_LINGER waits until its unsent data is acknowledged or the linger time it
chose runs out (an hour, if it likes), and a file on FUSE or NFS waits for
its server.  Closed on the daemon's loop, one such descriptor would stop
every client.  So every descriptor a client chose -- and every socket that
may still hold some in its receive queue, which its last close releases --
is closed on a closer thread.  A closer stuck in one close holds up nothing
else: when every closer has been busy for STUCK seconds, another starts, up
to MAX_CLOSERS; only past that many stuck closes do the rest wait.

The socket's own options are left alone: its linger belongs to the open
file, which the application may still share.
"""

from __future__ import annotations

import array
import os
import queue
import socket
import threading
import time
from typing import Callable, Iterable

#: recvmsg's room for descriptors: as many as one message can carry (SCM_MAX_FD).  What the room cannot
#: hold, the kernel closes inside recvmsg, in the caller's thread; recv(2) drops them all so.
SCM_MAX_FD = 253
ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
MAX_CLOSERS = 16
STUCK = 0.01  # seconds: far longer than any close that does not wait for someone

_queue: "queue.SimpleQueue[int | threading.Event | Callable[[], None]]" = queue.SimpleQueue()
_lock = threading.Lock()
_busy_since: list[float] = []  # per closer: when its close began (0.0: waiting for work)


def passed(ancdata) -> list[int]:
    """The descriptors that came with a message (SCM_RIGHTS); anything else is ignored."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def release(fds: Iterable[int]) -> None:
    """Close descriptors the daemon owns and a client chose, later, on a closer thread."""
    queued = False
    for fd in fds:
        _queue.put(fd)
        queued = True
    if queued:
        _enough_closers()


def release_with(close: Callable[[], None]) -> None:
    """Run ``close`` on a closer thread too: a mapping's unmap, say (the last reference to a large memfd
    frees every page of it).  It reports its own errors."""
    _queue.put(close)
    _enough_closers()


def release_socket(sock: socket.socket) -> None:
    """``release`` for a socket object's descriptor (the object lets go of it; an ``SSLSocket`` too)."""
    fd = sock.detach()
    if fd >= 0:
        release((fd,))


def drain(timeout: float = 5.0) -> bool:
    """Wait until everything released so far is closed (tests).  False if a close still hangs."""
    done = threading.Event()
    _queue.put(done)
    _enough_closers()
    return done.wait(timeout)


def _enough_closers() -> None:
    """A closer for the work queued: none yet, or every one stuck in a close (up to MAX_CLOSERS)."""
    now = time.monotonic()
    if any(not since or now - since < STUCK for since in _busy_since):  # one is free, or soon will be
        return
    with _lock:
        if len(_busy_since) >= MAX_CLOSERS or any(not s or now - s < STUCK for s in _busy_since):
            return
        _busy_since.append(0.0)
        index = len(_busy_since) - 1
    threading.Thread(target=_close_forever, args=(index,), name=f"keyden-closer-{index}", daemon=True).start()


def _close_forever(index: int) -> None:
    while True:
        item = _queue.get()
        if isinstance(item, threading.Event):
            item.set()
            continue
        _busy_since[index] = time.monotonic()
        try:
            os.close(item) if isinstance(item, int) else item()
        except Exception:  # a close's error (EBADF, EIO) is nobody's to report; a callable logs its own
            pass
        _busy_since[index] = 0.0
