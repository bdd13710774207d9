"""Wrapped exports: a key (or a keyring tree) sealed to a recipient, never in the clear.

Blob layout (all lengths little-endian)::

    "KDNX" | version u8 (2) | mode u8 | u16 length | mode field | nonce (12) | AES-256-GCM ciphertext+tag

The header (everything before the nonce) is the associated data, the
version included: a blob's version cannot be changed without failing to
open.  The content key depends on the mode:

- 1 X25519 and 2 ECDH (P-256/P-384): a fresh ephemeral key pair; the mode
  field is its public key (raw, or an uncompressed point); content key =
  HKDF-SHA256(shared secret, info = label | " agreement" NUL | ephemeral public | recipient SPKI).
- 3 RSA-OAEP: a random content key, OAEP(SHA-256, label) encrypted to the
  recipient; the mode field is that ciphertext.
- 4 wrapping key: a key held in keyden (logon, at least 16 bytes); the mode
  field is a random salt; content key = HKDF-SHA256(wrapping key, salt, info = label | " wrapping key").

The plaintext is the tree: protocol ``Schema`` encodings of each key (type,
description, perm, payload; an asymmetric key as DER from
``storage_der``; and flags, its binding: a symmetric key's flags.FOR_USE
bit, an asymmetric key's flags.ASYMMETRIC_USE bits) and the links between
them as (keyring index, member index) pairs, the exported key first.
Every failure to open (wrong key, any bit changed) is the same EBADMSG.

Version 1 (read, never written) is the same but for the entries, which have
no flags: its keys come back bound to no use.  The label stays ``keyden
export v1`` in both: it names how content keys are made, which did not
change, and keeps them apart from clients' KDFs; the version byte in the
authenticated header is what tells the entries' layout.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyden import errors as E
from keyden.core import keytypes
from keyden.core.flags import BINDING_FLAGS, FOR_USE, USE_FLAGS, flags_for
from keyden.core.key import Exported
from keyden.crypto import RESERVED_CONTEXT, agreement, asymmetric
from keyden.protocol import Kind as K
from keyden.protocol import Schema

MAGIC = b"KDNX"
VERSION = 2  # what is written; VERSION_1 blobs are still read
VERSION_1 = 1
X25519, ECDH, RSA_OAEP, WRAPPING_KEY = 1, 2, 3, 4
LABEL = RESERVED_CONTEXT + b" v1"  # bound into every wrapping; no client's KDF or OAEP may use it
NONCE = 12
CONTENT_KEY = 32  # bytes of the AES-256-GCM key an export is sealed under
MIN_WRAPPING_KEY = 16
MAX_ENTRIES = 100000  # keys in one export ...
MAX_LINKS = 4 * MAX_ENTRIES  # ... and links between them

ENTRY_V1 = Schema(("type", K.STR), ("description", K.STR), ("perm", K.U32), ("payload", K.BYTES))
#: Version 2's entry: flags are the key's binding (flags.BINDING_FLAGS: a symmetric key's one FOR_USE bit, an
#: asymmetric key's ASYMMETRIC_USE bits), nothing else.
ENTRY = Schema(("type", K.STR), ("description", K.STR), ("perm", K.U32), ("payload", K.BYTES), ("flags", K.U32))
_ENTRIES = {VERSION_1: ENTRY_V1, VERSION: ENTRY}
#: more entries or links: refused before any is made
TREE = Schema(("entries", K.BYTESLIST, MAX_ENTRIES), ("links", K.I32S, 2 * MAX_LINKS))
_HEADER = struct.Struct("<4sBBH")
_USES = frozenset(FOR_USE.values())


@dataclass
class Entry:
    """One key to make again on import."""

    type: str
    description: str
    perm: int
    payload: bytes
    flags: int = 0  # its binding (flags.BINDING_FLAGS), if it has one

    def __repr__(self) -> str:
        return f"<Entry {self.type}:{self.description!r}>"

    def __reduce__(self):
        raise TypeError("an import entry holds a key's payload: it cannot be pickled or copied")


# ------------------------------------------------------------------ the tree


def encode_tree(keys: list[Exported], links: list[tuple[int, int]]) -> bytes:
    if len(keys) > MAX_ENTRIES or len(links) > MAX_LINKS:  # no keyden would import it
        raise E.E2BIG(f"an export holds at most {MAX_ENTRIES} keys and {MAX_LINKS} links; this tree has "
                      f"{len(keys)} and {len(links)}: export its parts")
    entries = []
    for key in keys:
        if key.payload is None:
            payload = b""
        elif isinstance(key.payload, (bytes, bytearray)):
            payload = bytes(key.payload)
        else:
            payload = key.payload.storage_der()
        entries.append(ENTRY.encode((key.type, key.description, key.perm, payload, key.flags & BINDING_FLAGS)))
    return TREE.encode((entries, [i for pair in links for i in pair]))


def decode_tree(plaintext: bytes, version: int) -> tuple[list[Entry], list[tuple[int, int]]]:
    """The entries and links of a blob of ``version`` (``version_of``: opening the blob authenticated it),
    checked: every link between existing entries, from a keyring, and every entry but the first reachable
    from it; each binding one the store gives a key of its type (one flags.FOR_USE on a key that keys
    ciphers, any of flags.ASYMMETRIC_USE on an asymmetric key).  Anything else is EBADMSG: a flag bit not
    understood is never passed on to the store, where it could mean something else."""
    schema = _ENTRIES.get(version)
    if schema is None:
        raise E.EBADMSG("not a keyden export")
    try:
        raw_entries, flat = TREE.decode(plaintext)
        entries = [Entry(*schema.decode(raw)) for raw in raw_entries]
    except (E.EPROTO, E.E2BIG):
        raise E.EBADMSG("the export's contents are malformed") from None
    if not entries or len(entries) > MAX_ENTRIES or len(flat) % 2:
        raise E.EBADMSG("the export's contents are malformed")
    for entry in entries:
        if entry.flags & ~BINDING_FLAGS:
            raise E.EBADMSG("the export gives a key flags this keyden does not know")
        cipher_use = entry.flags & USE_FLAGS
        if cipher_use and cipher_use not in _USES:
            raise E.EBADMSG("the export gives a key more than one use")
        ktype = keytypes.REGISTRY.get(entry.type)
        misplaced = entry.flags & ~(flags_for(ktype) if ktype is not None else 0)
        if misplaced & USE_FLAGS:
            raise E.EBADMSG("the export gives a use to a key that keys no cipher")
        if misplaced:
            raise E.EBADMSG("the export binds a key that is not asymmetric to sign, decrypt or derive")
    links = list(zip(flat[0::2], flat[1::2]))
    reached = {0}
    for ring, member in links:
        if not (0 <= ring < len(entries) and 0 < member < len(entries)) or entries[ring].type != "keyring":
            raise E.EBADMSG("the export links keys that are not there")
        reached.add(member)
    if len(reached) != len(entries) or len(set(links)) != len(links):
        raise E.EBADMSG("the export's keys do not form one tree")
    if not _acyclic(len(entries), links):  # (store.link would say EDEADLK, half-way through the build)
        raise E.EBADMSG("the export's keyrings hold one another (a loop)")
    return entries, links


def _acyclic(count: int, links: list[tuple[int, int]]) -> bool:
    """Do the links (keyring, member) make no loop?  Kahn's order: every key is reached once all that hold
    it are, from the top (which nothing holds); a key on a loop never is."""
    holders, members = [0] * count, [[] for _ in range(count)]
    for ring, member in links:
        members[ring].append(member)
        holders[member] += 1
    ready, ordered = [0], 0
    while ready:
        ordered += 1
        for member in members[ready.pop()]:
            holders[member] -= 1
            if not holders[member]:
                ready.append(member)
    return ordered == count


# ------------------------------------------------------------------ wrapping


def recipient_use(parsed) -> str | None:
    """The use (flags.ASYMMETRIC_USE's name) a held key serves when an export is wrapped to it: RSA-OAEP
    encrypts to it (decrypt, as pkey_encrypt); an X25519 or EC recipient lends only its public half to an
    ephemeral key agreement (no use, as derive's peer)."""
    return "decrypt" if _transports(parsed) else None


def opening_use(parsed) -> str:
    """The use a held key serves when an export is opened with it: RSA-OAEP transports the content key to
    it (decrypt); X25519 and ECDH agree on it with its private half (derive)."""
    return "decrypt" if _transports(parsed) else "derive"


def _transports(parsed) -> bool:
    """RSA (key transport) or not (X25519, EC: key agreement); EINVAL first for a key that can do neither
    (Ed25519), whatever it is bound to."""
    return isinstance(_encryption_key(parsed.public_key), rsa.RSAPublicKey)


def recipient_key(data: bytes):
    """A recipient's public key from PEM or DER (SPKI, certificate, or a private key's public half)."""
    return recipient(asymmetric.parse(data).public_key)


def recipient(public):
    """``public``, if an export may go to it, checked before the tree is copied: an X25519 key that is no
    low-order point (which the wrap's own agreement would refuse only then), an EC or an RSA key."""
    if isinstance(_encryption_key(public), x25519.X25519PublicKey):
        agreement.ecdh(x25519.X25519PrivateKey.generate(), public)  # EINVAL for a low-order point
    return public


def _encryption_key(public):
    if isinstance(public, (x25519.X25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return public
    raise E.EINVAL("exports go to an X25519, EC P-256/P-384 or RSA public key")


def wrap_to_public_key(plaintext: bytes, public) -> bytes:
    public = _encryption_key(public)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if isinstance(public, rsa.RSAPublicKey):
        content_key = AESGCM.generate_key(8 * CONTENT_KEY)
        return _seal(RSA_OAEP, public.encrypt(content_key, _oaep()), content_key, plaintext)
    if isinstance(public, x25519.X25519PublicKey):
        ephemeral = x25519.X25519PrivateKey.generate()
        mode, field = X25519, ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                                  serialization.PublicFormat.Raw)
    else:
        ephemeral = ec.generate_private_key(public.curve)
        mode, field = ECDH, ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                                               serialization.PublicFormat.UncompressedPoint)
    return _seal(mode, field, _agreed_key(agreement.ecdh(ephemeral, public), field, spki), plaintext)


def wrap_with_key(plaintext: bytes, wrapping_key: bytes) -> bytes:
    _check_wrapping_key(wrapping_key)
    salt = os.urandom(32)
    return _seal(WRAPPING_KEY, salt, _hkdf(wrapping_key, salt, LABEL + b" wrapping key"), plaintext)


def mode_of(blob: bytes) -> int:
    return _parse(blob)[0]


def version_of(blob: bytes) -> int:
    """The blob's format version (VERSION or VERSION_1): authentic once the blob has opened."""
    _parse(blob)
    return blob[len(MAGIC)]


def unwrap_with_private_key(blob: bytes, private) -> bytes:
    mode, field, header, rest = _parse(blob)
    try:
        if mode == RSA_OAEP and isinstance(private, rsa.RSAPrivateKey):
            content_key = private.decrypt(field, _oaep())
            if len(content_key) != CONTENT_KEY:  # anyone may OAEP-encrypt to a public key: a forged field
                raise _unopenable()
        elif mode == X25519 and isinstance(private, x25519.X25519PrivateKey):
            shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(field))
            content_key = _agreed_key(shared, field, _spki(private))
        elif mode == ECDH and isinstance(private, ec.EllipticCurvePrivateKey):
            peer = ec.EllipticCurvePublicKey.from_encoded_point(private.curve, field)
            content_key = _agreed_key(private.exchange(ec.ECDH(), peer), field, _spki(private))
        else:
            raise E.EINVAL("this key cannot open this export (it was made for another kind of key)")
    except ValueError:
        raise _unopenable() from None
    return _open(content_key, header, rest)


def unwrap_with_key(blob: bytes, wrapping_key: bytes) -> bytes:
    mode, field, header, rest = _parse(blob)
    if mode != WRAPPING_KEY:
        raise E.EINVAL("this export was made for a public key, not a wrapping key")
    _check_wrapping_key(wrapping_key)
    return _open(_hkdf(wrapping_key, field, LABEL + b" wrapping key"), header, rest)


# ------------------------------------------------------------------ internals


def _check_wrapping_key(key: bytes) -> None:
    if len(key) < MIN_WRAPPING_KEY:
        raise E.EINVAL(f"a wrapping key must be at least {MIN_WRAPPING_KEY} bytes")


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=LABEL)


