"""The blocking client: one socket, requests answered in order, safe to share between threads.

If the daemon has closed the connection (an idle timeout, a restart), the next request opens a new one
(``reconnect``), with the same session: a request that could not be written cannot have been done, so
it is sent again on the new connection.  One written before the daemon went is never sent twice: its
caller gets the error.  Streams and shared buffers belong to a connection and do not survive it.
"""

from __future__ import annotations

import array
import errno
import itertools
import os
import select
import socket
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Sequence

from keyden import errors as E
from keyden import protocol as W
from keyden.client import common, tls
from keyden.client.dataplane import Aead, Mac, RegionPool, SharedBuffer, Stream, aead_algorithm
from keyden.client.operations import Operations, Ref
from keyden.crypto import symmetric
from keyden.protocol import Op

if TYPE_CHECKING:
    from keyden.client.handles import KeyHandle

RECV_CHUNK = 1024 * 1024
SOCKET_BUFFER = 4 * 1024 * 1024
_clock = time.monotonic

_CLIENTS: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child shares its parent's connections: both would send the same request ids on one
    socket and read each other's answers.  The child drops its copies; its next request connects anew."""
    for client in list(_CLIENTS):
        client._leave_parents_connection()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _connect(sock: socket.socket, path: str, timeout: float | None, closed) -> None:
    """connect(), waiting while the daemon's listen queue is full, as a blocking connect waits: a socket with
    a timeout is non-blocking underneath, and such a queue is EAGAIN at once.  ETIMEDOUT after ``timeout``;
    ECONNRESET once ``closed()`` (the client closed by another thread meanwhile)."""
    if timeout is None:
        sock.connect(path)
        return
    deadline, delay = None, 0.001
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if closed():
                raise E.ECONNRESET("the client is closed") from None
            deadline = deadline or time.monotonic() + timeout
            left = deadline - time.monotonic()
            if left <= 0:
                error = E.ETIMEDOUT(f"keyden at {path} took no new connection within {timeout:g} s "
                                    "(its listen queue is full)")
                error.before_hello = True
                raise error from None
            time.sleep(min(delay, left))
            delay = min(2 * delay, 0.05)


