"""The record layer: every TLS session of the daemon, driven by a few event-loop threads.

A session is the peer's connection wrapped in a non-blocking SSLSocket and
the daemon's end of a socketpair whose other end the application holds.
After its first handshake step (on the request's thread) both are touched
only by the one loop thread that owns the session, and nothing ever
blocks, so a slow or hostile peer costs only its own buffers and a
handshake that does not finish in time is abandoned.

The first bytes on the plaintext side are one protocol frame: a
TLS_ESTABLISHED response with what was negotiated, or an error frame (and
then the socket closes).  After it, plaintext flows both ways.  The peer's
close_notify (or TCP end: TLS_PEER_END tells which) reaches the application
as end-of-file on its write side (after close_notify it may still answer); the application's
end-of-file, once its data is sent, ends the session with a close_notify
(after a TLS_ABORT naming its plaintext socket: without one).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections import Counter, deque
from typing import Callable

from cryptography import x509

from keyden import descriptors
from keyden import errors as E
from keyden.hosts import host_of
from keyden import protocol as W
from keyden.crypto.x509 import subject_of
from keyden.protocol import TLS_PEER_CLOSE_NOTIFY, TLS_PEER_OPEN, TLS_PEER_TRUNCATED, Op
from keyden.protocol.transport import peer_credentials
from keyden.tls.fair import FairMap
from keyden.tls.transport import TlsTransport

log = logging.getLogger("keyden.tls")

LOOP_THREADS = max(1, min(4, os.cpu_count() or 1))
MAX_SESSIONS_PER_UID = 1024
MAX_SESSIONS = 2048  # all uids together: two descriptors each, within the daemon's descriptor limit
# Server-side handshakes still running, which anyone who can reach the application's port can start and
# stall: at most this many on one port of one uid, and this many of those from one peer (an IPv4
# address, an IPv6 /64).  Past them, EAGAIN: one host's flood cannot take the uid's (or everyone's) sessions.
MAX_HANDSHAKES_PER_SERVICE = 256
MAX_HANDSHAKES_PER_PEER = 32
BUFFER = 64 * 1024  # per direction and session
WRITE_CHUNK = 64 * 1024  # plaintext handed to one SSL_write
PLAIN_SOCKET_BUFFER = 256 << 10
MAX_REPORTED_CERT = 64 * 1024  # a larger peer certificate is not repeated in TLS_ESTABLISHED
CLOSE_GRACE = 5.0  # seconds to get our close_notify out before closing anyway
DRAIN_TIMEOUT = 30.0  # the application is gone: seconds its data may wait for a peer that reads nothing
STALE_DEADLINES = 64  # deadlines no longer due (replaced, or their session closed) a loop keeps at most ...
#                       beyond one per descriptor watched (Loop.at)
MAX_ENDED_REMEMBERED = 4096  # ended sessions whose peer's end TLS_PEER_END can still tell (all uids together)
UID_SHARE = 0.002  # a loop's time one uid's sessions take in a round before the rest of them wait for the next
#: Reads and writes (a record read or written, a read of the application's socket) one step of a session
#: makes at most; then it waits for the loop's next round (Loop.again).  A peer that kept its socket full of
#: 1-byte records, to an application that read them all, held one step, so its loop and every session on
#: it, every uid's, for as long as it went on (a remote-peer hunt).  64 records of 16 KiB are 1 MiB.
STEP_CALLS = 64

READ, WRITE = "read", "write"
#: the alerts (OpenSSL's reason names) that say the peer refused a certificate, ours or its trust in it
_CERTIFICATE_ALERTS = ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED", "BAD_CERT")

#: Called after the handshake with the peer's verified chain (DER, leaf first); raises to refuse it.
ChainCheck = Callable[[list[bytes]], None]


def failure(exc: OSError) -> E.KeydenError:
    """A handshake's failure as the errno the application sees, with OpenSSL's reason (never secrets)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        expired = exc.verify_code in (9, 10)  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED
        return (E.EKEYEXPIRED if expired else E.EKEYREJECTED)(f"peer certificate refused: {exc.verify_message}")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return E.ECONNRESET("the peer closed the connection during the TLS handshake")
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or _plain(exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else "") \
            or "unknown reason"
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return E.ENOKEY("the peer sent no certificate, and one is required")
        if reason == "CALLBACK_FAILED":  # (the server's SNI callback: contexts.by_sni, or Python's own before it)
            return E.EPROTO("TLS handshake failed: the client's SNI was refused (not a host name, or not ASCII)")
        code = reason.upper().replace(" ", "_")  # OpenSSL's code, or its text ("tlsv1 alert no application ...")
        if "ALERT" in code and any(word in code for word in _CERTIFICATE_ALERTS):
            return E.EKEYREJECTED(f"the peer refused our certificate: {reason}")
        if "ALERT" in code:  # no shared version, cipher or protocol, ...
            return E.EPROTO(f"the peer refused the TLS handshake: {reason}")
        return E.EPROTO(f"TLS handshake failed: {reason}")
    return E.ECONNRESET(f"the peer connection failed during the TLS handshake: {exc.strerror or exc}")


