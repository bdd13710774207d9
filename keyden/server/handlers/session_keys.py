"""Session keys that never leave: key agreement and key transport into new logon keys.

``derive`` is the custody-preserving form of the kernel's dh_compute: the
shared secret and the derived key stay in the daemon and the caller gets a
serial.  ``dh_compute``/``dh_compute_kdf`` are kept for compatibility and,
like the kernel's, return their result.
"""

from __future__ import annotations

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core.flags import NO_EXPORT
from keyden.crypto import agreement, asymmetric
from keyden.protocol import Op
from keyden.server.handlers.base import handles

LOGON = T.REGISTRY["logon"]
#: The algorithms that agree on keys: the one table of what each algorithm can do (asymmetric.USES_OF_ALGORITHM).
AGREEING = tuple(algo for algo, uses in asymmetric.USES_OF_ALGORITHM.items() if "derive" in uses)


def store_secret(ctx, material: bytes, description: str, keyring: int, perm: int, timeout: int,
                 flags: int = 0) -> int:
    """Keep derived material as a new logon key; only its serial goes back.

    The key is made with its perm (0: the type's default) and timeout, so a
    request that fails leaves nothing behind; the default description is
    unique, so deriving again never displaces (and destroys) an earlier
    session key from the keyring.
    """
    value, quota = LOGON.preparse(material)
    return ctx.store.create_internal(ctx.caller, LOGON, description, value, quota, keyring, perm=perm or None,
                                     flags=flags, timeout=timeout, unique_prefix="keyden:session-")


@handles(Op.DERIVE)
def _derive(ctx, private, peer, peer_key, kdf, salt, info, length, description, keyring, perm, timeout):
    """ECDH with a held private key, then a KDF, into a new logon key: a ``derive`` use of the private key
    (as PKCS#11's CKA_DERIVE is the base key's; the peer's key, given by serial, lends only its public half,
    which ``public_key`` gives out anyway).

    The result is non-exportable unless the caller could export the private
    key itself: using it needs only search, and what it protects must not
    leave through a key made from it.  (The peer's half is public.)
    """
    _key_length(length)
    mine, flags = ctx.store.asymmetric_source(ctx.caller, private, "derive")
    if mine.algo not in AGREEING:
        raise E.EOPNOTSUPP(f"{mine.algo} keys cannot agree on keys; use EC P-256/P-384 or X25519")
    if bool(peer) == bool(peer_key):
        raise E.EINVAL("give the peer's public key either as bytes or as a key serial")
    their = ctx.store.asymmetric(ctx.caller, peer_key, None).public_key if peer_key else peer  # public: no use
    shared = agreement.ecdh(mine.private_key_for_internal_use(), their)
    material = _kdf(kdf, shared, length, salt, info)
    return (store_secret(ctx, material, description, keyring, perm, timeout, flags=flags),)


def _key_length(length: int) -> None:
    """A key kept in keyden is at least MIN_DERIVED_KEY bytes: a shorter one would give the longer ones made
    from the same source away, a byte at a time, to whoever may use the source."""
    if not agreement.MIN_DERIVED_KEY <= length <= agreement.MAX_KDF_OUTPUT:  # (a U32 field: an int)
        raise E.EINVAL(f"a key derive or kdf makes is {agreement.MIN_DERIVED_KEY}..{agreement.MAX_KDF_OUTPUT} "
                       "bytes (with a shorter one, whoever may use it could recover a longer one made the same "
                       "way, a byte at a time)")


def _kdf(kdf: str, secret: bytes, length: int, salt: bytes, info: bytes) -> bytes:
    """HKDF takes salt and info; the SP 800-56A KDF takes OtherInfo, carried in ``info``."""
    if kdf.startswith("sp800-56a"):
        if salt:
            raise E.EINVAL("the SP 800-56A KDF takes no salt; put OtherInfo in info")
        return agreement.kdf(kdf, secret, length, otherinfo=info)
    return agreement.kdf(kdf, secret, length, salt=salt, info=info)


@handles(Op.KDF)
def _kdf_from_key(ctx, key, kdf, salt, info, length, description, keyring, perm, timeout):
    """A new key derived from a user/logon key (e.g. per-context keys from a master key).

    Using the source needs only search permission, so what comes out must not
    be a way around it: no raw copies, and the result can never be exported.
    """
    if kdf == "raw":
        raise E.EINVAL("the raw KDF would copy the key; derive with hkdf-* or sp800-56a-*")
    _key_length(length)
    derived = _kdf(kdf, ctx.store.material(ctx.caller, key, "hmac"), length, salt, info)  # HMAC-based KDFs
    return (store_secret(ctx, derived, description, keyring, perm, timeout, flags=NO_EXPORT),)


def _dh_inputs(ctx, private, prime, base) -> tuple[bytes, bytes, bytes]:
    """KEYCTL_DH_COMPUTE reads three user keys the caller has read permission on (ENOKEY otherwise)."""
    read = ctx.store.read_for_computation
    return read(ctx.caller, private), read(ctx.caller, prime), read(ctx.caller, base)


@handles(Op.DH_COMPUTE)
def _dh_compute(ctx, private, prime, base):
    return (agreement.dh_compute(*_dh_inputs(ctx, private, prime, base)),)


@handles(Op.DH_COMPUTE_KDF)
def _dh_compute_kdf(ctx, private, prime, base, hash_name, length, otherinfo):
    if f"sp800-56a-{hash_name}" not in agreement.KDFS:  # the kernel takes any hash its crypto API has
        raise E.ENOENT(f"no hash {hash_name[:40]!r} for the KDF here; use sha256, sha384 or sha512")
    shared = agreement.dh_compute(*_dh_inputs(ctx, private, prime, base))
    return (agreement.kdf(f"sp800-56a-{hash_name}", shared, length, otherinfo=otherinfo),)


@handles(Op.PKEY_DECRYPT_INTO)
def _pkey_decrypt_into(ctx, key, info, data, description, keyring, perm):
    """RSA key transport: the unwrapped session key becomes a logon key instead of a reply (a ``decrypt``
    use of the key).

    Like a derived key, it is non-exportable unless the caller could export the private key that
    unwrapped it.
    """
    asymmetric.check_info(info)  # the grammar first, as every KEYCTL_PKEY_* op checks it
    private, flags = ctx.store.asymmetric_source(ctx.caller, key, "decrypt")
    material = private.decrypt(info, data)
    return (store_secret(ctx, material, description, keyring, perm, 0, flags=flags),)
