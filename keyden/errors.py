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

    @property
    def errno(self) -> int:
        """The errno value, under OSError's name for it, for code that asks any error for one."""
        return self.code

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"

    def __reduce__(self):  # pickle and copy keep what was set on the instance (before_hello) too
        return (type(self), (self.message,), self.__dict__ or None)


# One class per errno keyden raises, with when it does (the kernel's meaning where one exists).

class EPERM(KeydenError):
    """Operation not permitted (e.g. a restricted keyring, a '.' type)."""

    code, name = _errno.EPERM, "EPERM"


class ENOENT(KeydenError):
    """Not linked / no such entry."""

    code, name = _errno.ENOENT, "ENOENT"


class EIO(KeydenError):
    """Internal failure; details are only in the server log."""

    code, name = _errno.EIO, "EIO"


class E2BIG(KeydenError):
    """Argument list or data too long."""

    code, name = _errno.E2BIG, "E2BIG"


class EBADF(KeydenError):
    """Bad file descriptor passed."""

    code, name = _errno.EBADF, "EBADF"


class EAGAIN(KeydenError):
    """Resource temporarily unavailable (limits under load)."""

    code, name = _errno.EAGAIN, "EAGAIN"


class ENOMEM(KeydenError):
    """Out of memory."""

    code, name = _errno.ENOMEM, "ENOMEM"


class EACCES(KeydenError):
    """Permission denied by the key's permission mask."""

    code, name = _errno.EACCES, "EACCES"


class EBUSY(KeydenError):
    """Resource busy."""

    code, name = _errno.EBUSY, "EBUSY"


class EEXIST(KeydenError):
    """Already exists."""

    code, name = _errno.EEXIST, "EEXIST"


class ENODEV(KeydenError):
    """Unknown key type."""

    code, name = _errno.ENODEV, "ENODEV"


class ENOTDIR(KeydenError):
    """Not a keyring."""

    code, name = _errno.ENOTDIR, "ENOTDIR"


class EINVAL(KeydenError):
    """Invalid argument."""

    code, name = _errno.EINVAL, "EINVAL"


class ENFILE(KeydenError):
    """Keyring full."""

    code, name = _errno.ENFILE, "ENFILE"


class EMFILE(KeydenError):
    """Too many connections or open streams."""

    code, name = _errno.EMFILE, "EMFILE"


class ENOSPC(KeydenError):
    """No space left."""

    code, name = _errno.ENOSPC, "ENOSPC"


class EDEADLK(KeydenError):
    """Link would create a cycle."""

    code, name = _errno.EDEADLK, "EDEADLK"


class ENAMETOOLONG(KeydenError):
    """Name too long."""

    code, name = _errno.ENAMETOOLONG, "ENAMETOOLONG"


class ENOSYS(KeydenError):
    """Operation not implemented."""

    code, name = _errno.ENOSYS, "ENOSYS"


class ELOOP(KeydenError):
    """Keyrings nested too deeply."""

    code, name = _errno.ELOOP, "ELOOP"


class ENODATA(KeydenError):
    """No data available."""

    code, name = _errno.ENODATA, "ENODATA"


class EPROTO(KeydenError):
    """Protocol error (malformed frame or handshake)."""

    code, name = _errno.EPROTO, "EPROTO"


class EBADMSG(KeydenError):
    """Bad message: unparseable key data, or AEAD authentication failure."""

    code, name = _errno.EBADMSG, "EBADMSG"


class EOVERFLOW(KeydenError):
    """Value too large."""

    code, name = _errno.EOVERFLOW, "EOVERFLOW"


class EMSGSIZE(KeydenError):
    """Frame too large."""

    code, name = _errno.EMSGSIZE, "EMSGSIZE"


class ENOPROTOOPT(KeydenError):
    """Key type not usable for this algorithm."""

    code, name = _errno.ENOPROTOOPT, "ENOPROTOOPT"


class EPROTONOSUPPORT(KeydenError):
    """Protocol version not supported."""

    code, name = _errno.EPROTONOSUPPORT, "EPROTONOSUPPORT"


class EOPNOTSUPP(KeydenError):
    """Operation not supported by this key type."""

    code, name = _errno.EOPNOTSUPP, "EOPNOTSUPP"


class ECONNRESET(KeydenError):
    """Connection reset."""

    code, name = _errno.ECONNRESET, "ECONNRESET"


class ETIMEDOUT(KeydenError):
    """Timed out."""

    code, name = _errno.ETIMEDOUT, "ETIMEDOUT"


class ECANCELED(KeydenError):
    """Operation canceled."""

    code, name = _errno.ECANCELED, "ECANCELED"


class EDQUOT(KeydenError):
    """Key quota exceeded."""

    code, name = _errno.EDQUOT, "EDQUOT"


class ENOKEY(KeydenError):
    """Required key not available."""

    code, name = _errno.ENOKEY, "ENOKEY"


class EKEYEXPIRED(KeydenError):
    """Key has expired."""

    code, name = _errno.EKEYEXPIRED, "EKEYEXPIRED"


class EKEYREVOKED(KeydenError):
    """Key has been revoked."""

    code, name = _errno.EKEYREVOKED, "EKEYREVOKED"


class EKEYREJECTED(KeydenError):
    """Key was rejected (blacklisted or negatively instantiated)."""

    code, name = _errno.EKEYREJECTED, "EKEYREJECTED"


#: code -> class, both ways in one place: the server sends ``type(exc).code``; a client makes ``ERRORS[code]``.
ERRORS: dict[int, type[KeydenError]] = {cls.code: cls for cls in KeydenError.__subclasses__()}
__all__ += [cls.__name__ for cls in ERRORS.values()]


def error_class(code: int) -> type[KeydenError]:
    """Client side: code -> class.  Unknown codes map to the generic EIO."""
    return ERRORS.get(code, ERRORS[_errno.EIO])


def error_for_code(code: int, message: str = "") -> KeydenError:
    return error_class(code)(message or None)
