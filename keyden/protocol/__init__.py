"""keyden's wire protocol, shared by client and server (imports neither).

Every message is a frame: a 12-byte header then a body.

    header = <u32 body length> <u32 request id> <u16 opcode> <u16 status>

Requests carry status 0.  A response echoes the request id and opcode; status
0 means success and the body holds the op's result fields, any other status is
a Linux errno value and the body is one STR, the human message.  Bodies are
the op's fields in order, each encoded by its kind (see ``Kind``).  Requests
may be pipelined: send many, match responses by request id.  The written spec
is docs/protocol.md; this module is the single source of truth for both ends.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from keyden import errors as E

VERSION = 1
MIN_VERSION = 1
HEADER = struct.Struct("<IIHH")
HEADER_SIZE = HEADER.size
DEFAULT_MAX_FRAME = 16 * 1024 * 1024 + 4096
MAX_SHARED_REGION = 1 << 30  # SHM_ATTACH: the largest region the daemon maps


class Op(enum.IntEnum):
    """Opcodes.  Values are explicit and never reused."""

    HELLO = 1
    ADD = 2
    REQUEST = 3
    UPDATE = 4
    REVOKE = 5
    INVALIDATE = 6
    CLEAR = 7
    LINK = 8
    UNLINK = 9
    MOVE = 10
    SEARCH = 11
    READ = 12
    DESCRIBE = 13
    CHOWN = 14
    SETPERM = 15
    SET_TIMEOUT = 16
    GET_KEYRING_ID = 17
    JOIN_SESSION = 18
    LEAVE_SESSION = 19
    RESTRICT_KEYRING = 20
    FIND = 21
    CAPABILITIES = 22
    PKEY_QUERY = 23
    PKEY_ENCRYPT = 24
    PKEY_DECRYPT = 25
    PKEY_SIGN = 26
    PKEY_VERIFY = 27
    GENKEY = 28
    PUBLIC_KEY = 29
    PING = 30
    WHOAMI = 31
    QUOTA = 32
    SESSIONS = 33
    END_SESSION = 34
    KEYS = 35  # the /proc/keys view, a page at a time
    # Session keys: agreement and key transport whose results stay inside.
    DERIVE = 40
    DH_COMPUTE = 41
    DH_COMPUTE_KDF = 42
    PKEY_DECRYPT_INTO = 43
    KDF = 44
    # Data shoveling by key serial (AF_ALG's ALG_SET_KEY_BY_KEY_SERIAL).
    CIPHER = 50
    DIGEST = 51
    MAC = 52
    MAC_VERIFY = 53
    BATCH = 54
    KEY_ALGORITHM = 55  # what genkey made a symmetric key for: the default algorithm of its helpers
    STREAM_INIT = 60
    STREAM_UPDATE = 61
    STREAM_FINAL = 62
    STREAM_ABORT = 63
    STREAM_COPY = 64  # a hash or HMAC stream's state into a second stream (pyca's Hash.copy, HMAC.copy)
    SHM_ATTACH = 70
    SHM_DETACH = 71
    SHM_CIPHER = 72
    # Trust (docs/trust.md): X.509 path validation against trust keyrings.
    X509_VERIFY = 80
    # TLS inside keyden (docs/tls.md): a connected socket goes in, a plaintext socket comes back.
    TLS_ACCEPT = 90
    TLS_CONNECT = 91
    TLS_ESTABLISHED = 92  # never requested: the first frame on the plaintext socket TLS_* pass back
    TLS_ABORT = 93  # the plaintext socket, passed back: its session ends without close_notify (a FIN)
    TLS_PEER_END = 94  # the plaintext socket, passed back: how the peer ended (close_notify or a truncation)
    TLS_CLOSE_NOTIFY = 95  # the plaintext socket, passed back: its data, then close_notify (TLS_EXPLICIT_CLOSE)
    # Persistent keyrings and the sealed store (docs/persistence.md).
    GET_PERSISTENT = 100
    EXPORT = 101
    IMPORT = 102
    REKEY = 103
    ADD_FLAGS = 104
    GENKEY_FLAGS = 105


class Kind(enum.Enum):
    """Field encodings (all little-endian)."""

    U8 = "B"
    U16 = "H"
    I32 = "i"
    U32 = "I"
    I64 = "q"
    BYTES = "bytes"  # u32 length, then the bytes
    STR = "str"  # u32 length, then UTF-8
    I32S = "i32s"  # u32 count, then that many i32
    U64 = "Q"
    BYTESLIST = "bytes*"  # u32 count, that many u32 lengths, then the items back to back


_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    most: int | None = None  # BYTESLIST, I32S: more items are E2BIG, refused before any is made


class Schema:
    """An ordered list of fields, with an encoder and a decoder compiled for exactly these fields.

    Both run on every request at both ends, so each schema gets straight-line
    code (made once, by ``_compile``): runs of fixed-size fields and the length
    that follows them become one struct call, and no per-field loop or kind test
    is left for run time.  It is made at a schema's first use, not at import:
    a CLI command uses two or three of the hundreds, and making them all took
    most of its start-up.
    """

    def __init__(self, *fields: tuple[str, Kind] | tuple[str, Kind, int]):
        self.fields = tuple(Field(*f) for f in fields)
        self.names = tuple(f.name for f in self.fields)
        self._encode, self._decode = self._encode_first, self._decode_first  # replaced by the compiled pair

    def _encode_first(self, *values):
        self._encode, self._decode = _compile(self.fields)
        return self._encode(*values)

    def _decode_first(self, body):
        self._encode, self._decode = _compile(self.fields)
        return self._decode(body)

    def encode(self, values: Sequence[Any]) -> bytes:
        if len(values) != len(self.fields):
            raise E.EINVAL(f"expected {len(self.fields)} fields, got {len(values)}")
        try:
            return self._encode(*values)
        except (struct.error, TypeError, AttributeError, UnicodeError, OverflowError):
            raise E.EINVAL(self._what_is_wrong(values)) from None

    def _what_is_wrong(self, values: Sequence[Any]) -> str:
        """Which field would not encode, and why, naming its type or range (never its value: it may be a secret)."""
        for f, v in zip(self.fields, values):
            kind = f.kind
            if kind is Kind.STR:
                if not isinstance(v, str):
                    return f"field {f.name!r} must be a str, not {type(v).__name__}"
                try:
                    v.encode()
                except UnicodeError:
                    return f"field {f.name!r} is not valid text (lone surrogates cannot be UTF-8)"
            elif kind is Kind.BYTES:
                try:
                    memoryview(v)
                except TypeError:
                    return f"field {f.name!r} must be bytes-like, not {type(v).__name__}"
            elif kind in (Kind.I32S, Kind.BYTESLIST):
                if not isinstance(v, (list, tuple)):
                    return f"field {f.name!r} must be a list, not {type(v).__name__}"
            else:
                size = struct.calcsize("<" + kind.value)
                lo, hi = (-(1 << (8 * size - 1)), (1 << (8 * size - 1)) - 1) if kind.value.islower() else \
                    (0, (1 << (8 * size)) - 1)
                if isinstance(v, bool) or not isinstance(v, int):
                    return f"field {f.name!r} must be an integer, not {type(v).__name__}"
                if not lo <= v <= hi:
                    return f"field {f.name!r} is out of range ({lo}..{hi})"
        return "a field value cannot be encoded (a list item of the wrong type or range)"

    def decode(self, body: bytes | memoryview) -> tuple:
        """Decode a whole body; any mismatch is EPROTO (the frame is well-delimited, its body is not)."""
        try:
            return self._decode(body)
        except struct.error:
            raise E.EPROTO("truncated body") from None
        except UnicodeDecodeError:
            raise E.EPROTO("a string field is not UTF-8") from None


def _compile(fields: tuple[Field, ...]):
    """Source for (encode(*values) -> bytes, decode(body) -> tuple), exec'd with the structs it names."""
    env: dict[str, Any] = {"_bytes_list": _bytes_list, "_pack_bytes_list": _pack_bytes_list, "_i32s": _i32s,
                           "_pack_i32s": _pack_i32s, "_truncated": _truncated, "_trailing": _trailing}

    def struct_name(fmt: str) -> str:
        name = f"_S{len(env)}"
        env[name] = struct.Struct("<" + fmt)
        return name

    args = [f"v{i}" for i in range(len(fields))]
    prologue: list[str] = []  # encode: STR fields become their UTF-8 bytes first
    parts: list[str] = []  # encode: expressions joined into the body
    dec = ["    end = len(body)", "    pos = 0"]
    run_fmt, run_vals, run_outs = "", [], []  # fixed-size fields waiting for one struct call
    for i, f in enumerate(fields + (None,)):  # None: the end, which closes the last run
        v = args[i] if f is not None else ""
        if f is not None and len(f.kind.value) == 1:
            run_fmt, run_vals, run_outs = run_fmt + f.kind.value, run_vals + [v], run_outs + [v]
            continue
        sized = f is not None and f.kind in (Kind.BYTES, Kind.STR)
        if sized:  # its length joins the run
            if f.kind is Kind.STR:
                prologue.append(f"{v} = {v}.encode()")
            run_fmt, run_vals, run_outs = run_fmt + "I", run_vals + [f"len({v})"], run_outs + ["n"]
        if run_fmt:
            name = struct_name(run_fmt)
            parts.append(f"{name}.pack({', '.join(run_vals)})")
            dec.append(f"    {', '.join(run_outs)}, = {name}.unpack_from(body, pos)")
            dec.append(f"    pos += {env[name].size}")
            run_fmt, run_vals, run_outs = "", [], []
        if f is None:
            break
        if sized:
            parts.append(v)
            dec += ["    stop = pos + n", "    if stop > end: _truncated()",
                    f"    {v} = str(body[pos:stop], 'utf-8')" if f.kind is Kind.STR else f"    {v} = bytes(body[pos:stop])",
                    "    pos = stop"]
        elif f.kind is Kind.BYTESLIST:
            parts.append(f"_pack_bytes_list({v})")
            dec.append(f"    {v}, pos = _bytes_list(body, pos, end, {f.most}, {f.name!r})")
        else:  # I32S
            parts.append(f"_pack_i32s({v})")
            dec.append(f"    {v}, pos = _i32s(body, pos, end, {f.most}, {f.name!r})")
    body = parts[0] if len(parts) == 1 and not prologue and parts[0].startswith("_S") else \
        f"b''.join(({', '.join(parts)},))" if parts else "b''"
    encode_src = (f"def encode({', '.join(args)}):\n" + "".join(f"    {line}\n" for line in prologue)
                  + f"    return {body}\n")
    decode_src = ("def decode(body):\n" + "\n".join(dec) + "\n    if pos != end: _trailing()\n"
                  + f"    return ({''.join(a + ', ' for a in args)})\n")
    exec(encode_src + decode_src, env)  # noqa: S102 -- source built above from the schema's own kinds
    return env["encode"], env["decode"]


