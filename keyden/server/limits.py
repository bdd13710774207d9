"""What keeps one client (or many) from exhausting the daemon: refusals, unsent replies, descriptor room.

The limits themselves are settings (ServerConfig); docs/operations.md says
what each one bounds and what a client sees when it hits one.
"""

from __future__ import annotations

import logging
import resource
import socket

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W

log = logging.getLogger("keyden.limits")

#: bytes of replies a connection may hold before they must be written (the write blocks if the peer does not read)
MAX_UNSENT = 1024 * 1024


def refuse(sock: socket.socket, error: E.KeydenError, owner: int) -> None:
    """Tell a connection why it is being closed (a connection-level error frame: request id 0, op 0), then close it.

    Never blocks: the frame is small and the socket buffer empty, and if it
    does not fit the client just sees the close.  The close goes to a closer
    thread: it is the last close of any descriptor the client sent and we
    never read, which may linger (descriptors.release), on ``owner``'s share of the closers.
    """
    try:
        sock.send(W.encode_error(0, 0, error), socket.MSG_DONTWAIT)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    descriptors.release_socket(sock, owner)


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
