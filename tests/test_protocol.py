"""The wire format: every op's fields round-trip, and malformed bodies are refused cleanly."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
import struct

import pytest

from keyden import errors as E
from keyden import protocol as W
from keyden.protocol import Kind, Op

SAMPLE = {
    Kind.U8: 7,
    Kind.U16: 65535,
    Kind.I32: -2_000_000_000,
    Kind.U32: 4_000_000_000,
    Kind.I64: -(2**40),
    Kind.BYTES: b"\x00\xffpayload",
    Kind.STR: "d\u00e9scription:\u2603",
    Kind.I32S: [1, -3, 2**31 - 1],
    Kind.U64: 2**63 + 5,
    Kind.BYTESLIST: [b"", b"\x00one", b"two" * 50],
}


def sample_values(schema: W.Schema) -> tuple:
    """A value for each field, different from every other field's of the same kind: a decoder that swapped
    two fields, or read one at another's offset, would not round-trip."""
    return tuple(_nth(SAMPLE[f.kind], i) for i, f in enumerate(schema.fields))


def _nth(value, i: int):
    if isinstance(value, bool) or not isinstance(value, (int, bytes, str, list)):
        raise TypeError(value)
    if isinstance(value, int):
        return value - i if value >= 65535 else value + i  # (samples at or near a kind's top go down)
    if isinstance(value, list):
        return [*value, value[-1][:1] * i if isinstance(value[-1], bytes) else i]
    return value + (bytes([i]) if isinstance(value, bytes) else str(i))


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_every_request_and_response_round_trips(op):
    req, resp = W.SCHEMAS[op]
    values = sample_values(req)
    frame_bytes = W.encode_request(0xDEADBEEF, op, *values)
    dec = W.FrameDecoder()
    dec.feed(frame_bytes)
    (frame,) = list(dec.frames())
    assert (frame.request_id, frame.op, frame.status) == (0xDEADBEEF, op, 0)
    assert W.request_schema(frame.op).decode(frame.body) == values

    out = sample_values(resp)
    dec.feed(W.encode_response(9, op, out))
    (frame,) = list(dec.frames())
    assert W.response_schema(frame.op).decode(frame.body) == out


#: Each op's request and response, encoded from sample_values, and its field names and caps: sha256, first
#: 12 hex digits.  The wire as
#: shipped: a change here changes the protocol (docs/protocol.md), which old clients and servers still
#: speak.  A new op within a version adds a line; a changed one needs a new version.
WIRE = {
    "HELLO": "6b85adfd0bf0", "ADD": "59ca17c88c7e", "REQUEST": "fcd05f6c7a93", "UPDATE": "a0ec91d3048d",
    "REVOKE": "90a64849c2bf", "INVALIDATE": "d0064b7f7178", "CLEAR": "99509e2c3b75", "LINK": "e5a3b050fb33",
    "UNLINK": "526a265d24ca", "MOVE": "8a81338ca82f", "SEARCH": "ea157ad922f7", "READ": "db3f8832e4e6",
    "DESCRIBE": "408396ad3c57", "CHOWN": "27b4a4c5ac28", "SETPERM": "14b1581176bc", "SET_TIMEOUT": "addb3e5246ac",
    "GET_KEYRING_ID": "6bb9a67eb7e0", "JOIN_SESSION": "416aedec40a7", "LEAVE_SESSION": "025980a9ebef",
    "RESTRICT_KEYRING": "1543235eb2cc", "FIND": "718a5f99a9d5", "CAPABILITIES": "868050ff66f9",
    "PKEY_QUERY": "15711b441a83", "PKEY_ENCRYPT": "a739281102a8", "PKEY_DECRYPT": "d3bb030addcd",
    "PKEY_SIGN": "25f900da0627", "PKEY_VERIFY": "b6209f8d12c7", "GENKEY": "90845cdcdf1f",
    "PUBLIC_KEY": "514e7462dafb", "PING": "1f293defbce5", "WHOAMI": "c33808d59b60", "QUOTA": "21a2b7a79908",
    "SESSIONS": "8e54631ddafc", "END_SESSION": "7dde2b5599ff", "KEYS": "f5beac0bef71", "DERIVE": "b52a3b050c98",
    "DH_COMPUTE": "df154b812008", "DH_COMPUTE_KDF": "bedc21f73ca7", "PKEY_DECRYPT_INTO": "4cc2efd126a5",
    "KDF": "947a99f363a2", "CIPHER": "cee27972ce2b", "DIGEST": "ac12dc774ef1", "MAC": "90b43b9a3842",
    "MAC_VERIFY": "4b0e502cc7d8", "BATCH": "369997e5bb87", "KEY_ALGORITHM": "bb7c7bf5118c",
    "STREAM_INIT": "85396480c189", "STREAM_UPDATE": "3a02422bec35", "STREAM_FINAL": "fc247ac5cfbc",
    "STREAM_ABORT": "1263c92be4ee", "STREAM_COPY": "1145fe5f01a0", "SHM_ATTACH": "286f8ad95e2e",
    "SHM_DETACH": "a296d1a56831", "SHM_CIPHER": "e0e6396323cb", "X509_VERIFY": "0fc35d9649e2",
    "TLS_ACCEPT": "66e8a4b51af9", "TLS_CONNECT": "9326957af3eb", "TLS_ESTABLISHED": "364a06e2476d",
    "TLS_ABORT": "4431cfaa8db0", "TLS_PEER_END": "2e65db6ea7ba", "TLS_CLOSE_NOTIFY": "9296e928b68c",
    "GET_PERSISTENT": "aab7081c2279",
    "EXPORT": "a9d357bf856c", "IMPORT": "615859298e7a", "REKEY": "68b311933b4e", "ADD_FLAGS": "f177405e0bc5",
    "GENKEY_FLAGS": "060d4227ac1f",
}