def _truncated():
    raise E.EPROTO("truncated field")


def _trailing():
    raise E.EPROTO("trailing bytes after the last field")


def _pack_bytes_list(items) -> bytes:
    """Lengths first, so both ends handle a batch in a few C calls."""
    return b"".join((struct.pack(f"<I{len(items)}I", len(items), *map(len, items)), *items))


_STRUCT_ITEMS = 1024  # the struct module caches 100 formats: at most ~100 x 1024 codes (a few MB), bounded


def _bytes_list(body, pos: int, end: int, most: int | None, name: str) -> tuple[list[bytes], int]:
    (n,) = _U32.unpack_from(body, pos)
    pos += 4
    if most is not None and n > most:  # a 16 MiB body holds millions of empty items: each would be an object
        raise E.E2BIG(f"at most {most} items in {name}")
    if n > (end - pos) // 4:  # each item needs at least its 4-byte length
        _truncated()
    lengths = struct.unpack_from(f"<{n}I", body, pos)
    pos += 4 * n
    stop = pos + sum(lengths)
    if stop > end:
        _truncated()
    if n > _STRUCT_ITEMS:  # struct keeps compiled formats: one as long as a 16 MiB body's would pin ~100 MB
        starts = itertools.accumulate(lengths, initial=pos)
        return [bytes(body[a:a + m]) for a, m in zip(starts, lengths)], stop
    if not n:
        return [], stop
    # Up to a batch's size, one struct call cuts every item ("<12s64s..."): no Python step per item.  Items
    # of one size (a batch's nonces, often its messages) make the same format each time: compiled once.
    first = lengths[0]
    fmt = f"{first}s" * n if lengths.count(first) == n else "s".join(map(str, lengths)) + "s"
    return list(struct.unpack_from("<" + fmt, body, pos)), stop


