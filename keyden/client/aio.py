"""The asyncio client: one connection, any number of requests in flight.

Built on ``asyncio.Protocol`` rather than streams so responses are matched to
requests by id as they arrive: every operation method (shared with the
blocking client via ``Operations``) writes its request at once and returns an
``asyncio.Future``, so ``asyncio.gather`` over many calls is true pipelining.

    async with await keyden.client.aio.connect(path) as c:
        serial = await c.add("user", "db:password", b"s3cret")

As the blocking client does, it opens a new connection (same session) for the next request after the
daemon closed the old one (an idle timeout, a restart); requests that were on the wire then fail with
the error, never sent twice, and a request whose write found the daemon gone is written on the new one.

A connection lives on the event loop it was opened in.  A client whose loop has stopped (``asyncio.run``
returned) or that was inherited by a forked child connects anew on the loop that uses it next; using it
from a second loop while its own runs in another thread is EBUSY (one client per loop, as with any
asyncio transport).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import os
import socket
import warnings
import weakref
from collections import deque
from typing import Any, Callable

from keyden import errors as E
from keyden import protocol as W
from keyden.client import common
from keyden.client.aio_dataplane import MAX_HELPER_STREAMS, AsyncAead, AsyncMac, AsyncStream
from keyden.client.dataplane import aead_algorithm
from keyden.client.handles import KeyHandle, load_public_key
from keyden.client.operations import Operations, Ref
from keyden.crypto import symmetric
from keyden.protocol import Op

__all__ = ["AsyncClient", "connect"]


def _running_loop() -> asyncio.AbstractEventLoop:
    """The loop a call is made in: the methods return futures of it, so there must be one (EINVAL, not
    asyncio's RuntimeError, for a call from plain code or another thread)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise E.EINVAL("the asyncio client's methods are called in a running event loop (inside a coroutine: "
                       "asyncio.run(main()), or from another thread asyncio.run_coroutine_threadsafe(main(), "
                       "loop)); without one, use the blocking client, keyden.connect") from None


def _failed(error: E.KeydenError) -> asyncio.Future:
    """An already-failed future: errors reach the caller at ``await``, like the daemon's."""
    future = _running_loop().create_future()
    future.set_exception(error)
    return future


def _runs_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _fail_all(gated: deque, error: Callable[[], BaseException]) -> None:
    """Fail the requests queued for a new connection (AsyncClient._behind_gate) that are still awaited."""
    while gated:
        future = gated.popleft()[2]
        if not future.done():
            future.set_exception(error())


_CLIENTS: "weakref.WeakSet[AsyncClient]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child shares its parent's connections (and the parent loop's epoll instance): the child
    forgets its copies without touching that loop; its next request connects anew on its own loop."""
    for client in list(_CLIENTS):
        client._leave_parents_connection()


os.register_at_fork(after_in_child=_after_fork_in_child)


async def _connect_unix(sock: socket.socket, path: str, closed: Callable[[], bool]) -> None:
    """Connect a non-blocking Unix socket, waiting while the daemon's listen queue is full, as a blocking
    connect waits, until ``closed()``.  (The loop's ``sock_connect`` takes that EAGAIN for a connect in
    progress, finds the socket writable at once, and hands back one that is connected to nothing.)"""
    delay = 0.001
    while not closed():
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.05)
    raise E.ECONNRESET("the client is closed")


class _Wire(asyncio.Protocol):
    """Bytes in, frames out to the client; connection loss reported once."""

    def __init__(self, client: "AsyncClient"):
        self.client = client
        self.decoder = W.FrameDecoder(common.HELLO_REPLY_MAX)  # until HELLO is answered: see AsyncClient._open
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def _current(self) -> bool:
        """Still the client's connection?  (After a reconnect the old one's last words are ignored.)"""
        return self.transport is self.client._transport

    def data_received(self, data: bytes) -> None:
        if not self._current():
            return
        self.decoder.feed(data)
        try:
            for frame in self.decoder.frames():
                self.client._deliver(frame)
        except E.KeydenError as exc:  # a frame we cannot delimit: the stream is lost
            self.client._lose(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._current():
            self.client._lose(E.ECONNRESET(f"connection to keyden lost{f': {exc}' if exc else ''}"))


class AsyncClient(Operations):
    """Every keyctl operation as a method returning an awaitable ``asyncio.Future``.

    The request is on the wire when the method returns (after a FIND for any
    '%type:description' reference), so calls reach the daemon in call order.
    """

    def __init__(self, socket_path: str, hello: tuple, reconnect: bool = True):
        self.socket_path = socket_path
        self.reconnect = reconnect
        self.generation = 0  # connections replaced so far
        self._hello = hello
        self._transport: asyncio.Transport | None = None
        self._sock: socket.socket | None = None  # the transport's socket
        self._loop: asyncio.AbstractEventLoop | None = None  # the one the connection lives on
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, Op, tuple]] = {}
        self._lost: E.KeydenError | None = E.ECONNRESET("not connected yet")
        self._closed = False  # by its owner: never reopened
        self._reopening: asyncio.Task | None = None  # the new connection being opened: requests wait for it
        self._gated: deque[tuple[Op, tuple, asyncio.Future]] = deque()  # ... here, in call order (_behind_gate)
        self.max_frame = W.DEFAULT_MAX_FRAME
        self.helper_streams = asyncio.Semaphore(MAX_HELPER_STREAMS)  # large aead/hmac calls at once (aio_dataplane)
        self.abandoned_streams: deque[tuple[int, int]] = deque()  # (handle, generation) of streams dropped open
        self._guard = None  # see _guard_loop
        _CLIENTS.add(self)

    @classmethod
    async def connect(cls, socket_path: str | None = None, *, session: str | None = None,
                      client_name: str = "keyden-python-asyncio", reconnect: bool = True) -> "AsyncClient":
        client = cls(common.socket_path(socket_path),
                     (W.MIN_VERSION, W.VERSION, common.session_token(session), client_name), reconnect)
        await client._open()
        return client

    async def _open(self, reconnecting: bool = False) -> None:
        """Connect and say HELLO.  While this runs for a reconnect, other requests wait at the gate
        (``_reopening``) and are written after the HELLO, in call order."""
        loop = self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # ours, to close without the loop (fork)
        try:
            sock.setblocking(False)
            await _connect_unix(sock, self.socket_path, lambda: self._closed)
            common.check_daemon(sock, self.socket_path)
            transport, wire = await loop.create_unix_connection(lambda: _Wire(self), sock=sock)
        except OSError as exc:
            sock.close()
            raise common.connect_failed(self.socket_path, exc) from None
        except BaseException:
            sock.close()
            raise
        if self._closed:  # close() while we connected
            transport.close()
            raise E.ECONNRESET("the client is closed")
        self._transport, self._sock, self._lost = transport, sock, None
        self.generation += reconnecting  # (now: a stream of the old connection must not pass for this one's)
        self._guard_loop(loop)
        try:
            hello = await asyncio.wait_for(self._write(Op.HELLO, self._hello), common.HELLO_TIMEOUT)
        except TimeoutError:  # keyden answers HELLO at once: whatever does not is no keyden
            self._lose(common.no_hello(self.socket_path, common.HELLO_TIMEOUT))
            raise self._lost_error() from None
        except BaseException:
            self._lose(self._lost or E.ECONNRESET("connection to keyden lost during HELLO"))
            raise
        wire.decoder.max_frame = common.MAX_REPLY_FRAME
        self.version, self.max_frame, self.uid, self.gid, self.pid = hello

    def _behind_gate(self, op: Op, args: tuple, future: asyncio.Future | None = None) -> asyncio.Future:
        """Queue a request for the new connection, and open it if no request has yet: the queue is written
        after its HELLO, in call order, before any later request.  Queued here, at call time: a request
        that waited in a task of its own could find the gate open again once its task ran, and open a
        second connection over the healthy one, whose requests then waited for good."""
        if future is None:
            future = self._loop.create_future()
        if self._reopening is None:  # each reconnect has a queue of its own, which its clean-up empties
            self._gated = deque()
            self._reopening = asyncio.ensure_future(self._reopen(self._gated))
            self._reopening.add_done_callback(functools.partial(self._reopened, self._gated))
        self._gated.append((op, args, future))
        return future

    def _reopened(self, gated: deque, reopening: asyncio.Task) -> None:
        """However the reopen ended (a task cancelled before its first step never ran its body: the
        gate stayed shut for good), the gate opens, and nothing waits behind it."""
        if self._reopening is reopening:
            self._reopening = None
        _fail_all(gated, lambda: E.ECONNRESET("the reconnect was cancelled"))

    async def _reopen(self, gated: deque) -> None:
        """Open the new connection, then write the requests queued for it: once, so a daemon that keeps
        dropping us costs each request one attempt, not a loop.  If it cannot be opened, they fail with why.
        A request cancelled meanwhile is not sent; the connection is opened all the same (were it not,
        the next request would open a second one, and the first would be left open)."""
        reopening = asyncio.current_task()
        try:
            await self._open(reconnecting=True)
        except E.KeydenError as exc:
            _fail_all(gated, lambda exc=exc: copy.copy(exc))  # one exception object per request, as _lost_error
        except Exception as exc:
            _fail_all(gated, lambda exc=exc: exc)
        else:  # (a cancellation, or KeyboardInterrupt, goes on up: _reopened fails what waits)
            while gated:
                op, args, future = gated.popleft()
                if self._lost is None and self._transport.is_closing():  # lost already: fail, not write
                    self._lose(E.ECONNRESET("the daemon closed the connection"))
                if self._closed:
                    if not future.done():
                        future.set_exception(E.ECONNRESET("the client is closed"))
                elif not future.done():
                    self._write(op, args, future=future)
        finally:
            if self._reopening is reopening:
                self._reopening = None

    # ------------------------------------------------------------ transport

    def _send(self, op: Op, args: tuple) -> asyncio.Future:
        """One request, written now, or after the new connection's HELLO if the old one is gone."""
        if self._closed and self._sock is not None and not (self._loop and self._loop.is_running()):
            self._close_here()  # a close handed to a loop that stopped first: its socket goes now
        if self._loop is not _running_loop() and not self._closed:
            try:
                self._move_to_running_loop()
            except E.KeydenError as exc:
                return _failed(exc)
        if self._lost is None and not self._closed and self._transport.is_closing():
            self._lose(E.ECONNRESET("the daemon closed the connection"))  # before the loop told us
        if not self._closed and (self._reopening is not None or self._lost is not None and self.reconnect):
            return self._behind_gate(op, args)
        return self._write(op, args, resend=self.reconnect)

    def _write(self, op: Op, args: tuple, resend: bool = False, future: asyncio.Future | None = None
               ) -> asyncio.Future:
        """Write one request; the future (``future``, or a new one) gets the op's shaped result or its
        KeydenError.  ``resend``: if the write finds the daemon gone (nothing of the request went out),
        write it on a new connection."""
        try:
            if self._lost is not None:
                raise self._lost_error()
            rid = next(self._ids) & 0xFFFFFFFF
            while rid == 0 or rid in self._pending:  # 0 is for connection-level errors
                rid = next(self._ids) & 0xFFFFFFFF
            frame = W.encode_request(rid, op, *args)
            if len(frame) - W.HEADER_SIZE > self.max_frame:
                raise E.EMSGSIZE(f"request of {len(frame)} bytes exceeds the daemon's {self.max_frame}-byte cap")
        except E.KeydenError as exc:
            if future is None:
                return _failed(exc)
            future.set_exception(exc)
            return future
        if future is None:
            future = self._loop.create_future()
        self._pending[rid] = (future, op, args)
        transport = self._transport
        sent_whole_or_failed = transport.get_write_buffer_size() == 0  # the transport tries one send at once
        transport.write(frame)
        if resend and sent_whole_or_failed and transport.is_closing():
            # That send failed (EPIPE: the daemon closed before we noticed), so none of it went out.
            del self._pending[rid]
            self._lose(E.ECONNRESET("the daemon closed the connection"))
            return self._behind_gate(op, args, future)
        return future

    def _guard_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connection while its loop can still do it: an async generator the loop knows, which
        ``asyncio.run`` (``shutdown_asyncgens``) closes before it closes the loop.  A transport left to a
        closed loop could never be closed by it ('unclosed transport' at garbage collection); the next
        request, on another loop, connects anew."""
        self._end_guard()
        armed = [self._transport]
        guard = _closed_with_loop(weakref.ref(self), armed)
        with warnings.catch_warnings(record=True) as late:  # a loop whose shutdown has begun warns: no guard
            warnings.simplefilter("always")
            try:
                guard.asend(None).send(None)  # first iteration: the running loop's hooks register it
            except StopIteration:
                pass
        self._guard = weakref.finalize(self, _disarm, armed, guard)  # and when the client goes first
        if late:
            self._end_guard()

    def _end_guard(self) -> None:
        """Disarm and finish the current guard here and now (it has nothing to await): neither the loop
        nor the garbage collector is asked to later, when the loop may be gone, or the parent's (fork)."""
        if self._guard is not None:
            self._guard()
            self._guard = None

    def _move_to_running_loop(self) -> None:
        """A request from another loop than the connection's: EBUSY if that loop still runs (in another
        thread); if it has stopped, its connection can never be served again, so it is dropped and the
        request opens a new one on this loop."""
        old = self._loop
        if old is not None and old.is_running():
            raise E.EBUSY("this client's connection belongs to an event loop running in another thread: "
                          "connect a client per event loop")
        if self._transport is not None and not old.is_closed():
            self._transport.abort()  # unregistered from the old loop's selector
        self._forget_connection(E.ECONNRESET("the event loop this client's connection was opened in has "
                                             "stopped"))
        self._loop = asyncio.get_running_loop()  # where the next connection will be: requests wait for it here

    def _leave_parents_connection(self) -> None:
        """In a forked child: forget the parent's connection.  Its socket stays open in the parent; the child
        neither closes it through the transport (that would unregister it from the epoll instance the parent
        shares) nor reads it."""
        self._forget_connection(E.ECONNRESET("the connection was the parent process's (fork)"))

    def _forget_connection(self, error: E.KeydenError) -> None:
        """Drop every trace of the current connection and loop without using them: requests in flight
        there belong to that loop and are abandoned; the next request connects on the running loop.  The
        socket is closed now, not whenever the old loop or the garbage collector gets to it (in a forked
        child, only the child's descriptor closes: the parent's connection goes on)."""
        self._end_guard()
        if self._sock is not None:
            self._sock.close()
        self._transport, self._sock, self._loop, self._lost = None, None, None, error
        self._pending, self._reopening, self._gated = {}, None, deque()
        self.helper_streams = asyncio.Semaphore(MAX_HELPER_STREAMS)  # a semaphore binds to its first loop

    def _deliver(self, frame: W.Frame) -> None:
        if frame.status and frame.op == 0:  # connection-level error: the daemon closes next
            self._lose(W.error_of(frame))
            return
        entry = self._pending.pop(frame.request_id, None)
        if entry is None:
            return  # answer to a request whose caller is gone
        future, op, args = entry
        if future.done():
            return
        try:
            if frame.status:
                raise W.error_of(frame)
            values = W.response_schema(op).decode(frame.body)
            future.set_result(common.shape(op, values))
        except E.KeydenError as exc:
            future.set_exception(exc)

    def _lose(self, error: E.KeydenError) -> None:
        """Fail every request in flight, and every later one, with ``error``."""
        if self._lost is None:
            self._lost = error
        pending, self._pending = self._pending, {}
        for future, _op, _args in pending.values():
            if not future.done():
                future.set_exception(self._lost_error())
        if self._transport is not None:
            self._transport.abort()  # not close(): requests still buffered would be sent to no one, for as long
            #                          as the daemon took to read them (the loop may be gone by then)

    def _lost_error(self) -> E.KeydenError:
        """A fresh exception per failed request, so tracebacks do not pile up on one object."""
        return type(self._lost)(self._lost.message)

    def _call(self, op: Op, *args: Any) -> asyncio.Future:
        try:
            keys = [common.key_id(a.value) if isinstance(a, Ref) else a for a in args]
        except E.KeydenError as exc:
            return _failed(exc)
        if not any(isinstance(k, tuple) for k in keys):
            return self._send(op, tuple(keys))
        return _running_loop().create_task(self._resolve_then_send(op, keys))

    async def _resolve_then_send(self, op: Op, keys: list) -> Any:
        found = await asyncio.gather(*(self._send(Op.FIND, k) for k in keys if isinstance(k, tuple)))
        serials = iter(found)
        return await self._send(op, tuple(next(serials) if isinstance(k, tuple) else k for k in keys))

    # --------------------------------------------------------------- handles

    async def key(self, ref) -> KeyHandle:
        """A handle for a serial, '@s'-style name or '%type:description' (found first, as the blocking client)."""
        return KeyHandle(self, await self._serial(ref))

    async def keys(self) -> list:
        """Every key you may view, as /proc/keys lists them (KeyStatus), serial order."""
        found, after = await self.keys_page()
        while after:
            page, after_next = await self.keys_page(after)
            after = common.next_page(after, after_next)
            found += page
        return found

    async def public_key(self, key):
        spki, _cert = await self.public_key_bytes(key)
        return load_public_key(spki)

    async def certificate(self, key):
        from cryptography import x509

        _spki, cert = await self.public_key_bytes(key)
        return x509.load_der_x509_certificate(cert) if cert else None

    def private_key(self, key):
        raise E.EOPNOTSUPP("pyca key objects are synchronous: use a blocking client (keyden.connect) "
                           "for private_key(), or pkey_sign/pkey_decrypt here")

    def _no_tls(self, *args, **kwargs) -> asyncio.Future:
        """EOPNOTSUPP at ``await``, as the operations' refusals, with how to do it instead."""
        return _failed(E.EOPNOTSUPP(
            "the asyncio client passes no descriptors, so it has no TLS: run a blocking client's (keyden.connect) "
            "in a thread, plain, info = await asyncio.to_thread(c.tls_accept, sock, ...), then "
            "reader, writer = await asyncio.open_connection(sock=plain) (docs/tls.md)"))

    tls_accept = tls_connect = tls_abort = tls_close_notify = tls_peer_end = _no_tls

    # ---------------------------------------------------- data shoveling by serial

    async def _serial(self, key) -> int:
        ref = common.key_id(key)
        return await self._send(Op.FIND, ref) if isinstance(ref, tuple) else ref

    async def aead(self, key, alg: str | None = None) -> AsyncAead:
        """pyca AESGCM's shape, awaitable, the key staying in keyden (``aead = await c.aead(serial)``).
        Without ``alg``: the AEAD genkey made the key for, else gcm(aes) (one request to ask: make the
        helper once)."""
        serial = await self._serial(key)
        if alg is None:
            try:
                made_for = await self.key_algorithm(serial)
            except E.ENOSYS:  # a daemon older than KEY_ALGORITHM: the default it had
                made_for = ""
            alg = aead_algorithm(serial, made_for)
        return AsyncAead(self, serial, alg)

    async def hmac(self, key, alg: str = "hmac(sha256)") -> AsyncMac:
        return AsyncMac(self, await self._serial(key), alg)

    async def hash(self, alg: str = "sha256") -> AsyncStream:
        """A streaming hash: await update(data)..., then await finalize() -> (b'', digest).  ENOENT for a name
        that is not a hash."""
        symmetric.spec(alg, "hash")
        return await AsyncStream.open(self, alg)

    async def stream(self, alg: str, key=0, **kw) -> AsyncStream:
        return await AsyncStream.open(self, alg, await self._serial(key) if key else 0, **kw)

    # ------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        """Closed by its owner, or lost and not to be reopened."""
        return self._closed or (self._lost is not None and not self.reconnect)

    def close(self) -> "_Closed":
        """Close now; requests still in flight fail with ECONNRESET.  Done when it returns, and may be
        awaited too (``await c.close()``, as other asyncio clients are closed).  From another thread than
        the one its loop runs in, the close is handed to that loop (its transport and futures are that
        loop's alone): done soon after it returns."""
        self._closed = True
        loop = self._loop
        if loop is not None and loop.is_running() and not _runs_here(loop):
            if self._lost is None:  # later calls fail at once, whether or not the loop gets to the rest
                self._lost = E.ECONNRESET("the client is closed")
            try:
                loop.call_soon_threadsafe(self._close_here)
                return _CLOSED
            except RuntimeError:  # the loop closed meanwhile: nothing runs there any more
                pass
        self._close_here()
        return _CLOSED

    def _close_here(self) -> None:
        if self._loop is not None and not self._loop.is_running():  # a stopped loop would never close it
            if self._transport is not None and not self._loop.is_closed():
                self._transport.abort()  # unregistered from the loop's selector now; the socket closes here
            self._forget_connection(E.ECONNRESET("connection closed by the client"))
        self._end_guard()
        self._lose(E.ECONNRESET("connection closed by the client"))
        self._lost = E.ECONNRESET("the client is closed")  # whatever the connection died of before
        _fail_all(self._gated, self._lost_error)

    def on_connection(self, generation: int) -> bool:
        """Is the connection of ``generation`` (a stream's, a shared buffer's) still this client's, and alive?
        Not once it was lost, or its loop stopped (the next call opens a new one): then a stream of it says
        so at once, instead of sending its handle over the new connection, or waiting on the old loop's lock."""
        return self.generation == generation and self._lost is None and self._loop is not None \
            and self._loop.is_running()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __reduce__(self):
        raise TypeError("a keyden client connection cannot be pickled")


