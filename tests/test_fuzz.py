"""Hostile input, generated: the frame decoder, every operation's fields, garbage keys and certificates.

What must hold for every input: no crash, no hang, and an answer that decodes, whose status is 0 or
a known errno and never EIO (EIO is what an unhandled exception in a handler becomes).  Operations
run through the real connection handler with a real KeyStore, sans-IO, which is fast and reaches
every handler; a last test throws garbage at a real daemon over its socket and checks it still
serves others.

Sized to take well under a minute.  For a longer run, scale every property test's example count:

    KEYDEN_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import datetime
import fcntl
import os
import random
import socket
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyden import errors as E
from keyden import protocol as W
from keyden.core import keytypes as T
from keyden.core.store import KeyStore
from keyden.crypto import agreement, asymmetric, symmetric
from keyden.protocol import Kind, Op
from keyden.server.connection import Connection
from keyden.server.peer import Peer

SCALE = int(os.environ.get("KEYDEN_FUZZ_EXAMPLES", "0"))
PEER = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset({1000}), start_time=77)  # not root: quotas apply
ROOT = Peer(pid=4243, uid=0, gid=0, groups=frozenset({0}), start_time=78)  # may chown, bigger quota
MAX_FRAME = W.DEFAULT_MAX_FRAME


def fuzz(examples: int):
    """Hypothesis settings: ``examples`` in CI, KEYDEN_FUZZ_EXAMPLES on demand; no per-example deadline."""
    return settings(max_examples=SCALE or examples, deadline=None, derandomize=not SCALE,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ------------------------------------------------------------------ checking

def exchange(conn: Connection, frame: bytes, request_id: int, op: int, fds: list[int] | None = None) -> W.Frame:
    """Send one frame; its single reply must echo id and op, carry 0 or a known errno (never EIO) and decode."""
    dec = W.FrameDecoder(1 << 31)
    dec.feed(conn.receive(frame, fds))
    replies = list(dec.frames())
    assert len(replies) == 1 and dec.pending == 0, replies
    (reply,) = replies
    assert (reply.request_id, reply.op) == (request_id, op)
    check_status(reply)
    if reply.status == 0:
        W.response_schema(op).decode(reply.body)
    return reply


def check_status(reply: W.Frame) -> None:
    if reply.status:
        assert reply.status in E.ERRORS, f"unknown errno {reply.status}"
        message = W.ERROR_SCHEMA.decode(reply.body)[0]
        assert reply.status != E.EIO.code, f"op {reply.op}: internal error ({message}); see the log for the traceback"


# --------------------------------------------------- keys the fuzzer can name

def _pkcs8(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _self_signed(key) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kd fuzz")])
    now = datetime.datetime(2024, 1, 1)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(4242).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
P256 = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()
X = x25519.X25519PrivateKey.generate()
CERT = _self_signed(P256)
PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo

#: valid inputs to mutate, each a different container/encoding the parser knows
SEEDS = {
    "rsa-pkcs8": _pkcs8(RSA),
    "p256-pkcs8-pem": P256.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    "p256-sec1-pem": P256.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()),
    "ed25519-pkcs8": _pkcs8(ED),
    "x25519-pkcs8": _pkcs8(X),
    "ed25519-encrypted": ED.private_bytes(DER, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"pw")),
    "rsa-spki": RSA.public_key().public_bytes(DER, SPKI),
    "p256-spki-pem": P256.public_key().public_bytes(PEM, SPKI),
    "cert-der": CERT.public_bytes(DER),
    "cert-pem": CERT.public_bytes(PEM),
}
PARSED = {name: asymmetric.parse(blob, b"pw" if "encrypted" in name else None) for name, blob in SEEDS.items()
          if name in ("rsa-pkcs8", "p256-pkcs8-pem", "ed25519-pkcs8", "x25519-pkcs8", "cert-der")}
#: what a 'peer' public key field might hold
PEERS = [X.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
         P256.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
         P256.public_key().public_bytes(DER, SPKI)]


class World:
    """A connection after HELLO holding keys of every type, two open streams (handles 1 and 2) and a
    shared-memory region (handle 3); keys are named by index.  Use as a context manager: closing
    releases the region."""

    def __init__(self, peer: Peer = PEER):
        self.conn = Connection(KeyStore(), peer, MAX_FRAME)
        self.rid = 1
        assert self.call(Op.HELLO, 1, 1, "", "fuzz").status == 0
        ctx = self.conn.context
        self.keys = [self.add("user", "kd:user", os.urandom(32)), self.add("logon", "kd:aes", os.urandom(32)),
                     self.add("keyring", "kd:ring", b""), self.add("user", "kd:dh", bytes([7]) * 64)]
        asym = T.REGISTRY["asymmetric"]
        for parsed in PARSED.values():
            self.keys.append(ctx.store.create_internal(ctx.caller, asym, "", parsed, T.asymmetric_quota(), -3))
        self.call(Op.STREAM_INIT, "gcm(aes)", self.keys[1], 0, bytes(12), b"")  # stream 1
        self.call(Op.STREAM_INIT, "sha256", 0, 0, b"", b"")  # stream 2
        memfd = os.memfd_create("kd-fuzz", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4096)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.rid += 1
        attach = W.encode_request(self.rid, Op.SHM_ATTACH, 4096)
        assert exchange(self.conn, attach, self.rid, Op.SHM_ATTACH, fds=[memfd]).status == 0  # region 3

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        self.conn.close()

    def add(self, type_name: str, description: str, payload: bytes) -> int:
        reply = self.call(Op.ADD, type_name, description, payload, -3, b"")
        assert reply.status == 0
        return W.response_schema(Op.ADD).decode(reply.body)[0]

    def call(self, op: int, *values) -> W.Frame:
        return self.send(op, W.request_schema(op).encode(values))

    def send(self, op: int, body: bytes) -> W.Frame:
        self.rid += 1
        return exchange(self.conn, W.encode_frame(self.rid, op, 0, body), self.rid, op)

    def resolve(self, values: tuple) -> tuple:
        return tuple(self.keys[v.index % len(self.keys)] if isinstance(v, KeyPick) else v for v in values)


class KeyPick:
    """'The i-th key of the world': drawn before the world exists, resolved to a serial inside it."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"KeyPick({self.index})"


