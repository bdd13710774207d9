"""Real Unix users for multi-user tests: create and remove them, run code as them.

The daemon takes a caller's identity from SO_PEERCRED and /proc, so proving
isolation needs processes that really run under other uids.  ``run_as``
forks, drops to the user's uid, gid and supplementary groups (as login
would), calls a function and sends back its JSON result.  Forking instead of
exec'ing keeps this independent of whether the interpreter or its packages
are reachable by the test users (a pyenv under /root is not), and costs
milliseconds instead of an interpreter start.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

RUN_TIMEOUT = 30.0


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group the user is in, primary included, as login sets them


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def create_group(name: str) -> int:
    _run("groupadd", name)
    return grp.getgrnam(name).gr_gid


def remove_group(name: str) -> None:
    if _group_exists(name):
        _run("groupdel", name)


def create_user(name: str, extra_groups: tuple[str, ...] = ()) -> User:
    """A login-less user with a group of its own, added to ``extra_groups``."""
    argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
    if extra_groups:
        argv += ["--groups", ",".join(extra_groups)]
    _run(*argv, name)
    entry = pwd.getpwnam(name)
    return User(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))


def remove_user(name: str) -> None:
    """Remove the user and its own group (userdel keeps that group on some configurations)."""
    if _user_exists(name):
        _run("userdel", name)
    remove_group(name)


@contextlib.contextmanager
def temporary_users(roles: dict[str, tuple[str, ...]], shared_groups: tuple[str, ...] = ()
                    ) -> Iterator[tuple[dict[str, User], dict[str, int]]]:
    """Create uniquely named users (role -> shared groups to join) and groups; remove all afterwards.

    Names carry a random suffix so parallel or aborted runs never collide
    with each other or with real accounts.  Everything created is removed
    even if a later creation or the caller fails.
    """
    if os.geteuid() != 0:
        raise PermissionError("creating test users needs root (useradd); run these tests as root")
    suffix = secrets.token_hex(3)
    with contextlib.ExitStack() as cleanup:
        group_names = {g: f"kdtest_{g}_{suffix}" for g in shared_groups}
        gids = {}
        for group, name in group_names.items():
            gids[group] = create_group(name)
            cleanup.callback(remove_group, name)
        users = {}
        for role, groups in roles.items():
            name = f"kdtest_{role}_{suffix}"
            cleanup.callback(remove_user, name)  # before creating: a half-made user is removed too
            users[role] = create_user(name, tuple(group_names[g] for g in groups))
        yield users, gids


def run_as(user: User, fn: Callable[..., Any], *args: Any, env: dict[str, str | None] | None = None) -> Any:
    """Call ``fn(*args)`` in a child process running as ``user``; return its JSON-able result.

    ``env`` sets (or, with None, removes) environment variables in the child
    only.  An exception in the child fails the caller with the child's
    traceback.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        os.close(read_end)
        try:
            os.setgroups(list(user.groups))
            os.setgid(user.gid)
            os.setuid(user.uid)
            for name, value in (env or {}).items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            report = {"result": fn(*args)}
        except BaseException:
            report = {"error": traceback.format_exc()}
        try:
            data = json.dumps(report).encode()
        except (TypeError, ValueError):
            data = json.dumps({"error": f"result is not JSON-able: {report!r}"}).encode()
        try:
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        data = _read_all(read_end, pid)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    if not data:
        raise AssertionError(f"process running as {user.name} died without a result")
    report = json.loads(data)
    if "error" in report:
        raise AssertionError(f"process running as {user.name} failed:\n{report['error']}")
    return report["result"]


def _read_all(fd: int, pid: int) -> bytes:
    chunks = []
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"child process {pid} gave no result within {RUN_TIMEOUT} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