def _fingerprint(op: Op) -> str:
    req, resp = W.SCHEMAS[op]
    wire = W.encode_request(1, op, *sample_values(req)) + W.encode_response(1, op, sample_values(resp))
    names = "".join(f"{f.name}:{f.most};" for f in req.fields + resp.fields)  # two fields of a kind swapped too
    return hashlib.sha256(wire + names.encode()).hexdigest()[:12]


def test_every_op_encodes_as_shipped():
    assert {op.name: _fingerprint(op) for op in Op} == WIRE


def test_a_key_record_carries_every_state_flag_to_the_client():
    from keyden.client.common import key_status

    names = [name for name, _bit in W.KEY_STATE_BITS]
    for on in [set(), set(names), *({name} for name in names)]:
        state = sum(bit for name, bit in W.KEY_STATE_BITS if name in on)
        record = W.KEY_RECORD.encode((-5, "user", 7, -1, 0x3F010000, state, 2, 1_900_000_000, "d\u00e9sc", "5"))
        status = key_status(record)
        assert {name for name in names if getattr(status, name)} == on
        assert (status.serial, status.type, status.uid, status.gid, status.perm, status.usage, status.expiry,
                status.description, status.summary) == (-5, "user", 7, -1, 0x3F010000, 2, 1.9e9, "d\u00e9sc", "5")
    assert len({bit for _name, bit in W.KEY_STATE_BITS}) == len(W.KEY_STATE_BITS)


def test_opcodes_are_explicit_and_unique():
    values = [op.value for op in Op]
    assert len(values) == len(set(values))
    assert set(W.SCHEMAS) == set(Op)


def test_stream_copy_names_a_stream_and_answers_the_new_ones_handle():
    """STREAM_COPY (pyca's Hash.copy over the wire): opcode 64, never used before, stream u32 -> stream u32."""
    request, response = W.SCHEMAS[Op.STREAM_COPY]
    assert int(Op.STREAM_COPY) == 64
    assert [(f.name, f.kind) for f in request.fields] == [("stream", Kind.U32)]
    assert [(f.name, f.kind) for f in response.fields] == [("stream", Kind.U32)]
    frame = W.encode_request(3, Op.STREAM_COPY, 0xFFFF_FFFF)
    assert frame == W.HEADER.pack(4, 3, 64, 0) + b"\xff\xff\xff\xff"


def test_error_frames_carry_errno_and_message():
    frame_bytes = W.encode_error(5, Op.READ, E.ENOKEY("no key with serial 5"))
    dec = W.FrameDecoder()
    dec.feed(frame_bytes)
    (frame,) = list(dec.frames())
    assert frame.status == E.ENOKEY.code == 126
    with pytest.raises(E.ENOKEY, match="no key with serial 5") as info:
        raise W.error_of(frame)
    assert info.value.errno == errno.ENOKEY  # as OSError names it