# ------------------------------------------------------------ field strategies

I32_RANGE = st.integers(-(1 << 31), (1 << 31) - 1)
SERIALS = st.one_of(st.builds(KeyPick, st.integers(0, 15)), st.sampled_from([0, -1, -2, -3, -4, -5, -6, -7, -8]),
                    I32_RANGE)
STRINGS_BY_NAME = {
    "type": ["user", "logon", "keyring", "asymmetric", ".hidden", "big_key", ""],
    "description": ["kd:user", "kd:aes", "kd:ring", "kd:new", "a:b", ""],
    "alg": [*symmetric.ALGORITHMS, "ecb(aes)", "hmac(md5)", ""],
    "kdf": [*agreement.KDFS, "hkdf-md5", ""],
    "info": ["", "enc=pkcs1 hash=sha256", "enc=pss hash=sha256 saltlen=32", "enc=oaep hash=sha256 label=x",
             "enc=raw", "enc=x962 hash=sha256", "enc=p1363 hash=sha384", "hash=sha512", "enc=pss mgfhash=sha1",
             "enc=pkcs1 hash=md5", "enc=", "enc=pkcs1 enc=pkcs1"],
    "spec": ["ed25519", "ec:p256", "p384", "x25519", "aes:128", "aes:256", "hmac:256", "hmac:1024", "chacha20",
             "rsa:1024", "aes:512", ""],
    "hash": ["sha256", "sha512", "md5", ""],
    "restriction": ["", "builtin_trusted", "key_or_keyring:0", "key_or_keyring:1:chain", "bogus"],
    "name": ["", "kd-session", "_uid.0"],
}
BYTES_BY_NAME = {
    "payload": [b"", os.urandom(32), SEEDS["cert-der"], SEEDS["ed25519-pkcs8"], b"x" * 32767, b"x" * 32768],
    "iv": [b"", bytes(12), bytes(16), bytes(24)],
    "peer": [b"", *PEERS],
    "secret": [b"", b"pw"],
}
INTS_BY_NAME = {
    "perm": [0, 0x3F3F3F3F, 0x3F010000, 0xFFFFFFFF, 0x40000000],
    "flags": [0, 1, 2, 3, 4],
    "length": [0, 1, 16, 32, 64, 1024, 2048, 4096, 1 << 20],
    "stream": [0, 1, 2, 3],
    "region": [0, 1, 3, 4],
    "timeout": [0, 1, 1 << 31],
    "uid": [-1, 0, 1000, 65534],
    "gid": [-1, 0, 1000, 65534],
    "create": [0, 1],
    "in_offset": [0, 16, 4080, 4096, 1 << 63], "out_offset": [0, 16, 2048, 4096, 1 << 63], "size": [0, 1, 1 << 40],
}
INT_BOUNDS = {Kind.U8: (0, 255), Kind.U16: (0, 65535), Kind.U32: (0, (1 << 32) - 1),
              Kind.U64: (0, (1 << 64) - 1), Kind.I64: (-(1 << 63), (1 << 63) - 1)}


