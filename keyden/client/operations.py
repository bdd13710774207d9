"""Every keyctl operation as a method, named after it, in keyctl's argument order.

Written once for both clients: a method builds (op, fields) and hands them
to ``self._call``, which the blocking client answers with a value and the
asyncio client with an awaitable.  Key arguments may be serials, handles,
'@s'-style names or '%type:description'; ``Ref`` marks them so the
transport can resolve '%...' forms with a FIND first.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from keyden import errors as E
from keyden.protocol import DECRYPT, IMPORT_CONTENTS, KEY_USES, MOVE_EXCL, NO_EXPORT, RANDOM_NONCE, Op


class Ref:
    """A key argument still to be resolved to a serial."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _bytes(data) -> bytes:
    """A payload or message as bytes: bytes-like objects as they are, text as UTF-8.  Anything else is EINVAL
    (``bytes(32)`` would be 32 zero bytes, not the caller's data)."""
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        try:
            return data.encode()
        except UnicodeEncodeError:  # a lone surrogate: Python's error would carry the whole text
            raise E.EINVAL("text data must be valid Unicode: it holds a lone surrogate, which UTF-8 cannot "
                           "encode (pass bytes for binary data)") from None
    return binary(data)


class WrongType(E.EINVAL, TypeError):
    """EINVAL for an argument of the wrong kind; Python's TypeError too, as a library call raises for one."""


class NotBytes(WrongType):
    """EINVAL for text or a number where bytes belong; pyca's TypeError too, so code written for pyca's
    classes sees what it would there (not a ValueError, which a JWE library takes for a failed decryption)."""


def binary(data, what: str = "data") -> bytes:
    """Strictly bytes-like (as pyca takes): bytes, bytearray, memoryview, array... but not text or numbers."""
    if type(data) is bytes:
        return data
    try:
        return memoryview(data).tobytes()
    except TypeError:
        raise NotBytes(f"{what} must be bytes-like (bytes, bytearray, memoryview), not {type(data).__name__}") \
            from None


def _binary_list(values, what: str = "items") -> list:
    """A batch's items as bytes or bytearrays (their length is their size): other buffers are copied,
    anything else (text, numbers) refused, as ``binary`` does."""
    if type(values) is not list:
        try:
            values = list(values)
        except (TypeError, NotImplementedError):  # (a memoryview of more than one dimension says the latter)
            raise NotBytes(f"{what} must be a sequence of bytes-like objects, not {type(values).__name__}") \
                from None
    if not set(map(type, values)) <= _BYTES_TYPES:  # the usual case, checked at C speed
        return [binary(v, what) for v in values]
    return values


_BYTES_TYPES = {bytes, bytearray}


def _aad_list(values) -> list:
    """A batch's associated data: None, or an item None, is none (b""), as pyca's ``encrypt(nonce, data, None)``."""
    values = values if type(values) is list else list(values or ())
    return _binary_list([b"" if v is None else v for v in values] if any(v is None for v in values) else values,
                        "associated data")


def cipher_flags(decrypt: bool, random_nonce: bool) -> int:
    """The flags field of CIPHER, BATCH, STREAM_INIT and SHM_CIPHER."""
    return (DECRYPT if decrypt else 0) | (RANDOM_NONCE if random_nonce else 0)


class InvalidArgument(E.EINVAL, ValueError):
    """EINVAL for an argument pyca would refuse with ValueError (a nonce, a salt length, a ciphertext of the
    wrong size): code written for pyca's classes catches it unchanged."""


def as_value_error(exc: E.EINVAL) -> E.EINVAL:
    """The daemon's EINVAL as an ``InvalidArgument``, for the helpers shaped like pyca's classes."""
    return exc if isinstance(exc, (ValueError, TypeError)) else InvalidArgument(exc.message)


