"""Asymmetric keys by serial: KEYCTL_PKEY_*, keys born inside keyden, public halves."""

from __future__ import annotations

from cryptography.hazmat.primitives.serialization import Encoding

from keyden.core import keytypes as T
from keyden.core import flags as F
from keyden.crypto import asymmetric, symmetric
from keyden.protocol import Op
from keyden.server.handlers.base import handles, store_key_flags


def _key(ctx, key, info: str, op: int) -> asymmetric.ParsedKey:
    """The key for a KEYCTL_PKEY_* ``op`` (OP_*), its info string's grammar checked first, as the kernel's
    keyctl_pkey_params_get does: a malformed string is EINVAL whatever the key.  The store refuses a key
    bound to other uses than the op's."""
    asymmetric.check_info(info)
    return ctx.store.asymmetric(ctx.caller, key, asymmetric.USE_OF_OP[op])


@handles(Op.PKEY_QUERY)
def _pkey_query(ctx, key, info):
    asymmetric.check_info(info)
    parsed, uses = ctx.store.asymmetric_uses(ctx.caller, key)
    q = parsed.query(info, uses)
    return (q.supported_ops, q.key_size, q.max_data_size, q.max_sig_size, q.max_enc_size, q.max_dec_size)


@handles(Op.PKEY_ENCRYPT)
def _pkey_encrypt(ctx, key, info, data):
    return (_key(ctx, key, info, asymmetric.OP_ENCRYPT).encrypt(info, data),)


@handles(Op.PKEY_DECRYPT)
def _pkey_decrypt(ctx, key, info, data):
    return (_key(ctx, key, info, asymmetric.OP_DECRYPT).decrypt(info, data),)


@handles(Op.PKEY_SIGN)
def _pkey_sign(ctx, key, info, data):
    return (_key(ctx, key, info, asymmetric.OP_SIGN).sign(info, data),)


@handles(Op.PKEY_VERIFY)
def _pkey_verify(ctx, key, info, data, signature):
    _key(ctx, key, info, asymmetric.OP_VERIFY).verify(info, data, signature)
    return ()




@handles(Op.GENKEY)
@handles(Op.GENKEY_FLAGS)
def _genkey(ctx, spec, description, keyring, flags=0):
    """A key born inside keyden: asymmetric pairs, or random logon keys for ciphers and MACs."""
    flags = store_key_flags(flags)
    if spec.startswith(symmetric.KEY_SPEC_PREFIXES):
        made = symmetric.generate_key(spec)
        logon = T.REGISTRY["logon"]
        value, quota = logon.preparse(made.material)
        # It keys its one use; a unique default name, so a second unnamed key is no namesake of the first.
        return (ctx.store.create_internal(ctx.caller, logon, description, value, quota, keyring,
                                          flags=flags | F.FOR_USE[made.use], unique_prefix=f"keyden:{made.hint}-"),)
    # The binding is checked before the key is made: an RSA-4096 key takes a second, for nothing if refused.
    asymmetric.check_uses(asymmetric.algorithm_of_spec(spec), F.uses_of(flags & F.ASYMMETRIC_USE_FLAGS))
    parsed = asymmetric.generate(spec)
    ktype = T.REGISTRY["asymmetric"]
    return (ctx.store.create_internal(ctx.caller, ktype, description, parsed, T.asymmetric_quota(), keyring,
                                      flags=flags),)


@handles(Op.PUBLIC_KEY)
def _public_key(ctx, key):
    parsed = ctx.store.asymmetric(ctx.caller, key, None)  # public data: no use of the key's
    cert = parsed.certificate
    return (parsed.spki_der, cert.public_bytes(Encoding.DER) if cert is not None else b"")