def field_values(name: str, kind: Kind) -> st.SearchStrategy:
    """Values of the right kind: the meaningful ones for this field's name, and anything at all."""
    if kind is Kind.I32:
        return SERIALS
    if kind is Kind.STR:
        return st.one_of(st.sampled_from(STRINGS_BY_NAME.get(name, ["", "x"])), st.text(max_size=40))
    if kind is Kind.BYTES:
        return st.one_of(st.sampled_from(BYTES_BY_NAME.get(name, [b""])), st.binary(max_size=200))
    if kind is Kind.BYTESLIST:
        return st.lists(st.one_of(st.sampled_from([b"", bytes(12), bytes(16)]), st.binary(max_size=40)), max_size=6)
    if kind is Kind.I32S:
        return st.lists(I32_RANGE, max_size=6)
    low, high = INT_BOUNDS[kind]
    return st.one_of(st.sampled_from([v for v in INTS_BY_NAME.get(name, [0, 1]) if low <= v <= high] or [low]),
                     st.integers(low, high))


def request_fields(op: Op) -> st.SearchStrategy:
    return st.tuples(*(field_values(f.name, f.kind) for f in W.request_schema(op).fields))


def mangle(body: bytes) -> st.SearchStrategy:
    """A well-formed body cut short, lengthened, or with bytes overwritten."""
    return st.one_of(
        st.integers(0, max(0, len(body) - 1)).map(lambda n: body[:n]),
        st.binary(min_size=1, max_size=8).map(lambda extra: body + extra),
        st.tuples(st.integers(0, max(0, len(body) - 1)), st.integers(0, 255)).map(
            lambda pos_byte: body[:pos_byte[0]] + bytes([pos_byte[1]]) + body[pos_byte[0] + 1:] if body else body),
    )


OPS = [op for op in Op if op is not Op.HELLO]


# ------------------------------------------------------------ frame decoder

def frame_stream() -> st.SearchStrategy:
    frames = st.lists(st.tuples(st.integers(0, (1 << 32) - 1), st.integers(0, 65535), st.integers(0, 65535),
                                st.binary(max_size=64)), max_size=8)
    return st.tuples(frames, st.binary(max_size=40))


@fuzz(400)
@given(frame_stream(), st.lists(st.integers(0, 1000), max_size=12), st.integers(0, 80))
def test_decoder_gives_the_same_frames_however_the_stream_is_split(stream, cuts, max_frame):
    frames, tail = stream
    data = b"".join(W.encode_frame(rid, op, status, body) for rid, op, status, body in frames) + tail

    def decode(pieces):
        dec = W.FrameDecoder(max_frame)
        out = []
        try:
            for piece in pieces:
                dec.feed(piece)
                for f in dec.frames():  # one at a time: frames before a too-large one still count
                    out.append((f.request_id, f.op, f.status, bytes(f.body)))
        except W.FrameTooLarge:
            return out, "too large"
        return out, dec.pending

    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    whole = decode([data])
    assert decode(pieces) == whole
    fitting = [f for f in frames if len(f[3]) <= max_frame]
    if len(fitting) == len(frames):  # every frame fits: all come out, and only the tail's bytes remain
        assert whole[0][:len(frames)] == [(r, o, s, b) for r, o, s, b in frames]


