"""TLS through keyden, client side: hand over a connected socket, get a plaintext socket back.

``client.tls_accept(sock, keyring)`` (a TLS server) and
``client.tls_connect(sock, server_hostname, trust=ring)`` (a TLS client)
pass the socket to keyden, which runs the handshake and the record layer
with keys that never leave it, and return ``(plaintext_socket, TlsInfo)``.
Closing the plaintext socket ends the session with close_notify;
``client.tls_abort(plaintext_socket)`` first ends it without close_notify
(the peer sees a truncation).  With ``explicit_close=True`` only
``client.tls_close_notify(plaintext_socket)`` sends close_notify, so that an
application that dies mid-answer leaves its peer a truncation, not a whole.
Only the short request holds the client's connection: the handshake's
outcome arrives as the first frame on the plaintext socket, so threads
sharing one client wait on their own sockets.  See docs/tls.md.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

from keyden import errors as E
from keyden import protocol as W
from keyden.client.operations import Ref
from keyden.protocol import (TLS13_ONLY, TLS_EXPLICIT_CLOSE, TLS_PEER_CLOSE_NOTIFY, TLS_PEER_OPEN,
                             TLS_PEER_TRUNCATED, TLS_REQUIRE_CLIENT_CERT, Op)
from keyden.tls import DEFAULT_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_TIMEOUT

OUTCOME_GRACE = 5.0  # beyond the handshake timeout: the daemon's own timer fires first
MAX_OUTCOME = 1 << 20
ANCILLARY_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize * 4)


@dataclass(frozen=True)
class TlsInfo:
    """What the handshake settled.  ``server_name``: the SNI asked for (server) or sent (client)."""

    version: str
    cipher: str
    server_name: str
    alpn: str
    peer_subject: str  # RFC 4514; empty when the peer sent no certificate
    peer_certificate: bytes  # DER; empty when none

    def certificate(self):
        """The peer's certificate as a pyca object, or None."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.peer_certificate) if self.peer_certificate else None


def tls_accept(client, sock, keyring="@s", *, client_trust=0, require_client_cert: bool = False,
           alpn: list[str] | None = None, min_version: str = "1.2",
           handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, explicit_close: bool = False
           ) -> tuple[socket.socket, TlsInfo]:
    """Serve TLS on the connected ``sock`` with a certificate and key from ``keyring`` (chosen by SNI).

    ``client_trust``: a keyring whose certificates client certificates must chain to (mTLS);
    ``require_client_cert`` refuses clients without one; ``explicit_close``: see ``tls_close_notify``.
    Once keyden has taken ``sock`` it is closed here; if the request is refused it stays open and the
    caller's.
    """
    plain = start_accept(client, sock, keyring, client_trust=client_trust, require_client_cert=require_client_cert,
                         alpn=alpn, min_version=min_version, handshake_timeout=handshake_timeout,
                         explicit_close=explicit_close)
    return plain, _outcome(plain, handshake_timeout)


def start_accept(client, sock, keyring="@s", *, client_trust=0, require_client_cert: bool = False,
                 alpn: list[str] | None = None, min_version: str = "1.2",
                 handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT, explicit_close: bool = False) -> socket.socket:
    """``tls_accept``'s request alone: the plaintext socket, whose first frame is the handshake's outcome
    (``established`` reads it).  An error here is the request's (keyrings, permissions, limits); one from
    ``established`` is the handshake's, which the peer can cause."""
    flags = _version_flag(min_version) | (TLS_REQUIRE_CLIENT_CERT if require_client_cert else 0) \
        | (TLS_EXPLICIT_CLOSE if explicit_close else 0)
    args = (Ref(keyring), Ref(client_trust) if client_trust else 0, flags, _alpn(alpn), _ms(handshake_timeout))
    return _hand_over(client, Op.TLS_ACCEPT, args, sock)


def tls_connect(client, sock, server_hostname: str, *, trust, identity=0, alpn: list[str] | None = None,
            min_version: str = "1.2", handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
            explicit_close: bool = False) -> tuple[socket.socket, TlsInfo]:
    """Speak TLS to the server at the other end of ``sock``, checking its certificate for ``server_hostname``.

    ``trust``: the keyring whose certificates are the accepted CAs; ``identity``: a keyring
    holding a client certificate and its private key, for servers that ask for one;
    ``explicit_close``: see ``tls_close_notify``.
    """
    flags = _version_flag(min_version) | (TLS_EXPLICIT_CLOSE if explicit_close else 0)
    args = (server_hostname, Ref(trust), Ref(identity) if identity else 0, flags, _alpn(alpn),
            _ms(handshake_timeout))
    plain = _hand_over(client, Op.TLS_CONNECT, args, sock)
    return plain, _outcome(plain, handshake_timeout)


def tls_abort(client, plain) -> None:
    """End the TLS session behind the plaintext socket ``plain`` without close_notify.

    From the return on, ``plain`` reads end of file (after what had already reached it) and its
    writes fail; what was written to it before still goes out, then the connection ends with no
    close_notify, which the peer reports as a truncation: it cannot take what it got for the whole
    answer (a request cut short, an upstream that failed mid-answer).  Closing ``plain`` without this
    is the graceful end.  The caller still closes ``plain``.  A session that has already ended is no
    error.
    """
    client._call_with_fds(Op.TLS_ABORT, (), [_fileno(plain)])


