"""Operation handlers: decoded request fields in, response fields out.

One table maps each opcode to a function of (context, *fields).  Handlers
hold no protocol knowledge beyond field order and no socket knowledge at
all; they translate between the wire's fields and the store's methods.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Callable

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core.store import CAPABILITIES, Caller, KeyStore
from keyden.protocol import MOVE_EXCL, Op


@dataclass
class Context:
    """What a handler may know about the request: the store, and who is calling."""

    store: KeyStore
    caller: Caller
    pid: int


Handler = Callable[..., tuple]
HANDLERS: dict[Op, Handler] = {}


def handles(op: Op):
    def register(fn: Handler) -> Handler:
        HANDLERS[op] = fn
        return fn
    return register


@handles(Op.ADD)
def _add(ctx: Context, type_name, description, payload, keyring, secret):
    return (ctx.store.add(ctx.caller, type_name, description, payload, keyring, secret or None),)


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


@handles(Op.FIND)
def _find(ctx, type_name, description):
    return (ctx.store.find(ctx.caller, type_name, description),)


@handles(Op.CAPABILITIES)
def _capabilities(ctx):
    return (" ".join(name for name, have in CAPABILITIES.items() if have),)


@handles(Op.PKEY_QUERY)
def _pkey_query(ctx, key, info):
    q = ctx.store.asymmetric(ctx.caller, key).query(info)
    return (q.supported_ops, q.key_size, q.max_data_size, q.max_sig_size, q.max_enc_size, q.max_dec_size)


@handles(Op.PKEY_ENCRYPT)
def _pkey_encrypt(ctx, key, info, data):
    return (ctx.store.asymmetric(ctx.caller, key).encrypt(info, data),)


@handles(Op.PKEY_DECRYPT)
def _pkey_decrypt(ctx, key, info, data):
    return (ctx.store.asymmetric(ctx.caller, key).decrypt(info, data),)


@handles(Op.PKEY_SIGN)
def _pkey_sign(ctx, key, info, data):
    return (ctx.store.asymmetric(ctx.caller, key).sign(info, data),)


@handles(Op.PKEY_VERIFY)
def _pkey_verify(ctx, key, info, data, signature):
    ctx.store.asymmetric(ctx.caller, key).verify(info, data, signature)
    return ()


@handles(Op.GENKEY)
def _genkey(ctx, spec, description, keyring):
    from keyden.crypto import asymmetric

    parsed = asymmetric.generate(spec)
    ktype = T.REGISTRY["asymmetric"]
    return (ctx.store.create_internal(ctx.caller, ktype, description, parsed, parsed.quota_size, keyring),)


@handles(Op.PUBLIC_KEY)
def _public_key(ctx, key):
    parsed = ctx.store.asymmetric(ctx.caller, key)
    cert = parsed.certificate
    from cryptography.hazmat.primitives.serialization import Encoding

    return (parsed.spki_der, cert.public_bytes(Encoding.DER) if cert is not None else b"")


@handles(Op.PING)
def _ping(ctx, data):
    return (data,)


@handles(Op.WHOAMI)
def _whoami(ctx):
    session = ctx.store.resolve(ctx.caller, -3)
    return (ctx.caller.cred.uid, ctx.caller.cred.gid, ctx.pid, session)


@handles(Op.QUOTA)
def _quota(ctx):
    return ctx.store.quota_usage(ctx.caller.uid)


def dispatch(ctx: Context, op: int, args: tuple) -> tuple:
    try:
        handler = HANDLERS[Op(op)]
    except (ValueError, KeyError):
        raise E.ENOSYS(f"unknown opcode {op}") from None
    return handler(ctx, *args)