def _pack_i32s(values) -> bytes:
    return struct.pack(f"<I{len(values)}i", len(values), *values)


def _i32s(body, pos: int, end: int, most: int | None, name: str) -> tuple[list[int], int]:
    (n,) = _U32.unpack_from(body, pos)
    pos += 4
    if most is not None and n > most:  # 16 MiB of them would be ~150 MB of int objects
        raise E.E2BIG(f"at most {most} items in {name}")
    stop = pos + 4 * n
    if stop > end:
        _truncated()
    return list(struct.unpack_from(f"<{n}i", body, pos)), stop


K = Kind
_KEY = ("key", K.I32)
_RING = ("keyring", K.I32)
_NONE = Schema()

MAX_BATCH = 65536  # items in one BATCH request
MAX_ALPN = 32766  # ALPN names in a TLS request: one byte each and its length byte fill the extension's 65533

#: op -> (request schema, response schema)
SCHEMAS: dict[Op, tuple[Schema, Schema]] = {
    Op.HELLO: (Schema(("min_version", K.U16), ("max_version", K.U16), ("session", K.STR), ("client", K.STR)),
               Schema(("version", K.U16), ("max_frame", K.U32), ("uid", K.I64), ("gid", K.I64), ("pid", K.I64))),
    Op.ADD: (Schema(("type", K.STR), ("description", K.STR), ("payload", K.BYTES), _RING, ("secret", K.BYTES)),
             Schema(("serial", K.I32))),
    Op.REQUEST: (Schema(("type", K.STR), ("description", K.STR), ("dest", K.I32)), Schema(("serial", K.I32))),
    Op.UPDATE: (Schema(_KEY, ("payload", K.BYTES)), _NONE),
    Op.REVOKE: (Schema(_KEY), _NONE),
    Op.INVALIDATE: (Schema(_KEY), _NONE),
    Op.CLEAR: (Schema(_RING), _NONE),
    Op.LINK: (Schema(_KEY, _RING), _NONE),
    Op.UNLINK: (Schema(_KEY, _RING), _NONE),
    Op.MOVE: (Schema(_KEY, ("from", K.I32), ("to", K.I32), ("flags", K.U32)), _NONE),
    Op.SEARCH: (Schema(_RING, ("type", K.STR), ("description", K.STR), ("dest", K.I32)), Schema(("serial", K.I32))),
    Op.READ: (Schema(_KEY), Schema(("is_keyring", K.U8), ("data", K.BYTES))),
    Op.DESCRIBE: (Schema(_KEY), Schema(("serial", K.I32), ("type", K.STR), ("uid", K.I64), ("gid", K.I64), ("perm", K.U32),
                                       ("description", K.STR))),
    Op.CHOWN: (Schema(_KEY, ("uid", K.I64), ("gid", K.I64)), _NONE),
    Op.SETPERM: (Schema(_KEY, ("perm", K.U32)), _NONE),
    Op.SET_TIMEOUT: (Schema(_KEY, ("timeout", K.U32)), _NONE),
    Op.GET_KEYRING_ID: (Schema(_KEY, ("create", K.U8)), Schema(("serial", K.I32))),
    Op.JOIN_SESSION: (Schema(("name", K.STR)), Schema(("serial", K.I32), ("token", K.STR))),
    Op.LEAVE_SESSION: (Schema(("token", K.STR)), _NONE),
    Op.SESSIONS: (_NONE, Schema(("serials", K.I32S), ("names", K.BYTESLIST))),
    Op.END_SESSION: (Schema(("keyring", K.I32)), _NONE),
    Op.KEYS: (Schema(("after", K.I32)), Schema(("keys", K.BYTESLIST), ("next", K.I32))),
    Op.RESTRICT_KEYRING: (Schema(_RING, ("type", K.STR), ("restriction", K.STR)), _NONE),
    Op.FIND: (Schema(("type", K.STR), ("description", K.STR)), Schema(("serial", K.I32))),
    Op.CAPABILITIES: (_NONE, Schema(("names", K.STR))),
    Op.PKEY_QUERY: (Schema(_KEY, ("info", K.STR)),
                    Schema(("supported_ops", K.U32), ("key_size", K.U32), ("max_data_size", K.U32),
                           ("max_sig_size", K.U32), ("max_enc_size", K.U32), ("max_dec_size", K.U32))),
    Op.PKEY_ENCRYPT: (Schema(_KEY, ("info", K.STR), ("data", K.BYTES)), Schema(("data", K.BYTES))),
    Op.PKEY_DECRYPT: (Schema(_KEY, ("info", K.STR), ("data", K.BYTES)), Schema(("data", K.BYTES))),
    Op.PKEY_SIGN: (Schema(_KEY, ("info", K.STR), ("data", K.BYTES)), Schema(("signature", K.BYTES))),
    Op.PKEY_VERIFY: (Schema(_KEY, ("info", K.STR), ("data", K.BYTES), ("signature", K.BYTES)), _NONE),
    Op.GENKEY: (Schema(("spec", K.STR), ("description", K.STR), _RING), Schema(("serial", K.I32))),
    Op.PUBLIC_KEY: (Schema(_KEY), Schema(("spki", K.BYTES), ("certificate", K.BYTES))),
    Op.PING: (Schema(("data", K.BYTES)), Schema(("data", K.BYTES))),
    Op.WHOAMI: (_NONE, Schema(("uid", K.I64), ("gid", K.I64), ("pid", K.I64), ("session", K.I32))),
    Op.QUOTA: (_NONE, Schema(("keys", K.U32), ("bytes", K.U32), ("maxkeys", K.U32), ("maxbytes", K.U32))),
    Op.DERIVE: (Schema(("private", K.I32), ("peer", K.BYTES), ("peer_key", K.I32), ("kdf", K.STR), ("salt", K.BYTES),
                       ("info", K.BYTES), ("length", K.U32), ("description", K.STR), _RING, ("perm", K.U32),
                       ("timeout", K.U32)),
                Schema(("serial", K.I32))),
    Op.DH_COMPUTE: (Schema(("private", K.I32), ("prime", K.I32), ("base", K.I32)), Schema(("data", K.BYTES))),
    Op.DH_COMPUTE_KDF: (Schema(("private", K.I32), ("prime", K.I32), ("base", K.I32), ("hash", K.STR),
                               ("length", K.U32), ("otherinfo", K.BYTES)), Schema(("data", K.BYTES))),
    Op.PKEY_DECRYPT_INTO: (Schema(_KEY, ("info", K.STR), ("data", K.BYTES), ("description", K.STR), _RING,
                                  ("perm", K.U32)), Schema(("serial", K.I32))),
    Op.KDF: (Schema(_KEY, ("kdf", K.STR), ("salt", K.BYTES), ("info", K.BYTES), ("length", K.U32),
                    ("description", K.STR), _RING, ("perm", K.U32), ("timeout", K.U32)),
             Schema(("serial", K.I32))),
    Op.CIPHER: (Schema(("alg", K.STR), _KEY, ("flags", K.U32), ("iv", K.BYTES), ("aad", K.BYTES), ("data", K.BYTES)),
                Schema(("data", K.BYTES))),
    Op.DIGEST: (Schema(("alg", K.STR), ("data", K.BYTES)), Schema(("digest", K.BYTES))),
    Op.MAC: (Schema(("alg", K.STR), _KEY, ("data", K.BYTES)), Schema(("mac", K.BYTES))),
    Op.MAC_VERIFY: (Schema(("alg", K.STR), _KEY, ("data", K.BYTES), ("mac", K.BYTES)), _NONE),
    Op.BATCH: (Schema(("alg", K.STR), _KEY, ("flags", K.U32), ("ivs", K.BYTESLIST, MAX_BATCH),
                      ("aads", K.BYTESLIST, MAX_BATCH), ("items", K.BYTESLIST, MAX_BATCH)),
               Schema(("status", K.I32S), ("results", K.BYTESLIST))),
    Op.KEY_ALGORITHM: (Schema(_KEY), Schema(("alg", K.STR))),
    Op.STREAM_INIT: (Schema(("alg", K.STR), _KEY, ("flags", K.U32), ("iv", K.BYTES), ("aad", K.BYTES)),
                     Schema(("stream", K.U32), ("iv", K.BYTES))),
    Op.STREAM_UPDATE: (Schema(("stream", K.U32), ("data", K.BYTES)), Schema(("data", K.BYTES))),
    Op.STREAM_FINAL: (Schema(("stream", K.U32), ("data", K.BYTES), ("tag", K.BYTES)),
                      Schema(("data", K.BYTES), ("tag", K.BYTES))),
    Op.STREAM_ABORT: (Schema(("stream", K.U32)), _NONE),
    Op.STREAM_COPY: (Schema(("stream", K.U32)), Schema(("stream", K.U32))),
    Op.SHM_ATTACH: (Schema(("size", K.U64)), Schema(("region", K.U32))),
    Op.SHM_DETACH: (Schema(("region", K.U32)), _NONE),
    Op.SHM_CIPHER: (Schema(("region", K.U32), ("alg", K.STR), _KEY, ("flags", K.U32), ("iv", K.BYTES),
                           ("aad", K.BYTES), ("in_offset", K.U64), ("length", K.U64), ("out_offset", K.U64)),
                    Schema(("length", K.U64), ("iv", K.BYTES))),
    Op.X509_VERIFY: (Schema(("cert", K.I32), ("trust", K.I32), ("chain", K.I32), ("host", K.STR), ("purpose", K.STR),
                            ("at", K.I64)),
                     Schema(("serials", K.I32S), ("subjects", K.BYTESLIST))),
    Op.TLS_ACCEPT: (Schema(_RING, ("client_trust", K.I32), ("flags", K.U32), ("alpn", K.BYTESLIST, MAX_ALPN),
                           ("timeout_ms", K.U32)), _NONE),
    Op.TLS_CONNECT: (Schema(("server_hostname", K.STR), ("trust", K.I32), ("identity", K.I32), ("flags", K.U32),
                            ("alpn", K.BYTESLIST, MAX_ALPN), ("timeout_ms", K.U32)), _NONE),
    Op.TLS_ESTABLISHED: (_NONE, Schema(("version", K.STR), ("cipher", K.STR), ("server_name", K.STR),
                                       ("alpn", K.STR), ("peer_subject", K.STR), ("peer_certificate", K.BYTES))),
    Op.TLS_ABORT: (_NONE, _NONE),
    Op.TLS_PEER_END: (_NONE, Schema(("peer_end", K.U32))),
    Op.TLS_CLOSE_NOTIFY: (_NONE, _NONE),
    Op.GET_PERSISTENT: (Schema(("uid", K.I64), _RING), Schema(("serial", K.I32))),
    Op.EXPORT: (Schema(_KEY, ("recipient", K.BYTES), ("recipient_key", K.I32), ("wrapping_key", K.I32)),
                Schema(("blob", K.BYTES))),
    Op.IMPORT: (Schema(("blob", K.BYTES), ("unwrap_with", K.I32), _RING, ("flags", K.U32)), Schema(("serial", K.I32))),
    Op.REKEY: (Schema(("passphrase", K.BYTES)), _NONE),
    Op.ADD_FLAGS: (Schema(("type", K.STR), ("description", K.STR), ("payload", K.BYTES), _RING, ("secret", K.BYTES),
                          ("flags", K.U32)), Schema(("serial", K.I32))),
    Op.GENKEY_FLAGS: (Schema(("spec", K.STR), ("description", K.STR), _RING, ("flags", K.U32)),
                      Schema(("serial", K.I32))),
}