def _hkdf(secret: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


def _agreed_key(shared: bytes, ephemeral: bytes, recipient_spki: bytes) -> bytes:
    return _hkdf(shared, None, LABEL + b" agreement\0" + ephemeral + recipient_spki)


def _spki(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def _seal(mode: int, field: bytes, content_key: bytes, plaintext: bytes) -> bytes:
    header = _HEADER.pack(MAGIC, VERSION, mode, len(field)) + field
    nonce = os.urandom(NONCE)
    return header + nonce + AESGCM(content_key).encrypt(nonce, plaintext, header)


def _parse(blob: bytes) -> tuple[int, bytes, bytes, bytes]:
    """(mode, mode field, header, nonce + ciphertext), or EBADMSG if it is not an export blob."""
    if len(blob) < _HEADER.size:
        raise E.EBADMSG("not a keyden export")
    magic, version, mode, size = _HEADER.unpack_from(blob)
    end = _HEADER.size + size
    if magic != MAGIC or mode not in (X25519, ECDH, RSA_OAEP, WRAPPING_KEY) or len(blob) < end + NONCE + 16:
        raise E.EBADMSG("not a keyden export")
    if version not in _ENTRIES:
        raise E.EBADMSG(f"an export of format {version}: this keyden reads formats {VERSION_1} and {VERSION}")
    return mode, blob[_HEADER.size:end], blob[:end], blob[end:]


def _open(content_key: bytes, header: bytes, rest: bytes) -> bytes:
    try:
        return AESGCM(content_key).decrypt(rest[:NONCE], rest[NONCE:], header)
    except InvalidTag:
        raise _unopenable() from None


def _unopenable() -> E.KeydenError:
    return E.EBADMSG("the export does not open with this key (wrong key, or altered)")
