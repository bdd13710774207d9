"""Trust: X.509 path validation against trust keyrings (restrictions and the blacklist live in the store)."""

from __future__ import annotations

from keyden.core import trust
from keyden.protocol import Op
from keyden.server.handlers.base import handles


@handles(Op.X509_VERIFY)
def _x509_verify(ctx, cert, trust_keyring, chain_keyring, host, purpose, at):
    chain = trust.verify_chain(ctx.store, ctx.caller, cert, trust_keyring, chain_keyring, host, purpose, at)
    return ([serial for serial, _ in chain], [subject.encode() for _, subject in chain])
