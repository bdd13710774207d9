"""Trust: asymmetric keyring restrictions, the system keyrings, the blacklist, X.509 path validation.

The kernel's model (crypto/asymmetric_keys/restrict.c, certs/system_keyring.c,
certs/blacklist.c) on keyden's store:

* ``restrict_keyring RING asymmetric key_or_keyring:<serial>[:chain]``,
  ``builtin_trusted`` and ``builtin_and_secondary_trusted``: a certificate
  enters such a keyring only if a trusted key signed it (ENOKEY if no
  trusted key is its issuer, EKEYREJECTED if the issuer's signature does not
  verify); anything but an asymmetric key is EOPNOTSUPP.
* System keyrings made at daemon start, owned by root and immune to revoke,
  invalidate, clear and timeouts (KEY_FLAG_KEEP): ``.builtin_trusted_keys``
  (a CA bundle), ``.secondary_trusted_keys`` (root adds certificates signed
  by a builtin or secondary key) and ``.blacklist``.
* ``blacklist`` keys ("tbs:<hex>", "bin:<hex>") in ``.blacklist``: a
  certificate or key matching one is refused (EKEYREJECTED) wherever it
  would enter a keyring, and no X.509 chain through it validates.

Everything here runs under the store's lock except path validation itself.
"""

from __future__ import annotations

import logging
import re
import types
import weakref
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core import perm as P
from keyden.core.key import Caller, Key, Restriction
from keyden.core.store import ADMISSION_CHECKS, RESTRICTION_FACTORIES, KeyStore
from keyden.crypto import asymmetric
from keyden.crypto import x509 as X

log = logging.getLogger("keyden.trust")

BUILTIN, SECONDARY, BLACKLIST = ".builtin_trusted_keys", ".secondary_trusted_keys", ".blacklist"
#: .builtin_trusted_keys: possessor all but setattr; everyone (root included) view, read, search.
BUILTIN_KEYRING_PERM = 0x1F0B0B0B
#: .secondary_trusted_keys and .blacklist: the same, and root (their owner) may also write (add).
ADMIN_KEYRING_PERM = 0x1F0F0B0B
#: certificates loaded at start: view, read, search and link for all (link them into your own keyrings).
SYSTEM_CERT_PERM = 0x1B1B1B1B
#: blacklist entries: view and search for all.
BLACKLIST_KEY_PERM = 0x09090909

MAX_HASH_HEX = 128  # the kernel's MAX_HASH_LEN
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_S32 = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\n?")


# --------------------------------------------------------------- the blacklist


def check_blacklist_description(description: str) -> None:
    """blacklist_vet_description: "tbs:" or "bin:", then an even number of lower-case hex digits."""
    kind, colon, digits = description.partition(":")
    if not colon or kind not in ("tbs", "bin") or not re.fullmatch(r"[0-9a-f]*", digits):
        raise E.EINVAL("blacklist descriptions are 'tbs:<hex>' or 'bin:<hex>' in lower-case hex")
    if len(digits) > MAX_HASH_HEX:
        raise E.EINVAL(f"a blacklisted hash has at most {MAX_HASH_HEX} hex digits")
    if not digits or len(digits) % 2:
        raise E.EINVAL("a blacklisted hash is an even, non-zero number of hex digits")


class BlacklistType(T.KeyType):
    """A hash no certificate or key may have: the kernel's "blacklist" type.  No payload; permanent."""

    name = "blacklist"
    default_perm = BLACKLIST_KEY_PERM
    keep = True

    def check_description(self, description: str) -> None:
        check_blacklist_description(description)

    def preparse(self, payload: bytes, secret: bytes | None = None) -> tuple[Any, int]:
        if payload:
            raise E.EINVAL("blacklist keys take no data")
        return None, 0

    def summary(self, payload: Any, quota_len: int) -> str:
        return ""  # blacklist_describe: the description alone


BLACKLIST_TYPE = BlacklistType()
T.register(BLACKLIST_TYPE)
ASYMMETRIC = T.REGISTRY["asymmetric"]


@dataclass(frozen=True)
class SystemKeyrings:
    builtin: Key
    secondary: Key
    blacklist: Key


_SYSTEM: "weakref.WeakKeyDictionary[KeyStore, SystemKeyrings]" = weakref.WeakKeyDictionary()


def _descriptions(item) -> list[str]:
    if isinstance(item, x509.Certificate):
        return X.blacklist_descriptions(item)
    return X.blacklist_descriptions(item.certificate, item.spki_der)


