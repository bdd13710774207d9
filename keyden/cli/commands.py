"""keyctl(1)'s commands over keyden, one handler each, and the table that names them.

The table is the interface, as in keyutils' keyctl.c: each row is a command
name, its argument synopsis, and its handler; rows without a handler are
further synopses of the command above.  ``keyden help`` prints the table,
a usage error prints the command's rows, and a unique prefix of a name
selects the command.  Handlers take the words after the command name and
return an exit status (None meaning 0); they report failure by raising the
exceptions in ``support``, so the output matches keyctl's byte for byte.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable

from keyden import errors as E
from keyden.cli import dataplane, persistence, tls, tree, trust
from keyden.cli.support import (Context, Exit, Usage, arguments, call, expect, failure, hex_to_bytes, hexdump, id32,
                                number, options, pkey_info, pkey_password, read_file, read_stdin, write_bytes)
from keyden.client.common import SESSION_ENV
from keyden.client.operations import key_flags
from keyden.core.views import as_kernel_prints
from keyden.protocol import CAPABILITY_BITS
from keyden.protocol.transport import SOCKET_ENV

Handler = Callable[[Context, list[str]], "int | None"]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    handler: Handler | None = None  # None: another synopsis of the command above
    extension: bool = False  # keyden's own, not in keyctl(1)
    own_help: bool = False  # its option parser answers --help itself, with more than the synopsis


# ----------------------------------------------------------------- helpers


def payload(data: bytes, opts: dict) -> bytes:
    return hex_to_bytes(data) if opts.get("-x") else data


def password(opts: dict) -> bytes | None:
    """--password PASS or --password-file FILE (keyden): unlocks an encrypted PKCS#8 key."""
    if "--password-file" in opts and "--password" in opts:
        raise Usage("--password or --password-file, not both")
    if "--password-file" in opts:
        return read_file(str(opts["--password-file"])).rstrip(b"\r\n")
    if "--password" in opts:
        return os.fsencode(str(opts["--password"]))
    return None


def key_use(opts: dict) -> str | None:
    """--use NAME[,NAME...] (keyden): the uses an asymmetric key is bound to, checked here so that a name
    keyden does not know is a usage error saying which it knows, not the daemon's bare EINVAL."""
    use = opts.get("--use")
    if use is not None:
        try:
            key_flags(False, use)
        except E.EINVAL as exc:
            raise Usage(exc.message) from None
    return use


def key_bytes(data: bytes | list[int]) -> bytes:
    """A keyring reads as its serials in native byte order, as keyctl_read returns them."""
    return struct.pack(f"={len(data)}i", *data) if isinstance(data, list) else data


def read_payload(ctx: Context, arg: str) -> bytes:
    key = ctx.key(arg)
    return key_bytes(call("keyctl_read_alloc", ctx.client.read, key))


def printable(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in data)


# ---------------------------------------------------------- keys and rings


def cmd_add(ctx, args):
    opts, args = options(args, ("-x", "--no-export"), ("--password", "--password-file", "--use"))
    expect(args, 4)
    use = key_use(opts)
    data = payload(os.fsencode(args[2]), opts)
    ring = ctx.key(args[3])
    print(call("add_key", ctx.client.add, args[0], args[1], data, ring, password=password(opts),
               no_export=bool(opts.get("--no-export")), use=use))


def cmd_padd(ctx, args):
    opts, args = options(args, ("-x", "--no-export"), ("--password", "--password-file", "--use"))
    expect(args, 3)
    use = key_use(opts)
    data = payload(read_stdin(), opts)
    ring = ctx.key(args[2])
    print(call("add_key", ctx.client.add, args[0], args[1], data, ring, password=password(opts),
               no_export=bool(opts.get("--no-export")), use=use))


def cmd_genkey(ctx, args):
    opts, args = options(args, ("--no-export",), ("--use",), anywhere=True)
    expect(args, 2, 3)
    use = key_use(opts)
    spec, desc, ring = (args[0], "", args[1]) if len(args) == 2 else args
    print(call("genkey", ctx.client.genkey, spec, desc, ctx.key(ring), no_export=bool(opts.get("--no-export")),
               use=use))


