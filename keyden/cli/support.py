"""What every command shares: the daemon connection, keyctl's argument parsing, its error reporting.

keyctl(1) reports failures in three ways, and scripts depend on the exit
codes: a failed operation prints ``function: strerror`` and exits 1, a
malformed command line exits 2 (after the usage, or after a specific
message such as ``Unparsable key``), and a few commands exit 3.  The
exceptions here carry those outcomes up to ``main``, which prints and exits.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import stat
import sys
import tempfile
import threading
from typing import Any, Callable, Iterator

from keyden import errors as E
from keyden import protocol as W
from keyden.client.common import SESSION_ENV, SPECIAL, session_token

STDIN_LIMIT = 1024 * 1024  # keyctl's grab_stdin buffer
INFO_LIMIT = 4096  # keyctl's pkey info buffer, NUL included


class Exit(Exception):
    """Stop with ``code``, printing ``message`` (if any) on stderr."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message


class Usage(Exception):
    """The command line does not fit the command: print why (if a reason is given), then its usage; exit 2."""


class NoDaemon(Exception):
    """The daemon cannot be reached at all."""


#: Options whose empty value is refused (exit 2), never taken for "not given": what each takes.  (An empty
#: --host verified a certificate for no name at all; an empty --peer-file fell back on the peer argument.)
NOT_EMPTY = {"-o": "a file name", "--password-file": "a file name", "--peer-file": "a file name",
             "--passphrase-file": "a file name", "--to-public-key": "a file name", "--host": "a host name"}


def options(args: list[str], flags: tuple[str, ...] = (), valued: tuple[str, ...] = (), *,
            anywhere: bool = False) -> tuple[dict[str, str | bool], list[str]]:
    """The options (flags: True; valued: '--name value' or '--name=value') and the other words, in order.

    keyctl's commands take options leading only, and each once, as keyctl takes '-x' (and so do the options
    keyden adds to them): later words are data, even if they start with '-'.  keyden's own commands take them
    ``anywhere``, up to a '--'.  An option of NOT_EMPTY's given an empty value is exit 2.
    """
    found: dict[str, str | bool] = {}
    words: list[str] = []
    at = 0
    while at < len(args):
        word = args[at]
        name, eq, value = word.partition("=")
        if anywhere and word == "--":
            words += args[at + 1:]
            break
        if not anywhere and (word in found or name in found):  # keyctl takes '-x' once: a second is data
            words += args[at:]
            break
        if word in flags:
            found[word] = True
        elif name in valued and eq:
            found[name] = value
        elif word in valued:
            if at + 1 == len(args):
                raise Usage()
            at += 1
            found[word] = args[at]
        elif anywhere:
            words.append(word)
        else:
            words += args[at:]
            break
        at += 1
    for name, takes in NOT_EMPTY.items():
        if found.get(name) == "":
            raise Exit(2, f"{name} takes {takes}, not an empty string")
    return found, words


def arguments(args: list[str]) -> list[str]:
    """The words of one of keyden's own commands that takes no options: a '--' among them is dropped, as
    ``options`` drops it for those that take some."""
    return options(args, anywhere=True)[1]


def expect(words: list[str], *counts: int) -> None:
    """Usage unless there are as many words as one of ``counts``."""
    if len(words) not in counts:
        raise Usage()


def failure(function: str, exc: BaseException, reason: str = "") -> Exit:
    """keyctl's perror(function) and exit(1), for a keyden or an OS error; keyden's own commands add
    their ``reason`` after it, as ``call`` adds the daemon's."""
    code = getattr(exc, "code", None) if isinstance(exc, E.KeydenError) else getattr(exc, "errno", None)
    text = os.strerror(code) if code else str(exc)
    return Exit(1, f"{function}: {text}" + (f" ({reason})" if reason else ""))


#: keyutils library calls: their failures print exactly as keyctl's, which scripts may match
_KEYCTL_FUNCTIONS = ("keyctl_", "add_key", "request_key")


