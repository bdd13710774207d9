"""Key permission masks, exactly as the kernel evaluates them (key_task_permission).

Four bytes, possessor/user/group/other, six bits each.  Exactly one of
user/group/other applies to a caller: the user byte if the caller owns the
key, else the group byte if the key has a group, that byte is not zero and
the caller is in the group, else the other byte.  Possessor bits are added on
top when the caller possesses the key.  root gets no bypass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keyden import errors as E

VIEW = 0x01
READ = 0x02
WRITE = 0x04
SEARCH = 0x08
LINK = 0x10
SETATTR = 0x20
ALL = 0x3F

POS_SHIFT, USR_SHIFT, GRP_SHIFT, OTH_SHIFT = 24, 16, 8, 0
VALID_MASK = 0x3F3F3F3F
NO_GID = -1  # a key without a group (the kernel's INVALID_GID): group bits never apply


def check_mask(perm: int) -> None:
    """EINVAL for bits outside the four bytes' six rights each (keyctl_setperm_key's check)."""
    if perm & ~VALID_MASK:
        raise E.EINVAL("permission bits outside 0x3f3f3f3f")

DEFAULT_USER = 0x3F010000
DEFAULT_KEYRING = 0x3F010000
DEFAULT_LOGON = 0x3D010000
DEFAULT_ASYMMETRIC = 0x39010000
DEFAULT_UID_KEYRING = 0x1F3F0000
DEFAULT_PROCESS_KEYRING = 0x3F010000
DEFAULT_SESSION_KEYRING = 0x3F130000  # a named session (join_session_keyring): others of the uid may link it
DEFAULT_ANON_SESSION_KEYRING = 0x3F030000  # "_ses" (install_session_keyring_to_cred): view and read only

NAMES = {VIEW: "view", READ: "read", WRITE: "write", SEARCH: "search", LINK: "link", SETATTR: "setattr"}


@dataclass(frozen=True)
class Credentials:
    """Who is asking: taken from the socket by the server, never from the client."""

    uid: int
    gid: int
    groups: frozenset[int] = field(default_factory=frozenset)

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


def effective(perm: int, key_uid: int, key_gid: int, cred: Credentials, possessed: bool) -> int:
    """The six-bit rights this caller has on a key with this mask and owner."""
    group_bits = (perm >> GRP_SHIFT) & ALL
    if key_uid == cred.uid:
        rights = (perm >> USR_SHIFT) & ALL
    elif key_gid != NO_GID and group_bits and cred.in_group(key_gid):
        rights = group_bits
    else:
        rights = (perm >> OTH_SHIFT) & ALL
    if possessed:
        rights |= (perm >> POS_SHIFT) & ALL
    return rights


def granted(perm: int, key_uid: int, key_gid: int, cred: Credentials, possessed: bool, need: int) -> bool:
    return (effective(perm, key_uid, key_gid, cred, possessed) & need) == need


def alswrv(bits: int) -> str:
    """keyctl's per-byte rendering: 'alswrv' with '-' for missing rights."""
    return "".join(ch if bits & bit else "-" for ch, bit in zip("alswrv", (SETATTR, LINK, SEARCH, WRITE, READ, VIEW)))


def describe_mask(perm: int) -> str:
    """keyctl describe's 24-character form: possessor, user, group, other."""
    return "".join(alswrv((perm >> s) & ALL) for s in (POS_SHIFT, USR_SHIFT, GRP_SHIFT, OTH_SHIFT))
