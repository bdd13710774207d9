"""TLS by keyring: the application passes a connected socket, keyden passes back a plaintext one.

The handlers only check arguments and permissions, build (or reuse) the ssl
context from the keyrings, and hand the socket to the TLS engine; the
handshake runs on the engine's threads, so this connection is free again at
once.  Its outcome is the first frame on the returned socket (docs/tls.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import threading
from typing import Iterator

from cryptography import x509

from keyden import descriptors
from keyden import errors as E
from keyden.core.trust import is_blacklisted, trusted_certificates
from keyden.crypto.x509 import spki_of, subject_of
from keyden.protocol import TLS13_ONLY, TLS_EXPLICIT_CLOSE, TLS_REQUIRE_CLIENT_CERT, Op
from keyden.server import peer
from keyden.server.handlers.base import handles
from keyden.tls import DEFAULT_HANDSHAKE_TIMEOUT, MAX_HANDSHAKE_TIMEOUT, contexts, material
from keyden.tls.engine import engine
from keyden.tls.transport import TlsTransport

_KNOWN_FLAGS = TLS_REQUIRE_CLIENT_CERT | TLS13_ONLY | TLS_EXPLICIT_CLOSE
_STREAM_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


@handles(Op.TLS_ACCEPT)
def _tls_accept(ctx, keyring, client_trust, flags, alpn, timeout_ms):
    with _passed_socket(ctx) as sock:
        _check(flags, _KNOWN_FLAGS)
        protocols = _protocols(alpn)
        keys = _own_keys(ctx, keyring)
        anchors = trusted_certificates(ctx.store, ctx.caller, client_trust) if client_trust else None
        tls_ctx = contexts.server_context(keys, anchors, flags & ~TLS_EXPLICIT_CLOSE, protocols, ctx.caller.uid)
        tls = _wrap(sock, lambda dup: TlsTransport.wrap(dup, tls_ctx, server_side=True, owner=_sender(dup)))
        _start(ctx, tls, timeout_ms, bool(flags & TLS_EXPLICIT_CLOSE))
    return ()


@handles(Op.TLS_CONNECT)
def _tls_connect(ctx, server_hostname, trust, identity, flags, alpn, timeout_ms):
    with _passed_socket(ctx) as sock:
        _check(flags, TLS13_ONLY | TLS_EXPLICIT_CLOSE)
        if not server_hostname:
            raise E.EINVAL("a server name is required: it is what the certificate is checked against")
        server_hostname = _server_name(server_hostname)
        protocols = _protocols(alpn)
        anchors = trusted_certificates(ctx.store, ctx.caller, trust)
        identity_keys = _own_keys(ctx, identity) if identity else None
        tls_ctx = contexts.client_context(anchors, identity_keys, flags & ~TLS_EXPLICIT_CLOSE, protocols,
                                          ctx.caller.uid)
        tls = _wrap(sock, lambda dup: TlsTransport.wrap(dup, tls_ctx, server_side=False,
                                                        server_hostname=server_hostname, owner=_sender(dup)))
        _start(ctx, tls, timeout_ms, bool(flags & TLS_EXPLICIT_CLOSE))
    return ()


@handles(Op.TLS_ABORT)
def _tls_abort(ctx):
    """The plaintext socket sent with the request names the session: whoever holds it may end it."""
    with _taken_socket(ctx, "the plaintext socket") as sock:  # (a duplicate: the application still holds its own)
        engine().abort(sock)
    return ()


@handles(Op.TLS_CLOSE_NOTIFY)
def _tls_close_notify(ctx):
    """The session's deliberate end (its close_notify), asked for by whoever holds the plaintext socket."""
    with _taken_socket(ctx, "the plaintext socket") as sock:
        engine().close_notify(sock)
    return ()


@handles(Op.TLS_PEER_END)
def _tls_peer_end(ctx):
    with _taken_socket(ctx, "the plaintext socket") as sock:
        return (engine().peer_end(sock),)


