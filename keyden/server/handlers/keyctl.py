"""keyctl's operations on keys and keyrings."""

from __future__ import annotations

import math
import struct

from keyden import errors as E
from keyden.protocol import CAPABILITY_BITS, KEY_RECORD, KEY_STATE_BITS, MOVE_EXCL, Op
from keyden.server.handlers.base import HANDLERS, handles, store_key_flags


@handles(Op.ADD)
def _add(ctx, type_name, description, payload, keyring, secret):
    return (ctx.store.add(ctx.caller, type_name, description, payload, keyring, secret or None),)


@handles(Op.ADD_FLAGS)
def _add_flags(ctx, type_name, description, payload, keyring, secret, flags):
    """add_key with flags the key keeps for good (no export; an asymmetric key's uses)."""
    return (ctx.store.add(ctx.caller, type_name, description, payload, keyring, secret or None,
                          flags=store_key_flags(flags)),)


@handles(Op.REQUEST)
def _request(ctx, type_name, description, dest):
    return (ctx.store.request(ctx.caller, type_name, description, dest),)


@handles(Op.UPDATE)
def _update(ctx, key, payload):
    ctx.store.update(ctx.caller, key, payload)
    return ()


def _simple(op: Op, method: str) -> None:
    def handler(ctx, *args):
        getattr(ctx.store, method)(ctx.caller, *args)
        return ()
    handler.__name__ = f"_{method}"
    HANDLERS[op] = handler


for _op, _method in ((Op.REVOKE, "revoke"), (Op.INVALIDATE, "invalidate"), (Op.CLEAR, "clear"),
                     (Op.LINK, "link"), (Op.UNLINK, "unlink"), (Op.CHOWN, "chown"), (Op.SETPERM, "setperm"),
                     (Op.SET_TIMEOUT, "set_timeout"), (Op.RESTRICT_KEYRING, "restrict_keyring")):
    _simple(_op, _method)


@handles(Op.MOVE)
def _move(ctx, key, src, dst, flags):
    if flags & ~MOVE_EXCL:
        raise E.EINVAL("unknown move flags")
    ctx.store.move(ctx.caller, key, src, dst, exclusive=bool(flags & MOVE_EXCL))
    return ()


@handles(Op.SEARCH)
def _search(ctx, keyring, type_name, description, dest):
    return (ctx.store.search(ctx.caller, keyring, type_name, description, dest),)


@handles(Op.READ)
def _read(ctx, key):
    data = ctx.store.read(ctx.caller, key)
    if isinstance(data, list):
        return (1, struct.pack(f"<{len(data)}i", *data))
    return (0, data)


@handles(Op.DESCRIBE)
def _describe(ctx, key):
    d = ctx.store.describe(ctx.caller, key)
    return (d.serial, d.type, d.uid, d.gid, d.perm, d.description)


KEYS_PAGE = 1024  # keys in one KEYS reply at most (fewer if the frame cap is reached first)
_KEYS_REPLY_FIXED = 8  # the reply's item count and its next field; each item adds its length (4) and itself


@handles(Op.KEYS)
def _keys(ctx, after):
    found, after = ctx.store.keys(ctx.caller, after, KEYS_PAGE)
    records, size = [], _KEYS_REPLY_FIXED
    for k in found:
        record = KEY_RECORD.encode((k.serial, k.type, k.uid, k.gid, k.perm, _state_bits(k), k.usage,
                                    math.floor(k.expiry), k.description, k.summary))
        size += 4 + len(record)
        if records and size > ctx.max_frame:  # the rest come in the next page
            after = found[len(records) - 1].serial
            break
        records.append(record)
    return records, after


def _state_bits(status) -> int:
    return sum(bit for name, bit in KEY_STATE_BITS if getattr(status, name))


@handles(Op.GET_KEYRING_ID)
def _get_keyring_id(ctx, key, create):
    return (ctx.store.resolve(ctx.caller, key, bool(create)),)


@handles(Op.JOIN_SESSION)
def _join_session(ctx, name):
    return ctx.store.join_session(ctx.caller, name or None)


@handles(Op.LEAVE_SESSION)
def _leave_session(ctx, token):
    ctx.store.leave_session(ctx.caller, token)
    return ()


@handles(Op.SESSIONS)
def _sessions(ctx):
    found = ctx.store.sessions(ctx.caller)
    return ([serial for serial, _ in found], [name.encode() for _, name in found])


@handles(Op.END_SESSION)
def _end_session(ctx, keyring):
    ctx.store.end_session(ctx.caller, keyring)
    return ()


@handles(Op.FIND)
def _find(ctx, type_name, description):
    return (ctx.store.find(ctx.caller, type_name, description),)


#: What keyden has of the kernel's capabilities: no big_key type, no namespaces, no notifications.
HAVE = frozenset({"capabilities", "persistent_keyrings", "dh_compute", "public_key", "key_invalidate",
                  "restrict_keyring", "move_key"})


@handles(Op.CAPABILITIES)
def _capabilities(ctx):
    return (" ".join(name for name, _byte, _bit in CAPABILITY_BITS if name in HAVE),)


@handles(Op.PING)
def _ping(ctx, data):
    return (data,)


@handles(Op.HELLO)
def _hello_again(ctx, *_fields):
    raise E.EPROTO("this connection said HELLO already: it is the first frame only")


@handles(Op.WHOAMI)
def _whoami(ctx):
    return (ctx.caller.cred.uid, ctx.caller.cred.gid, ctx.pid, ctx.store.session_serial(ctx.caller))


@handles(Op.QUOTA)
def _quota(ctx):
    return ctx.store.quota_usage(ctx.caller.uid)
