"""One stored key: its row (metadata in the clear, payload sealed) and the way back to a ``Key``.

The metadata columns are what keyden needs to know about a key without
opening it; all of them, with the serial and a format tag, are the AEAD's
associated data, so a row whose columns were edited, or whose sealed blob
was swapped with another row's, fails authentication and is refused.  The
sealed plaintext is the payload's storage form: a user or logon key's bytes,
an asymmetric key's DER (``ParsedKey.storage_der``), a keyring's member
serials in link order.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core.flags import KEY_FLAGS
from keyden.core.key import USER_KEYRING, USER_SESSION_KEYRING, DenyAll, Key
from keyden.persist.master import LegacySealer, Sealer

FORMAT = b"keyden-record-v1\0"
#: Row flags beside the key's own (Key.flags, flags.KEY_FLAGS, which leaves these bits free).
ROOT = 0x100  # a uid's persistent keyring
RESTRICTED = 0x200  # a keyring refusing all links (KEYCTL_RESTRICT_KEYRING with no type)
CHARGED = 0x400  # counts against its owner's quota
KEEP = 0x10000  # KEY_FLAG_KEEP: a system key (a CA of .builtin_trusted_keys) someone filed in a persistent keyring
# A persistent keyring linked into its uid's user keyring, and user session keyring (Key.in_user_keyrings).
IN_USER_KEYRING, IN_USER_SESSION_KEYRING = 0x20000, 0x40000
_IN_USER = ((USER_KEYRING, IN_USER_KEYRING), (USER_SESSION_KEYRING, IN_USER_SESSION_KEYRING))
assert not KEY_FLAGS & (ROOT | RESTRICTED | CHARGED | KEEP | IN_USER_KEYRING | IN_USER_SESSION_KEYRING), \
    "a key flag would be read back as a row's, and the reverse"
COLUMNS = ("serial", "type", "description", "uid", "gid", "perm", "expiry", "flags", "version", "revoked_at",
           "ctime", "quota_len", "sealed")
_FIXED = struct.Struct("<iqqIdIQddQ")
_LEN = struct.Struct("<I")


class NotUtf8:
    """A TEXT value that is not UTF-8 (written outside keyden), as the database reads it: no str, so no row
    holding one opens or re-seals, and no message or traceback carries its bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<text that is not UTF-8>"


NOT_UTF8 = NotUtf8()


