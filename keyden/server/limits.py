"""What keeps one client (or many) from exhausting the daemon: refusals, unsent replies, descriptor room.

The limits themselves are settings (ServerConfig); docs/operations.md says
what each one bounds and what a client sees when it hits one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Callable

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W

log = logging.getLogger("keyden.limits")

#: bytes of replies a connection may hold before they must be written (the write blocks if the peer does not read)
MAX_UNSENT = 1024 * 1024


def refuse(sock: socket.socket, error: E.KeydenError, owner: int, then: Callable[[], None] | None = None) -> None:
    """Tell a connection why it is being closed (a connection-level error frame: request id 0, op 0), then close it.

    Never blocks: the frame is small and the socket buffer empty, and if it
    does not fit the client just sees the close.
    """
    try:
        sock.send(W.encode_error(0, 0, error), socket.MSG_DONTWAIT)
    except OSError:
        pass
    close(sock, owner, then)


def close(sock: socket.socket, owner: int, then: Callable[[], None] | None = None) -> None:
    """Close a client's connection.  Shut both ways, so that nothing more can arrive, a socket whose unread
    bytes carry no descriptor is closed here (``_carries_descriptors``), as nearly every one is.  Otherwise
    the close goes to a closer thread, on ``owner``'s share: it is the last close of the descriptors the
    client sent and we never read, which may linger (descriptors.release).  ``then`` runs once it is closed.

    (Sent to the closers, every close would count against its uid's backlog: a client closing 500
    connections at once would have its other connections refused, EMFILE, until they caught up.)"""
    try:
        sock.shutdown(socket.SHUT_RDWR)
        carries = _carries_descriptors(sock)
    except OSError:
        carries = True
    if carries:
        descriptors.release_socket(sock, owner, then)
        return
    sock.close()
    if then is not None:
        then()


def backlogged(uid: int) -> E.KeydenError:
    """Why a connection of a uid in descriptors.backlogged is refused."""
    return E.EMFILE(f"{descriptors.MAX_BACKLOG} descriptors of uid {uid} are still waiting to be closed (their "
                    "close waits on their sender: a socket set to linger, a file system's server); try again later")


MAX_PEEK = 256 * 1024  # unread bytes looked through for descriptors; past that, the socket goes to a closer


def _carries_descriptors(sock: socket.socket) -> bool:
    """Do the unread bytes of a socket shut for reading carry descriptors?  A peek reads across messages
    and stops after the first that carries some; the copies it makes are not the last (the queue holds
    the originals), so they are closed here."""
    unread = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))[0]
    if not unread:
        return False
    if unread > MAX_PEEK:
        return True
    data, ancdata, flags, _addr = sock.recvmsg(unread, descriptors.ANCILLARY_SPACE,
                                               socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    for fd in descriptors.passed(ancdata):
        os.close(fd)
    # MSG_CTRUNC: descriptors came that could not be handed over (none left: the daemon is at its limit)
    return bool(ancdata) or bool(flags & socket.MSG_CTRUNC) or len(data) < unread