def _plain(text: str) -> str:
    """Python's wording of an OpenSSL error without its wrapping: "[SSL] tlsv1 alert ... (_ssl.c:1006)"."""
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    head, paren, tail = text.rpartition(" (_ssl.c:")
    return head if paren and tail.endswith(")") else text


def _sni(server_hostname: str | None) -> str:
    """The server name a client sent: none for an IP address (RFC 6066 allows host names only)."""
    if not server_hostname:
        return ""
    try:
        ipaddress.ip_address(server_hostname)
    except ValueError:
        return server_hostname
    return ""


def negotiated(tls: TlsTransport) -> tuple:
    """TLS_ESTABLISHED's fields: version, cipher, server name, ALPN, peer subject, peer certificate."""
    der = tls.getpeercert(binary_form=True) or b""
    try:
        subject = subject_of(x509.load_der_x509_certificate(der)) if der else ""
    except ValueError:  # an encoding OpenSSL took and pyca does not (the chain check refuses those first)
        subject = ""
    name = getattr(tls, "requested_name", "") or ("" if tls.server_side else _sni(tls.server_hostname))
    return (tls.version() or "", tls.cipher()[0], name, tls.selected_alpn_protocol() or "", subject,
            der if len(der) <= MAX_REPORTED_CERT else b"")


def verified_chain(tls: TlsTransport) -> list[bytes]:
    """The peer's chain as OpenSSL verified it, leaf first; empty when the peer sent no certificate.

    A resumed session was not verified again and has no chain: then just the leaf it remembers.
    """
    chain = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in (tls.get_verified_chain() or ())]
    leaf = tls.getpeercert(binary_form=True)
    return chain or ([leaf] if leaf else [])


class EndedSessions:
    """How the peers of the last MAX_ENDED_REMEMBERED established sessions ended, by their plaintext
    socket's identity, for TLS_PEER_END after the session is gone.

    Past the limit the oldest record of the uid holding the most goes first (FairMap): a uid that ends
    sessions by the thousand forgets its own once it holds more than any other, and can push another's
    out only down to an equal share.  (Not thread-safe: the engine's lock guards it.)
    """

    def __init__(self, limit: int = MAX_ENDED_REMEMBERED):
        self._peer_end = FairMap(limit)  # identity -> how its peer ended, held by the session's uid

    def remember(self, uid: int, identity: tuple[int, int], peer_end: int) -> None:
        self._peer_end.put(uid, identity, peer_end)  # (an identity reused: the newest record stands, and goes last)

    def get(self, identity: tuple[int, int]) -> int | None:
        """How the peer ended (TLS_PEER_*), or None if that was never known or is forgotten."""
        return self._peer_end.get(identity)

    def __len__(self) -> int:
        return len(self._peer_end)


