"""``ssl.SSLContext`` objects built from keyring material, cached while that material is unchanged.

Python's ``ssl`` loads certificates and keys only from files, so the PEM
goes into a memfd of the daemon's, read back through ``/proc/self/fd/N``
and closed at once: nothing is ever written to disk, and the descriptor is
close-on-exec and never shared.  A server gets one context per identity;
the first is the default and its SNI callback switches a connection to the
identity whose names match.  Every context of a server carries the same
verification settings, because OpenSSL keeps the first context's verify
mode but consults the switched-to context's trust store.  A server that
verifies client certificates resumes no session: each connection starts in
a fresh front context (``_front``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import threading
import time
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from keyden import errors as E
from keyden.crypto import asymmetric
from keyden.protocol import TLS13_ONLY, TLS_REQUIRE_CLIENT_CERT
from keyden.tls.fair import FairMap
from keyden.tls.material import Identity, choose, identities, is_host_name, valid_at
from keyden.tls.transport import TlsObject

MAX_CACHED = 64
SESSION_EPOCH = 300  # seconds: a server's contexts, and the sessions they could resume, are made anew so often
#: The key exchanges keyden's TLS 1.2 suites may use: (EC)DHE, where the identity key only signs.  RSA key
#: transport would have an RSA identity key decrypt the client's premaster secret (a ``decrypt`` use of a key
#: that may be bound to ``sign``, flags.ASYMMETRIC_USE); PSK and SRP suites authenticate with no key at all.
#: TLS 1.3 agrees on keys by (EC)DHE always.
TLS12_KEY_EXCHANGES = ("kx-ecdhe", "kx-dhe")
#: ... and the authentications: by a certificate's key, never anonymous (aNULL, which a policy of "ALL"
#: enables: no server authenticated at all).  Suites must encrypt, too (no eNULL).
TLS12_AUTHENTICATIONS = ("auth-rsa", "auth-ecdsa")


_cache = FairMap(MAX_CACHED)  # cache key -> context, held by the uid whose request built it
_held = _cache.held  # uid -> contexts of its in the cache
_cache_lock = threading.Lock()


def _cached(key: tuple, build, replaces=None, uid: int = -1) -> ssl.SSLContext:
    """The context cached under ``key``, or ``build()``'s, cached for ``uid``; it drops those whose key
    ``replaces``.  Past MAX_CACHED, the least recently used of the uid holding the most goes (FairMap):
    with the least recently used of all, one uid making contexts by the dozen pushed every other uid's
    out, and their sessions with them."""
    with _cache_lock:
        ctx = _cache.get(key)
        if ctx is not None:
            _cache.touch(key)
            return ctx
    ctx = build()  # outside the lock: a key load can take a millisecond; a duplicate build is harmless
    with _cache_lock:  # _forget runs under it too: a key released before this is seen here, after it is dropped
        if replaces is not None:
            for old in [k for k in _cache if k != key and replaces(k)]:
                _cache.pop(old)
        if not any(k.released for k in _parsed_keys(key)):  # else: used this once, kept not
            _cache.put(uid, key, ctx)
    return ctx


def _parsed_keys(cache_key: tuple):
    """The ParsedKeys a cache key names (alone, or in a tuple of them)."""
    for part in cache_key:
        for item in part if isinstance(part, tuple) else (part,):
            if isinstance(item, asymmetric.ParsedKey):
                yield item


def _forget(released) -> None:
    """A key was destroyed: drop every cached context built with it (they hold it loaded in OpenSSL)."""
    with _cache_lock:
        for cache_key in [k for k in _cache if any(p is released for p in _parsed_keys(k))]:
            _cache.pop(cache_key)


asymmetric.on_release(_forget)


def server_context(keys: list, trust: list[x509.Certificate] | None, flags: int,
                   alpn: tuple[str, ...], uid: int = -1) -> ssl.SSLContext:
    """The context to wrap one connection of a TLS server with the identities among ``keys`` (parsed
    asymmetric keys).

    It hands each connection to the identity its SNI names.  ``trust`` None: clients are not asked
    for certificates; else they must chain to one in it, and no session is ever resumed (see
    ``_front``), so every connection's certificate is verified in full.
    """
    if trust is None and flags & TLS_REQUIRE_CLIENT_CERT:
        raise E.EINVAL("requiring client certificates needs a client trust keyring")
    if trust is not None and not trust:
        raise E.ENOKEY("no certificates in the client trust keyring")

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = tuple(valid_at(k.certificate, now) for k in keys if k.certificate is not None)

    def build() -> ssl.SSLContext:
        idents = identities(keys, now)
        if not idents:
            raise E.ENOKEY("no certificate with its private key in the keyring")
        contexts = []
        for ident in idents:
            ctx = _base(ssl.PROTOCOL_TLS_SERVER, flags, alpn)
            _load_identity(ctx, ident)
            # Sessions stay in the server's own cache, never in tickets sealed with a key that lives as
            # long as the context: a TLS 1.2 ticket carries the master secret, so whoever later got that
            # key could read every session recorded with one (no forward secrecy).  The cache goes with
            # its context, made anew every SESSION_EPOCH (OpenSSL's own entries last 7200 s).
            ctx.options |= ssl.OP_NO_TICKET
            if trust:
                _load_trust(ctx, trust)
                ctx.verify_mode = ssl.CERT_REQUIRED if flags & TLS_REQUIRE_CLIENT_CERT else ssl.CERT_OPTIONAL
                _no_resumption(ctx)
            elif len(idents) > 1:
                # All identities share the first context's session cache, and OpenSSL resumes a TLS 1.3
                # session under another SNI name than it was made for (TLS 1.2 keeps the session's own):
                # a session authenticated as one name would reach the application as another.
                ctx.num_tickets = 0
            contexts.append(ctx)
        names = [i.names for i in idents]

        def by_sni(sock: TlsObject, server_name: str | None, _ctx) -> int | None:
            chosen = contexts[0]
            if server_name:
                if not is_host_name(server_name):  # (CR LF and the like would reach the application, and a
                    return ssl.ALERT_DESCRIPTION_ILLEGAL_PARAMETER  # PROXY header's authority)
                sock.requested_name = server_name
                chosen = contexts[choose(names, server_name)]
            if chosen is not sock.context:
                sock.context = chosen
            return None

        contexts[0].sni_callback = by_sni
        return contexts[0]

    material = ("server", tuple(keys), tuple(trust or ()), flags, alpn)
    # The validity of each certificate (one expiring reorders the identities: ``identities``) and the
    # session epoch are part of the key; a new one drops the contexts, and session caches, of earlier ones.
    generation = (valid, int(time.time() // SESSION_EPOCH))
    default = _cached(material + (generation,), build, replaces=lambda key: key[:-1] == material, uid=uid)
    return default if trust is None else _front(default, flags, alpn)


def _no_resumption(ctx: ssl.SSLContext) -> None:
    """Issue no session tickets (TLS 1.2 tickets; in TLS 1.3 every resumption needs one)."""
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0


def _front(default: ssl.SSLContext, flags: int, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A context of one connection's own, in front of a server's cached ones, so it resumes no session.

    A resumed session skips certificate verification, and the engine could then only re-check the
    leaf the session remembers against the blacklist, not the chain against today's trust.  No
    tickets stop most resumption, but TLS 1.2 also resumes by session id from OpenSSL's server cache,
    which Python cannot turn off.  That cache belongs to the context a connection starts in, so
    starting each in a fresh one leaves nothing to resume.  It holds no key: its SNI callback (the
    default's) always moves the connection to an identity's cached context, whose trust store OpenSSL
    then verifies against; verify mode and flags are kept from the first context, so they are copied.
    """
    front = _base(ssl.PROTOCOL_TLS_SERVER, flags, alpn)
    _no_resumption(front)
    front.verify_mode = default.verify_mode
    front.verify_flags = default.verify_flags
    front.sni_callback = default.sni_callback
    return front


