"""Operation handlers: decoded request fields in, response fields out.

One table (``HANDLERS``, base.py) maps each opcode to a function of (context, *fields).  Handlers know
field order and nothing else of the wire; they translate between the wire's fields and the store and
crypto engines.  The descriptors a request brings are theirs to take: the TLS handlers hand a socket
to the TLS engine, the shared-memory ones map a memfd (``Region``); the connection's own socket they
never see.  Each module registers its handlers as it is imported: keyctl
(keys and keyrings, restrictions), pkey (asymmetric keys by serial), session_keys (agreement and key
transport into new keys), dataplane (ciphers, hashes, streams, shared memory), persist (persistent
keyrings, export and import, rekey), trust (X.509 path validation) and tls (TLS by
keyring).
"""

from __future__ import annotations

from keyden import errors as E
from keyden import protocol as W
from keyden.server.handlers import dataplane, keyctl, persist, pkey, session_keys, tls, trust  # noqa: F401 (registering)
from keyden.server.handlers.base import HANDLERS, MAX_PENDING_FDS, Context, DescriptorQueue

__all__ = ["Context", "DescriptorQueue", "HANDLERS", "MAX_PENDING_FDS", "dispatch"]


def dispatch(ctx: Context, op: int, args: tuple) -> tuple:
    handler = HANDLERS.get(op)  # keyed by Op, an IntEnum: a plain int finds its entry
    if handler is None:  # (unknown opcodes are ENOSYS already, from request_schema)
        raise E.EPROTO(f"opcode {op} ({W.Op(op).name}) is never a request")
    return handler(ctx, *args)  # the caller makes any change to persistent keyrings durable before replying
