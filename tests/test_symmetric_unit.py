"""keyden.crypto.symmetric: behaviour and every error path of the pure engines."""

from __future__ import annotations

import copy
import hashlib
import hmac as std_hmac
import os
import pickle

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from keyden import errors as E
from keyden.crypto import symmetric as S

GCM, CHACHA = "gcm(aes)", "rfc7539(chacha20,poly1305)"
AEADS = [(GCM, 16), (GCM, 24), (GCM, 32), (CHACHA, 32)]
HASHES = ["sha1", "sha224", "sha256", "sha384", "sha512"]
HMACS = ["hmac(sha256)", "hmac(sha384)", "hmac(sha512)"]
NONCE = bytes(range(12))


def _message_reveals(exc: BaseException, *secrets: bytes) -> bool:
    text = str(exc) + repr(exc)
    return any(s and (s.hex() in text or repr(s)[2:-1] in text) for s in secrets if len(s) >= 4)


# ---------------------------------------------------------------------------
# names and specs


def test_algorithm_table_names_kinds_and_sizes():
    expected = {GCM: "aead", CHACHA: "aead", "gcm-siv(aes)": "aead", "cbc(aes)": "skcipher", "ctr(aes)": "skcipher",
                **{h: "hash" for h in HASHES}, **{h: "hmac" for h in HMACS}}
    assert {name: S.kind(name) for name in S.ALGORITHMS} == expected
    gcm = S.ALGORITHMS[GCM]
    assert (gcm.key_sizes, gcm.nonce_size, gcm.tag_size) == ((16, 24, 32), 12, 16)
    siv = S.ALGORITHMS["gcm-siv(aes)"]
    assert (siv.key_sizes, siv.nonce_size, siv.tag_size) == ((16, 32), 12, 16)
    assert S.ALGORITHMS["cbc(aes)"].nonce_size == 16 and S.ALGORITHMS["cbc(aes)"].block_size == 16
    assert S.ALGORITHMS["sha384"].digest_size == 48
    assert 1 in S.ALGORITHMS["hmac(sha256)"].key_sizes and 0 not in S.ALGORITHMS["hmac(sha256)"].key_sizes
    with pytest.raises(TypeError):
        S.ALGORITHMS["md5"] = S.ALGORITHMS["sha1"]      # the table is read-only


@pytest.mark.parametrize("name", ["aes", "gcm(AES)", "md5", "xchacha20poly1305", "hmac(sha1)", ""])
def test_unknown_algorithm_is_enoent(name):
    with pytest.raises(E.ENOENT):
        S.kind(name)


@pytest.mark.parametrize("name", [None, 7, b"sha256"])
def test_a_name_that_is_no_str_is_einval_naming_its_type(name):
    with pytest.raises(E.EINVAL, match=f"must be a str, not {type(name).__name__}"):
        S.kind(name)


@pytest.mark.parametrize("call", [
    lambda: S.aead("sha256", bytes(32)),
    lambda: S.aead("cbc(aes)", bytes(16)),
    lambda: S.skcipher(GCM, bytes(16), bytes(16)),
    lambda: S.digest("hmac(sha256)", b"x"),
    lambda: S.hmac("sha256", b"key", b"x"),
    lambda: S.aead_stream("ctr(aes)", bytes(16), bytes(16)),
])
def test_algorithm_of_the_wrong_kind_is_enoent(call):
    with pytest.raises(E.ENOENT):
        call()


# ---------------------------------------------------------------------------
# AEAD one shot


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_round_trip_and_layout(name, key_len):
    key = os.urandom(key_len)
    engine = S.aead(name, key)
    assert (engine.nonce_size, engine.tag_size) == (12, 16)
    for size in (0, 1, 15, 16, 17, 1000):
        data = os.urandom(size)
        sealed = engine.encrypt(NONCE, data, b"header")
        assert len(sealed) == size + 16
        assert engine.decrypt(NONCE, sealed, b"header") == data
    assert engine.encrypt(NONCE, b"abc") == engine.encrypt(NONCE, b"abc", b"")   # aad defaults to empty


