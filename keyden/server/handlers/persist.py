"""Persistent keyrings, wrapped export and import, master key rotation."""

from __future__ import annotations

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core.perm import VALID_MASK
from keyden.persist import SealedJournal, export
from keyden.protocol import IMPORT_CONTENTS, KEY_USE_FLAGS, Op
from keyden.server.handlers.base import handles, store_key_flags

#: What an imported key is made with until its tree is built: the owner may link into and re-mask it.
BUILDING_PERM = 0x3F3F0000


@handles(Op.GET_PERSISTENT)
def _get_persistent(ctx, uid, keyring):
    return (ctx.store.get_persistent(ctx.caller, uid, keyring),)


@handles(Op.EXPORT)
def _export(ctx, key, recipient, recipient_key, wrapping_key):
    if sum(map(bool, (recipient, recipient_key, wrapping_key))) != 1:
        raise E.EINVAL("export to exactly one of: a public key, a public key's serial, a wrapping key's serial")
    if wrapping_key:
        material = ctx.store.material(ctx.caller, wrapping_key, None)  # any key: it goes through HKDF
        public = None
    elif recipient_key:
        public = export.recipient(ctx.store.asymmetric(ctx.caller, recipient_key, export.recipient_use).public_key)
    else:
        public = export.recipient_key(recipient)
    keys, links = ctx.store.export_tree(ctx.caller, key)
    plaintext = export.encode_tree(keys, links)
    if public is None:
        return (export.wrap_with_key(plaintext, material),)
    return (export.wrap_to_public_key(plaintext, public),)


@handles(Op.IMPORT)
def _import(ctx, blob, unwrap_with, keyring, flags):
    if flags & KEY_USE_FLAGS:
        raise E.EINVAL("an import takes no uses: each key is bound to those its export carries")
    contents, flags = bool(flags & IMPORT_CONTENTS), store_key_flags(flags & ~IMPORT_CONTENTS)
    if export.mode_of(blob) == export.WRAPPING_KEY:
        plaintext = export.unwrap_with_key(blob, ctx.store.material(ctx.caller, unwrap_with, None))
    else:
        private = ctx.store.asymmetric(ctx.caller, unwrap_with, export.opening_use).private_key_for_internal_use()
        plaintext = export.unwrap_with_private_key(blob, private)
    entries, links = export.decode_tree(plaintext, export.version_of(blob))  # opened: its version is authentic
    if contents and not T.lookup(entries[0].type).is_keyring:
        raise E.EINVAL("only an exported keyring has contents to import; this export holds one key")
    return (_make_tree(ctx, entries, links, keyring, flags, contents),)


def _make_tree(ctx, entries: list[export.Entry], links: list[tuple[int, int]], keyring: int, flags: int,
               contents: bool = False) -> int:
    """Make the keys as the caller's own, each filed under its first keyring, then the other links, then the
    masks, all below a top the daemon holds detached; filing the top in ``keyring`` (or with ``contents``,
    the top's members, and the top then discarded) is the last step.  An import so happens whole or not at
    all, on disk too: a crash mid-build leaves none of it in a persistent keyring, and on any failure what
    was made is destroyed."""
    if any(entry.perm & ~VALID_MASK for entry in entries):
        raise E.EBADMSG("the export holds a permission mask outside 0x3f3f3f3f")
    first_parent = {0: keyring}
    for ring, member in links:
        first_parent.setdefault(member, ring)
    depth = _depths(first_parent)
    order = sorted(first_parent, key=depth.__getitem__)
    values: dict[int, tuple] = {}  # entry index -> its parsed payload, until a key is made of it
    try:
        for index in order:  # (before the lock: an RSA key's checks)
            values[index] = _preparse(entries[index])
        # One hold of the store's lock for the whole build: while the keys wear BUILDING_PERM, no other
        # request (another connection of the same uid) may find, export or re-mask them.
        with ctx.store.lock:
            top = _make(ctx, entries[0], values.pop(0), keyring, flags, detached=True, filed=not contents)
            serials: dict[int, int] = {0: top}
            try:
                for index in order[1:]:  # (the store destroys a value it could not make a key of)
                    serials[index] = _make(ctx, entries[index], values.pop(index), serials[first_parent[index]],
                                           flags)
                for ring, member in links:
                    if first_parent[member] != ring:
                        ctx.store.link(ctx.caller, serials[member], serials[ring])
                for index, serial in serials.items():
                    if index != 0:
                        ctx.store.setperm(ctx.caller, serial, entries[index].perm)
                if contents:
                    return ctx.store.attach_members(ctx.caller, top, keyring)
                ctx.store.attach(ctx.caller, top, keyring, entries[0].perm)
            except BaseException:
                ctx.store.discard_detached(top)
                raise
            return top
    finally:
        _destroy_unmade(entries, values)  # what a failure left unmade (nothing once the tree is whole)


def _destroy_unmade(entries: list[export.Entry], values: dict[int, tuple]) -> None:
    """Wipe the payloads preparsed for keys a failed import never made (the made ones die with its top)."""
    for index, (value, _quota) in values.items():
        T.lookup(entries[index].type).destroy(value)


def _depths(first_parent: dict[int, int]) -> dict[int, int]:
    """Each entry's distance from the top (entry 0) through its first parents, in one pass: walked from
    every entry anew, a blob of one 100,000-keyring chain cost n²/2 steps (minutes of a worker)."""
    depth = {0: 0}
    for start in first_parent:
        path = []
        index = start
        while index not in depth:
            path.append(index)
            if len(path) > len(first_parent):  # round and round without reaching the top
                raise E.EBADMSG("the export's keys do not form one tree")
            index = first_parent[index]
        for step, entry in enumerate(reversed(path), 1):
            depth[entry] = depth[index] + step
    return depth


def _preparse(entry: export.Entry) -> tuple:
    ktype = T.lookup(entry.type)
    if ktype.is_keyring and entry.description.startswith("."):
        raise E.EPERM("keyring names beginning with '.' are reserved")
    return ktype.preparse(entry.payload)


def _make(ctx, entry: export.Entry, preparsed: tuple, parent: int, flags: int, detached: bool = False,
          filed: bool = True) -> int:
    """One key of the tree, with the import's ``flags`` (NO_EXPORT) and the uses it was exported with, so
    the copy does only what the original did."""
    flags |= entry.flags  # decode_tree let through only uses the store binds a key of this type to
    ktype = T.lookup(entry.type)
    value, quota = preparsed
    if detached:
        return ctx.store.create_detached(ctx.caller, ktype, entry.description, value, quota, parent, BUILDING_PERM,
                                         flags, filed=filed)
    return ctx.store.create_internal(ctx.caller, ktype, entry.description, value, quota, parent, BUILDING_PERM,
                                     flags)


@handles(Op.REKEY)
def _rekey(ctx, passphrase):
    if ctx.caller.uid != 0:
        raise E.EPERM("only root may rotate the master key")
    journal = ctx.store.journal
    if not isinstance(journal, SealedJournal):
        raise E.EOPNOTSUPP("this daemon keeps no sealed store")
    journal.rekey(passphrase)
    return ()