def tls_close_notify(client, plain) -> None:
    """End the TLS session behind ``plain`` deliberately: what was written to ``plain`` goes out, then
    close_notify, which tells the peer it has everything.  From the return on, writes to ``plain`` fail
    (it is shut for writing, as by ``plain.shutdown(SHUT_WR)``); the caller still closes it.

    A session opened with ``explicit_close=True`` sends close_notify only after this: its plaintext
    socket's end of file alone (the application exited or crashed mid-answer; the kernel closes its
    sockets either way) ends it as ``tls_abort`` does, so the peer sees a truncation, as it would of an
    in-process TLS stack that died with its process.  Without the flag a close is graceful, and this is
    the same as ``plain.shutdown(SHUT_WR)``.  A session that has already ended is no error.
    """
    client._call_with_fds(Op.TLS_CLOSE_NOTIFY, (), [_fileno(plain)])


_PEER_ENDS = {TLS_PEER_OPEN: "open", TLS_PEER_CLOSE_NOTIFY: "close_notify", TLS_PEER_TRUNCATED: "truncated"}


def tls_peer_end(client, plain) -> str:
    """How the peer's side of the session behind ``plain`` ended: "open" (it has not), "close_notify"
    (everything it sent has arrived), or "truncated" (the connection ended without close_notify, was
    reset, or broke the protocol: what arrived may be cut short).  End of file on ``plain`` reads the
    same either way; ask this before trusting data whose end only the connection's end marks."""
    (end,) = client._call_with_fds(Op.TLS_PEER_END, (), [_fileno(plain)])
    try:
        return _PEER_ENDS[end]
    except KeyError:
        raise E.EPROTO(f"keyden answered an unknown peer end {end}") from None


def _version_flag(min_version: str) -> int:
    if min_version not in ("1.2", "1.3"):
        raise E.EINVAL("min_version is '1.2' or '1.3'")
    return TLS13_ONLY if min_version == "1.3" else 0


def _alpn(alpn: list[str] | None) -> list[bytes]:
    """Protocol names as the wire takes them; a name in text is ASCII (as keyden requires of every name)."""
    if alpn is None:
        return []
    if not isinstance(alpn, (list, tuple)):
        raise E.EINVAL("alpn is a list of protocol names")
    names = []
    for name in alpn:
        if isinstance(name, str) and name.isascii():
            names.append(name.encode("ascii"))
        elif isinstance(name, (bytes, bytearray)):
            names.append(bytes(name))
        else:  # (bytes(5) would be five zero bytes)
            raise E.EINVAL("ALPN protocol names are ASCII text or bytes")
    return names


def _ms(seconds: float) -> int:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise E.EINVAL(f"handshake_timeout must be a number of seconds, not {type(seconds).__name__}")
    if not 0 < seconds <= MAX_HANDSHAKE_TIMEOUT:
        raise E.EINVAL(f"handshake_timeout is more than 0 and at most {MAX_HANDSHAKE_TIMEOUT:g} seconds")
    return max(1, round(seconds * 1000))


def _fileno(sock) -> int:
    """A socket object's descriptor, or a descriptor itself; EINVAL for anything else."""
    if isinstance(sock, int) and not isinstance(sock, bool):
        return sock
    if not callable(getattr(sock, "fileno", None)):
        raise E.EINVAL(f"sock must be a socket or a descriptor, not {type(sock).__name__}")
    return sock.fileno()


def _hand_over(client, op: Op, args: tuple, sock) -> socket.socket:
    fd = _fileno(sock)
    _values, received = client._call_trading_fds(op, client._resolve(args), [fd])
    if isinstance(sock, int):
        os.close(sock)
    else:
        sock.close()
    if len(received) != 1:
        for extra in received:
            os.close(extra)
        raise E.EPROTO(f"keyden passed back {len(received)} descriptors, not one socket")
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, received[0])


def _outcome(plain: socket.socket, handshake_timeout: float) -> TlsInfo:
    """The handshake's outcome (``established``); the plaintext socket is closed if it failed."""
    try:
        return established(plain, handshake_timeout + OUTCOME_GRACE)
    except BaseException:
        plain.close()
        raise


def established(plain: socket.socket, timeout: float) -> TlsInfo:
    """Read the first frame on a plaintext socket: what was negotiated, or why the handshake failed."""
    plain.settimeout(timeout)
    try:
        length, _rid, op, status = W.HEADER.unpack(_read_exactly(plain, W.HEADER_SIZE))
        if op != Op.TLS_ESTABLISHED or length > MAX_OUTCOME:
            raise E.EPROTO("the plaintext socket did not start with TLS_ESTABLISHED")
        body = _read_exactly(plain, length)
    except socket.timeout:
        raise E.ETIMEDOUT("no word from keyden about the TLS handshake") from None
    except OSError as exc:
        raise E.ECONNRESET(f"keyden closed the plaintext socket: {exc}") from None
    plain.settimeout(None)
    if status:
        raise E.error_for_code(status, W.decode_error(body))
    return TlsInfo(*W.response_schema(Op.TLS_ESTABLISHED).decode(body))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))  # never more than asked: what follows is the application's
        if not chunk:
            raise ConnectionResetError("end of stream before the first frame was whole")
        buf += chunk
    return bytes(buf)


def receive_with_fds(sock: socket.socket, view: memoryview, received: list[int]) -> int:
    """recv_into that also keeps descriptors passed with the bytes (SCM_RIGHTS), close-on-exec."""
    n, ancdata, _flags, _addr = sock.recvmsg_into([view], ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
            received.extend(fds)
    return n
