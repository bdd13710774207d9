"""Symmetric crypto by key serial for the asyncio client: the blocking client's helpers, awaitable.

``await c.aead(serial).encrypt(nonce, data, aad)`` has pyca ``AESGCM``'s shape, as the blocking
client's ``Aead`` has.  asyncio transports pass no descriptors, so there is no shared memory here:
data that fits one request goes in one; larger ``gcm(aes)`` data streams in pipelined pieces (a few on
the wire at once: ``_pipelined``); larger data of an algorithm that cannot stream is EMSGSIZE (the
blocking client's shared memory takes it).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Awaitable, Callable, Iterable, Sequence, TypeVar

from keyden import errors as E
from keyden.client.dataplane import (_OVERHEAD, DEFAULT_AEAD, HMAC_FAILED, PIECE, KeyedAlgorithm, MacMismatch,
                                     _final_fields, _fits, _piece, _raise_first, _room, _stale, _still_open,
                                     _uncopyable_stream, _view, item_error, pyca_errors, take_abandoned)
from keyden.client.operations import binary

#: streams one client's helpers keep open at once (the daemon allows 64 per connection; the rest wait)
MAX_HELPER_STREAMS = 32
_CLOSING: set[asyncio.Future] = set()  # aborts of streams opened for callers who had gone, until they are done
T = TypeVar("T")


async def _open(client, alg: str, key: int, **kw) -> tuple[int, bytes]:
    """STREAM_INIT: (handle, nonce keyden chose or b""), as ``_new_stream`` makes streams."""
    return await _new_stream(client, lambda: client.stream_init(alg, key, **kw), lambda reply: reply[0])


async def _new_stream(client, request: Callable[[], Awaitable[T]], handle_of: Callable[[T], int]) -> T:
    """``request()`` (STREAM_INIT or STREAM_COPY) safe against cancellation: a stream opened for a caller who
    has gone is closed (``handle_of`` finds it in the reply).  Streams dropped unfinished are closed first,
    so they never fill the connection's 64."""
    dropped = [_abort(client, handle) for handle in take_abandoned(client)]
    if dropped:  # taken off the queue: shielded, so a caller's cancellation cannot leave them open for good
        await asyncio.shield(asyncio.gather(*dropped))
    opening = asyncio.ensure_future(request())
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        def close_it(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                _closing(_abort(client, handle_of(done.result())))
        opening.add_done_callback(close_it)
        raise


#: pieces of one large helper call on the wire at once: enough to keep the daemon busy, and a bound on what
#: the transport buffers (all of a 200 MiB call's pieces at once took as much memory again, and building
#: them held the loop so long that the daemon's idle timeout cut the connection)
WINDOW = 4


async def _pipelined(send: Callable[[int], Awaitable[T]], offsets: range) -> list[T]:
    """``send(offset)`` for each offset, in order, with at most WINDOW replies outstanding; their results
    in order.  On any failure (or cancellation) the requests still out are given up (their replies are
    dropped as they come), and it raises."""
    results: list[T] = []
    out: list[Awaitable[T]] = []
    try:
        for offset in offsets:
            out.append(send(offset))
            if len(out) >= WINDOW:
                results.append(await out.pop(0))
        while out:
            results.append(await out.pop(0))
    except BaseException:
        for future in out:
            if isinstance(future, asyncio.Future):
                future.cancel()
        raise
    return results


def _closing(abort: Awaitable[None]) -> None:
    """Run a stream's abort in the background, for a caller who has gone: kept until done (the loop holds
    tasks weakly)."""
    task = asyncio.ensure_future(abort)
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


def _copied(out: bytes, into: memoryview) -> int:
    into[:len(out)] = out
    return len(out)


class AsyncAead(KeyedAlgorithm):
    """An AEAD key held by keyden, for the asyncio client: encrypt(nonce, data, aad) -> ct || tag."""

    KIND = "aead"

    def __init__(self, client, serial: int, alg: str = DEFAULT_AEAD):
        super().__init__(client, serial, alg)

    async def _run(self, nonce, data, aad, decrypt: bool, random_nonce: bool = False) -> bytes:
        with pyca_errors(decrypt):
            return await self._crypt(nonce, data, aad, decrypt, random_nonce)

    async def _crypt(self, nonce, data, aad, decrypt: bool, random_nonce: bool) -> bytes:
        data, aad, nonce = binary(data), binary(aad or b"", "associated_data"), binary(nonce, "nonce")
        streams = self.alg == "gcm(aes)"
        one_request = len(data) + len(aad) + _OVERHEAD <= self._client.max_frame
        if one_request and (len(data) < PIECE or not streams):
            return await self._client.cipher(self.alg, self.serial, data, iv=nonce, aad=aad, decrypt=decrypt,
                                             random_nonce=random_nonce)
        if not streams:
            raise E.EMSGSIZE(f"{len(data)} bytes of {self.alg} do not fit one request and it cannot stream; "
                             "use the blocking client (shared memory) or gcm(aes)")
        async with self._client.helper_streams:
            return await self._pieces(nonce, data, aad, decrypt, random_nonce)

    async def _pieces(self, nonce, data: bytes, aad: bytes, decrypt: bool, random_nonce: bool) -> bytes:
        """A stream, its pieces pipelined (``_pipelined``).  Decrypting, nothing is returned unless the tag checks
        out at the end, so unauthenticated plaintext never reaches the caller."""
        tag = b""
        if decrypt:
            if random_nonce:  # nonce || ct || tag, as encrypt_random makes it
                nonce, data = data[:self.nonce_size], data[self.nonce_size:]
                random_nonce = False
            if len(data) < self.tag_size:
                raise E.EBADMSG("authentication failed")
            data, tag = data[:-self.tag_size], data[-self.tag_size:]
        client = self._client
        handle, chosen = await _open(client, self.alg, self.serial, iv=b"" if random_nonce else nonce,
                                     aad=aad, decrypt=decrypt, random_nonce=random_nonce)
        view, piece = memoryview(data), _piece(client)
        try:
            outs = await _pipelined(lambda i: client.stream_update(handle, view[i:i + piece]),
                                    range(0, len(view), piece))
            last, final_tag = await client.stream_final(handle, b"", tag)
        except BaseException:
            await asyncio.shield(_abort(client, handle))  # EBADF if it already ended: ignored
            raise
        return chosen + b"".join(outs) + last + final_tag

    async def encrypt(self, nonce, data, associated_data=None) -> bytes:
        return await self._run(nonce, data, associated_data, False)

    async def decrypt(self, nonce, data, associated_data=None) -> bytes:
        """Raises EBADMSG, with no detail, if authentication fails."""
        return await self._run(nonce, data, associated_data, True)

    async def encrypt_into(self, nonce, data, associated_data, buf) -> int:
        """As pyca's: ValueError, before any work, if ``buf`` cannot hold ciphertext and tag."""
        into = _room(buf, _view(data).nbytes + self.tag_size)
        return _copied(await self._run(nonce, data, associated_data, False), into)

    async def decrypt_into(self, nonce, data, associated_data, buf) -> int:
        """Nothing is written to ``buf`` unless the tag checks out."""
        into = _room(buf, _view(data).nbytes - self.tag_size)
        return _copied(await self._run(nonce, data, associated_data, True), into)

    async def encrypt_random(self, data, associated_data=None) -> bytes:
        """keyden picks the nonce: returns nonce || ct || tag, so a nonce can never be reused by mistake."""
        return await self._run(b"", data, associated_data, False, random_nonce=True)

    async def decrypt_random(self, blob, associated_data=None) -> bytes:
        """Takes nonce || ct || tag, as encrypt_random makes it."""
        return await self._run(b"", blob, associated_data, True, random_nonce=True)

    async def encrypt_batch(self, nonces: Sequence[bytes] | None, items: Sequence[bytes],
                            associated_data: Sequence[bytes] | None = ()) -> list[bytes]:
        """Many small messages in one round trip; ``nonces=None`` lets keyden choose (nonce || ct || tag)."""
        status, out = await self._client.batch(self.alg, self.serial, items, ivs=nonces or (),
                                               aads=associated_data or (), random_nonce=nonces is None)
        return _raise_first(status, out)

    async def decrypt_batch(self, nonces: Sequence[bytes] | None, items: Sequence[bytes],
                            associated_data: Sequence[bytes] | None = ()) -> list[bytes | E.KeydenError]:
        """Per item: the plaintext, or the error it failed with (``AuthenticationFailed`` for a bad tag)."""
        status, out = await self._client.batch(self.alg, self.serial, items, ivs=nonces or (),
                                               aads=associated_data or (), decrypt=True, random_nonce=nonces is None)
        return [o if s == 0 else item_error(s) for s, o in zip(status, out)]


class AsyncMac(KeyedAlgorithm):
    """An HMAC key held by keyden, for the asyncio client."""

    KIND = "hmac"

    def __init__(self, client, serial: int, alg: str = "hmac(sha256)"):
        super().__init__(client, serial, alg)

    async def mac(self, data) -> bytes:
        data = binary(data)
        if _fits(self._client, data):
            return await self._client.mac(self.alg, self.serial, data)
        async with self._client.helper_streams:
            return (await _in_pieces(await self.stream(), data))[1]

    async def verify(self, data, tag) -> None:
        """None if the tag matches; EBADMSG if not (compared in constant time inside keyden)."""
        data, tag = binary(data), binary(tag, "tag")
        if len(tag) != self.digest_size:  # as the blocking Mac: a mismatch, as pyca's verify says
            raise MacMismatch(HMAC_FAILED)
        try:
            if _fits(self._client, data):
                await self._client.mac_verify(self.alg, self.serial, data, tag)
            else:
                async with self._client.helper_streams:
                    await _in_pieces(await self.stream(verify=True), data, tag)
        except E.EBADMSG as exc:
            raise MacMismatch(exc.message) from None

    async def mac_batch(self, items: Iterable[bytes]) -> list[bytes]:
        status, out = await self._client.batch(self.alg, self.serial, items)  # (any iterable, or EINVAL)
        return _raise_first(status, out)

    async def stream(self, verify: bool = False) -> "AsyncStream":
        return await AsyncStream.open(self._client, self.alg, self.serial, decrypt=verify)


class AsyncStream:
    """Data of any size in pieces (AF_ALG with MSG_MORE), awaitable: ``s = await c.stream(...)``, then
    ``await s.update(data)`` as often as needed and ``await s.finalize()``.  ``async with`` closes one
    left unfinished."""

    def __init__(self, client, handle: int, nonce: bytes, alg: str, decrypt: bool):
        self._client, self.handle, self.nonce = client, handle, nonce
        self.alg, self.decrypt = alg, decrypt
        self.generation = client.generation  # the connection it is open on
        self.done = False
        self._in_order = asyncio.Lock()  # held while an update or finalize larger than a frame sends its pieces
        # Dropped unfinished (pyca's hash contexts need no cleanup, so code does drop them): queued, and
        # aborted before the client's next stream opens (a finalizer cannot await).
        self._dropped = weakref.finalize(self, client.abandoned_streams.append, (handle, self.generation))

    @classmethod
    async def open(cls, client, alg: str, key=0, *, iv=b"", aad=b"", decrypt: bool = False,
                   random_nonce: bool = False) -> "AsyncStream":
        handle, nonce = await _open(client, alg, key, iv=iv, aad=aad, decrypt=decrypt, random_nonce=random_nonce)
        return cls(client, handle, nonce, alg, decrypt)

    async def copy(self) -> "AsyncStream":
        """A second stream that goes on from here, as pyca's ``Hash.copy``/``HMAC.copy`` (the blocking
        ``Stream.copy``, awaitable; cancelled while the copy is made, the copy is closed)."""
        _still_open(self)
        client = self._client
        async with self._in_order:  # not halfway through another task's update
            _still_open(self)
            handle = await _new_stream(client, lambda: client.stream_copy(self.handle), lambda handle: handle)
        return type(self)(client, handle, self.nonce, self.alg, self.decrypt)

    async def update(self, data) -> bytes:
        """The output so far; data more than one request may carry under the daemon's frame cap goes in
        pieces, one after the other, and no other update or finalize of the stream comes between them."""
        _still_open(self)
        data = binary(data)
        async with self._in_order:  # (taken at once when free: a piece goes out as the call is made)
            _still_open(self)  # (finalized while this waited)
            if len(data) > self._client.max_frame - _OVERHEAD:
                return await self._update_in_pieces(data)
            sent = self._client.stream_update(self.handle, data)
        return await self._answer(sent)

    async def _update_in_pieces(self, data) -> bytes:
        """(Holding ``_in_order``.)  ``data`` in frame-sized updates, one answer awaited before the next."""
        view, piece = memoryview(data), self._client.max_frame - _OVERHEAD
        return b"".join([await self._answer(self._client.stream_update(self.handle, view[at:at + piece]))
                         for at in range(0, len(view), piece)])

    async def _answer(self, sent: Awaitable[bytes]) -> bytes:
        """An update's output; its request is on the wire already: it happens, or not."""
        try:
            return await sent
        except E.EMSGSIZE:  # refused before anything was processed: the stream is still open
            raise
        except E.KeydenError:
            self._over()  # closed by keyden (its key revoked, a piece it could not take) or gone with the connection
            raise
        except asyncio.CancelledError:
            # Whether keyden took the piece is unknown to the caller, who may send it again: a stream that
            # went on would hash it twice, or seal a ciphertext part of which the caller never saw.  So it
            # ends here (StreamFinished from now on), as the blocking client's interrupted request ends
            # its connection and its streams with it.
            self._over()
            if not _stale(self._client, self.generation):
                _closing(_abort(self._client, self.handle))
            raise

    async def finalize(self, data=b"", tag=b"") -> tuple[bytes, bytes]:
        """(last output, tag): the AEAD tag when encrypting, else the digest or MAC.

        The stream ends with the daemon's answer, whatever it is; if the request cannot go out (bad
        arguments), it is still open, and ``abort`` or ``async with`` closes it.  Data too large to
        come back in one reply with the tag goes through ``update`` first.
        """
        _still_open(self)
        data, tag = _final_fields(self, data, tag)
        head = b""
        # Held through the pieces and the answer: no update comes between them and the end, and one waiting
        # behind finds the stream finished.
        async with self._in_order:
            _still_open(self)
            if len(data) + len(tag) + _OVERHEAD > self._client.max_frame:  # the reply must fit: output and tag
                head, data = await self._update_in_pieces(data), b""
            try:
                out, last = await self._client.stream_final(self.handle, data, tag)
            except E.EMSGSIZE:  # refused before anything was processed: the stream is still open
                raise
            except BaseException:
                self._over()
                raise
            self._over()
        return (head + out if head else out), last

    def _over(self) -> None:
        self.done = True
        self._dropped.detach()

    async def abort(self) -> None:
        if not self.done:
            self._over()
            if not _stale(self._client, self.generation):  # else it went with its connection
                await _abort(self._client, self.handle)

    async def __aenter__(self) -> "AsyncStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.abort()  # not finalized by the end of the block: closed in keyden too

    __copy__ = __deepcopy__ = __reduce__ = _uncopyable_stream


async def _abort(client, handle: int) -> None:
    try:
        await client.stream_abort(handle)
    except E.KeydenError:
        pass


async def _in_pieces(stream: AsyncStream, data: bytes, tag: bytes = b"") -> tuple[bytes, bytes]:
    """``data`` through the stream in pipelined pieces, then the stream finished (checking ``tag`` if given)."""
    view, piece = memoryview(data), _piece(stream._client)
    client = stream._client
    try:
        await _pipelined(lambda i: client.stream_update(stream.handle, view[i:i + piece]),
                         range(0, len(view), piece))
    except BaseException:
        await asyncio.shield(stream.abort())
        raise
    return await stream.finalize(tag=tag)
