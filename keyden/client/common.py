"""What both clients share: naming keys, turning results into values."""

from __future__ import annotations

import errno
import math
import numbers
import os
import re
import struct

from keyden import errors as E
from keyden.core.views import Description, KeyStatus, PkeyQuery
from keyden.protocol import KEY_RECORD, KEY_STATE_BITS, Op
from keyden.protocol.transport import MAX_BUSY_POLL, client_socket_path, peer_credentials

SPECIAL = {"@t": -1, "@p": -2, "@s": -3, "@u": -4, "@us": -5, "@g": -6, "@a": -7}
SESSION_ENV = "KEYDEN_SESSION"
_LOOKS_SPECIAL = re.compile(r"@[a-z]{1,2}")
SERIAL_MIN, SERIAL_MAX = -(1 << 31), (1 << 31) - 1  # key IDs are 32-bit signed, as key_serial_t


def socket_path(path: str | None = None) -> str:
    if not path:
        return client_socket_path()
    try:
        return os.fspath(path)
    except TypeError:
        raise E.EINVAL(f"a socket path is a str or os.PathLike, not {type(path).__name__}") from None


HELLO_TIMEOUT = 30.0  # seconds for the HELLO's answer, which keyden gives at once (not for connecting)
HELLO_REPLY_MAX = 64 * 1024  # bytes of the HELLO's answer (tens, or an error message)
#: Bytes of any later reply: the daemon, whose uid check_daemon checked, bounds its replies by its own cap.
MAX_REPLY_FRAME = 1 << 31