def _request(ctx, type_name, desc, dest):
    dest_id = ctx.key(dest) if dest is not None else 0
    print(call("request_key", ctx.client.request, type_name, desc, dest_id))


def cmd_request(ctx, args):
    expect(args, 2, 3)
    _request(ctx, args[0], args[1], args[2] if len(args) == 3 else None)


def cmd_request2(ctx, args):
    # keyden has no request-key upcall: the callout info is accepted and unused.
    expect(args, 3, 4)
    _request(ctx, args[0], args[1], args[3] if len(args) == 4 else None)


def cmd_prequest2(ctx, args):
    expect(args, 2, 3)
    read_stdin()  # the callout info, unused as in request2
    _request(ctx, args[0], args[1], args[2] if len(args) == 3 else None)


def cmd_update(ctx, args):
    opts, args = options(args, ("-x",))
    expect(args, 2)
    data = payload(os.fsencode(args[1]), opts)
    call("keyctl_update", ctx.client.update, ctx.key(args[0]), data)


def cmd_pupdate(ctx, args):
    opts, args = options(args, ("-x",))
    expect(args, 1)
    key = ctx.key(args[0])
    call("keyctl_update", ctx.client.update, key, payload(read_stdin(), opts))


def cmd_newring(ctx, args):
    expect(args, 2)
    print(call("add_key", ctx.client.newring, args[0], ctx.key(args[1])))


def _one_key(function: str, method: str) -> Handler:
    def handler(ctx, args):
        expect(args, 1)
        key = ctx.key(args[0])
        call(function, getattr(ctx.client, method), key)
    handler.__name__ = f"cmd_{method}"
    return handler


cmd_revoke = _one_key("keyctl_revoke", "revoke")
cmd_invalidate = _one_key("keyctl_invalidate", "invalidate")
cmd_clear = _one_key("keyctl_clear", "clear")


def cmd_link(ctx, args):
    expect(args, 2)
    call("keyctl_link", ctx.client.link, ctx.key(args[0]), ctx.key(args[1]))


def cmd_unlink(ctx, args):
    """With a keyring, one unlink; without, unlink the key from every keyring in the session tree."""
    expect(args, 1, 2)
    key = ctx.key(args[0])
    if len(args) == 2:
        call("keyctl_unlink", ctx.client.unlink, key, ctx.key(args[1]))
        return
    removed = tree.scan_session(ctx, lambda v: tree.unlink_count(ctx, v.key, v.parent) if v.key == key else 0)
    print(f"{removed} links removed")


def cmd_move(ctx, args):
    force = len(args) > 3 and args[0] == "-f"
    if force:
        args = args[1:]
    expect(args, 3)
    key, src, dst = (ctx.key(a) for a in args)
    call("keyctl_move", ctx.client.move, key, src, dst, force=force)


def cmd_search(ctx, args):
    expect(args, 3, 4)
    ring = ctx.key(args[0])
    dest = ctx.key(args[3]) if len(args) == 4 else 0
    print(call("keyctl_search", ctx.client.search, ring, args[1], args[2], dest))


# ----------------------------------------------------------------- reading


def cmd_read(ctx, args):
    expect(args, 1)
    data = read_payload(ctx, args[0])
    if not data:
        print("No data in key")
        return
    print(f"{len(data)} bytes of data in key:")
    print(hexdump(data))


def cmd_pipe(ctx, args):
    expect(args, 1)
    write_bytes(read_payload(ctx, args[0]))