def is_blacklisted(store: KeyStore, item: x509.Certificate | asymmetric.ParsedKey) -> bool:
    """Is this certificate (or parsed key) named by a live entry in the store's ``.blacklist``?"""
    system = _SYSTEM.get(store)
    if system is None or not system.blacklist.links:  # nothing banned: no hashes to compute
        return False
    names = _descriptions(item)
    with store.lock:
        now = store.clock()
        for name in names:
            entry = system.blacklist.links.get((BLACKLIST_TYPE.name, name))
            if entry is not None and entry.state_error(now) is None:
                return True
    return False


def _admission_check(store: KeyStore, ring: Key, ktype: T.KeyType, payload: Any) -> None:
    """Run for every add, link and move: blacklist entries live in .blacklist only; blacklisted keys nowhere."""
    if ktype is BLACKLIST_TYPE:
        system = _SYSTEM.get(store)
        if system is None or ring is not system.blacklist:
            raise E.EPERM(f"blacklist keys belong in {BLACKLIST} only")
    elif ktype is ASYMMETRIC and is_blacklisted(store, payload):
        raise E.EKEYREJECTED("the key is blacklisted")


ADMISSION_CHECKS.append(_admission_check)


class _BlacklistOnly(Restriction):
    """.blacklist's own restriction (restrict_link_for_blacklist): blacklist keys and nothing else."""

    description = "blacklist keys only"

    def check(self, store, keyring, ktype, payload):
        if ktype is not BLACKLIST_TYPE:
            raise E.EOPNOTSUPP(f"{BLACKLIST} holds blacklist keys only")


# ------------------------------------------------------- keys a keyring holds


def trusted_keys(store: KeyStore, caller: Caller, keyring: int) -> list[tuple[int, asymmetric.ParsedKey]]:
    """(serial, parsed key) of every asymmetric key a KEYCTL_SEARCH from the keyring could find."""
    return [(key.serial, key.payload) for key in store.searchable(caller, keyring, ASYMMETRIC)]


def trusted_certificates(store: KeyStore, caller: Caller, keyring: int) -> list[x509.Certificate]:
    """The certificates a keyring vouches for, as the caller may see them, blacklisted ones left out.

    For TLS peers verified against a trust keyring: search permission on
    the keyring, and on each key, as KEYCTL_SEARCH would need.
    """
    with store.lock:
        return [parsed.certificate for _, parsed in trusted_keys(store, caller, keyring)
                if parsed.certificate is not None and not is_blacklisted(store, parsed)]


# --------------------------------------------------------------- restrictions


class SignedBy(Restriction):
    """restrict_link_by_key_or_keyring[_chain] and the builtin restrictions: admit what a trusted key signed.

    ``key`` is the trusted key or keyring; ``system`` instead names a
    system keyring looked up at check time; ``check_dest`` (":chain") also
    trusts what the restricted keyring already holds, so chains build up.
    """

    def __init__(self, description: str, key: Key | None = None, system: str = "", check_dest: bool = False):
        self.description = description
        self.key = key
        self.system = system
        self.check_dest = check_dest
        # What names a trusted key as an issuer (public), kept for after its payload is wiped: a certificate
        # it issued then meets its state (EKEYREVOKED...), as the kernel's key_validate; others, ENOKEY.
        self._names = None
        if key is not None and key.type is ASYMMETRIC:
            self._names = types.SimpleNamespace(key_ids=key.payload.key_ids, certificate=key.payload.certificate)

    def _trusted(self, store: KeyStore) -> Key | None:
        if not self.system:
            return self.key
        rings = _SYSTEM.get(store)
        return getattr(rings, self.system) if rings is not None else None

    def check(self, store, keyring, ktype, payload):
        if ktype is not ASYMMETRIC:
            raise E.EOPNOTSUPP(f"keyring {keyring.serial} admits asymmetric keys only")
        cert = payload.certificate
        if cert is None:
            raise E.ENOKEY("a bare key carries no signature for a trusted key to vouch for")
        trusted = self._trusted(store)
        if trusted is not None and trusted.links is None and trusted.type is not ASYMMETRIC:
            raise E.EOPNOTSUPP(f"trusted key {trusted.serial} is neither a keyring nor an asymmetric key")
        candidates = []

        def banned(signer) -> bool:
            return is_blacklisted(store, signer)

        if trusted is not None and trusted.links is not None:  # a keyring: what it holds (nothing once gone)
            if not trusted.dead:
                candidates = X.signer_candidates(cert, [k.payload for k in store.held(trusted, ASYMMETRIC)], banned)
        elif trusted is not None and self._names is not None:  # a key: is it the issuer?  Then its state counts
            if X.signer_candidates(cert, [self._names]):
                unusable = trusted.state_error(store.clock())
                if unusable is not None or trusted.dead:  # key_validate on the signer found
                    raise unusable or E.ENOKEY(f"trusted key {trusted.serial} is gone")
                candidates = [trusted.payload]
        if not candidates and self.check_dest:
            candidates = X.signer_candidates(cert, [k.payload for k in store.held(keyring, ASYMMETRIC)], banned)
        if not candidates:
            raise E.ENOKEY("no trusted key is the certificate's issuer")
        for signer in candidates:
            if X.signed_by(cert, signer.public_key):
                if is_blacklisted(store, signer):
                    raise E.EKEYREJECTED("the certificate's signer is blacklisted")
                return
        raise E.EKEYREJECTED("the issuer's signature on the certificate does not verify")