def request_timeout(timeout) -> float | None:
    """None (wait as long as it takes) or a positive number of seconds: 0 would make the socket non-blocking,
    and its EAGAIN look like a lost connection."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < math.inf:
        raise E.EINVAL(f"timeout must be None or a positive number of seconds, not {timeout!r}")
    return float(timeout)


def busy_poll_seconds(microseconds) -> float:
    """A client's ``busy_poll`` (µs, as the kernel's SO_BUSY_POLL) in seconds: 0 (never) or up to 10 ms."""
    if (isinstance(microseconds, bool) or not isinstance(microseconds, numbers.Integral)
            or not 0 <= microseconds <= MAX_BUSY_POLL):
        raise E.EINVAL(f"busy_poll must be a whole number of microseconds from 0 to {MAX_BUSY_POLL}, "
                       f"not {microseconds!r}")
    return int(microseconds) / 1e6


def no_hello(path: str, waited: float) -> E.KeydenError:
    """A server that accepted and did not answer HELLO in time: whatever it is, it is no keyden."""
    return E.ETIMEDOUT(f"no answer within {waited:g} s from {path} (is it keyden?)")


def not_keyden(path: str, what: str, error: type[E.KeydenError] = E.EPROTO) -> E.KeydenError:
    """A server that answered HELLO with what keyden never sends (a frame over the cap, or nothing at all
    before it closed): whatever it is, it may be no keyden."""
    return error(f"{path} {what} (is it keyden?)")


def connect_failed(path: str, exc: OSError) -> E.KeydenError:
    """A socket we may not use is EACCES (as keyctl would say); no daemon there, or none answering, ECONNRESET."""
    error = (E.EACCES if exc.errno in (errno.EACCES, errno.EPERM) else E.ECONNRESET)(
        f"cannot connect to keyden at {path}: {exc.strerror or exc}")  # (a path too long has no strerror)
    error.before_hello = True
    return error


DAEMON_UID_ENV = "KEYDEN_DAEMON_UID"


def check_daemon(sock, path: str) -> None:
    """Talk only to a daemon run by root or by ourselves (or the uid in $KEYDEN_DAEMON_UID): whoever binds
    the socket path first in a directory others may write to (/tmp) would otherwise receive our keys."""
    _pid, uid, _gid = peer_credentials(sock)
    trusted = os.environ.get(DAEMON_UID_ENV, "")
    if uid in (0, os.geteuid()) or trusted.isdigit() and uid == int(trusted):
        return
    if trusted and not trusted.isdigit():  # (a name was ignored, and the message asked for what was set)
        error = E.EINVAL(f"{DAEMON_UID_ENV} is a uid, a number, not {trusted[:64]!r} (the socket {path} is "
                         f"served by uid {uid})")
        error.before_hello = True
        raise error
    error = E.EACCES(f"the socket {path} is served by uid {uid}, neither root nor you: not talking to it "
                     f"(if that uid runs your keyden, set {DAEMON_UID_ENV}={uid})")
    error.before_hello = True
    raise error


def session_token(session: str | None) -> str:
    return session if session is not None else os.environ.get(SESSION_ENV, "")


def key_id(ref) -> int | tuple[str, str]:
    """A serial, a '@s'-style special name, or '%type:desc' (returned as (type, desc) to be found).

    A reference that is none of these is EINVAL naming only its type: what was passed by mistake
    (a key's bytes where its serial belongs, a password) must not end up in an error message or log.
    """
    if hasattr(ref, "serial"):
        ref = ref.serial
    if isinstance(ref, bool):
        raise E.EINVAL("a key reference cannot be a bool")
    if isinstance(ref, int):
        if not SERIAL_MIN <= ref <= SERIAL_MAX:
            raise E.EINVAL("key serials are 32-bit signed integers; this one is out of range")
        return ref
    if isinstance(ref, str):
        if ref in SPECIAL:
            return SPECIAL[ref]
        if ref.startswith("%"):
            type_name, colon, desc = ref[1:].partition(":")
            if not colon:
                raise E.EINVAL("bad key reference: use %type:description")
            return (type_name or "keyring", desc)
        try:
            return key_id(int(ref, 0))
        except ValueError:
            from keyden.crypto.symmetric import ALGORITHMS

            if ref in ALGORITHMS:  # (a name of ours, so safe to echo) the data plane's (alg, key) swapped
                raise E.EINVAL(f"bad key reference {ref!r}: an algorithm's name where a key belongs (the "
                               "data plane's calls take (alg, key); aead() and hmac() take (key, alg))") from None
            hint = f" {ref!r}" if _LOOKS_SPECIAL.fullmatch(ref) else ""  # a mistyped special name, nothing longer
            raise E.EINVAL(f"bad key reference{hint}: a string must be a serial, one of "
                           f"{', '.join(SPECIAL)} or %type:description") from None
    raise E.EINVAL(f"bad key reference: a {type(ref).__name__}; use a serial, a key handle, one of "
                   f"{', '.join(SPECIAL)} or %type:description")


#: describe's result and pkey_query's are the daemon's own value types, with keyctl's output formats.
KeyDescription = Description


def key_status(record: bytes) -> KeyStatus:
    """One KEYS record as a KeyStatus."""
    serial, type_name, uid, gid, perm, state, usage, expiry, description, summary = KEY_RECORD.decode(record)
    flags = {name: bool(state & bit) for name, bit in KEY_STATE_BITS}
    return KeyStatus(serial, type_name, uid, gid, perm, usage=usage, expiry=float(expiry), description=description,
                     summary=summary, **flags)


def next_page(after: int, following: int) -> int:
    """A KEYS page's cursor, checked: it only ever moves on (a daemon that says otherwise is broken)."""
    if following and following <= after:
        raise E.EPROTO(f"the daemon's KEYS cursor went from {after} to {following}")
    return following


def read_result(is_keyring: int, data: bytes) -> bytes | list[int]:
    if is_keyring:
        return list(struct.unpack(f"<{len(data) // 4}i", data))
    return data


#: ops whose single response field is the method's value
_SINGLE = {Op.ADD, Op.REQUEST, Op.SEARCH, Op.GET_KEYRING_ID, Op.FIND, Op.GENKEY, Op.PKEY_ENCRYPT, Op.PKEY_DECRYPT,
           Op.PKEY_SIGN, Op.PING, Op.DERIVE, Op.KDF, Op.DH_COMPUTE, Op.DH_COMPUTE_KDF, Op.PKEY_DECRYPT_INTO, Op.CIPHER,
           Op.DIGEST, Op.MAC, Op.STREAM_UPDATE, Op.STREAM_COPY, Op.SHM_ATTACH, Op.GET_PERSISTENT, Op.EXPORT,
           Op.IMPORT, Op.ADD_FLAGS, Op.GENKEY_FLAGS, Op.KEY_ALGORITHM}


def shape(op: Op, values: tuple):
    """Turn an op's response fields into what the method returns."""
    if op in _SINGLE:
        return values[0]
    if op is Op.READ:
        return read_result(*values)
    if op is Op.DESCRIBE:
        return KeyDescription(*values)
    if op is Op.PKEY_QUERY:
        return PkeyQuery(*values)
    if op is Op.CAPABILITIES:
        return values[0].split()
    if op is Op.SESSIONS:
        return [(serial, name.decode()) for serial, name in zip(*values)]
    if op is Op.KEYS:
        return [key_status(record) for record in values[0]], values[1]
    if op is Op.X509_VERIFY:
        return [(serial, subject.decode()) for serial, subject in zip(*values)]
    if not values:
        return None
    return values
