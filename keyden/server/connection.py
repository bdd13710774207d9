"""One client connection, sans-IO: bytes in, bytes out.

The first frame must be HELLO (version handshake, session token).  After
that each frame is decoded against its op's schema and dispatched.  Errors
become errno-coded responses; a frame that cannot be delimited (over the
size cap) or a failed handshake closes the connection.
"""

from __future__ import annotations

import logging
from typing import Iterator

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core.key import Caller
from keyden.core.store import KeyStore
from keyden.logs import Throttled
from keyden.protocol import Op
from keyden.server.audit import ConnectionAudit
from keyden.server.cost import Cost, request_cost
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
        uid's persistent changes, and for as long as it made each write take."""
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
        callbacks = context.after_audit
        while callbacks:  # what must come after this request's line (a TLS handshake's outcome)
            callbacks.pop(0)()
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