@fuzz(300)
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
def test_decoder_takes_random_bytes_in_random_pieces(data, cuts):
    dec = W.FrameDecoder(256)
    points = sorted({c % (len(data) + 1) for c in cuts})
    total = 0
    try:
        for a, b in zip([0, *points], [*points, len(data)]):
            dec.feed(data[a:b])
            total += sum(W.HEADER_SIZE + len(f.body) for f in dec.frames())
    except W.FrameTooLarge:
        return
    assert total + dec.pending == len(data)
    assert dec.pending < W.HEADER_SIZE + 256


# -------------------------------------------------------- every operation

@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
@fuzz(40)
@given(data=st.data())
def test_every_operation_answers_any_fields_with_an_errno(op, data):
    with World() as world:
        values = world.resolve(data.draw(request_fields(op), label="fields"))
        world.call(op, *values)
        body = W.request_schema(op).encode(values)
        world.send(op, data.draw(st.one_of(mangle(body), st.binary(max_size=120)), label="body"))
        assert world.call(Op.PING, b"still here").status == 0


@fuzz(300)
@given(st.sampled_from([PEER, ROOT]), st.lists(st.tuples(st.sampled_from(OPS), st.data()), min_size=2, max_size=8))
def test_random_sequences_of_operations_on_one_connection(peer, calls):
    """Operations interact (revoke then use, final then update, clear then search): any order is answered."""
    with World(peer) as world:
        for op, data in calls:
            world.call(op, *world.resolve(data.draw(request_fields(op))))
        assert world.call(Op.PING, b"").status == 0


@fuzz(300)
@given(request_fields(Op.HELLO), st.one_of(st.none(), st.binary(max_size=60)), st.sampled_from([Op.HELLO, Op.PING, 0]))
def test_any_handshake_is_answered_and_only_a_good_one_opens_the_connection(fields, body, op):
    conn = Connection(KeyStore(), PEER, MAX_FRAME)
    body = W.request_schema(Op.HELLO).encode(fields) if body is None else body
    reply = exchange(conn, W.encode_frame(1, op, 0, body), 1, op)
    assert (reply.status == 0) == (not conn.closed)
    if reply.status == 0:
        assert conn.context is not None and exchange(conn, W.encode_request(2, Op.PING, b""), 2, Op.PING).status == 0
    conn.close()


@fuzz(200)
@given(st.integers(0, 65535).filter(lambda n: n not in set(Op)), st.binary(max_size=64))
def test_unknown_opcodes_are_enosys(op, body):
    with World() as world:
        assert world.send(op, body).status == E.ENOSYS.code


# ------------------------------------------------- garbage keys and certificates

HUGE = [bytes(asymmetric.MAX_INPUT + 1),
        b"-----BEGIN CERTIFICATE-----\n" + b"QUFB" * 300000 + b"\n-----END CERTIFICATE-----\n",
        b"\x30\x84\xff\xff\xff\xf0" + os.urandom(64),
        b"\x30\x82\x01\x00" * 5000]


def mutated_seed() -> st.SearchStrategy:
    def mutate(seed: bytes, edits: list[tuple[int, int, int]]) -> bytes:
        blob = bytearray(seed)
        for kind, pos, value in edits:
            pos %= len(blob) + 1
            if kind == 0 and pos < len(blob):
                blob[pos] = value  # overwrite
            elif kind == 1:
                blob.insert(pos, value)
            elif kind == 2 and pos < len(blob):
                del blob[pos]
            elif kind == 3:
                del blob[pos:]  # truncate
        return bytes(blob)

    edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1,
                     max_size=4)
    return st.builds(mutate, st.sampled_from(list(SEEDS.values())), edits)


KEY_DATA = st.one_of(mutated_seed(), st.binary(max_size=400), st.sampled_from(HUGE),
                     st.sampled_from(list(SEEDS.values())))


@fuzz(600)
@given(KEY_DATA, st.sampled_from([b"", b"pw", b"wrong"]), st.sampled_from(STRINGS_BY_NAME["info"]),
       st.binary(max_size=64))
def test_garbage_keys_and_certificates_are_refused_with_an_errno(blob, password, info, data):
    with World() as world:
        _use_as_a_key(world, blob, password, info, data)