def call(function: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run one client operation; a daemon refusal becomes keyctl's ``function: strerror``, and for
    keyden's own commands (no keyctl output to match) the daemon's reason after it."""
    try:
        return method(*args, **kwargs)
    except E.KeydenError as exc:
        error = failure(function, exc)
        if exc.message != exc.strerror() and not function.startswith(_KEYCTL_FUNCTIONS):
            error.message += f" ({exc.message})"
        raise error from None


def strtoul(text: str, base: int = 0) -> int | None:
    """C's strtoul with the whole string consumed: None where keyctl says 'Unparsable'.

    Kept faithful (leading blanks, a sign, 0x and leading-0 octal for base 0,
    a negative value wrapping modulo 2**64) so scripts written for keyctl
    parse the same way; callers narrow the result to the C type they need.
    """
    if not text:
        return 0  # strtoul("") converts nothing and stops at the NUL: keyctl takes it as 0
    s = text.lstrip(" \t\n\r\f\v")
    negative = s[:1] == "-"
    if s[:1] in ("+", "-"):
        s = s[1:]
    if base in (0, 16) and s[:2].lower() == "0x" and len(s) > 2:
        s, base = s[2:], 16
    elif base == 0:
        base = 8 if s[:1] == "0" and len(s) > 1 else 10
    digits = "0123456789abcdef"[:base]
    if not s or any(ch.lower() not in digits for ch in s):
        return None
    # strtoul saturates at ULONG_MAX; 65 significant digits are past it in any base (and int() refuses
    # over 4300 decimal ones)
    value = int(s, base) if len(s.lstrip("0")) <= 64 else 2**64
    if value >= 2**64:
        return 2**64 - 1  # ULONG_MAX, whatever the sign (glibc's ERANGE)
    return (-value) % 2**64 if negative else value


def int32(value: int) -> int:
    """Narrow to key_serial_t (a signed 32-bit int), as a C cast does."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value & 0x80000000 else value


def id32(value: int) -> int:
    """Narrow to uid_t/gid_t; (uid_t)-1 means 'leave unchanged', which keyden spells -1."""
    value &= 0xFFFFFFFF
    return -1 if value == 0xFFFFFFFF else value


def number(text: str, what: str, base: int = 0) -> int:
    """A numeric argument, or keyctl's 'Unparsable <what>' and exit 2."""
    value = strtoul(text, base)
    if value is None:
        raise Exit(2, f"Unparsable {what}: '{text}'")
    return value


def hexdump(data: bytes) -> str:
    """keyctl read's layout: 4-byte groups, 32 bytes a line."""
    lines = []
    for row in range(0, len(data), 32):
        chunk = data[row:row + 32]
        lines.append(" ".join(chunk[i:i + 4].hex() for i in range(0, len(chunk), 4)))
    return "\n".join(lines)


def hex_to_bytes(data: bytes) -> bytes:
    """keyctl -x (hex2bin): hex pairs, whitespace skipped between pairs but not inside one."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        if data[i] in _SPACE:
            i += 1
            continue
        pair = data[i:i + 2]
        if len(pair) < 2:
            raise Exit(1, "Short hex doublet")
        if not (pair[0] in _HEX and pair[1] in _HEX):
            raise Exit(1, "Bad hex doublet")
        out.append(int(pair, 16))
        i += 2
    return bytes(out)


_SPACE = frozenset(b" \t\n\r\f\v")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def read_stdin(limit: int = STDIN_LIMIT) -> bytes:
    """The whole of stdin, capped like keyctl's grab_stdin (an export passes a larger limit)."""
    data = read_up_to(std_fd("stdin"), limit + 1)
    if len(data) > limit:
        raise Exit(1, "Too much data read on stdin")
    return data


# --------------------------------------------------------------------- raw I/O
# Straight on the descriptors: Python's file objects take a descriptor left non-blocking by whoever handed it
# to us (EAGAIN) for the end of the input, and unbuffered (PYTHONUNBUFFERED=1) drop the rest of a short write.

CHUNK = 1 << 20  # bytes per read of a stream's input (one STREAM_UPDATE each)


def std_fd(name: str) -> int:
    """The descriptor behind sys.stdin or sys.stdout.  One that was closed when we started is EBADF, as
    keyctl says (main put a failing stream there): its number may be our connection's socket by now."""
    try:
        return getattr(sys, name).fileno()
    except (OSError, ValueError):
        raise failure(name, OSError(errno.EBADF, os.strerror(errno.EBADF))) from None


def read_up_to(fd: int, size: int, name: str = "stdin") -> bytes:
    """Up to ``size`` bytes, fewer only at the end of the input; a pipe empty for now is waited on."""
    pieces, got = [], 0
    while got < size:
        try:
            piece = os.read(fd, min(size - got, CHUNK))
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        except OSError as exc:
            raise failure(name, exc) from None
        if not piece:
            break
        pieces.append(piece)
        got += len(piece)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def stdin_chunks() -> Iterator[bytes]:
    """stdin in CHUNK-sized pieces, until its end."""
    fd = std_fd("stdin")
    while chunk := read_up_to(fd, CHUNK):
        yield chunk


def write_all(fd: int, data, name: str = "stdout") -> None:
    """Every byte, or an error naming ``name``: a short write goes on, a full pipe is waited on.  A reader
    gone is BrokenPipeError, which main turns into a quiet status 141 (keyctl dies of SIGPIPE)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [])
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise failure(name, exc) from None


class Terminated(BaseException):
    """SIGTERM or SIGHUP while an -o file is being written, raised where the command is, so it unwinds as
    for Ctrl-C and the temporary copy of unauthenticated plaintext goes (main exits 128 + the signal)."""


def _terminated(signum, _frame):
    raise Terminated(signum)


#: signals whose default ends the process: while an -o file is written they unwind instead, so its
#: temporary copy (unauthenticated plaintext, for a decryption) goes with them (SIGQUIT's core dump too)
_TERMINATING = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


class Output:
    """Where results go: stdout as they come, or a file that appears only once everything succeeded.

    A regular file (or a new one) is written under a temporary name in its
    directory (mode 0600), synced, and renamed over it at the end, so a failure
    (a tag that does not check out, a full disk, Ctrl-C, SIGTERM) leaves
    neither plaintext nor a truncated file behind, and the old file stays as it
    was.  Which file that is, the kernel says: the path is opened (O_PATH) and
    the file found named by /proc, so a symbolic link is followed only as the
    kernel follows it, protected_symlinks and all (resolving it here would let
    another user's link in a shared directory name the file we replace), and
    ``dir/link/../f`` is where the kernel puts it.  Anything else is written
    through, with stdout's rules (``direct``): a FIFO or device is opened;
    ``/dev/stdout``, ``/dev/fd/N`` and ``/proc/self/fd/N`` are our own
    descriptors, used as they are (reopened, an appended log would be cut).
    """

    def __init__(self, path: str | None):
        self.path = path
        self.temp: str | None = None
        self._own_fd = False
        self._created: str | None = None  # an empty file made through a dangling link: gone again on failure
        self._signals: list = []
        if path == "":  # not "stdout", silently: a plaintext meant for a file must not reach a terminal
            raise Exit(2, "-o takes a file name, not an empty string")
        if path is None or (fd := _descriptor_named(path)) == STDOUT_FD:
            sys.stdout.flush()  # what was printed before goes first
            self.fd = std_fd("stdout")
            return
        if fd is not None:
            self.fd = fd
            return
        try:
            target = self._file_to_replace(path)
            if target is None:  # a FIFO or device (a directory fails here: EISDIR)
                self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            else:
                self.target = target
                if threading.current_thread() is threading.main_thread():  # (signals are the main thread's)
                    self._signals = [(signum, signal.getsignal(signum)) for signum in _TERMINATING]
                    for signum, handler in self._signals:
                        if handler is signal.SIG_DFL:
                            signal.signal(signum, _terminated)
                try:
                    self.fd, self.temp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".keyden-")
                except OSError as exc:
                    self._cleanup()
                    if not os.path.exists(target):  # (/dev/fd/N of a descriptor not open)
                        raise failure(path, exc) from None
                    # the target exists: say what failed, not that it is missing
                    raise failure(f"{path}: cannot write a new file beside it (written whole, then renamed "
                                  "into place)", exc) from None
            self._own_fd = True
        except OSError as exc:
            self._cleanup()
            raise failure(path, exc) from None

    def _file_to_replace(self, path: str) -> str | None:
        """The regular file ``path`` names, as the kernel resolves it (a new one through its directory, or
        through a dangling link, created as ``>`` would), or None if it names no regular file."""
        try:
            probe = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.islink(path):
                parent = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    return os.path.join(_named_by_proc(parent), os.path.basename(path))
                finally:
                    os.close(parent)
            probe = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._created = _named_by_proc(probe)
        try:
            if not stat.S_ISREG(os.fstat(probe).st_mode):
                return None
            return _named_by_proc(probe)
        finally:
            os.close(probe)

    @property
    def direct(self) -> bool:
        """Does what is written go out at once (stdout, a device, a FIFO)?  Then unverified plaintext waits."""
        return self.temp is None

    def write(self, data: bytes) -> None:
        if data:
            write_all(self.fd, data, self.path or "stdout")

    def __enter__(self) -> "Output":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if not self._own_fd:
            return
        for signum, _handler in self._signals:  # no second signal cuts the cleanup short
            signal.signal(signum, signal.SIG_IGN)
        try:
            if self.temp is not None and exc_type is None:
                os.fsync(self.fd)  # the new file's data is on disk before its name replaces the old one
            os.close(self.fd)
            if self.temp is not None and exc_type is None:
                os.replace(self.temp, self.target)
                self.temp = self._created = None
        except OSError as exc:
            if exc_type is None:  # else the failure that brought us here is the one to tell
                raise failure(self.path, exc) from None
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        for name in (self.temp, self._created):
            if name is not None:
                try:
                    os.unlink(name)
                except OSError:
                    pass
        self.temp = self._created = None
        for signum, handler in self._signals:
            signal.signal(signum, handler)
        self._signals = []


def _named_by_proc(fd: int) -> str:
    """The path the kernel has for an open descriptor (symbolic links and '..' resolved as it resolved them)."""
    return os.readlink(f"/proc/self/fd/{fd}")


STDOUT_FD = 1


def _descriptor_named(path: str) -> int | None:
    """The descriptor ``/dev/stdout``, ``/dev/stderr``, ``/dev/fd/N`` or ``/proc/self/fd/N`` names, if it
    does and it is open (as a shell's redirections take these names)."""
    fixed = {"/dev/stdout": 1, "/dev/stderr": 2}.get(path)
    match = re.fullmatch(r"/(?:dev/fd|proc/self/fd)/(\d{1,9})", path)
    fd = fixed if fixed is not None else int(match.group(1)) if match else None
    if fd is None or fd not in INHERITED_FDS:  # one we opened since (our connection to keyden) is no output
        return None  # opened as a path, which says why it cannot be
    return fd


#: the descriptors open when the command started (main notes them): what /dev/fd/N may name
INHERITED_FDS: frozenset[int] = frozenset()


def note_inherited_descriptors() -> None:
    global INHERITED_FDS
    try:
        listed = os.listdir("/proc/self/fd")  # (with the descriptor that read it: closed again now)
        INHERITED_FDS = frozenset(fd for fd in map(int, listed) if _is_open(fd))
    except OSError:  # no /proc: the standard three, as far as they are open
        INHERITED_FDS = frozenset(fd for fd in (0, 1, 2) if _is_open(fd))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def read_file(name: str, limit: int = W.DEFAULT_MAX_FRAME) -> bytes:
    """A file's bytes, at most ``limit`` of them: what one request can carry (the daemon's default frame
    cap; an import passes the daemon's own), so /dev/zero named by mistake does not fill memory."""
    try:
        with open(name, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise failure(name, exc) from None
    if len(data) > limit:
        raise Exit(1, f"{name}: more than {limit} bytes; too much data for this command")
    return data


def text_ok(text: str) -> bool:
    """Is a command-line word UTF-8 text?  (Python hands over bytes that are not as lone surrogates.)"""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def pkey_info(words: list[str]) -> str:
    """keyctl's [k=v]* words joined into the kernel's info string."""
    for word in words:
        if "=" not in word:
            raise Exit(2, "Option not in key=val form")
    info = " ".join(words)
    if not text_ok(info):
        raise Exit(2, "Option not valid text (UTF-8)")
    if len(info.encode()) > INFO_LIMIT - 1:
        raise Exit(2, "Too many info options")
    return info


def pkey_password(arg: str) -> None:
    """keyctl accepts only '0' (no password) here; so does keyden."""
    if arg != "0":
        raise Exit(2, "Password passing is not yet supported")


def write_bytes(data: bytes) -> None:
    sys.stdout.flush()
    write_all(std_fd("stdout"), data)


class Context:
    """One invocation: where the daemon is, and a connection opened on first use."""

    def __init__(self, socket: str | None = None):
        self.socket = socket
        self._client = None
        self._sessionless = None

    @property
    def client(self):
        if self._client is None:
            self._client = self.connect()
        return self._client

    @property
    def sessionless(self):
        """A connection in no session: for the commands about sessions themselves (joining, listing,
        leaving), which must work while $KEYDEN_SESSION holds a stale token."""
        if self._sessionless is None:
            self._sessionless = self.connect(session="")
        return self._sessionless

    def connect(self, session: str | None = None):
        import keyden

        token = session_token(session)
        if not (token.isascii() and token.isprintable()):  # keyden's tokens are: this one is none of its
            name = SESSION_ENV if session is None else "the session token"
            raise Exit(1, f"keyden: {name}: session token not valid (not one keyden gives: unset {SESSION_ENV})")
        try:
            return keyden.connect(self.socket, session=session)
        except E.EACCES as exc:
            if exc.before_hello or not session_token(session):  # the socket, or a daemon not to be trusted
                raise Exit(1, f"keyden: {exc.message}") from None
            # The daemon is there and refused the token.
            name = SESSION_ENV if session is None else "the session token"
            raise Exit(1, f"keyden: {name}: {exc.message} (its session ended, or the daemon restarted since: "
                          f"unset {SESSION_ENV})") from None
        except E.KeydenError as exc:
            raise NoDaemon(exc.message) from None

    def close(self) -> None:
        for client in (self._client, self._sessionless):
            if client is not None:
                client.close()
        self._client = self._sessionless = None

    def key(self, arg: str) -> int:
        """keyctl's get_key_id: a number, '@x', or '%type:desc' looked up among visible keys."""
        if arg.startswith("@"):
            if arg not in SPECIAL:
                raise Exit(2, f"Unknown special key: '{arg}'")
            return SPECIAL[arg]
        if arg.startswith("%"):
            spec = arg[1:]
            if spec.startswith(":"):
                type_name, desc = "keyring", spec[1:]
            else:
                type_name, colon, desc = spec.partition(":")
                if not colon:
                    desc = ""
            if not spec or not desc:
                raise Exit(2, "Incorrect key-by-name spec")
            try:
                return self.client.find(type_name, desc)
            except E.ECONNRESET:  # the daemon went away: say that, not that the key is missing
                raise
            except E.KeydenError:  # as keyutils: whatever find_key_by_type_and_desc() refused
                raise Exit(1, f"Can't find '{type_name}:{desc}'") from None
        value = strtoul(arg)
        if value is None:
            raise Exit(2, f"Unparsable key: '{arg}'")
        return int32(value)