ERROR_SCHEMA = Schema(("message", K.STR))

#: KEYS: each item of ``keys`` is one key, encoded with this schema (what a /proc/keys line shows).
#: expiry is in seconds since the epoch, 0 for none; usage counts the keyrings and roles holding the key.
KEY_RECORD = Schema(("serial", K.I32), ("type", K.STR), ("uid", K.I64), ("gid", K.I64), ("perm", K.U32),
                    ("state", K.U32), ("usage", K.U32), ("expiry", K.I64), ("description", K.STR),
                    ("summary", K.STR))

#: KEY_RECORD's state bits, by the name of the KeyStatus flag they carry.  /proc/keys' letters for the
#: states keyden has: R (revoked), Q (charged to its owner's quota), and "expd" for EXPIRED.  Every key is
#: instantiated (I); keyden has no dead, under-construction, negative or invalidated-but-kept keys
#: (D, U, N, i), whose letters stay "-".
KEY_STATE_BITS = (("revoked", 2), ("in_quota", 8), ("expired", 128), ("no_export", 256))

# Flag fields are plain ints, as keyctl's are, not enum.IntFlag: IntFlag's ``~`` keeps only the bits it
# defines (so ``flags & ~KNOWN`` would never see an unknown bit), and its operators make enum members on
# the request path.  Each flag's value is fixed and never reused.