async def _closed_with_loop(client_ref: "weakref.ref[AsyncClient]", armed: list):
    """See ``AsyncClient._guard_loop``: closed by the loop's shutdown while armed, it closes the connection
    it guards if that is still the client's."""
    try:
        yield
    finally:
        if armed[0] is not None:  # the loop's shutdown, which closes every async generator at once: a user's
            # may still use this client in its own cleanup, so theirs end first
            current = asyncio.current_task()
            others = [task for task in asyncio.all_tasks() if task is not current and not task.done()
                      and type(task.get_coro()).__name__ == "async_generator_athrow"]
            if others:
                await asyncio.wait(others)
        client, transport = client_ref(), armed[0]
        if client is not None and transport is not None and client._transport is transport \
                and not transport.is_closing():
            client._lose(E.ECONNRESET("the event loop this client's connection was opened in has stopped"))


def _disarm(armed: list, guard) -> None:
    armed[0] = None
    try:
        guard.aclose().send(None)
    except (StopIteration, RuntimeError):
        pass


class _Closed:
    """What ``close`` returns: already done, and awaitable for code that awaits a close."""

    __slots__ = ()

    def __await__(self):
        return iter(())


_CLOSED = _Closed()


def _deferring(method):
    """An operation whose argument errors (EINVAL) reach the caller at ``await``, as the daemon's errors do."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except E.KeydenError as exc:
            return _failed(exc)
    return call


for _name, _method in vars(Operations).items():
    if not _name.startswith("_") and callable(_method) and _name not in vars(AsyncClient):
        setattr(AsyncClient, _name, _deferring(_method))
del _name, _method


async def connect(socket: str | None = None, *, session: str | None = None, reconnect: bool = True) -> AsyncClient:
    """Connect to the daemon and return an ``AsyncClient`` (use as ``async with await connect(...)``)."""
    return await AsyncClient.connect(socket, session=session, reconnect=reconnect)
