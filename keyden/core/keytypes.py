"""Key types: what a payload may be, who may read it, how a description matches.

A key type turns the bytes a client sent into the payload the daemon keeps
(``preparse``), says what it costs against quota, and whether the payload can
ever leave (``read``).  The registry maps the kernel's type names to them.
"""

from __future__ import annotations

import re
from typing import Any

from keyden import errors as E
from keyden.core import perm as P

MAX_TYPE_LEN = 31  # add_key copies the type into char[32]
MAX_DESC_LEN = 4095  # KEY_MAX_DESC_SIZE (4096) including the NUL
MAX_USER_PAYLOAD = 32767
MAX_ADD_PAYLOAD = 1024 * 1024 - 1  # add_key(2) refuses more before looking at anything else
#: What an asymmetric key costs against the byte quota: the kernel's x509 and PKCS#8 parsers set
#: ``prep->quotalen = 100`` whatever the key's size, so a user may hold many certificates.  A payload past
#: ASYMMETRIC_FREE_BYTES (more than any real key or certificate) also pays for its excess: one daemon
#: holds every uid's keys, and a megabyte "certificate" must not cost a hundred bytes.
ASYMMETRIC_QUOTA, ASYMMETRIC_FREE_BYTES = 100, 16 * 1024
MAX_UPDATE_PAYLOAD = 4096  # keyctl_update refuses more than PAGE_SIZE


def asymmetric_quota(payload_size: int = 0) -> int:
    """Bytes charged for an asymmetric key parsed from ``payload_size`` bytes (0: generated inside)."""
    return ASYMMETRIC_QUOTA + max(0, payload_size - ASYMMETRIC_FREE_BYTES)


class KeyType:
    name: str = ""
    default_perm: int = P.DEFAULT_USER
    updatable: bool = False
    readable: bool = False
    is_keyring: bool = False
    #: Whether an empty description is acceptable (it is then derived from the payload).
    derives_description: bool = False
    #: Whether revoking frees the payload and its quota at once (user_revoke), or it waits for destruction.
    revoke_discards_payload: bool = False
    #: Whether its keys are born with KEY_FLAG_KEEP (no revoke, invalidate, clear, timeout; see store).
    keep: bool = False

    def check_description(self, description: str) -> None:
        if not description and not self.derives_description:
            raise E.EINVAL("a description is required")

    def preparse(self, payload: bytes, secret: bytes | None = None) -> tuple[Any, int]:
        """Validate ``payload``; return (kept payload, bytes charged to quota)."""
        raise E.EOPNOTSUPP(f"keys of type {self.name!r} cannot be instantiated with data")

    def restore(self, payload: bytes) -> tuple[Any, int]:
        """``preparse`` for a payload keyden stored itself: what an earlier version took, this one takes back."""
        return self.preparse(payload)

    def read(self, payload: Any) -> bytes:
        raise E.EOPNOTSUPP(f"keys of type {self.name!r} cannot be read")

    def default_description(self, payload: Any) -> str:
        return ""

    def matches(self, key_description: str, payload: Any, wanted: str) -> bool:
        return key_description == wanted

    def search_iterates(self, wanted: str) -> bool:
        """match_preparse: True if ``wanted`` is not a plain description, so every key must be tried."""
        return False

    def summary(self, payload: Any, quota_len: int) -> str:
        """What /proc/keys shows after the description (the type's describe method): the payload's size."""
        return str(quota_len)

    def destroy(self, payload: Any) -> None:
        """Forget the payload; wipe it where Python lets us."""
        if isinstance(payload, bytearray):
            payload[:] = bytes(len(payload))

    keys_ciphers = False  # does symmetric_material give bytes (a generated key's use means something)?
    public_key_ops = False  # does it sign, decrypt or agree on keys (an asymmetric use binding means something)?

    def check_uses(self, payload: Any, uses: tuple[str, ...]) -> None:
        """EINVAL unless this payload can serve every use a new key is bound to (an asymmetric key's)."""

    def symmetric_material(self, payload: Any) -> bytes:
        """Raw bytes for in-daemon algorithms keyed by serial (AF_ALG's ALG_SET_KEY_BY_KEY_SERIAL)."""
        raise E.ENOPROTOOPT(f"keys of type {self.name!r} cannot key a cipher, MAC or KDF (user and logon keys can)")


_HEX_ID = re.compile(r"(?:[0-9a-fA-F]{2})+")


class UserType(KeyType):
    """Arbitrary bytes, readable and updatable by whoever the perms allow."""

    name = "user"
    updatable = True
    readable = True
    revoke_discards_payload = True

    def preparse(self, payload: bytes, secret: bytes | None = None) -> tuple[Any, int]:
        _no_password(self.name, secret)
        if not 0 < len(payload) <= MAX_USER_PAYLOAD:
            raise E.EINVAL(f"{self.name} payload must be 1..{MAX_USER_PAYLOAD} bytes")
        return bytearray(payload), len(payload)

    def read(self, payload: Any) -> bytes:
        return bytes(payload)

    keys_ciphers = True

    def symmetric_material(self, payload: Any) -> bytes:
        return bytes(payload)