def key_flags(no_export: bool, use) -> int:
    """The wire key flags for ``no_export`` and an asymmetric key's ``use``: None (bound to none, so every
    use), a name ("sign", "decrypt", "derive"), names joined by commas ("sign,derive"), or an iterable of
    names.  EINVAL for an unknown name or none at all."""
    flags = NO_EXPORT if no_export else 0
    if use is None:
        return flags
    if isinstance(use, str):
        names = use.split(",")
    else:
        iterable = hasattr(use, "__iter__") and not isinstance(use, (bytes, bytearray, memoryview))
        names = list(use) if iterable else [use]
        odd = [name for name in names if not isinstance(name, str)]
        if odd:
            raise WrongType(f"use takes a name, names joined by commas, or an iterable of names, not "
                            f"{type(odd[0]).__name__}")
    names = [name.strip() for name in names]
    if not any(names):
        raise E.EINVAL(f"name at least one use ({', '.join(KEY_USES)}), or none at all for every use")
    for name in names:
        if name not in KEY_USES:
            raise E.EINVAL(f"unknown use {name!r}: an asymmetric key's uses are {', '.join(KEY_USES)}")
        flags |= KEY_USES[name]
    return flags


class Operations(ABC):
    """Every keyctl operation, as arguments checked and shaped for the wire: a client adds the transport
    (``_call``, which sends one request and returns its result, or a future of it)."""

    @abstractmethod
    def _call(self, op: Op, *args: Any):
        """Send ``op`` with ``args`` (Ref values resolved to serials first) and return its shaped result."""

    # keys and keyrings
    def add(self, type: str, description: str, payload, keyring="@s", *, password: bytes | str | None = None,
            no_export: bool = False, use=None):
        """add_key: returns the new (or updated) key's serial.  ``no_export``: never exportable, for good.
        ``use``: an asymmetric key does only that, for good ("sign", "decrypt", "derive", or several:
        "sign,derive" or ("sign", "derive"); see ``key_flags``).  ``payload`` None is no payload (add_key's
        NULL): what a keyring takes, and the types that need one refuse."""
        secret = _bytes(password) if password else b""
        payload = b"" if payload is None else payload
        flags = key_flags(no_export, use)
        if flags:
            return self._call(Op.ADD_FLAGS, type, description, _bytes(payload), Ref(keyring), secret, flags)
        return self._call(Op.ADD, type, description, _bytes(payload), Ref(keyring), secret)

    def newring(self, name: str, keyring="@s"):
        return self._call(Op.ADD, "keyring", name, b"", Ref(keyring), b"")

    def request(self, type: str, description: str, dest=0):
        return self._call(Op.REQUEST, type, description, Ref(dest) if dest else 0)

    def update(self, key, payload):
        return self._call(Op.UPDATE, Ref(key), _bytes(payload))

    def revoke(self, key):
        return self._call(Op.REVOKE, Ref(key))

    def invalidate(self, key):
        return self._call(Op.INVALIDATE, Ref(key))

    def clear(self, keyring):
        return self._call(Op.CLEAR, Ref(keyring))

    def link(self, key, keyring):
        return self._call(Op.LINK, Ref(key), Ref(keyring))

    def unlink(self, key, keyring):
        return self._call(Op.UNLINK, Ref(key), Ref(keyring))

    def move(self, key, from_keyring, to_keyring, force: bool = False):
        return self._call(Op.MOVE, Ref(key), Ref(from_keyring), Ref(to_keyring), 0 if force else MOVE_EXCL)

    def search(self, keyring, type: str, description: str, dest=0):
        return self._call(Op.SEARCH, Ref(keyring), type, description, Ref(dest) if dest else 0)

    def read(self, key):
        """The payload's bytes; for a keyring, the list of linked serials."""
        return self._call(Op.READ, Ref(key))

    def describe(self, key):
        return self._call(Op.DESCRIBE, Ref(key))

    def chown(self, key, uid: int, gid: int = -1):
        return self._call(Op.CHOWN, Ref(key), uid, gid)

    def chgrp(self, key, gid: int):
        return self._call(Op.CHOWN, Ref(key), -1, gid)

    def setperm(self, key, perm: int):
        return self._call(Op.SETPERM, Ref(key), perm)

    def timeout(self, key, seconds: int):
        """Expire the key ``seconds`` from now (0 clears the expiry)."""
        return self._call(Op.SET_TIMEOUT, Ref(key), seconds)

    def get_keyring_id(self, key, create: bool = False):
        return self._call(Op.GET_KEYRING_ID, Ref(key), 1 if create else 0)

    id = get_keyring_id

    def join_session(self, name: str | None = None):
        """A new (or the named) session keyring: returns (serial, token); the token goes in KEYDEN_SESSION.
        An empty name is EINVAL, as the kernel's (on the wire "" asks for an anonymous session: None)."""
        if name is not None and not name:
            raise E.EINVAL("a session keyring's name must not be empty (None joins an anonymous session)")
        return self._call(Op.JOIN_SESSION, name or "")

    def leave_session(self, token: str):
        return self._call(Op.LEAVE_SESSION, token)

    def sessions(self):
        """[(serial, name)] of the session keyrings your uid holds tokens for, lost ones included."""
        return self._call(Op.SESSIONS)

    def end_session(self, keyring: int):
        """Drop every token of your uid for this session keyring (a session whose token is lost)."""
        return self._call(Op.END_SESSION, Ref(keyring))

    def keys_page(self, after: int = 0):
        """One page of the /proc/keys view: ([KeyStatus], next), keys you may view with a serial above
        ``after``, in serial order, and the serial the next page starts after (0: none follows; a page may
        be empty and still have one).  ``keys()`` reads every page."""
        return self._call(Op.KEYS, after)

    def restrict_keyring(self, keyring, type: str = "", restriction: str = ""):
        return self._call(Op.RESTRICT_KEYRING, Ref(keyring), type, restriction)

    def find(self, type: str, description: str):
        return self._call(Op.FIND, type, description)

    def supports(self):
        return self._call(Op.CAPABILITIES)

    # public-key operations by serial
    def pkey_query(self, key, info: str = ""):
        return self._call(Op.PKEY_QUERY, Ref(key), info)

    def pkey_encrypt(self, key, info: str, data):
        return self._call(Op.PKEY_ENCRYPT, Ref(key), info, _bytes(data))

    def pkey_decrypt(self, key, info: str, data):
        return self._call(Op.PKEY_DECRYPT, Ref(key), info, _bytes(data))

    def pkey_sign(self, key, info: str, data):
        return self._call(Op.PKEY_SIGN, Ref(key), info, _bytes(data))

    def pkey_verify(self, key, info: str, data, signature):
        """Returns None if the signature is good; raises EKEYREJECTED (or EINVAL) if not."""
        return self._call(Op.PKEY_VERIFY, Ref(key), info, _bytes(data), _bytes(signature))

    def generate(self, spec: str, description: str = "", keyring="@s", *, no_export: bool = False, use=None):
        """Make a key pair inside keyden ('rsa:2048', 'ec:p256', 'ed25519', ...); returns its serial.
        ``use``: a key pair does only that, for good, as for ``add``."""
        flags = key_flags(no_export, use)
        if flags:
            return self._call(Op.GENKEY_FLAGS, spec, description, Ref(keyring), flags)
        return self._call(Op.GENKEY, spec, description, Ref(keyring))

    genkey = generate

    def public_key_bytes(self, key):
        """(SubjectPublicKeyInfo DER, certificate DER or b'') of an asymmetric key: public data only."""
        return self._call(Op.PUBLIC_KEY, Ref(key))

    # session keys: agreement and key transport whose results stay inside
    def derive(self, private, peer=b"", *, peer_key=0, kdf: str = "hkdf-sha256", salt=b"", info=b"",
               length: int = 32, description: str = "", keyring="@s", perm: int = 0, timeout: int = 0):
        """ECDH/X25519 with ``private`` and the peer (public key bytes, or ``peer_key=serial``), then a KDF.

        The result becomes a new logon key; only its serial comes back.
        """
        return self._call(Op.DERIVE, Ref(private), _bytes(peer), Ref(peer_key) if peer_key else 0, kdf,
                          _bytes(salt), _bytes(info), length, description, Ref(keyring), perm, timeout)

    def kdf(self, key, *, kdf: str = "hkdf-sha256", salt=b"", info=b"", length: int = 32, description: str = "",
            keyring="@s", perm: int = 0, timeout: int = 0):
        """A new logon key derived from a user/logon key; returns its serial."""
        return self._call(Op.KDF, Ref(key), kdf, _bytes(salt), _bytes(info), length, description, Ref(keyring),
                          perm, timeout)

    def dh_compute(self, private, prime, base):
        """KEYCTL_DH_COMPUTE: like the kernel, returns the result (``derive`` keeps it inside)."""
        return self._call(Op.DH_COMPUTE, Ref(private), Ref(prime), Ref(base))

    def dh_compute_kdf(self, private, prime, base, hash_name: str, length: int, otherinfo=b""):
        return self._call(Op.DH_COMPUTE_KDF, Ref(private), Ref(prime), Ref(base), hash_name, length,
                          _bytes(otherinfo))

    def pkey_decrypt_into(self, key, info: str, data, description: str = "", keyring="@s", perm: int = 0):
        """Unwrap a transported session key straight into a new logon key; returns its serial."""
        return self._call(Op.PKEY_DECRYPT_INTO, Ref(key), info, _bytes(data), description, Ref(keyring), perm)

    # data shoveling by serial (the kernel crypto API's algorithm names)
    # Data, IVs, associated data and tags are bytes-like only, as pyca takes them: text is EINVAL (its encoding
    # would be a guess), and so is a number (bytes(32) would be 32 zero bytes).
    def cipher(self, alg: str, key, data, *, iv=b"", aad=b"", decrypt: bool = False, random_nonce: bool = False):
        flags = cipher_flags(decrypt, random_nonce)
        return self._call(Op.CIPHER, alg, Ref(key) if key else 0, flags, binary(iv, "iv"),
                          binary(aad, "associated data"), binary(data))

    def digest(self, alg: str, data):
        return self._call(Op.DIGEST, alg, binary(data))

    def mac(self, alg: str, key, data):
        return self._call(Op.MAC, alg, Ref(key), binary(data))

    def mac_verify(self, alg: str, key, data, mac):
        """None if the MAC matches; EBADMSG if not."""
        return self._call(Op.MAC_VERIFY, alg, Ref(key), binary(data), binary(mac, "mac"))

    def key_algorithm(self, key) -> str:
        """The algorithm genkey made a symmetric key for ("gcm(aes)", "rfc7539(chacha20,poly1305)"...;
        "hmac" for any HMAC: a binding, not an algorithm name), or "" for a key bound to none (added as
        bytes, derived, unwrapped by pkey_decrypt_into)."""
        return self._call(Op.KEY_ALGORITHM, Ref(key))

    def batch(self, alg: str, key, items, *, ivs=(), aads=(), decrypt: bool = False, random_nonce: bool = False):
        """Many small items in one request: returns (statuses, outputs); status 0 or an errno per item."""
        flags = cipher_flags(decrypt, random_nonce)
        return self._call(Op.BATCH, alg, Ref(key) if key else 0, flags, _binary_list(ivs, "ivs"), _aad_list(aads),
                          _binary_list(items))

    def stream_init(self, alg: str, key=0, *, iv=b"", aad=b"", decrypt: bool = False, random_nonce: bool = False):
        """Open a stream; returns (handle, nonce keyden chose or b'')."""
        flags = cipher_flags(decrypt, random_nonce)
        return self._call(Op.STREAM_INIT, alg, Ref(key) if key else 0, flags, binary(iv, "iv"),
                          binary(aad, "associated data"))

    def stream_update(self, handle: int, data):
        return self._call(Op.STREAM_UPDATE, handle, binary(data))

    def stream_final(self, handle: int, data=b"", tag=b""):
        """Returns (last output, tag): the AEAD tag when encrypting, or the digest/MAC."""
        return self._call(Op.STREAM_FINAL, handle, binary(data), binary(tag, "tag"))

    def stream_abort(self, handle: int):
        return self._call(Op.STREAM_ABORT, handle)

    def stream_copy(self, handle: int):
        """A new stream that goes on from where a hash or HMAC stream is (pyca's ``Hash.copy``); its handle.
        EOPNOTSUPP for an AEAD or block cipher stream."""
        return self._call(Op.STREAM_COPY, handle)

    # persistent keyrings, export and import (docs/persistence.md)
    def get_persistent(self, keyring="@s", uid: int = -1):
        """KEYCTL_GET_PERSISTENT: link the uid's persistent keyring (-1: the caller's) into ``keyring``; its serial."""
        return self._call(Op.GET_PERSISTENT, uid, Ref(keyring))

    def export(self, key, *, to_public_key=None, wrapping_key=None) -> bytes:
        """A wrapped copy of a key or keyring tree: to a public key (PEM/DER bytes, or a key in keyden),
        or under a wrapping key in keyden.  Never the key in the clear."""
        if (to_public_key is None) == (wrapping_key is None):
            raise E.EINVAL("give exactly one of to_public_key and wrapping_key")
        if isinstance(to_public_key, (bytes, bytearray)):
            if not to_public_key:  # (on the wire, no recipient at all)
                raise E.EINVAL("to_public_key is empty: give a public key's PEM or DER, or a key")
            return self._call(Op.EXPORT, Ref(key), bytes(to_public_key), 0, 0)
        if to_public_key is not None:
            return self._call(Op.EXPORT, Ref(key), b"", Ref(to_public_key), 0)
        return self._call(Op.EXPORT, Ref(key), b"", 0, Ref(wrapping_key))

    def import_key(self, blob, unwrap_with, keyring="@s", *, no_export: bool = False, contents: bool = False):
        """Make an exported key (or tree) again, as the caller's; returns the top key's serial.

        ``contents``: the export is of a keyring, and its members go into ``keyring`` rather than a copy
        of it (a machine move into the new persistent keyring); returns ``keyring``'s serial.  A namesake
        already there fails the whole import (EEXIST): nothing is displaced."""
        flags = (NO_EXPORT if no_export else 0) | (IMPORT_CONTENTS if contents else 0)
        return self._call(Op.IMPORT, _bytes(blob), Ref(unwrap_with), Ref(keyring), flags)

    def rekey(self, passphrase=b""):
        """Rotate the daemon's master key (root only); a passphrase store needs the new passphrase."""
        return self._call(Op.REKEY, _bytes(passphrase))

    # trust (docs/trust.md)
    def x509_verify(self, cert, trust_keyring, chain_keyring=0, *, host: str = "", purpose: str = "", at: int = 0):
        """Validate a certificate key up to a trust keyring: [(serial, subject)], leaf first.

        Refusals are EKEYREJECTED with the reason; ``at`` is a Unix time (0: now).
        """
        return self._call(Op.X509_VERIFY, Ref(cert), Ref(trust_keyring), Ref(chain_keyring) if chain_keyring else 0,
                          host, purpose, int(at) if isinstance(at, float) and math.isfinite(at) else at)

    # daemon
    def ping(self, data: bytes = b""):
        return self._call(Op.PING, _bytes(data))

    def whoami(self):
        """(uid, gid, pid, session keyring serial) as the daemon sees this connection."""
        return self._call(Op.WHOAMI)

    def quota(self):
        """(keys, bytes, maxkeys, maxbytes) charged to this uid."""
        return self._call(Op.QUOTA)