class Engine:
    """The loop threads (started on first use) and a per-uid count of live sessions."""

    def __init__(self, threads: int = LOOP_THREADS):
        self.threads = threads
        self._loops: list[Loop] = []
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._per_uid: Counter[int] = Counter()
        self._handshaking: Counter[tuple] = Counter()  # (uid, listening address[, peer address]) -> running
        # the application's plaintext end (its socket's inode) -> its session, while the session lives: a
        # request that passes that socket back names the session (TLS_ABORT); holding the socket is the right
        self._by_app_end: dict[tuple[int, int], Session] = {}
        # how the peer ended, for sessions that ended while the application may still hold its socket
        self._ended = EndedSessions()

    def _start(self) -> None:  # (two descriptors per session: the server raised the descriptor limit for them)
        self._loops = [Loop(f"keyden-tls-{i}") for i in range(self.threads)]

    def start(self, uid: int, tls: TlsTransport, timeout: float, check: ChainCheck,
              report: Callable[[int], None] = lambda status: None, explicit_close: bool = False) -> socket.socket:
        """Run a session on ``tls`` (handshake not begun); return the application's plaintext end.

        ``report`` hears the handshake's outcome once, on the session's thread: 0, or the errno the
        application is told (for the audit log).  ``explicit_close``: close_notify only after
        ``close_notify`` (TLS_EXPLICIT_CLOSE)."""
        handshake = _handshake_slots(uid, tls)
        with self._lock:
            if not self._loops:
                self._start()
            if self._per_uid[uid] >= MAX_SESSIONS_PER_UID:
                raise E.EMFILE(f"at most {MAX_SESSIONS_PER_UID} TLS sessions per user")
            if sum(self._per_uid.values()) >= MAX_SESSIONS:
                raise E.ENFILE(f"keyden runs its limit of {MAX_SESSIONS} TLS sessions")
            for slot, most in zip(handshake, (MAX_HANDSHAKES_PER_SERVICE, MAX_HANDSHAKES_PER_PEER)):
                if self._handshaking[slot] >= most:
                    raise E.EAGAIN(f"{most} TLS handshakes are already running "
                                   f"{'on ' + _address(slot[1]) if len(slot) == 2 else 'from ' + slot[2]}; "
                                   "try again later")
            self._per_uid[uid] += 1
            self._handshaking.update(handshake)
            loop = self._loops[next(self._turn) % len(self._loops)]

        def handshake_over(status: int) -> None:  # the outcome is told once, whatever it is
            self._release_handshake(handshake)
            report(status)
        app = mine = session = app_end = None
        try:
            try:
                app, mine = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            except OSError as exc:
                raise E.EMFILE(f"cannot make a socketpair: {exc.strerror}") from None
            for end in (app, mine):  # a Unix stream socket's send buffer bounds what is in flight
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PLAIN_SOCKET_BUFFER)
            mine.setblocking(False)
            # Only now, with nothing left to refuse the session, the peer's socket (whose open file
            # description the application shares) becomes ours to drive: non-blocking, and no Nagle
            # (records go out whole already; Nagle would only delay the last).
            tls.setblocking(False)
            if tls.family != socket.AF_UNIX and tls.proto in (0, socket.IPPROTO_TCP):
                tls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            app_end = _identity(app)
            session = Session(loop, uid, tls, mine, timeout, check, lambda: self._release(uid, app_end, session),
                              handshake_over, explicit_close)
            with self._lock:
                self._by_app_end[app_end] = session
            session.start()
        except BaseException:  # nothing counted may stay counted: a session never started ends here
            if session is None or not session.closed:
                if session is None or session.report is not None:  # else its end was told, and its slots went
                    self._release_handshake(handshake)
                if session is not None:
                    session.report = None  # its outcome is this exception, told by the caller
                self._release(uid, app_end)  # (never established: nothing to remember)
                for end in (app, mine):
                    if end is not None:
                        end.close()
            raise
        return app

    def abort(self, app_end: socket.socket) -> None:
        """End without close_notify the session whose plaintext socket ``app_end`` is (passed back by its
        holder; Session.abort, docs/tls.md).  A session that has already ended is left so."""
        session, _ended = self._named_by(app_end)
        if session is not None:
            session.abort(app_end)

    def close_notify(self, app_end: socket.socket) -> None:
        """End with close_notify the session whose plaintext socket ``app_end`` is (Session.close_notify).  A
        session that has already ended is left so."""
        session, _ended = self._named_by(app_end)
        if session is not None:
            session.close_notify(app_end)

    def peer_end(self, app_end: socket.socket) -> int:
        """How the peer of the session whose plaintext socket ``app_end`` is ended (TLS_PEER_*), while the
        session lives and, once it has ended, while it is remembered (EndedSessions); ENOENT if one so long
        gone that it was forgotten."""
        session, ended = self._named_by(app_end)
        if session is not None:
            return session.peer_end
        if ended is None:
            raise E.ENOENT("keyden no longer knows how this TLS session's peer ended (it keeps that for the last "
                           f"{MAX_ENDED_REMEMBERED} established sessions that ended, the uid holding the most "
                           "forgetting its own first)")
        return ended

    def _named_by(self, app_end: socket.socket) -> tuple["Session | None", int | None]:
        """The live session a plaintext socket passed back names, or (None, its remembered peer end, or None
        if forgotten) for one that has ended; EBADF for a socket that was never a session's."""
        identity = _identity(app_end)
        with self._lock:
            session = self._by_app_end.get(identity)
            ended = self._ended.get(identity)
        # An ended session is told by its record as soon as it has one (its end of the socketpair may still
        # be on its way to the closer: waiting for the hang-up answered EBADF, and tls-proxy then took a
        # truncated upload for a whole one), else by the hang-up (a record forgotten).
        if session is None and not (_ours(app_end) and (ended is not None or _hung_up(app_end))):
            raise E.EBADF("not the plaintext socket of a TLS session keyden runs")
        return session, ended

    def stop(self, timeout: float = 2.0) -> None:
        """At the daemon's stop: every loop ends the handshakes it runs (within its MAX_SLEEP) and returns."""
        with self._lock:
            loops = list(self._loops)
        for loop in loops:
            loop.stopping = True
        for loop in loops:
            loop.stopped.wait(timeout)

    def _release(self, uid: int, app_end: tuple[int, int] | None, session: "Session | None" = None) -> None:
        with self._lock:
            self._by_app_end.pop(app_end, None)
            if session is not None and session.established:  # (asked after the end: still told)
                self._ended.remember(uid, app_end, session.peer_end)
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    def _release_handshake(self, slots: tuple[tuple, ...]) -> None:
        with self._lock:
            self._handshaking.subtract(slots)
            for slot in slots:
                if self._handshaking[slot] <= 0:
                    del self._handshaking[slot]