@pytest.mark.parametrize("name,key_len", [(GCM, n) for n in (0, 8, 15, 17, 31, 33, 64)] +
                         [(CHACHA, n) for n in (0, 16, 24, 31, 33)])
def test_aead_wrong_key_length_is_einval(name, key_len):
    with pytest.raises(E.EINVAL):
        S.aead(name, bytes(key_len))


@pytest.mark.parametrize("name,key_len", AEADS)
@pytest.mark.parametrize("nonce_len", [0, 8, 11, 13, 16, 24])
def test_aead_wrong_nonce_length_is_einval_both_ways(name, key_len, nonce_len):
    engine = S.aead(name, bytes(key_len))
    sealed = engine.encrypt(NONCE, b"data")
    with pytest.raises(E.EINVAL):
        engine.encrypt(bytes(nonce_len), b"data")
    with pytest.raises(E.EINVAL):
        engine.decrypt(bytes(nonce_len), sealed)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_any_tampering_is_ebadmsg_without_detail(name, key_len):
    key, data, aad = os.urandom(key_len), b"attack at dawn, bring snacks", b"route-7"
    engine = S.aead(name, key)
    sealed = engine.encrypt(NONCE, data, aad)
    attempts = [
        (NONCE, _flip(sealed, 0), aad),            # ciphertext
        (NONCE, _flip(sealed, len(sealed) - 1), aad),   # tag
        (NONCE, sealed, aad + b"!"),               # aad
        (_flip(NONCE, 3), sealed, aad),            # nonce
        (NONCE, sealed[:-1], aad),                 # truncated tag
        (NONCE, sealed[:15], aad),                 # shorter than a tag
        (NONCE, b"", aad),
    ]
    for nonce, blob, extra in attempts:
        with pytest.raises(E.EBADMSG) as info:
            engine.decrypt(nonce, blob, extra)
        assert info.value.message == "authentication failed"
        assert not _message_reveals(info.value, key, data, sealed)
    with pytest.raises(E.EBADMSG):
        S.aead(name, os.urandom(key_len)).decrypt(NONCE, sealed, aad)       # another key


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_into_buffers(name, key_len):
    engine = S.aead(name, os.urandom(key_len))
    data = os.urandom(100)
    out = bytearray(200)
    written = engine.encrypt_into(NONCE, data, b"a", out)
    assert written == 116 and bytes(out[:116]) == engine.encrypt(NONCE, data, b"a")
    assert out[116:] == bytes(84)
    plain = bytearray(116)
    assert engine.decrypt_into(NONCE, bytes(out[:116]), b"a", plain) == 100
    assert bytes(plain[:100]) == data
    exact = memoryview(bytearray(116))
    assert engine.encrypt_into(NONCE, memoryview(data), b"a", exact) == 116    # memoryview in and out


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_into_bad_buffers_are_einval(name, key_len):
    engine = S.aead(name, os.urandom(key_len))
    sealed = engine.encrypt(NONCE, bytes(10))
    for out in (bytearray(25), bytes(100), memoryview(bytearray(100)).toreadonly(), "x" * 100,
                memoryview(bytearray(200))[::2]):
        with pytest.raises(E.EINVAL):
            engine.encrypt_into(NONCE, bytes(10), b"", out)
    for out in (bytearray(9), bytes(10)):
        with pytest.raises(E.EINVAL):
            engine.decrypt_into(NONCE, sealed, b"", out)


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_decrypt_into_failure_leaves_no_plaintext(name, key_len):
    """pyca writes plaintext before checking the tag; keyden must wipe it."""
    engine = S.aead(name, os.urandom(key_len))
    data = b"\xaa" * 64
    sealed = engine.encrypt(NONCE, data)
    out = bytearray(b"\x55" * 80)
    with pytest.raises(E.EBADMSG):
        engine.decrypt_into(NONCE, _flip(sealed, len(sealed) - 1), b"", out)
    assert out[:64] == bytes(64) and out[64:] == b"\x55" * 16
    with pytest.raises(E.EBADMSG):
        engine.decrypt_into(NONCE, sealed[:10], b"", out)