def test_an_error_message_is_cut_so_an_error_reply_stays_small():
    """A message may quote what the client sent (a description, a hash name): never more than 1024 characters."""
    dec = W.FrameDecoder()
    dec.feed(W.encode_error(5, Op.FIND, E.ENOKEY("no user key " + repr("\x01" * 4095) + " found")))
    (frame,) = list(dec.frames())
    message = W.decode_error(frame.body)
    assert len(message) == W.MAX_ERROR_MESSAGE and message.startswith("no user key '\\x01") and message.endswith("...")
    assert W.decode_error(W.encode_error(5, Op.FIND, E.ENOKEY("x" * 1024))[W.HEADER_SIZE:]) == "x" * 1024


@pytest.mark.parametrize("op, field", [(Op.BATCH, "items"), (Op.BATCH, "ivs"), (Op.BATCH, "aads"),
                                       (Op.TLS_ACCEPT, "alpn"), (Op.TLS_CONNECT, "alpn")])
def test_a_request_list_over_its_limit_is_e2big_before_any_item_is_made(op, field):
    """A 16 MiB body holds millions of empty items; each would be an object before the handler could count
    them (hundreds of MB for one refused request).  The decoder counts first."""
    import tracemalloc

    schema = W.SCHEMAS[op][0]
    index = schema.names.index(field)
    most = schema.fields[index].most
    assert most == (W.MAX_BATCH if op == Op.BATCH else W.MAX_ALPN)
    values = [[] if f.kind is W.Kind.BYTESLIST else "" if f.kind is W.Kind.STR else 0 for f in schema.fields]
    values[index] = [b"a"] * most
    assert schema.decode(schema.encode(values))[index] == [b"a"] * most
    values[index] = [b""] * 2_000_000
    body = schema.encode(values)
    tracemalloc.start()
    try:
        with pytest.raises(E.E2BIG, match=f"at most {most} items in {field}"):
            schema.decode(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # 2 million items' lengths alone would be 16 MB


def test_unknown_error_codes_become_the_generic_class():
    assert E.error_class(9999) is E.EIO
    assert E.error_class(E.EKEYREVOKED.code) is E.EKEYREVOKED


def test_decoder_reassembles_frames_fed_byte_by_byte():
    stream = b"".join(W.encode_request(i, Op.PING, bytes([i]) * i) for i in range(1, 20))
    dec = W.FrameDecoder()
    got = []
    for b in stream:
        dec.feed(bytes([b]))
        got += [W.request_schema(f.op).decode(f.body)[0] for f in dec.frames()]
    assert got == [bytes([i]) * i for i in range(1, 20)]
    assert dec.pending == 0


def _allocation(buf: bytearray) -> bytes:
    """All the memory a bytearray holds, before its logical start too (CPython's PyByteArrayObject:
    ob_alloc and ob_bytes follow the variable-size object header)."""
    alloc, start = ctypes.c_ssize_t.from_address(id(buf) + 24).value, ctypes.c_void_p.from_address(id(buf) + 32).value
    if alloc != buf.__alloc__():  # (a free-threaded or debug build, another interpreter: another layout)
        pytest.skip("not CPython's usual PyByteArrayObject layout")
    return ctypes.string_at(start, alloc) if start else b""


def test_decoder_wipes_the_frames_it_has_given():
    """A decoded frame's bytes are zeroed before they leave the buffer: deleting the front of a bytearray
    only moves its start (while most of it stays in use), so a payload or password stayed in the daemon's
    (or a client's) memory behind a large frame still arriving."""
    secrets = [os.urandom(16).hex().encode() for _ in range(2)]
    small = [W.encode_request(i + 1, Op.ADD, "logon", "t:x", secret, -3, b"") for i, secret in enumerate(secrets)]
    large = W.encode_request(3, Op.PING, bytes(4000))
    decoder = W.FrameDecoder()
    decoder.feed(small[0] + large[:2000])
    assert [f.request_id for f in decoder.frames()] == [1]
    decoder.feed(large[2000:] + small[1] + large[:2000])
    assert decoder.next_frame().request_id == 3 and decoder.next_frame().request_id == 2
    held = _allocation(decoder._buf)
    assert len(held) > 2000 and not any(secret in held for secret in secrets)


def test_decoder_refuses_oversized_frames_before_buffering_them():
    dec = W.FrameDecoder(max_frame=1024)
    dec.feed(W.HEADER.pack(1025, 1, Op.PING, 0))
    with pytest.raises(W.FrameTooLarge):
        list(dec.frames())


@pytest.mark.parametrize("body", [b"", b"\x01", b"\xff\xff\xff\xff", b"\x02\x00\x00\x00a"])
def test_truncated_bodies_are_eproto(body):
    with pytest.raises(E.EPROTO):
        W.request_schema(Op.PING).decode(body)


def test_trailing_bytes_and_bad_utf8_are_eproto():
    schema = W.request_schema(Op.FIND)
    good = schema.encode(("user", "x"))
    with pytest.raises(E.EPROTO):
        schema.decode(good + b"\x00")
    with pytest.raises(E.EPROTO):
        schema.decode(struct.pack("<I", 2) + b"\xc3\x28" + struct.pack("<I", 0))
    with pytest.raises(E.EPROTO):
        W.request_schema(Op.REVOKE).decode(b"\x01\x02\x03")


def test_random_bodies_never_raise_anything_but_keyden_errors():
    rng = random.Random(1234)
    for op in Op:
        schema = W.request_schema(op)
        for _ in range(200):
            body = rng.randbytes(rng.randrange(0, 40))
            try:
                schema.decode(body)
            except E.KeydenError:
                pass


def test_byteslist_counts_cannot_outrun_the_body():
    schema = W.request_schema(Op.BATCH)
    body = schema.encode(("gcm(aes)", 1, 0, [], [], [b"x"]))
    forged = body[:-9] + struct.pack("<I", 60000) + body[-5:]
    with pytest.raises(E.EPROTO):
        schema.decode(forged)
    with pytest.raises(E.E2BIG):  # more than a batch may hold: refused before the body is looked at
        schema.decode(body[:-9] + struct.pack("<I", 2**31) + body[-5:])


def test_unknown_opcode_is_enosys():
    with pytest.raises(E.ENOSYS):
        W.request_schema(999)


def test_encoding_bad_values_is_einval_naming_the_field_not_the_value():
    with pytest.raises(E.EINVAL, match="field 'key' must be an integer, not str"):
        W.encode_request(1, Op.REVOKE, "not an int")
    with pytest.raises(E.EINVAL, match=r"field 'key' is out of range \(-2147483648\.\.2147483647\)"):
        W.encode_request(1, Op.REVOKE, 2**40)
    with pytest.raises(E.EINVAL, match="field 'description' must be a str, not bytes"):
        W.encode_request(1, Op.ADD, "user", b"secret-ish", b"x", -3, b"")
    with pytest.raises(E.EINVAL, match="field 'payload' must be bytes-like, not NoneType"):
        W.encode_request(1, Op.ADD, "user", "d", None, -3, b"")
    with pytest.raises(E.EINVAL, match="not valid text") as info:
        W.encode_request(1, Op.ADD, "user", "\udcffsecret", b"x", -3, b"")
    assert "secret" not in str(info.value)


def test_the_written_spec_lists_every_op_with_its_fields():
    """docs/protocol.md is the wire spec: every opcode, its code and both field lists, as the schemas have them."""
    import os
    import re
    kinds = {"B": "U8", "H": "U16", "i": "I32", "I": "U32", "q": "I64", "Q": "U64", "bytes": "BYTES",
             "str": "STR", "i32s": "I32S", "bytes*": "BYTESLIST"}
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")
    with open(path, encoding="utf-8") as f:
        rows = {m.group(1): (int(m.group(2)), m.group(3)) for m in
                re.finditer(r"^\| ([A-Z0-9_]+) \| (\d+) \| ([^|]*) \|", f.read(), re.M)}
    for op in Op:
        assert op.name in rows, f"{op.name} is missing from docs/protocol.md"
        code, fields = rows[op.name]
        assert code == int(op), op.name
        if op is Op.TLS_ESTABLISHED or "passed back" in fields:
            continue  # described in words: a descriptor, not fields, comes back
        request, response = W.SCHEMAS[op]
        written = [re.sub(r"\s*\([^)]*\)", "", side).strip() for side in fields.split("→")]  # minus (notes)
        for schema, side in zip((request, response), written):
            assert side == ", ".join(f"{x.name} {kinds[x.kind.value]}" for x in schema.fields), (op.name, side)


def test_every_errno_class_is_in_the_table_once_under_its_own_code():
    """ERRORS is the one mapping both ways: each class keyden defines under KeydenError, its code the Linux
    errno its name says (a class that kept EIO's code would silently take EIO's place)."""
    import errno

    classes = E.KeydenError.__subclasses__()
    assert len(E.ERRORS) == len(classes) == len({cls.code for cls in classes})
    for cls in classes:
        assert E.ERRORS[cls.code] is cls and cls.code == getattr(errno, cls.__name__) and cls.name == cls.__name__
        assert getattr(E, cls.__name__) is cls and cls.__name__ in E.__all__
    assert E.error_class(0xFFFF) is E.EIO