def cmd_public_key(ctx, args):
    """The public half of an asymmetric key, or its certificate: what openssl or a peer needs from it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    opts, args = options(args, ("--der", "--cert"), anywhere=True)
    expect(args, 1)
    spki, cert = call("public_key", ctx.client.public_key_bytes, ctx.key(args[0]))
    if opts.get("--cert") and not cert:
        raise failure("public_key", E.ENODATA(), "the key has no certificate: load one with padd asymmetric")
    if opts.get("--der"):
        write_bytes(cert if opts.get("--cert") else spki)
    elif opts.get("--cert"):
        write_bytes(x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM))
    else:
        write_bytes(serialization.load_der_public_key(spki).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def cmd_print(ctx, args):
    expect(args, 1)
    data = read_payload(ctx, args[0])
    print(data.decode("ascii") if printable(data) else ":hex:" + data.hex())


def _ring_members(ctx, arg) -> list[int]:
    members = call("keyctl_read_alloc", ctx.client.read, ctx.key(arg))
    if not isinstance(members, list):  # keyctl would list the payload's bytes as serials
        members = list(struct.unpack(f"={len(members) // 4}i", members[:len(members) // 4 * 4]))
    return members


def cmd_list(ctx, args):
    expect(args, 1)
    members = _ring_members(ctx, args[0])
    if not members:
        print("keyring is empty")
        return
    print("1 key in keyring:" if len(members) == 1 else f"{len(members)} keys in keyring:")
    for key in members:
        try:
            d = ctx.client.describe(key)
        except E.KeydenError as exc:
            print(f"{key:9d}: key inaccessible ({os.strerror(exc.code)})")
            continue
        print(f"{key:9d}: {tree.granted_mask(d)} {as_kernel_prints(d.uid):5d} {as_kernel_prints(d.gid):5d} "
              f"{d.type}: {d.description}")


def cmd_rlist(ctx, args):
    expect(args, 1)
    print(" ".join(str(k) for k in _ring_members(ctx, args[0])))


def cmd_describe(ctx, args):
    """As keyctl: the line starts with the id as given (-3 for @s), not the serial it names."""
    expect(args, 1)
    key = ctx.key(args[0])
    print(replace(call("keyctl_describe_alloc", ctx.client.describe, key), serial=key).keyctl())


def cmd_keys(ctx, args):
    """Every key you may view, one /proc/keys line each: serial (hex), flags, usage, time left (perm, expd,
    or 59s/5m/2h/3d/1w), permissions, uid, gid, type, description and what its type adds."""
    args = arguments(args)
    expect(args, 0)
    now = time.time()
    for status in call("keys", ctx.client.keys):
        print(status.proc_line(now))


def cmd_rdescribe(ctx, args):
    expect(args, 1, 2)
    if len(args) == 2 and not args[1]:
        raise Usage()
    raw = call("keyctl_describe", ctx.client.describe, ctx.key(args[0])).raw()
    if len(args) == 2:  # the separator's first byte, as keyctl (of a multi-byte character too)
        write_bytes(raw.encode().replace(b";", os.fsencode(args[1])[:1]) + b"\n")
    else:
        print(raw)


def cmd_show(ctx, args):
    hex_ids = bool(args) and args[0] == "-x"
    if hex_ids:
        args = args[1:]
    if len(args) > 1:
        raise Usage()
    ring = ctx.key(args[0]) if args else tree.SESSION
    tree.show(ctx, ring, "Keyring" if args else "Session Keyring", hex_ids)


def cmd_id(ctx, args):
    expect(args, 1)
    print(call("keyctl_get_keyring_ID", ctx.client.get_keyring_id, ctx.key(args[0])))


# -------------------------------------------------------------- attributes


def cmd_chown(ctx, args):
    expect(args, 2)
    key = ctx.key(args[0])
    uid = id32(number(args[1], "uid"))
    call("keyctl_chown", ctx.client.chown, key, uid, -1)


def cmd_chgrp(ctx, args):
    expect(args, 2)
    key = ctx.key(args[0])
    gid = id32(number(args[1], "gid"))
    call("keyctl_chown", ctx.client.chgrp, key, gid)


def cmd_setperm(ctx, args):
    expect(args, 2)
    key = ctx.key(args[0])
    perm = number(args[1], "permissions") & 0xFFFFFFFF
    call("keyctl_setperm", ctx.client.setperm, key, perm)


def cmd_timeout(ctx, args):
    expect(args, 2)
    key = ctx.key(args[0])
    seconds = number(args[1], "timeout", 10) & 0xFFFFFFFF
    call("keyctl_set_timeout", ctx.client.timeout, key, seconds)


def cmd_restrict_keyring(ctx, args):
    expect(args, 1, 2, 3)
    ring = ctx.key(args[0])
    call("keyctl_restrict_keyring", ctx.client.restrict_keyring, ring, *args[1:])


# ---------------------------------------------------------------- sessions


def _run_child(argv: list[str], env: dict[str, str]) -> int:
    """Run the program as keyctl would exec it: its status, as subprocess gives it (-N: killed by signal N)."""
    import subprocess  # only this command spawns anything

    sys.stderr.flush()
    sys.stdout.flush()
    try:
        proc = subprocess.Popen(argv, env=env)
    except OSError as exc:
        raise failure(argv[0], exc) from None
    # The terminal's ^C and ^\ are for the program; we only wait for it.  keyctl would be the program
    # (it execs it): what is sent to us to end it (a kill, the terminal hanging up) goes to the program,
    # and we wait on, so the token is given up once it has ended.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    saved.update((sig, signal.signal(sig, lambda signum, _frame: proc.send_signal(signum)))
                 for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2))
    try:
        status = proc.wait()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    return status


def cmd_session(ctx, args):
    """Join a new (or the named) session keyring and run a program in it.

    keyctl replaces itself with the program; keyden's session is a token, so
    it runs the program as a child with KEYDEN_SESSION set (inherited by its
    own children), waits, then drops the token.
    """
    name = None
    if args:
        name = None if args[0] == "-" else args[0]
        args = args[1:]
    serial, token = call("keyctl_join_session_keyring", ctx.sessionless.join_session, name)
    ctx.close()
    print(f"Joined session keyring: {serial}", file=sys.stderr)
    env = dict(os.environ, **{SESSION_ENV: token})
    if ctx.socket:  # nested keyden commands must reach the daemon that issued the token
        env[SOCKET_ENV] = os.path.abspath(ctx.socket)
    try:
        status = _run_child(args or [os.environ.get("SHELL") or "/bin/sh"], env)
    finally:
        _leave_quietly(ctx, token)
    if -status in _DIE_AS_THE_PROGRAM:  # it was killed so: so are we, as keyctl (the program) was
        if -status != signal.SIGKILL:  # (whose handler cannot be set)
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status if status >= 0 else 128 - status  # (128+N, as a shell reports it)


#: signals that end a process without a core dump: a program killed by one ends `keyden session` alike
_DIE_AS_THE_PROGRAM = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                                 signal.SIGALRM, signal.SIGKILL})


def _leave_quietly(ctx: Context, token: str) -> None:
    try:
        with ctx.connect(session="") as client:
            client.leave_session(token)
    except Exception:  # the daemon may be gone; the program's status is what matters
        pass


def cmd_new_session(ctx, args):
    """keyctl gives its parent the new session; a child cannot change its parent's environment,
    so keyden prints the token for the caller to export."""
    expect(args, 0, 1)
    serial, token = call("keyctl_join_session_keyring", ctx.sessionless.join_session, args[0] if args else None)
    print(serial)
    print(f"{SESSION_ENV}={token}")


def cmd_leave_session(ctx, args):
    args = arguments(args)
    expect(args, 0, 1)
    token = args[0] if args else os.environ.get(SESSION_ENV, "")
    if not token:
        raise Exit(2, "No session to leave: the token given is empty" if args else
                   f"No session to leave: {SESSION_ENV} is not set")
    call("leave_session", ctx.sessionless.leave_session, token)  # the token may be stale already


def cmd_sessions(ctx, args):
    """Your uid's sessions, tokens lost with their shells included: one '<serial> <name>' per line."""
    expect(arguments(args), 0)
    for serial, name in call("sessions", ctx.sessionless.sessions):
        print(serial, name)