class Client(Operations):
    def __init__(self, socket_path: str | None = None, *, session: str | None = None,
                 timeout: float | None = None, client_name: str = "keyden-python", reconnect: bool = True,
                 busy_poll: int = 0):
        self.socket_path = common.socket_path(socket_path)
        self._busy_poll = common.busy_poll_seconds(busy_poll)
        self.reconnect = reconnect
        self.generation = 0  # connections replaced so far: streams and shared buffers remember theirs
        self._session = common.session_token(session)
        self._client_name = client_name
        self._timeout = common.request_timeout(timeout)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._buf = bytearray(RECV_CHUNK)
        self._view = memoryview(self._buf)
        self.max_frame = W.DEFAULT_MAX_FRAME
        self._closed = False
        self.region_pool = RegionPool(self)  # the shared regions behind the aead helpers' large calls
        self.abandoned_streams: deque[tuple[int, int]] = deque()  # (handle, generation) of streams dropped open
        self.abandoned_regions: deque[tuple[int, int]] = deque()  # (region, generation) of shared buffers dropped
        self._open()
        _CLIENTS.add(self)

    def _leave_parents_connection(self) -> None:
        """In a forked child: forget the parent's socket, lock, answers and shared regions (see
        _after_fork_in_child).  Streams and regions opened before the fork are stale here."""
        self._lock = threading.Lock()  # another thread of the parent may have held it at the fork
        try:
            self._sock.close()  # the child's descriptor only: the parent's connection goes on
        except OSError:
            pass
        self._pending = {}
        self._decoder = W.FrameDecoder(common.MAX_REPLY_FRAME)
        self.region_pool = RegionPool(self)  # the parent's regions are its own (MAP_SHARED)
        self.abandoned_streams = deque()
        self.abandoned_regions = deque()
        self.generation += 1

    def on_connection(self, generation: int) -> bool:
        """Is the connection of ``generation`` (a stream's, a shared buffer's) still this client's?"""
        return self.generation == generation

    # ------------------------------------------------------------ transport

    def _open(self) -> None:
        """Connect and say HELLO (with the lock held, or before the client is shared)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        hello_timeout = common.HELLO_TIMEOUT if self._timeout is None else min(self._timeout, common.HELLO_TIMEOUT)
        try:
            sock.settimeout(self._timeout)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            _connect(sock, self.socket_path, self._timeout, lambda: self._closed)
            common.check_daemon(sock, self.socket_path)
            sock.settimeout(hello_timeout)  # keyden answers HELLO at once: whatever does not is no keyden
        except OSError as exc:
            sock.close()
            raise common.connect_failed(self.socket_path, exc) from None
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        if self._busy_poll:
            self._answer_poll = select.poll()
            self._answer_poll.register(sock, select.POLLIN)
        self._decoder = W.FrameDecoder(common.HELLO_REPLY_MAX)  # no 2 GiB "frame" from a server that is not keyden
        self._pending: dict[int, W.Frame] = {}
        rid = next(self._ids) & 0xFFFFFFFF or 1  # 0 is the daemon's, for connection-level errors
        hello = (W.MIN_VERSION, W.VERSION, self._session, self._client_name)
        try:
            sock.sendall(self._request(rid, Op.HELLO, hello))
            frame = self._wait(rid)
            if frame.status:
                raise W.error_of(frame)
        except TimeoutError:
            sock.close()
            raise common.no_hello(self.socket_path, hello_timeout) from None
        except W.FrameTooLarge:
            sock.close()
            raise common.not_keyden(self.socket_path, "answered with what keyden never sends") from None
        except OSError:
            farewell = self._farewell()  # keyden says why it closes (a limit): what says nothing is no keyden
            sock.close()
            raise farewell or common.not_keyden(self.socket_path, "closed the connection without answering",
                                                E.ECONNRESET) from None
        except E.KeydenError:
            sock.close()
            raise
        sock.settimeout(self._timeout)
        self._decoder.max_frame = common.MAX_REPLY_FRAME
        if self._closed:  # close() from another thread while we reconnected
            sock.close()
            raise E.ECONNRESET("the client is closed")
        self.version, self.max_frame, self.uid, self.gid, self.pid = W.response_schema(Op.HELLO).decode(frame.body)

    def _send(self, data: bytes, fds: list[int] | None = None, read_meanwhile: bool = False) -> None:
        """Write requests; if the connection was gone before any byte of them went out, write them on a new
        one (see the module).  ``read_meanwhile``: many requests, whose answers are read (for ``_wait``)
        while the rest is written (``_send_reading``); not with descriptors, which ride on the first write."""
        read_meanwhile = read_meanwhile and not fds
        if self._closed:
            raise E.ECONNRESET("the client is closed")
        for fd in fds or ():
            try:
                os.fstat(fd)  # the caller's mistake must not look like a lost connection
            except OSError:
                raise E.EBADF(f"descriptor {fd} is not open") from None
        try:
            sent = self._write_first(data, fds, read_meanwhile)
        except OSError as exc:
            if not self.reconnect and self._sock.fileno() == -1:  # else: EBADF, in our own words
                raise E.ECONNRESET("the connection to keyden was lost earlier, and this client does not "
                                   "reconnect (reconnect=False): make a new one") from None
            if not self.reconnect or not self._gone(exc):
                raise
            self._sock.close()
            self._open()  # KeydenError if the daemon is not there, or the session is gone with a restart
            self.generation += 1
            sent = self._write_first(data, fds, read_meanwhile)
        if sent < len(data):  # a failure from here on is the caller's: some of the requests may be done
            if read_meanwhile:
                self._send_reading(memoryview(data)[sent:])
            else:
                self._sock.sendall(memoryview(data)[sent:])

    def _send_reading(self, rest: memoryview) -> None:
        """Write ``rest``, reading the answers that come meanwhile into the pending table.  The daemon stops
        reading a client whose answers back up unread: a client that wrote every request before reading any
        waited on it for good once its requests and their answers filled both sockets' buffers."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLOUT)
        wait_ms = None if self._timeout is None else self._timeout * 1000
        view = memoryview(self._buf)
        sock = self._sock
        sock.setblocking(False)  # (with a timeout, a socket's send waits for room itself: not here)
        try:
            while rest:
                ready = poller.poll(wait_ms)
                if not ready:
                    raise TimeoutError("timed out writing requests to keyden")
                events = ready[0][1]
                if events & select.POLLIN:
                    try:
                        n = sock.recv_into(view)
                    except BlockingIOError:
                        n = -1
                    if n == 0:
                        raise OSError("daemon closed the connection")
                    if n > 0:
                        self._feed(view, n)
                    self._take_frames()
                if events & ~select.POLLIN:  # room, or POLLHUP/POLLERR: the write says what went wrong
                    try:
                        rest = rest[sock.send(rest):]
                    except BlockingIOError:
                        pass
        finally:
            sock.settimeout(self._timeout)

    def _gone(self, exc: OSError) -> bool:
        """Has the daemon closed the connection, or have we, after a request failed on it?  (Not: a timeout.)"""
        return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN) or self._sock.fileno() == -1

    def _interrupted(self) -> None:
        """A KeyboardInterrupt, a signal handler's exception or a thread's cancellation stopped a request
        half-way: half a frame may be out, or an answer still on its way.  The connection is out of step
        with us, so it is closed: the next request opens a new one (never sends the old one again)."""
        try:
            self._sock.close()
        except OSError:
            pass

    def _lost(self, exc: OSError) -> E.KeydenError:
        """A request failed on the connection after it went out: close it (the daemon drops a half-sent
        frame with it), so the next request starts on a new one; the error says why, if the daemon did."""
        if isinstance(exc, TimeoutError):  # the answer may still come: this connection cannot be trusted
            self._sock.close()
            return E.ETIMEDOUT(f"timed out after {self._timeout:g} s waiting for keyden (a request it already "
                               "had may still be carried out); the next request opens a new connection")
        error = self._farewell() or E.ECONNRESET(f"connection to keyden lost: {exc}")
        self._sock.close()
        return error

    def _write_first(self, data: bytes, fds: list[int] | None, without_waiting: bool = False) -> int:
        """One write (descriptors ride on its first byte): fails whole, or tells how much went out.
        ``without_waiting``: as much as fits now (a blocking socket's send waits until all of it went)."""
        if fds:
            return self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if not without_waiting:
            return self._sock.send(data)
        try:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0

    def _exchange(self, calls: Sequence[tuple[Op, tuple]], raise_errors: bool = True,
                  fds: list[int] | None = None, received: list[int] | None = None) -> list[Any]:
        """Send every request (reading answers meanwhile, when there are many), then collect the rest
        (pipelined); descriptors passed back go to ``received``."""
        with self._lock:
            ids: list[int | E.KeydenError] = []  # a request that cannot be encoded is its own error, not sent
            out = []
            for op, args in calls:
                rid = next(self._ids) & 0xFFFFFFFF or 1  # 0 is the daemon's, for connection-level errors
                try:
                    out.append(self._request(rid, op, args))
                except E.KeydenError as exc:
                    if raise_errors:
                        raise
                    ids.append(exc)
                    continue
                ids.append(rid)
            frames: list = []
            try:
                if out:
                    self._send(b"".join(out), fds, read_meanwhile=len(out) > 1 and received is None)
                for rid in ids:
                    frames.append(self._wait(rid, received) if type(rid) is int else rid)
            except OSError as exc:
                lost = self._lost(exc)
                if raise_errors:
                    raise lost from None
                # answers already read stand (some were, while the rest was written); each call still
                # unanswered gets the error (never sent again)
                frames += [self._pending.pop(rid, None) or type(lost)(lost.message) if type(rid) is int else rid
                           for rid in ids[len(frames):]]
            except E.KeydenError:
                raise
            except BaseException:
                self._interrupted()
                raise
        results = []
        for (op, _args), frame in zip(calls, frames):
            if isinstance(frame, E.KeydenError):
                results.append(frame)
            elif frame.status:
                err = W.error_of(frame)
                if raise_errors:
                    raise err
                results.append(err)
            else:
                results.append(W.response_schema(op).decode(frame.body))
        return results

    def _request(self, rid: int, op: Op, args: tuple) -> bytes:
        """One encoded request, refused here if it is over the frame cap the daemon announced."""
        frame = W.encode_request(rid, op, *args)
        if len(frame) - W.HEADER_SIZE > self.max_frame:
            raise E.EMSGSIZE(f"request of {len(frame)} bytes exceeds the daemon's {self.max_frame}-byte "
                             "frame cap; use a shared buffer or a stream for bulk data")
        return frame

    def _farewell(self) -> E.KeydenError | None:
        """Why the daemon closed on us, if it said so before we noticed (e.g. a connection limit)."""
        try:
            self._decoder.feed(self._sock.recv(RECV_CHUNK, socket.MSG_DONTWAIT))
            for frame in self._decoder.frames():
                if frame.status and frame.op == 0:
                    return W.error_of(frame)
        except (OSError, E.KeydenError):
            pass
        return None

    def _receive(self, view: memoryview) -> int:
        """One read of what the daemon sends.  With ``busy_poll``, first looked for without sleeping, for up
        to that long: on a VM whose idle vCPUs halt, the wake-up costs more than a short request takes.
        (The poll comes before the blocking read's ``timeout``: an answer may take up to 10 ms longer.)"""
        if self._busy_poll:  # each look yields the CPU, which the daemon may need to answer
            poll, deadline = self._answer_poll.poll, _clock() + self._busy_poll
            while not poll(0) and _clock() < deadline:
                os.sched_yield()
        return self._sock.recv_into(view)

    def _feed(self, view: memoryview, n: int) -> None:
        """What a read brought, to the decoder, and out of the receive buffer (which the next read reuses)."""
        self._decoder.feed(view[:n])
        W.wipe(view, n)

    def _take_frames(self) -> None:
        """The answers decoded so far into the pending table; a connection-level error (a limit, a timeout:
        the daemon closes) is raised."""
        for frame in self._decoder.frames():
            if frame.status and frame.op == 0:
                raise W.error_of(frame)
            self._pending[frame.request_id] = frame

    def _wait(self, rid: int, received: list[int] | None = None) -> W.Frame:
        view = memoryview(self._buf)
        while rid not in self._pending:
            self._take_frames()
            if rid in self._pending:
                break
            n = self._receive(view) if received is None else tls.receive_with_fds(self._sock, view, received)
            if n == 0:
                raise OSError("daemon closed the connection")
            self._feed(view, n)
        frame = self._pending.pop(rid)
        if frame.status and frame.op == 0:  # connection-level error: the daemon closes
            raise W.error_of(frame)
        return frame

    def _resolve(self, args: tuple) -> tuple:
        if Ref not in map(type, args):  # most calls: nothing to resolve (checked at C speed)
            return args
        out = []
        for a in args:
            if type(a) is Ref:
                value = a.value
                ref = value if type(value) is int and common.SERIAL_MIN <= value <= common.SERIAL_MAX \
                    else common.key_id(value)  # a plain serial skips the call
                if isinstance(ref, tuple):
                    ref = self._exchange([(Op.FIND, ref)])[0][0]
                a = ref
            out.append(a)
        return tuple(out)

    def _call(self, op: Op, *args: Any):
        args = self._resolve(args)
        return common.shape(op, self._round_trip(op, args))

    def _round_trip(self, op: Op, args: tuple) -> tuple:
        """One request, its response fields: ``_exchange`` for the common case, with nothing to spare.

        Most calls are one small request whose whole reply comes back in one read; that path
        touches neither the frame decoder nor the pending table.
        """
        response = W.response_schema(op)
        with self._lock:
            rid = next(self._ids) & 0xFFFFFFFF or 1  # 0 is the daemon's, for connection-level errors
            request = self._request(rid, op, args)
            try:
                self._send(request)
                if self._pending or self._decoder.pending:
                    frame = self._wait(rid)
                else:
                    view = self._view
                    n = self._receive(view)
                    if n >= W.HEADER_SIZE:
                        length, got, got_op, status = W.HEADER.unpack_from(view)
                        if n == W.HEADER_SIZE + length and got == rid and got_op == op:
                            body = bytes(view[W.HEADER_SIZE:n])
                            W.wipe(view, n)  # a key's payload, a plaintext: not left until a longer reply
                            if status:
                                raise E.error_for_code(status, W.decode_error(body))
                            return response.decode(body)
                    if n == 0:
                        raise OSError("daemon closed the connection")
                    self._feed(view, n)
                    frame = self._wait(rid)
            except OSError as exc:
                raise self._lost(exc) from None
            except E.KeydenError:
                raise
            except BaseException:
                self._interrupted()
                raise
        if frame.status:
            raise W.error_of(frame)
        return response.decode(frame.body)

    def _call_with_fds(self, op: Op, args: tuple, fds: list[int]) -> tuple:
        return self._exchange([(op, args)], fds=fds)[0]

    def _call_trading_fds(self, op: Op, args: tuple, fds: list[int]) -> tuple[tuple, list[int]]:
        """A request that sends descriptors and gets some back (TLS_*): (response fields, received descriptors)."""
        received: list[int] = []
        try:
            return self._exchange([(op, args)], fds=fds, received=received)[0], received
        except BaseException:
            for fd in received:
                os.close(fd)
            raise

    def call_many(self, calls: Sequence[tuple]) -> list[Any]:
        """Pipeline several operations in one round trip: [('add', (...)), ('derive', (k,), {'peer_key': p})].

        Each result is the method's value or the KeydenError that call raised (bad arguments included).
        A '%type:description' name is looked up once every call before it is answered, so it finds a key
        an earlier call made; those calls then go in more than one round trip.  If the connection fails
        under a round trip, its calls all get that error and none is sent again.
        """
        try:
            calls = list(calls)
        except (TypeError, NotImplementedError):  # (a memoryview of more than one dimension says the latter)
            raise E.EINVAL(f"calls must be a sequence of (name, args[, kwargs]) tuples, not {type(calls).__name__}") \
                from None
        results: list[Any] = [None] * len(calls)
        ready: list[tuple[int, Op, tuple]] = []  # (index, op, fields) to send together

        def send_ready() -> None:
            batch = ready[:]
            ready.clear()
            try:
                answers = self._exchange([(op, fields) for _, op, fields in batch], raise_errors=False)
            except E.KeydenError as exc:  # no connection to send them on: each of them gets why
                answers = [type(exc)(exc.message) for _ in batch]
            for (i, op, _), answer in zip(batch, answers):
                results[i] = answer if isinstance(answer, E.KeydenError) else common.shape(op, answer)

        recorder = _Recorder()
        for i, call in enumerate(calls):
            try:
                op, raw = recorder.record(call)
                needs_find = any(type(a) is Ref and isinstance(common.key_id(a.value), tuple) for a in raw)
            except E.KeydenError as exc:
                results[i] = exc
                continue
            if needs_find and ready:
                send_ready()  # what came before is done before the name is looked up
            try:
                fields = self._resolve(raw)
            except E.KeydenError as exc:
                results[i] = exc
                continue
            ready.append((i, op, fields))
        if ready:
            send_ready()
        return results

    # --------------------------------------------------------------- handles

    def key(self, serial) -> "KeyHandle":
        from keyden.client.handles import KeyHandle

        return KeyHandle(self, self._resolve((Ref(serial),))[0])

    def keys(self) -> list:
        """Every key you may view, as /proc/keys lists them (KeyStatus: state, expiry, a summary), serial order."""
        found, after = self.keys_page()
        while after:
            page, after_next = self.keys_page(after)
            after = common.next_page(after, after_next)
            found += page
        return found

    def public_key(self, key):
        from keyden.client.handles import load_public_key

        spki, _cert = self.public_key_bytes(key)
        return load_public_key(spki)

    def certificate(self, key):
        from cryptography import x509

        _spki, cert = self.public_key_bytes(key)
        return x509.load_der_x509_certificate(cert) if cert else None

    def private_key(self, key):
        """A pyca-compatible private key object whose operations run inside keyden."""
        from keyden.client.handles import remote_private_key

        return remote_private_key(self, self._resolve((Ref(key),))[0])

    # ---------------------------------------------------- data shoveling by serial

    def aead(self, key, alg: str | None = None) -> Aead:
        """An object shaped like pyca's AESGCM whose key stays in keyden.  Without ``alg``: the AEAD genkey
        made the key for, else gcm(aes) (one request to ask: make the helper once)."""
        serial = self._resolve((Ref(key),))[0]
        if alg is None:
            try:
                made_for = self.key_algorithm(serial)
            except E.ENOSYS:  # a daemon older than KEY_ALGORITHM: the default it had
                made_for = ""
            alg = aead_algorithm(serial, made_for)
        return Aead(self, serial, alg)

    def hmac(self, key, alg: str = "hmac(sha256)") -> Mac:
        return Mac(self, self._resolve((Ref(key),))[0], alg)

    def hash(self, alg: str = "sha256") -> Stream:
        """A streaming hash: update(data)..., then finalize() -> (b'', digest).  ENOENT for a name that is
        not a hash (as crypto_alloc_shash)."""
        symmetric.spec(alg, "hash")
        return Stream(self, alg)

    def stream(self, alg: str, key=0, **kw) -> Stream:
        return Stream(self, alg, self._resolve((Ref(key),))[0] if key else 0, **kw)

    # TLS with keys that stay in keyden (docs/tls.md): (plaintext socket, TlsInfo)
    tls_accept = tls.tls_accept
    tls_connect = tls.tls_connect
    tls_abort = tls.tls_abort
    tls_close_notify = tls.tls_close_notify
    tls_peer_end = tls.tls_peer_end

    def shared_buffer(self, size: int) -> SharedBuffer:
        """A memory region shared with the daemon for bulk operations (see SharedBuffer.cipher)."""
        return SharedBuffer(self, size)

    @property
    def closed(self) -> bool:
        """Closed by its owner, or lost and not to be reopened (``reconnect=False``)."""
        return self._closed or (not self.reconnect and self._sock.fileno() == -1)

    def close(self) -> None:
        self._closed = True
        self.region_pool.close()  # unmapped here; the daemon unmaps its side as the connection ends
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __reduce__(self):
        raise TypeError("a keyden client connection cannot be pickled")


