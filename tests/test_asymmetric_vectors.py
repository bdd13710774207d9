"""Wycheproof vectors through keyden.crypto.asymmetric (parse + KEYCTL_PKEY_* semantics).

One test per file; each loops over all cases and reports the tcIds that went
wrong.  "valid" must be accepted, "invalid" must end in a KeydenError,
"acceptable" may go either way but never as a non-Keyden exception.
"""

from __future__ import annotations

import pytest

from keyden.crypto import asymmetric as A

try:
    from tests import wycheproof
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import wycheproof


@pytest.mark.parametrize("vf", wycheproof.FILES, ids=[vf.id for vf in wycheproof.FILES])
def test_wycheproof(vf):
    counts, failures = wycheproof.run_vectors(vf, A.parse)
    assert not failures, f"{vf.filename}: {len(failures)} failures\n" + "\n".join(failures[:30])
    assert counts["valid"] > 0, counts
    if vf.filename == "rsa_oaep_misc_test.json":  # really exercises the policy-skip path
        assert counts["skipped"] > 0, counts


def test_missing_vector_file_fails_loudly():
    with pytest.raises(FileNotFoundError):
        list(wycheproof.load("Signature", "no_such_file_test.json"))
