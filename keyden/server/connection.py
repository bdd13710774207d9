"""One client connection, sans-IO: bytes in, bytes out.

The first frame must be HELLO (version handshake, session token).  After
that each frame is decoded against its op's schema and dispatched.  Errors
become errno-coded responses; a frame that cannot be delimited (over the
size cap) or a failed handshake closes the connection.
"""

from __future__ import annotations

import enum
import logging
import struct
from typing import Iterator

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core.store import Caller, KeyStore
from keyden.logs import Throttled
from keyden.protocol import Op
from keyden.server.audit import ConnectionAudit
from keyden.server.handlers import Context, DescriptorQueue, dispatch
from keyden.server.peer import Peer

#: Requests that show nothing of the key store (a hash takes no key; a stream's abort and shared regions touch
#: none).
SHOWS_NO_KEY = frozenset({Op.PING, Op.CAPABILITIES, Op.DIGEST, Op.STREAM_ABORT, Op.SHM_ATTACH, Op.SHM_DETACH})
#: A stream's later steps check its key again (a revoke stops the stream): they show that key alone, which
#: they name in the audit (Context.audit_keys).
USES_STREAM_KEY = frozenset({Op.STREAM_UPDATE, Op.STREAM_FINAL, Op.STREAM_COPY})
#: Requests that use one key, and show that key alone: op -> where its "key" argument is.
USES_ONE_KEY = {op: W.request_schema(op).names.index("key") for op in (
    Op.CIPHER, Op.MAC, Op.MAC_VERIFY, Op.BATCH, Op.STREAM_INIT, Op.SHM_CIPHER, Op.KEY_ALGORITHM, Op.PKEY_SIGN,
    Op.PKEY_VERIFY, Op.PKEY_ENCRYPT, Op.PKEY_DECRYPT, Op.PKEY_QUERY, Op.PUBLIC_KEY)}

log = logging.getLogger("keyden.connection")
_oversized_frames = Throttled(log)  # one for the daemon: a flood comes on many connections


class Cost(enum.IntEnum):
    """How long a request may hold whoever answers it: the loop decides from this where it runs."""

    QUICK = 0  # microseconds: always answered by the loop itself
    HEAVY = 1  # a few bounded milliseconds that pyca spends outside the GIL (RSA and P-384 keys, ciphers
    #            on up to 16 MiB): answered by the loop when nobody else is waiting, else by a worker
    SLOW = 2  # unbounded or blocking (key generation, a password KDF, the disk, TLS set-up): always a worker