class _Recorder(Operations):
    """Captures the (op, fields) a method would send, for call_many."""

    last: tuple

    def _call(self, op, *args):
        self.last = (op, args)


    def record(self, call) -> tuple[Op, tuple]:
        """(op, fields) of a call_many entry ``(name, args[, kwargs])``; EINVAL for a malformed entry, bad
        arguments, or a name that is not one request (the data-plane helpers, TLS, shared buffers).
        Messages name what is wrong, never an argument's value."""
        if not isinstance(call, (tuple, list)) or not 2 <= len(call) <= 3:
            raise E.EINVAL("each call_many entry is (name, args) or (name, args, kwargs)")
        name, args, kwargs = call[0], call[1], call[2] if len(call) == 3 else {}
        method = vars(Operations).get(name) if isinstance(name, str) and not name.startswith("_") else None
        if not callable(method):
            raise E.EINVAL(f"call_many pipelines the client's keyctl operations (one request each); "
                           f"{str(name)[:40]!r} is not one")
        try:
            method(self, *args, **kwargs)
        except E.KeydenError:  # keyden's own refusal (NotBytes is a TypeError too): its message names no value
            raise
        except (TypeError, ValueError, OverflowError):  # arguments that do not fit (messages may quote them)
            raise E.EINVAL(f"{name}: the arguments do not fit {name}()") from None
        return self.last
