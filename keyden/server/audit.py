"""The audit log: one JSON line per operation, saying who did what to which keys and how it ended.

    {"ts": 1718000000.123456, "uid": 1000, "gid": 1000, "pid": 4242, "exe": "/usr/bin/python3.11",
     "op": "read", "keys": [912345678], "result": "ok"}

``keys`` are the request's key fields as sent (I32 fields are key serials on
the wire; negative values are special ids such as -3 for @s, zero means "none"
and is left out); ``serial`` is added when the operation created or found a key.
``result`` is "ok" or the errno name.  Not recorded: PING, a liveness probe
that touches no key and changes nothing (like Vault's unaudited health
check); on the busiest probe path a line would cost more than the answer.
Never logged: payloads, data, passwords,
descriptions, algorithm parameters -- only serials, which ``keyctl describe``
turns into the rest for whoever may view the key.

Cheap on the hot path: each connection formats its constant prefix once, op
names and errno names are looked up in prebuilt tables.  Lines go to an
O_APPEND descriptor.  The server's loop holds them briefly and writes all the
lines of one round in one ``write(2)`` just before that round's replies go
out: no reply ever leaves before its line is written, and under load a
hundred requests cost one write.  A file moved or deleted under us (no
SIGHUP) is noticed at the next rotation or within a second, by a stat of
the path, and the path is opened anew.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time
from typing import Any, Sequence

from keyden import errors as E
from keyden import protocol as W
from keyden.errors import StartupError
from keyden.logs import Throttled, reason

log = logging.getLogger("keyden.audit")

OP_NAMES: dict[int, str] = {int(op): op.name.lower() for op in W.Op}
RESULT_NAMES: dict[int, str] = {0: "ok", **{code: cls.name for code, cls in E.ERRORS.items()}}


def _key_fields(op: W.Op, schema: W.Schema) -> tuple[int, ...]:
    """The request fields that name keys: every I32 but KEYS' cursor (a serial to list after, not a key used)."""
    return tuple(i for i, f in enumerate(schema.fields)
                 if f.kind is W.Kind.I32 and (op, f.name) != (W.Op.KEYS, "after"))


#: op -> (its line's '"op": name' part, indexes of the request's key fields, index of the response's "serial")
_SHAPES: dict[int, tuple[str, tuple[int, ...], int | None]] = {
    int(op): (f'"op": "{OP_NAMES[op]}"', _key_fields(op, request),
              response.names.index("serial") if "serial" in response.names else None)
    for op, (request, response) in W.SCHEMAS.items()
}
UNAUDITED = frozenset({int(W.Op.PING)})
#: seconds between checks that the file at the path is still the one written to (a stat, not one per line)
PATH_CHECK_INTERVAL = 1.0


