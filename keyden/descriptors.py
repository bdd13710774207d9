"""Closing descriptors a client sent us, without ever waiting on a thread that serves others.

close(2) can block.  The last close of a TCP socket whose sender set
SO_LINGER waits until its unsent data is acknowledged or the linger time it
chose runs out (an hour, if it likes), and a file on FUSE or NFS waits for
its server.  Closed on the daemon's loop, one such descriptor would stop
every client.  So every descriptor a client chose -- and every socket that
may still hold some in its receive queue, which its last close releases --
is closed on a closer thread.

Each descriptor is released on behalf of an owner (the uid that sent it),
and one owner's closes run at most PER_OWNER at a time, in turn with the
other owners': else one message of lingering sockets would hold every
closer, and the daemon would close nothing for anyone, its own sockets of
departed clients included, until it ran out of descriptors.  A uid that
sends such sockets only waits for its own.  A closer starts whenever work
could run and none is free, up to MAX_CLOSERS; an idle one waits for more, and ends after
IDLE_EXIT seconds without (else a burst of connections ending would leave
every closer it started for good).

The socket's own options are left alone: its linger belongs to the open
file, which the application may still share.
"""

from __future__ import annotations

import array
import collections
import ctypes
import functools
import os
import resource
import socket
import struct
import threading
from typing import Callable, Iterable, Union

#: recvmsg's room for descriptors: as many as one message can carry (SCM_MAX_FD).  What the room cannot
#: hold, the kernel closes inside recvmsg, in the caller's thread; recv(2) drops them all so.
SCM_MAX_FD = 253
ANCILLARY_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
MAX_CLOSERS = 64
PER_OWNER = 4  # closes of one owner's in progress at once
MAX_BACKLOG = 256  # closes of one owner's waiting or in progress, past which it is in ``backlogged``
NOBODY = -1  # the owner of descriptors whose sender is not known (SO_PEERCRED could not say: peer.uid_of)
IDLE_EXIT = 30.0  # seconds an idle closer waits for work before it ends
SCM_PIDFD = 0x04  # (Linux 6.5; not in Python 3.11's socket module): a pidfd installed with a message
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}

_Work = Union[int, Callable[[], None]]  # a descriptor to close, or a close of another kind to run

_lock = threading.Lock()
_sleeping: collections.deque[threading.Event] = collections.deque()  # idle closers, each waiting on its own
_work_done = threading.Condition(_lock)  # for drain
_waiting: dict[int, collections.deque[_Work]] = {}  # owner -> its work not begun, in order
_turns: collections.deque[int] = collections.deque()  # owners with work waiting, in the order they get a closer
_running: collections.Counter[int] = collections.Counter()  # owner -> its closes in progress
#: Owners with MAX_BACKLOG closes waiting or in progress: they are stuck, and the daemon takes no more of
#: their descriptors (their connections are refused), or those would pile up here.  Read it, never change
#: it (a membership test needs no lock); an owner leaves it once half its closes are done.
backlogged: set[int] = set()
_closers = 0


def passed(ancdata) -> list[int]:
    """The descriptors that came with a message (SCM_RIGHTS, and the pidfd SO_PASSPIDFD asks for, which the
    kernel installs too); anything else is ignored."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind in (socket.SCM_RIGHTS, SCM_PIDFD):
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def release(fds: Iterable[int], owner: int) -> None:
    """Close descriptors the daemon owns and ``owner`` chose, later, on a closer thread."""
    _queue(list(fds), owner)


def release_with(close: Callable[[], None], owner: int) -> None:
    """Run ``close`` on a closer thread too: a mapping's unmap, say (the last reference to a large memfd
    frees every page of it).  It reports its own errors."""
    _queue([close], owner)


def release_socket(sock: socket.socket, owner: int, then: Callable[[], None] | None = None) -> None:
    """``release`` for a socket object's descriptor (the object lets go of it; an ``SSLSocket`` too);
    ``then`` runs on the closer once it is closed (a connection counts against its uid until then)."""
    fd = sock.detach()
    if then is not None:
        release_with(functools.partial(_close_then, fd, then), owner)
    elif fd >= 0:
        release((fd,), owner)


def reset_on_close(sock: socket.socket) -> None:
    """Make the last close of a TCP socket send a reset, not a FIN (SO_LINGER on, 0 s): for a connection
    whose end must not pass for a clean one.  It also makes that close immediate."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


