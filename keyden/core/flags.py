"""Key.flags: what a key is bound to and whether it may leave keyden.

Set when a key is made, for good, and never cleared.  The values are stored with persistent keys and in
exports: never reused.
"""

from __future__ import annotations

from keyden import errors as E
from keyden.core import keytypes as T

#: Key.flags a client may set when it creates a key; set for good, never cleared.
NO_EXPORT = 0x1
#: Key.flags genkey sets, for good: the one use a symmetric key was made for (an algorithm, or "hmac" for
#: all HMACs), the only thing it then keys, as Vault's typed keys or PKCS#11's CKA_ALLOWED_MECHANISMS.  One
#: AES mode's outputs at chosen inputs give out another's secrets: CTR's keystream at IV 0 is GCM's hash
#: key.  Keys added or derived carry none and key anything, as AF_ALG's keys by serial do; an imported key
#: carries what its export gave (version 2 exports carry it).  Values are stored with persistent keys and
#: in exports: never reused.
FOR_USE = {"gcm(aes)": 0x2, "gcm-siv(aes)": 0x4, "cbc(aes)": 0x8, "ctr(aes)": 0x10,
           "rfc7539(chacha20,poly1305)": 0x20, "hmac": 0x40}
USE_FLAGS = sum(FOR_USE.values())
#: Key.flags a client may set on an asymmetric key it adds or generates, for good: the uses it is bound to,
#: as PKCS#11's CKA_SIGN, CKA_DECRYPT and CKA_DERIVE (any non-empty set; none: every use, as before).  A key
#: pair serving two uses lends each to attacks on the other: an RSA key that decrypts for anyone with search
#: permission is an oracle against its own signatures (and the reverse).  sign: pkey_sign, pkey_verify, TLS
#: handshakes; decrypt: pkey_encrypt, pkey_decrypt (--into too), exports to and imports by an RSA key;
#: derive: key agreement (derive's private key), imports by an EC or X25519 key.  Stored with
#: persistent keys and in exports: never reused, and never 0x100-0x400 or 0x10000-0x40000, a stored key's
#: row's own bits (persist/records.py).
ASYMMETRIC_USE = {"sign": 0x800, "decrypt": 0x1000, "derive": 0x2000}
ASYMMETRIC_USE_FLAGS = sum(ASYMMETRIC_USE.values())
#: What a key is bound to, the one thing of its flags that goes with it into an export.
BINDING_FLAGS = USE_FLAGS | ASYMMETRIC_USE_FLAGS
KEY_FLAGS = NO_EXPORT | BINDING_FLAGS


def flags_for(ktype: T.KeyType) -> int:
    """The Key.flags a key of this type may carry: a cipher use only on a key that keys ciphers, an
    asymmetric use only on an asymmetric key (on any other it would bind nothing)."""
    return (NO_EXPORT | (USE_FLAGS if ktype.keys_ciphers else 0)
            | (ASYMMETRIC_USE_FLAGS if ktype.public_key_ops else 0))


def uses_of(flags: int) -> tuple[str, ...]:
    """The names of the uses ``flags`` bind a key to (FOR_USE's and ASYMMETRIC_USE's), in table order."""
    return tuple(use for table in (FOR_USE, ASYMMETRIC_USE) for use, bit in table.items() if flags & bit)


def check_flags(ktype: T.KeyType, flags: int) -> None:
    if flags & ~KEY_FLAGS:
        raise E.EINVAL("unknown key flags")
    misplaced = flags & ~flags_for(ktype)
    if misplaced:
        raise E.EINVAL(f"{ktype.name} keys cannot be bound to {','.join(uses_of(misplaced))}")


def refuse_use(key, use: str) -> None:
    """EOPNOTSUPP unless an asymmetric key's binding (none: every use) allows ``use`` (ASYMMETRIC_USE's
    names), as the kernel's pkey ops answer for an operation a key does not support."""
    wanted = ASYMMETRIC_USE[use]  # looked up first: a misspelt use fails on every key, bound or not
    bound = key.flags & ASYMMETRIC_USE_FLAGS
    if bound and not bound & wanted:
        raise E.EOPNOTSUPP(f"key {key.serial} is bound to {','.join(uses_of(bound))} only, not {use}")