#: Requests that may take long whatever their size: key generation, finite-field DH, key agreement and
#: key transport into new keys (RSA, P-384), export and import (their wrapping, the disk), path
#: validation, TLS set-up.
SLOW_OPS = frozenset({
    W.Op.GENKEY, W.Op.GENKEY_FLAGS, W.Op.DH_COMPUTE, W.Op.DH_COMPUTE_KDF, W.Op.DERIVE, W.Op.KDF,
    W.Op.PKEY_DECRYPT_INTO, W.Op.EXPORT, W.Op.IMPORT, W.Op.REKEY, W.Op.X509_VERIFY, W.Op.GET_PERSISTENT,
    W.Op.TLS_ACCEPT, W.Op.TLS_CONNECT,
    W.Op.SHM_DETACH,  # the last reference to a GiB memfd: 0.2 s to free its pages
})
#: Requests whose cost depends on the key.  RSA-2048 signing takes ~0.8 ms and P-384 0.3-0.6 ms: heavy.
#: Ed25519 and P-256 take 35-130 µs, less than handing the request to a worker and back costs under
#: load (8 clients signing with Ed25519 measured 8.3k sig/s on the loop, 4.9k through workers): quick.
PKEY_OPS = frozenset({W.Op.PKEY_SIGN, W.Op.PKEY_DECRYPT, W.Op.PKEY_ENCRYPT, W.Op.PKEY_VERIFY})
#: Requests that parse what they are given: an asymmetric key may be an encrypted PKCS#8 (a password KDF).
#: (UPDATE is not among them: only user-like keys are updatable, and a page of their payload is stored as is.)
ADD_OPS = frozenset({W.Op.ADD, W.Op.ADD_FLAGS})
BULK_BYTES = 64 * 1024  # more data than this in one request is heavy (pyca releases the GIL for bulk work)
#: A batch's cost is its items (1-12 µs each, however small): past QUICK_ITEMS it is heavy, past
#: HEAVY_ITEMS (~10 ms) slow.  65536 empty items fit in 260 KiB and took the loop for up to 0.9 s.
QUICK_ITEMS = 256
HEAVY_ITEMS = 1024
#: How much data a heavy request may bring, by how fast its algorithm runs (measured here, 16 MiB): AES-GCM
#: at ~10 GB/s takes a frame's worth in ~2 ms; CBC, CTR, ChaCha20, hashes and MACs run at 0.5-1.5 GB/s
#: (16 MiB: 11-33 ms, and an HMAC-SHA-512 over the socket held the loop 70 ms), so 2 MiB of them.  More is
#: slow: a worker, while the loop serves the others.  A stream's algorithm is not in its frames: the lower.
FAST_BULK = b"gcm(aes)"
HEAVY_BYTES = 16 * 1024 * 1024
HEAVY_BYTES_OTHER = 2 * 1024 * 1024
_FAST_BULK_FIELD = struct.pack("<I", len(FAST_BULK)) + FAST_BULK  # FAST_BULK as a STR field, length first
_PLAIN_OPS = frozenset(W.Op) - SLOW_OPS - PKEY_OPS - ADD_OPS - {W.Op.SHM_CIPHER, W.Op.BATCH}  # cost: size alone
_ASYMMETRIC_TYPE = struct.pack("<I", 10) + b"asymmetric"  # an ADD's first field, the type, length-prefixed
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def request_cost(store: KeyStore, frame: W.Frame) -> Cost:
    """A cheap guess from the frame alone (nothing is decoded or checked here: the handler does that)."""
    op, body = frame.op, frame.body
    if op in _PLAIN_OPS and len(body) <= BULK_BYTES:  # most requests: decided by one lookup
        return Cost.QUICK
    if op in SLOW_OPS:
        return Cost.SLOW
    if op in ADD_OPS:  # asymmetric payloads are parsed (maybe decrypted)
        return Cost.SLOW if body[:14] == _ASYMMETRIC_TYPE else Cost.QUICK
    if op == W.Op.BATCH:  # the larger of what its items and its bytes cost
        items = batch_items(body)
        if items is None:  # its first list is over the limit: refused before any item is made
            return Cost.QUICK
        return Cost.SLOW if items > HEAVY_ITEMS else max(_bulk(len(body), body, 0),
                                                         Cost.HEAVY if items > QUICK_ITEMS else Cost.QUICK)
    if op == W.Op.SHM_CIPHER:  # its length field (in_offset, length, out_offset end the body), or its own size
        if len(body) < 16:        # (associated data comes in the frame)
            return Cost.QUICK
        return max(_bulk(_U64.unpack_from(body, len(body) - 16)[0], body, 4), _bulk(len(body), body, 4))
    if len(body) > BULK_BYTES:
        return _bulk(len(body), body, 0 if op == W.Op.CIPHER else None)
    if op in PKEY_OPS:
        return Cost.HEAVY if len(body) >= 4 and store.slow_asymmetric(_I32.unpack_from(body)[0]) else Cost.QUICK
    return Cost.QUICK


def batch_items(body: bytes) -> int | None:
    """A BATCH frame's item count, read where the schema puts it: 0 if malformed (EPROTO at once).  A list
    over MAX_BATCH is E2BIG, refused by the decoder when it meets that list, after making the items of the
    lists before it: their count, or None if there were none (refused before any item is made)."""
    try:
        pos = 4 + _U32.unpack_from(body)[0] + 8  # alg (length-prefixed), key, flags
        made = 0  # items the decoder makes before it meets a list over the limit
        for _ in range(2):  # ivs, aads: a count, that many lengths, the bytes
            count = _U32.unpack_from(body, pos)[0]
            if count > W.MAX_BATCH:
                return made or None
            if count:
                if 4 + 4 * count > len(body) - pos:
                    return 0
                pos += sum(struct.unpack_from(f"<{count}I", body, pos + 4))
            pos += 4 + 4 * count
            made += count
        count = _U32.unpack_from(body, pos)[0]
        return count if count <= W.MAX_BATCH else made or None
    except struct.error:
        return 0