@pytest.mark.parametrize("name,key_len", AEADS)
def test_aead_random_nonce(name, key_len):
    engine = S.aead(name, os.urandom(key_len))
    first, second = engine.encrypt_random_nonce(b"same", b"aad"), engine.encrypt_random_nonce(b"same", b"aad")
    assert len(first) == 12 + 4 + 16 and first[:12] != second[:12] and first != second
    assert engine.decrypt(first[:12], first[12:], b"aad") == b"same"
    assert engine.decrypt_random_nonce(second, b"aad") == b"same"
    assert engine.decrypt_random_nonce(memoryview(second), b"aad") == b"same"
    for blob in (_flip(first, 0), _flip(first, 20), first[:27], b""):
        with pytest.raises(E.EBADMSG):
            engine.decrypt_random_nonce(blob, b"aad")
    with pytest.raises(E.EBADMSG):
        engine.decrypt_random_nonce(first, b"other aad")


@pytest.mark.parametrize("bad", ["text", 5, None, [1, 2]])
def test_non_bytes_arguments_are_einval(bad):
    engine = S.aead(GCM, bytes(16))
    calls = [lambda: S.aead(GCM, bad), lambda: engine.encrypt(bad, b""), lambda: engine.encrypt(NONCE, bad),
             lambda: engine.decrypt(NONCE, bad), lambda: S.digest("sha256", bad),
             lambda: S.hmac("hmac(sha256)", bad, b"x"), lambda: S.skcipher("ctr(aes)", bytes(16), bad)]
    if bad is not None:      # None means "no aad" for pyca; keyden insists on bytes
        calls.append(lambda: engine.encrypt(NONCE, b"", bad))
    for call in calls:
        with pytest.raises(E.EINVAL):
            call()


def test_engines_and_contexts_never_show_or_export_key_material():
    key = bytes(range(32))
    things = [S.aead(GCM, key), S.aead(CHACHA, key), S.aead_stream(GCM, key, NONCE),
              S.skcipher("cbc(aes)", key, bytes(16)), S.hmac_ctx("hmac(sha256)", key), S.hash_ctx("sha256")]
    for thing in things:
        text = repr(thing) + str(thing)
        assert key.hex() not in text and "\\x00\\x01\\x02" not in text
        assert thing.name in repr(thing)
        for export in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError):
                export(thing)
        assert not hasattr(thing, "__dict__")     # nowhere to stash a key by accident


# ---------------------------------------------------------------------------
# streaming AEAD


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=8),
       aad=st.binary(max_size=40), key_len=st.sampled_from([16, 24, 32]))
def test_gcm_streaming_equals_one_shot_over_any_chunking(data, cuts, aad, key_len):
    key = bytes(range(key_len))
    sealed = S.aead(GCM, key).encrypt(NONCE, data, aad)
    enc = S.aead_stream(GCM, key, NONCE, aad)
    assert b"".join(enc.update(p) for p in _chunks(data, cuts)) + enc.finalize() == sealed
    ct, tag = sealed[:-16], sealed[-16:]
    dec = S.aead_stream(GCM, key, NONCE, aad, decrypt=True, tag=tag)
    assert b"".join(dec.update(p) for p in _chunks(ct, cuts)) + dec.finalize() == data
    late = S.aead_stream(GCM, key, NONCE, aad, decrypt=True)
    assert b"".join(late.update(p) for p in _chunks(ct, cuts)) + late.finalize_with_tag(tag) == data