class AuditLog:
    """Where lines go: a file (rotated to <file>.1 when it reaches max_bytes), stderr, or nowhere."""

    def __init__(self, fd: int, path: str | None = None, max_bytes: int = 0):
        self._fd = fd
        self.path = path
        self.max_bytes = max_bytes if path else 0
        self._size = os.fstat(fd).st_size if path else 0
        self._lock = threading.Lock()  # one writer at a time: a line's rest, and the swap of the descriptor
        self._next_check = time.monotonic() + PATH_CHECK_INTERVAL  # when to look whether the path is still ours
        # The file ends inside a line (a write was cut short, here or by a daemon the disk stopped before):
        # the next write ends it first, or the first line written would be glued to the torn one.
        self._torn = bool(path) and _ends_inside_a_line(path)
        self._failing = False
        self._lost = 0  # lines not written (or cut short) since writes began failing
        self._path_errors = Throttled(log)
        self._held: list[bytes] | None = None  # lines waiting for flush(); None: each line is written at once
        self._held_lock = threading.Lock()
        self._flushing = False  # a flush is writing what it took (under _held_lock)

    @classmethod
    def open(cls, target: str, state_dir: str, max_bytes: int = 0) -> "AuditLog | None":
        """'off', 'stderr', or a file path (relative paths are under the state dir)."""
        if target == "off":
            return None
        if target == "stderr":
            return cls(2)
        path = os.path.join(state_dir, target)
        try:
            fd = _open_append(path)
        except NotOurs as exc:
            raise StartupError(f"{exc}; refusing to start (check nobody else had it, then: "
                               f"chown {os.geteuid()} {path})") from None
        except OSError as exc:
            raise StartupError(f"cannot open the audit log {path}: {exc.strerror}") from None
        return cls(fd, path, max_bytes)

    def connection(self, pid: int, uid: int, gid: int, exe: str | None = None) -> "ConnectionAudit":
        """A writer for one connection; ``exe`` as read when it was accepted (peer.Peer.exe)."""
        return ConnectionAudit(self, pid, uid, gid, exe)

    def hold(self) -> None:
        """From now on keep lines until ``flush`` (the server's loop flushes before it sends any reply)."""
        self._held = []

    @property
    def holding(self) -> bool:
        """Are lines held, or being written by another thread's flush?  (Either way a reply must wait for
        ``flush``, which takes the lock that write holds.)"""
        return bool(self._held) or self._flushing

    def flush(self) -> None:
        """Write the held lines, in order, in one go.  The write happens under the lock, so a flush on
        another thread (a TLS outcome's) never lets the loop's replies overtake the lines it took."""
        if self._held is None:
            return
        with self._held_lock:
            self._flushing = True
            try:
                lines, self._held = self._held, []
                if lines:
                    self._write(b"".join(lines))
            finally:
                self._flushing = False

    def write(self, line: bytes) -> None:
        if self._held is not None:
            with self._held_lock:
                self._held.append(line)
            return
        self._write(line)

    def _write(self, lines: bytes) -> None:
        with self._lock:
            written = self._write_whole(lines)
            if not self.path:
                return
            self._size += written
            if self.max_bytes and self._size >= self.max_bytes:
                self._rotate()
            elif time.monotonic() >= self._next_check:  # also while writes fail: deleting a file we hold frees nothing
                self._follow_path()

    def _write_whole(self, lines: bytes) -> int:
        """Write whole lines, or fail open: a write the disk cuts short is continued; if the disk refuses
        the rest (ENOSPC, EIO), the rest of the batch is dropped and the next write first ends the torn
        line, so every line after it is whole JSON.  Returns the bytes written."""
        data = b"\n" + lines if self._torn else lines
        done = 0
        try:
            while done < len(data):
                n = os.write(self._fd, data[done:] if done else data)
                if n <= 0:  # never for a regular file; but a loop that makes no progress must end
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                done += n
        except OSError as exc:  # fail open, but say so once: the daemon keeps serving
            if done:
                self._torn = data[done - 1] != 0x0A
            self._lost += lines.count(b"\n", max(0, done - (len(data) - len(lines))))
            if not self._failing:
                self._failing = True
                log.error("audit log write failed (%s); lines are being lost", exc.strerror)
            return done
        self._torn = False
        if self._failing:
            self._failing = False
            log.warning("audit log writes work again; %d lines were lost or cut short", self._lost)
            self._lost = 0
        return done

    def _holds_path(self) -> bool:
        """Is the file at our path the one we write to?  (Not if it was deleted, or moved and maybe replaced.)"""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            return False
        ours = os.fstat(self._fd)
        return (at_path.st_ino, at_path.st_dev) == (ours.st_ino, ours.st_dev)

    def _follow_path(self) -> None:
        """A file deleted or moved away without SIGHUP (logrotate without postrotate, an rm) would take our
        lines unseen and grow without bound: the path is opened anew.  Checked at most once a second."""
        self._next_check = time.monotonic() + PATH_CHECK_INTERVAL
        try:
            if not self._holds_path():
                self._open_path()
                log.info("audit log %s was moved or deleted; writing to a new file there", self.path)
        except (OSError, NotOurs) as exc:
            self._path_errors.error("audit log %s could not be reopened (%s); writing to the file we hold",
                                    self.path, reason(exc))

    def _rotate(self) -> None:
        """<file> -> <file>.1, then a new <file> takes over the same descriptor number (dup2 is atomic).
        A file at the path that is not ours (ours was moved or deleted) is not renamed: it is taken over."""
        self._next_check = time.monotonic() + PATH_CHECK_INTERVAL
        try:
            if self._holds_path():
                try:
                    os.replace(self.path, self.path + ".1")
                except FileNotFoundError:  # moved away just now: nothing to rotate
                    pass
            self._open_path()
        except (OSError, NotOurs) as exc:
            self._path_errors.error("audit log rotation failed: %s", reason(exc))
            self._size = 0  # tried again after another max_bytes

    def reopen(self) -> bool:
        """The file at our path anew, on the same descriptor (SIGHUP after logrotate moved it away);
        False, said why, if it cannot be opened (lines go on to the file we hold)."""
        with self._lock:
            try:
                self._open_path()
            except (OSError, NotOurs) as exc:
                log.error("audit log %s reopen failed (%s); writing on to the file we hold, wherever it was "
                          "moved", self.path, reason(exc))
                return False
            return True

    def _open_path(self) -> None:
        """The file at our path takes over our descriptor number (dup2 is atomic: no line is lost)."""
        fresh = _open_append(self.path)
        try:
            st, ours = os.fstat(fresh), os.fstat(self._fd)
            os.dup2(fresh, self._fd)
        finally:
            os.close(fresh)
        if (st.st_ino, st.st_dev) != (ours.st_ino, ours.st_dev):
            self._torn = False  # a torn line stays in the old file; the new one starts clean
        self._size = st.st_size
        self._next_check = time.monotonic() + PATH_CHECK_INTERVAL

    def close(self) -> None:
        self.flush()
        if self.path:
            os.close(self._fd)


