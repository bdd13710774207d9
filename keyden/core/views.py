"""What keyctl shows of a key: describe's record, /proc/keys' line and pkey_query's sizes.  Plain values, shared by the
store that makes them and the clients that decode them from the wire."""

from __future__ import annotations

import math
from dataclasses import dataclass

from keyden.core import perm as P

#: KEYCTL_PKEY_QUERY's supported_ops bits (KEYCTL_SUPPORTS_ENCRYPT, ...)
OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_VERIFY = 1, 2, 4, 8


def as_kernel_prints(ident: int) -> int:
    """A uid or gid as the kernel prints it in describe and /proc/keys (%d of an id_t): 4294967294 is -2."""
    return ident - (1 << 32) if ident >= 1 << 31 else ident


@dataclass(frozen=True)
class Description:
    """What keyctl describe shows."""

    serial: int
    type: str
    uid: int
    gid: int
    perm: int
    description: str

    def __repr__(self) -> str:  # the mask in hex, as keyctl and the kernel's interfaces write it
        return (f"Description(serial={self.serial}, type={self.type!r}, uid={self.uid}, gid={self.gid}, "
                f"perm=0x{self.perm:08x}, description={self.description!r})")

    def keyctl(self) -> str:
        """keyctl describe's line."""
        return (f"{self.serial:9d}: {P.describe_mask(self.perm)} {as_kernel_prints(self.uid):5d} "
                f"{as_kernel_prints(self.gid):5d} {self.type}: {self.description}")

    def raw(self, sep: str = ";") -> str:
        """keyctl rdescribe's line: type;uid;gid;perm;description."""
        return sep.join((self.type, str(as_kernel_prints(self.uid)), str(as_kernel_prints(self.gid)),
                         f"{self.perm:08x}", self.description))


@dataclass(frozen=True)
class KeyStatus:
    """One key as /proc/keys shows it: its description, state and expiry (wall clock, 0 = never)."""

    serial: int
    type: str
    uid: int
    gid: int
    perm: int
    revoked: bool
    in_quota: bool  # charged to its owner's quota
    expired: bool
    no_export: bool
    usage: int  # the keyrings linking it, and the sessions and roles that hold it
    expiry: float
    description: str
    summary: str  # what the type's describe adds: a payload's length, a keyring's link count, an algorithm

    def proc_line(self, now: float) -> str:
        """The key's line in /proc/keys (proc_keys_show), its expiry counted from ``now``."""
        # /proc/keys' IRDQUNi: every key here is instantiated; none is dead, under construction, negative, or
        # kept once invalidated (keyden destroys it at once).
        flags = f"I{'R' if self.revoked else '-'}-{'Q' if self.in_quota else '-'}---"
        described = f"{self.description}: {self.summary}" if self.summary else self.description
        return (f"{self.serial:08x} {flags} {self.usage:5d} {self.time_left(now):>4} {self.perm:08x} "
                f"{as_kernel_prints(self.uid):5d} {as_kernel_prints(self.gid):5d} {self.type:<9.9} {described}")

    def time_left(self, now: float) -> str:
        """/proc/keys' expiry column: perm, expd, or what is left in its largest unit (s, m, h, d, w).  A
        revoked key is expd, as the kernel shows it (revocation sets its death time)."""
        if self.revoked:
            return "expd"
        if not self.expiry:
            return "perm"
        # Whole seconds at both ends, as the kernel counts (its expiry is the second a timeout was set in,
        # plus the timeout): 604799 s from now is 6d, not 1w.
        left = math.floor(self.expiry) - math.floor(now)
        if self.expired or left <= 0:
            return "expd"
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
            if left >= size:
                return f"{left // size}{unit}"
        return f"{left}s"


@dataclass(frozen=True)
class PkeyQuery:
    """KEYCTL_PKEY_QUERY result (struct keyctl_pkey_query)."""

    supported_ops: int
    key_size: int
    max_data_size: int
    max_sig_size: int
    max_enc_size: int
    max_dec_size: int

    def keyctl(self) -> str:
        """keyctl pkey_query's output: sizes, then which operations the key supports."""
        lines = [f"key_size={self.key_size}", f"max_data_size={self.max_data_size}",
                 f"max_sig_size={self.max_sig_size}", f"max_enc_size={self.max_enc_size}",
                 f"max_dec_size={self.max_dec_size}"]
        ops = {"encrypt": OP_ENCRYPT, "decrypt": OP_DECRYPT, "sign": OP_SIGN, "verify": OP_VERIFY}
        lines += [f"{name}={'y' if self.supported_ops & bit else 'n'}" for name, bit in ops.items()]
        return "\n".join(lines)
