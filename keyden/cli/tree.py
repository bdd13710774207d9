"""Walking the session keyring tree, as libkeyutils' recursive_key_scan and keyctl show do.

unlink (without a keyring), purge and reap visit every (parent, key) pair
under the caller's session keyring, children before their keyring; show
prints the tree.  Both read keyrings and describe keys through the daemon,
so they see exactly what the caller is permitted to see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from keyden import errors as E
from keyden.client.common import KeyDescription
from keyden.core import perm as P
from keyden.core.views import as_kernel_prints
from keyden.cli.support import Context, call, failure

SESSION = -3
MAX_SCAN_DEPTH = 800  # libkeyutils' limit
MAX_SHOW_INDENT = 8 * 4  # keyctl show stops this deep


@dataclass
class Visit:
    """One key met during a scan.  ``parent`` is 0 for the starting keyring."""

    parent: int
    key: int
    description: KeyDescription | None  # None when describe failed ...
    error: E.KeydenError | None  # ... for this reason


Visitor = Callable[[Visit], int]


def scan_session(ctx: Context, visit: Visitor) -> int:
    """recursive_session_key_scan: the sum of what ``visit`` returns over the session tree."""
    try:
        session = ctx.client.get_keyring_id(SESSION)
    except E.KeydenError:
        return 0
    return _scan(ctx, 0, session, 0, visit)


def _scan(ctx: Context, parent: int, key: int, depth: int, visit: Visitor) -> int:
    if depth > MAX_SCAN_DEPTH:
        return 0
    count = 0
    try:
        description, error = ctx.client.describe(key), None
    except E.KeydenError as exc:
        description, error = None, exc
    if description is not None and description.type == "keyring":
        try:
            children = ctx.client.read(key)
        except E.KeydenError:
            children = []
        for child in children:
            count += _scan(ctx, key, child, depth + 1, visit)
    return count + visit(Visit(parent, key, description, error))


def try_unlink(ctx: Context, key: int, keyring: int) -> E.KeydenError | None:
    """Unlink, returning the refusal instead of raising (keyring 0, the scan's root, always fails)."""
    try:
        ctx.client.unlink(key, keyring)
        return None
    except E.KeydenError as exc:
        return exc


def unlink_count(ctx: Context, key: int, keyring: int) -> int:
    """1 if the link was removed, 0 if not: how the scanners count."""
    return 0 if try_unlink(ctx, key, keyring) else 1


def granted_mask(description: KeyDescription) -> str:
    """keyctl's calc_perms: possessor bits plus whichever of user/group/other applies to us.

    keyctl decides user/group/other from its own euid, egid and groups and
    always adds the possessor byte; it prints '--' for the two unused bits.
    """
    perm = description.perm
    rights = (perm >> P.POS_SHIFT) & P.ALL
    gid = description.gid
    if description.uid == os.geteuid():
        rights |= (perm >> P.USR_SHIFT) & P.ALL
    elif gid != -1 and (gid == os.getegid() or gid in os.getgroups()):
        rights |= (perm >> P.GRP_SHIFT) & P.ALL
    else:
        rights |= (perm >> P.OTH_SHIFT) & P.ALL
    return "--" + P.alswrv(rights)


def show(ctx: Context, keyring: int, title: str, hex_ids: bool) -> None:
    """keyctl show: the title, then one line per key, nested keyrings indented."""
    print(title)
    try:
        root = ctx.client.get_keyring_id(keyring)
    except E.KeydenError as exc:
        raise failure("Unable to dump key", exc) from None
    _show(ctx, root, "", False, hex_ids)


def _show(ctx: Context, key: int, indent: str, more: bool, hex_ids: bool) -> None:
    if len(indent) > MAX_SHOW_INDENT:
        return
    try:
        d = ctx.client.describe(key)
    except E.KeydenError as exc:
        print(f"{key}: key inaccessible ({os.strerror(exc.code)})")
        return
    serial = f"0x{key & 0xFFFFFFFF:08x}" if hex_ids else f"{key:10d}"
    branch = "\\_ " if indent else ""
    print(f"{serial} {granted_mask(d)}  {as_kernel_prints(d.uid):5d} {as_kernel_prints(d.gid):5d}  {indent}{branch}"
          f"{d.type}: {d.description}")
    if d.type != "keyring":
        return
    children = call("keyctl_read_alloc", ctx.client.read, key)
    if not indent:
        child_indent = " "
    else:
        child_indent = indent + ("|   " if more else "    ")
    for i, child in enumerate(children):
        _show(ctx, child, child_indent, i < len(children) - 1, hex_ids)
