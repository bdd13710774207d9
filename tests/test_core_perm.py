"""Permission masks as security/keys/permission.c evaluates them, one row per rule."""

from __future__ import annotations

import pytest

from keyden.core import keytypes as T
from keyden.core import perm as P
from keyden.core.perm import ALL, LINK, READ, SEARCH, SETATTR, VIEW, WRITE, Credentials

OWNER = Credentials(1000, 1000, frozenset({1000}))
MEMBER = Credentials(1001, 1001, frozenset({1001, 3000}))  # in the key's group 3000 as a supplementary group
PRIMARY = Credentials(1002, 3000, frozenset())  # in group 3000 as its primary group
STRANGER = Credentials(1003, 1003, frozenset({1003}))
ROOT = Credentials(0, 0, frozenset({0}))

# perm, key uid, key gid, caller, possessed, rights the caller gets
CASES = [
    (0x3F010000, 1000, 1000, OWNER, False, VIEW),  # the owner gets the user byte
    (0x3F010000, 1000, 1000, OWNER, True, ALL),  # possessor bits are added on top
    (0x00003F3F, 1000, 3000, OWNER, False, 0),  # the owner never falls back to group or other
    (0x3F000000, 1000, 1000, OWNER, False, 0),  # possessor bits need possession
    (0x02010000, 1000, 1000, OWNER, True, VIEW | READ),  # additive, not a replacement
    (0x00000300, 1000, 3000, MEMBER, False, VIEW | READ),  # a group member gets the group byte
    (0x00000300, 1000, 3000, PRIMARY, False, VIEW | READ),  # the primary group counts too
    (0x00000103, 1000, 3000, MEMBER, False, VIEW),  # ... and then not the other byte
    (0x00000003, 1000, 3000, MEMBER, False, VIEW | READ),  # a zero group byte falls through to other
    (0x00000300, 1000, P.NO_GID, MEMBER, False, 0),  # a key without a group has no group byte
    (0x00000303, 1000, 3000, STRANGER, False, VIEW | READ),  # everyone else gets the other byte
    (0x3F3F3F00, 1000, 3000, STRANGER, False, 0),
    (0x01000000, 1000, 1000, ROOT, False, 0),  # root has no bypass
    (0x01000000, 1000, 1000, ROOT, True, VIEW),
    (0x003F0000, 0, 0, ROOT, False, ALL),  # root as owner is just an owner
    (0x3F3F3F3F, 1000, 1000, STRANGER, True, ALL),
    (0x08040201, 1000, 1000, OWNER, True, SEARCH | WRITE),  # each byte stays in its own lane
    (0x08040201, 1000, 3000, MEMBER, True, SEARCH | READ),
    (0x08040201, 1000, 3000, STRANGER, False, VIEW),
]


CASE_IDS = [f"{perm:08x}-uid{cred.uid}-{'pos' if pos else 'nopos'}-{i}"
            for i, (perm, _uid, _gid, cred, pos, _rights) in enumerate(CASES)]


@pytest.mark.parametrize("perm, uid, gid, cred, possessed, rights", CASES, ids=CASE_IDS)
def test_effective_rights(perm, uid, gid, cred, possessed, rights):
    assert P.effective(perm, uid, gid, cred, possessed) == rights
    for bit in (VIEW, READ, WRITE, SEARCH, LINK, SETATTR):
        assert P.granted(perm, uid, gid, cred, possessed, bit) == bool(rights & bit)


@pytest.mark.parametrize("need, granted", [(VIEW | READ, True), (VIEW | WRITE, False), (0, True)])
def test_granted_needs_every_bit_asked_for(need, granted):
    assert P.granted(0x00030000, 1000, 1000, OWNER, False, need) is granted


@pytest.mark.parametrize("perm, shown", [
    (0x3F010000, "alswrv-----v------------"),
    (0x1F3F0000, "-lswrvalswrv------------"),
    (0x3F130000, "alswrv-l--rv------------"),
    (0x3F030000, "alswrv----rv------------"),
    (0x00000000, "------------------------"),
    (0x3F3F3F3F, "alswrv" * 4),
])
def test_describe_mask_renders_like_keyctl(perm, shown):
    assert P.describe_mask(perm) == shown


@pytest.mark.parametrize("perm", [P.DEFAULT_USER, P.DEFAULT_LOGON, P.DEFAULT_ASYMMETRIC, P.DEFAULT_KEYRING,
                                  P.DEFAULT_UID_KEYRING, P.DEFAULT_SESSION_KEYRING, P.DEFAULT_PROCESS_KEYRING])
def test_defaults_are_valid_masks(perm):
    assert perm & ~P.VALID_MASK == 0


@pytest.mark.parametrize("name, perm", [
    ("user", 0x3F010000), ("logon", 0x3D010000), ("asymmetric", 0x39010000), ("keyring", 0x3F010000),
])
def test_type_defaults_follow_the_kernel_formula(name, perm):
    """key_create_or_update: possessor view/search/link/setattr, +read if readable, +write if updatable."""
    ktype = T.REGISTRY[name]
    formula = (VIEW | SEARCH | LINK | SETATTR) << P.POS_SHIFT | VIEW << P.USR_SHIFT
    formula |= (READ << P.POS_SHIFT) if ktype.readable else 0
    formula |= (WRITE << P.POS_SHIFT) if ktype.updatable or ktype.is_keyring else 0
    assert ktype.default_perm == formula == perm
