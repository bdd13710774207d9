"""Wycheproof vectors through keyden.crypto.asymmetric (parse + KEYCTL_PKEY_* semantics).

One test per file; each loops over all cases and reports the tcIds that went
wrong.  "valid" must be accepted, "invalid" must end in a KeydenError,
"acceptable" may go either way but never as a non-Keyden exception.
"""

from __future__ import annotations

import hashlib

import pytest

from keyden import errors as E
from keyden.crypto import asymmetric as A

try:
    from tests import wycheproof
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import wycheproof

HASH_NAMES = {
    "SHA-1": "sha1", "SHA-224": "sha224", "SHA-256": "sha256", "SHA-384": "sha384",
    "SHA-512": "sha512", "SHA3-256": "sha3-256", "SHA3-384": "sha3-384", "SHA3-512": "sha3-512",
}


def _digest(case, msg: bytes) -> bytes:
    return hashlib.new(HASH_NAMES[case.group["sha"]].replace("-", "_"), msg).digest()


def _rsa_pkcs1(key, case):
    info = f"enc=pkcs1 hash={HASH_NAMES[case.group['sha']]}"
    key.verify(info, _digest(case, case.hex("msg")), case.hex("sig"))


def _rsa_pss(key, case):
    g = case.group
    info = f"enc=pss hash={HASH_NAMES[g['sha']]} mgfhash={HASH_NAMES[g['mgfSha']]} saltlen={g['sLen']}"
    key.verify(info, _digest(case, case.hex("msg")), case.hex("sig"))


def _rsa_oaep(key, case):
    g = case.group
    info = f"enc=oaep hash={HASH_NAMES[g['sha']]} mgfhash={HASH_NAMES[g['mgfSha']]}"
    if case.fields["label"]:
        info += f" label={case.fields['label']}"
    plain = key.decrypt(info, case.hex("ct"))
    assert plain == case.hex("msg"), "decrypted to the wrong plaintext"


def _ecdsa(enc):
    def check(key, case):
        info = f"enc={enc} hash={HASH_NAMES[case.group['sha']]}"
        key.verify(info, _digest(case, case.hex("msg")), case.hex("sig"))
    return check


def _ed25519(key, case):
    key.verify("", case.hex("msg"), case.hex("sig"))


# (subdir, file, group field holding the key as hex DER, check)
FILES = [
    ("Signature", "rsa_signature_2048_sha256_test.json", "publicKeyDer", _rsa_pkcs1),
    ("Signature", "rsa_signature_3072_sha512_test.json", "publicKeyDer", _rsa_pkcs1),
    ("Signature", "rsa_signature_4096_sha384_test.json", "publicKeyDer", _rsa_pkcs1),
    ("Signature", "rsa_pss_2048_sha256_mgf1_32_test.json", "publicKeyDer", _rsa_pss),
    ("Signature", "rsa_pss_2048_sha256_mgf1_0_test.json", "publicKeyDer", _rsa_pss),
    ("Signature", "rsa_pss_2048_sha1_mgf1_20_test.json", "publicKeyDer", _rsa_pss),
    ("Cipher", "rsa_oaep_2048_sha256_mgf1sha256_test.json", "privateKeyPkcs8", _rsa_oaep),
    ("Cipher", "rsa_oaep_2048_sha256_mgf1sha1_test.json", "privateKeyPkcs8", _rsa_oaep),
    ("Signature", "ecdsa_secp256r1_sha256_test.json", "publicKeyDer", _ecdsa("x962")),
    ("Signature", "ecdsa_secp256r1_sha256_p1363_test.json", "publicKeyDer", _ecdsa("p1363")),
    ("Signature", "ecdsa_secp384r1_sha384_test.json", "publicKeyDer", _ecdsa("x962")),
    ("Signature", "ecdsa_secp384r1_sha384_p1363_test.json", "publicKeyDer", _ecdsa("p1363")),
    ("Signature", "ed25519_test.json", "publicKeyDer", _ed25519),
]


def run_vectors(subdir: str, filename: str, key_field: str, check, parse=A.parse):
    """Run every case of a file; return (counts, failure lines).  Reusable by daemon tests."""
    failures: list[str] = []
    keys: dict[int, object] = {}
    skipped_groups: set[int] = set()
    groups: set[int] = set()
    counts = {"valid": 0, "invalid": 0, "acceptable": 0, "skipped": 0}
    for case in wycheproof.load(subdir, filename):
        groups.add(case.group_index)
        if case.group_index not in keys and case.group_index not in skipped_groups:
            try:
                keys[case.group_index] = parse(case.group_hex(key_field))
            except E.EINVAL as exc:
                # Our size/curve policy refuses this key: skip its group, counted below.
                skipped_groups.add(case.group_index)
                failures_note = f"group {case.group_index} skipped: {exc}"
                assert "unsupported" in str(exc), failures_note
        if case.group_index in skipped_groups:
            counts["skipped"] += 1
            continue
        counts[case.result] += 1
        try:
            check(keys[case.group_index], case)
            outcome = "accepted"
        except E.KeydenError as exc:
            outcome = f"rejected ({exc})"
        except Exception as exc:  # noqa: BLE001 - exactly what we are hunting for
            failures.append(f"tcId {case.tc_id} ({case.result}, {case.comment}): non-Keyden {exc!r}")
            continue
        if case.result == "valid" and outcome != "accepted":
            failures.append(f"tcId {case.tc_id} (valid, {case.comment}): {outcome}")
        elif case.result == "invalid" and outcome == "accepted":
            failures.append(f"tcId {case.tc_id} (invalid, {case.comment}, {case.flags}): accepted")
    assert len(skipped_groups) * 10 <= len(groups), f"{filename}: too many groups skipped"
    return counts, failures


@pytest.mark.parametrize("subdir,filename,key_field,check", FILES, ids=[f[1][:-10] for f in FILES])
def test_wycheproof(subdir, filename, key_field, check):
    counts, failures = run_vectors(subdir, filename, key_field, check)
    assert not failures, f"{filename}: {len(failures)} failures\n" + "\n".join(failures[:30])
    assert counts["valid"] > 0 and counts["invalid"] > 0, counts
