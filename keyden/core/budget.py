"""Byte budgets: how much of something each uid, and everyone together, may hold at once.

Used for shared-memory regions the daemon maps for its clients and for large
frames it is receiving: the daemon locks its memory (mlockall), so every byte
a client makes it hold is pinned daemon memory.  The loop and the worker
threads both charge and refund, so they do it under a lock.
"""

from __future__ import annotations

import threading
from collections import deque

from keyden import errors as E


class ByteBudget:
    """A per-uid and a total cap on bytes held; ``charge`` refuses with ENOMEM, ``refund`` gives bytes back.

    ENOMEM, not EDQUOT: this bounds pinned memory, and the kernel answers a
    request to pin more than the caller's allowance (mlock over
    RLIMIT_MEMLOCK, io_uring buffer registration) with ENOMEM.  EDQUOT stays
    what it is in keyrings: the key quota.
    """

    def __init__(self, per_uid: int, total: int, what: str = "bytes"):
        self.per_uid = per_uid
        self.total = total
        self.what = what
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}
        self._total = 0
        self._owed: deque[tuple[int, int]] = deque()  # refund_soon's, applied by the next call under the lock

    def charge(self, uid: int, nbytes: int) -> None:
        refused = self.try_charge(uid, nbytes)
        if refused == "uid":
            raise E.ENOMEM(f"uid {uid} would hold {self.held(uid) + nbytes} bytes of {self.what}; "
                           f"the limit per uid is {self.per_uid}")
        if refused:
            raise E.ENOMEM(f"keyden holds {self.held()} bytes of {self.what} for all users; "
                           f"{nbytes} more would pass the limit of {self.total}")

    def try_charge(self, uid: int, nbytes: int) -> str:
        """``charge`` for a caller that waits rather than fails: "" if charged, else which cap is in the
        way ("uid" or "total")."""
        with self._lock:
            self._settle()
            held = self._held.get(uid, 0)
            if held + nbytes > self.per_uid:
                return "uid"
            if self._total + nbytes > self.total:
                return "total"
            self._held[uid] = held + nbytes
            self._total += nbytes
            return ""

    def refund(self, uid: int, nbytes: int) -> None:
        with self._lock:
            self._settle()
            self._give_back(uid, nbytes)

    def refund_soon(self, uid: int, nbytes: int) -> None:
        """``refund`` for a finalizer, which the garbage collector may run on a thread that holds the lock
        already: queued without locking (deque.append is atomic), applied by the next call."""
        self._owed.append((uid, nbytes))

    def held(self, uid: int | None = None) -> int:
        """Bytes held by ``uid``, or by everyone."""
        with self._lock:
            self._settle()
            return self._total if uid is None else self._held.get(uid, 0)

    def _settle(self) -> None:
        while self._owed:
            self._give_back(*self._owed.popleft())

    def _give_back(self, uid: int, nbytes: int) -> None:
        left = self._held.get(uid, 0) - nbytes
        if left > 0:
            self._held[uid] = left
        else:
            self._held.pop(uid, None)
        self._total -= nbytes
