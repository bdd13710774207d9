"""The I/O loop: one thread serves every connection, worker threads take the slow operations.

Why one loop and not a thread per connection: CPython runs one thread's
Python at a time, and threads that each wake for one small request spend
more time handing the GIL to each other than answering.  One loop answers
whatever is ready on any socket without a hand-off, so small requests from
many clients share a core at full speed.  What would hold the loop longer
goes to a small pool of worker threads (cost.Cost): slow requests (key
generation, scrypt, TLS set-up) always; heavy and short ones (RSA private keys,
bulk ciphers: pyca releases the GIL for these) when other requests are waiting,
so they run in parallel on other cores.  Alone, such a request is answered by
the loop: handing it to a thread and back costs a wake-up on each side.  (A
short one, AES-GCM up to 2 MiB, counts only other connections as waiting: its
own connection's next requests would wait for it on a worker too.)  The fsync
that makes a persistent change durable has a thread of its own, so it never
waits behind anyone's slow requests (the journal writes one batch at a time
anyway, and each write takes every change noted before it).

Replies are queued and sent at the end of each round, right after the audit
lines of that round are written (one write for all of them).

One read may bring thousands of pipelined requests.  A connection gets a turn
of at most TURN_FRAMES requests or TURN_SECONDS of the loop (and a heavy
request runs on the loop only as the last one it has waiting; a short one need
not be): if more wait
in its decoder, it goes to the back of a run-queue, unread, and the next poll
does not block, so every other ready connection is served (and its replies
sent) before its next turn.

Turns are shared by uid, then by connection: in each round a uid's
connections take turns until it has had UID_SHARE of the loop, and the rest
of them wait on its run-queue, unread, for the next round's share.  Shared
per connection, a uid that kept 128 connections busy had 128 turns for each
one of another uid's (a ping waited 600 ms).

Per connection, requests are answered in order: while one of its requests
is with a worker, or its replies are not being read, the loop reads nothing
more from it.  That also bounds what a connection can make the daemon hold.
Large frames are received only within a byte budget per uid and in all
(``receive_maxbytes``): a frame is admitted whole, its announced size charged
once its header is in, or its connection waits, unread, until another large
request is done.  The share is held until the request is answered and its
reply written, so it also covers the frame while a worker has it and the
reply while the client does not read.  Admitted frames never wait for
budget, so they always complete; the budget bounds what senders of large
frames can pin, however many connections they open.
"""

from __future__ import annotations

import array
import collections
import errno
import logging
import os
import select
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core.budget import ByteBudget
from keyden.logs import Throttled
from keyden.server import limits
from keyden.server.connection import Connection
from keyden.server.cost import Cost

log = logging.getLogger("keyden.server")

SOCKET_BUFFER = 4 * 1024 * 1024
RECV_CHUNK = 1024 * 1024  # reads while a large frame is arriving
SMALL_RECV_CHUNK = 64 * 1024  # reads otherwise
COALESCE_BELOW = 64 * 1024  # replies smaller than this, queued together, go out in one write ...
COALESCE_MAX = 256 * 1024  # ... of at most this much
TICK = 0.25  # seconds between timeout sweeps when any timeout is set
TURN_FRAMES = 64  # requests one connection has answered in a row before the others get the loop ...
TURN_SECONDS = 0.001  # ... or loop time it has taken (checked between requests)
UID_SHARE = 0.002  # loop time one uid's connections take in a round before the rest of them wait for the next
STOP_GRACE = 5.0  # seconds a stop waits for the answers to requests already with a worker to be sent
_clock = time.monotonic

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class Channel:
    """One client socket in the loop: its Connection (the protocol), its unsent replies and its deadlines."""

    __slots__ = ("sock", "fd", "conn", "on_close", "out", "unsent", "busy", "closing", "mask", "greeted",
                 "deadline", "send_deadline", "name", "ready", "reserved", "admitted", "parked", "queued",
                 "unread", "uid")

    def __init__(self, sock: socket.socket, conn: Connection, on_close: Callable[[], None]):
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.on_close = on_close
        self.out: collections.deque[tuple[bytes | memoryview, list[int]]] = collections.deque()  # (reply, fds to pass)
        self.unsent = 0  # bytes in ``out``
        self.busy = False  # a request of ours is with a worker
        self.closing = False  # close once the replies are out (an error frame said why)
        self.mask = 0  # what epoll watches for us
        self.greeted = False
        self.deadline = 0.0  # silent until this: closed (handshake or idle timeout); 0 = none
        self.send_deadline = 0.0  # replies unread until this: dropped (send timeout); 0 = none
        self.name = f"pid {conn.peer.pid}"
        self.ready = False  # on the loop's list of channels to send for at the end of this round
        self.reserved = 0  # bytes of the receive budget held for our last large request, until it is done
        self.admitted = False  # the large frame arriving is the one ``reserved`` was charged for
        self.parked = False  # a large frame's header is in, but the budget has no room for it yet: not read
        self.queued = False  # on the run-queue: its turn ended with requests left in its decoder; not read
        self.unread = False  # on the run-queue with requests not read yet: its uid had had its share of the round
        self.uid = conn.peer.uid


