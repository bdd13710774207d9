"""Commands for persistent keyrings and the sealed store: get_persistent, init, rekey, export, import."""

from __future__ import annotations

import argparse
import os
import stat

from keyden import errors as E
from keyden.cli.support import (Exit, Output, Usage, call, failure, id32, number, options, read_file,
                                read_stdin, strtoul, write_bytes)

EXPORT_USAGE = "<key> --to-public-key <key>|<pemfile> [-o <file>]"
EXPORT_WRAP_USAGE = "<key> --wrapping-key <key> [-o <file>]"
IMPORT_USAGE = "[--no-export] [--contents] <blobfile>|- --unwrap-with <key> <keyring>"


def cmd_get_persistent(ctx, args):
    """keyctl get_persistent: link the uid's persistent keyring into <keyring>; print its serial."""
    if len(args) not in (1, 2):
        raise Usage()
    ring = ctx.key(args[0])
    uid = id32(number(args[1], "uid")) if len(args) == 2 else -1
    print(call("keyctl_get_persistent", ctx.client.get_persistent, ring, uid))


def cmd_init(ctx, args):
    """Create the master key and the empty sealed store without starting the daemon (or check an existing one)."""
    from keyden.cli.serve import add_store_arguments, load_config
    from keyden.core.store import KeyStore
    from keyden.errors import StartupError
    from keyden.persist import PASSPHRASE_ENV, open_durable, paths

    p = argparse.ArgumentParser(prog="keyden init", description="Create the daemon's master key and key store.")
    add_store_arguments(p)
    parsed = p.parse_args(args)
    try:
        config = load_config(parsed)
        if config.harden:  # it reads or makes the master key too: as the daemon, no core dump may hold it
            from keyden.server import harden

            harden.harden(lock_memory=False)
        config.prepare_state_dir()
        journal = open_durable(config, KeyStore(config.store), check_only=True)
    except StartupError as exc:
        raise Exit(1, f"keyden: {exc}") from None
    except E.KeydenError as exc:  # a setting refused (its message names it)
        raise Exit(1, f"keyden: {exc.message}") from None
    db_path, key_path = paths(config)
    if journal is not None:  # made just now
        journal.close()
    if config.passphrase_file or os.environ.get(PASSPHRASE_ENV):
        unlocked = "a passphrase"
    elif os.path.exists(key_path):
        unlocked = key_path
    else:  # the one other place a key that opened the store can be
        unlocked = (f"the kernel keyring ({config.master_key_kernel}); {key_path} is missing: "
                    f"keep a copy of the key outside the kernel")
    print(f"key store {db_path} ready (master key: {unlocked})")


def cmd_rekey(ctx, args):
    """Rotate the running daemon's master key (root); a passphrase store takes the new passphrase."""
    named, rest = options(args, valued=("--passphrase-file",), anywhere=True)
    if rest:
        raise Usage()
    passphrase = b""
    if "--passphrase-file" in named:
        path = named["--passphrase-file"]
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError as exc:
            raise failure(path, exc) from None
        if mode & 0o077:  # a passphrase others may read is spent before it is used; the daemon would refuse it too
            raise failure("rekey", E.EACCES(), f"the passphrase file {path} has mode {mode:04o}, open to group or "
                                               f"others: chmod 600 {path}, after checking nobody else read it")
        from keyden.persist.master import MAX_PASSPHRASE, normalize_passphrase  # (the key store: not for every command)

        passphrase = normalize_passphrase(read_file(path))
        if not passphrase or len(passphrase) > MAX_PASSPHRASE:  # empty: it would rekey as if none were named
            raise Exit(1, f"rekey: the passphrase file {path} must hold 1..{MAX_PASSPHRASE} bytes")
    call("rekey", ctx.client.rekey, passphrase)


def cmd_export(ctx, args):
    named, rest = options(args, valued=("--to-public-key", "--wrapping-key", "-o"), anywhere=True)
    if len(rest) != 1 or ("--to-public-key" in named) == ("--wrapping-key" in named):
        raise Usage()
    key = ctx.key(rest[0])
    if "--wrapping-key" in named:
        blob = call("export", ctx.client.export, key, wrapping_key=ctx.key(named["--wrapping-key"]))
    else:
        recipient = named["--to-public-key"]
        # A key's name is a key, never a file that happens to bear it (./123 in a shared directory would
        # take the export); a file named like a key is given as ./123.
        named_key = recipient.startswith(("@", "%")) or strtoul(recipient) is not None
        to = ctx.key(recipient) if named_key else read_file(recipient)
        blob = call("export", ctx.client.export, key, to_public_key=to)
    if "-o" in named:
        _write_private(named["-o"], blob)
    else:
        write_bytes(blob)


def cmd_import(ctx, args):
    named, rest = options(args, ("--no-export", "--contents"), ("--unwrap-with",), anywhere=True)
    if len(rest) != 2 or "--unwrap-with" not in named:
        raise Usage()
    if not rest[0]:
        raise Exit(2, "import takes a file name (or - for stdin), not an empty string")
    limit = ctx.client.max_frame  # an export is made to fit one reply; its import, one request
    blob = read_stdin(limit) if rest[0] == "-" else read_file(rest[0], limit)
    unwrap, ring = ctx.key(named["--unwrap-with"]), ctx.key(rest[1])
    print(call("import", ctx.client.import_key, blob, unwrap, ring, no_export="--no-export" in named,
               contents="--contents" in named))


def _write_private(path: str, data: bytes) -> None:
    """A wrapped blob is no secret, but it is nobody else's business either: 0600, and whole or not at all
    (an export over an old one on a full disk must not leave neither)."""
    with Output(path) as out:
        out.write(data)
