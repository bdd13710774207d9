"""keyden.crypto.agreement: ECDH/X25519 peers, KEYCTL_DH_COMPUTE and the KDFs."""

from __future__ import annotations

import hashlib
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec, ed25519, rsa, x25519

from keyden import errors as E
from keyden.crypto import agreement as A
from keyden.crypto import dh_groups
from dhgroups import MODP_2048

# A 1536-bit safe prime that is no named group (made once with pyca's generate_parameters(2, 1536)),
# on which OpenSSL would run its full safe-prime check (seconds with the GIL held): keyden refuses it.
UNNAMED_1536 = int(
    "d68375eb1c2160a903736118854062663a1901d39869b05ef78b861c2eb4efb12c6663f07a01cab14f12a08e6c6e82ce"
    "9dab6901555cd6de619c4f9f79fb7aff6e9f9cd0ca353cb601fa8949701a87350fa7102bb3ae56a4531cbb1244994f5b"
    "c760a2a9c1e6f3196eb434ac9b6324bb4d55677aeac31b07939ca0058bb198a0bee655cc7a8b82ff1367c35d52d142d2"
    "3441802d85de6a32428e3389026054eebcbfcb7d553f804c4f5224f70135fd67e960cd37ba39eeba9dd2d45d8a0f8bcf", 16)

# X25519 public values of small order (and their non-canonical twins): all give an all-zero secret.
X25519_LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def _be(value: int, size: int) -> bytes:
    return value.to_bytes(size, "big")


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _point(public_key, compressed=False) -> bytes:
    formats = serialization.PublicFormat
    fmt = formats.CompressedPoint if compressed else formats.UncompressedPoint
    return public_key.public_bytes(serialization.Encoding.X962, fmt)


# ---------------------------------------------------------------------------
# ECDH


@pytest.mark.parametrize("curve,size", [(ec.SECP256R1, 32), (ec.SECP384R1, 48)])
def test_ecdh_every_peer_form_gives_the_shared_secret(curve, size):
    mine, theirs = ec.generate_private_key(curve()), ec.generate_private_key(curve())
    expected = theirs.exchange(ec.ECDH(), mine.public_key())
    peer = theirs.public_key()
    for form in (peer, _spki(peer), _point(peer), _point(peer, compressed=True), bytearray(_point(peer))):
        shared = A.ecdh(mine, form)
        assert shared == expected and len(shared) == size


def test_ecdh_wrong_curve_is_einval():
    mine = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    for peer in (other, _spki(other), _point(other), _point(other, compressed=True),
                 _spki(ec.generate_private_key(ec.SECP521R1()).public_key()),
                 _spki(x25519.X25519PrivateKey.generate().public_key()),
                 x25519.X25519PrivateKey.generate().public_key()):
        with pytest.raises(E.EINVAL):
            A.ecdh(mine, peer)