def _ours(sock: socket.socket) -> bool:
    """Is ``sock`` the application's end of one of this daemon's socketpairs (its peer credentials are
    ours, for good)?  Its identity is then unique while the application holds it."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        return False
    return peer_credentials(sock)[0] == os.getpid()


def _identity(sock: socket.socket) -> tuple[int, int]:
    """A socket's identity while it is open: its inode, unique among the live ones (and its device, sockfs's,
    so that another kind of file cannot pass for it)."""
    stat = os.fstat(sock.fileno())
    return stat.st_dev, stat.st_ino


def _handshake_slots(uid: int, tls: TlsTransport) -> tuple[tuple, ...]:
    """What a server-side handshake on ``tls`` counts against: its uid's service (a TCP port, whichever
    local address the peer reached it by; a Unix socket's path), and that with the peer (an IPv4
    address, an IPv6 /64: one host's share; a Unix socket's peers have none).  A client-side one, which
    the application itself starts, counts against nothing here."""
    if not tls.server_side:
        return ()
    try:
        local, peer = tls.getsockname(), tls.getpeername()
    except OSError:
        return ()
    if not isinstance(local, tuple):
        return ((uid, local),)
    service = (uid, local[1])
    return (service, (*service, host_of(peer[0])))


def _address(service) -> str:
    return f"port {service}" if isinstance(service, int) else repr(service)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def engine() -> Engine:
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
        return _engine


def stop() -> None:
    """At the daemon's stop: the running engine ends its handshakes (see Engine.stop).  A later ``engine()``,
    for another server in this process, starts a new one rather than hand sessions to stopped loops."""
    global _engine
    with _engine_lock:
        running, _engine = _engine, None
    if running is not None:
        running.stop()


class Loop:
    """One thread's epoll loop.

    Sessions register their own descriptors, from any thread (epoll_ctl is thread-safe), so a new
    session costs the loop no wake-up of its own: its first event is the peer's.  Deadlines are a
    heap the loop thread alone touches; new sessions' deadlines arrive through a deque and are
    adopted within MAX_SLEEP.

    The loop is shared by uid: in each round a uid's sessions step until it has had UID_SHARE of the
    loop, and its other ready ones wait for the next round (epoll reports them again), first in line
    for its share.  Stepped as they came, a uid starting handshakes with an RSA-4096 key (6 ms of
    signing each) held another uid's established session 120-230 ms a round trip (a fairness hunt).
    """

    MAX_SLEEP = 0.25

    def __init__(self, name: str):
        self.epoll = select.epoll()
        self.owners: dict[int, Session] = {}
        self.deadlines: list[tuple[float, int, Session]] = []
        self.arrivals: deque[Session] = deque()
        self._order = itertools.count()
        self.calls: deque[Callable[[], None]] = deque()  # call_soon's, run on the loop's thread
        self.waiting: list[int] = []  # descriptors ready last round whose uid had had its share, in order
        self.again: dict[Session, None] = {}  # sessions whose step stopped at STEP_CALLS, in order: stepped
        #                                       next round whatever epoll says (what they have left may be
        #                                       records already read, which make the socket ready no more)
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.Lock()  # (no call_soon writes to the eventfd once the loop has closed it)
        self.epoll.register(self._wake, select.EPOLLIN)
        self.stopping = False  # set by Engine.stop: end the handshakes still running, then return
        self.stopped = threading.Event()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop's thread, at once: from any thread."""
        with self._wake_lock:
            if self.stopped.is_set():  # the daemon is stopping: its sessions end with the process
                return
            self.calls.append(fn)
            os.eventfd_write(self._wake, 1)

    def register(self, fd: int, session: "Session", mask: int) -> None:
        self.epoll.register(fd, mask)
        self.owners[fd] = session  # not before: a register that fails (ENOSPC) must leave no owner behind

    def modify(self, fd: int, mask: int) -> None:
        self.epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.owners.pop(fd, None)
        self.epoll.unregister(fd)

    def at(self, when: float, session: "Session") -> None:
        """Call ``session.deadline_passed(when)`` once ``when`` has come.  Loop thread only.

        A deadline replaced, or a session closed, leaves its entry behind until its time comes (up to
        DRAIN_TIMEOUT or a handshake's timeout): past a few more entries than there are descriptors
        watched, the heap is rebuilt from the entries still due, so it holds no more closed sessions
        than that however many end meanwhile."""
        if len(self.deadlines) > STALE_DEADLINES + len(self.owners):
            self.deadlines = [entry for entry in self.deadlines
                              if not entry[2].closed and entry[2].deadline == entry[0]]
            heapq.heapify(self.deadlines)
        heapq.heappush(self.deadlines, (when, next(self._order), session))

    def _run(self) -> None:
        while not self.stopping:
            while self.arrivals:
                session = self.arrivals.popleft()
                if session.deadline is not None:  # else already through its handshake
                    self.at(session.deadline, session)
            now = time.monotonic()
            while self.deadlines and self.deadlines[0][0] <= now:
                when, _, session = heapq.heappop(self.deadlines)
                self._call(session.deadline_passed, when)
            wait = min(self.MAX_SLEEP, self.deadlines[0][0] - now) if self.deadlines else self.MAX_SLEEP
            # Room for every descriptor watched (and some registered meanwhile): a waiting one not reported
            # is taken for no longer ready, so a poll's default cap (1023) left some unstepped (review).
            busy = self.waiting or self.again
            self._round(self.epoll.poll(max(wait, 0.0) if not busy else 0.0, len(self.owners) + 64))
        # The daemon is stopping: a handshake still running is told so (its application and the audit log
        # hear an outcome); established sessions end with the process.
        for session in set(self.owners.values()):
            if not session.established and not session.closed:
                self._call(session._fail, E.ECONNRESET("keyden is stopping"))
        with self._wake_lock:
            self.stopped.set()
            os.close(self._wake)
        self.epoll.close()

    def _round(self, events: list[tuple[int, int]]) -> None:
        """Step the sessions ready, each uid's until it has had its share; the rest wait for the next round,
        ahead of those that were not waiting."""
        ready = dict(events)
        waited = [(fd, ready.pop(fd)) for fd in self.waiting if fd in ready]  # (gone, if no longer ready)
        self.waiting = []
        again, self.again = self.again, {}
        spent: Counter[int] = Counter()
        for fd, events in itertools.chain(waited, ((-1, session) for session in again), ready.items()):
            if fd == self._wake:
                self._run_calls()
                continue
            session = events if fd == -1 else self.owners.get(fd)  # (-1: a session stepped again, unasked)
            if session is None or session.closed:
                continue
            if spent[session.owner] >= UID_SHARE:
                if fd == -1:
                    self.again[session] = None
                else:
                    self.waiting.append(fd)
                continue
            started = time.monotonic()
            self._call(session.step, fd, 0 if fd == -1 else events)
            spent[session.owner] += time.monotonic() - started

    def _run_calls(self) -> None:
        try:
            os.eventfd_read(self._wake)  # first: a call queued after this wakes the loop again
        except BlockingIOError:
            pass
        while self.calls:
            self._call(self.calls.popleft())

    @staticmethod
    def _call(fn, *args) -> None:
        """Run a session's callback; a bug in one session must not stop the loop that runs the others."""
        try:
            fn(*args)
        except Exception:
            log.exception("TLS session failed")