# MOVE flags (KEYCTL_MOVE_EXCL).
MOVE_EXCL = 1

# CIPHER / BATCH / STREAM_INIT / SHM_CIPHER flags.
DECRYPT = 1  # decrypt (else encrypt); for MAC ops in BATCH: verify against the item's iv field
RANDOM_NONCE = 2  # AEAD encrypt: keyden picks the nonce and prepends it; decrypt: take it from the front

# Key flags (ADD_FLAGS, GENKEY_FLAGS, IMPORT): set at creation, never cleared.
NO_EXPORT = 1  # EXPORT refuses the key, and any keyring holding it (EPERM)
#: An asymmetric key's uses (ADD_FLAGS, GENKEY_FLAGS; IMPORT takes none, each key keeps its export's): it
#: does only what they name, any of them (none: everything).  Never reused.
KEY_USES = {"sign": 0x2, "decrypt": 0x4, "derive": 0x8}
KEY_USE_FLAGS = sum(KEY_USES.values())
# IMPORT's own flag, beside the key flags.
IMPORT_CONTENTS = 0x10000  # an exported keyring's members go into the target keyring, not a copy of it

#: CAPABILITIES: the kernel's KEYCTL_CAPABILITIES names, with the byte and bit it reports each in (keyctl
#: supports --raw).  The daemon answers with the names of those it has.
CAPABILITY_BITS = (
    ("capabilities", 0, 0x01), ("persistent_keyrings", 0, 0x02), ("dh_compute", 0, 0x04),
    ("public_key", 0, 0x08), ("big_key_type", 0, 0x10), ("key_invalidate", 0, 0x20),
    ("restrict_keyring", 0, 0x40), ("move_key", 0, 0x80), ("ns_keyring_name", 1, 0x01),
    ("ns_key_tag", 1, 0x02), ("notify", 1, 0x04),
)