def test_ecdh_off_curve_and_malformed_points_are_einval():
    mine = ec.generate_private_key(ec.SECP256R1())
    good = _point(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve = good[:-1] + bytes([good[-1] ^ 1])
    spki = _spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve_spki = spki[:-1] + bytes([spki[-1] ^ 1])
    bad_compressed = b"\x02" + b"\xff" * 32            # x >= p: no such point
    for peer in (off_curve, off_curve_spki, bad_compressed, b"\x00", b"\x04" + bytes(64), good[:-1],
                 b"\x05" + good[1:], b"", b"\x30" * 10, bytes(5000), "a string", 42, None):
        with pytest.raises(E.EINVAL):
            A.ecdh(mine, peer)


@pytest.mark.parametrize("private_key", [
    ec.generate_private_key(ec.SECP521R1()), ed25519.Ed25519PrivateKey.generate(),
    rsa.generate_private_key(65537, 1024), bytes(32), None,
], ids=["p521", "ed25519", "rsa", "bytes", "none"])
def test_ecdh_unsupported_private_key_is_einval(private_key):
    with pytest.raises(E.EINVAL):
        A.ecdh(private_key, bytes(32))


def test_x25519_every_peer_form_gives_the_shared_secret():
    mine, theirs = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    expected = theirs.exchange(mine.public_key())
    peer = theirs.public_key()
    raw = peer.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for form in (peer, raw, _spki(peer), memoryview(raw)):
        assert A.ecdh(mine, form) == expected


@pytest.mark.parametrize("point", X25519_LOW_ORDER)
def test_x25519_low_order_points_are_einval(point):
    mine = x25519.X25519PrivateKey.generate()
    peer = bytes.fromhex(point)
    with pytest.raises(E.EINVAL) as info:
        A.ecdh(mine, peer)
    assert "low-order" in info.value.message
    with pytest.raises(E.EINVAL):
        A.ecdh(mine, x25519.X25519PublicKey.from_public_bytes(peer))


def test_x25519_bad_peers_are_einval():
    mine = x25519.X25519PrivateKey.generate()
    for peer in (bytes(31), bytes(33), _spki(ec.generate_private_key(ec.SECP256R1()).public_key()),
                 ec.generate_private_key(ec.SECP256R1()).public_key(), b"", "peer"):
        with pytest.raises(E.EINVAL):
            A.ecdh(mine, peer)


def test_a_peer_of_another_algorithm_is_refused_before_it_is_loaded():
    """A DH SubjectPublicKeyInfo as the peer: pyca would prove its group's prime prime as it loads it, with
    every thread of the daemon held (seconds for 4096 bits).  Its algorithm identifier refuses it first."""
    def tlv(tag, body):
        return bytes([tag]) + (bytes([len(body)]) if len(body) < 128 else b"\x82" + len(body).to_bytes(2, "big")) + body

    def integer(v):
        return tlv(0x02, v.to_bytes((v.bit_length() + 8) // 8, "big"))
    group = tlv(0x30, tlv(0x06, bytes.fromhex("2a864886f70d010301")) + tlv(0x30, integer(MODP_2048 + 2) + integer(2)))
    dh_spki = tlv(0x30, group + tlv(0x03, b"\0" + integer(5)))
    for mine in (x25519.X25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())):
        with pytest.raises(E.EINVAL, match="not an EC or X25519 public key"):
            A.ecdh(mine, dh_spki)


# ---------------------------------------------------------------------------
# KEYCTL_DH_COMPUTE


@pytest.mark.parametrize("name", sorted(dh_groups.PRIMES))
def test_dh_compute_matches_pyca_public_value_and_exchange(name):
    prime = dh_groups.PRIMES[name]
    size = (prime.bit_length() + 7) // 8
    params = dh.DHParameterNumbers(prime, 2).parameters()
    alice, bob = params.generate_private_key(), params.generate_private_key()
    a, b = alice.private_numbers(), bob.private_numbers()
    assert A.dh_compute(_be(a.x, size), _be(prime, size), b"\x02") == _be(a.public_numbers.y, size)
    shared = A.dh_compute(_be(a.x, size), _be(prime, size), _be(b.public_numbers.y, size))
    assert shared == alice.exchange(bob.public_key()) == bob.exchange(alice.public_key())
    assert len(shared) == size


def test_dh_compute_pads_to_the_prime_length_and_takes_short_encodings():
    """Like the kernel: output always has the prime's length, leading zeros kept."""
    prime = _be(MODP_2048, 256)
    for attempt in range(4000):
        private = os.urandom(32)
        out = A.dh_compute(private, prime, b"\x05")
        assert len(out) == 256
        assert int.from_bytes(out, "big") == pow(5, int.from_bytes(private, "big"), MODP_2048)
        if out[0] == 0:
            break
    else:
        pytest.fail("no result with a leading zero byte in 4000 tries")
    # Leading zero bytes in the inputs do not matter.
    assert A.dh_compute(b"\0" * 10 + private, b"\0" + prime, b"\0\0\x05") == out


def test_dh_compute_rejects_bad_primes():
    x = b"\x01\x23"
    for prime in (_be(MODP_2048 >> 600, 181),                 # too short (1448 bits)
                  _be((1 << 4096) + 1, 513),                  # too long (4097 bits)
                  _be(MODP_2048 + 2, 256),                    # composite
                  _be(MODP_2048 - 2, 256),                    # odd, not prime
                  _be(UNNAMED_1536 * 4 + 1, 193)):            # not a safe prime (or not prime)
        with pytest.raises(E.EINVAL):
            A.dh_compute(x, prime, b"\x02")


def test_dh_compute_takes_named_groups_only():
    """A safe prime OpenSSL does not know by name it proves prime on every call, holding the GIL (every
    thread of the daemon) for seconds at 4096 bits; any uid could send one a request (a DoS hunt)."""
    assert MODP_2048 == dh_groups.PRIMES["modp_2048"]
    with pytest.raises(E.EINVAL, match="named safe-prime groups"):
        A.dh_compute(b"\x01\x23", _be(UNNAMED_1536, 192), b"\x02")  # a safe prime, of no named group


def test_dh_compute_rejects_bad_bases_and_private_values():
    prime = _be(MODP_2048, 256)
    q = (MODP_2048 - 1) // 2
    for base in (0, 1, MODP_2048 - 1, MODP_2048, MODP_2048 + 1):
        with pytest.raises(E.EINVAL):
            A.dh_compute(b"\x01\x23", prime, _be(base, 257))
    # 0, q, 2q: results 1 or p - 1 (and a Rust panic inside pyca if they got through).
    for private in (b"", b"\0", _be(q, 256), _be(2 * q, 256)):
        with pytest.raises(E.EINVAL):
            A.dh_compute(private, prime, b"\x07")
    with pytest.raises(E.EINVAL, match="private value longer"):
        A.dh_compute(b"\x01" * 257, prime, b"\x02")           # longer than the prime
    with pytest.raises(E.EINVAL, match="base longer"):  # its value in range, its bytes not: the kernel
        A.dh_compute(b"\x01\x23", prime, b"\0" + _be(7, 256))  # refuses it (a differential hunt)
    assert A.dh_compute(b"\x01\x23", prime, _be(7, 256)) == _be(pow(7, 0x123, MODP_2048), 256)
    for bad in ("text", 5, None):
        with pytest.raises(E.EINVAL):
            A.dh_compute(bad, prime, b"\x02")
        with pytest.raises(E.EINVAL):
            A.dh_compute(b"\x01", bad, b"\x02")
        with pytest.raises(E.EINVAL):
            A.dh_compute(b"\x01", prime, bad)


# ---------------------------------------------------------------------------
# KDFs


def _kernel_kdf_ctr(hash_name: str, z: bytes, otherinfo: bytes, length: int) -> bytes:
    """security/keys/dh.c kdf_ctr(): H(be32 counter from 1 || Z || otherinfo), truncated."""
    out, counter = b"", 1
    while len(out) < length:
        out += hashlib.new(hash_name, counter.to_bytes(4, "big") + z + otherinfo).digest()
        counter += 1
    return out[:length]


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
@pytest.mark.parametrize("length", [1, 31, 32, 33, 100, 1024])
def test_sp800_56a_is_the_kernels_kdf(hash_name, length):
    z, otherinfo = os.urandom(256), b"keyden test otherinfo"
    got = A.kdf(f"sp800-56a-{hash_name}", z, length, otherinfo=otherinfo)
    assert got == _kernel_kdf_ctr(hash_name, z, otherinfo, length)
    assert A.kdf(f"sp800-56a-{hash_name}", z, length) == _kernel_kdf_ctr(hash_name, z, b"", length)


def test_hkdf_rfc5869_case_1_and_parameters():
    ikm, salt, info = b"\x0b" * 22, bytes(range(13)), bytes(range(0xF0, 0xFA))
    okm = A.kdf("hkdf-sha256", ikm, 42, salt=salt, info=info)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")
    assert A.kdf("hkdf-sha256", ikm, 42, info=info) == A.kdf("hkdf-sha256", ikm, 42, salt=bytes(32), info=info)
    assert A.kdf("hkdf-sha256", ikm, 42, salt=salt) != okm
    assert len(A.kdf("hkdf-sha384", ikm, 100)) == 100 and len(A.kdf("hkdf-sha512", ikm, 100)) == 100


@pytest.mark.parametrize("name", ["hkdf-sha256", "hkdf-sha384", "hkdf-sha512",
                                  "sp800-56a-sha256", "sp800-56a-sha384", "sp800-56a-sha512"])
def test_kdf_length_bounds(name):
    secret = os.urandom(32)
    assert len(A.kdf(name, secret, 1)) == 1
    assert len(A.kdf(name, secret, A.MAX_KDF_OUTPUT)) == A.MAX_KDF_OUTPUT == 8160
    for length in (0, -1, A.MAX_KDF_OUTPUT + 1, 1 << 40, True, 1.0, "32", None):
        with pytest.raises(E.EINVAL):
            A.kdf(name, secret, length)


def test_raw_kdf():
    secret = os.urandom(48)
    assert A.kdf("raw", secret, 48) == secret
    for length in (47, 49):
        with pytest.raises(E.EINVAL):
            A.kdf("raw", secret, length)


def test_kdf_refuses_parameters_it_would_ignore():
    secret = os.urandom(32)
    for name, kwargs in (("hkdf-sha256", {"otherinfo": b"o"}), ("sp800-56a-sha256", {"salt": b"s"}),
                         ("sp800-56a-sha256", {"info": b"i"}), ("raw", {"info": b"i"}),
                         ("raw", {"salt": b"s"}), ("raw", {"otherinfo": b"o"})):
        with pytest.raises(E.EINVAL):
            A.kdf(name, secret, 32, **kwargs)


def test_kdf_bad_names_and_inputs():
    for name in ("hkdf", "hkdf-sha1", "HKDF-SHA256", "sp800-108", "", None):
        with pytest.raises(E.ENOENT):
            A.kdf(name, b"secret", 32)
    with pytest.raises(E.EINVAL):
        A.kdf("hkdf-sha256", "secret", 32)
    with pytest.raises(E.EINVAL):
        A.kdf("hkdf-sha256", b"secret", 32, info=bytes(A.MAX_KDF_INPUT + 1))
    with pytest.raises(E.EINVAL):
        A.kdf("sp800-56a-sha256", bytes(A.MAX_KDF_INPUT + 1), 32)