def cmd_end_session(ctx, args):
    """leave_session for a session whose token is lost, by its keyring's serial (from `sessions`)."""
    args = arguments(args)
    expect(args, 1)
    call("end_session", ctx.client.end_session, ctx.key(args[0]))


# ---------------------------------------------------- session-tree cleanup


def cmd_purge(ctx, args):
    search = prefix = nocase = False
    while args and args[0].startswith("-"):
        letter = args[0][1:2]
        if letter == "s":
            search = True
        elif letter == "p":
            prefix = True
        elif letter == "i":
            nocase = True
        else:
            raise Usage()
        args = args[1:]
    if not args:
        raise Usage()
    type_name = args[0]
    if search:
        if len(args) != 2 or prefix or nocase:
            raise Usage()
        visit = lambda v: _purge_by_search(ctx, v, type_name, args[1])  # noqa: E731
    elif len(args) == 1:
        if prefix or nocase:
            raise Usage()
        visit = lambda v: _purge_by_type(ctx, v, type_name)  # noqa: E731
    elif len(args) == 2:
        visit = lambda v: _purge_literal(ctx, v, type_name, args[1], prefix, nocase)  # noqa: E731
    else:
        raise Usage()
    print(f"purged {tree.scan_session(ctx, visit)} keys")


def _purge_by_type(ctx, v: tree.Visit, type_name: str) -> int:
    if not v.parent or v.description is None or v.description.type != type_name:
        return 0
    return tree.unlink_count(ctx, v.key, v.parent)