def test_gcm_streaming_rejects_bad_tags_and_misuse():
    key = os.urandom(16)
    sealed = S.aead(GCM, key).encrypt(NONCE, b"x" * 40, b"aad")
    ct, tag = sealed[:-16], sealed[-16:]
    for bad_tag in (_flip(tag, 0), tag[:12], tag + b"\0"):
        with pytest.raises(E.EBADMSG) as info:
            stream = S.aead_stream(GCM, key, NONCE, b"aad", decrypt=True)
            stream.update(ct)
            stream.finalize_with_tag(bad_tag)
        assert info.value.message == "authentication failed"
    with pytest.raises(E.EBADMSG):
        S.aead_stream(GCM, key, NONCE, b"aad", decrypt=True, tag=tag[:8])
    wrong_aad = S.aead_stream(GCM, key, NONCE, b"AAD", decrypt=True, tag=tag)
    wrong_aad.update(ct)
    with pytest.raises(E.EBADMSG):
        wrong_aad.finalize()
    with pytest.raises(E.EINVAL):
        S.aead_stream(GCM, key, NONCE, tag=tag)                  # a tag when encrypting
    with pytest.raises(E.EINVAL):
        S.aead_stream(GCM, key, NONCE).finalize_with_tag(tag)     # finalize_with_tag when encrypting
    no_tag = S.aead_stream(GCM, key, NONCE, b"aad", decrypt=True)
    with pytest.raises(E.EINVAL):
        no_tag.finalize()                                         # decrypting without any tag
    given_tag = S.aead_stream(GCM, key, NONCE, b"aad", decrypt=True, tag=tag)
    with pytest.raises(E.EINVAL):
        given_tag.finalize_with_tag(tag)                          # tag twice
    done = S.aead_stream(GCM, key, NONCE)
    done.finalize()
    with pytest.raises(E.EINVAL):
        done.update(b"more")
    with pytest.raises(E.EINVAL):
        done.finalize()
    with pytest.raises(E.EINVAL):
        S.aead_stream(GCM, bytes(20), NONCE)
    with pytest.raises(E.EINVAL):
        S.aead_stream(GCM, key, bytes(16))


def test_chacha_streaming_is_eopnotsupp():
    with pytest.raises(E.EOPNOTSUPP) as info:
        S.aead_stream(CHACHA, bytes(32), NONCE)
    assert "gcm(aes) only" in info.value.message


# ---------------------------------------------------------------------------
# skcipher


@pytest.mark.parametrize("key_len", [16, 24, 32])
def test_cbc_round_trip_and_streaming(key_len):
    key, iv = os.urandom(key_len), os.urandom(16)
    data = os.urandom(160)
    ct = S.skcipher_crypt("cbc(aes)", key, iv, data)
    assert len(ct) == 160 and S.skcipher_crypt("cbc(aes)", key, iv, ct, decrypt=True) == data
    for cuts in ([1], [15, 17, 31], [80], [0, 159]):
        enc = S.skcipher("cbc(aes)", key, iv)
        assert b"".join(enc.update(p) for p in _chunks(data, cuts)) + enc.finalize() == ct
        dec = S.skcipher("cbc(aes)", key, iv, decrypt=True)
        assert b"".join(dec.update(p) for p in _chunks(ct, cuts)) + dec.finalize() == data
    assert S.skcipher_crypt("cbc(aes)", key, iv, b"") == b""


@pytest.mark.parametrize("size", [1, 15, 17, 33])
def test_cbc_partial_block_is_einval(size):
    key, iv = bytes(16), bytes(16)
    for decrypt in (False, True):
        with pytest.raises(E.EINVAL):
            S.skcipher_crypt("cbc(aes)", key, iv, bytes(size), decrypt)
        stream = S.skcipher("cbc(aes)", key, iv, decrypt)
        stream.update(bytes(size))
        with pytest.raises(E.EINVAL):
            stream.finalize()


def test_cbc_has_no_padding_and_chains_blocks():
    key, iv = os.urandom(16), os.urandom(16)
    block = os.urandom(16)
    ct = S.skcipher_crypt("cbc(aes)", key, iv, block + block)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    first = ecb.update(bytes(a ^ b for a, b in zip(block, iv)))
    second = ecb.update(bytes(a ^ b for a, b in zip(block, first)))
    assert ct == first + second


def test_ctr_any_length_and_full_128_bit_counter():
    key = os.urandom(32)
    data = os.urandom(77)
    ct = S.skcipher_crypt("ctr(aes)", key, bytes(16), data)
    assert len(ct) == 77 and S.skcipher_crypt("ctr(aes)", key, bytes(16), ct, decrypt=True) == data
    # The kernel's ctr(aes) increments the whole 16-byte block, big-endian: all-ones wraps to zero.
    stream = S.skcipher_crypt("ctr(aes)", key, b"\xff" * 16, bytes(32))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert stream == ecb.update(b"\xff" * 16) + ecb.update(bytes(16))


