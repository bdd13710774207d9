"""keyden's own commands for session keys and for data processed by key serial.

Session keys: ``derive`` (ECDH/X25519 then a KDF), ``kdf`` (a key from a
key), ``pkey_decrypt ... --into`` (RSA key transport) all make a new logon
key and print only its serial; ``dh_compute*`` are keyctl(1)'s commands and,
like the kernel's, print their result.  Data: ``aead``, ``cipher``, ``hash``,
``hmac`` and ``hmac_verify`` read stdin and write stdout in pieces (the
daemon's STREAM ops), so input of any size works and the key stays inside.

Conventions are commands.py's: handlers take the words after the command
name, a refused operation is ``<function>: <strerror>`` and status 1, a
command line that does not fit is the usage and status 2.  Options may come
anywhere among the words; only the names a command knows are options, so a
key written as a negative number (-3 is @s) is still a key.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterator

from keyden import errors as E
from keyden.cli.support import (Context, Exit, Output, Usage, arguments, call, expect, failure, hex_to_bytes, hexdump,
                                number, options, pkey_info, pkey_password, read_file, read_stdin, stdin_chunks)
from keyden.crypto import symmetric
from keyden.crypto.agreement import MAX_KDF_OUTPUT, MIN_DERIVED_KEY

ONE_SHOT_LIMIT = 64 << 20  # AEADs pyca cannot stream (ChaCha20-Poly1305) take the whole input at once
KEY_OPTIONS = ("--kdf", "--salt", "--info", "--length", "--desc", "--perm", "--timeout")
KEY_USAGE = ("[--kdf <kdf>] [--salt <hex>] [--info <hex>] [--length <n>] [--desc <desc>] [--perm <mask>] "
             "[--timeout <secs>]")


# ----------------------------------------------------------------- helpers


def hex_arg(text: str) -> bytes:
    return hex_to_bytes(os.fsencode(text))


def new_key_options(opts: dict) -> dict:
    """client.derive/kdf keyword arguments from --kdf, --salt, --info, --length, --desc, --perm, --timeout."""
    out: dict[str, object] = {}
    if "--kdf" in opts:
        out["kdf"] = opts["--kdf"]
    for name in ("--salt", "--info"):
        if name in opts:
            out[name[2:]] = hex_arg(opts[name])
    if "--length" in opts:
        out["length"] = unsigned32(opts["--length"], "length", 10, low=MIN_DERIVED_KEY, high=MAX_KDF_OUTPUT)
    if "--desc" in opts:
        out["description"] = opts["--desc"]
    if "--perm" in opts:
        out["perm"] = unsigned32(opts["--perm"], "permissions")
    if "--timeout" in opts:
        out["timeout"] = unsigned32(opts["--timeout"], "timeout", 10)
    return out


def unsigned32(text: str, what: str, base: int = 0, low: int = 0, high: int = 0xFFFFFFFF) -> int:
    """A keyden option's u32: empty, negative or out of range is refused (keyctl's own commands take ''
    as 0 and wrap the others, as C's strtoul does, and keep doing so; keyden's are free to say no)."""
    if not text.strip():
        raise Exit(2, f"Unparsable {what}: '{text}'")
    value = number(text, what, base)
    if text.lstrip().startswith("-") or not low <= value <= high:
        raise Exit(2, f"Out of range {what}: '{text}' ({low} to {high})")
    return value


def public_key_file(name: str) -> bytes:
    """A peer's public key: DER SubjectPublicKeyInfo or a raw point as they are; PEM turned into DER."""
    data = read_file(name)
    if data.lstrip().startswith(b"-----BEGIN"):
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            return data  # the daemon refuses it with EINVAL, as any other bad peer
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def print_result(data: bytes) -> None:
    """keyctl's dh_compute output: a count line, then the bytes as keyctl read lays them out."""
    print(f"{len(data)} bytes of data in result:")
    print(hexdump(data))