#: The hashes a pkey_* info string may name (hash=, mgfhash=): pyca's names, which are the kernel's.
PKEY_HASHES = ("sha1", "sha224", "sha256", "sha384", "sha512", "sha3-256", "sha3-384", "sha3-512")
#: The longest pkey_* info string, in characters (the kernel's: one page).  An OAEP label travels in it as hex.
MAX_PKEY_INFO = 4096

# TLS_ACCEPT / TLS_CONNECT flags.
TLS_REQUIRE_CLIENT_CERT = 1  # TLS_ACCEPT: refuse a client without a certificate the client trust keyring accepts
TLS13_ONLY = 2  # no TLS 1.2
#: close_notify only after TLS_CLOSE_NOTIFY: the application's end of file without it (a crash, a kill) ends the
#: session as TLS_ABORT does, a truncation the peer can see
TLS_EXPLICIT_CLOSE = 4
# TLS_PEER_END: how the peer's side of a session ended.
TLS_PEER_OPEN = 0  # it has not
TLS_PEER_CLOSE_NOTIFY = 1  # with close_notify: all it sent has arrived
TLS_PEER_TRUNCATED = 2  # without: a TCP end or reset, or a broken record; what arrived may be cut short


# SCHEMAS is keyed by Op, an IntEnum: plain ints find the same entries without an enum conversion.

