"""The Linux kernel's key retention service, reached with the raw syscalls through ctypes.

Used only to hold keyden's master key as a ``user`` key in root's user
keyring (@u).  Not a logon key: a logon key's payload can never be read back
by user space (KEYCTL_READ refuses it), and keyden does its sealing in user
space with pyca, so it must be able to read the key it holds.  The key is
owned by uid 0 with possessor and owner rights only (0x3f3f0000).

Kernel keyrings are not namespaced per container: in a container without a
user namespace, "root's user keyring" is the host's, shared with every other
root process on the host; seccomp profiles (Docker's default) refuse these
syscalls outright.  ``KernelUnavailable`` says which happened.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform

# x86_64 and aarch64 syscall numbers (asm/unistd.h).
_SYSCALLS = {"x86_64": (248, 249, 250), "aarch64": (217, 218, 219)}
KEYCTL_SETPERM, KEYCTL_SEARCH, KEYCTL_READ, KEYCTL_UNLINK = 5, 10, 11, 9
KEY_SPEC_USER_KEYRING = -4
OWNER_ONLY = 0x3F3F0000


class KernelUnavailable(Exception):
    """The kernel keyring cannot be used from here (no syscall, seccomp, no such architecture)."""


def _syscall():
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise KernelUnavailable(f"no keyctl syscall numbers for {platform.machine()}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall, numbers


def _check(result: int) -> int:
    if result >= 0:
        return result
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EOPNOTSUPP):
        raise KernelUnavailable(f"keyctl: {os.strerror(code)}")
    raise OSError(code, os.strerror(code))


def probe() -> None:
    """Raise KernelUnavailable unless keyctl works here, root's user keyring included (in a container
    sharing the host's keyrings, another root process may have invalidated it: ENOKEY ever after)."""
    syscall, (_add, _request, keyctl) = _syscall()
    found = syscall(keyctl, 0, ctypes.c_int(KEY_SPEC_USER_KEYRING), 0)  # KEYCTL_GET_KEYRING_ID
    if found < 0 and (code := ctypes.get_errno()) in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
        raise KernelUnavailable(f"root's user keyring: {os.strerror(code)}")
    _check(found)


def read(description: str) -> bytes | None:
    """The payload of the user key ``description`` in root's user keyring, or None if there is none."""
    syscall, (_add, _request, keyctl) = _syscall()
    found = syscall(keyctl, KEYCTL_SEARCH, ctypes.c_int(KEY_SPEC_USER_KEYRING), b"user", description.encode(), 0)
    if found < 0 and ctypes.get_errno() in (errno.ENOKEY, errno.EKEYEXPIRED, errno.EKEYREVOKED):
        return None
    serial = _check(found)
    buf = ctypes.create_string_buffer(4096)
    size = _check(syscall(keyctl, KEYCTL_READ, ctypes.c_int(serial), buf, ctypes.c_size_t(len(buf))))
    data = buf.raw[:min(size, len(buf))]
    ctypes.memset(buf, 0, len(buf))
    return data


def store(description: str, payload: bytes) -> int:
    """Add (or update in place) the user key ``description`` in root's user keyring, owner-only."""
    syscall, (add_key, _request, keyctl) = _syscall()
    serial = _check(syscall(add_key, b"user", description.encode(), payload, ctypes.c_size_t(len(payload)),
                            ctypes.c_int(KEY_SPEC_USER_KEYRING)))
    _check(syscall(keyctl, KEYCTL_SETPERM, ctypes.c_int(serial), ctypes.c_uint(OWNER_ONLY)))
    return serial


def remove(description: str) -> None:
    """Unlink the key from root's user keyring (for the tests, which put one there)."""
    syscall, (_add, _request, keyctl) = _syscall()
    found = syscall(keyctl, KEYCTL_SEARCH, ctypes.c_int(KEY_SPEC_USER_KEYRING), b"user", description.encode(), 0)
    if found >= 0:
        _check(syscall(keyctl, KEYCTL_UNLINK, ctypes.c_int(found), ctypes.c_int(KEY_SPEC_USER_KEYRING)))