def _use_as_a_key(world: World, blob: bytes, password: bytes, info: str, data: bytes) -> None:
    reply = world.call(Op.ADD, "asymmetric", "", blob, -3, password)
    if reply.status:
        assert reply.status in (E.EBADMSG.code, E.EINVAL.code, E.EKEYREJECTED.code, E.EDQUOT.code), \
            E.error_class(reply.status).name
        return
    (serial,) = W.response_schema(Op.ADD).decode(reply.body)
    # Whatever was accepted must behave: every operation on it answers with a value or an errno.
    world.call(Op.DESCRIBE, serial)
    world.call(Op.PUBLIC_KEY, serial)
    world.call(Op.PKEY_QUERY, serial, info)
    signed = world.call(Op.PKEY_SIGN, serial, info, data)
    signature = W.response_schema(Op.PKEY_SIGN).decode(signed.body)[0] if signed.status == 0 else data
    world.call(Op.PKEY_VERIFY, serial, info, data, signature)
    world.call(Op.PKEY_ENCRYPT, serial, info, data)
    world.call(Op.PKEY_DECRYPT, serial, info, data)


# ------------------------------------------------------ over the real socket

def garbage_frames(rng: random.Random, n: int) -> bytes:
    """Frames with valid headers and bodies that are random, truncated or well-formed with wild values."""
    out = []
    for i in range(n):
        op = rng.choice(OPS + [0, 999, 65535])
        if op in set(Op) and rng.random() < 0.5:
            schema = W.request_schema(op)
            values = []
            for f in schema.fields:
                if f.kind is Kind.I32:
                    values.append(rng.choice([0, -3, -4, rng.randrange(-(1 << 31), 1 << 31)]))
                elif f.kind is Kind.STR:
                    values.append(rng.choice(STRINGS_BY_NAME.get(f.name, ["", "x"])))
                elif f.kind is Kind.BYTES:
                    values.append(rng.randbytes(rng.randrange(0, 64)))
                elif f.kind in (Kind.BYTESLIST, Kind.I32S):
                    values.append([])
                else:
                    low, high = INT_BOUNDS[f.kind]
                    values.append(rng.choice([low, high, rng.randint(low, high)]))
            body = schema.encode(values)
        else:
            body = rng.randbytes(rng.randrange(0, 80))
        out.append(W.encode_frame(i + 2, op, rng.choice([0, 0, 1, 5]), body))
    return b"".join(out)


def test_a_real_daemon_survives_garbage_and_keeps_serving(fresh_daemon):
    d = fresh_daemon("max_frame = 65536\n")
    rng = random.Random(1234)
    hello = W.encode_request(1, Op.HELLO, 1, 1, "", "fuzz")
    outcomes = []
    for attempt in range(12):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(d.socket)
        if attempt % 4 == 0:
            junk = rng.randbytes(rng.randrange(1, 4000))  # no handshake, just noise
        elif attempt % 4 == 1:
            junk = hello + garbage_frames(rng, 20) + struct.pack("<IIHH", 1 << 30, 9, Op.PING, 0)  # then too big
        elif attempt % 4 == 2:
            junk = hello + garbage_frames(rng, 300)[:-5]  # stops mid-frame
        else:
            junk = hello + garbage_frames(rng, 300)
        sock.sendall(junk)
        if attempt % 4 == 3:  # a whole, valid-framed batch: every frame is answered, none with EIO
            dec = W.FrameDecoder(1 << 31)
            answered = 0
            while answered < 301:
                chunk = sock.recv(1 << 16)
                assert chunk, "daemon closed a connection that sent only well-delimited frames"
                dec.feed(chunk)
                for reply in dec.frames():
                    check_status(reply)
                    answered += 1
            outcomes.append(answered)
        sock.close()
    assert outcomes == [301, 301, 301]
    with d.connect() as boot:  # others are still served (in a session the garbage never touched) ...
        _serial, token = boot.join_session()
    with d.connect(session=token) as c:
        serial = c.add("user", "after-the-storm", b"fine", "@s")
        assert c.read(serial) == b"fine"
    # ... and the daemon logged no internal error
    log = d.read_log()
    assert "Traceback" not in log and "internal error" not in log
