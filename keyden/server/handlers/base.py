"""What every handler module shares: the request's context, the opcode table they register in, and the
mapping of wire key flags to the store's."""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core import flags as F
from keyden.core.key import Caller
from keyden.core.store import KeyStore
from keyden.protocol import DEFAULT_MAX_FRAME, Op

MAX_PENDING_FDS = 4  # descriptor messages waiting for the requests that take them
#: stream and region handles, daemon-wide, from a random start (next() on a count is atomic in CPython)
_HANDLES = itertools.count(int.from_bytes(os.urandom(4), "little"))

log = logging.getLogger("keyden.handlers")


class DescriptorQueue(list):
    """Descriptors received on one connection, one entry per SCM_RIGHTS message, oldest first:
    (where in the byte stream the read that brought them ended, the descriptors).

    A message rides on the first byte of the request that carries it, and a read stops after one
    message, so its request starts inside that read: once a request ending at or past that point has
    been answered without taking them, nobody will (``release_through``).  The connection holds its
    queue from its first byte, so descriptors sent behind HELLO wait for it.  Those it closes go to the
    closers on ``owner``'s share (the peer's uid).
    """

    def __init__(self, owner: int = descriptors.NOBODY):
        super().__init__()
        self.owner = owner

    def add(self, fds: list[int], read_end: int) -> None:
        """One message's descriptors: its first is kept (a request takes one), up to a few messages waiting;
        the rest are closed at once."""
        if len(self) < MAX_PENDING_FDS:
            self.append((read_end, [fds[0]]))
            _close_all(fds[1:], self.owner)
        else:
            _close_all(fds, self.owner)

    def take(self, what: str) -> int:
        """The descriptor a request carries (SHM_ATTACH, TLS_*): the first of the oldest message, whose
        others are closed (one descriptor per request).  Taken before the request is checked, so a refused
        request never leaves its descriptor to the next one.  EBADF if none came."""
        if not self:
            raise E.EBADF(f"send {what} with this request (SCM_RIGHTS)")
        _read_end, (first, *extra) = self.pop(0)
        _close_all(extra, self.owner)
        return first

    def release_through(self, offset: int) -> None:
        """A request ending at byte ``offset`` was answered: messages no later request can own are closed
        (one sent with a request that takes none, or refused before its handler ran)."""
        while self and self[0][0] <= offset:
            _close_all(self.pop(0)[1], self.owner)

    def close(self) -> None:
        for _read_end, message in self:
            _close_all(message, self.owner)
        self.clear()


@dataclass
class Context:
    """One connection's view: the store, who is calling, and what the connection holds open."""

    store: KeyStore
    caller: Caller
    pid: int
    streams: dict[int, Any] = field(default_factory=dict)
    regions: dict[int, Any] = field(default_factory=dict)
    fds: DescriptorQueue = field(default_factory=DescriptorQueue)  # the connection's
    out_fds: list[int] = field(default_factory=list)  # to pass back with the next reply (SCM_RIGHTS); sent, then closed
    max_frame: int = DEFAULT_MAX_FRAME  # the daemon's frame cap, announced in HELLO: it bounds replies too
    audit: Any = None  # the connection's ConnectionAudit: outcomes that come later (a TLS handshake) are logged
    after_audit: list[Callable[[], None]] = field(default_factory=list)  # run once the request's line is written
    audit_keys: list[int] | None = None  # the request's keys when its fields do not name them (a stream's)

    def new_handle(self) -> int:
        """A stream or region handle no other connection has had since the daemon started, and unlikely
        to match one from before a restart: a client that reconnects and uses a stale handle gets EBADF,
        never someone else's stream."""
        return next(_HANDLES) % 0xFFFF_FFFF + 1  # a u32 on the wire, never 0

    def _close_region(self, handle: int, region) -> None:
        try:
            region.close()
        except Exception as exc:  # the type only: nothing from a region's contents reaches the log
            log.error("pid %d: releasing shared region %d failed (%s)", self.pid, handle, type(exc).__name__)

    def close(self) -> None:
        """The connection ended: drop streams, unmap regions, close fds.

        Each part is released even if another fails: a region left behind
        would stay mapped and charged to its uid's shared-memory budget.
        """
        self.streams.clear()
        regions, self.regions = self.regions, {}
        for handle, region in regions.items():  # unmapped on a closer thread: see Region.close
            descriptors.release_with(functools.partial(self._close_region, handle, region), self.caller.uid)
        self.fds.close()
        _close_all(self.out_fds, self.caller.uid)  # ours (socketpair ends): their close never waits, all the same
        self.out_fds.clear()


def _close_all(fds: list[int], owner: int) -> None:
    """Descriptors a client sent: closed off the loop, whose close could wait as long as the sender likes
    (keyden.descriptors)."""
    descriptors.release(fds, owner)


#: Each wire key flag (protocol) and the store's bit for it, mapped in this one place so that neither side
#: can change its numbering under the other.
_KEY_FLAGS = {W.NO_EXPORT: F.NO_EXPORT, **{W.KEY_USES[use]: F.ASYMMETRIC_USE[use] for use in W.KEY_USES}}
_KNOWN_KEY_FLAGS = sum(_KEY_FLAGS)


def store_key_flags(wire: int) -> int:
    """A request's key flags (protocol.NO_EXPORT, protocol.KEY_USES) as the store's."""
    if wire & ~_KNOWN_KEY_FLAGS:
        raise E.EINVAL("unknown key flags")
    return sum(bit for flag, bit in _KEY_FLAGS.items() if wire & flag)


Handler = Callable[..., tuple]
HANDLERS: dict[Op, Handler] = {}


def handles(op: Op) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[op] = fn
        return fn
    return register