@pytest.mark.parametrize("name", ["cbc(aes)", "ctr(aes)"])
def test_skcipher_wrong_sizes_are_einval(name):
    for key_len in (0, 15, 20, 33):
        with pytest.raises(E.EINVAL):
            S.skcipher(name, bytes(key_len), bytes(16))
    for iv_len in (0, 12, 15, 17):
        with pytest.raises(E.EINVAL):
            S.skcipher_crypt(name, bytes(16), bytes(iv_len), bytes(16))


# ---------------------------------------------------------------------------
# hashes and HMAC


@pytest.mark.parametrize("name", HASHES)
def test_digest_and_hash_ctx_match_hashlib(name):
    data = os.urandom(1000)
    assert S.digest(name, data) == hashlib.new(name, data).digest()
    ctx = S.hash_ctx(name)
    for piece in _chunks(data, [3, 64, 65, 500]):
        ctx.update(piece)
    assert ctx.finalize() == hashlib.new(name, data).digest()
    with pytest.raises(E.EINVAL):
        ctx.update(b"late")
    with pytest.raises(E.EINVAL):
        ctx.finalize()
    with pytest.raises(E.EINVAL):
        S.hash_ctx(name).verify(bytes(20))       # verify is an HMAC thing


@pytest.mark.parametrize("name", HMACS)
def test_hmac_matches_stdlib_and_verifies(name):
    hash_name = name[5:-1]
    for key in (b"k", os.urandom(32), os.urandom(200), bytes(S.MAX_HMAC_KEY)):
        data = os.urandom(100)
        tag = S.hmac(name, key, data)
        assert tag == std_hmac.new(key, data, hash_name).digest()
        assert S.hmac_verify(name, key, data, tag) is None
        ctx = S.hmac_ctx(name, key)
        for piece in _chunks(data, [1, 50]):
            ctx.update(piece)
        assert ctx.finalize() == tag


@pytest.mark.parametrize("name", ["sha256", "sha512", *HMACS])
def test_a_digest_context_copies_as_pycas_and_only_while_open(name):
    """copy() goes on from where the context is, apart from it (pyca's Hash.copy/HMAC.copy); a finalized one
    is EINVAL, as its update; copy.copy and pickling stay refused."""
    key = os.urandom(32)
    hash_name = name[5:-1] if name.startswith("hmac") else name

    def local(data: bytes) -> bytes:
        return std_hmac.new(key, data, hash_name).digest() if name != hash_name else hashlib.new(name, data).digest()

    ctx = S.hmac_ctx(name, key) if name != hash_name else S.hash_ctx(name)
    ctx.update(b"common prefix, ")
    twin = ctx.copy()
    assert type(twin) is S.DigestContext and repr(twin) == repr(ctx)
    twin.update(b"then the copy's")
    grandchild = twin.copy()
    ctx.update(b"then the original's")
    grandchild.update(b" and more")
    assert ctx.finalize() == local(b"common prefix, then the original's")
    assert twin.finalize() == local(b"common prefix, then the copy's")
    assert grandchild.finalize() == local(b"common prefix, then the copy's and more")
    with pytest.raises(E.EINVAL, match="already finalized"):
        ctx.copy()
    for export in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError):
            export(twin)


@pytest.mark.parametrize("name", HMACS)
def test_hmac_verify_failures(name):
    key, data = os.urandom(32), b"message"
    tag = S.hmac(name, key, data)
    for bad_data, bad_tag in ((data, _flip(tag, 0)), (data, _flip(tag, len(tag) - 1)), (b"massage", tag)):
        with pytest.raises(E.EBADMSG) as info:
            S.hmac_verify(name, key, bad_data, bad_tag)
        assert not _message_reveals(info.value, key, tag)
    for wrong_size in (tag[:16], tag[:-1], tag + b"\0", b""):
        with pytest.raises(E.EINVAL) as info:
            S.hmac_verify(name, key, data, wrong_size)
        assert f"must be {len(tag)} bytes, not {len(wrong_size)}" in info.value.message
        assert ("truncated" in info.value.message) == (len(wrong_size) < len(tag))  # a long one is not
    for key_len in (0, S.MAX_HMAC_KEY + 1):
        with pytest.raises(E.EINVAL):
            S.hmac(name, bytes(key_len), data)


