"""Cryptographic building blocks for keyden (thin, pure wrappers over pyca ``cryptography``)."""

from keyden import errors as E

#: The context keyden's own key wrapping binds in (persist/export.py: HKDF info, OAEP label).  No KDF info
#: or otherinfo and no OAEP label a client gives may begin with it: with search permission alone on a
#: wrapping or recipient key, kdf or derive would rebuild an export's content key, and pkey_decrypt
#: unwrap it, and with it every key the export holds, logon and private keys included.
RESERVED_CONTEXT = b"keyden export"


def check_context(value: bytes, what: str) -> None:
    """EINVAL for a client's KDF info, otherinfo or OAEP label in keyden's own wrapping context."""
    if value.startswith(RESERVED_CONTEXT):
        raise E.EINVAL(f"{what} beginning {RESERVED_CONTEXT.decode()!r} is reserved for keyden's exports")
