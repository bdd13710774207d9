"""`keyden serve`: run the daemon."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from keyden import errors as E
from keyden.errors import StartupError
from keyden.server.config import ServerConfig
from keyden.server.server import Server


def path(text: str) -> str:
    """A path option's value: an empty one is refused, not taken for "not given" (--state-dir "" would
    have started the daemon on the default state directory)."""
    if not text:
        raise argparse.ArgumentTypeError("takes a path, not an empty string")
    return text


def add_store_arguments(p: argparse.ArgumentParser) -> None:
    """Where the daemon's state is, and how its key store is unlocked (serve and init share these)."""
    p.add_argument("--state-dir", type=path, help="state directory (created on first start)")
    p.add_argument("--config", type=path, help="TOML config file (default: <state-dir>/keyden.toml)")
    p.add_argument("--passphrase-file", type=path, help="derive the master key from the passphrase in this file "
                                                        "(default: $KEYDEN_PASSPHRASE_FILE; else the master key file)")


def load_config(args: argparse.Namespace) -> ServerConfig:
    config = ServerConfig()
    if args.state_dir:
        config.state_dir = args.state_dir
    config.load_file(args.config)
    if args.state_dir and args.config:  # the command line wins over a file it names, as --socket does
        config.state_dir = args.state_dir
    if args.passphrase_file:
        config.passphrase_file = args.passphrase_file
    return config


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="keyden serve", description="Run the keyden daemon.")
    p.add_argument("--socket", type=path, help="Unix socket path (default: $KEYDEN_SOCKET, "
                                               "$XDG_RUNTIME_DIR/keyden.sock, /run/keyden/keyden.sock)")
    add_store_arguments(p)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--no-harden", action="store_true", help="skip PR_SET_DUMPABLE/mlockall (debugging only)")
    p.add_argument("--adopt-orphans", action="store_true",
                   help="file stored keys whose keyrings were skipped (damaged, rolled back) in a keyring "
                        "'keyden:recovered' in their owner's persistent keyring, instead of leaving them out")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = None
    try:
        config = load_config(args)
        if args.socket:
            config.socket = args.socket
        if args.no_harden:
            config.harden = False
        config.adopt_orphans = args.adopt_orphans
        server = Server(config)
        server.run()
        status = 0
    except (StartupError, E.KeydenError, OSError) as exc:  # one line, never a traceback
        phase = "stopping" if server is not None and server.started else "not starting"
        print(f"keyden: {phase}: {_reason(exc)}", file=sys.stderr)
        status = 1
    except BaseException:
        if server is None or not server.left_running:
            raise
        logging.getLogger("keyden").exception("stopping")  # (a bug: its traceback, then the exit below)
        status = 1
    if server is not None and server.left_running:
        # What the stop did not wait for still holds threads (worker threads among them, which the
        # interpreter would wait for at exit: for good, on a disk that never answers).  Everything else
        # is closed: exit now.
        logging.shutdown()
        sys.stderr.flush()
        os._exit(status)
    return status


def _reason(exc: Exception) -> str:
    """A refused setting's message names it; a file the system refused is named with the reason."""
    if isinstance(exc, E.KeydenError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc.strerror or exc)
    return str(exc)