def _server_name(name: str) -> str:
    """The name sent as SNI and checked against the server's certificate: an IP address, or a host name
    (IDNA for Unicode), a trailing dot taken off (a fully-qualified name names the same host, and SNI
    carries none: RFC 6066 3); EINVAL, saying why, for anything else."""
    address = name.partition("%")[0] if ":" in name else name  # (fe80::1%eth0: a zone is the local host's
    try:                                                       # business, in no certificate)
        ipaddress.ip_address(address)
        return address
    except ValueError:
        pass
    too_long = f"the server name is not a valid host name (at most {material.MAX_HOST_NAME} bytes)"
    if len(name) > material.MAX_HOST_NAME + 1:  # (at most as many characters as bytes, a trailing dot besides)
        raise E.EINVAL(too_long)
    try:
        encoded = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise E.EINVAL("the server name is not a valid host name (IDNA cannot encode it)") from None
    if not material.is_host_name(encoded):
        raise E.EINVAL(too_long if len(encoded.rstrip(".")) > material.MAX_HOST_NAME else
                       "the server name is not a valid host name (labels of letters, digits and hyphens, "
                       "separated by dots) or IP address")
    return name[:-1] if name.endswith(".") else name


def _wrap(sock: socket.socket, wrap) -> TlsTransport:
    """``wrap`` (TlsTransport.wrap) applied to a duplicate of ``sock``.  What it refuses, the duplicate is
    closed there and then, on this thread: its close is never the last one (``sock`` is still open, and
    _passed_socket gives it to a closer), so it cannot wait on the application's linger.  (Nothing is
    read or written here: a peer's reset meets the handshake, which says ECONNRESET.)"""
    try:
        dup = sock.dup()
    except OSError as exc:
        raise E.EMFILE(f"cannot take the socket over: {exc.strerror}") from None
    try:
        return wrap(dup)
    except (ValueError, UnicodeError, TypeError, ssl.SSLError):  # what the checks before did not foresee
        dup.close()
        raise E.EINVAL("the socket cannot be set up for TLS with these arguments") from None


def _sender(sock: socket.socket) -> int:
    """Whose are descriptors that arrive on a network socket: its peer's, who sends them (a Unix socket's;
    charged to the application, any uid that may connect to it could fill the closers in its name and
    have its connections to keyden refused)."""
    return peer.uid_of(sock) if sock.family == socket.AF_UNIX else descriptors.NOBODY


def _own_keys(ctx, keyring: int) -> list:
    """The keys we may present: a certificate on the blacklist is never served, ours included."""
    return [k for k in material.keyring_keys(ctx.store, ctx.caller, keyring)
            if k.certificate is None or not is_blacklisted(ctx.store, k.certificate)]


def _check(flags: int, known: int) -> None:
    if flags & ~known:
        raise E.EINVAL("unknown flags")


MAX_ALPN_BYTES = 65535  # the ALPN extension's own bound (RFC 7301: a 2-byte length)


def _protocols(alpn: list[bytes]) -> tuple[str, ...]:
    try:
        names = tuple(p.decode("ascii") for p in alpn)
    except UnicodeDecodeError:
        raise E.EINVAL("ALPN protocol names must be ASCII") from None
    if any(not 0 < len(n) < 256 for n in names):
        raise E.EINVAL("ALPN protocol names are 1..255 bytes")
    if sum(len(n) + 1 for n in names) > MAX_ALPN_BYTES - 2:
        raise E.EINVAL(f"the ALPN list must fit the extension's {MAX_ALPN_BYTES} bytes")
    return names


@contextlib.contextmanager
def _passed_socket(ctx) -> Iterator[socket.socket]:
    """The connected stream socket sent with the request, taken at once (a refusal must not leave it to
    the next request) and given to a closer here, whatever becomes of the request (a session takes a
    duplicate).  Its flags are left alone: the open
    file description is the application's too, and the engine makes it non-blocking only once nothing
    can refuse the request any more (Engine.start)."""
    with _taken_socket(ctx, "the connected socket") as sock:  # (a session takes a duplicate: _wrap, _start)
        if sock.type != socket.SOCK_STREAM or sock.family not in _STREAM_FAMILIES:
            raise E.EINVAL("pass a connected TCP or Unix stream socket")
        try:
            sock.getpeername()
        except OSError:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise E.EINVAL("a listening socket: pass a connection accepted from it") from None
            if sock.family != socket.AF_UNIX and sock.getsockname()[1]:  # it had a connection: the peer's
                # reset ended it before keyden took it, which no application should take for its own mistake
                raise E.ECONNRESET("the peer closed the connection before the handshake began") from None
            raise E.EINVAL("the socket is not connected") from None
        yield sock


