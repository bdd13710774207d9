"""One client connection, sans-IO: bytes in, bytes out.

The first frame must be HELLO (version handshake, session token).  After
that each frame is decoded against its op's schema and dispatched.  Errors
become errno-coded responses; a frame that cannot be delimited (over the
size cap) or a failed handshake closes the connection.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator

from keyden import errors as E
from keyden import protocol as W
from keyden.core.store import Caller, KeyStore
from keyden.server.audit import ConnectionAudit
from keyden.server.handlers import Context, dispatch
from keyden.server.peer import Peer

log = logging.getLogger("keyden.connection")


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

    def receive(self, data: bytes | memoryview, fds: list[int] | None = None) -> bytes:
        """Feed bytes (and any passed descriptors) from the socket; return the bytes to send back."""
        return b"".join(self.answers(data, fds))

    def answers(self, data: bytes | memoryview, fds: list[int] | None = None) -> Iterator[bytes]:
        """Like ``receive``, one response at a time: the caller may write some before the rest are made."""
        if fds:
            if self.context is None or self.closed:
                for fd in fds:
                    os.close(fd)
            else:
                self.context.take_fds(fds)
        if self.closed:
            return
        self.decoder.feed(data)
        try:
            for frame in self.decoder.frames():
                yield self.handle(frame)
                if self.closed:
                    break
        except W.FrameTooLarge as exc:
            log.warning("pid %d: %s; closing", self.peer.pid, exc.message)
            self.closed = True
            yield W.encode_error(0, 0, exc)

    def close(self) -> None:
        """Release what the connection holds (streams, shared regions, descriptors)."""
        self.closed = True
        if self.context is not None:
            self.context.close()

    def handle(self, frame: W.Frame) -> bytes:
        if self.context is None:
            return self._hello(frame)
        args = result = None
        try:
            args = W.request_schema(frame.op).decode(frame.body)
            result = dispatch(self.context, frame.op, args)
            reply = W.encode_response(frame.request_id, frame.op, result)
        except E.KeydenError as exc:
            reply, error = W.encode_error(frame.request_id, frame.op, exc), exc.code
        except Exception:  # an internal fault: generic code, details only in our log
            log.exception("pid %d: internal error in op %s", self.peer.pid, frame.op)
            reply, error = W.encode_error(frame.request_id, frame.op, E.EIO("internal error")), E.EIO.code
        else:
            error = 0
        if self.audit is not None:
            self.audit.record(frame.op, args, error, result)
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
        self.context = Context(self.store, caller, self.peer.pid, max_frame=self.max_frame)
        self.closed = False
        return W.encode_response(frame.request_id, frame.op,
                                 (W.VERSION, self.max_frame, self.peer.uid, self.peer.gid, self.peer.pid))
