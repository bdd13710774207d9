"""Process keyrings go when their process exits, not at the next garbage-collection sweep.

The kernel puts a process's thread and process keyrings as it exits
(exit_keys) and collects what only they held at once.  keyden hears of the
exit from a pidfd, which Linux makes readable the moment the process exits
(a zombie its parent has not reaped yet has exited).  A socket cannot tell:
a process may close its last connection and live on, to connect again, and
its exit closes its sockets before it is gone.

The design: one thread, ``ExitWatcher``, sleeps in epoll on an eventfd and on
the pidfds of the processes that have a process keyring.  The store says so
when it makes one (``KeyStore.on_process_keyring``, called with the store's
lock held): ``watch`` only notes the process and wakes the thread, which opens
the pidfd (``peer.open_pidfd`` checks the process is still the one of that
pid and start time, so a reused pid is never watched in its place; one that
has exited already is collected at once).  When a pidfd turns readable the
thread closes it and calls ``on_exit(process)``: the server's collection of
that process's keyrings (``KeyStore.collect_process``, then the journal
flushed, as after a sweep).

Why a thread of its own and not the reactor's epoll: a collection may end in
an fsync (a key the process keyring held was also linked under a persistent
keyring), which must never stop the loop that answers every client; the loop
stays as it is, and this thread costs nothing while no watched process exits.

Bounds: one pidfd per live process that made a process keyring (a process
that never had one is never watched), closed when it exits, however many
connections it opened; at most ``limit`` at once (the server gives
max_connections and counts them in the descriptors it asks for), and at most
``per_uid`` of one uid's (max_connections_per_uid: a uid whose idle processes
held every slot had other uids' process keyrings outlive their processes, and
count against their quota, until the next sweep).  A process
not watched (over the limit, a pidfd refused, a kernel without pidfd_open:
Linux < 5.3) is left to the periodic sweep, which stays as the backstop.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from collections import Counter
from typing import Callable

from keyden.logs import Throttled
from keyden.server import peer

log = logging.getLogger("keyden.server")

Process = tuple[int, int]  # (pid, start time), as Peer.process names it


class ExitWatcher:
    def __init__(self, on_exit: Callable[[Process], None], limit: int, per_uid: int | None = None):
        self._on_exit = on_exit  # called on the watcher's thread, once per exit seen
        self._limit = limit
        self._per_uid = limit if per_uid is None else per_uid
        self._lock = threading.Lock()  # guards _pending and _closed, and with them the wake eventfd's life
        self._pending: dict[Process, int] = {}  # made a process keyring (-> its uid); not looked at yet
        self._closed = False
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        # Only the watcher's thread touches these.
        self._pidfds: dict[int, tuple[Process, int]] = {}  # pidfd -> the process it watches, and its uid
        self._watched: set[Process] = set()
        self._of_uid: Counter[int] = Counter()  # uid -> its processes watched
        self._refusals = Throttled(log)
        self._supported = hasattr(os, "pidfd_open")
        if not self._supported:
            log.warning("no pidfd_open here: process keyrings are collected at the next sweep after their "
                        "process exits, not at once")
        self._thread = threading.Thread(target=self._run, name="keyden-exits", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, process: Process, uid: int) -> None:
        """``process`` has a process keyring: collect it when the process exits.  From any thread, and
        cheap: the store calls this with its lock held."""
        with self._lock:
            if self._closed or process in self._pending:
                return
            self._pending[process] = uid
            os.eventfd_write(self._wake_fd, 1)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop watching (the periodic sweep, or nothing at shutdown, collects what is left); idempotent.
        False if the thread is still in a collection after ``timeout`` seconds (its write to a disk that does
        not answer, say).  The thread closes the descriptors on its way out, whenever that is."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.eventfd_write(self._wake_fd, 1)  # (the thread, which closes it, sees _closed first)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _close_descriptors(self) -> None:
        for fd in self._pidfds:
            os.close(fd)
        self._pidfds.clear()
        self._watched.clear()
        self._epoll.close()
        os.close(self._wake_fd)

    # ------------------------------------------------------- the thread

    def _run(self) -> None:
        try:
            self._watch()
        finally:
            with self._lock:
                self._closed = True  # (a stop from now on writes to no descriptor)
                self._close_descriptors()

    def _watch(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            exited: dict[Process, None] = {}  # in order, each once
            for fd, _ev in events:
                if fd == self._wake_fd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    continue
                entry = self._pidfds.pop(fd, None)
                if entry is not None:
                    process, uid = entry
                    self._epoll.unregister(fd)
                    os.close(fd)
                    self._watched.discard(process)
                    self._of_uid[uid] -= 1
                    if not self._of_uid[uid]:
                        del self._of_uid[uid]
                    exited[process] = None
            with self._lock:
                if self._closed:
                    return
                pending, self._pending = self._pending, {}
            for process, uid in pending.items():
                # Already watched: its exit is still to come, and will collect this keyring too.
                if process not in self._watched and not self._begin_watching(process, uid):
                    exited[process] = None
            for process in exited:
                try:
                    self._on_exit(process)
                except Exception:  # a bug must not end the watching
                    log.exception("collecting the keyrings of pid %d failed", process[0])

    def _begin_watching(self, process: Process, uid: int) -> bool:
        """Watch ``process`` of ``uid``; False if it has exited already (its keyrings go now)."""
        if not self._supported:
            return True
        if len(self._pidfds) >= self._limit or self._of_uid[uid] >= self._per_uid:
            self._refusals.warning("%d processes with process keyrings are watched already (%d of uid %d): pid "
                                   "%d's goes at the next sweep after it exits", len(self._pidfds),
                                   self._of_uid[uid], uid, process[0])
            return True
        try:
            pidfd = peer.open_pidfd(process)
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                self._supported = False
                log.warning("the kernel lacks pidfd_open (Linux < 5.3): process keyrings are collected at "
                            "the next sweep after their process exits, not at once")
            else:
                self._refusals.warning("cannot watch pid %d for its exit (%s): its process keyring goes at the "
                                       "next sweep after it exits", process[0], exc.strerror or exc)
            return True
        if pidfd is None:
            return False
        self._pidfds[pidfd] = (process, uid)
        self._watched.add(process)
        self._of_uid[uid] += 1
        self._epoll.register(pidfd, select.EPOLLIN)
        return True
