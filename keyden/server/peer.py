"""Who is on the other end of a Unix socket: read from the kernel, never from the client."""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import select
import socket
import struct
from dataclasses import dataclass

from keyden import descriptors
from keyden.core.perm import Credentials
from keyden.protocol.transport import peer_credentials

log = logging.getLogger("keyden.peer")

# Linux >= 4.13; Python's socket module does not export it everywhere.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("=I")  # the kernel hands back native-endian gid_t (u32)
_GROUPS_FIRST_TRY = 64 * _GID.size
_PY_GETSOCKOPT_MAX = 1024  # socket.getsockopt refuses bigger buffers
_GROUPS_MAX = 65536 * _GID.size  # NGROUPS_MAX: no credential holds more
# Linux >= 6.5: a pidfd for the process that called connect(); Python does not export it yet.
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)
UNKNOWN_START = -1  # the peer is gone (or unknowable): it gets no process keyring


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    start_time: int  # /proc/<pid>/stat field 22: tells a reused pid apart; UNKNOWN_START if the peer is gone
    exe: str | None = None  # /proc/<pid>/exe, read under the same check as start_time (None: gone or hidden)

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.uid, self.gid, self.groups)

    @property
    def process(self) -> tuple[int, int] | None:
        """Names the process keyring; None when the process is unknown, so no two such peers share one."""
        if self.start_time == UNKNOWN_START:
            return None
        return (self.pid, self.start_time)


def process_start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot), or None if no process has that pid.  Any other
    failure to read /proc (EMFILE, ENOMEM) is raised: it says nothing about the process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def parse_peer_groups(data: bytes) -> frozenset[int]:
    """SO_PEERGROUPS' answer: a packed array of native uint32 gids."""
    if len(data) % _GID.size:
        raise ValueError(f"SO_PEERGROUPS returned {len(data)} bytes, not a whole number of gids")
    return frozenset(gid for (gid,) in _GID.iter_unpack(data))


def socket_peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups as the kernel captured them at connect().

    Unlike /proc/PID/status this cannot be raced: the credentials belong to
    the socket, so an exited peer whose pid was reused cannot lend us
    another process's groups.  The kernel answers ERANGE to a buffer too
    small for them all; then ask again with a bigger one.
    """
    size = _GROUPS_FIRST_TRY
    while size <= _PY_GETSOCKOPT_MAX:
        try:
            return parse_peer_groups(sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size))
        except OSError as exc:
            if exc.errno != errno.ERANGE:
                raise
        size *= 4
    return parse_peer_groups(_getsockopt_unbounded(sock.fileno(), SO_PEERGROUPS))


def _getsockopt_unbounded(fd: int, option: int) -> bytes:
    """getsockopt(2) through libc: Python's own caps the buffer at 1024 bytes (256 groups)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = _PY_GETSOCKOPT_MAX * 4
    while True:
        buf = ctypes.create_string_buffer(size)
        length = ctypes.c_uint32(size)
        if libc.getsockopt(fd, socket.SOL_SOCKET, option, buf, ctypes.byref(length)) == 0:
            return buf.raw[:length.value]
        err = ctypes.get_errno()
        if err != errno.ERANGE or size >= _GROUPS_MAX:
            raise OSError(err, os.strerror(err))
        size = min(max(length.value, size * 2), _GROUPS_MAX)  # the kernel reports the length it needs


@functools.cache
def _warn_once(message: str) -> None:
    """A kernel that lacks a socket option is worth one line in the log, not one per connection."""
    log.warning(message)


def peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """Groups from the socket; from /proc only on kernels without SO_PEERGROUPS (logged once)."""
    try:
        return socket_peer_groups(sock)
    except OSError as exc:
        if exc.errno != errno.ENOPROTOOPT:
            raise
    _warn_once("kernel lacks SO_PEERGROUPS (Linux < 4.13): reading peers' groups from /proc, "
               "which races with pid reuse")
    return supplementary_groups(pid)


def supplementary_groups(pid: int) -> frozenset[int]:
    """Fallback only: /proc can describe a different process if the peer exited and its pid was reused."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def process_alive(pid: int, start_time: int) -> bool:
    """Is that very process still there?  When /proc cannot tell (out of descriptors), yes: a live
    process must never lose its keyrings for the daemon's own trouble; the next sweep asks again."""
    try:
        return process_start_time(pid) == start_time
    except OSError:
        return True


def open_pidfd(process: tuple[int, int]) -> int | None:
    """A pidfd for that very process (pid, start time) while it runs; None if it has exited (an unreaped
    zombie too) or its pid is another process's now.

    pidfd_open names whatever process holds the pid; the start time read
    after it is that process's if it has still not exited (it holds its pid
    until then), as in ``peer_process``.  Other failures (EMFILE, ENOSYS)
    raise OSError.
    """
    pid, start = process
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    try:
        if process_start_time(pid) != start or _exited(pidfd):
            os.close(pidfd)
            return None
    except BaseException:
        os.close(pidfd)
        raise
    return pidfd


def _exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (and for good once it is reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def executable(pid: int) -> str | None:
    """The program a process runs (None if it is gone or we may not look)."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def peer_process(sock: socket.socket, pid: int) -> tuple[int, str | None]:
    """(start time, executable) of the process that connected; (UNKNOWN_START, None) if it is gone.

    /proc/<pid> read after accept() may be another process if the peer exited
    and its pid was reused.  SO_PEERPIDFD pins the very process that called
    connect(): read /proc/<pid>/stat, then check that process has still not
    exited.  A process that has not exited holds its pid, so what was read
    was its own start time.  Without SO_PEERPIDFD (Linux < 6.5): /proc alone,
    logged once.
    """
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EINVAL, errno.ENODATA):
            return UNKNOWN_START, None  # kernels before 6.16 refuse a pidfd for a peer already reaped
        if exc.errno != errno.ENOPROTOOPT:
            raise
        _warn_once("kernel lacks SO_PEERPIDFD (Linux < 6.5): reading peers' start times from /proc, "
                   "which races with pid reuse")
        start = process_start_time(pid)
        return (UNKNOWN_START, None) if start is None else (start, executable(pid))
    try:
        start, exe = process_start_time(pid), executable(pid)
        if start is None or _exited(pidfd):
            return UNKNOWN_START, None
        return start, exe
    finally:
        os.close(pidfd)


def uid_of(sock: socket.socket) -> int:
    """The peer's uid alone (SO_PEERCRED: no /proc read), or descriptors.NOBODY if the socket cannot say."""
    try:
        return peer_credentials(sock)[1]
    except OSError:
        return descriptors.NOBODY


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = peer_credentials(sock)
    start, exe = peer_process(sock, pid)
    return Peer(pid, uid, gid, peer_groups(sock, pid), start, exe)