class NotOurs(Exception):
    """The audit file at the path belongs to another uid, who could read every user's activity in it."""


def _ends_inside_a_line(path: str) -> bool:
    """Does the regular file at ``path`` end with anything but a line break (a line cut short)?"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        return stat.S_ISREG(st.st_mode) and st.st_size > 0 and os.pread(fd, 1, st.st_size - 1) != b"\n"
    except OSError:
        return False
    finally:
        os.close(fd)


def _open_append(path: str) -> int:
    """The file at ``path`` for appending, created 0600.  An existing regular file must be the daemon's own
    (else NotOurs) and is made 0600 if it was open to others: it tells who used which keys when."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)  # not via a link
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):  # not /dev/null or a pipe someone named on purpose
            if st.st_uid != os.geteuid():
                raise NotOurs(f"the audit log {path} is owned by uid {st.st_uid}, not the daemon's uid "
                              f"{os.geteuid()}")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                os.fchmod(fd, 0o600)
                log.warning("the audit log %s had mode %04o, open to group or others; it is now 0600", path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ConnectionAudit:
    """One connection's writer: who it is is formatted once, each operation adds its own fields."""

    __slots__ = ("_log", "_prefix")

    def __init__(self, audit_log: AuditLog, pid: int, uid: int, gid: int, exe: str | None = None):
        self._log = audit_log
        self._prefix = f'"uid": {uid}, "gid": {gid}, "pid": {pid}, "exe": {json.dumps(exe)}'

    def record(self, op: int, args: Sequence[Any] | None, status: int, result: Sequence[Any] | None = None,
               keys: list[int] | None = None) -> None:
        """One operation: its request fields (None if they did not decode), errno (0 = ok), response fields;
        ``keys`` when the fields do not name them (a stream's key, named by its handle)."""
        if op in UNAUDITED:
            return
        op_part, key_fields, serial_field = _SHAPES.get(op) or (f'"op": "{op}"', (), None)
        if keys is None:
            keys = [args[i] for i in key_fields if args[i]] if key_fields and args is not None else []
        serial = f'"serial": {result[serial_field]}, ' if serial_field is not None and result is not None else ""
        us = time.time_ns() // 1000  # formatting an int is cheaper than a float's shortest repr
        self._log.write(f'{{"ts": {us // 1_000_000}.{us % 1_000_000:06d}, {self._prefix}, {op_part}, "keys": {keys}, '
                        f'{serial}"result": "{RESULT_NAMES.get(status) or status}"}}\n'.encode())

    def record_now(self, op: int, status: int) -> None:
        """An outcome that comes after its request was answered (a TLS handshake's), from another thread:
        written at once, behind the lines held before it, so nothing waits for the loop's next round."""
        self.record(op, None, status)
        self._log.flush()
