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


@pytest.mark.parametrize("subdir,filename,key_field,check,min_run", wycheproof.FILES,
                         ids=[f[1][: -len("_test.json")] for f in wycheproof.FILES])
def test_wycheproof(subdir, filename, key_field, check, min_run):
    counts, failures = wycheproof.run_vectors(subdir, filename, key_field, check, A.parse, min_run)
    assert not failures, f"{filename}: {len(failures)} failures\n" + "\n".join(failures[:30])
    assert counts["valid"] > 0 and counts["invalid"] > 0, counts