class Session:
    """One TLS connection and its plaintext twin.

    ``start`` runs on the thread that made the session; once it has registered the socket and handed
    over the deadline, only the loop's thread touches the session.
    """

    def __init__(self, loop: Loop, owner: int, tls: TlsTransport, plain: socket.socket, timeout: float,
                 check: ChainCheck, on_close: Callable[[], None], report: Callable[[int], None] = lambda status: None,
                 explicit_close: bool = False):
        self.loop = loop
        self.owner = owner  # the uid whose session it is: its descriptors go to the closers on its share
        self.report = report  # the handshake's outcome, once (then None)
        self.tls = tls
        self.plain = plain
        self.timeout = timeout
        self.deadline: float | None = time.monotonic() + timeout  # the handshake's, then close_notify's
        self.check = check
        self.on_close = on_close
        self.established = False
        self.closing = False  # the application is done: getting our close_notify out
        self.lingering = False  # close_notify and FIN are out: reading (and dropping) what the peer still sends
        self.closed = False
        self.watched: dict[int, int] = {}  # fd -> epoll mask
        # peer -> application: decrypted bytes in up[up_start:up_end] (buffers exist once established)
        self.up = self.down = memoryview(b"")
        self.up_start = self.up_end = 0
        self.up_blocked: str | None = None  # what the TLS socket must become before we read it again
        self.peer_eof = False
        self.peer_end = TLS_PEER_OPEN  # how it came: TLS_PEER_CLOSE_NOTIFY or TLS_PEER_TRUNCATED
        self.app_write_shut = False
        # application -> peer: plaintext in down[down_start:down_end]
        self.down_start = self.down_end = 0
        self.down_blocked: str | None = None
        self.pinned = 0  # an SSL_write that would block must be repeated with the same length
        self.app_eof = False
        self.app_gone = False  # the application closed its end: nothing more is delivered to it
        self.app_read_shut = False  # it shut its reading side: nothing more is delivered, but it still writes
        self.progress_at = 0.0  # when the peer last took some of the application's data (app_gone only)
        self.abort_requested = False  # set by abort(), from any thread
        # TLS_EXPLICIT_CLOSE: an end of file of the application's is a truncation (a crash ends it so, as it
        # would an in-process TLS stack's) until close_notify() says the end is deliberate (from any thread)
        self.close_unasked = explicit_close
        self.calls_left = 0  # reads and writes this step may still make (STEP_CALLS at each step)
        self.out_of_calls = False  # this step stopped somewhere for want of them: the loop comes back to it

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Take the first handshake step here, then hand the session to its loop.

        A client's ClientHello is often there already: answering it on this thread (a
        non-blocking step, the crypto outside the GIL) spares a thread hop on the handshake's
        critical path.  Registering the TLS socket is the last thing done here, since from then
        on its events run the session on the loop's thread.
        """
        self._advance()
        if self.closed:
            return
        if self.established:  # unheard of in a first step, but then let the loop pump at once
            self._set(self.tls.fileno(), False, True)
        else:
            self._set(self.tls.fileno(), self.up_blocked == READ, self.up_blocked == WRITE)
        # Its deadline last: once the loop has it, a deadline already passed closes the session there,
        # which must find the socket registered (not half-way through _set on this thread).
        self.loop.arrivals.append(self)

    def deadline_passed(self, when: float) -> None:
        if self.closed or when != self.deadline:
            return  # a deadline since replaced
        if self.closing:
            self._close()
        elif not self.established:
            self._fail(E.ETIMEDOUT(f"the TLS handshake did not finish within {self.timeout:g} s"))
        elif self.progress_at + DRAIN_TIMEOUT > time.monotonic():  # the peer is still reading: more time
            self._at(self.progress_at + DRAIN_TIMEOUT)
        else:
            log.debug("TLS session ended: the application is gone and the peer reads nothing")
            self._close()

    def _at(self, when: float) -> None:
        self.deadline = when
        self.loop.at(when, self)

    def abort(self, app_end: socket.socket) -> None:
        """From any thread (TLS_ABORT, with ``app_end``, the request's copy of the application's end): end
        the session without close_notify.

        At once, on the caller's thread, the socketpair is shut both ways (through ``app_end``: our own
        end may be closing on the loop's thread, its descriptor number reused): from the request's
        answer on, the application reads end of file and its writes fail.  What it wrote before still
        goes out (an answer it had passed on in full); then the TCP connection ends with a FIN and no
        close_notify, which TLS peers report as a truncation.  A handshake still running ends with a
        reset (a FIN if it finished first).  The flag comes first: whatever the loop does next for
        this session finds it."""
        self.abort_requested = True
        try:
            app_end.shutdown(socket.SHUT_RDWR)  # (one end's shutdown shuts the other's opposite ways too)
        except OSError:
            pass
        self.loop.call_soon(self._abort)

    def close_notify(self, app_end: socket.socket) -> None:
        """From any thread (TLS_CLOSE_NOTIFY, with ``app_end``): end the session deliberately, whether or not
        TLS_EXPLICIT_CLOSE asked for this.  At once the application's writes end (``app_end`` shut for
        writing: it then reads what was passed to it, then end of file, as after its own shutdown(SHUT_WR));
        what it wrote before goes out, then close_notify.  After an abort the abort stands."""
        self.close_unasked = False
        try:
            app_end.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.loop.call_soon(self.step)

    def _abort(self) -> None:
        if self.closed:
            return
        log.debug("TLS session aborted by the application")
        if self.established:
            self.step()  # the end of file it finds: the application's data goes out, then the end
            return
        if self.tls.family != socket.AF_UNIX:  # TCP: a reset, not a FIN
            try:
                descriptors.reset_on_close(self.tls)
            except OSError:
                pass
        self._close()

    def step(self, fd: int = -1, events: int = 0) -> None:
        """Every readiness event lands here: make all the progress possible, then wait for what is needed."""
        if self.closed:
            return
        if events & select.EPOLLHUP and self.established and fd == self.plain.fileno():
            self._app_left()  # closed whole (its unread data may still wait in our queue: read below)
        self.calls_left, self.out_of_calls = STEP_CALLS, False
        self._advance()
        if not self.closed:
            self._watch()
            if self.out_of_calls:  # stopped with work maybe left: the loop's next round goes on with it
                self.loop.again[self] = None

    def _spend(self) -> bool:
        """One read or write more in this step, if it has any left."""
        if self._ran_out():
            return False
        self.calls_left -= 1
        return True

    def _ran_out(self) -> bool:
        """Has this step (or its direction's half) no calls left?  Then the loop comes back to it."""
        if self.calls_left <= 0:
            self.out_of_calls = True
        return self.calls_left <= 0

    def _app_left(self) -> None:
        """The application closed its socket: what it wrote still goes out, for as long as the peer reads."""
        if self.app_gone:
            return
        self.app_gone = True
        self.up_start = self.up_end = 0
        self.progress_at = time.monotonic()
        if not self.closing:
            self._at(self.progress_at + DRAIN_TIMEOUT)

    def _advance(self) -> None:
        try:
            if self.tls.unsent and not self.lingering:  # records that waited for room: first out
                waiting = self.tls.unsent
                self.tls.flush()
                if self.app_gone and self.tls.unsent < waiting:  # the peer still reads what it left
                    self.progress_at = time.monotonic()
            if self.lingering:
                self._drain()
            elif self.closing:
                self._send_close_notify()
            elif not self.established:
                self._handshake()
            if self.established and not self.closing and not self.closed:
                self._pump()
        except (OSError, ssl.SSLError) as exc:  # the peer reset or broke the protocol, or the app vanished
            log.debug("TLS session ended: %s", exc.__class__.__name__)
            if not self.established:  # (a flight's send, say): the application hears why, as from the handshake
                self._fail(failure(exc))
                return
            if self.peer_end == TLS_PEER_OPEN:  # (seen on a write: the peer is gone without close_notify)
                self.peer_end = TLS_PEER_TRUNCATED
            self._close()
        except Exception:
            log.exception("TLS session failed")
            self._close()

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.up_blocked = READ
            return
        except ssl.SSLWantWriteError:
            self.up_blocked = WRITE
            return
        except OSError as exc:  # ssl.SSLError included
            self._fail(failure(exc))
            return
        try:
            self.check(verified_chain(self.tls))
            outcome = W.encode_response(0, Op.TLS_ESTABLISHED, negotiated(self.tls))
        except E.KeydenError as exc:
            self._fail(exc)
            return
        except Exception:
            log.exception("TLS session: checking the established session failed")
            self._fail(E.EIO("internal error"))
            return
        if _hung_up(self.plain):  # the application left while the handshake ran: nobody to serve
            self._fail(E.ECONNRESET("the application left before the handshake finished"))
            return
        self.deadline = None
        self.established = True
        self._report(0)
        self.up_blocked = None
        self.up, self.down = memoryview(bytearray(BUFFER)), memoryview(bytearray(BUFFER))
        if self.plain.send(outcome) != len(outcome):  # an empty socket buffer (256 KiB, doubled) takes it whole
            raise BlockingIOError("plaintext socket full before the first frame")

    def _fail(self, error: E.KeydenError) -> None:
        """Tell the application why (one error frame), then drop both connections."""
        log.debug("TLS handshake refused: %s", error)
        self._report(error.code)
        try:
            self.plain.send(W.encode_error(0, Op.TLS_ESTABLISHED, error))
        except OSError:
            pass
        self._close()

    def _report(self, status: int) -> None:
        report, self.report = self.report, None
        if report is not None:
            try:
                report(status)
            except Exception:  # the audit fails open, as everywhere: the session goes on
                log.exception("TLS session: reporting the handshake's outcome failed")

    def _close(self) -> None:
        if self.closed:
            return
        if not self.established:  # ended before any outcome was told (the peer or the application went)
            self._report(E.ECONNRESET.code)
        self.closed = True
        try:
            for fd in self.watched:
                try:
                    self.loop.unregister(fd)
                except (OSError, ValueError):  # not (or no longer) registered: nothing to undo
                    pass
            self.watched.clear()
            descriptors.release_socket(self.tls, self.owner)  # the application's socket: its close may linger
            # Ours too: the application can queue descriptors in it (SCM_RIGHTS) that nobody read, and its
            # close would be their last, a lingering TCP socket's on this loop's thread.
            descriptors.release_socket(self.plain, self.owner)
            # What a session holds goes now, not when the session object does (a deadline may keep it for
            # DRAIN_TIMEOUT, at many sessions a second): the buffers, and OpenSSL's connection with its own.
            self.up = self.down = memoryview(b"")
            self.tls.close()  # (its descriptor is detached already: this frees the SSL object alone)
        finally:
            self.on_close()  # the session's count is given back whatever failed above

    # ------------------------------------------------------------- the pump

    def _pump(self) -> None:
        calls = self.calls_left  # half each way: a flood of tiny records one way holds the other back no longer
        self.calls_left = calls // 2
        self._peer_to_app()
        self.calls_left += calls - calls // 2
        self._app_to_peer()
        if self.app_eof and self.down_start == self.down_end and not self.tls.unsent:  # all of it out first
            self.closing = True
            self._send_close_notify()
            if not self.closed:  # our close_notify is not out yet: give it a little while
                self.deadline = time.monotonic() + CLOSE_GRACE
                self.loop.at(self.deadline, self)

    def _peer_to_app(self) -> None:
        while True:
            self._decrypt()
            if not self._deliver():
                return  # the application is not reading: neither are we
            if self.up_blocked or self.peer_eof or self._ran_out():  # (records may wait in OpenSSL's buffer,
                break                                                   # which epoll cannot see)
        if self.peer_eof and not self.app_write_shut and not self.app_gone:
            self.plain.shutdown(socket.SHUT_WR)
            self.app_write_shut = True

    def _decrypt(self) -> None:
        """Read records into ``up`` until it is full, the socket has no more, or the peer ended."""
        self.up_blocked = None
        while not self.peer_eof and self.up_end < BUFFER and self._spend():
            try:
                n = self.tls.recv_into(self.up[self.up_end:])
            except ssl.SSLWantReadError:
                self.up_blocked = READ
                return
            except ssl.SSLWantWriteError:  # e.g. answering a TLS 1.3 key update
                self.up_blocked = WRITE
                return
            except OSError as exc:  # a TCP end without close_notify (suppress_ragged_eofs is off), a reset,
                # a record that does not decrypt: a truncation; what came before still reaches the application
                log.debug("TLS session: the peer's end was a truncation: %s", exc.__class__.__name__)
                self.peer_eof, self.peer_end = True, TLS_PEER_TRUNCATED
                return
            if n == 0:
                self.peer_eof, self.peer_end = True, TLS_PEER_CLOSE_NOTIFY
            self.up_end += n

    def _deliver(self) -> bool:
        """Pass ``up`` to the application; True once it is all gone (or dropped: the application left, and
        the peer must not stall writing to us, or it may never read what the application answered)."""
        if self.up_start < self.up_end and not self.app_gone and not self.app_read_shut:
            try:
                self.up_start += self.plain.send(self.up[self.up_start:self.up_end])
            except BlockingIOError:
                return False
            except BrokenPipeError:  # it reads no more (shutdown(SHUT_RD)), and may still write: if it
                self.app_read_shut = True  # closed instead, the hang-up says so (step), or its reset
            except ConnectionResetError:
                self._app_left()
            if self.up_start < self.up_end and not self.app_read_shut:
                return False
        self.up_start = self.up_end = 0
        return True

    def _app_to_peer(self) -> None:
        while True:
            dry = self._gather()
            if not self._encrypt() or dry or self.app_eof or self._ran_out():
                return

    def _gather(self) -> bool:
        """Read plaintext into ``down`` until full or the application has no more; True if it ran dry."""
        while not self.app_eof and self.down_end < BUFFER and self._spend():
            try:
                # recvmsg, with room for what an application may send along: recv would have the kernel
                # drop those descriptors here, on this TLS loop, where a close that lingers stops every session
                n, passed, _flags, _addr = self.plain.recvmsg_into(
                    [self.down[self.down_end:]], descriptors.ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
                if passed:
                    descriptors.release(descriptors.passed(passed), self.owner)
            except BlockingIOError:
                return True
            except ConnectionResetError:  # it closed with our data unread: after all it had written
                n = 0
                self._app_left()
            if n == 0:
                self.app_eof = True
            self.down_end += n
        return False

    def _encrypt(self) -> bool:
        """Write ``down`` to the peer as records; True once it is all gone."""
        self.down_blocked = None
        while self.down_start < self.down_end and self._spend():
            length = self.pinned or min(WRITE_CHUNK, self.down_end - self.down_start)
            try:
                sent = self.tls.send(self.down[self.down_start:self.down_start + length])
            except ssl.SSLWantWriteError:
                self.pinned, self.down_blocked = length, WRITE
                return False
            except ssl.SSLWantReadError:
                self.pinned, self.down_blocked = length, READ
                return False
            self.pinned = 0
            self.down_start += sent
            if self.app_gone:
                self.progress_at = time.monotonic()
        if self.down_start < self.down_end:  # (the step's calls ran out)
            return False
        self.down_start = self.down_end = 0
        return True

    def _send_close_notify(self) -> None:
        """Our close_notify, once the application's data is out; then the session ends."""
        if self.abort_requested or self.close_unasked:  # a FIN alone, which TLS peers take for a truncation
            self._linger()
            return
        try:
            self.tls.unwrap()
        except ssl.SSLWantWriteError:
            self.up_blocked = WRITE  # not out yet: try again when the socket drains
            return
        except (ssl.SSLError, OSError):
            pass  # sent and now awaiting the peer's (which we do not wait for), or the peer is gone
        self._linger()

    def _linger(self) -> None:
        """Our close_notify is out (aborted: none is sent): send FIN, then read and drop what the peer still
        sends until it closes too (or CLOSE_GRACE runs out).  Closing at once, with its data unread, would
        send it a reset, and a reset can destroy the answer it has not read yet (an early "413" to a large
        upload)."""
        if not self.tls.flush():  # what the application wrote goes out before our FIN (aborted too)
            self.up_blocked = WRITE
            return
        if self.peer_eof:
            self._close()
            return
        self._set(self.plain.fileno(), False, False)
        try:
            self._deliver()  # what was decrypted before: into its socket buffer, if there is room
            self.plain.shutdown(socket.SHUT_RDWR)  # then its end of file: nothing more reaches it
        except OSError:
            pass
        try:
            self.tls.shutdown(socket.SHUT_WR)  # drops the TLS layer: what follows is ciphertext, dropped
        except OSError:
            self._close()
            return
        self.lingering = True
        self.up_blocked, self.down_blocked = READ, None
        self._drain()

    def _drain(self) -> None:
        while self._spend():
            try:
                n = len(self.tls.recv(65536))
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if n == 0:  # the peer has closed as well
                self._close()
                return

    # ------------------------------------------------------------- watching

    def _watch(self) -> None:
        blocked = (self.up_blocked, self.down_blocked)
        self._set(self.tls.fileno(), READ in blocked, WRITE in blocked or bool(self.tls.unsent and not self.lingering))
        if self.closing:
            self._set(self.plain.fileno(), False, False)
        elif self.established:
            reading, writing = not self.app_eof and self.down_end < BUFFER, self.up_start < self.up_end
            # Awaiting nothing of it (its data waits for the peer), still hear of the application leaving.
            self._set(self.plain.fileno(), reading, writing, hangup=not (reading or writing or self.app_gone))

    def _set(self, fd: int, reading: bool, writing: bool, hangup: bool = False) -> None:
        """Watch ``fd`` for what is awaited; nothing awaited, not watched (so a hang-up cannot spin), unless
        the hang-up itself is awaited (once seen, it is not again)."""
        mask = (select.EPOLLIN if reading else 0) | (select.EPOLLOUT if writing else 0) | \
            (select.EPOLLHUP if hangup else 0)
        old = self.watched.get(fd, 0)
        if mask == old:
            return
        if not mask:
            del self.watched[fd]
            self.loop.unregister(fd)
        elif not old:
            self.watched[fd] = mask
            self.loop.register(fd, self, mask)
        else:
            self.watched[fd] = mask
            self.loop.modify(fd, mask)


def _hung_up(sock: socket.socket) -> bool:
    """Has the other end of this socket closed (both ways)?  A poll that waits for nothing still says."""
    poller = select.poll()
    poller.register(sock, 0)
    return any(events & (select.POLLHUP | select.POLLERR) for _fd, events in poller.poll(0))