def _purge_literal(ctx, v: tree.Visit, type_name: str, desc: str, prefix: bool, nocase: bool) -> int:
    if not v.parent or v.description is None or v.description.type != type_name:
        return 0
    have, want = v.description.description.encode(), os.fsencode(desc)  # argv's bytes, whatever they are
    if nocase:  # strncasecmp: ASCII letters only
        have, want = have.lower(), want.lower()
    if not (have.startswith(want) if prefix else have == want):
        return 0
    print(f"{type_name} '{v.description.description}'")
    return tree.unlink_count(ctx, v.key, v.parent)


def _purge_by_search(ctx, v: tree.Visit, type_name: str, desc: str) -> int:
    """In each keyring, unlink what the kernel's own matching finds there, until it finds nothing."""
    if v.description is None or v.description.type != "keyring":
        return 0
    removed = 0
    while True:
        try:
            found = ctx.client.search(v.key, type_name, desc)
            ctx.client.unlink(found, v.key)
        except E.KeydenError:
            return removed
        removed += 1


def cmd_reap(ctx, args):
    verbose = bool(args) and args[0] == "-v"
    if verbose:
        args = args[1:]
    expect(args, 0)

    def reap(v: tree.Visit) -> int:
        # Unlink what cannot be described for any reason but permission: revoked, expired, gone.
        if v.error is None or v.error.code == E.EACCES.code:
            return 0
        if verbose:
            print(f"Reap {v.key}", end="")
        error = tree.try_unlink(ctx, v.key, v.parent)
        if verbose:
            print(f"... failed {os.strerror(error.code)}" if error else "")
        return 0 if error else 1

    print(f"{tree.scan_session(ctx, reap)} keys reaped")


# ------------------------------------------------------------ capabilities

def cmd_supports(ctx, args):
    """List capabilities; or exit 0/1 for one that keyden has/lacks, 3 for one nobody knows."""
    expect(args, 0, 1)
    have = set(call("keyctl_capabilities", ctx.client.supports))
    known = [name for name, _, _ in CAPABILITY_BITS]
    if not args:
        for name in known + sorted(have - set(known)):
            print(f"have_{name}={1 if name in have else 0}")
        return 0
    if args[0] == "--raw":
        caps = bytearray(2)
        for name, index, bit in CAPABILITY_BITS:
            if name in have:
                caps[index] |= bit
        print(caps.hex())
        return 0
    if args[0] in have:
        return 0
    return 1 if args[0] in known else 3


