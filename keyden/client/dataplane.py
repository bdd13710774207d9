"""Symmetric crypto by key serial, shaped like pyca's own classes.

``client.aead(serial)`` behaves like ``AESGCM``: the key stays in keyden.
Small calls go over the socket; large buffers go through a shared memory
region (a sealed memfd passed once with SCM_RIGHTS and mapped by both
sides), so bulk data is never copied through the socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import mmap
import operator
import os
import threading
import time
import weakref
from collections import deque
from typing import Iterable, Sequence

from cryptography.exceptions import AlreadyFinalized, InvalidSignature, InvalidTag

from keyden import errors as E
from keyden.client import common
from keyden.client.operations import Ref, as_value_error, binary, cipher_flags
from keyden.core.flags import FOR_USE
from keyden.crypto import symmetric
from keyden.protocol import MAX_SHARED_REGION, Op


class AuthenticationFailed(E.EBADMSG, InvalidTag):
    """An AEAD helper's EBADMSG, also pyca's ``InvalidTag``: code written for ``AESGCM`` catches it as is."""


class MacMismatch(E.EBADMSG, InvalidSignature):
    """``Mac.verify``'s EBADMSG, also pyca's ``InvalidSignature``, as ``HMAC.verify`` raises (a tag of the
    wrong length too: an attacker's truncated tag is a mismatch, not an argument error to crash on)."""


class StreamFinished(E.EBADF, AlreadyFinalized):
    """``update``, ``finalize`` or ``copy`` of a stream that was finalized or aborted: EBADF, the daemon's
    word for a stream it no longer holds, and pyca's ``AlreadyFinalized``, as a finished pyca context raises."""


HMAC_FAILED = "HMAC verification failed"  # the daemon's own words for a mismatch


#: buffers at least this large go through shared memory
BULK_THRESHOLD = 256 * 1024
#: pieces one SharedBuffer.cipher_many sends at once (it holds the client's connection until the last answer)
MAX_PIPELINED = 1024
#: MAC data at least this large goes in stream pieces of this size (smaller pieces under a small frame cap)
PIECE = 1 << 20
#: what a request carries besides its data and associated data (names, fields, lengths), generously
_OVERHEAD = 4096


def _piece(client) -> int:
    return min(PIECE, client.max_frame - _OVERHEAD)


def _fits(client, data: bytes, aad: bytes = b"") -> bool:
    """Worth one request (the asyncio helpers pipeline pieces from 1 MiB on)."""
    return _one_request(client, data, aad) and len(data) < PIECE


def _one_request(client, data: bytes, aad: bytes = b"") -> bool:
    return len(data) + len(aad) + _OVERHEAD <= client.max_frame


class SharedBuffer:
    """A memfd mapped here and in the daemon.  ``view`` is the whole region."""

    def __init__(self, client, size: int):
        """Raises ENOMEM when the daemon's shared-memory budget (per uid, or in all) has no room for ``size``."""
        try:  # an int, or what stands for one (numpy's); never a float, a str or a bool
            size = -1 if isinstance(size, bool) else operator.index(size)
        except TypeError:
            size = -1
        if not 0 < size <= MAX_SHARED_REGION:
            raise E.EINVAL(f"a shared buffer is 1..{MAX_SHARED_REGION} bytes")
        _detach_abandoned(client)
        fd = os.memfd_create("keyden-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.map = None
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.region = client._call_with_fds(Op.SHM_ATTACH, (size,), [fd])[0]
        except BaseException:
            if self.map is not None:  # refused: do not keep the memory mapped here either
                self.map.close()
            raise
        finally:
            os.close(fd)  # the daemon has its own copy; our mapping keeps the memory
        self.client = client
        self.generation = client.generation  # the connection it is attached over
        self.size = size
        self.view = memoryview(self.map)
        # Dropped without close(), it would hold one of the connection's 8 regions, and its size in the uid's
        # budget, until the connection ends: detached by the client's next attach (as streams: a finalizer
        # must not send a request, which could run inside another on this thread).
        self._dropped = weakref.finalize(self, client.abandoned_regions.append, (self.region, self.generation))

    def cipher(self, alg: str, key, in_offset: int, length: int, out_offset: int, *, iv=b"", aad=b"",
               decrypt: bool = False, random_nonce: bool = False) -> tuple[int, bytes]:
        """Process view[in_offset:+length] into view[out_offset:] inside keyden: (bytes written, nonce chosen)."""
        _same_connection(self.client, self.generation, "shared buffer")
        fields = self._fields(alg, Ref(key), cipher_flags(decrypt, random_nonce), binary(iv, "nonce"),
                              binary(aad or b"", "associated_data"), (in_offset, length, out_offset))
        return self.client._call(Op.SHM_CIPHER, *fields)

    def cipher_many(self, alg: str, key, ranges: Iterable[tuple[int, int, int]], *, ivs=None, aads=None,
                    decrypt: bool = False, random_nonce: bool = False) -> list[tuple[int, bytes] | E.KeydenError]:
        """``cipher`` for each ``(in_offset, length, out_offset)`` of ``ranges`` (at most MAX_PIPELINED), with
        the IV and associated data at the same place in ``ivs`` and ``aads`` (None: none for any), all sent
        at once: one round trip (after a lookup, for a key named by description), and the daemon goes from
        one to the next, in order, without waiting for the client.

        Each result is what ``cipher`` returns, or the KeydenError that piece got (EBADMSG for a decryption
        that failed: its output range is zeroed; EINVAL for a range outside the region), so one bad piece
        loses none of the others: check each before using its output.  Arguments of the wrong shape are
        refused whole, before anything is sent.
        """
        ranges = _sequence(ranges, "ranges")
        count = len(ranges)
        if not 0 < count <= MAX_PIPELINED:
            raise E.EINVAL(f"cipher_many takes 1..{MAX_PIPELINED} ranges")
        ivs = [b""] * count if ivs is None else _sequence(ivs, "ivs")
        aads = [b""] * count if aads is None else _sequence(aads, "aads")
        if len(ivs) != count or len(aads) != count:
            raise E.EINVAL("ivs and aads, when given, have one entry per range")
        offsets = [_range(entry) for entry in ranges]
        ivs = [binary(iv, "nonce") for iv in ivs]
        aads = [binary(aad or b"", "associated_data") for aad in aads]
        _same_connection(self.client, self.generation, "shared buffer")
        serial, flags = self.client._resolve((Ref(key),))[0], cipher_flags(decrypt, random_nonce)
        calls = [(Op.SHM_CIPHER, self._fields(alg, serial, flags, iv, aad, where))
                 for where, iv, aad in zip(offsets, ivs, aads)]
        return [r if isinstance(r, E.KeydenError) else common.shape(Op.SHM_CIPHER, r)
                for r in self.client._exchange(calls, raise_errors=False)]

    def _fields(self, alg: str, key, flags: int, iv: bytes, aad: bytes, offsets: tuple) -> tuple:
        """An SHM_CIPHER request's fields (the IV and associated data already checked as bytes)."""
        return (self.region, alg, key, flags, iv, aad, *offsets)

    def close(self) -> None:
        """Unmap the region here and detach it in the daemon.  BufferError, with nothing closed, while a
        slice of ``view`` is still in use (as mmap's close)."""
        if self.map is None:
            return
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            self.view = memoryview(self.map)
            raise BufferError("a view of this shared buffer is still in use: release it before close()") from None
        self.map = None
        self._dropped.detach()
        try:
            if not _stale(self.client, self.generation):  # else it went with its connection
                self.client._call(Op.SHM_DETACH, self.region)
        except E.KeydenError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: regions a client keeps for its helpers' large calls, and the largest it keeps after a call (a bigger one is
#: given back to the daemon at once: a region pins its size in both processes and in the uid's budget)
POOLED_REGIONS = 4
TURN_WAIT = 0.0005  # seconds a large call waits before it looks again for a free turn (RegionPool.take)
POOLED_REGION_MAX = 64 << 20


class _Turn:
    """A thread's turn in a RegionPool (in a thread-local, so it goes when its thread does): [held?]."""

    __slots__ = ("held", "__weakref__")

    def __init__(self):
        self.held = [False]


def _thread_ended(pool_ref, held: list) -> None:
    """A thread that had a turn in a pool ended: the turn is given back, if the pool is still there."""
    pool = pool_ref()
    if pool is not None:
        pool._end_turn(held)


class RegionPool:
    """The shared regions behind one client's ``Aead`` helpers: a call takes one, gives it back after.

    Shared by every helper of the client, so helpers need no ``close`` (pyca's AESGCM has none): a
    program that makes an ``Aead`` per key and drops it, or runs them on many threads, has at most
    ``POOLED_REGIONS`` regions (more callers wait their turn: the daemon answers one request of a
    connection at a time anyway), never the daemon's 8 per connection, and no huge region stays
    mapped after its call.
    """

    def __init__(self, client):
        self._client = client
        self._free: list[SharedBuffer] = []
        self._lock = threading.Lock()  # for _free and the count of turns: never held across a request
        self._turns = 0  # threads holding a turn: POOLED_REGIONS at most
        self._mine = threading.local()  # this thread's _Turn (see take)

    def take(self, size: int) -> "SharedBuffer":
        """A region of at least ``size`` bytes over the current connection, for one call (``give_back``
        it after).

        A turn is its thread's, kept in a thread-local: a KeyboardInterrupt (or any exception a signal
        handler raises) between ``take`` and the ``try`` that gives the region back loses no turn for
        good, as the thread's next call finds its own, and a thread that ends gives its turn back (the
        thread-local goes with it).  Nor does a waiter hold a Python-level lock (threading.Semaphore's
        could stay locked): with every turn taken, it sleeps a little and looks again, which only a
        client making more than POOLED_REGIONS large calls at once on as many threads ever does.
        """
        turn = getattr(self._mine, "turn", None)
        if turn is None:
            turn = self._mine.turn = _Turn()
            weakref.finalize(turn, _thread_ended, weakref.ref(self), turn.held)  # (not self: the pool may go first)
        held = turn.held
        while not held[0]:
            with self._lock:
                if self._turns < POOLED_REGIONS:
                    self._turns += 1
                    held[0] = True
                    break
            time.sleep(TURN_WAIT)
        try:
            return self._take(size)
        except BaseException:
            self._end_turn(held)
            raise

    def _end_turn(self, held: list | None = None) -> None:
        held = held or self._mine.turn.held
        with self._lock:
            if held[0]:
                self._turns -= 1
                held[0] = False

    def _take(self, size: int) -> "SharedBuffer":
        with self._lock:
            dropped = [shm for shm in self._free if _stale(self._client, shm.generation)]
            kept = [shm for shm in self._free if shm not in dropped]
            fits = [shm for shm in kept if shm.size >= size]
            found = min(fits, key=lambda shm: shm.size) if fits else None
            if found is not None:
                kept.remove(found)
            elif kept:  # make room in the budget for a bigger one
                largest = max(kept, key=lambda shm: shm.size)
                kept.remove(largest)
                dropped.append(largest)
            self._free = kept
        for shm in dropped:
            shm.close()
        return found or SharedBuffer(self._client, max(size, 4 * BULK_THRESHOLD))

    def give_back(self, shm: "SharedBuffer") -> None:
        try:
            kept = False
            if shm.size <= POOLED_REGION_MAX and not _stale(self._client, shm.generation):
                with self._lock:
                    if len(self._free) < POOLED_REGIONS:  # (a call from a signal handler inside another
                        self._free.append(shm)            # may have taken one on its thread's turn)
                        kept = True
            if not kept:
                shm.close()
        finally:
            self._end_turn()

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for shm in free:
            shm.close()


#: what an AEAD helper uses for a key bound to nothing (added as bytes, derived, unwrapped by pkey_decrypt_into)
DEFAULT_AEAD = "gcm(aes)"


def aead_algorithm(serial: int, made_for: str) -> str:
    """The AEAD a helper uses for a key when none is named: the one genkey made the key for (its
    ``key_algorithm``), else gcm(aes).  A key made for something else is refused now, not at first use."""
    if not made_for:
        return DEFAULT_AEAD
    if made_for not in FOR_USE:  # a newer daemon's algorithm
        raise E.ENOPROTOOPT(f"key {serial} was generated for {made_for}, which this client does not know: "
                            "name the algorithm")
    found = symmetric.ALGORITHMS.get(made_for)  # (none for "hmac": a family)
    if found is None or found.kind != "aead":
        raise E.ENOPROTOOPT(f"key {serial} was generated for {made_for} only, not an AEAD")
    return made_for


class KeyedAlgorithm:
    """A key held by keyden with an algorithm of one kind (the blocking and asyncio helpers' common part):
    it holds the serial and the algorithm's name, never key material, and is not pickled."""

    KIND = ""

    def __init__(self, client, serial: int, alg: str):
        spec = symmetric.spec(alg, self.KIND)
        self._client, self.serial, self.alg = client, serial, alg
        self.nonce_size, self.tag_size, self.digest_size = spec.nonce_size, spec.tag_size, spec.digest_size

    def __reduce__(self):
        raise TypeError(f"{type(self).__name__} handles cannot be pickled: they name a key over a live connection")

    def __copy__(self):
        return self  # as a KeyHandle: a copy would name the same key over the same connection

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.alg} key={self.serial}>"

    def close(self) -> None:
        """Nothing to release (the client's RegionPool holds the shared regions): a ``with`` block reads well."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def pyca_errors(decrypt: bool):
    """An AEAD call's errors as pyca's AESGCM raises them too: a failed authentication is
    ``AuthenticationFailed`` (EBADMSG and InvalidTag); EINVAL (a nonce of the wrong size...) a ValueError."""
    try:
        yield
    except E.EBADMSG as exc:
        if decrypt:
            raise AuthenticationFailed(exc.message) from None
        raise
    except E.EINVAL as exc:
        raise as_value_error(exc) from None


class Aead(KeyedAlgorithm):
    """An AEAD key held by keyden, with pyca ``AESGCM``'s shape: encrypt(nonce, data, aad) -> ct || tag."""

    KIND = "aead"

    def __init__(self, client, serial: int, alg: str = DEFAULT_AEAD):
        super().__init__(client, serial, alg)

    def _run(self, nonce, data, aad, decrypt: bool, random_nonce: bool = False, into=None):
        """Small data over the socket, large data through shared memory; a keyden-chosen nonce is prepended.

        With ``into`` (a buffer with room, from ``*_into``), the output is written there and its length returned.
        """
        with pyca_errors(decrypt):
            return self._crypt(nonce, data, aad, decrypt, random_nonce, into)

    def _crypt(self, nonce, data, aad, decrypt: bool, random_nonce: bool, into):
        data = data if type(data) is bytes else _view(data)
        nonce, aad = binary(nonce, "nonce"), binary(aad or b"", "associated_data")
        if self._in_request(data, aad):
            out = self._client.cipher(self.alg, self.serial, data, iv=nonce, aad=aad or b"", decrypt=decrypt,
                                      random_nonce=random_nonce)
            if into is None:
                return out
            into[:len(out)] = out
            return len(out)
        n = len(data)
        out_len = n - self.tag_size if decrypt else n + self.tag_size
        if n + max(out_len, 0) > MAX_SHARED_REGION:
            raise E.EINVAL(f"one {self.alg} call takes at most {(MAX_SHARED_REGION - self.tag_size) // 2} bytes "
                           "(input and output share one shared-memory region); stream larger data")
        generation = self._client.generation
        try:
            return self._through_region(data, nonce, aad, decrypt, random_nonce, into, out_len)
        except E.EBADF:
            # The connection had gone (an idle timeout, a restart) and the request went out on a new one,
            # where the region does not exist: nothing was done, so once more with a region of this one.
            if self._client.generation == generation:
                raise
        return self._through_region(data, nonce, aad, decrypt, random_nonce, into, out_len)

    def _in_request(self, data, aad: bytes) -> bool:
        """Small data goes in the request itself; larger, or more than the daemon's frame cap takes (a
        setting), through a shared region, whose request carries only offsets and the associated data."""
        return len(data) < BULK_THRESHOLD and _one_request(self._client, data, aad)

    def _through_region(self, data, nonce, aad, decrypt: bool, random_nonce: bool, into, out_len: int):
        n = len(data)
        pool, shm = self._client.region_pool, None
        try:
            shm = pool.take(n + max(out_len, 0))
            shm.view[:n] = data
            written, chosen = shm.cipher(self.alg, self.serial, 0, n, n, iv=nonce, aad=aad, decrypt=decrypt,
                                         random_nonce=random_nonce)
            if into is None:
                return chosen + bytes(shm.view[n:n + written])
            into[:written] = shm.view[n:n + written]  # one copy, straight from the region
            return written
        finally:
            if shm is not None:
                pool.give_back(shm)

    def encrypt(self, nonce, data, associated_data=None) -> bytes:
        return self._run(nonce, data, associated_data, False)

    def decrypt(self, nonce, data, associated_data=None) -> bytes:
        """Raises EBADMSG, with no detail, if authentication fails."""
        return self._run(nonce, data, associated_data, True)

    def encrypt_into(self, nonce, data, associated_data, buf) -> int:
        """As pyca's: ValueError, before any work, if ``buf`` cannot hold ciphertext and tag."""
        into = _room(buf, _view(data).nbytes + self.tag_size)
        return self._run(nonce, data, associated_data, False, into=into)

    def decrypt_into(self, nonce, data, associated_data, buf) -> int:
        into = _room(buf, _view(data).nbytes - self.tag_size)
        return self._run(nonce, data, associated_data, True, into=into)

    def encrypt_random(self, data, associated_data=None) -> bytes:
        """keyden picks the nonce: returns nonce || ct || tag, so a nonce can never be reused by mistake."""
        return self._run(b"", data, associated_data, False, random_nonce=True)

    def decrypt_random(self, blob, associated_data=None) -> bytes:
        """Takes nonce || ct || tag, as encrypt_random makes it."""
        blob = blob if type(blob) is bytes else _view(blob)
        if self._in_request(blob, binary(associated_data or b"", "associated_data")):
            return self._run(b"", blob, associated_data, True, random_nonce=True)
        # shared memory takes the nonce as an IV: split it off here
        return self._run(bytes(blob[:self.nonce_size]), memoryview(blob)[self.nonce_size:], associated_data, True)

    def encrypt_batch(self, nonces: Sequence[bytes] | None, items: Sequence[bytes],
                      associated_data: Sequence[bytes] | None = ()) -> list[bytes]:
        """Many small messages in one round trip; ``nonces=None`` lets keyden choose (nonce || ct || tag)."""
        status, out = self._client.batch(self.alg, self.serial, items, ivs=nonces or (),
                                         aads=associated_data or (), random_nonce=nonces is None)
        return _raise_first(status, out)

    def decrypt_batch(self, nonces: Sequence[bytes] | None, items: Sequence[bytes],
                      associated_data: Sequence[bytes] | None = ()) -> list[bytes | E.KeydenError]:
        """Per item: the plaintext, or the error it failed with (``AuthenticationFailed`` for a bad tag)."""
        status, out = self._client.batch(self.alg, self.serial, items, ivs=nonces or (),
                                         aads=associated_data or (), decrypt=True, random_nonce=nonces is None)
        return [o if s == 0 else item_error(s) for s, o in zip(status, out)]



class Mac(KeyedAlgorithm):
    """An HMAC key held by keyden."""

    KIND = "hmac"

    def __init__(self, client, serial: int, alg: str = "hmac(sha256)"):
        super().__init__(client, serial, alg)

    def mac(self, data) -> bytes:
        data = binary(data)
        if _one_request(self._client, data):
            return self._client.mac(self.alg, self.serial, data)
        with self.stream() as stream:
            return _in_pieces(stream, data)[1]

    def verify(self, data, tag) -> None:
        """None if the tag matches; ``MacMismatch`` (EBADMSG and pyca's InvalidSignature) if not, compared in
        constant time inside keyden."""
        data, tag = binary(data), binary(tag, "tag")
        if len(tag) != self.digest_size:  # keyden compares full tags only; pyca's verify says this too
            raise MacMismatch(HMAC_FAILED)
        try:
            if _one_request(self._client, data):
                self._client.mac_verify(self.alg, self.serial, data, tag)
                return
            with self.stream(verify=True) as stream:
                _in_pieces(stream, data, tag)
        except E.EBADMSG as exc:
            raise MacMismatch(exc.message) from None

    def mac_batch(self, items: Iterable[bytes]) -> list[bytes]:
        status, out = self._client.batch(self.alg, self.serial, items)  # (which takes any iterable, or EINVAL)
        return _raise_first(status, out)

    def stream(self, verify: bool = False) -> "Stream":
        """The MAC of data in pieces: ``finalize()`` returns it; with ``verify=True``, ``finalize(tag=expected)``
        checks it inside keyden instead (constant time; EBADMSG on mismatch)."""
        return Stream(self._client, self.alg, self.serial, decrypt=verify)


def _uncopyable_stream(self, *args):
    """A shallow copy would share the daemon's stream (updating one changes the other's result): refused, as
    pyca refuses ``copy.copy`` of a hash context.  ``copy()`` asks the daemon for a stream of its own."""
    raise TypeError(f"a {type(self).__name__} cannot be copied with copy.copy or pickled: its state lives in "
                    "keyden; use its copy() method (hash and HMAC streams)")


def _still_open(stream) -> None:
    """What ``update``, ``finalize`` and ``copy`` of a stream check first: one that was finalized or aborted
    is ``StreamFinished``; one whose connection has closed, EBADF."""
    if stream.done:
        raise StreamFinished("this stream was already finalized or aborted")
    _same_connection(stream._client, stream.generation, "stream")


class Stream:
    """Data of any size in pieces (AF_ALG with MSG_MORE): update() as often as needed, then finalize()."""

    def __init__(self, client, alg: str, key=0, *, iv=b"", aad=b"", decrypt: bool = False,
                 random_nonce: bool = False):
        _abort_abandoned(client)
        handle, nonce = client.stream_init(alg, key, iv=iv, aad=aad, decrypt=decrypt, random_nonce=random_nonce)
        self._opened(client, handle, nonce, alg, decrypt)

    def _opened(self, client, handle: int, nonce: bytes, alg: str, decrypt: bool) -> None:
        self._client, self.handle, self.nonce = client, handle, nonce
        self.alg, self.decrypt = alg, decrypt
        self.generation = client.generation  # the connection it is open on
        self.done = False
        self._in_order = threading.Lock()  # the stream's requests one at a time: an update's pieces are not split
        # Dropped unfinished (pyca's contexts need no cleanup, so code does drop them): queued, and aborted
        # by the client's next stream (a request from a finalizer could run inside another on this thread).
        self._dropped = weakref.finalize(self, client.abandoned_streams.append, (handle, self.generation))

    def copy(self) -> "Stream":
        """A second stream that goes on from here, as pyca's ``Hash.copy``/``HMAC.copy``: a running
        transcript hash, or MACs of messages with a common prefix.  Hash and HMAC streams (a verifying
        one copies as one); the daemon refuses AEAD and block cipher streams (EOPNOTSUPP: the copies
        would reuse a keystream).  ``StreamFinished`` once finalized or aborted."""
        _still_open(self)
        _abort_abandoned(self._client)
        twin = type(self).__new__(type(self))
        with self._in_order:  # not halfway through another thread's update
            _still_open(self)
            twin._opened(self._client, self._client.stream_copy(self.handle), self.nonce, self.alg, self.decrypt)
        return twin

    def update(self, data) -> bytes:
        """The output so far; data more than one request may carry under the daemon's frame cap goes in
        pieces (the CLI's 1 MiB reads, say, when ``max_frame`` is set lower), one after the other, and no
        other thread's update or finalize of the stream comes between them."""
        _still_open(self)
        data = binary(data)
        with self._in_order:
            _still_open(self)  # (finalized while this waited)
            if len(data) <= self._client.max_frame - _OVERHEAD:
                return self._update(data)
            return self._update_in_pieces(data)

    def _update_in_pieces(self, data) -> bytes:
        """(Holding ``_in_order``.)  ``data`` in frame-sized updates."""
        view, piece = memoryview(data), self._client.max_frame - _OVERHEAD
        return b"".join([self._update(view[at:at + piece]) for at in range(0, len(view), piece)])

    def _update(self, data) -> bytes:
        try:
            return self._client.stream_update(self.handle, data)
        except E.EMSGSIZE:  # refused before anything was processed: the stream is still open
            raise
        except E.KeydenError:
            self._over()  # closed by keyden (its key revoked, a piece it could not take) or gone with the connection
            raise

    def finalize(self, data=b"", tag=b"") -> tuple[bytes, bytes]:
        """(last output, tag): the AEAD tag when encrypting, else the digest or MAC.

        The stream ends with the daemon's answer, whatever it is; if the request cannot go out (bad
        arguments), it is still open, and ``abort`` or the ``with`` block closes it.  Data too large to
        come back in one reply with the tag goes through ``update`` first.
        """
        _still_open(self)
        data, tag = _final_fields(self, data, tag)
        head = b""
        with self._in_order:
            _still_open(self)
            if len(data) + len(tag) + _OVERHEAD > self._client.max_frame:  # the reply must fit: output and tag
                head, data = self._update_in_pieces(data), b""
            try:
                out, last = self._client.stream_final(self.handle, data, tag)
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

    def abort(self) -> None:
        if not self.done:
            self._over()
            if _stale(self._client, self.generation):
                return  # it went with its connection
            try:
                self._client.stream_abort(self.handle)
            except E.KeydenError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()  # not finalized by the end of the block: closed in keyden too (no-op once finalized)

    __copy__ = __deepcopy__ = __reduce__ = _uncopyable_stream


def take_abandoned(client, dropped: deque[tuple[int, int]] | None = None) -> list[int]:
    """The streams (or the shared regions, from ``client.abandoned_regions``) dropped unfinished on the
    client's connection, taken off their queue: the clients close them before they open a new one, so they
    never fill the connection's 64 streams or 8 regions."""
    dropped = client.abandoned_streams if dropped is None else dropped
    taken = []
    while dropped:
        handle, generation = dropped.popleft()
        if not _stale(client, generation):  # else it went with its connection
            taken.append(handle)
    return taken


def _detach_abandoned(client) -> None:
    for region in take_abandoned(client, client.abandoned_regions):
        try:
            client._call(Op.SHM_DETACH, region)
        except E.KeydenError:
            pass


def _abort_abandoned(client) -> None:
    for handle in take_abandoned(client):
        try:
            client.stream_abort(handle)
        except E.KeydenError:
            pass


def _in_pieces(stream: Stream, data: bytes, tag: bytes = b"") -> tuple[bytes, bytes]:
    """``data`` through ``stream`` in frame-sized pieces, then finished (checking ``tag`` if given)."""
    view, piece = memoryview(data), _piece(stream._client)
    for i in range(0, len(view), piece):
        stream.update(view[i:i + piece])
    return stream.finalize(tag=tag)


def _sequence(values, name: str) -> list:
    """The first MAX_PIPELINED + 1 of ``values`` (any iterable but text or bytes: an endless generator is
    not run for ever), as a list; EINVAL, naming ``name``, for anything else."""
    if isinstance(values, (str, bytes, bytearray, memoryview)):
        raise E.EINVAL(f"{name} must be a sequence, one entry per range")
    try:
        return list(itertools.islice(values, MAX_PIPELINED + 1))
    except TypeError:
        raise E.EINVAL(f"{name} must be a sequence, one entry per range") from None


def _range(entry) -> tuple[int, int, int]:
    """One ``(in_offset, length, out_offset)`` of cipher_many, checked for its shape (whether it lies in
    the region is the daemon's to say, per piece)."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        try:
            values = tuple(operator.index(v) for v in entry if not isinstance(v, bool))
        except TypeError:
            values = ()
        if len(values) == 3 and min(values) >= 0:
            return values
    raise E.EINVAL("each range is (in_offset, length, out_offset): three integers, none negative")


def _view(data) -> memoryview:
    """Caller's bytes-like data as flat bytes, without a copy when it is contiguous; EINVAL for anything
    else (text, numbers)."""
    try:
        return memoryview(data).cast("B")
    except TypeError:  # not a buffer, or a non-contiguous one (which binary() copies)
        return memoryview(binary(data))


def _final_fields(stream, data, tag) -> tuple[bytes, bytes]:
    """STREAM_FINAL's data and tag as bytes; a tag where none belongs (or none where one does), or a tag
    alone over the frame cap, is refused here, the stream still open."""
    data, tag = binary(data), binary(tag, "tag")
    symmetric.check_final_tag(stream.alg, stream.decrypt, tag)
    if len(tag) + _OVERHEAD > stream._client.max_frame:
        raise E.EMSGSIZE(f"a {len(tag)}-byte tag is over the daemon's {stream._client.max_frame}-byte frame cap")
    return data, tag


def item_error(status: int) -> E.KeydenError:
    """A batch item's error: a bad tag is ``AuthenticationFailed``, as a one-shot decrypt raises it."""
    return AuthenticationFailed("authentication failed") if status == E.EBADMSG.code else E.error_for_code(status)


def _stale(client, generation: int) -> bool:
    """Has the connection of ``generation`` gone?  Streams and shared buffers die with their connection."""
    return not client.on_connection(generation)


def _same_connection(client, generation: int, what: str) -> None:
    """After a reconnect, a stream or shared buffer says so (EBADF) instead of naming nothing."""
    if _stale(client, generation):
        raise E.EBADF(f"this {what} belonged to a connection to keyden that has since closed (the daemon "
                      "went, or the client's event loop stopped, or it reconnected); open a new one")


def _room(buf, needed: int) -> memoryview:
    """``buf`` as writable bytes, once it holds ``needed``: ValueError otherwise, as pyca's ``*_into``."""
    view = memoryview(buf).cast("B")
    if view.readonly:
        raise TypeError("the output buffer must be writable")
    if view.nbytes < needed:
        raise ValueError(f"buffer must be at least {max(needed, 0)} bytes")
    return view


def _raise_first(status: list[int], out: list[bytes]) -> list[bytes]:
    if any(status):
        raise E.error_for_code(next(s for s in status if s))
    return out