def request_schema(op: int) -> Schema:
    schemas = SCHEMAS.get(op)
    if schemas is None:
        raise E.ENOSYS(f"unknown opcode {op}")
    return schemas[0]


def response_schema(op: int) -> Schema:
    return SCHEMAS[op][1]


def encode_frame(request_id: int, op: int, status: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), request_id, op, status) + body


def encode_request(request_id: int, op: Op, *values: Any) -> bytes:
    return encode_frame(request_id, op, 0, SCHEMAS[op][0].encode(values))


def encode_response(request_id: int, op: int, values: Sequence[Any]) -> bytes:
    return encode_frame(request_id, op, 0, SCHEMAS[op][1].encode(values))


#: characters of an error message sent; a message quoting what the client sent is cut there, so an error
#: reply stays small whatever the request was
MAX_ERROR_MESSAGE = 1024


def encode_error(request_id: int, op: int, error: E.KeydenError) -> bytes:
    message = error.message
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE - 3] + "..."
    return encode_frame(request_id, op, error.code, ERROR_SCHEMA.encode((message,)))


@dataclass(slots=True)
class Frame:
    request_id: int
    op: int
    status: int
    body: bytes | memoryview


class FrameTooLarge(E.EMSGSIZE):
    """Raised by the decoder: the peer announced a body over the cap; close the connection."""


