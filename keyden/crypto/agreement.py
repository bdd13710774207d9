"""Key agreement (ECDH, X25519, KEYCTL_DH_COMPUTE) and the KDFs applied to its output.

Pure code: no sockets, no key store.  The results are secrets that stay in
the daemon, so every input that could make an agreement degenerate (points
off the curve or on another curve, low-order X25519 points, DH values that
give 1) is refused with EINVAL before or instead of producing output.  All
arithmetic on secrets is OpenSSL's, through pyca ``cryptography``; messages
never carry key material.
"""

from __future__ import annotations

import warnings

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import constant_time, hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec, x25519
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.utils import CryptographyDeprecationWarning

from keyden import errors as E
from keyden.crypto import asymmetric, check_context, dh_groups

__all__ = [
    "CURVES", "ecdh", "DH_MIN_PRIME_BITS", "DH_MAX_PRIME_BITS", "dh_compute",
    "KDFS", "MAX_KDF_OUTPUT", "MAX_KDF_INPUT", "MIN_DERIVED_KEY", "kdf",
]

# pyca curve name -> (curve class, field size in bytes)
CURVES = {"secp256r1": (ec.SECP256R1, 32), "secp384r1": (ec.SECP384R1, 48)}
MAX_PEER = 4096                 # bytes: a SubjectPublicKeyInfo for these curves is ~120

# The kernel refuses primes under 1536 bits (crypto/dh.c, non-FIPS); the named
# groups dh_compute takes (dh_groups) span 1536..4096.
DH_MIN_PRIME_BITS, DH_MAX_PRIME_BITS = 1536, 4096
# pyca 50 deprecated finite-field DH.  dh_compute is the kernel's KEYCTL_DH_COMPUTE, kept for
# compatibility (docs/session-keys.md says to prefer ECDH): the warning would only be noise in the
# daemon's log.  One filter, set once (catch_warnings around the call is not thread-safe).
warnings.filterwarnings("ignore", "Diffie-Hellman over finite fields", CryptographyDeprecationWarning)

MAX_KDF_OUTPUT = 8160           # 255 * 32: HKDF-SHA256's limit, applied to every KDF
#: bytes, at least, of a key derive or kdf makes (kept in keyden).  Each length's output is the start of the
#: next's, and a key of 1 byte used for an HMAC gives its byte away to 256 guesses: a shorter key would
#: let whoever may only use the source recover the longer ones a byte at a time (found by a security hunt).
MIN_DERIVED_KEY = 16
MAX_KDF_INPUT = 65536           # secret, salt, info, otherinfo: each at most this many bytes