_UNSPEC = struct.pack("H14x", socket.AF_UNSPEC)  # a sockaddr of family AF_UNSPEC: connect(2)'s "disconnect"


_LIBC = ctypes.CDLL(None, use_errno=True)


def disconnect(sock: socket.socket) -> None:
    """End a TCP connection now with a reset, whatever its queues hold: connect(2) to AF_UNSPEC, which
    Python's socket module cannot ask for.  A write blocked on it, or one to come, fails (no FIN ever goes
    out, as one behind unsent data would after a shutdown).  OSError if the kernel refuses: EBUSY from
    kernels 5.10-6.5 while another thread waits on the socket, EINVAL for one that is not TCP."""
    if _LIBC.connect(sock.fileno(), _UNSPEC, len(_UNSPEC)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _close_then(fd: int, then: Callable[[], None]) -> None:
    try:
        if fd >= 0:
            os.close(fd)
    finally:
        then()


def drain(timeout: float = 5.0) -> bool:
    """Wait until everything released so far is closed (tests).  False if a close still hangs."""
    with _work_done:
        return _work_done.wait_for(lambda: not _waiting and not _running, timeout)


def _queue(work: list[_Work], owner: int) -> None:
    """Queue ``work``; as many closers as may run it (the owner's share) are woken or started."""
    if not work:
        return
    global _closers
    with _lock:
        if owner not in _waiting:
            _waiting[owner] = collections.deque()
            _turns.append(owner)
        _waiting[owner].extend(work)
        if len(_waiting[owner]) + _running[owner] >= MAX_BACKLOG:
            backlogged.add(owner)
        wanted = min(len(work), PER_OWNER - _running[owner])
        woken = min(max(wanted, 0), len(_sleeping))
        for _ in range(woken):
            _sleeping.pop().set()  # the last to go idle first: the longest idle may end (IDLE_EXIT)
        started = max(0, min(wanted - woken, MAX_CLOSERS - _closers))
        _closers += started
        first = _closers - started
    for number in range(first + 1, first + started + 1):
        try:
            threading.Thread(target=_close_forever, name=f"keyden-closer-{number}", daemon=True).start()
        except RuntimeError:  # no more threads: the closers there are take the work in turn
            with _lock:
                _closers -= 1


def _next() -> tuple[int, _Work] | None:
    """The next owner in turn whose closes in progress are below its share, and its next work (lock held)."""
    for _ in range(len(_turns)):
        owner = _turns.popleft()
        if _running[owner] >= PER_OWNER:
            _turns.append(owner)
            continue
        work = _waiting[owner]
        item = work.popleft()
        if work:
            _turns.append(owner)
        else:
            del _waiting[owner]
        _running[owner] += 1
        return owner, item
    return None


def _close_forever() -> None:
    global _closers
    wake = threading.Event()  # set by _queue, which takes us off _sleeping, when it has work for us
    while True:
        with _lock:
            while (taken := _next()) is None:
                wake.clear()
                _sleeping.append(wake)
                _lock.release()
                try:
                    woken = wake.wait(IDLE_EXIT)
                finally:
                    _lock.acquire()
                if not woken and wake in _sleeping:  # no work came (if _queue has just set us, some did)
                    _sleeping.remove(wake)
                    if (taken := _next()) is not None:
                        break
                    if _closers > 1:  # the last one stays: work whose own closer cannot start (no more
                        _closers -= 1  # threads: _queue) must find one
                        return
        owner, item = taken
        try:
            os.close(item) if isinstance(item, int) else item()
        except Exception:  # a close's error (EBADF, EIO) is nobody's to report; a callable logs its own
            pass
        with _lock:
            _running[owner] -= 1
            if not _running[owner]:
                del _running[owner]
            if owner in backlogged and len(_waiting.get(owner, ())) + _running[owner] < MAX_BACKLOG // 2:
                backlogged.discard(owner)
            _work_done.notify_all()  # (the owner's next, if it was at its share, is this closer's next turn)


def raise_fd_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards the hard limit so ``wanted`` connections fit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