_ZEROS = memoryview(bytes(1 << 20))


def wipe(view: memoryview, n: int) -> None:
    """Zero ``view[:n]``: what a request or reply brought must not stay in a buffer kept for the next one.
    (From a zero page made once: a new ``bytes(n)`` each time cost 10 ms for 16 MiB, and a bytearray's own
    slice assignment 0.45 ms for 1 MiB.)"""
    if n <= len(_ZEROS):  # (every request and reply but a large one: no loop on the hot path)
        view[:n] = _ZEROS[:n]
        return
    for at in range(0, n, len(_ZEROS)):
        end = min(n, at + len(_ZEROS))
        view[at:end] = _ZEROS[:end - at]


def _take(buf: bytearray, n: int) -> None:
    """The first ``n`` bytes, decoded, off the buffer, wiped first: deleting the front of a bytearray only
    moves its start, and a payload or password left behind would stay until the memory was reused.  (What
    the buffer left behind when it grew is in freed memory, as Python's objects are.)"""
    with memoryview(buf) as view:
        wipe(view, n)
    del buf[:n]


def _copy(buf: bytearray, start: int, end: int) -> bytes:
    """``bytes(buf[start:end])`` without the bytearray that slice makes (a second copy, freed unwiped)."""
    with memoryview(buf) as view:
        return bytes(view[start:end])


class FrameDecoder:
    """Incremental frame parser: feed bytes, take whole frames.  Sans-IO, so it can be tested alone."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def frames(self) -> Iterator[Frame]:
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER_SIZE:
                length, rid, op, status = HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise FrameTooLarge(f"frame of {length} bytes exceeds the {self.max_frame}-byte cap")
                end = pos + HEADER_SIZE + length
                if len(buf) < end:
                    break
                yield Frame(rid, op, status, _copy(buf, pos + HEADER_SIZE, end))
                pos = end
        finally:
            if pos:
                _take(buf, pos)

    def next_frame(self) -> Frame | None:
        """The first whole frame, or None until one has arrived (one at a time, for a caller that may pause)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        length, rid, op, status = HEADER.unpack_from(buf)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes exceeds the {self.max_frame}-byte cap")
        end = HEADER_SIZE + length
        if len(buf) < end:
            return None
        frame = Frame(rid, op, status, _copy(buf, HEADER_SIZE, end))
        _take(buf, end)
        return frame

    @property
    def pending(self) -> int:
        return len(self._buf)

    def frame_size(self) -> int:
        """Header and body of the frame in progress, once its header has arrived (0 before)."""
        if len(self._buf) < HEADER_SIZE:
            return 0
        return HEADER_SIZE + _U32.unpack_from(self._buf, 0)[0]

    def needed(self) -> int:
        """How many more bytes complete the frame in progress, or its header (for sizing reads)."""
        return max(0, (self.frame_size() or HEADER_SIZE) - len(self._buf))


def decode_error(body: bytes | memoryview) -> str:
    try:
        return ERROR_SCHEMA.decode(body)[0]
    except E.KeydenError:
        return ""


def error_of(frame: Frame) -> E.KeydenError:
    """The error a response with a non-zero status carries: its errno's class, with the daemon's message."""
    return E.error_for_code(frame.status, decode_error(frame.body))