@contextlib.contextmanager
def _taken_socket(ctx, what: str) -> Iterator[socket.socket]:
    """The socket the request carries, given to a closer when done with (its close may linger)."""
    fd = ctx.fds.take(what)
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        descriptors.release((fd,), ctx.caller.uid)
        raise E.EBADF("the descriptor sent is not a socket") from None
    try:
        yield sock
    finally:
        descriptors.release_socket(sock, ctx.caller.uid)


def _start(ctx, tls: ssl.SSLSocket, timeout_ms: int, explicit_close: bool) -> None:
    if timeout_ms > MAX_HANDSHAKE_TIMEOUT * 1000:
        descriptors.release_socket(tls, ctx.caller.uid)
        raise E.EINVAL(f"the handshake timeout is at most {MAX_HANDSHAKE_TIMEOUT * 1000:.0f} ms (0: the default)")
    timeout = timeout_ms / 1000 if timeout_ms else DEFAULT_HANDSHAKE_TIMEOUT
    store = ctx.store
    outcome = _Outcome(ctx.audit)
    ctx.after_audit.append(outcome.release)
    try:
        app = engine().start(ctx.caller.uid, tls, timeout, lambda chain: refuse_blacklisted(store, chain),
                             outcome.report, explicit_close)
    except BaseException:
        descriptors.release_socket(tls, ctx.caller.uid)
        raise
    ctx.out_fds.append(app.detach())


def refuse_blacklisted(store, chain: list[bytes]) -> None:
    """EKEYREJECTED if the peer's verified chain holds a blacklisted certificate, or one that cannot be
    checked: OpenSSL takes some encodings pyca refuses (a PrintableString with '@' in a name), and a
    certificate that cannot be parsed cannot be looked up in the blacklist; nor can a key ban ("bin:" of
    its SPKI) be checked for a key pyca cannot load."""
    for der in chain:
        try:
            cert = x509.load_der_x509_certificate(der)
            subject = subject_of(cert)
            if not spki_of(cert):  # (refused whether or not anything is banned: whether it is cannot be known)
                raise E.EKEYREJECTED(f"the peer's certificate chain holds a certificate whose key keyden cannot "
                                     f"read (OpenSSL accepted it), so a ban of that key cannot be checked: {subject}")
            blacklisted = is_blacklisted(store, cert)
        except ValueError:
            raise E.EKEYREJECTED("the peer's certificate chain holds a certificate keyden cannot parse "
                                 "(OpenSSL accepted its encoding), so it cannot be checked") from None
        if blacklisted:
            raise E.EKEYREJECTED(f"peer certificate chain holds a blacklisted certificate: {subject}")


class _Outcome:
    """The handshake's outcome for the audit log, never ahead of its request's own line: an outcome
    known before that line is written (a first handshake step that failed at once) waits for it."""

    def __init__(self, audit):
        self.audit = audit
        self.lock = threading.Lock()
        self.released = False
        self.waiting: int | None = None

    def report(self, status: int) -> None:
        """From the TLS engine, once."""
        with self.lock:
            if not self.released:
                self.waiting = status
                return
        self._record(status)

    def release(self) -> None:
        """The request's line is written: from now on the outcome goes straight to the log."""
        with self.lock:
            self.released = True
            status, self.waiting = self.waiting, None
        if status is not None:
            self._record(status)

    def _record(self, status: int) -> None:
        if self.audit is not None:
            self.audit.record_now(Op.TLS_ESTABLISHED, status)
