"""Keyrings as TLS material: identities (certificate, chain, private key) and trust anchors.

A keyring serves as an identity store when it holds a certificate and the
private key with the same SPKI id (``key_ids[0]``); further certificates in
it are candidate intermediates.  Only what the caller may use is taken, as
for any key used by serial: search permission on the keyring (and those
nested in it) and on each key; revoked or expired keys are skipped.
Trust anchors and the blacklist are keyden.core.trust's.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from keyden.core import trust

MAX_CHAIN = 8  # intermediates sent after a leaf, at most


@dataclass(frozen=True, eq=False)
class Identity:
    """What a TLS endpoint presents: its certificate, the intermediates above it, its private key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private: object  # the ParsedKey holding the private half; it stays in the daemon
    names: tuple[str, ...]  # DNS names (lower case) it answers for under SNI


def keyring_keys(store, caller, keyring: int) -> list:
    """The parsed asymmetric keys in a keyring tree the caller may search for, in link order, to present.

    The private key of each identity among them signs the handshake and does nothing else (the contexts
    agree on keys by (EC)DHE only, never by RSA key transport), so a private key bound to other uses
    (flags.ASYMMETRIC_USE) is left out before certificates are paired with keys: its certificate is no
    identity (unless the same key is there again, free to sign), and a key-transport certificate filed
    beside a server's does not stop the server.  If that leaves no identity at all where there would be
    one, the first such key's refusal (EOPNOTSUPP) says why.  Other private keys in the tree are not used.
    """
    with store.lock:
        held = trust.trusted_keys(store, caller, keyring)
        cannot_sign = [serial for serial, parsed in held
                       if parsed.has_private and "sign" not in store.asymmetric_uses(caller, serial)[1]]
        kept = [parsed for serial, parsed in held if serial not in cannot_sign]
        if cannot_sign and not _pairs(kept) and _pairs([parsed for _serial, parsed in held]):
            certified = {parsed.key_ids[0] for _serial, parsed in held if parsed.certificate is not None}
            refused = next(serial for serial, parsed in held
                           if serial in cannot_sign and parsed.key_ids[0] in certified)
            store.asymmetric(caller, refused, "sign")  # raises: the key, its uses, and sign
        return kept


def _pairs(keys: list) -> list[tuple]:
    """(certificate, its private key) for each certificate among ``keys`` whose private key is there too."""
    private = {k.key_ids[0]: k for k in keys if k.has_private}
    return [(k, private[k.key_ids[0]]) for k in keys if k.certificate is not None and k.key_ids[0] in private]


def identities(keys: list, now: datetime.datetime | None = None) -> list[Identity]:
    """Each certificate whose private key is among ``keys``, with its chain: those valid ``now`` first,
    each group in keyring order (a renewal that made a new key leaves the old certificate and key
    beside the new ones, and the expired one came first).  Where the name is the same, the first wins."""
    pool = [k.certificate for k in keys if k.certificate is not None]
    pairs = sorted(_pairs(keys), key=lambda pair: not valid_at(pair[0].certificate, now))  # (stable)
    return [Identity(k.certificate, _chain(k.certificate, pool), private, dns_names(k.certificate))
            for k, private in pairs]


def valid_at(cert: x509.Certificate, now: datetime.datetime | None = None) -> bool:
    """Is ``now`` (default: this moment) within the certificate's validity?"""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _chain(leaf: x509.Certificate, pool: list[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The intermediates from ``pool`` that signed ``leaf`` and so on upward; a self-signed root is left out."""
    chain: list[x509.Certificate] = []
    current = leaf
    while len(chain) < MAX_CHAIN:
        issuer = next((c for c in pool if c is not current and c not in chain and _issued(current, c)), None)
        if issuer is None or issuer.issuer == issuer.subject:
            break
        chain.append(issuer)
        current = issuer
    return tuple(chain)


def _issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def dns_names(cert: x509.Certificate) -> tuple[str, ...]:
    """subjectAltName DNS names; without that extension, the common name (as older clients read it)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return tuple(str(a.value).lower() for a in cns)


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125: exact, or '*.rest' covering exactly one more label on the left."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        label, dot, rest = name.partition(".")
        return bool(label and dot) and rest == pattern[2:]
    return False


MAX_HOST_NAME = 253  # DNS's bound (RFC 1035), under OpenSSL's 255 for the SNI extension
#: a host name as SNI carries it (RFC 6066 3: ASCII, A-labels for IDNs; a trailing dot taken off): labels of
#: letters, digits and hyphens, 1..63 bytes each (underscores too, and hyphens at a label's ends, which
#: names in use have and browsers take)
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")


def is_host_name(name: str) -> bool:
    """Whether ``name`` (ASCII) is a host name: what an SNI may carry, and so a certificate's name be
    checked against.  Anything else (spaces, CR LF, '/', NUL) would reach applications and PROXY headers."""
    return len(name.rstrip(".")) <= MAX_HOST_NAME and _HOST_NAME.fullmatch(name) is not None


def choose(names_per_identity: list[tuple[str, ...]], server_name: str) -> int:
    """Which identity answers ``server_name``: an exact name wins over a wildcard; none matching -> the first."""
    name = server_name.lower().rstrip(".")
    for exact in (True, False):
        for i, names in enumerate(names_per_identity):
            if any((p == name) if exact else name_matches(p, name) for p in names):
                return i
    return 0