def _kstrtos32(text: str) -> int:
    """The kernel's kstrtos32(text, 0): decimal, 0x hex or 0 octal, one trailing newline allowed."""
    if not _S32.fullmatch(text):
        raise E.EINVAL(f"unparsable key serial {text[:32]!r}")
    digits = text.strip().lstrip("+-")
    value = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits[:1] == "0" else 10)
    value = -value if text.startswith("-") else value
    if not -2**31 <= value < 2**31:
        raise E.EINVAL("key serial out of range")
    return value


def asymmetric_restriction(store: KeyStore, caller: Caller, text: str) -> Restriction:
    """asymmetric_lookup_restriction: parse a restriction string for the asymmetric type."""
    if text == "builtin_trusted":
        return SignedBy(text, system="builtin")
    if text == "builtin_and_secondary_trusted":
        return SignedBy(text, system="secondary")
    method, colon, rest = text.partition(":")
    if method != "key_or_keyring" or not colon:
        raise E.EINVAL("asymmetric restrictions: key_or_keyring:<serial>[:chain], builtin_trusted, "
                       "builtin_and_secondary_trusted")
    serial_text, colon, mode = rest.partition(":")
    if colon and mode != "chain":
        raise E.EINVAL("the only key_or_keyring option is ':chain'")
    serial = _kstrtos32(serial_text)
    if serial == 0 and colon:
        return SignedBy(text, check_dest=True)
    if serial <= 0:
        raise E.ENOKEY(f"no key with serial {serial}")
    # Search permission, which the kernel's key_lookup does not ask: the restriction holds the key (keeps it
    # alive, charged to its owner), which no one should do to a key they may not even find.
    return SignedBy(text, key=store.operand(caller, serial, P.SEARCH), check_dest=bool(colon))


RESTRICTION_FACTORIES[ASYMMETRIC.name] = asymmetric_restriction


# ----------------------------------------------------------- system keyrings