# ------------------------------------------------------ public-key crypto


def cmd_pkey_query(ctx, args):
    if len(args) < 2:
        raise Usage()
    info = pkey_info(args[2:])
    key = ctx.key(args[0])
    pkey_password(args[1])
    print(call("keyctl_pkey_query", ctx.client.pkey_query, key, info).keyctl())


def _pkey_transform(function: str, method: str) -> Handler:
    """pkey_encrypt/decrypt/sign: <key> <pass> <datafile> [k=v]*, the result raw on stdout.

    As keyctl, the data file is read, then the key queried (keyctl sizes its buffer so): a key that is
    missing, not asymmetric or not ours to use is reported as ``keyctl_pkey_query``'s failure."""
    def handler(ctx, args):
        if len(args) < 3:
            raise Usage()
        info = pkey_info(args[3:])
        key = ctx.key(args[0])
        pkey_password(args[1])
        data = read_file(args[2])
        call("keyctl_pkey_query", ctx.client.pkey_query, key, info)
        write_bytes(call(function, getattr(ctx.client, method), key, info, data))
    handler.__name__ = f"cmd_{method}"
    return handler


cmd_pkey_encrypt = _pkey_transform("keyctl_pkey_encrypt", "pkey_encrypt")
cmd_pkey_decrypt = dataplane.with_decrypt_into(_pkey_transform("keyctl_pkey_decrypt", "pkey_decrypt"))
cmd_pkey_sign = _pkey_transform("keyctl_pkey_sign", "pkey_sign")


def cmd_pkey_verify(ctx, args):
    if len(args) < 4:
        raise Usage()
    info = pkey_info(args[4:])
    key = ctx.key(args[0])
    pkey_password(args[1])
    data, signature = read_file(args[2]), read_file(args[3])
    call("keyctl_pkey_verify", ctx.client.pkey_verify, key, info, data, signature)


# -------------------------------------------------------------------- misc


def cmd_serve(ctx, args):
    from keyden.cli.serve import serve

    if ctx.socket and not any(a == "--socket" or a.startswith("--socket=") for a in args):
        args = ["--socket", ctx.socket, *args]
    return serve(args)


def cmd_version(ctx, args):
    from keyden import __version__

    expect(args, 0)
    print(f"keyden {__version__}")


def cmd_help(ctx, args):
    args = arguments(args)
    expect(args, 0, 1)
    if not args:
        sys.stdout.write(format_help())
        return
    try:
        command = find(args[0])
    except LookupError as exc:
        raise Exit(2, str(exc)) from None
    if command.own_help:  # its option parser says more than the synopsis (and exits 0)
        return command.handler(ctx, ["--help"])
    sys.stdout.write(format_usage(command.name))


# ------------------------------------------------------------------- table