def _bytes(value, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise E.EINVAL(f"{what} must be bytes")


# ---------------------------------------------------------------------------
# ECDH / X25519


def ecdh(private_key, peer) -> bytes:
    """Shared secret of a pyca P-256/P-384 or X25519 private key and a peer public key.

    ``peer``: a pyca public key, SubjectPublicKeyInfo DER, or the raw public
    value (SEC1 point, compressed or not, for EC; 32 bytes for X25519).
    EC output is the x-coordinate (field size); X25519 output is 32 bytes.
    """
    if isinstance(private_key, x25519.X25519PrivateKey):
        peer_key = _x25519_peer(peer)
        try:
            shared = private_key.exchange(peer_key)
        except ValueError:      # OpenSSL refuses an all-zero result itself
            shared = bytes(32)
        if constant_time.bytes_eq(shared, bytes(32)):
            raise E.EINVAL("X25519 peer is a low-order point")
        return shared
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        curve = CURVES.get(private_key.curve.name)
        if curve is None:
            raise E.EINVAL("unsupported curve: ECDH is offered on P-256 and P-384")
        peer_key = _ec_peer(peer, private_key.curve.name)
        try:
            return private_key.exchange(ec.ECDH(), peer_key)
        except ValueError:
            raise E.EINVAL("invalid peer public key") from None
    raise E.EINVAL("ECDH needs a P-256, P-384 or X25519 private key")


def _load_spki(data: bytes):
    if asymmetric.spki_algorithm(data) not in (asymmetric.OID_EC, asymmetric.OID_X25519):
        raise E.EINVAL("peer is not an EC or X25519 public key (SubjectPublicKeyInfo)")
    try:
        return serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise E.EINVAL("peer is not a valid public key") from None


def _peer_data(peer):
    """Peer bytes (bounded), or None when the peer is already a key object."""
    if isinstance(peer, (bytes, bytearray, memoryview)):
        data = bytes(peer)
        if not data or len(data) > MAX_PEER:
            raise E.EINVAL("peer public key has an impossible length")
        return data
    return None


def _x25519_peer(peer) -> x25519.X25519PublicKey:
    data = _peer_data(peer)
    if data is not None:
        if len(data) == 32:
            return x25519.X25519PublicKey.from_public_bytes(data)
        peer = _load_spki(data)
    if not isinstance(peer, x25519.X25519PublicKey):
        raise E.EINVAL("peer is not an X25519 public key")
    return peer


def _ec_peer(peer, curve_name: str) -> ec.EllipticCurvePublicKey:
    curve_cls, size = CURVES[curve_name]
    data = _peer_data(peer)
    if data is not None:
        raw_lengths = {b"\x04": 1 + 2 * size, b"\x02": 1 + size, b"\x03": 1 + size}
        if raw_lengths.get(data[:1]) == len(data):
            try:   # pyca checks the point is on the curve (and decompresses)
                return ec.EllipticCurvePublicKey.from_encoded_point(curve_cls(), data)
            except ValueError:
                raise E.EINVAL("peer point is not on the curve") from None
        peer = _load_spki(data)
    if not isinstance(peer, ec.EllipticCurvePublicKey):
        raise E.EINVAL("peer is not an EC public key")
    if peer.curve.name != curve_name:
        raise E.EINVAL("peer public key is on another curve")
    return peer


# ---------------------------------------------------------------------------
# KEYCTL_DH_COMPUTE


def dh_compute(private, prime, base) -> bytes:
    """base ** private mod prime, big-endian, left-padded to the prime's length (as the kernel).

    With base = the generator this is one's public value; with base = the
    peer's public value, the shared secret.  Stricter than the kernel: the
    prime must be one of the named safe-prime groups (dh_groups, which says
    why), base must be in [2, prime - 2], and a result of 1 or prime - 1 is
    refused.
    """
    private, prime, base = _bytes(private, "private"), _bytes(prime, "prime"), _bytes(base, "base")
    p = int.from_bytes(prime, "big")
    if not DH_MIN_PRIME_BITS <= p.bit_length() <= DH_MAX_PRIME_BITS:
        raise E.EINVAL(f"prime must have {DH_MIN_PRIME_BITS}..{DH_MAX_PRIME_BITS} bits")
    if p not in dh_groups.NAMES:
        raise E.EINVAL("prime is not one of the named safe-prime groups keyden takes: RFC 3526 MODP 1536, "
                       "2048, 3072, 4096 and RFC 7919 ffdhe2048, ffdhe3072, ffdhe4096")
    g = int.from_bytes(base, "big")
    if not 2 <= g <= p - 2:
        raise E.EINVAL("base must be in [2, prime - 2]")
    if len(private) > len(prime) or len(base) > len(prime):  # the kernel's crypto_dh_decode_key, in bytes
        raise E.EINVAL(f"{'private value' if len(private) > len(prime) else 'base'} longer than the prime")
    x = int.from_bytes(private, "big")
    # For a safe prime p = 2q + 1 and such a base, base**x is 1 or p - 1 exactly
    # when q divides x.  OpenSSL refuses those results, but pyca (48-50) turns that
    # refusal into a Rust panic (not an Exception), so they are caught here.
    if x % ((p - 1) // 2) == 0:
        raise E.EINVAL("private value gives a degenerate result")
    # pyca builds a DH private key from x only together with its public value,
    # which exchange() never reads and pyca does not check.  We put ``base``
    # there: then key.public_key() is the peer value base, with no second
    # (costly) parameter validation, and exchange() computes base**x mod p in
    # OpenSSL, which also refuses a base outside the group.  Computing a real
    # public value 2**x in Python would not be constant time in the secret x.
    key = dh.DHPrivateNumbers(x, dh.DHPublicNumbers(g, dh.DHParameterNumbers(p, 2))).private_key()
    try:
        shared = key.exchange(key.public_key())
    except ValueError:
        raise E.EINVAL("base is not a valid group element") from None
    return shared.rjust((p.bit_length() + 7) // 8, b"\0")


# ---------------------------------------------------------------------------
# KDFs

_KDF_HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
# name -> (construction, hash class or None)
KDFS = {
    **{f"hkdf-{h}": ("hkdf", cls) for h, cls in _KDF_HASHES.items()},
    # The kernel's KEYCTL_DH_COMPUTE KDF: SP 800-56A single-step,
    # H(counter_be32 || Z || otherinfo) with the counter from 1 = ConcatKDFHash.
    **{f"sp800-56a-{h}": ("concat", cls) for h, cls in _KDF_HASHES.items()},
    "raw": ("raw", None),
}


def kdf(name: str, secret, length: int, salt=b"", info=b"", otherinfo=b"") -> bytes:
    """Derive ``length`` bytes from ``secret``.

    hkdf-*: salt and info (RFC 5869).  sp800-56a-*: otherinfo.  raw: the
    secret itself, ``length`` must equal its length.  A parameter the KDF
    does not use must be empty, so a caller cannot believe it was bound in.
    """
    construction, hash_cls = KDFS.get(name, (None, None)) if isinstance(name, str) else (None, None)
    if construction is None:
        raise E.ENOENT("unknown KDF; use hkdf-sha256|384|512, sp800-56a-sha256|384|512 or raw")
    secret, salt, info, otherinfo = (_bytes(v, what) for v, what in
                                     ((secret, "secret"), (salt, "salt"), (info, "info"),
                                      (otherinfo, "otherinfo")))
    if any(len(v) > MAX_KDF_INPUT for v in (secret, salt, info, otherinfo)):
        raise E.EINVAL(f"KDF inputs are limited to {MAX_KDF_INPUT} bytes each")
    check_context(info, "KDF info")
    check_context(otherinfo, "KDF otherinfo")
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_KDF_OUTPUT:
        raise E.EINVAL(f"KDF output length must be 1..{MAX_KDF_OUTPUT}")
    unused = {"hkdf": (otherinfo,), "concat": (salt, info), "raw": (salt, info, otherinfo)}[construction]
    if any(unused):
        raise E.EINVAL(f"{name} does not take that parameter (hkdf: salt, info; sp800-56a: otherinfo)")
    if construction == "raw":
        if length != len(secret):
            raise E.EINVAL("raw KDF: length must equal the secret's length")
        return secret
    if construction == "hkdf":
        return HKDF(hash_cls(), length, salt or None, info).derive(secret)
    return ConcatKDFHash(hash_cls(), length, otherinfo).derive(secret)
