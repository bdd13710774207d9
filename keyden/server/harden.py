"""Make the daemon's memory hard to get at: no ptrace-by-uid, no core files, locked pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger("keyden.harden")

PR_SET_DUMPABLE = 4
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def harden(lock_memory: bool = True) -> dict[str, bool]:
    """Apply what the platform permits; report what took effect."""
    libc = _libc()
    done = {}
    done["not_dumpable"] = libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["no_core"] = True
    except (ValueError, OSError):
        done["no_core"] = False
    done["memory_locked"] = False
    if lock_memory:
        # MCL_ONFAULT: lock pages as they are touched, so idle thread stacks cost nothing.
        done["memory_locked"] = libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0
        if not done["memory_locked"]:
            log.warning("memory not locked (%s): key material may be swapped to disk; raise the locked-memory "
                        "limit (ulimit -l, systemd LimitMEMLOCK=infinity) or set lock_memory = false to accept "
                        "that", os.strerror(ctypes.get_errno()))
    return done