class Reactor:
    """epoll over the listener and every channel; ``admit`` hands it accepted sockets."""

    def __init__(self, config, admit: Callable[[socket.socket], Channel | None], audit=None):
        self.config = config
        self._admit = admit
        self._audit = audit  # an AuditLog: its lines are held and written just before each round's replies
        if audit is not None:
            audit.hold()
        self._ready: list[Channel] = []  # channels with replies queued this round
        self._round_size = 0  # events in this round: more than one, and others wait behind a heavy or short request
        # channels whose request left the loop -> its work on a worker or the sync thread (None: waiting for
        # its uid's share of the workers)
        self._busy: dict[Channel, Future | None] = {}
        # The run-queue (see _take_turns): uid -> its channels waiting for a turn, in order; uids in turn order.
        self._runnable: dict[int, collections.deque[Channel]] = {}
        self._queued = 0  # channels on the run-queue
        self._spent: dict[int, float] = {}  # uid -> loop time this round (UID_SHARE)
        self._epoll = select.epoll()
        self._channels: dict[int, Channel] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.RLock()  # the eventfd is closed once, and never written after (_wake)
        self._epoll.register(self._wake_fd, _IN)
        self._done: collections.deque[Callable[[], None]] = collections.deque()
        workers = config.workers or max(4, 2 * (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="keyden-worker")
        self._per_uid_workers = max(1, workers // 2)  # one uid's slow requests never hold every worker
        self._working: collections.Counter[int] = collections.Counter()  # uid -> its requests with a worker
        self._waiting_work: dict[int, collections.deque] = {}  # uid -> (channel, work) over its share, in order
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="keyden-sync")  # fsyncs (_sync)
        self.abandoned = 0  # requests still running when run() returned: a stop does not wait past its grace
        self._late = threading.Lock()  # their channels' release, on their threads, once they end (_release_late)
        self._small = memoryview(bytearray(SMALL_RECV_CHUNK))
        self._large: memoryview | None = None
        self._stopping = False
        self._listener: socket.socket | None = None
        self._receiving = ByteBudget(config.receive_maxbytes, config.receive_total_maxbytes, "frames being received")
        self._parked: dict[Channel, int] = {}  # channels waiting for budget -> the size of their frame, oldest first
        self._budget_warnings = Throttled(log)
        self._accept_warnings = Throttled(log)

    # -------------------------------------------------------------- lifecycle

    def run(self, listener: socket.socket) -> None:
        """Serve until ``stop``; then send the answers to what workers hold (``_drain``) and close every channel
        but those whose request still runs after STOP_GRACE (``abandoned``: released when it ends)."""
        listener.setblocking(False)
        self._listener = listener
        self._epoll.register(listener.fileno(), _IN)
        cfg = self.config
        timed = cfg.handshake_timeout > 0 or cfg.idle_timeout > 0 or cfg.send_timeout > 0
        next_sweep = _clock() + TICK
        channels = self._channels
        poll_window = cfg.busy_poll / 1e6  # config busy_poll, in µs
        while not self._stopping:
            turns = self._queued  # channels queued before this round's events
            if self._spent:
                self._spent.clear()  # a new round: a new share for every uid
            try:
                if turns:
                    events = self._epoll.poll(0)
                elif poll_window and self._round_size and not self._busy:
                    events = self._poll_busily(poll_window, TICK if timed else -1)
                else:
                    events = self._epoll.poll(TICK if timed else -1)
            except InterruptedError:
                continue
            self._round_size = len(events)
            for fd, ev in events:
                ch = channels.get(fd)
                if ch is not None:
                    try:
                        self._event(ch, ev)
                    except Exception:  # a bug must cost one connection, not the daemon
                        log.exception("%s: internal error; closing the connection", ch.name)
                        self._close(ch)
                elif fd == self._wake_fd:
                    self._completions()
                elif self._listener is not None and fd == self._listener.fileno():
                    self._accept()
            if turns:
                if self._ready:
                    self._send_round()  # the replies just made go out before the queued turns, not after
                self._take_turns()
            if self._ready:
                self._send_round()
            elif self._audit is not None and self._audit.holding:
                self._audit.flush()
            if timed and (now := _clock()) >= next_sweep:
                next_sweep = now + TICK
                self._sweep(now)
        self._shut_down()

    def _shut_down(self) -> None:
        """(run, once stopped) Answers to what workers hold, every channel closed, the pools ended; work still
        running past the grace is left to end on its own."""
        self._runnable.clear()
        self._queued = 0
        self._drain(STOP_GRACE)
        for ch in list(self._channels.values()):
            self._close(ch)
        # Work not started is cancelled; work still running past the grace (a disk that does not answer, a
        # DH of a minute) is not waited for: it keeps its connection until the process ends.
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._syncer.shutdown(wait=False, cancel_futures=True)
        self._completions()
        for ch, work in list(self._busy.items()):
            if work is None or work.cancelled():  # never started, never to come back: what it holds goes here
                self._back(ch)
                self._release(ch)
        self._completions()  # what finished since the last look
        left = list(self._busy.items())
        self.abandoned = len(left)
        for ch, work in left:  # an embedding process goes on: each is released when it ends
            work.add_done_callback(lambda _work, ch=ch: self._release_late(ch))
        if self.abandoned:
            log.warning("stopping with %d requests still running after the %g s grace: they are not waited for, "
                        "and their clients get no answer", self.abandoned, STOP_GRACE)
        if self._audit is not None:
            self._audit.flush()
        self._epoll.close()
        with self._wake_lock:  # from now on nobody writes to the number, which may be reused at once
            fd, self._wake_fd = self._wake_fd, -1
            os.close(fd)

    def _drain(self, seconds: float) -> None:
        """After ``stop``: the requests workers already hold finish, and every reply made goes out, for up to
        ``seconds``; nothing more is read, started or accepted.

        A request under way may have made a key or changed a persistent one: its client must hear the
        answer, or it may retry and do it twice.  So a change made whose fsync is still to come gets it
        (_sync: its thread has no queue of slow work to wait behind).  Requests not started yet are not
        done, and get no answer: not those waiting for their uid's share, nor those a worker takes up
        after the stop (_start).
        """
        if self._listener is not None:
            try:
                self._epoll.unregister(self._listener.fileno())
            except (OSError, ValueError):  # not watched for a moment: out of descriptors (_admit_failed); or
                pass                       # closed already (-1: ValueError), by a shutdown from another thread
            self._listener = None
        channels = self._channels
        for ch in channels.values():
            ch.closing = True  # _serve reads no more frames; _flush closes it once its replies are out
        waiting, self._waiting_work = self._waiting_work, {}
        for queue in waiting.values():
            for ch, _work in queue:
                self._back(ch)  # never started: its channel closes unanswered
                if not self._alive(ch):  # its client left while it waited: finish the close
                    self._release(ch)
        for ch in list(channels.values()):
            if not ch.busy:
                self._flush(ch)
        deadline = _clock() + seconds
        while (channels or self._busy) and (left := deadline - _clock()) > 0:  # (a client gone, its work not)
            try:
                events = self._epoll.poll(left)
            except InterruptedError:
                continue
            for fd, ev in events:
                ch = channels.get(fd)
                if ch is not None:
                    if ev & _OUT:
                        self._flush(ch)
                    elif ev & _GONE:
                        self._close(ch)
                elif fd == self._wake_fd:
                    self._completions()
            if self._ready:
                self._send_round()

    def _event(self, ch: Channel, ev: int) -> None:
        if ev & _OUT and self._flush(ch) and not ch.busy and not ch.queued:
            self._fair_turn(ch)  # room again: answer what arrived while we waited
        if not self._alive(ch):
            return
        if ch.busy or ch.queued:  # with a worker, or waiting for its turn: read nothing more, but notice a
            if ev & _GONE and not ch.unread:  # client that left (one waiting unread is read first: it may have
                self._close(ch)               # sent whole requests, then closed)
            return
        if ev & (_IN | _GONE):
            self._fair_turn(ch, ev)

    def _fair_turn(self, ch: Channel, ev: int = 0) -> None:
        """A turn for ``ch`` now (reading first, for ``ev``), charged to its uid's share of the round; or, if
        the uid has had it or others of its channels wait, a place at the back of its run-queue.  (Alone
        in its round, with no one waiting, a turn is not timed: no other uid's turn is to be weighed.)"""
        uid, spent = ch.uid, self._spent
        if self._queued and uid in self._runnable or spent and spent.get(uid, 0.0) >= UID_SHARE:
            if ev or ch.conn.decoder.pending and not ch.closing:
                ch.unread = bool(ev)
                self._requeue(ch)
                return
        timed = self._round_size > 1 or self._queued
        started = _clock() if timed else 0.0
        if ev:
            self._readable(ch, ev)
        else:
            self._serve(ch)
        if timed:
            spent[uid] = spent.get(uid, 0.0) + _clock() - started

    def _alive(self, ch: Channel) -> bool:
        """Still in the loop?  (By identity: a closed channel's descriptor number may be reused at once.)"""
        return self._channels.get(ch.fd) is ch

    def stop(self) -> None:
        """Safe from a signal handler or another thread: the loop finishes its round and returns."""
        self._stopping = True
        self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop between rounds; safe from a signal handler or another thread."""
        self._done.append(fn)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:  # (reentrant: a signal handler may wake the loop from a thread inside it)
            if self._wake_fd < 0:  # the loop is over
                return
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _poll_busily(self, seconds: float, timeout: float) -> list[tuple[int, int]]:
        """epoll's events, looked for without sleeping for up to ``seconds``, then waited for.

        After a round with events, a client's next request often follows within tens of
        microseconds; finding the loop awake spares it the loop's wake-up, which on a VM whose idle
        vCPUs halt costs more than the request (config ``busy_poll``, docs/operations.md).  Not
        while workers hold requests: the loop would contend with them for the GIL.  Each look yields
        the CPU: a client on the same one must get to send what we wait for.
        """
        poll, deadline = self._epoll.poll, _clock() + seconds
        while True:
            events = poll(0)
            if events or _clock() >= deadline:
                return events or poll(timeout)
            os.sched_yield()

    # -------------------------------------------------------------- channels

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a burst, then back to the others
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._admit_failed(exc)
                return
            ch = self._admit(sock)
            if ch is None:
                continue
            sock.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            if self.config.handshake_timeout > 0:
                ch.deadline = _clock() + self.config.handshake_timeout
            self._channels[ch.fd] = ch
            ch.mask = _IN
            self._epoll.register(ch.fd, _IN)

    def _admit_failed(self, exc: OSError) -> None:
        """Out of descriptors: stop watching the listener for a moment rather than spin on the same error."""
        self._accept_warnings.warning("accept failed: %s", exc.strerror)
        listener = self._listener
        self._epoll.unregister(listener.fileno())

        def rearm():
            time.sleep(0.05)
            self.call_soon(watch)

        def watch():
            if self._listener is listener:  # (a stop under way no longer accepts)
                self._epoll.register(listener.fileno(), _IN)
        threading.Thread(target=rearm, daemon=True).start()

    def _readable(self, ch: Channel, ev: int) -> None:
        conn = ch.conn
        if ch.uid in descriptors.backlogged:  # what it sends now would stay with us: nothing is read
            self._refuse(ch, limits.backlogged(ch.uid))
            return
        view = self._small
        if conn.decoder.pending and (needed := conn.decoder.needed()) > SMALL_RECV_CHUNK:  # a large frame is arriving
            if not ch.admitted and not self._admit_frame(ch):
                if ev & _GONE:
                    self._close(ch)
                return
            self._large = self._large or memoryview(bytearray(RECV_CHUNK))
            view = self._large[:needed] if needed < RECV_CHUNK else self._large  # nothing past the admitted frame
        try:
            n, ancdata, _flags, _addr = ch.sock.recvmsg_into([view], descriptors.ANCILLARY_SPACE,
                                                             socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            if ev & _GONE and not ev & _IN:
                self._close(ch)
            return
        except OSError:
            self._close(ch)
            return
        fds = descriptors.passed(ancdata) if ancdata else None
        if n == 0:
            descriptors.release(fds or (), ch.uid)
            self._close(ch)
            return
        self._refresh_idle(ch)
        if n >= W.HEADER_SIZE and not fds and not conn.decoder.pending and not ch.busy:
            length, rid, op, status = W.HEADER.unpack_from(view)
            if n == W.HEADER_SIZE + length and length <= conn.max_frame:  # one whole frame: skip the decoder
                conn.fed += n
                frame = W.Frame(rid, op, status, bytes(view[W.HEADER_SIZE:n]))
                W.wipe(view, n)  # a payload, a password, a plaintext: not kept until a longer request comes
                self._serve(ch, frame)
                return
        conn.feed(view[:n], fds)
        W.wipe(view, n)
        self._serve(ch)

    def _serve(self, ch: Channel, frame: W.Frame | None = None) -> None:
        """One turn: answer ``frame`` and the frames already received, until one goes to a worker, the
        replies back up, or the turn is over (then the channel waits on the run-queue).

        Replies are queued; the end of the round sends them (after the audit lines).
        """
        conn = ch.conn
        max_in_flight = self.config.max_in_flight
        queued = handled = 0
        deadline = 0.0 if frame is not None else _clock() + TURN_SECONDS  # 0: a read's only frame (_readable)
        while not ch.busy and not ch.closing:
            try:
                if frame is None:
                    if handled >= TURN_FRAMES or not deadline or _clock() >= deadline:  # the turn is over
                        if conn.decoder.pending:
                            self._requeue(ch)  # the others' turn: the rest of ours comes after theirs
                        break
                    frame = conn.next_frame()
            except W.FrameTooLarge as exc:
                self._queue(ch, conn.refuse_oversized(exc))
                ch.closing = True
                break
            if frame is None:
                break
            ch.admitted = False  # whole: its share is held until it is answered and the reply written
            handled += 1
            cost = conn.cost(frame)
            if cost is not Cost.QUICK and (cost is Cost.SLOW  # (others wait, or only for a heavy one, its own next)
                                           or self._busy or self._round_size > 1 or self._queued
                                           or cost is Cost.HEAVY and conn.decoder.pending):
                self._submit(ch, lambda frame=frame: conn.durable(frame, conn.handle(frame), conn.unsynced,
                                                                  conn.changed))
                break
            reply = conn.handle(frame)
            if conn.needs_sync():  # a persistent keyring changed: the fsync goes to the sync thread, the reply after it
                self._sync(ch, lambda frame=frame, reply=reply, upto=conn.unsynced, changed=conn.changed:
                           conn.durable(frame, reply, upto, changed))
                break
            frame = None
            if conn.closed:
                ch.closing = True
            self._queue(ch, reply)
            queued += 1
            if queued >= max_in_flight or ch.unsent >= limits.MAX_UNSENT:
                queued = 0
                if not self._flush(ch):
                    break  # the client is not reading: neither do we (_send_round serves it again)
        if not ch.greeted and conn.context is not None:
            ch.greeted = True
            ch.deadline = _clock() + self.config.idle_timeout if self.config.idle_timeout > 0 else 0.0
        if ch.closing and not ch.ready and self._alive(ch):
            self._flush(ch)  # nothing queued: close now

    def _requeue(self, ch: Channel) -> None:
        """End ``ch``'s turn with requests still in its decoder (or, ``unread``, in its socket): it waits,
        unread, on its uid's run-queue."""
        queue = self._runnable.get(ch.uid)
        if queue is None:
            queue = self._runnable[ch.uid] = collections.deque()
        queue.append(ch)
        self._queued += 1
        if not ch.queued:  # (a turn taken from the queue keeps the flag, and epoll's mask, meanwhile)
            ch.queued = True
            if not ch.out:  # else _flush watches for room (and then for nothing while it is queued)
                self._watch(ch, 0)

    def _take_turns(self) -> None:
        """Each uid on the run-queue, in turn, has its channels take turns, in order, until it has had its
        share of the round (UID_SHARE, with what its new requests took); those not done go to the back of
        its queue again, and a uid with channels left goes to the back of the uids.

        A channel whose replies the client has not taken yet leaves the queue: it is served once they are
        written, as after any backlog (_event).
        """
        runnable, spent = self._runnable, self._spent
        for uid in list(runnable):
            queue = runnable[uid]
            for _ in range(len(queue)):  # each channel queued now at most once in this round
                if spent.get(uid, 0.0) >= UID_SHARE:
                    break
                ch = queue.popleft()
                self._queued -= 1
                unread, ch.unread = ch.unread, False
                if not self._alive(ch) or ch.busy or ch.closing or ch.out:
                    ch.queued = False  # (unread: _flush, or _watch below, watches for its requests again)
                    continue
                self._refresh_idle(ch)  # it waited on us, not the other way round
                waiting = self._queued
                started = _clock()
                try:
                    if unread:
                        self._readable(ch, _IN)
                    else:
                        self._serve(ch)  # ch.queued stays set meanwhile: a flush does not watch for input
                except Exception:  # a bug must cost one connection, not the daemon
                    ch.queued = False
                    log.exception("%s: internal error; closing the connection", ch.name)
                    self._close(ch)
                    continue
                finally:
                    spent[uid] = spent.get(uid, 0.0) + _clock() - started
                if self._queued > waiting:  # back in the queue
                    continue
                ch.queued = False
                if not ch.ready and not ch.busy and not ch.parked and self._alive(ch):
                    self._watch(ch, _IN)  # nothing for _flush to send (the rest was not a whole frame): read again
            del runnable[uid]
            if queue:
                runnable[uid] = queue  # its next share comes after the others'

    def _queue(self, ch: Channel, reply: bytes) -> None:
        ctx = ch.conn.context
        fds: list[int] = []
        if ctx is not None and ctx.out_fds:
            fds = ctx.out_fds[:]
            ctx.out_fds.clear()
        ch.out.append((reply, fds))
        ch.unsent += len(reply)
        if not ch.ready:
            ch.ready = True
            self._ready.append(ch)

    def _send_round(self) -> None:
        """The audit lines of this round, then every reply it made.

        A channel whose replies had backed up may have requests waiting in its decoder, with no event
        to come for them: once its replies are out, it is served again (and its new replies sent).
        """
        while self._ready:
            ready, self._ready = self._ready, []
            for ch in ready:
                ch.ready = False
                if (self._alive(ch) and self._flush(ch) and not ch.busy and not ch.closing and not ch.queued
                        and ch.conn.decoder.pending):
                    self._fair_turn(ch)

    def _flush(self, ch: Channel) -> bool:
        """Write what we can without blocking; True if nothing is left.  Watches for room otherwise."""
        if self._audit is not None and self._audit.holding:
            self._audit.flush()  # no reply before its audit line
        out = ch.out
        try:
            if len(out) == 1 and not out[0][1]:  # the usual case: one reply, no descriptors
                data = out[0][0]
                sent = ch.sock.send(data)
                if sent == len(data):
                    out.clear()
                    ch.unsent = 0
                else:
                    self._consume(ch, sent)
            while out:
                data, fds = out[0]
                if fds:
                    sent = _send_with_fds(ch.sock, data, fds)
                elif len(out) > 1 and len(data) < COALESCE_BELOW:  # small replies: one write for the lot
                    sent = ch.sock.send(b"".join(d for d, _fds in _small_run(out)))
                else:
                    sent = ch.sock.send(data)
                self._consume(ch, sent)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(ch)
            return False
        if out:
            if not ch.send_deadline and self.config.send_timeout > 0:
                ch.send_deadline = _clock() + self.config.send_timeout
            self._watch(ch, _OUT)
            return False
        ch.send_deadline = 0.0
        if ch.closing and not ch.busy:
            self._close(ch)
            return False
        if ch.busy:
            self._watch(ch, 0)
            return True
        if ch.reserved and not ch.admitted:  # the large request is answered and its reply written
            self._release_share(ch)
        self._watch(ch, 0 if ch.parked or ch.queued else _IN)
        return True

    def _consume(self, ch: Channel, sent: int) -> None:
        """Drop ``sent`` bytes from the front of the queue."""
        ch.unsent -= sent
        out = ch.out
        while sent:
            data, fds = out[0]
            if sent >= len(data):
                sent -= len(data)
                out.popleft()
            else:
                out[0] = (memoryview(data)[sent:], fds)
                sent = 0
        if ch.send_deadline:
            ch.send_deadline = _clock() + self.config.send_timeout  # progress: the clock restarts

    def _watch(self, ch: Channel, mask: int) -> None:
        if ch.mask != mask and self._alive(ch):
            ch.mask = mask
            self._epoll.modify(ch.fd, mask)

    # ------------------------------------------------------ receive budget

    def _admit_frame(self, ch: Channel) -> bool:
        """Charge the large frame arriving on ``ch`` to the receive budget, or park ``ch`` until there is room."""
        if ch.reserved:  # the previous large request is done (we read again only once it is answered)
            self._release_share(ch)
        size = ch.conn.decoder.frame_size()
        if not ch.parked:
            if not self._parked and self._receiving.try_charge(ch.uid, size) == "":
                ch.reserved, ch.admitted = size, True
                return True
            ch.parked = True  # behind the others that wait, or over a cap
            self._parked[ch] = size
            self._watch(ch, ch.mask & ~_IN)
            self._refresh_idle(ch)
            self._budget_warnings.warning(
                "%s: a %d-byte frame waits: large frames being received are at their limit for uid %d "
                "(%d bytes) or for all (%d bytes)", ch.name, size, ch.uid,
                self._receiving.per_uid, self._receiving.total)
            self._admit_waiting()
        return ch.admitted

    def _release_share(self, ch: Channel) -> None:
        """Give back what ``ch`` holds (its large request is done, or it is gone); admit waiting frames."""
        if ch.parked:
            ch.parked = False
            del self._parked[ch]
        if ch.reserved:
            self._receiving.refund(ch.uid, ch.reserved)
            ch.reserved, ch.admitted = 0, False
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        """Admit parked frames that now fit, oldest first.  A uid at its own cap is skipped; at the total cap
        the scan stops, so a large frame is not passed over forever by smaller ones behind it."""
        full: set[int] = set()
        for ch, size in list(self._parked.items()):
            uid = ch.uid
            if uid in full:
                continue
            refused = self._receiving.try_charge(uid, size)
            if refused == "total":
                return
            if refused:
                full.add(uid)
                continue
            ch.parked = False
            del self._parked[ch]
            ch.reserved, ch.admitted = size, True
            self._refresh_idle(ch)  # it waited on us, not the other way round
            if not ch.busy and not ch.out:  # else _flush watches for input once it may
                self._watch(ch, _IN)

    def _refresh_idle(self, ch: Channel) -> None:
        if ch.greeted and self.config.idle_timeout > 0:
            ch.deadline = _clock() + self.config.idle_timeout

    def _close(self, ch: Channel) -> None:
        if not self._alive(ch):
            return
        del self._channels[ch.fd]
        try:
            self._epoll.unregister(ch.fd)
        except OSError:
            pass
        if ch.busy:  # the worker still uses the connection: its completion finishes the close
            ch.closing = True
            return
        self._release(ch)

    def _refuse(self, ch: Channel, error: E.KeydenError) -> None:
        """Close ``ch`` (not with a worker) at once, unread, with an error frame that says why."""
        del self._channels[ch.fd]
        self._epoll.unregister(ch.fd)
        self._release(ch, error)

    def _release(self, ch: Channel, error: E.KeydenError | None = None) -> None:
        self._release_share(ch)  # not before: a worker may still hold the frame
        for _data, fds in ch.out:
            for fd in fds:
                os.close(fd)
        ch.out.clear()
        ch.conn.close()
        # Its last close frees descriptors sent and not yet read; until it is done, it counts against its uid.
        closed = lambda: self.call_soon(ch.on_close)  # noqa: E731
        if error is None:
            limits.close(ch.sock, ch.uid, then=closed)
        else:
            limits.refuse(ch.sock, error, ch.uid, then=closed)

    # ---------------------------------------------------------------- workers

    def _submit(self, ch: Channel, work: Callable[[], bytes]) -> None:
        """Hand a request to a worker; it waits for one if its uid already has its share of them."""
        self._hand_off(ch)
        uid = ch.uid
        if self._working[uid] >= self._per_uid_workers:
            self._waiting_work.setdefault(uid, collections.deque()).append((ch, work))
            return
        self._start(ch, work)

    def _start(self, ch: Channel, work: Callable[[], bytes]) -> None:
        self._working[ch.uid] += 1

        def run() -> None:
            if self._stopping:  # taken up after the stop: not done (_drain)
                self._done.append(lambda: self._not_started(ch))
            else:
                reply = self._run_here(ch, work)
                self._done.append(lambda: self._finished(ch, reply))
            self._wake()
        self._busy[ch] = self._pool.submit(run)

    def _not_started(self, ch: Channel) -> None:
        """A request a worker took up after the stop, not done: its connection closes unanswered, once the
        replies to what it did before are out (_drain flushes them as it does every channel's)."""
        self._next_work(ch.uid)
        self._back(ch)
        if not self._alive(ch):
            self._release(ch)
            return
        ch.closing = True
        self._flush(ch)

    def _sync(self, ch: Channel, durable: Callable[[], bytes]) -> None:
        """The request made its change; the fsync that makes it durable, then the reply (``durable``), go to
        the sync thread.  A stop waits for it (_drain): its client must hear that the change was made."""
        self._hand_off(ch)

        def run() -> None:
            reply = self._run_here(ch, durable)
            self._done.append(lambda: self._finished(ch, reply, held_worker=False))
            self._wake()
        self._busy[ch] = self._syncer.submit(run)

    def _release_late(self, ch: Channel) -> None:
        """A request the stop did not wait for has ended, on its thread, after the loop did: its connection
        is released now (in an embedding process, which goes on, it would be held for good)."""
        with self._late:
            self._back(ch)
            self._release(ch)

    def _hand_off(self, ch: Channel) -> None:
        """``ch``'s request leaves the loop: nothing more is read from it until its reply comes back."""
        ch.busy = True
        self._busy[ch] = None
        self._watch(ch, 0)

    def _back(self, ch: Channel) -> None:
        """``ch``'s request is back on the loop (answered, not started, or cancelled)."""
        ch.busy = False
        self._busy.pop(ch, None)

    @staticmethod
    def _run_here(ch: Channel, work: Callable[[], bytes]) -> bytes | None:
        """``work()``'s reply, or None for a failure (its connection is then closed): handle() and durable()
        turn errors into replies, so that is a bug."""
        try:
            return work()
        except BaseException:
            log.exception("%s: worker failed", ch.name)
            return None

    def _completions(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except OSError:
            pass
        while self._done:
            self._done.popleft()()

    def _next_work(self, uid: int) -> None:
        """A worker came back from one of ``uid``'s requests: start its next waiting one, if any."""
        self._working[uid] -= 1
        if not self._working[uid]:
            del self._working[uid]
        waiting = self._waiting_work.get(uid)
        while waiting:
            ch, work = waiting.popleft()
            if self._alive(ch):
                self._start(ch, work)
                break
            self._finished(ch, None, held_worker=False)  # closed while it waited: finish the close
        if not waiting:
            self._waiting_work.pop(uid, None)

    def _finished(self, ch: Channel, reply: bytes | None, held_worker: bool = True) -> None:
        """Back on the loop from a worker or the sync thread: the reply goes out (None: the connection
        closes unanswered), and the channel is served again."""
        if held_worker:
            self._next_work(ch.uid)
        self._back(ch)
        if not self._alive(ch):  # closed while the worker ran
            self._release(ch)
            return
        self._refresh_idle(ch)  # it was busy, not idle
        if reply is None:
            self._close(ch)
            return
        self._queue(ch, reply)
        if ch.conn.closed:
            ch.closing = True
        self._fair_turn(ch)  # frames that arrived meanwhile (their replies queue behind this one)

    # --------------------------------------------------------------- timeouts

    def _sweep(self, now: float) -> None:
        for ch in list(self._channels.values()):
            if ch.send_deadline and now >= ch.send_deadline:
                log.info("%s: replies unread for %g s; dropping the connection", ch.name, self.config.send_timeout)
                self._close(ch)
            elif (ch.deadline and now >= ch.deadline and not ch.busy and not ch.out and not ch.queued
                  and not (ch.parked and ch.greeted)):
                reason = (f"idle for {self.config.idle_timeout:g} s" if ch.greeted else
                          f"no HELLO within {self.config.handshake_timeout:g} s")
                self._refuse(ch, E.ETIMEDOUT(reason))


def _small_run(out):
    """The leading run of small, descriptor-free replies, up to COALESCE_MAX bytes (one write's worth)."""
    total = 0
    for data, fds in out:
        if fds or total + len(data) > COALESCE_MAX:
            break
        total += len(data)
        yield data, fds


def _send_with_fds(sock: socket.socket, data, fds: list[int]) -> int:
    """Send ``data`` with the descriptors a reply passes back; ours are closed once they are on their way
    (with the first byte: the rest of the reply, if any, goes without them)."""
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    for fd in fds:
        os.close(fd)
    fds.clear()
    return sent