COMMANDS: tuple[Command, ...] = (
    Command("--version", "", cmd_version),
    Command("aead", "encrypt|decrypt <key> [-a <alg>] [--aad <hex>] [--nonce <hex>] [-o <file>]", dataplane.cmd_aead,
            extension=True),
    Command("add", "[-x] [--password <pass> | --password-file <file>] [--no-export] [--use <uses>] <type> <desc> "
            "<data> <keyring>", cmd_add),
    Command("chgrp", "<key> <gid>", cmd_chgrp),
    Command("chown", "<key> <uid>", cmd_chown),
    Command("cipher", "encrypt|decrypt <key> -a <alg> --iv <hex> [-o <file>]", dataplane.cmd_cipher, extension=True),
    Command("clear", "<keyring>", cmd_clear),
    Command("derive", f"<private> <peer_key> <keyring> {dataplane.KEY_USAGE}", dataplane.cmd_derive,
            extension=True),
    Command("derive", f"<private> --peer-file <file> <keyring> {dataplane.KEY_USAGE}"),
    Command("describe", "<keyring>", cmd_describe),
    Command("dh_compute", "<private> <prime> <base>", dataplane.cmd_dh_compute),
    Command("dh_compute_kdf", "<private> <prime> <base> <len> <hash_name>", dataplane.cmd_dh_compute_kdf),
    Command("dh_compute_kdf_oi", "[-x] <private> <prime> <base> <len> <hash_name>", dataplane.cmd_dh_compute_kdf_oi),
    Command("end_session", "<keyring>", cmd_end_session, extension=True),
    Command("export", persistence.EXPORT_USAGE, persistence.cmd_export, extension=True),
    Command("export", persistence.EXPORT_WRAP_USAGE),
    Command("genkey", "[--no-export] [--use <uses>] <spec> [<desc>] <keyring>", cmd_genkey, extension=True),
    Command("get_persistent", "<keyring> [<uid>]", persistence.cmd_get_persistent),
    Command("hash", "<alg>", dataplane.cmd_hash, extension=True),
    Command("help", "[<command>]", cmd_help, extension=True),
    Command("hmac", "<key> [-a <alg>]", dataplane.cmd_hmac, extension=True),
    Command("hmac_verify", "<key> <hex_tag> [-a <alg>]", dataplane.cmd_hmac_verify, extension=True),
    Command("id", "<key>", cmd_id),
    Command("import", persistence.IMPORT_USAGE, persistence.cmd_import, extension=True),
    Command("init", "[--state-dir <dir>] [--config <file>] [--passphrase-file <file>]", persistence.cmd_init,
            extension=True, own_help=True),
    Command("invalidate", "<key>", cmd_invalidate),
    Command("kdf", f"<key> <keyring> {dataplane.KEY_USAGE}", dataplane.cmd_kdf, extension=True),
    Command("keys", "", cmd_keys, extension=True),
    Command("leave_session", "[<token>]", cmd_leave_session, extension=True),
    Command("link", "<key> <keyring>", cmd_link),
    Command("list", "<keyring>", cmd_list),
    Command("move", "[-f] <key> <from_keyring> <to_keyring>", cmd_move),
    Command("new_session", "[<name>]", cmd_new_session),
    Command("newring", "<name> <keyring>", cmd_newring),
    Command("padd", "[-x] [--password <pass> | --password-file <file>] [--no-export] [--use <uses>] <type> <desc> "
            "<keyring>", cmd_padd),
    Command("pipe", "<key>", cmd_pipe),
    Command("pkey_query", "<key> <pass> [k=v]*", cmd_pkey_query),
    Command("pkey_encrypt", "<key> <pass> <datafile> [k=v]*", cmd_pkey_encrypt),
    Command("pkey_decrypt", "<key> <pass> <datafile> [k=v]*", cmd_pkey_decrypt),
    Command("pkey_decrypt", "<key> <pass> <datafile> [k=v]* --into <desc> <keyring>"),
    Command("pkey_sign", "<key> <pass> <datafile> [k=v]*", cmd_pkey_sign),
    Command("pkey_verify", "<key> <pass> <datafile> <sigfile> [k=v]*", cmd_pkey_verify),
    Command("prequest2", "<type> <desc> [<dest_keyring>]", cmd_prequest2),
    Command("print", "<key>", cmd_print),
    Command("public_key", "[--der] [--cert] <key>", cmd_public_key, extension=True),
    Command("pupdate", "[-x] <key>", cmd_pupdate),
    Command("purge", "<type>", cmd_purge),
    Command("purge", "[-p] [-i] <type> <desc>"),
    Command("purge", "-s <type> <desc>"),
    Command("rdescribe", "<keyring> [sep]", cmd_rdescribe),
    Command("read", "<key>", cmd_read),
    Command("reap", "[-v]", cmd_reap),
    Command("rekey", "[--passphrase-file <file>]", persistence.cmd_rekey, extension=True),
    Command("request", "<type> <desc> [<dest_keyring>]", cmd_request),
    Command("request2", "<type> <desc> <info> [<dest_keyring>]", cmd_request2),
    Command("restrict_keyring", "<keyring> [<type> [<restriction>]]", cmd_restrict_keyring),
    Command("revoke", "<key>", cmd_revoke),
    Command("rlist", "<keyring>", cmd_rlist),
    Command("search", "<keyring> <type> <desc> [<dest_keyring>]", cmd_search),
    Command("serve", "[--socket <path>] [--state-dir <dir>] [--config <file>] [--passphrase-file <file>] "
            "[--log-level <level>] [--no-harden] [--adopt-orphans]",
            cmd_serve, extension=True, own_help=True),
    Command("session", "", cmd_session),
    Command("session", "- [<prog> <arg1> <arg2> ...]"),
    Command("session", "<name> [<prog> <arg1> <arg2> ...]"),
    Command("sessions", "", cmd_sessions, extension=True),
    Command("setperm", "<key> <mask>", cmd_setperm),
    Command("show", "[-x] [<keyring>]", cmd_show),
    Command("supports", "[<cap> | --raw]", cmd_supports),
    Command("timeout", "<key> <timeout>", cmd_timeout),
    Command("tls-proxy", "--listen <host:port> --keyring <keyring> --forward <host:port>|unix:<path> "
            "[--client-trust <keyring>] [--require-client-cert] [--alpn <p1,p2>] [--handshake-timeout <secs>] "
            "[--max-connections <n>] [--max-connections-per-host <n>] [--close-timeout <secs>] "
            "[--idle-timeout <secs>] [--evict-idle <secs>] [--shutdown-timeout <secs>] [--proxy-protocol]",
            tls.cmd_tls_proxy, extension=True, own_help=True),
    Command("unlink", "<key> [<keyring>]", cmd_unlink),
    Command("update", "[-x] <key> <data>", cmd_update),
    Command("x509_hashes", "<key>", trust.cmd_x509_hashes, extension=True),
    Command("x509_verify", "<cert> <trust_keyring> [--chain <keyring>] [--host <name>] [--purpose server|client] "
            "[--at <time>]", trust.cmd_x509_verify, extension=True),
)