def algorithm(function: str, name: str, kind: str) -> symmetric.AlgorithmSpec:
    """The named algorithm if it is of this kind; else ENOENT, as the kernel's crypto API says."""
    return call(function, symmetric.spec, name, kind)


class Unverified:
    """Plaintext whose tag is not checked yet: kept back from stdout (up to ONE_SHOT_LIMIT, then it must
    go) so a forged message prints nothing; an -o file is safe as it is (Output)."""

    def __init__(self, out: Output):
        self.out = out
        self.pieces: list[bytes] | None = [] if out.direct else None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.pieces is None:
            self.out.write(data)
            return
        self.pieces.append(data)
        self.size += len(data)
        if self.size > ONE_SHOT_LIMIT:  # more than we hold in memory: from here on, the status decides
            self.verified()
            self.pieces = None

    def verified(self) -> None:
        """The tag checked out: what was held goes out."""
        for piece in self.pieces or ():
            self.out.write(piece)
        self.pieces = []


# ------------------------------------------------------------- session keys


def cmd_derive(ctx: Context, args: list[str]) -> None:
    opts, words = options(args, valued=KEY_OPTIONS + ("--peer-file",), anywhere=True)
    peer_file = opts.get("--peer-file")
    expect(words, 2 if peer_file else 3)
    private = ctx.key(words[0])
    peer, peer_key = (public_key_file(peer_file), 0) if peer_file else (b"", ctx.key(words[1]))
    ring = ctx.key(words[-1])
    print(call("keyden_derive", ctx.client.derive, private, peer, peer_key=peer_key, keyring=ring,
               **new_key_options(opts)))


def cmd_kdf(ctx: Context, args: list[str]) -> None:
    opts, words = options(args, valued=KEY_OPTIONS, anywhere=True)
    expect(words, 2)
    key, ring = ctx.key(words[0]), ctx.key(words[1])
    print(call("keyden_kdf", ctx.client.kdf, key, keyring=ring, **new_key_options(opts)))


def cmd_dh_compute(ctx: Context, args: list[str]) -> None:
    expect(args, 3)
    private, prime, base = (ctx.key(a) for a in args)
    print_result(call("keyctl_dh_compute_alloc", ctx.client.dh_compute, private, prime, base))


def _dh_compute_kdf(ctx: Context, args: list[str], otherinfo: bytes) -> None:
    private, prime, base = (ctx.key(a) for a in args[:3])
    length = number(args[3], "length", 10)
    print_result(call("keyctl_dh_compute_kdf", ctx.client.dh_compute_kdf, private, prime, base, args[4], length,
                      otherinfo))


def cmd_dh_compute_kdf(ctx: Context, args: list[str]) -> None:
    expect(args, 5)
    _dh_compute_kdf(ctx, args, b"")


def cmd_dh_compute_kdf_oi(ctx: Context, args: list[str]) -> None:
    """As dh_compute_kdf, with the KDF's OtherInfo read from stdin (hex with -x)."""
    as_hex = bool(args) and args[0] == "-x"
    if as_hex:
        args = args[1:]
    expect(args, 5)
    otherinfo = read_stdin()
    _dh_compute_kdf(ctx, args, hex_to_bytes(otherinfo) if as_hex else otherinfo)


def with_decrypt_into(plain):
    """pkey_decrypt as keyctl's; with ``--into <desc> <keyring>`` at the end, the plaintext (a transported
    session key) becomes a new logon key instead of output, and its serial is printed."""
    def cmd_pkey_decrypt(ctx: Context, args: list[str]):
        if "--into" not in args:
            return plain(ctx, args)
        at = args.index("--into")
        words, into = args[:at], args[at + 1:]
        if len(words) < 3 or len(into) != 2:
            raise Usage()
        info = pkey_info(words[3:])
        key = ctx.key(words[0])
        pkey_password(words[1])
        data = read_file(words[2])
        ring = ctx.key(into[1])
        print(call("keyden_pkey_decrypt_into", ctx.client.pkey_decrypt_into, key, info, data, into[0], ring))
    return cmd_pkey_decrypt