class LogonType(UserType):
    """Like user, but the payload never leaves the daemon."""

    name = "logon"
    default_perm = P.DEFAULT_LOGON
    readable = False

    def check_description(self, description: str) -> None:
        subclass, colon, _ = description.partition(":")
        if not colon or not subclass:
            raise E.EINVAL("logon descriptions must be '<subclass>:<name>'")

    def read(self, payload: Any) -> bytes:
        raise E.EOPNOTSUPP("logon keys are never readable")


class KeyringType(KeyType):
    name = "keyring"
    default_perm = P.DEFAULT_KEYRING
    readable = True
    is_keyring = True

    def preparse(self, payload: bytes, secret: bytes | None = None) -> tuple[Any, int]:
        _no_password(self.name, secret)
        if payload:
            raise E.EINVAL("a keyring takes no data")
        return None, 0


def _no_password(type_name: str, secret: bytes | None) -> None:
    """A password unlocks an encrypted private key; given with anything else it was dropped unread."""
    if secret:
        raise E.EINVAL(f"a password is for an encrypted private key, not a {type_name} key")


class AsymmetricType(KeyType):
    """Public and private keys and X.509 certificates, parsed inside the daemon."""

    name = "asymmetric"
    default_perm = P.DEFAULT_ASYMMETRIC
    derives_description = True
    public_key_ops = True

    def preparse(self, payload: bytes, secret: bytes | None = None) -> tuple[Any, int]:
        from keyden.crypto import asymmetric

        return asymmetric.parse(bytes(payload), password=secret or None), asymmetric_quota(len(payload))

    def restore(self, payload: bytes) -> tuple[Any, int]:
        from keyden.crypto import asymmetric

        return asymmetric.parse(bytes(payload), stored=True), asymmetric_quota(len(payload))

    def default_description(self, payload: Any) -> str:
        return payload.default_description

    def matches(self, key_description: str, payload: Any, wanted: str) -> bool:
        kind, colon, rest = wanted.partition(":")
        if colon and kind in ("id", "ex"):
            rest = rest.lower()
            for key_id in payload.key_ids:
                hexid = key_id.hex()
                if (kind == "ex" and hexid == rest) or (kind == "id" and hexid.endswith(rest)):
                    return True
            return False
        return key_description == wanted

    def search_iterates(self, wanted: str) -> bool:
        """asymmetric_key_match_preparse: 'id:<hex tail>' and 'ex:<hex>' are matched against key IDs."""
        if not wanted:
            raise E.EINVAL("an asymmetric key search needs a description or key ID")
        kind, colon, rest = wanted.partition(":")
        if not (colon and kind in ("id", "ex")):
            return False
        # asymmetric_key_hex_to_key_id (hex2bin): hex digits only, no spaces (bytes.fromhex would skip them)
        if len(rest) > 510 or not _HEX_ID.fullmatch(rest):
            raise E.EINVAL("a key ID is an even number of hex digits, at least two")
        return True

    def check_uses(self, payload: Any, uses: tuple[str, ...]) -> None:
        from keyden.crypto import asymmetric

        asymmetric.check_uses(payload.algo, uses)

    def summary(self, payload: Any, quota_len: int) -> str:
        """asymmetric_key_describe: the key's kind and algorithm, and the tail of its key id."""
        return payload.summary if payload is not None else ""

    def destroy(self, payload: Any) -> None:
        release = getattr(payload, "release", None)  # a ParsedKey: what was built from it lets go too
        if release is not None:
            release()


REGISTRY: dict[str, KeyType] = {t.name: t for t in (UserType(), LogonType(), KeyringType(), AsymmetricType())}

KEYRING = REGISTRY["keyring"]


def check_type_name(type_name: str) -> None:
    """key_get_type_from_user: 1..31 bytes, and names starting with '.' are the kernel's own."""
    if not type_name or len(type_name.encode()) > MAX_TYPE_LEN or "\0" in type_name:
        raise E.EINVAL("type names are 1..31 bytes (UTF-8), with no NUL")
    if type_name.startswith("."):
        raise E.EPERM("types beginning with '.' are internal")


def check_description_size(description: str) -> None:
    """strndup_user(description, KEY_MAX_DESC_SIZE): at most 4095 bytes, and a C string has no NUL."""
    if len(description.encode()) > MAX_DESC_LEN or "\0" in description:
        raise E.EINVAL(f"descriptions are at most {MAX_DESC_LEN} bytes without NUL")


def lookup(type_name: str, missing: type[E.KeydenError] = E.ENODEV) -> KeyType:
    """Validate a type name the way the kernel does and return the type.

    An unknown type is ENODEV from add_key(2) but ENOKEY from request_key(2),
    KEYCTL_SEARCH and KEYCTL_RESTRICT_KEYRING (key_type_lookup's own error).
    """
    check_type_name(type_name)
    try:
        return REGISTRY[type_name]
    except KeyError:
        raise missing(f"unknown key type {type_name!r}") from None


def register(key_type: KeyType) -> None:
    REGISTRY[key_type.name] = key_type