KEY_ID_HELP = """\
Key/keyring ID:
  <nnn>   numeric keyring ID
  @t      thread keyring
  @p      process keyring
  @s      session keyring
  @u      user keyring
  @us     user default session keyring
  @g      group keyring
  @a      assumed request_key authorisation key
  %<type>:<desc>  the key of that type and description (%:<desc> is a keyring)
"""


def find(word: str) -> Command:
    """The command named ``word``, or the only one it is a prefix of."""
    runnable = [c for c in COMMANDS if c.handler is not None]
    for c in runnable:
        if c.name == word:
            return c
    if word.startswith("-"):  # options are not abbreviated: "-" and "--" would have been --version
        raise LookupError("Unknown command")
    matches = [c for c in runnable if c.name.startswith(word)] if word else []
    if not matches:
        raise LookupError("Unknown command")
    if len(matches) > 1:
        raise LookupError("Ambiguous command")
    return matches[0]


def _synopsis(c: Command) -> str:
    return f"  keyden {c.name} {c.usage}".rstrip() + "\n"


def format_usage(name: str) -> str:
    return "Format:\n" + "".join(_synopsis(c) for c in COMMANDS if c.name == name)


def format_help() -> str:
    extensions = sorted({c.name for c in COMMANDS if c.extension})
    return ("Format:\n  keyden [--socket <path>] <command> [<args>]\n"
            + "".join(_synopsis(c) for c in COMMANDS) + "\n" + KEY_ID_HELP + "\n"
            + "keyden's own (not in keyctl): " + ", ".join(extensions)
            + "; add/padd --password, --password-file, --no-export, --use; pkey_decrypt --into.\n"
            + "A unique prefix of a command name selects it.\n")