def client_context(trust: list[x509.Certificate], identity_keys: list | None, flags: int,
                   alpn: tuple[str, ...], uid: int = -1) -> ssl.SSLContext:
    """A TLS client that trusts only ``trust`` and checks the server's name.

    ``identity_keys``: parsed keys holding a certificate and its private key, to answer client-auth.
    """
    if not trust:
        raise E.ENOKEY("no certificates in the trust keyring")

    def build() -> ssl.SSLContext:
        ctx = _base(ssl.PROTOCOL_TLS_CLIENT, flags, alpn)  # check_hostname and CERT_REQUIRED are its defaults
        ctx.hostname_checks_common_name = False  # the name must be in subjectAltName (RFC 9525), as x509_verify's
        _load_trust(ctx, trust)
        if identity_keys is not None:
            idents = identities(identity_keys)
            if not idents:
                raise E.ENOKEY("no certificate with its private key in the identity keyring")
            _load_identity(ctx, idents[0])
        return ctx

    identity = tuple(identity_keys) if identity_keys is not None else None
    valid = tuple(valid_at(k.certificate) for k in identity or () if k.certificate is not None)  # see server_context
    material = ("client", tuple(trust), identity, flags, alpn)
    return _cached(material + (valid,), build, replaces=lambda key: key[:-1] == material, uid=uid)


