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
hundred requests cost one write.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Sequence

from keyden import errors as E
from keyden import protocol as W

log = logging.getLogger("keyden.audit")

OP_NAMES: dict[int, str] = {int(op): op.name.lower() for op in W.Op}
RESULT_NAMES: dict[int, str] = {0: "ok", **{code: cls.name for code, cls in E.ERRORS.items()}}


def _key_fields(schema: W.Schema) -> tuple[int, ...]:
    return tuple(i for i, f in enumerate(schema.fields) if f.kind is W.Kind.I32)


#: op -> (its line's '"op": name' part, indexes of the request's key fields, index of the response's "serial")
_SHAPES: dict[int, tuple[str, tuple[int, ...], int | None]] = {
    int(op): (f'"op": "{OP_NAMES[op]}"', _key_fields(request),
              response.names.index("serial") if "serial" in response.names else None)
    for op, (request, response) in W.SCHEMAS.items()
}
UNAUDITED = frozenset({int(W.Op.PING)})


class AuditLog:
    """Where lines go: a file (rotated to <file>.1 when it reaches max_bytes), stderr, or nowhere."""

    def __init__(self, fd: int, path: str | None = None, max_bytes: int = 0):
        self._fd = fd
        self.path = path
        self.max_bytes = max_bytes if path else 0
        self._size = os.fstat(fd).st_size if path else 0
        self._rotate_lock = threading.Lock()
        self._failing = False
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
        return cls(_open_append(path), path, max_bytes)

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

    def _write(self, line: bytes) -> None:
        try:
            os.write(self._fd, line)
        except OSError as exc:  # fail open, but say so once: the daemon keeps serving
            if not self._failing:
                self._failing = True
                log.error("audit log write failed (%s); lines are being lost", exc.strerror)
            return
        self._failing = False
        if self.max_bytes:
            self._size += len(line)  # racy between threads; approximate is enough to bound the file
            if self._size >= self.max_bytes:
                self._rotate()

    def _rotate(self) -> None:
        """<file> -> <file>.1, then a new <file> takes over the same descriptor number (dup2 is atomic)."""
        with self._rotate_lock:
            if self._size < self.max_bytes:
                return  # another thread rotated first
            try:
                os.replace(self.path, self.path + ".1")
                self._open_path()
            except OSError as exc:
                log.error("audit log rotation failed: %s", exc.strerror)
            self._size = 0

    def reopen(self) -> None:
        """The file at our path anew, on the same descriptor (SIGHUP after logrotate moved it away)."""
        with self._rotate_lock:
            try:
                self._open_path()
                self._size = os.fstat(self._fd).st_size
            except OSError as exc:
                log.error("audit log reopen failed: %s", exc.strerror)

    def _open_path(self) -> None:
        """The file at our path takes over our descriptor number (dup2 is atomic: no line is lost)."""
        fresh = _open_append(self.path)
        os.dup2(fresh, self._fd)
        os.close(fresh)

    def close(self) -> None:
        self.flush()
        if self.path:
            os.close(self._fd)


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


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
