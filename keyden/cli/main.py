"""`keyden [--socket PATH] <command> ...`: keyctl(1)'s command line, answered by the keyden daemon.

Exit status as keyctl: 0 success, 1 an operation failed (``function:
strerror`` on stderr) or the daemon is unreachable, 2 a usage error (the
command's synopsis on stderr), 3 where keyctl uses it (``supports`` with an
unknown capability).  The commands themselves live in ``commands``.
"""

from __future__ import annotations

import codecs
import errno
import io
import os
import signal
import sys


def _daemon_ignores_early_hangups(argv: list[str]) -> None:
    """``keyden serve``: a reload (SIGHUP) while the interpreter is still importing must not kill the
    daemon (the default action); Server.run installs the real handler before anything needs reopening."""
    words = [w for i, w in enumerate(argv) if not (w.startswith("--socket") or argv[i - 1:i] == ["--socket"])]
    if words[:1] == ["serve"]:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


_daemon_ignores_early_hangups(sys.argv[1:])  # before the imports below, which take most of start-up

from keyden import errors as E  # noqa: E402
from keyden.cli import commands  # noqa: E402
from keyden.cli.support import (Context, Exit, NoDaemon, Terminated, Usage,  # noqa: E402
                                note_inherited_descriptors)

HELP_WORDS = ("--help", "-h")
#: how writing stdout fails (a closed descriptor, a full or failing disk, a file over its limit)
_STDOUT_FAILURES = frozenset({errno.EBADF, errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT})


def _global_options(argv: list[str]) -> tuple[str | None, list[str]]:
    """--socket PATH (or --socket=PATH) before the command; else the client's default resolution."""
    socket = None
    while argv:
        if argv[0] == "--socket":
            if len(argv) < 2:
                raise Usage()
            socket, argv = argv[1], argv[2:]
        elif argv[0].startswith("--socket="):
            socket, argv = argv[0].partition("=")[2], argv[1:]
        else:
            break
    return socket, argv


def run(argv: list[str]) -> int:
    try:
        socket, argv = _global_options(argv)
    except Usage:
        sys.stderr.write(commands.format_help())
        return 2
    if socket == "":  # not "the default socket", silently
        print("keyden: --socket takes a path, not an empty string", file=sys.stderr)
        return 2
    if not argv:
        sys.stderr.write(commands.format_help())
        return 2
    if argv[0] in HELP_WORDS:
        sys.stdout.write(commands.format_help())
        return 0
    try:
        command = commands.find(argv[0])
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    if len(argv) == 2 and argv[1] in HELP_WORDS and not command.own_help:  # as `keyden help <command>`
        sys.stdout.write(commands.format_usage(command.name))
        return 0
    ctx = Context(socket)
    try:
        return command.handler(ctx, argv[1:]) or 0
    except Usage as exc:
        if exc.args:
            print(f"keyden: {exc.args[0]}", file=sys.stderr)
        sys.stderr.write(commands.format_usage(command.name))
        return 2
    except Exit as exc:
        if exc.message:
            print(exc.message, file=sys.stderr)
        return exc.code
    except NoDaemon as exc:
        hint = "" if str(exc).endswith("?)") else " (is the daemon running?)"  # (not after "(is it keyden?)")
        print(f"keyden: {exc}{hint}", file=sys.stderr)
        return 1
    except E.KeydenError as exc:  # an operation without a keyctl function name to report
        print(f"keyden: {os.strerror(exc.code)}", file=sys.stderr)
        return 1
    finally:
        ctx.close()


class _ClosedStream(io.RawIOBase):
    """Stands in for a standard stream that was closed before we started (``keyden hash <&-``)."""

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def readinto(self, _buffer) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), self.name)

    def write(self, _data) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), self.name)


class _LostStream(io.RawIOBase):
    """Stands in for a standard error closed before we started (``2>&-``): what is said there is lost, as
    C's keyctl's is, and nothing else changes (print() would otherwise fall back to stdout)."""

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return len(data)


def _reopen_closed_std_streams() -> None:
    """Python leaves sys.stdin/stdout/stderr None when fd 0/1/2 was closed: make using them do what C's
    keyctl meets (EBADF, said on stderr; a message to a closed stderr lost), not a traceback."""
    if sys.stdin is None:
        sys.stdin = io.TextIOWrapper(io.BufferedReader(_ClosedStream("stdin")))
    if sys.stdout is None:  # unbuffered: the write fails where it is made, nothing is left to fail at exit
        sys.stdout = io.TextIOWrapper(_ClosedStream("stdout"), write_through=True)
    if sys.stderr is None:
        sys.stderr = io.TextIOWrapper(_LostStream(), write_through=True)


def _escaped(exc: UnicodeError) -> tuple[str, int]:
    """What the output's encoding cannot hold, as backslash escapes; a byte of the command line that was
    not text (Python holds it as a lone surrogate) as the byte it was, ``\xff``, not ``\udcff``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    return "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else
                   c.encode("ascii", "backslashreplace").decode() for c in exc.object[exc.start:exc.end]), exc.end


codecs.register_error("keyden-escape", _escaped)


def _never_unencodable() -> None:
    """A description the locale's encoding cannot hold (a CA's "E-Tuğra" under ISO-8859-1) is written with
    backslash escapes: a line that stopped half-way with a traceback was worse.  (Binary output goes to
    sys.stdout.buffer, untouched.)"""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="keyden-escape")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit has nothing left to fail on."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no descriptor behind it (it was closed before we started)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _reopen_closed_std_streams()
    _never_unencodable()
    note_inherited_descriptors()  # before any of our own: what -o /dev/fd/N may name
    try:
        status = run(argv)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        return 130
    except Terminated as exc:
        return 128 + exc.args[0]
    except BrokenPipeError:  # before OSError, of which it is one
        # The reader went away (`keyden list @s | head -1`): say nothing, and end with the status a shell
        # gives C's keyctl, which dies of SIGPIPE (Python ignores it: the daemon's socket must not kill us).
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except OSError as exc:  # a standard stream failed (closed, a full disk): said, as keyctl's error("stdout")
        if exc.filename is None and exc.errno not in _STDOUT_FAILURES:
            raise  # not a standard stream's: a bug, with its traceback
        _silence_stdout()  # what is still buffered must not fail again at exit
        print(f"{exc.filename or 'stdout'}: {exc.strerror or exc}", file=sys.stderr)  # perror, as keyctl
        return 1

if __name__ == "__main__":
    sys.exit(main())