def _base(protocol: int, flags: int, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    tls12 = _keep_key_exchanges(ctx)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if flags & TLS13_ONLY or not tls12 else ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # a peer must not make us redo expensive handshakes at will
    # A TCP end without close_notify is OpenSSL's error, not a simulated close_notify (what
    # OP_IGNORE_UNEXPECTED_EOF makes of it): the engine tells the application it was a truncation
    # (TLS_PEER_END), after end of file on its plaintext socket as for any end.
    ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.sslobject_class = TlsObject  # what the engine drives (transport.TlsTransport)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _keep_key_exchanges(ctx: ssl.SSLContext) -> bool:
    """Narrow the TLS 1.2 suites this Python and its system policy enable to TLS12_KEY_EXCHANGES and
    TLS12_AUTHENTICATIONS, with encryption, in their order (the policy's choices and security level stand;
    RSA key transport, anonymous and null suites go, whatever this Python was built with).  False if none
    is left: then TLS 1.2 is off."""
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3"]
    kept = [c["name"] for c in tls12 if c["kea"] in TLS12_KEY_EXCHANGES and c["auth"] in TLS12_AUTHENTICATIONS
            and c["symmetric"] is not None]
    if kept and len(kept) < len(tls12):
        ctx.set_ciphers(":".join(kept))
    return bool(kept)


def _load_trust(ctx: ssl.SSLContext, trust: list[x509.Certificate]) -> None:
    # From a file (a memfd), not cadata: Python's ssl parses cadata holding the GIL, and so every thread
    # of the daemon (25 ms for the 143 certificates of .builtin_trusted_keys), a file with it released.
    with _memory_file(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in trust)) as path:
        ctx.load_verify_locations(cafile=path)
    # Every certificate in a trust keyring is an anchor, as in the kernel: an intermediate need not
    # be followed up to a self-signed root.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def _load_identity(ctx: ssl.SSLContext, ident: Identity) -> None:
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (ident.certificate, *ident.chain))
    private = ident.private.private_key_for_internal_use().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        with _memory_file(chain) as cert_path, _memory_file(private) as key_path:
            ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as exc:
        raise E.EKEYREJECTED(f"OpenSSL refused the certificate or key: {exc.reason or 'unknown reason'}") from None


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path naming ``data`` in anonymous memory, valid until the block ends."""
    fd = os.memfd_create("keyden-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)