# ---------------------------------------------------------------------------
# key generation


@pytest.mark.parametrize("spec,size,hint,use", [
    ("aes:128", 16, "aes128", GCM), ("aes:192", 24, "aes192", GCM), ("aes:256", 32, "aes256", GCM),
    ("aes-gcm-siv:128", 16, "aes128-gcm-siv", "gcm-siv(aes)"), ("aes-cbc:192", 24, "aes192-cbc", "cbc(aes)"),
    ("aes-ctr:256", 32, "aes256-ctr", "ctr(aes)"), ("chacha20", 32, "chacha20", CHACHA),
    ("hmac:128", 16, "hmac128", "hmac"), ("hmac:264", 33, "hmac264", "hmac"), ("hmac:1024", 128, "hmac1024", "hmac"),
])
def test_generate_key(spec, size, hint, use):
    made = S.generate_key(spec)
    assert (len(made.material), made.hint, made.use) == (size, hint, use)
    assert S.generate_key(spec).material != made.material
    assert use in {s.key_use for s in S.ALGORITHMS.values()}  # a use some algorithm asks for


def test_a_generated_key_shows_no_material_and_cannot_be_pickled():
    made = S.generate_key("hmac:256")
    assert repr(made) == "<GeneratedKey hmac256>" and not _message_reveals(ValueError(repr(made)), made.material)
    for dump in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            dump(made)


def test_generated_keys_fit_their_algorithms():
    S.aead(GCM, S.generate_key("aes:192").material)
    S.aead("gcm-siv(aes)", S.generate_key("aes-gcm-siv:256").material)
    S.aead(CHACHA, S.generate_key("chacha20").material)
    S.hmac("hmac(sha512)", S.generate_key("hmac:512").material, b"x")


@pytest.mark.parametrize("spec", ["aes:512", "aes:64", "aes", "AES:128", "aes:128 ", "chacha", "chacha20:256",
                                  "aes-gcm-siv:192", "aes-gcm:128", "aes-ctr", "aes-cbc:", "aes-ecb:128",
                                  "hmac:120", "hmac:1032", "hmac:129", "hmac:0128", "hmac:", "hmac", "",
                                  None, 256, b"aes:128"])
def test_generate_key_bad_spec_is_einval(spec):
    with pytest.raises(E.EINVAL):
        S.generate_key(spec)


@pytest.mark.parametrize("spec", ["hmac:8", "hmac:64", "hmac:120", "hmac:129", "hmac:2048"])
def test_an_hmac_size_out_of_range_says_the_range(spec):
    with pytest.raises(E.EINVAL, match="multiple of 8 bits in 128..1024"):
        S.generate_key(spec)


def test_many_items_run_in_pieces_and_each_gets_its_own_answer():
    """crypt_many runs pyca from map() in runs of MAP_RUN items (one map of 65536 held every thread of the
    daemon 40-90 ms: a GIL hunt): every item's answer is its own across the runs' seams, and one bad item
    in a late run fails alone."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = os.urandom(32)
    n = 2 * S.MAP_RUN + 3
    nonces = [os.urandom(12) for _ in range(n)]
    items = [os.urandom(i % 40) for i in range(n)]
    aads = [b"aad %d" % i for i in range(n)]
    engine = S.aead(CHACHA, key)
    status, sealed = engine.crypt_many(nonces, items, aads, False)
    assert status == [0] * n
    assert sealed == [ChaCha20Poly1305(key).encrypt(*args) for args in zip(nonces, items, aads)]
    sealed[-2] = bytes(len(sealed[-2]))  # in the last run
    status, opened = engine.crypt_many(nonces, sealed, aads, True)
    assert status == [0] * (n - 2) + [E.EBADMSG.code, 0]
    assert opened[:-2] == items[:-2] and opened[-2:] == [b"", items[-1]]