def _bulk(size: int, body: bytes, alg_at: int | None) -> Cost:
    """The cost of ``size`` bytes of data, by the speed of the algorithm the STR field at ``alg_at`` names
    (None: a frame that names none), looked at only for more than BULK_BYTES."""
    if size <= BULK_BYTES:
        return Cost.QUICK
    fast = alg_at is not None and body.startswith(_FAST_BULK_FIELD, alg_at)
    return Cost.HEAVY if size <= (HEAVY_BYTES if fast else HEAVY_BYTES_OTHER) else Cost.SLOW


class Connection:
    def __init__(self, store: KeyStore, peer: Peer, max_frame: int = W.DEFAULT_MAX_FRAME,
                 audit: ConnectionAudit | None = None):
        self.store = store
        self.peer = peer
        self.max_frame = max_frame
        self.audit = audit
        self.decoder = W.FrameDecoder(max_frame)
        self.context: Context | None = None
        self.closed = False
        self.unsynced = 0  # the journal mark the last request's reply must wait for (0: nothing)
        self.changed = False  # ... and whether those changes were its own (else only others' it may show)
        self.fed = 0  # bytes of the stream received so far (the loop adds the frames it takes past feed())
        self.answered = 0  # bytes of the stream taken by frames handled so far: they place descriptors
        self.fds = DescriptorQueue(peer.uid)  # its Context's once the handshake is done

    def receive(self, data: bytes | memoryview, fds: list[int] | None = None) -> bytes:
        """Feed bytes (and any passed descriptors) from the socket; return the bytes to send back."""
        return b"".join(self.answers(data, fds))

    def answers(self, data: bytes | memoryview, fds: list[int] | None = None) -> Iterator[bytes]:
        """Like ``receive``, one response at a time, each durable before it is yielded."""
        self.feed(data, fds)
        try:
            while not self.closed and (frame := self.next_frame()) is not None:
                reply = self.handle(frame)
                yield self.durable(frame, reply, self.unsynced, self.changed)
        except W.FrameTooLarge as exc:
            self.closed = True
            yield self.refuse_oversized(exc)

    # The pieces of ``answers``, for the server's loop: it decides where each frame is handled.

    def feed(self, data: bytes | memoryview, fds: list[int] | None = None) -> None:
        """Bytes (and any passed descriptors) from the socket."""
        self.fed += len(data)
        if fds:
            if self.closed:
                descriptors.release(fds, self.peer.uid)
            else:
                self.fds.add(fds, self.fed)
        if not self.closed:
            self.decoder.feed(data)

    def refuse_oversized(self, exc: W.FrameTooLarge) -> bytes:
        """The error frame that ends a connection whose peer announced a frame over the cap.  Anyone may
        send that header before HELLO, in a loop: it is logged at most once per 10 s, naming the uid."""
        _oversized_frames.warning("uid %d pid %d: %s; closing", self.peer.uid, self.peer.pid, exc.message)
        return W.encode_error(0, 0, exc)

    def next_frame(self) -> W.Frame | None:
        """The next whole frame received, if any; FrameTooLarge if the peer announced one over the cap."""
        return None if self.closed else self.decoder.next_frame()

    def cost(self, frame: W.Frame) -> Cost:
        """How long answering this frame may take (see Cost)."""
        return Cost.QUICK if self.context is None else request_cost(self.store, frame)

    def needs_sync(self) -> bool:
        """Did the last request change a persistent keyring, not yet on disk (its reply must wait)?"""
        return bool(self.unsynced) and not self.store.journal.synced(self.unsynced)

    def durable(self, frame: W.Frame, reply: bytes, upto: int, changed: bool = True) -> bytes:
        """``reply``, once the changes up to mark ``upto`` are on disk (this may block).  If that write
        failed: the error, for a request that ``changed`` them; the reply as it is, for one that only
        waited for others' changes (their requests are told)."""
        if upto:
            try:
                self.store.journal.sync(upto)
            except E.KeydenError as exc:
                if changed:
                    return W.encode_error(frame.request_id, frame.op, exc)
        return reply

    def close(self) -> None:
        """Release what the connection holds (streams, shared regions, descriptors)."""
        self.closed = True
        self.fds.close()
        if self.context is not None:
            self.context.close()

    def handle(self, frame: W.Frame) -> bytes:
        """The reply to one frame; ``unsynced`` then says what it changed persistently (see ``durable``)."""
        self.unsynced, self.changed = 0, False
        self.answered += W.HEADER_SIZE + len(frame.body)
        if frame.request_id == 0:  # its reply would read as a connection-level error: a broken client
            self.closed = True
            reply = W.encode_error(0, 0, E.EPROTO("request id 0 is reserved for connection-level errors"))
        else:
            reply = self._hello(frame) if self.context is None else self._answer(frame)
        if self.fds:  # descriptors this request (or one before it) brought and did not take
            self.fds.release_through(self.answered)
        return reply

    def _shows_nothing_persisted(self, op: int, args: tuple | None, keys: list[int] | None) -> bool:
        """Can this request's reply show no change to a persistent keyring?  A request that reads no key
        (a ping, a hash), or uses one key in no persistent keyring with nothing of its on the way to disk,
        need not wait for others' changes to reach the disk: every request of every uid waited behind one
        uid's persistent changes, and for as long as it made each write take (found by a fairness hunt)."""
        if op in SHOWS_NO_KEY:
            return True
        if op in USES_STREAM_KEY:  # (no key named: a hash's stream, or no such stream)
            return not any(self.store.shows_persisted(key) for key in keys or ())
        at = USES_ONE_KEY.get(op)
        return at is not None and args is not None and not self.store.shows_persisted(args[at])

    def _answer(self, frame: W.Frame) -> bytes:
        journal = self.store.journal
        before = journal.mark()
        args = result = None
        try:
            args = W.request_schema(frame.op).decode(frame.body)
            result = dispatch(self.context, frame.op, args)
            reply = W.encode_response(frame.request_id, frame.op, result)
            if len(reply) - W.HEADER_SIZE > self.max_frame:  # the cap HELLO announced holds both ways
                result = None
                raise E.EMSGSIZE(f"the reply would take {len(reply) - W.HEADER_SIZE} bytes, over the "
                                 f"{self.max_frame}-byte frame cap")
        except E.KeydenError as exc:
            reply, error = W.encode_error(frame.request_id, frame.op, exc), exc.code
        except Exception:  # an internal fault: generic code, details only in our log
            log.exception("pid %d: internal error in op %s", self.peer.pid, frame.op)
            reply, error = W.encode_error(frame.request_id, frame.op, E.EIO("internal error")), E.EIO.code
        else:
            error = 0
        after = journal.mark()
        # What this request changed, or else whatever is still on its way to disk: its reply may show
        # another connection's change (a read of a key just updated), which a crash now would undo.
        self.changed = after != before
        context = self.context
        keys = context.audit_keys
        if keys is not None:
            context.audit_keys = None
        if self.changed:
            self.unsynced = after
        elif self._shows_nothing_persisted(frame.op, args, keys):
            self.unsynced = 0
        else:
            self.unsynced = journal.pending()
        if self.audit is not None:
            self.audit.record(frame.op, args, error, result, keys)
        after = context.after_audit
        while after:  # what must come after this request's line (a TLS handshake's outcome)
            after.pop(0)()
        return reply

    def _hello(self, frame: W.Frame) -> bytes:
        reply = self._handshake(frame)
        if self.audit is not None:
            self.audit.record(W.Op.HELLO, None, W.HEADER.unpack_from(reply)[3])  # the reply's status
        return reply

    def _handshake(self, frame: W.Frame) -> bytes:
        self.closed = True  # unless the handshake succeeds
        if frame.op != W.Op.HELLO:
            return W.encode_error(frame.request_id, frame.op, E.EPROTO("the first frame must be HELLO"))
        try:
            lo, hi, session, _client = W.request_schema(W.Op.HELLO).decode(frame.body)
            if not lo <= W.VERSION <= hi:
                raise E.EPROTONOSUPPORT(f"server speaks version {W.VERSION}; client asked {lo}..{hi}")
            if session and not self.store.session_valid(session, self.peer.uid):
                raise E.EACCES("session token not valid for this user")
        except E.KeydenError as exc:
            return W.encode_error(frame.request_id, frame.op, exc)
        caller = Caller(self.peer.credentials, self.peer.process, session or None)
        self.context = Context(self.store, caller, self.peer.pid, fds=self.fds, max_frame=self.max_frame,
                               audit=self.audit)
        self.closed = False
        return W.encode_response(frame.request_id, frame.op,
                                 (W.VERSION, self.max_frame, self.peer.uid, self.peer.gid, self.peer.pid))