def read_text(raw: bytes) -> str | NotUtf8:
    """SQLite's text_factory: sqlite3's own raised OperationalError, quoting the text, for a whole query
    (one edited description stopped every stored key from loading)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return NOT_UTF8


class Unusable(Exception):
    """A row that cannot become a key (failed authentication, unknown type, bad payload): skip it."""


class NotStorable(Exception):
    """A key the store cannot keep (a type or restriction without a storage form)."""


@dataclass(frozen=True)
class Row:
    serial: int
    type: str
    description: str
    uid: int
    gid: int
    perm: int
    expiry: float
    flags: int
    version: int
    revoked_at: float | None
    ctime: float
    quota_len: int
    sealed: bytes

    def __repr__(self) -> str:
        return f"<Row {self.serial} {self.type} v{self.version}>"

    def associated_data(self) -> bytes:
        """Every column but the sealed blob, canonically encoded; struct refuses wrong types and ranges."""
        if self.revoked_at is not None and not self.revoked_at >= 0:  # -1.0 stands for "never": a row edited
            raise OverflowError("revoked_at out of range")                # to it must not pass as unrevoked
        revoked = -1.0 if self.revoked_at is None else self.revoked_at
        kind, desc = self.type.encode(), self.description.encode()
        return b"".join((FORMAT, _FIXED.pack(self.serial, self.uid, self.gid, self.perm, self.expiry, self.flags,
                                             self.version, revoked, self.ctime, self.quota_len),
                         _LEN.pack(len(kind)), kind, _LEN.pack(len(desc)), desc))


def snapshot(key: Key, version: int, root: bool) -> tuple[Row, bytearray]:
    """The row for ``key`` now, not sealed yet, and its plaintext (call with the store lock held: this reads
    the live key).  Sealing (``seal``) needs no lock: a batch of rows is sealed while requests go on."""
    flags = key.flags & KEY_FLAGS
    flags |= (ROOT if root else 0) | (CHARGED if key.charged else 0) | (KEEP if key.keep else 0)
    flags |= sum(row_bit for bit, row_bit in _IN_USER if key.in_user_keyrings & bit)
    if key.restriction is not None:
        if not isinstance(key.restriction, DenyAll):
            raise NotStorable(f"keyring {key.serial}'s restriction cannot be stored")
        flags |= RESTRICTED
    row = Row(key.serial, key.type.name, key.description, key.uid, key.gid, key.perm, key.expiry, flags, version,
              key.revoked_at, key.ctime, key.quota_len, b"")
    return row, _storage_form(key)


def seal(row: Row, plaintext: bytearray, sealer: Sealer) -> Row:
    """``row`` with ``plaintext`` sealed into it (the caller wipes the plaintext)."""
    return dataclasses.replace(row, sealed=sealer.seal(plaintext, row.associated_data()))


def _storage_form(key: Key) -> bytearray:
    """A copy of what ``key`` holds, which the caller wipes."""
    if key.links is not None:
        members = [k.serial for k in key.links.values()] + list(key.held_back)
        return bytearray(struct.pack(f"<{len(members)}i", *members))
    payload = key.payload
    if payload is None:
        return bytearray()  # revoked, payload already discarded
    if isinstance(payload, (bytes, bytearray)):
        return bytearray(payload)
    storage_der = getattr(payload, "storage_der", None)
    if storage_der is None:
        raise NotStorable(f"keys of type {key.type.name!r} cannot be stored")
    return bytearray(storage_der())


def open_sealed(row: Row, sealer: Sealer | LegacySealer) -> tuple[bytes, bytes]:
    """(associated data, plaintext) of a row whose columns and seal check out; Unusable if they do not."""
    if any(getattr(row, column) is NOT_UTF8 for column in COLUMNS):
        raise Unusable("a text column is not valid UTF-8 (written outside keyden)")
    try:
        aad = row.associated_data()
    except (struct.error, TypeError, AttributeError, UnicodeError, OverflowError):
        raise Unusable("metadata columns of the wrong type or out of range") from None
    try:
        return aad, sealer.open(row.sealed, aad)
    except (InvalidTag, TypeError):
        raise Unusable("authentication failed: tampered with, or sealed under another key") from None


def open_row(row: Row, sealer: Sealer | LegacySealer) -> tuple[Key, list[int]]:
    """The key a row holds and, for a keyring, its members' serials; Unusable if it must be skipped."""
    _aad, plaintext = open_sealed(row, sealer)
    ktype = T.REGISTRY.get(row.type)
    if ktype is None:
        raise Unusable(f"unknown key type {row.type!r}")
    members: list[int] = []
    quota_len = 0 if ktype.is_keyring else row.quota_len
    try:
        if ktype.is_keyring:
            if len(plaintext) % 4:
                raise Unusable("keyring member list is malformed")
            members = list(struct.unpack(f"<{len(plaintext) // 4}i", plaintext))
            payload = None
        elif not plaintext and row.revoked_at is not None:
            payload = None
        else:
            payload, charge = ktype.restore(plaintext)
            if ktype.name == "asymmetric":  # charged as this version charges (the kernel's flat 100)
                quota_len = charge
    except E.KeydenError as exc:
        raise Unusable(f"payload does not parse ({type(exc).__name__})") from None
    key = Key(row.serial, ktype, row.description, row.uid, row.gid, row.perm, payload,
              quota_len, charged=bool(row.flags & CHARGED), ctime=row.ctime)
    key.expiry = row.expiry
    key.revoked_at = row.revoked_at
    key.flags = row.flags & KEY_FLAGS
    # A system key: no one may revoke, invalidate or time out one.  A row stored before rows carried KEEP
    # tells one by what only system keys are: root's, in no quota, and no keyring (a persistent keyring
    # is in none, but a keyring; every other key a uid makes is charged to it).
    key.keep = key.keep or bool(row.flags & KEEP) or (row.uid == 0 and not row.flags & CHARGED
                                                      and not ktype.is_keyring)
    if row.flags & RESTRICTED:
        key.restriction = DenyAll()
    key.in_user_keyrings = sum(bit for bit, row_bit in _IN_USER if row.flags & row_bit)
    return key, members
