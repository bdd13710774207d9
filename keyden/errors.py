"""One exception hierarchy for keyden, one class per kernel errno.

The daemon raises these; the wire carries only the numeric code (the Linux
errno value, so codes are explicit and never reused) plus a human message.
The client turns the code back into the same class.  Anything that is not a
``KeydenError`` is an internal fault: it becomes ``EIO`` on the wire with a
generic message, and its details stay in the server log.

Messages must never contain key material.
"""

from __future__ import annotations

import errno as _errno
import os as _os

__all__ = ["KeydenError", "StartupError", "error_for_code", "error_class", "ERRORS"]


class StartupError(Exception):
    """The daemon must not start (a configuration, state directory, master key or socket it cannot use):
    never on the wire.  The message says why, for a human, and never holds key material."""


class KeydenError(Exception):
    """Base class: ``code`` is the Linux errno value, ``name`` its symbol."""

    code: int = _errno.EIO
    name: str = "EIO"
    #: Raised by a client before its HELLO reached a daemon (the socket could not be used, or the daemon
    #: there is not one to trust): no session token was judged.
    before_hello: bool = False

    def __init__(self, message: str | None = None):
        self.message = message or self.strerror()
        super().__init__(self.message)

    @classmethod
    def strerror(cls) -> str:
        return _os.strerror(cls.code)

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def __reduce__(self):  # pickle and copy keep what was set on the instance (before_hello) too
        return (type(self), (self.message,), self.__dict__ or None)


def _define(name: str, doc: str) -> type[KeydenError]:
    code = getattr(_errno, name)
    cls = type(name, (KeydenError,), {"code": code, "name": name, "__doc__": doc})
    cls.__module__ = __name__
    return cls


# The table: (symbol, when keyden raises it).  Kernel meaning where one exists.
_TABLE = [
    ("EPERM", "Operation not permitted (e.g. a restricted keyring, a '.' type)."),
    ("ENOENT", "Not linked / no such entry."),
    ("EIO", "Internal failure; details are only in the server log."),
    ("E2BIG", "Argument list or data too long."),
    ("EBADF", "Bad file descriptor passed."),
    ("EAGAIN", "Resource temporarily unavailable (limits under load)."),
    ("ENOMEM", "Out of memory."),
    ("EACCES", "Permission denied by the key's permission mask."),
    ("EBUSY", "Resource busy."),
    ("EEXIST", "Already exists."),
    ("ENODEV", "Unknown key type."),
    ("ENOTDIR", "Not a keyring."),
    ("EINVAL", "Invalid argument."),
    ("ENFILE", "Keyring full."),
    ("EMFILE", "Too many connections or open streams."),
    ("ENOSPC", "No space left."),
    ("EDEADLK", "Link would create a cycle."),
    ("ENAMETOOLONG", "Name too long."),
    ("ENOSYS", "Operation not implemented."),
    ("ELOOP", "Keyrings nested too deeply."),
    ("ENODATA", "No data available."),
    ("EPROTO", "Protocol error (malformed frame or handshake)."),
    ("EBADMSG", "Bad message: unparseable key data, or AEAD authentication failure."),
    ("EOVERFLOW", "Value too large."),
    ("EMSGSIZE", "Frame too large."),
    ("ENOPROTOOPT", "Key type not usable for this algorithm."),
    ("EPROTONOSUPPORT", "Protocol version not supported."),
    ("EOPNOTSUPP", "Operation not supported by this key type."),
    ("ECONNRESET", "Connection reset."),
    ("ETIMEDOUT", "Timed out."),
    ("ECANCELED", "Operation canceled."),
    ("EDQUOT", "Key quota exceeded."),
    ("ENOKEY", "Required key not available."),
    ("EKEYEXPIRED", "Key has expired."),
    ("EKEYREVOKED", "Key has been revoked."),
    ("EKEYREJECTED", "Key was rejected (blacklisted or negatively instantiated)."),
]

ERRORS: dict[int, type[KeydenError]] = {}
for _name, _doc in _TABLE:
    _cls = _define(_name, _doc)
    globals()[_name] = _cls
    ERRORS[_cls.code] = _cls
    __all__.append(_name)
del _name, _doc, _cls

EPERM: type[KeydenError]
ENOENT: type[KeydenError]
EIO: type[KeydenError]
E2BIG: type[KeydenError]
EBADF: type[KeydenError]
EAGAIN: type[KeydenError]
ENOMEM: type[KeydenError]
EACCES: type[KeydenError]
EBUSY: type[KeydenError]
EEXIST: type[KeydenError]
ENODEV: type[KeydenError]
ENOTDIR: type[KeydenError]
EINVAL: type[KeydenError]
ENFILE: type[KeydenError]
EMFILE: type[KeydenError]
ENOSPC: type[KeydenError]
EDEADLK: type[KeydenError]
ENAMETOOLONG: type[KeydenError]
ENOSYS: type[KeydenError]
ELOOP: type[KeydenError]
ENODATA: type[KeydenError]
EPROTO: type[KeydenError]
EBADMSG: type[KeydenError]
EOVERFLOW: type[KeydenError]
EMSGSIZE: type[KeydenError]
ENOPROTOOPT: type[KeydenError]
EPROTONOSUPPORT: type[KeydenError]
EOPNOTSUPP: type[KeydenError]
ECONNRESET: type[KeydenError]
ETIMEDOUT: type[KeydenError]
ECANCELED: type[KeydenError]
EDQUOT: type[KeydenError]
ENOKEY: type[KeydenError]
EKEYEXPIRED: type[KeydenError]
EKEYREVOKED: type[KeydenError]
EKEYREJECTED: type[KeydenError]


def error_class(code: int) -> type[KeydenError]:
    """Client side: code -> class.  Unknown codes map to the generic EIO."""
    return ERRORS.get(code, ERRORS[_errno.EIO])


def error_for_code(code: int, message: str = "") -> KeydenError:
    return error_class(code)(message or None)
