"""Who is on the other end of a Unix socket: read from the kernel, never from the client."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from keyden.core.perm import Credentials

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    start_time: int  # /proc/<pid>/stat field 22: tells a reused pid apart

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.uid, self.gid, self.groups)

    @property
    def process(self) -> tuple[int, int]:
        return (self.pid, self.start_time)


def process_start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def supplementary_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def process_alive(pid: int, start_time: int) -> bool:
    return process_start_time(pid) == start_time


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    start = process_start_time(pid)
    return Peer(pid, uid, gid, supplementary_groups(pid), start if start is not None else -1)
