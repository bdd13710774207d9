"""TLS over a socket the application shares with keyden, never blocking on it.

keyden drives a duplicate of the application's socket: one open file description, so O_NONBLOCK is the
application's to clear too, after the hand-over.  An ``ssl.SSLSocket`` then reads and writes a blocking
descriptor from a TLS loop thread, which a peer that sends one byte of a record holds there for as long
as it likes, and every session on that loop with it.  Here OpenSSL works on memory (``MemoryBIO``), and
every read and write of the socket itself carries MSG_DONTWAIT, whatever the description's flags say.

``TlsTransport`` offers what the engine and the handlers use of an ``SSLSocket``, with its semantics on
a non-blocking socket: SSLWantReadError when a record is not all there, SSLWantWriteError while what
OpenSSL wrote waits for room (``unsent``: the engine watches for it), 0 from ``recv_into`` at the peer's
close_notify, an ``SSLEOFError`` at a TCP end without one.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

from keyden import descriptors

READ_CHUNK = 64 * 1024  # ciphertext read from the socket at a time
#: Reads of the socket one step of OpenSSL's may make: records that carry no data (key updates, say) it
#: takes without returning, so a peer sending nothing else held one read for as long as it went on.  Then
#: SSLWantReadError: what is left waits in the socket, which makes it ready again.
MAX_FILLS = 2
#: Records a read may leave waiting for room before reading stops too: one of ``send``'s writes (it writes
#: nothing while anything waits: the engine's 64 KiB and its records' overhead) and some room for what
#: reads make (key-update answers, alerts), which a peer that never reads could otherwise pile up here.
#: Reading must not wait for the other direction below it, or a peer that sends all before it reads (an
#: upload) and an application that answers as it reads would wait for each other for good.
UNSENT_CAP = 96 * 1024
#: Ancillary room for a read of a Unix network socket: descriptors.ANCILLARY_SPACE (SCM_RIGHTS), and room
#: for credentials (SCM_CREDENTIALS), a pidfd (SCM_PIDFD) and a security label (SCM_SECURITY).
UNIX_ANCILLARY_SPACE = (descriptors.ANCILLARY_SPACE + socket.CMSG_SPACE(12) + socket.CMSG_SPACE(4)
                        + socket.CMSG_SPACE(4096))


class TlsObject(ssl.SSLObject):
    """An SSLObject that remembers the name the client asked for (SNI)."""

    requested_name = ""


class TlsTransport:
    """One TLS connection: an ``SSLObject`` and the socket its records travel on."""

    def __init__(self, sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
                 owner: int = descriptors.NOBODY):
        self.sock = sock
        self.owner = owner  # the uid whose socket it is: descriptors it sends go to the closers as its
        self._unix = sock.family == socket.AF_UNIX  # a Unix socket can carry descriptors (SCM_RIGHTS)
        self.obj: ssl.SSLObject | None = obj
        self._in, self._out = incoming, outgoing
        self._unsent = b""  # records OpenSSL wrote that the socket has not taken yet
        self._failed: OSError | None = None  # the socket's error met sending after a step that succeeded

    @classmethod
    def wrap(cls, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
             server_hostname: str | None = None, owner: int = descriptors.NOBODY) -> "TlsTransport":
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_hostname)
        return cls(sock, obj, incoming, outgoing, owner)

    # -- the socket, as the engine sets it up and hands it back

    @property
    def family(self) -> int:
        return self.sock.family

    @property
    def proto(self) -> int:
        return self.sock.proto

    def fileno(self) -> int:
        return self.sock.fileno()

    def getsockname(self):
        return self.sock.getsockname()

    def getpeername(self):
        return self.sock.getpeername()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def detach(self) -> int:
        return self.sock.detach()

    def close(self) -> None:
        """Let go of OpenSSL's connection and its buffers (the socket's descriptor is closed, or detached,
        by whoever owns it)."""
        self.obj = self._in = self._out = None
        self._unsent = b""
        self.sock.close()

    # -- TLS

    @property
    def unsent(self) -> int:
        """Bytes of records waiting for room in the socket (0: none): watch it for writing, then ``flush``."""
        return len(self._unsent) + (self._out.pending if self._out is not None else 0)

    def flush(self) -> bool:
        """Send what OpenSSL wrote, as far as the socket takes it now; True once all is out."""
        if self._out is not None and self._out.pending:
            self._unsent += self._out.read()
        while self._unsent:
            try:
                sent = self.sock.send(self._unsent, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            self._unsent = self._unsent[sent:]
        return True

    def _fill(self) -> None:
        """Give OpenSSL what the socket has; SSLWantReadError if it has nothing yet."""
        if self._in.eof:  # (OpenSSL asking again after the end it was given: an end it cannot take)
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")
        try:
            data = self._read(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            raise ssl.SSLWantReadError("the socket has nothing to read yet") from None
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()  # OpenSSL tells a close_notify before it from a truncation

    def _run(self, step, strict: bool = False):
        """``step()`` on the SSLObject, feeding it from the socket until it is done or must wait.

        What it wrote goes out as far as the socket takes it; the rest waits (``unsent``).  ``strict``
        (the handshake): nothing more is read while anything waits, as a flight answers the last."""
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        fills = 0
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                if not self.flush() and (strict or len(self._unsent) > UNSENT_CAP):
                    raise ssl.SSLWantWriteError("the socket has no room for what must go first") from None
                if fills == MAX_FILLS:
                    raise
                fills += 1
                self._fill()  # (raises SSLWantReadError when there is nothing more)
                continue
            except OSError:  # an alert OpenSSL wrote on its way out: the peer hears why, if it can
                with contextlib.suppress(OSError):
                    self.flush()
                raise
            try:
                self.flush()
            except OSError as exc:  # what the step gave (a read's plaintext) stands; the error is next
                self._failed = exc
            return result

    def do_handshake(self) -> None:
        self._run(self.obj.do_handshake, strict=True)
        if not self.flush():  # our last flight must be out before the session counts as established
            raise ssl.SSLWantWriteError("the handshake's last flight waits for room")

    def recv_into(self, buffer) -> int:
        return self._run(lambda: self.obj.read(len(buffer), buffer))

    def send(self, data) -> int:
        if not self.flush():
            raise ssl.SSLWantWriteError("earlier records wait for room")
        return self._run(lambda: self.obj.write(data))

    def unwrap(self) -> None:
        """Our close_notify, written and sent (the peer's is not waited for)."""
        try:
            self.obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # ours is written; the peer's would follow
        if not self.flush():
            raise ssl.SSLWantWriteError("the close_notify waits for room")

    def shutdown(self, how: int) -> None:
        """Shut the socket itself: from SHUT_WR on, what follows is not TLS to us (``recv`` drops it).
        The caller has flushed: records still waiting are dropped."""
        self.obj = None
        self._unsent = b""
        self.sock.shutdown(how)

    def recv(self, size: int) -> bytes:
        """The socket's bytes as they are (after ``shutdown``: what the peer still sends, to drop)."""
        return self._read(size)

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes, never waiting.  Descriptors a Unix socket's peer sent with them are taken
        and go to the closers: a plain recv makes the kernel drop them, and run their last close (a TCP
        socket's linger, as long as the sender set it) on the TLS loop's thread, and every session of the
        loop waits.  The room holds all one message may carry, and what
        the application may ask of the socket it shares with us (SO_PASSCRED, SO_PASSPIDFD: a pidfd
        installed here on each read, SO_PASSSEC): what did not fit would be closed in the kernel, here."""
        if not self._unix:
            return self.sock.recv(size, socket.MSG_DONTWAIT)
        data, ancdata, flags, _address = self.sock.recvmsg(size, UNIX_ANCILLARY_SPACE,
                                                           socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        if ancdata:
            descriptors.release(descriptors.passed(ancdata), self.owner)
        if flags & socket.MSG_CTRUNC:  # (cannot be, with this room; if it were, the session ends)
            raise ConnectionResetError("control data cut short on the network socket")
        return data

    # -- what was negotiated

    @property
    def server_side(self) -> bool:
        return self.obj.server_side

    @property
    def server_hostname(self) -> str | None:
        return self.obj.server_hostname

    @property
    def requested_name(self) -> str:
        return getattr(self.obj, "requested_name", "")

    def getpeercert(self, binary_form: bool = False):
        return self.obj.getpeercert(binary_form)

    def version(self) -> str | None:
        return self.obj.version()

    def cipher(self):
        return self.obj.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    def get_verified_chain(self):
        get = getattr(self.obj, "get_verified_chain", None) or self.obj._sslobj.get_verified_chain  # public from 3.13
        return get()
