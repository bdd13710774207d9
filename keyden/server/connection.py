"""One client connection, sans-IO: bytes in, bytes out.

The first frame must be HELLO (version handshake, session token).  After
that each frame is decoded against its op's schema and dispatched.  Errors
become errno-coded responses; a frame that cannot be delimited (over the
size cap) or a failed handshake closes the connection.
"""

from __future__ import annotations

import logging
import os

from keyden import errors as E
from keyden import protocol as W
from keyden.core.store import Caller, KeyStore
from keyden.server.handlers import Context, dispatch
from keyden.server.peer import Peer

log = logging.getLogger("keyden.connection")


class Connection:
    def __init__(self, store: KeyStore, peer: Peer, max_frame: int = W.DEFAULT_MAX_FRAME):
        self.store = store
        self.peer = peer
        self.max_frame = max_frame
        self.decoder = W.FrameDecoder(max_frame)
        self.context: Context | None = None
        self.closed = False

    def receive(self, data: bytes | memoryview, fds: list[int] | None = None) -> bytes:
        """Feed bytes (and any passed descriptors) from the socket; return the bytes to send back."""
        if fds:
            if self.context is None or self.closed:
                for fd in fds:
                    os.close(fd)
            else:
                self.context.take_fds(fds)
        if self.closed:
            return b""
        self.decoder.feed(data)
        out: list[bytes] = []
        try:
            for frame in self.decoder.frames():
                out.append(self.handle(frame))
                if self.closed:
                    break
        except W.FrameTooLarge as exc:
            log.warning("pid %d: %s; closing", self.peer.pid, exc.message)
            out.append(W.encode_error(0, 0, exc))
            self.closed = True
        return b"".join(out)

    def close(self) -> None:
        """Release what the connection holds (streams, shared regions, descriptors)."""
        self.closed = True
        if self.context is not None:
            self.context.close()

    def handle(self, frame: W.Frame) -> bytes:
        if self.context is None:
            return self._hello(frame)
        try:
            args = W.request_schema(frame.op).decode(frame.body)
            return W.encode_response(frame.request_id, frame.op, dispatch(self.context, frame.op, args))
        except E.KeydenError as exc:
            return W.encode_error(frame.request_id, frame.op, exc)
        except Exception:  # an internal fault: generic code, details only in our log
            log.exception("pid %d: internal error in op %s", self.peer.pid, frame.op)
            return W.encode_error(frame.request_id, frame.op, E.EIO("internal error"))

    def _hello(self, frame: W.Frame) -> bytes:
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
        self.context = Context(self.store, caller, self.peer.pid)
        self.closed = False
        return W.encode_response(frame.request_id, frame.op,
                                 (W.VERSION, self.max_frame, self.peer.uid, self.peer.gid, self.peer.pid))