def _load_blacklist(store: KeyStore, ring: Key, source: str, text: bytes) -> int:
    """One 'tbs:<hex>' or 'bin:<hex>' a line; '#' comments.  A bad line stops the daemon: never skip a ban."""
    count = 0
    for number, line in enumerate(text.decode(errors="replace").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            check_blacklist_description(entry)
        except E.KeydenError as exc:
            raise E.EINVAL(f"{source}:{number}: {exc.message}") from None
        store.add_system_key(BLACKLIST_TYPE, entry, None, 0, BLACKLIST_KEY_PERM, keyring=ring)
        count += 1
    return count


def _load_bundle(store: KeyStore, ring: Key, pem: bytes) -> tuple[int, int, int, int]:
    """Each PEM certificate of a CA bundle into ``ring``: (loaded, refused by the parser, blacklisted,
    replaced).  ``replaced`` counts certificates that took the place of an earlier one with the same
    description (subject and key id: a root re-issued with its key), as add_key would."""
    loaded = refused = blacklisted = replaced = 0
    for block in _PEM_CERT.findall(pem):
        try:
            parsed = asymmetric.parse(block)
        except E.KeydenError:
            refused += 1
            continue
        with store.lock:
            again = (ASYMMETRIC.name, parsed.default_description) in ring.links
        try:
            store.add_system_key(ASYMMETRIC, parsed.default_description, parsed, T.asymmetric_quota(len(block)),
                                 SYSTEM_CERT_PERM, keyring=ring)
            loaded += 1
            replaced += again
        except E.EKEYREJECTED:
            blacklisted += 1
    return loaded, refused, blacklisted, replaced


def install_system_keyrings(store: KeyStore, ca_bundle: tuple[str, bytes] | None = None,
                            blacklist: tuple[str, bytes] | None = None) -> SystemKeyrings:
    """Make .blacklist, .builtin_trusted_keys and .secondary_trusted_keys (once per store), and fill them.

    ``ca_bundle`` is (where it came from, its PEM certificates) for the
    builtin keyring, ``blacklist`` (where from, its lines) for the
    blacklist; the caller reads them.  The blacklist is loaded first, so a
    blacklisted CA never becomes trusted.
    """
    existing = _SYSTEM.get(store)
    if existing is not None:
        return existing
    banned_ring = store.add_system_key(T.KEYRING, BLACKLIST, None, 0, ADMIN_KEYRING_PERM)
    banned_ring.restriction = _BlacklistOnly()
    builtin = store.add_system_key(T.KEYRING, BUILTIN, None, 0, BUILTIN_KEYRING_PERM)
    secondary = store.add_system_key(T.KEYRING, SECONDARY, None, 0, ADMIN_KEYRING_PERM)
    store.link_system(secondary, builtin)  # as the kernel: the secondary keyring holds the builtin one
    secondary.restriction = SignedBy("builtin_and_secondary_trusted", system="secondary")
    system = _SYSTEM[store] = SystemKeyrings(builtin, secondary, banned_ring)
    try:
        if blacklist is not None:
            count = _load_blacklist(store, banned_ring, *blacklist)
            log.info("%s: %d entries from %s", BLACKLIST, count, blacklist[0])
        if ca_bundle is not None:
            loaded, refused, banned, replaced = _load_bundle(store, builtin, ca_bundle[1])
            log.info("%s: holds %d certificates from %s; %d replaced an earlier one with the same "
                     "description, %d the parser refused, %d blacklisted",
                     BUILTIN, loaded - replaced, ca_bundle[0], replaced, refused, banned)
    except E.KeydenError as exc:  # the daemon will not start: say why where the operator looks
        log.error("system keyrings: %s", exc.message)
        raise
    return system


# ------------------------------------------------------------------ x509_verify


def verify_chain(store: KeyStore, caller: Caller, cert: int, trust_keyring: int, chain_keyring: int = 0,
                 host: str = "", purpose: str = "", at: int = 0) -> list[tuple[int, str]]:
    """X509_VERIFY: validate a certificate key up to a trust keyring; (serial, subject) leaf first.

    Trust anchors are the certificates the caller may search for in the
    trust keyring tree; intermediates come from the chain keyring (an
    anchor ends a path, so it is never needed as an intermediate).  The
    candidates are bounded before pyca's path search (X.validate).
    Blacklisted certificates are never used, and a blacklisted leaf is
    refused outright.  EKEYREJECTED carries the reason.
    """
    if at < 0:
        raise E.EINVAL("the validation time must not be negative")
    with store.lock:
        key = store.operand(caller, cert)
        if key.type is not ASYMMETRIC or key.payload.certificate is None:
            raise E.EOPNOTSUPP(f"key {key.serial} is not an X.509 certificate")
        leaf_serial, leaf = key.serial, key.payload
        trusted = trusted_keys(store, caller, trust_keyring)
        chain = trusted_keys(store, caller, chain_keyring) if chain_keyring else []
        if is_blacklisted(store, leaf):
            raise E.EKEYREJECTED("certificate is blacklisted")
        banned = {serial for serial, parsed in trusted + chain if is_blacklisted(store, parsed)}
        when = at or store.clock()
    serial_of = {}
    for serial, parsed in chain + trusted:  # a trust keyring's serial wins for a certificate in both
        if parsed.certificate is not None and serial not in banned:
            serial_of[parsed.certificate] = serial
    serial_of[leaf.certificate] = leaf_serial  # the leaf is the key asked about, wherever else it is
    anchors = [p.certificate for s, p in trusted if p.certificate is not None and s not in banned]
    intermediates = [p.certificate for s, p in chain if p.certificate is not None and s not in banned]
    try:
        path = X.validate(leaf.certificate, anchors, intermediates, when, host, purpose)
    except E.EKEYREJECTED as exc:
        if banned:
            left_out = ", ".join(sorted({X.subject_of(p.certificate) for s, p in trusted + chain
                                         if s in banned and p.certificate is not None}))
            raise E.EKEYREJECTED(f"{exc.message}; blacklisted certificates were not used: {left_out}") from None
        raise
    return [(serial_of.get(c, 0), X.subject_of(c)) for c in path]