# --------------------------------------------------------------------- data


def _direction(word: str) -> bool:
    """True to decrypt."""
    if word not in ("encrypt", "decrypt"):
        raise Usage()
    return word == "decrypt"


def _take(chunks: Iterator[bytes], size: int) -> tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes of the input (fewer if it is shorter), and the rest of it."""
    head = b""
    for chunk in chunks:
        head += chunk
        if len(head) >= size:
            break
    return head[:size], itertools.chain([head[size:]], chunks)


def _bad_message() -> Exit:
    return failure("keyden_aead", E.EBADMSG())


def cmd_aead(ctx: Context, args: list[str]) -> None:
    """AEAD through keyden.  Without --nonce, encryption lets keyden choose it and writes nonce || ct || tag."""
    opts, words = options(args, valued=("-a", "--aad", "--nonce", "-o"), anywhere=True)
    expect(words, 2)
    decrypt = _direction(words[0])
    key = ctx.key(words[1])
    # Without -a: the AEAD genkey made the key for, else gcm(aes), as client.aead(key) chooses.
    name = opts["-a"] if "-a" in opts else call("keyden_aead", lambda: ctx.client.aead(key).alg)
    spec = algorithm("keyden_aead", str(name), "aead")
    aad = hex_arg(opts.get("--aad", ""))
    nonce = hex_arg(opts["--nonce"]) if "--nonce" in opts else None
    with Output(opts.get("-o")) as out:
        if spec.name == "gcm(aes)":
            _aead_stream(ctx, key, spec, nonce, aad, decrypt, out)
        else:
            _aead_one_shot(ctx, key, spec, nonce, aad, decrypt, out)


def _aead_stream(ctx, key: int, spec, nonce: bytes | None, aad: bytes, decrypt: bool, out: Output) -> None:
    """gcm(aes) in pieces.  Decrypting holds back the last tag_size bytes of the input: they are the tag.

    The tag is checked at the end.  Output makes that safe for -o files; on
    stdout the plaintext is held until the tag checks out, up to
    ONE_SHOT_LIMIT: only a larger message goes out before, and its readers
    must wait for our status.
    """
    chunks = stdin_chunks()
    if not decrypt:
        stream = call("keyden_aead", ctx.client.stream, spec.name, key, iv=nonce or b"", aad=aad,
                      random_nonce=nonce is None)
        first = next(chunks, b"")  # an unreadable stdin fails before anything is written
        out.write(stream.nonce)
        for chunk in itertools.chain((first,), chunks):
            out.write(call("keyden_aead", stream.update, chunk))
        last, tag = call("keyden_aead", stream.finalize)
        out.write(last + tag)
        return
    if nonce is None:
        nonce, chunks = _take(chunks, spec.nonce_size)
        if len(nonce) < spec.nonce_size:
            raise _bad_message()
    stream = call("keyden_aead", ctx.client.stream, spec.name, key, iv=nonce, aad=aad, decrypt=True)
    unverified = Unverified(out)
    held = b""
    for chunk in chunks:
        held += chunk
        if len(held) > spec.tag_size:
            unverified.write(call("keyden_aead", stream.update, held[:-spec.tag_size]))
            held = held[-spec.tag_size:]
    if len(held) < spec.tag_size:
        raise _bad_message()
    last, _ = call("keyden_aead", stream.finalize, b"", held)
    unverified.write(last)
    unverified.verified()


def _aead_one_shot(ctx, key: int, spec, nonce: bytes | None, aad: bytes, decrypt: bool, out: Output) -> None:
    """AEADs that cannot stream: the whole input at once (shared memory carries it when large)."""
    overhead = spec.tag_size + (spec.nonce_size if nonce is None else 0) if decrypt else 0
    data = b"".join(_bounded(stdin_chunks(), ONE_SHOT_LIMIT + overhead))  # what encrypt takes, decrypt takes back
    aead = ctx.client.aead(key, spec.name)
    if decrypt:
        if nonce is None:  # input too short to hold a nonce is a bad message; a --nonce of the wrong size, EINVAL
            nonce, data = data[:spec.nonce_size], data[spec.nonce_size:]
            if len(nonce) != spec.nonce_size:
                raise _bad_message()
        if len(data) < spec.tag_size:
            raise _bad_message()
        out.write(call("keyden_aead", aead.decrypt, nonce, data, aad))
    elif nonce is None:
        out.write(call("keyden_aead", aead.encrypt_random, data, aad))
    else:
        out.write(call("keyden_aead", aead.encrypt, nonce, data, aad))


def _bounded(chunks: Iterator[bytes], limit: int) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise Exit(1, f"keyden_aead: input over {ONE_SHOT_LIMIT >> 20} MiB; only gcm(aes) streams")
        yield chunk


def cmd_cipher(ctx: Context, args: list[str]) -> None:
    """cbc(aes)/ctr(aes) in pieces, no padding (as the kernel's skcipher): cbc input must be whole blocks."""
    opts, words = options(args, valued=("-a", "--iv", "-o"), anywhere=True)
    expect(words, 2)
    if "-a" not in opts or "--iv" not in opts:
        raise Usage()
    decrypt = _direction(words[0])
    key = ctx.key(words[1])
    spec = algorithm("keyden_cipher", str(opts["-a"]), "skcipher")
    iv = hex_arg(opts["--iv"])
    stream = call("keyden_cipher", ctx.client.stream, spec.name, key, iv=iv, decrypt=decrypt)
    with Output(opts.get("-o")) as out:
        for chunk in stdin_chunks():
            out.write(call("keyden_cipher", stream.update, chunk))
        out.write(call("keyden_cipher", stream.finalize)[0])


def cmd_hash(ctx: Context, args: list[str]) -> None:
    args = arguments(args)
    expect(args, 1)
    spec = algorithm("keyden_hash", args[0], "hash")
    stream = call("keyden_hash", ctx.client.hash, spec.name)
    for chunk in stdin_chunks():
        call("keyden_hash", stream.update, chunk)
    print(call("keyden_hash", stream.finalize)[1].hex())


def _mac_of_stdin(ctx: Context, function: str, key_arg: str, alg: str, tag: bytes = b"") -> bytes:
    """The MAC of stdin under the key; with ``tag``, checked against it inside keyden instead (EBADMSG)."""
    key = ctx.key(key_arg)
    spec = algorithm(function, alg, "hmac")
    stream = call(function, ctx.client.stream, spec.name, key, decrypt=bool(tag))
    for chunk in stdin_chunks():
        call(function, stream.update, chunk)
    return call(function, stream.finalize, tag=tag)[1]


def cmd_hmac(ctx: Context, args: list[str]) -> None:
    opts, words = options(args, valued=("-a",), anywhere=True)
    expect(words, 1)
    print(_mac_of_stdin(ctx, "keyden_hmac", words[0], str(opts.get("-a", "hmac(sha256)"))).hex())


def cmd_hmac_verify(ctx: Context, args: list[str]) -> int:
    """Status 0 if the tag is the MAC of stdin, 1 (Bad message) if not; truncated tags are refused (EINVAL)."""
    opts, words = options(args, valued=("-a",), anywhere=True)
    expect(words, 2)
    expected = hex_arg(words[1])
    if not expected:
        raise failure("keyden_hmac_verify", E.EINVAL(), "a tag to check, in hex, is required")
    _mac_of_stdin(ctx, "keyden_hmac_verify", words[0], str(opts.get("-a", "hmac(sha256)")), expected)
    return 0
