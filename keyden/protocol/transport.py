"""Where the daemon's socket is, and who is at the other end of it: what both ends agree on
(docs/protocol.md, Transport)."""

from __future__ import annotations

import os
import socket
import stat
import struct

SOCKET_ENV = "KEYDEN_SOCKET"
SYSTEM_SOCKET = "/run/keyden/keyden.sock"
#: µs: the longest either end busy-polls its socket before sleeping (daemon ``busy_poll``, client
#: ``busy_poll=``); past it, the wait is no longer short and polling only burns the CPU
MAX_BUSY_POLL = 10_000


def default_socket_path(env: dict[str, str] | None = None) -> str:
    """Where a daemon listens unless told (its --socket): $KEYDEN_SOCKET, else $XDG_RUNTIME_DIR/keyden.sock, else
    /run/keyden/keyden.sock."""
    env = os.environ if env is None else env
    if env.get(SOCKET_ENV):
        return env[SOCKET_ENV]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "keyden.sock")
    return SYSTEM_SOCKET


def client_socket_path(env: dict[str, str] | None = None, system_socket: str = SYSTEM_SOCKET) -> str:
    """Where a client looks: as the daemon, but a login session with no keyden socket of its own in
    $XDG_RUNTIME_DIR uses the system daemon's, if there is one (as a login shell talks to a system
    service).  With neither, the session's path: the error names where the user's daemon would be."""
    env = os.environ if env is None else env
    path = default_socket_path(env)
    if not env.get(SOCKET_ENV) and path != system_socket and not os.path.exists(path) and _is_socket(system_socket):
        return system_socket
    return path


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


_UCRED = struct.Struct("3i")  # struct ucred


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel recorded them when
    it connected (SO_PEERCRED): OSError if the socket cannot say."""
    return _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
