"""Data shoveling by key serial against a real daemon: every result checked against pyca.

Keys are uploaded with known bytes (user/logon keys key ciphers, as with
AF_ALG's ALG_SET_KEY_BY_KEY_SERIAL), so whatever keyden computes can be
recomputed locally: one-shot, batches, streams in random pieces, and
buffers processed in shared memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import os
import random
import subprocess
import sys
import threading
import time

import pytest
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV, ChaCha20Poly1305

import keyden
from keyden import errors as E
from keyden.client import aio, dataplane
from keyden.protocol import MAX_SHARED_REGION, Op

from conftest import REPO

GCM, CHACHA, GCM_SIV = "gcm(aes)", "rfc7539(chacha20,poly1305)", "gcm-siv(aes)"
AUTH_FAILED = "authentication failed"
PYCA_AEAD = {GCM: AESGCM, CHACHA: ChaCha20Poly1305, GCM_SIV: AESGCMSIV}


@pytest.fixture
def aes(client):
    """(key bytes, serial) of an AES-256 logon key."""
    key = os.urandom(32)
    return key, client.add("logon", "test:aes", key)


def pieces(data: bytes, rng: random.Random) -> list[bytes]:
    """``data`` cut at random places, empty pieces included."""
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


# ------------------------------------------------------------------ one-shot


@pytest.mark.parametrize("alg,size", [(GCM, 16), (GCM, 24), (GCM, 32), (CHACHA, 32), (GCM_SIV, 16), (GCM_SIV, 32)])
def test_aead_one_shot_equals_pyca(client, alg, size):
    key = os.urandom(size)
    aead = client.aead(client.add("user", f"k{size}", key), alg)
    local = PYCA_AEAD[alg](key)
    for data, aad in ((b"", None), (b"attack at dawn", b"header"), (os.urandom(5000), b"")):
        nonce = os.urandom(12)
        ciphertext = aead.encrypt(nonce, data, aad)
        assert ciphertext == local.encrypt(nonce, data, aad)
        assert aead.decrypt(nonce, local.encrypt(nonce, data, aad), aad) == data
    assert repr(aead) == f"<Aead {alg} key={aead.serial}>" and key.hex() not in repr(aead)


def test_gcm_siv_every_shape_equals_pyca_and_a_repeated_nonce_reveals_only_equality(client):
    """keyden's gcm-siv(aes) (RFC 8452): one-shot, batch, keyden's nonces and shared memory all agree with
    pyca's AESGCMSIV; streaming is refused (the construction is two-pass)."""
    key = os.urandom(32)
    aead, local = client.aead(client.add("logon", "test:siv", key), GCM_SIV), AESGCMSIV(key)
    nonce = os.urandom(12)
    for data in (b"", b"short", os.urandom(dataplane.BULK_THRESHOLD + 100)):  # the last through shared memory
        sealed = aead.encrypt(nonce, data, b"ad")
        assert sealed == local.encrypt(nonce, data, b"ad") and aead.decrypt(nonce, sealed, b"ad") == data
    assert aead.encrypt(nonce, b"same", None) == aead.encrypt(nonce, b"same", None)  # deterministic per nonce
    assert aead.encrypt(nonce, b"same", None) != aead.encrypt(nonce, b"diff", None)
    blob = aead.encrypt_random(b"chosen by keyden")
    assert local.decrypt(blob[:12], blob[12:], None) == b"chosen by keyden"
    assert aead.encrypt_batch([nonce, nonce], [b"a", b"b"]) == [local.encrypt(nonce, m, None) for m in (b"a", b"b")]
    with pytest.raises(E.EOPNOTSUPP):
        client.stream(GCM_SIV, aead.serial, iv=nonce)
    with pytest.raises(E.EINVAL):  # RFC 8452 has AES-128 and AES-256 only
        client.aead(client.add("logon", "test:siv192", os.urandom(24)), GCM_SIV).encrypt(nonce, b"x")


def test_a_key_of_the_wrong_length_is_einval_naming_the_lengths_the_cipher_takes_not_the_keys(client):
    """Using a key needs only search permission: the message says no more than the refusal does."""
    serial = client.add("logon", "test:odd-length", os.urandom(20))
    with pytest.raises(E.EINVAL) as refused:
        client.aead(serial).encrypt(bytes(12), b"x")
    assert "16, 24 or 32 bytes" in str(refused.value) and "20" not in str(refused.value)


def test_encrypt_into_and_decrypt_into_fill_caller_buffers(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    nonce, data = os.urandom(12), os.urandom(1000)
    out = bytearray(1100)
    assert aead.encrypt_into(nonce, data, b"ad", out) == 1016
    assert bytes(out[:1016]) == AESGCM(key).encrypt(nonce, data, b"ad")
    plain = bytearray(1016)
    assert aead.decrypt_into(nonce, bytes(out[:1016]), b"ad", memoryview(plain)) == 1000
    assert bytes(plain[:1000]) == data


def test_keyden_chosen_nonces_are_fresh_and_prefixed(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    blobs = [aead.encrypt_random(b"same message", b"ad") for _ in range(3)]
    assert len({b[:12] for b in blobs}) == 3
    for blob in blobs:
        assert len(blob) == 12 + 12 + 16
        assert AESGCM(key).decrypt(blob[:12], blob[12:], b"ad") == b"same message"
        assert aead.decrypt_random(blob, b"ad") == b"same message"
    local = os.urandom(12)
    assert aead.decrypt_random(local + AESGCM(key).encrypt(local, b"from pyca", None)) == b"from pyca"
    with pytest.raises(E.EBADMSG):
        aead.decrypt_random(blobs[0], b"other ad")
    with pytest.raises(E.EBADMSG):
        aead.decrypt_random(blobs[0][:27])  # shorter than nonce + tag


def test_batches_equal_one_shot_with_per_item_failures(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    items = [os.urandom(n) for n in (0, 1, 100, 3000)]
    nonces = [os.urandom(12) for _ in items]
    aads = [b"a%d" % i for i in range(len(items))]
    sealed = aead.encrypt_batch(nonces, items, aads)
    assert sealed == [AESGCM(key).encrypt(n, i, a) for n, i, a in zip(nonces, items, aads)]

    tampered = list(sealed)
    tampered[2] = bytes([sealed[2][0] ^ 1]) + sealed[2][1:]
    opened = aead.decrypt_batch(nonces, tampered, aads)
    assert [o for i, o in enumerate(opened) if i != 2] == [i for n, i in enumerate(items) if n != 2]
    assert isinstance(opened[2], E.EBADMSG)

    chosen = aead.encrypt_batch(None, items)  # keyden picks each nonce: nonce || ct || tag
    assert [AESGCM(key).decrypt(b[:12], b[12:], None) for b in chosen] == items
    assert aead.decrypt_batch(None, chosen) == items
    with pytest.raises(E.EINVAL):
        aead.encrypt_batch(nonces[:2], items)  # one nonce per item
    status, out = client.batch(GCM, serial, [b"x", b"y"], ivs=[os.urandom(12), b"short"])
    assert status == [0, E.EINVAL.code] and out[1] == b""

    mac_key = os.urandom(48)
    mac = client.hmac(client.add("user", "mac", mac_key), "hmac(sha384)")
    expected = []
    for item in items:
        h = pyca_hmac.HMAC(mac_key, hashes.SHA384())
        h.update(item)
        expected.append(h.finalize())
    assert mac.mac_batch(items) == expected


def test_batches_of_every_kind_answer_per_item(client, aes):
    """Batched HMAC verification (the expected tag in each IV), block ciphers, hashes and keyden-chosen
    nonces for ciphers that take IVs: each item's status and output as its one-shot call would give them."""
    key, serial = aes
    mac_key = os.urandom(32)
    mac_serial = client.add("user", "batch-mac", mac_key)
    tag = pyca_hmac.HMAC(mac_key, hashes.SHA256())
    tag.update(b"message")
    good = tag.finalize()
    status, out = client.batch("hmac(sha256)", mac_serial, [b"message", b"message", b"message"],
                               ivs=[good, bytes(32), good[:16]], decrypt=True)
    assert status == [0, E.EBADMSG.code, E.EINVAL.code] and out == [b"", b"", b""]  # a short tag: malformed

    ivs, blocks = [os.urandom(16) for _ in range(3)], [os.urandom(16 * n) for n in (1, 2, 4)]
    status, out = client.batch("cbc(aes)", serial, blocks, ivs=ivs)
    expected = [Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor().update(b) for iv, b in zip(ivs, blocks)]
    assert status == [0, 0, 0] and out == expected
    status, out = client.batch("cbc(aes)", serial, [b"not a whole block"], ivs=[ivs[0]])
    assert status == [E.EINVAL.code] and out == [b""]
    status, out = client.batch("cbc(aes)", serial, out, ivs=ivs[:1], decrypt=True)  # errors stay per item
    assert status == [0] and out == [b""]

    status, out = client.batch("sha256", 0, [b"a", b"bc"])
    assert status == [0, 0] and out == [hashlib.sha256(b"a").digest(), hashlib.sha256(b"bc").digest()]
    with pytest.raises(E.EINVAL, match="keyden-chosen nonces are for AEAD"):
        client.batch("ctr(aes)", serial, [b"x" * 20], random_nonce=True)
    status, out = client.batch(GCM, serial, [b"x", b"y"], ivs=[os.urandom(12)] * 2, random_nonce=True)
    assert status == [E.EINVAL.code] * 2 and out == [b"", b""]  # a nonce given where keyden is to choose


def test_a_batch_whose_reply_could_pass_the_frame_cap_is_refused_before_any_work(fresh_daemon):
    """The reply is bounded by items plus per-item growth (tags, nonces, digests), checked up front."""
    d = fresh_daemon("max_frame = 8192\n")
    with d.connect() as c:
        key = os.urandom(32)
        serial = c.add("logon", "test:aes", key)
        items = [os.urandom(16) for _ in range(200)]  # a 4 KiB request; its sealed reply would be 10408 bytes
        with pytest.raises(E.EMSGSIZE, match="frame cap"):
            c.batch(GCM, serial, items, random_nonce=True)
        with pytest.raises(E.EMSGSIZE):  # 300 empty items, 300 HMACs of 32 bytes
            c.batch("hmac(sha256)", c.add("logon", "test:mac", os.urandom(32)), [b""] * 300)
        status, sealed = c.batch(GCM, serial, items[:50], random_nonce=True)  # what fits is answered
        assert status == [0] * 50
        assert [AESGCM(key).decrypt(b[:12], b[12:], None) for b in sealed] == items[:50]
        assert c.batch(GCM, serial, sealed, decrypt=True, random_nonce=True) == ([0] * 50, items[:50])
        big = [os.urandom(1000) for _ in range(3)]  # large items, small outputs: the bound is no cruder
        assert c.batch("sha256", 0, big) == ([0] * 3, [hashlib.sha256(b).digest() for b in big])
        assert c.ping(b"still connected") == b"still connected"


def test_a_stream_piece_whose_reply_could_pass_the_frame_cap_changes_nothing(fresh_daemon):
    """cbc(aes) holds a partial block, so a piece that fills a frame could come back 15 bytes over the
    cap: refused before the stream takes it, so sending the same bytes in smaller pieces is right (it
    was taken, then refused, and the retry's output was wrong).  A finalize with a frame's worth of data
    sends it through update first (its reply with the tag would not fit)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    d = fresh_daemon("max_frame = 8192\n")
    with d.connect() as c:
        key, iv = os.urandom(32), os.urandom(16)
        serial = c.add("logon", "test:aes", key)
        head, big, tail = os.urandom(15), os.urandom(c.max_frame - 8), os.urandom(9)  # 16-byte blocks in all
        local = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        expected = local.update(head + big + tail) + local.finalize()
        handle, _ = c.stream_init("cbc(aes)", serial, iv=iv)
        out = c.stream_update(handle, head)
        with pytest.raises(E.EMSGSIZE, match="nothing was processed"):
            c.stream_update(handle, big)
        out += c.stream_update(handle, big[:2000]) + c.stream_update(handle, big[2000:])
        last, _ = c.stream_final(handle, tail, b"")
        assert out + last == expected

        nonce, data = os.urandom(12), os.urandom(c.max_frame - 12)
        with c.stream(GCM, serial, iv=nonce) as stream:
            sealed = b"".join(stream.finalize(data))
        assert sealed == AESGCM(key).encrypt(nonce, data, None)
        assert c.ping(b"still connected") == b"still connected"


def test_helpers_and_the_cli_fit_their_requests_to_a_small_frame_cap(fresh_daemon):
    """max_frame may be set down to 8192: the AESGCM-shaped helper takes data over it through a shared
    region, and a stream's update (the CLI sends 1 MiB reads) goes in pieces the cap takes, in both
    clients (they sent it in one request: EMSGSIZE on a 100 kB message; found by the data-plane hunt)."""
    d = fresh_daemon("max_frame = 65536\n")
    key, nonce, data = os.urandom(32), os.urandom(12), os.urandom(150_000)
    sealed = AESGCM(key).encrypt(nonce, data, b"ad")
    ctr = Cipher(algorithms.AES(key), modes.CTR(nonce + bytes(4))).encryptor().update(data)
    with d.connect() as c:
        assert c.max_frame == 65536
        serial = c.add("logon", "test:aes", key, "@u")
        aead = c.aead(serial, GCM)
        assert aead.encrypt(nonce, data, b"ad") == sealed
        assert aead.decrypt(nonce, sealed, b"ad") == data
        assert aead.decrypt_random(aead.encrypt_random(data, b"ad"), b"ad") == data
        into = bytearray(len(sealed))
        assert aead.encrypt_into(nonce, data, b"ad", into) == len(sealed) and into == sealed
        with c.stream("ctr(aes)", serial, iv=nonce + bytes(4)) as stream:
            assert stream.update(data) + stream.finalize()[0] == ctr

        async def streamed():
            a = await keyden.aconnect(d.socket)
            try:
                async with await a.stream("ctr(aes)", serial, iv=nonce + bytes(4)) as stream:
                    out = await stream.update(data) + (await stream.finalize())[0]
                hashing = await a.hash("sha256")  # a large update's pieces and the next update, made at once
                await asyncio.gather(hashing.update(data), hashing.update(b"tail"))
                return out, (await hashing.finalize())[1]
            finally:
                await a.close()
        assert asyncio.run(streamed()) == (ctr, hashlib.sha256(data + b"tail").digest())

    def cli(*args, stdin=data):
        env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SOCKET=d.socket)
        env.pop("KEYDEN_SESSION", None)
        r = subprocess.run([sys.executable, "-m", "keyden", *args], input=stdin, capture_output=True, env=env,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout
    assert cli("aead", "decrypt", str(serial), stdin=cli("aead", "encrypt", str(serial))) == data
    assert cli("cipher", "encrypt", str(serial), "-a", "ctr(aes)", "--iv", (nonce + bytes(4)).hex()) == ctr
    assert cli("hash", "sha256").decode().strip() == hashlib.sha256(data).hexdigest()


def test_turns_lost_to_interrupts_never_hang_later_large_calls(client):
    """A KeyboardInterrupt (any exception a signal handler raises) between RegionPool.take and the try
    that gives the region back lost its turn for good, and four such losses hung every later large call
    of the client (found by the client hunt).  A turn is now its thread's: the thread finds its own
    again, and the turn of a thread that ended is taken back."""
    key = os.urandom(32)
    aead = client.aead(client.add("logon", "test:turns", key), GCM)
    pool, nonce, data = client.region_pool, os.urandom(12), os.urandom(dataplane.BULK_THRESHOLD)
    sealed = []

    def in_a_thread(work):
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        thread.join(10)
        assert not thread.is_alive(), "a large call waits for a turn forever"

    def lose_turns_then_encrypt():
        for _ in range(dataplane.POOLED_REGIONS):
            pool.take(len(data))  # interrupted before its try: never given back
        sealed.append(aead.encrypt(nonce, data, None))
    in_a_thread(lose_turns_then_encrypt)
    for _ in range(dataplane.POOLED_REGIONS):
        in_a_thread(lambda: pool.take(len(data)))  # threads that end holding a turn
    in_a_thread(lambda: sealed.append(aead.encrypt(nonce, data, None)))
    assert sealed == [AESGCM(key).encrypt(nonce, data, None)] * 2


def test_a_client_that_made_large_calls_is_freed_once_dropped(daemon, client):
    """A turn's finalizer held its pool, and so the client, for as long as the thread that made the call
    lived: the main thread's, forever (found by review)."""
    import gc
    import weakref

    other = daemon.connect(session=client.session_token)
    aead = other.aead(other.add("logon", "test:freed", os.urandom(32), "@s"), GCM)
    aead.encrypt_random(bytes(dataplane.BULK_THRESHOLD))
    gone = weakref.ref(other)
    other.close()
    del other, aead
    gc.collect()
    assert gone() is None


def test_a_buffer_of_two_dimensions_is_einval_and_a_shared_buffer_with_a_view_in_use_stays_open(client):
    """Found by the client hunt: a 2-D memoryview as a batch's items or call_many's calls raised
    NotImplementedError; a shared buffer closed while a slice of its view lived was detached in the
    daemon, then failed to unmap here, half closed."""
    grid = memoryview(bytes(12)).cast("B", (3, 4))
    with pytest.raises(E.EINVAL, match="sequence"):
        client.batch("sha256", 0, grid)
    with pytest.raises(E.EINVAL, match="sequence"):
        client.call_many(grid)
    assert client.ping(b"still connected") == b"still connected"

    key = os.urandom(32)
    serial = client.add("logon", "test:view", key)
    shm = client.shared_buffer(4096)
    piece = shm.view[:16]
    with pytest.raises(BufferError, match="still in use"):
        shm.close()
    piece[:] = bytes(range(16))
    assert shm.cipher("ctr(aes)", serial, 0, 16, 16, iv=bytes(16))[0] == 16  # still attached, still mapped
    local = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    assert bytes(shm.view[16:32]) == local.update(bytes(range(16)))
    piece.release()
    shm.close()
    shm.close()  # once closed, again is nothing


def test_hash_and_hmac_one_shot(client):
    data = os.urandom(777)
    for alg in ("sha1", "sha224", "sha256", "sha384", "sha512"):
        assert client.digest(alg, data) == hashlib.new(alg, data).digest()
    mac_key = os.urandom(20)
    mac = client.hmac(client.add("user", "mac", mac_key))
    tag = mac.mac(data)
    h = pyca_hmac.HMAC(mac_key, hashes.SHA256())
    h.update(data)
    assert tag == h.finalize()
    assert mac.verify(data, tag) is None
    with pytest.raises(E.EBADMSG) as bad:
        mac.verify(data + b"!", tag)
    assert bad.value.message == "HMAC verification failed"
    with pytest.raises(E.EINVAL):
        client.mac_verify("hmac(sha256)", mac.serial, data, tag[:16])  # truncated tags are refused, not compared
    for wrong in (tag[:16], b"", tag + b"!"):  # pyca's HMAC.verify: InvalidSignature, never an argument error
        with pytest.raises(InvalidSignature) as bad:
            mac.verify(data, wrong)
        assert isinstance(bad.value, E.EBADMSG) and bad.value.message == "HMAC verification failed"


def test_skcipher_one_shot_equals_pyca(client, aes):
    key, serial = aes
    data, iv = os.urandom(64), os.urandom(16)
    for alg, mode in (("cbc(aes)", modes.CBC), ("ctr(aes)", modes.CTR)):
        enc = Cipher(algorithms.AES(key), mode(iv)).encryptor()
        expected = enc.update(data) + enc.finalize()
        assert client.cipher(alg, serial, data, iv=iv) == expected
        assert client.cipher(alg, serial, expected, iv=iv, decrypt=True) == data
    with pytest.raises(E.EINVAL):
        client.cipher("cbc(aes)", serial, data[:20], iv=iv)  # no padding: whole blocks only
    with pytest.raises(E.EINVAL):
        client.cipher("cbc(aes)", serial, data, iv=iv[:8])


# ------------------------------------------------------------------ streams


def test_streams_in_random_pieces_equal_one_shot(client, aes):
    key, serial = aes
    mac_key = os.urandom(32)
    mac_serial = client.add("user", "mac", mac_key)
    rng = random.Random(1234)
    for _ in range(4):
        data = os.urandom(rng.choice((0, 1, 15, 16, 1000, 70000)))
        aad, nonce, iv = os.urandom(rng.randrange(40)), os.urandom(12), os.urandom(16)

        with client.stream(GCM, serial, iv=nonce, aad=aad) as s:
            out = b"".join(s.update(p) for p in pieces(data, rng))
            last, tag = s.finalize()
        assert out + last + tag == AESGCM(key).encrypt(nonce, data, aad)
        s = client.stream(GCM, serial, iv=nonce, aad=aad, decrypt=True)
        plain = b"".join(s.update(p) for p in pieces(out + last, rng))
        assert plain + s.finalize(tag=tag)[0] == data

        ctr = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        s = client.stream("ctr(aes)", serial, iv=iv)
        assert b"".join(s.update(p) for p in pieces(data, rng)) + s.finalize()[0] == ctr.update(data)

        blocks = data[:len(data) // 16 * 16]
        cbc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        expected = cbc.update(blocks) + cbc.finalize()
        s = client.stream("cbc(aes)", serial, iv=iv)
        assert b"".join(s.update(p) for p in pieces(blocks, rng)) + s.finalize()[0] == expected
        s = client.stream("cbc(aes)", serial, iv=iv, decrypt=True)
        assert b"".join(s.update(p) for p in pieces(expected, rng)) + s.finalize()[0] == blocks

        h = client.hash("sha512")
        for p in pieces(data, rng):
            assert h.update(p) == b""
        assert h.finalize() == (b"", hashlib.sha512(data).digest())

        m = client.hmac(mac_serial).stream()
        for p in pieces(data, rng):
            m.update(p)
        local = pyca_hmac.HMAC(mac_key, hashes.SHA256())
        local.update(data)
        assert m.finalize() == (b"", local.finalize())


def test_stream_failures(client, aes):
    key, serial = aes
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, b"x" * 100, None)
    s = client.stream(GCM, serial, iv=nonce, decrypt=True)
    s.update(sealed[:-16])  # plaintext is released before the tag is checked...
    with pytest.raises(E.EBADMSG) as bad:
        s.finalize(tag=bytes(16))  # ...which is why the final answer is what counts
    assert bad.value.message == AUTH_FAILED

    random_nonce = client.stream(GCM, serial, random_nonce=True)
    body = random_nonce.update(b"chosen by keyden")
    last, tag = random_nonce.finalize()
    assert AESGCM(key).decrypt(random_nonce.nonce, body + last + tag, None) == b"chosen by keyden"

    s = client.stream("cbc(aes)", serial, iv=os.urandom(16))
    s.update(b"not a whole block")
    with pytest.raises(E.EINVAL):
        s.finalize()
    with pytest.raises(E.EOPNOTSUPP, match=r"not rfc7539\(chacha20,poly1305\): encrypt in one call, in a batch"):
        client.stream(CHACHA, client.add("user", "chacha", os.urandom(32)), iv=nonce)
    untagged = client.stream(GCM, serial, iv=nonce, decrypt=True)
    untagged.update(sealed[:-16])
    with pytest.raises(E.EINVAL, match="takes the tag to check"):
        untagged.finalize()
    assert untagged.finalize(tag=sealed[-16:]) == (b"", b"")  # refused before anything was processed: still open
    tagged = client.stream(GCM, serial, iv=nonce)
    with pytest.raises(E.EINVAL, match="a tag is given only to finish"):
        tagged.finalize(tag=bytes(16))
    assert tagged.finalize(b"x" * 100) == (sealed[:-16], sealed[-16:])
    for mistake, tag in ((False, b""), (True, bytes(16))):  # the daemon refuses it too, and keeps the stream
        handle, _ = client.stream_init(GCM, serial, iv=nonce, decrypt=not mistake)
        with pytest.raises(E.EINVAL):
            client.stream_final(handle, b"", tag if mistake else b"")
        client.stream_abort(handle)
    with pytest.raises(E.EINVAL):
        client.stream("sha256", aad=b"no aad for hashes")
    with pytest.raises(E.EINVAL):
        client.stream(GCM, serial, iv=nonce, random_nonce=True)  # both an IV and a keyden nonce


def test_a_stream_stops_when_its_key_can_no_longer_be_used(client):
    """Revoked, expired, unlinked or permission taken away: the next piece fails as one-shot would, and the
    stream is closed."""
    nonce = os.urandom(12)

    def opened(kind: str):
        serial = client.add("logon", f"stream:{kind}", os.urandom(32), "@s")
        stream = client.stream(GCM, serial, iv=nonce) if kind != "hmac" else client.hmac(serial).stream()
        stream.update(b"first piece")
        return serial, stream

    serial, revoked = opened("revoke")
    client.revoke(serial)
    with pytest.raises(E.EKEYREVOKED):
        revoked.update(b"more")
    with pytest.raises(E.EBADF):  # closed with it
        client.stream_final(revoked.handle)
    with pytest.raises(dataplane.StreamFinished):  # and the client knows it: not the daemon's bare EBADF
        revoked.update(b"more")

    serial, finishing = opened("hmac")
    client.revoke(serial)
    with pytest.raises(E.EKEYREVOKED):
        finishing.finalize()

    serial, expiring = opened("expire")
    client.timeout(serial, 1)
    time.sleep(1.3)
    with pytest.raises(E.EKEYEXPIRED):
        expiring.update(b"more")

    serial, unlinked = opened("unlink")
    client.unlink(serial, "@s")
    with pytest.raises(E.ENOKEY):
        unlinked.update(b"more")

    serial, denied = opened("setperm")
    client.setperm(serial, 0x3f000000 & ~0x08000000)  # the possessor keeps all but search
    with pytest.raises(E.EACCES):
        denied.update(b"more")

    serial, stream = opened("kept")
    assert stream.update(b"more") and stream.finalize()  # an untouched key streams on


def test_a_stream_left_unfinished_by_a_with_block_is_closed(client, aes):
    _key, serial = aes
    with client.stream(GCM, serial, iv=os.urandom(12)) as s:
        s.update(b"never finalized")
    with pytest.raises(E.EBADF):
        client.stream_update(s.handle, b"x")
    with client.hash("sha256") as h:
        h.update(b"abc")
        assert h.finalize()[1] == hashlib.sha256(b"abc").digest()  # finalized: leaving the block is a no-op


def test_an_algorithm_where_a_key_belongs_says_so(client, aes):
    """(alg, key) swapped (the helpers take (key, alg)) was "a string must be a serial": it names the swap."""
    _key, serial = aes
    for swapped in (lambda: client.cipher(serial, GCM, b"x"), lambda: client.aead(GCM, serial),
                    lambda: client.mac(serial, "hmac(sha256)", b"x")):
        with pytest.raises(E.EINVAL, match="an algorithm's name where a key belongs"):
            swapped()


def test_digest_and_mac_take_only_their_own_kind(client, aes):
    _key, serial = aes
    for wrong in (lambda: client.digest("hmac(sha256)", b"x"), lambda: client.mac("sha256", serial, b"x"),
                  lambda: client.mac_verify(GCM, serial, b"x", bytes(32))):
        with pytest.raises(E.ENOENT):
            wrong()


def test_a_generated_key_keys_only_what_it_was_made_for(client, aes):
    """genkey's keys serve their one use (an AES mode, ChaCha20-Poly1305, or HMACs) by every path: one-shot,
    batch, stream, shared memory, and as a KDF's master key (HMAC keys).  An AES key made for GCM must not
    give out CTR's keystream at a chosen IV: E_K(0) is GCM's hash key, which forges tags offline.  Keys added
    as bytes key anything, as AF_ALG's keys by serial do; wrapping takes any key."""
    gcm_key, ctr_key, chacha_key = client.generate("aes:256"), client.generate("aes-ctr:256"), client.generate("chacha20")
    mac_key = client.generate("hmac:256")
    nonce = os.urandom(12)
    for wrong in (lambda: client.cipher("ctr(aes)", gcm_key, bytes(16), iv=bytes(16)),
                  lambda: client.aead(gcm_key, GCM_SIV).encrypt(nonce, b"x", None),
                  lambda: client.aead(ctr_key, GCM).encrypt(nonce, b"x", None),  # named: the daemon refuses
                  lambda: client.hmac(gcm_key).mac(b"x"),
                  lambda: client.aead(mac_key, GCM).encrypt(nonce, b"x", None),
                  lambda: client.aead(chacha_key, GCM).encrypt(nonce, b"x", None),  # 32 bytes: AES-256 would take it
                  lambda: client.aead(gcm_key, CHACHA).encrypt(nonce, b"x", None),
                  lambda: client.aead(mac_key, GCM).encrypt_batch([nonce], [b"x"]),
                  lambda: client.stream(GCM, mac_key, iv=nonce),
                  lambda: client.stream("hmac(sha256)", gcm_key),
                  lambda: client.kdf(gcm_key)):
        with pytest.raises(E.ENOPROTOOPT, match="was generated for"):
            wrong()
    assert client.aead(gcm_key).decrypt(nonce, client.aead(gcm_key).encrypt(nonce, b"ok", None), None) == b"ok"
    assert len(client.cipher("ctr(aes)", ctr_key, b"ok", iv=bytes(16))) == 2
    assert len(client.aead(chacha_key, CHACHA).encrypt(nonce, b"ok", None)) == 18
    assert len(client.hmac(mac_key, "hmac(sha512)").mac(b"ok")) == 64 and client.kdf(mac_key)  # every HMAC
    _bytes, added = aes
    assert client.hmac(added).mac(b"any") and client.aead(added).encrypt(nonce, b"any", None)  # unbound
    with client.shared_buffer(4096) as shm:
        with pytest.raises(E.ENOPROTOOPT):
            shm.cipher(GCM, mac_key, 0, 64, 1024, iv=nonce)
    client.setperm(added, 0x3f3f0000)  # export needs read
    client.export(added, wrapping_key=mac_key)  # wrapping runs the key through HKDF: any key wraps


def test_an_aead_helper_without_an_algorithm_uses_the_one_its_key_was_generated_for(client, aes, monkeypatch):
    """As a Vault transit key brings its type: client.aead(key) asks keyden what genkey made the key for
    (key_algorithm, which search permission suffices to ask) and uses that AEAD; a key made for none
    (added, derived) gets gcm(aes); one made for a cipher or a MAC is refused at once."""
    specs = ("aes:128", "aes-gcm-siv:256", "chacha20", "aes-cbc:256", "aes-ctr:128", "hmac:256")
    made = {spec: client.generate(spec) for spec in specs}
    assert [client.key_algorithm(made[spec]) for spec in specs] == [GCM, GCM_SIV, CHACHA, "cbc(aes)", "ctr(aes)",
                                                                    "hmac"]
    _bytes, added = aes
    assert client.key_algorithm(added) == "" and client.aead(added).alg == GCM
    nonce = os.urandom(12)
    for spec, alg in (("aes:128", GCM), ("aes-gcm-siv:256", GCM_SIV), ("chacha20", CHACHA)):
        helper = client.aead(made[spec])
        assert helper.alg == alg, spec
        assert client.aead(made[spec], alg).decrypt(nonce, helper.encrypt(nonce, b"data", b"ad"), b"ad") == b"data"
    for spec in ("aes-cbc:256", "aes-ctr:128", "hmac:256"):
        with pytest.raises(E.ENOPROTOOPT, match=f"key {made[spec]} was generated for .* only, not an AEAD"):
            client.aead(made[spec])
    for keys_no_cipher in ("@s", client.generate("ed25519")):
        with pytest.raises(E.ENOPROTOOPT, match="cannot key a cipher"):
            client.aead(keys_no_cipher)
    client.setperm(made["chacha20"], 0x08000000)  # its possessor may search it, nothing more
    with pytest.raises(E.EACCES):
        client.describe(made["chacha20"])
    assert client.key_algorithm(made["chacha20"]) == CHACHA and client.aead(made["chacha20"]).alg == CHACHA
    hidden = client.generate("chacha20")
    client.setperm(hidden, 0x01000000)  # view only: not even search
    with pytest.raises(E.EACCES):
        client.aead(hidden)
    client.revoke(made["aes:128"])
    with pytest.raises(E.EKEYREVOKED):
        client.aead(made["aes:128"])

    def older_daemon(key):
        raise E.ENOSYS("unknown opcode 55")
    monkeypatch.setattr(client, "key_algorithm", older_daemon)
    assert client.aead(made["chacha20"]).alg == GCM  # the default it had before it could ask
    monkeypatch.setattr(client, "key_algorithm", lambda key: "ocb(aes)")  # a newer daemon's
    with pytest.raises(E.ENOPROTOOPT, match="which this client does not know: name the algorithm"):
        client.aead(made["chacha20"])


def test_an_hmac_stream_verifies_inside_keyden(client):
    key = os.urandom(32)
    mac = client.hmac(client.add("logon", "stream:verify", key))
    data = os.urandom(5000)
    h = pyca_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    tag = h.finalize()
    good = mac.stream(verify=True)
    good.update(data[:100]), good.update(data[100:])
    assert good.finalize(tag=tag) == (b"", b"")
    bad = mac.stream(verify=True)
    bad.update(data + b"!")
    with pytest.raises(E.EBADMSG):
        bad.finalize(tag=tag)
    short = mac.stream(verify=True)
    with pytest.raises(E.EINVAL):  # truncated tags are refused, not compared
        short.finalize(data, tag=tag[:16])
    with pytest.raises(E.EINVAL):  # verifying needs the expected tag
        mac.stream(verify=True).finalize(data)


def test_fields_an_operation_does_not_take_are_refused(client, aes):
    _key, serial = aes
    nonce = os.urandom(12)
    encrypting = client.stream(GCM, serial, iv=nonce)
    with pytest.raises(E.EINVAL):  # a tag goes with decryption only
        encrypting.finalize(tag=bytes(16))
    with pytest.raises(E.EINVAL):
        client.stream("sha256", decrypt=True)
    with pytest.raises(E.EINVAL):
        client.stream("cbc(aes)", serial, iv=bytes(16)).finalize(tag=bytes(16))
    with pytest.raises(E.EINVAL):
        client.cipher("sha256", 0, b"data", iv=bytes(16))
    with pytest.raises(E.EINVAL):
        client.stream("hmac(sha256)", serial, iv=bytes(16))


def test_an_hmac_takes_a_tag_only_to_verify_it(client):
    """Without DECRYPT, a tag in the IV field was ignored and the MAC came back, status 0: a caller who
    forgot decrypt=True read every tag, wrong ones too, as verified (found by a fuzzing hunt)."""
    key = client.add("logon", "mac:no-iv", os.urandom(32))
    tag = client.mac("hmac(sha256)", key, b"data")
    wrong = bytes(32)
    with pytest.raises(E.EINVAL, match="with DECRYPT"):
        client.cipher("hmac(sha256)", key, b"data", iv=wrong)
    assert client.batch("hmac(sha256)", key, [b"data", b"data"], ivs=[tag, wrong]) == ([E.EINVAL.code] * 2, [b""] * 2)
    assert client.batch("hmac(sha256)", key, [b"data", b"data"], ivs=[tag, wrong], decrypt=True)[0] == [
        0, E.EBADMSG.code]
    with client.shared_buffer(4096) as shm:
        with pytest.raises(E.EINVAL, match="with DECRYPT"):
            shm.cipher("hmac(sha256)", key, 0, 100, 200, iv=wrong)
        assert shm.cipher("hmac(sha256)", key, 0, 100, 200) == (32, b"")


def test_closed_streams_are_ebadf_and_streams_are_limited_per_connection(client, daemon):
    finished = client.hash("sha256")
    finished.finalize()
    for op in (lambda: client.stream_update(finished.handle, b"x"), lambda: client.stream_final(finished.handle),
               lambda: client.stream_abort(finished.handle)):
        with pytest.raises(E.EBADF):
            op()
    aborted = client.hash("sha256")
    aborted.abort()
    with pytest.raises(E.EBADF):
        client.stream_update(aborted.handle, b"x")
    with pytest.raises(E.EBADF):
        client.stream_update(0x7fffffff, b"x")

    open_streams = [client.hash("sha256") for _ in range(64)]
    with pytest.raises(E.EMFILE):
        client.hash("sha256")
    open_streams.pop().abort()
    client.hash("sha256")  # a slot freed is a slot usable
    with daemon.connect(session=client.session_token) as other:
        other.hash("sha256").finalize()  # the limit is per connection


# ------------------------------------------------- copies of hash and HMAC streams


PYCA_HASHES = {"sha256": hashes.SHA256, "sha512": hashes.SHA512}


@pytest.mark.parametrize("alg", ["sha256", "sha512", "hmac(sha256)"])
def test_a_copied_stream_goes_on_as_pycas_copy_does(client, alg):
    """Stream.copy() is pyca's Hash.copy/HMAC.copy: a running transcript hash, MACs of messages with a common
    prefix.  The original and its copies go on apart, each equal to pyca's own copies fed the same."""
    key = os.urandom(32)
    if alg.startswith("hmac"):
        original = client.hmac(client.add("logon", "copy:mac", key), alg).stream()
        local = pyca_hmac.HMAC(key, hashes.SHA256())
    else:
        original, local = client.hash(alg), hashes.Hash(PYCA_HASHES[alg]())
    prefix, theirs, ours, deeper = os.urandom(70000), b"the original's", os.urandom(1000), b" and the grandchild's"
    for piece in (prefix[:1], prefix[1:]):
        original.update(piece)
        local.update(piece)
    copied, local_copy = original.copy(), local.copy()
    assert type(copied) is type(original) and copied.handle != original.handle and copied.nonce == b""
    original.update(theirs), local.update(theirs)
    copied.update(ours), local_copy.update(ours)
    grandchild, local_grandchild = copied.copy(), local_copy.copy()
    grandchild.update(deeper), local_grandchild.update(deeper)
    assert copied.finalize()[1] == local_copy.finalize()
    assert original.finalize()[1] == local.finalize()
    assert grandchild.finalize(b"!")[1] == (local_grandchild.update(b"!"), local_grandchild.finalize())[1]


def test_a_verifying_hmac_stream_copies_as_a_verifying_one(client):
    key = os.urandom(32)
    mac = client.hmac(client.add("logon", "copy:verify", key))

    def tag_of(data: bytes) -> bytes:
        h = pyca_hmac.HMAC(key, hashes.SHA256())
        h.update(data)
        return h.finalize()
    verifying = mac.stream(verify=True)
    verifying.update(b"header|")
    copied, needs_a_tag = verifying.copy(), verifying.copy()
    verifying.update(b"one")
    copied.update(b"two")
    assert copied.finalize(tag=tag_of(b"header|two")) == (b"", b"")  # checked in keyden, not returned
    with pytest.raises(E.EBADMSG):
        verifying.finalize(tag=tag_of(b"header|two"))  # the original went on with other data
    with pytest.raises(E.EINVAL):  # a copy verifies too: finishing it needs the expected tag
        needs_a_tag.finalize(b"header|")


@pytest.mark.parametrize("alg", [GCM, "cbc(aes)", "ctr(aes)"])
def test_cipher_streams_are_not_copied_and_go_on_untouched(client, aes, alg):
    """Two copies of an encryption stream would go on with the same keystream (a GCM nonce used twice): the
    daemon refuses, whatever the client asks, and the stream goes on as if nothing was asked."""
    key, serial = aes
    iv = os.urandom(12 if alg == GCM else 16)
    stream = client.stream(alg, serial, iv=iv)
    out = stream.update(bytes(32))
    with pytest.raises(E.EOPNOTSUPP, match="cannot be copied"):
        stream.copy()
    with pytest.raises(E.EOPNOTSUPP, match="same keystream"):
        client.stream_copy(stream.handle)  # the daemon's own refusal, not the client's
    out += stream.update(bytes(32))
    last, tag = stream.finalize()
    if alg == GCM:
        assert out + last + tag == AESGCM(key).encrypt(iv, bytes(64), None)
    else:
        local = Cipher(algorithms.AES(key), (modes.CBC if alg == "cbc(aes)" else modes.CTR)(iv)).encryptor()
        assert out + last == local.update(bytes(64)) + local.finalize()


def test_copies_count_against_the_streams_of_a_connection(client):
    held = [client.hash() for _ in range(63)]
    full = client.hash()  # the 64th
    full.update(b"x")
    with pytest.raises(E.EMFILE):
        full.copy()
    held.pop().abort()
    copied = full.copy()  # a slot freed is a slot a copy may take
    assert copied.finalize(b"y")[1] == hashlib.sha256(b"xy").digest()
    assert full.finalize()[1] == hashlib.sha256(b"x").digest()  # the refused copy left it as it was


@pytest.mark.parametrize("take_away", ["revoke", "unlink", "setperm"])
def test_a_copy_fails_as_update_does_once_the_key_cannot_be_used(client, take_away):
    """The key is checked again for a copy, as for every piece: the same error as update's, and the stream
    is closed with it."""
    serial = client.add("logon", f"copy:{take_away}", os.urandom(32), "@s")
    copying, updating = client.hmac(serial).stream(), client.hmac(serial).stream()
    copying.update(b"piece"), updating.update(b"piece")
    {"revoke": lambda: client.revoke(serial), "unlink": lambda: client.unlink(serial, "@s"),
     "setperm": lambda: client.setperm(serial, 0x3f000000 & ~0x08000000)}[take_away]()  # setperm: all but search
    with pytest.raises(E.KeydenError) as copy_failed:
        copying.copy()
    with pytest.raises(E.KeydenError) as update_failed:
        updating.update(b"more")
    assert type(copy_failed.value) is type(update_failed.value) is {
        "revoke": E.EKEYREVOKED, "unlink": E.ENOKEY, "setperm": E.EACCES}[take_away]
    assert copy_failed.value.message == update_failed.value.message
    with pytest.raises(E.EBADF):  # closed with it
        client.stream_update(copying.handle, b"x")


def test_a_finished_stream_is_not_copied_as_pycas_finalized_context_is_not(client):
    """Copy, as update, of a finalized or aborted stream: pyca's AlreadyFinalized, and EBADF (the daemon's word
    for a stream it no longer holds, which the raw op still says)."""
    from cryptography.exceptions import AlreadyFinalized
    finalized, aborted = client.hash(), client.hash()
    finalized.finalize(b"done")
    aborted.abort()
    for stream in (finalized, aborted):
        for late in (stream.copy, lambda: stream.update(b"late"), stream.finalize):
            with pytest.raises(AlreadyFinalized) as refused:
                late()
            assert isinstance(refused.value, E.EBADF) and "already finalized" in refused.value.message
        with pytest.raises(E.EBADF):
            client.stream_copy(stream.handle)
    with pytest.raises(E.EBADF):
        client.stream_copy(0x7fffffff)  # never made


def test_a_stream_of_a_lost_connection_is_not_copied(fresh_daemon):
    d = fresh_daemon("idle_timeout = 0.5\n")
    with d.connect() as c:
        copying, updating = c.hash(), c.hash()
        time.sleep(1.0)  # the daemon closes the silent connection, and its streams with it
        assert c.ping(b"x") == b"x" and c.generation == 1
        with pytest.raises(E.EBADF) as copy_failed:
            copying.copy()
        with pytest.raises(E.EBADF) as update_failed:
            updating.update(b"x")
        assert copy_failed.value.message == update_failed.value.message


def test_copies_dropped_unfinished_do_not_fill_the_connection(client):
    """A copy is a stream like any other: dropped unfinished (as pyca's copies are), it is closed by the
    client's next stream, so 200 dropped copies never lock the connection out of its 64."""
    mac = client.hmac(client.add("logon", "copy:dropped", os.urandom(32)))
    with client.hash() as transcript, mac.stream() as keyed:
        transcript.update(b"abc")
        for _ in range(100):
            transcript.copy().update(b"intermediate digest never asked for")
            keyed.copy()
        assert transcript.copy().finalize()[1] == hashlib.sha256(b"abc").digest()
        assert client.hash().finalize(b"abc")[1] == hashlib.sha256(b"abc").digest()


# -------------------------------------------------------------- shared memory


def test_large_aead_buffers_go_through_shared_memory(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    data, nonce = os.urandom(3 << 20), os.urandom(12)
    sealed = aead.encrypt(nonce, data, b"big")
    assert client.region_pool._free  # the bytes went through a mapped region, not the socket
    assert sealed == AESGCM(key).encrypt(nonce, data, b"big")
    assert aead.decrypt(nonce, sealed, b"big") == data
    assert aead.decrypt(nonce, memoryview(bytearray(sealed)), b"big") == data
    out = bytearray(len(data))
    assert aead.decrypt_into(nonce, sealed, b"big", out) == len(data) and out == data
    tampered = bytearray(sealed)
    tampered[len(data) // 2] ^= 1
    with pytest.raises(E.EBADMSG) as bad:
        aead.decrypt(nonce, bytes(tampered), b"big")
    assert bad.value.message == AUTH_FAILED

    # larger than a frame may be (16 MiB): only shared memory can carry it
    huge = os.urandom(17 << 20)
    blob = aead.encrypt_random(huge, b"huge")
    assert AESGCM(key).decrypt(blob[:12], blob[12:], b"huge") == huge
    assert aead.decrypt_random(blob, b"huge") == huge
    assert aead.decrypt(blob[:12], memoryview(blob)[12:], b"huge") == huge
    aead.close()
    assert client.ping(b"still connected") == b"still connected"


def test_one_aead_object_shared_by_threads_keeps_every_large_call_apart(client, aes):
    key, serial = aes
    aead, local = client.aead(serial), AESGCM(key)
    size = dataplane.BULK_THRESHOLD + 4096  # each call goes through the object's one shared region

    def work(tag: int) -> int:
        wrong = 0
        for i in range(12):
            nonce, data = os.urandom(12), bytes([tag]) * size + os.urandom(16)
            sealed = aead.encrypt(nonce, data, bytes([tag, i]))
            wrong += sealed != local.encrypt(nonce, data, bytes([tag, i]))
            wrong += aead.decrypt(nonce, sealed, bytes([tag, i])) != data
        return wrong

    with concurrent.futures.ThreadPoolExecutor(12) as pool:  # more threads than regions: they take turns
        assert list(pool.map(work, range(12))) == [0] * 12
    assert len(client.region_pool._free) <= dataplane.POOLED_REGIONS
    with client.shared_buffer(4096):  # the regions the helpers keep leave room for the caller's own
        pass


def test_large_calls_go_on_after_the_client_reconnects(fresh_daemon):
    d = fresh_daemon("idle_timeout = 0.5\n")
    with d.connect() as c:
        key = os.urandom(32)
        aead = c.aead(c.add("logon", "reconnect:aes", key, "@u"))
        nonce, data = os.urandom(12), os.urandom(1 << 20)
        aead.encrypt(nonce, data)
        time.sleep(1.0)  # the daemon closes the silent connection, and its shared region with it
        assert aead.encrypt(nonce, b"small") == AESGCM(key).encrypt(nonce, b"small", None)
        assert c.generation == 1
        assert aead.encrypt(nonce, data) == AESGCM(key).encrypt(nonce, data, None)  # a new region
        assert aead.encrypt_random(data)[12:] != data
        time.sleep(1.0)  # and a large call first: its request found the old region gone (EBADF) and
        assert aead.encrypt(nonce, data) == AESGCM(key).encrypt(nonce, data, None)  # is made again, once
        assert c.generation == 2


def test_streams_dropped_unfinished_do_not_fill_the_connection(client):
    """pyca's hash and HMAC contexts need no cleanup, so code drops them; each held one of the daemon's
    64 streams per connection until it closed, and the 65th was EMFILE for good."""
    for _ in range(100):
        stream = client.hash("sha256")
        stream.update(b"abc")
        del stream  # never finalized
    assert client.hash("sha256").finalize(b"abc")[1] == hashlib.sha256(b"abc").digest()


def test_shared_buffers_dropped_unclosed_do_not_fill_the_connection(client):
    """Dropped without close(), each held one of the connection's 8 regions (and its size in the uid's
    budget) until the connection ended: the 9th was EMFILE, and the aead helpers' large calls with it."""
    aead = client.aead(client.generate("aes:256", "dropped:regions"))
    for _ in range(20):
        shm = client.shared_buffer(4096)
        shm.view[:3] = b"abc"
        del shm
    with client.shared_buffer(4096) as shm:
        shm.view[:3] = b"abc"
    data = os.urandom(1 << 20)  # a large call: through one of the helpers' regions
    nonce = aead.encrypt_random(data)[:12]
    assert len(aead.encrypt(nonce, data)) == len(data) + 16
    buffers = [client.shared_buffer(4096) for _ in range(7)]  # with the helpers' one: all 8, none lost
    with pytest.raises(E.EMFILE):
        client.shared_buffer(4096)
    for shm in buffers:
        shm.close()


def test_a_forked_child_gets_its_own_connection(daemon, client):
    """The child inherited the parent's socket: both sent the same request ids on it and read each
    other's answers (the parent's read returned the child's secret)."""
    mine, theirs = client.add("user", "fork:parent", b"PARENT"), client.add("user", "fork:child", b"CHILD")
    client = daemon.connect(session=client.session_token, timeout=10)  # a failure must not hang the suite
    for _ in range(5):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own answers, or nothing
            try:
                os.write(w, b"".join(client.read(theirs) for _ in range(50)))
            finally:
                os._exit(0)
        os.close(w)
        got = [client.read(mine) for _ in range(50)]
        _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as child:
            assert child.read() == b"CHILD" * 50 and status == 0
        assert got == [b"PARENT"] * 50
    client.close()


def test_an_interrupted_request_never_leaves_the_connection_out_of_step(daemon, client, aes):
    """An exception raised by a signal handler while a large request was being written left half a frame
    on the wire; the daemon read the next request as the rest of it, and the client hung."""
    import signal
    import traceback

    class Interrupted(Exception):
        pass

    def interrupt(*_):
        raise Interrupted()
    _key, serial = aes
    secret = client.add("user", "interrupt:me", b"still here")
    c = daemon.connect(session=client.session_token, timeout=10)  # out of step shows as ETIMEDOUT, not a hang
    big = os.urandom(15 << 20)
    previous = signal.signal(signal.SIGALRM, interrupt)
    mid_write = 0
    try:
        for i in range(300):
            signal.setitimer(signal.ITIMER_REAL, 0.002 + (i % 80) * 0.0005)  # encoding takes the first ms
            try:
                c.cipher("gcm(aes)", serial, big, iv=os.urandom(12))
            except Interrupted as exc:
                frames = [frame.name for frame in traceback.extract_tb(exc.__traceback__)]
                mid_write += bool({"_write_first", "sendall", "_send"} & set(frames))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert c.read(secret) == b"still here"
            if mid_write >= 3:
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
        c.close()
    assert mid_write  # the case that matters happened


def test_encrypt_into_takes_large_buffers_and_refuses_small_ones_first(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    nonce, data = os.urandom(12), os.urandom(dataplane.BULK_THRESHOLD * 2)
    out = bytearray(len(data) + 16)
    assert aead.encrypt_into(nonce, data, b"ad", out) == len(out)
    assert out == AESGCM(key).encrypt(nonce, data, b"ad")
    plain = bytearray(len(data))
    assert aead.decrypt_into(nonce, out, b"ad", plain) == len(data) and plain == data
    with pytest.raises(ValueError, match="at least"):  # as pyca's: before anything is sent
        aead.encrypt_into(nonce, data, b"ad", bytearray(len(data)))
    with pytest.raises(TypeError):
        aead.encrypt_into(nonce, b"x", b"ad", bytes(64))


def test_shared_buffer_cipher_in_place_ranges(client, aes):
    key, serial = aes
    size = 1 << 20
    with client.shared_buffer(4 * size) as shm:
        data, iv = os.urandom(size), os.urandom(16)
        shm.view[:size] = data
        written, nonce = shm.cipher("ctr(aes)", serial, 0, size, size, iv=iv)
        ctr = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
        assert (written, nonce) == (size, b"") and shm.view[size:2 * size] == ctr.update(data)

        written, nonce = shm.cipher(GCM, serial, 0, size, size, aad=b"ad", random_nonce=True)
        assert written == size + 16 and len(nonce) == 12
        sealed = bytes(shm.view[size:size + written])
        assert AESGCM(key).decrypt(nonce, sealed, b"ad") == data
        assert shm.cipher(GCM, serial, size, size + 16, 3 * size, iv=nonce, aad=b"ad", decrypt=True) == (size, b"")
        assert shm.view[3 * size:] == data

        shm.view[size] ^= 1  # a failed decrypt must leave no plaintext behind
        with pytest.raises(E.EBADMSG):
            shm.cipher(GCM, serial, size, size + 16, 3 * size, iv=nonce, aad=b"ad", decrypt=True)
        assert shm.view[3 * size:] == bytes(size)

        for in_offset, length, out_offset in ((0, 100, 50), (100, 100, 50), (0, size, size - 1), (7, 9, 7)):
            with pytest.raises(E.EINVAL, match="overlap"):
                shm.cipher("ctr(aes)", serial, in_offset, length, out_offset, iv=iv)
        assert shm.cipher("ctr(aes)", serial, 100, 100, 0, iv=iv) == (100, b"")  # adjacent is fine
        assert shm.cipher("sha256", 0, 10, 0, 0) == (32, b"")  # an empty range overlaps nothing
        assert shm.view[:32] == hashlib.sha256(b"").digest()
        hmac_key = client.add("logon", "shm:hmac", os.urandom(32))
        with pytest.raises(E.EBADMSG):  # HMAC verify writes nothing: its empty output may sit anywhere
            shm.cipher("hmac(sha256)", hmac_key, 0, 100, 50, iv=bytes(32), decrypt=True)
        with pytest.raises(E.EINVAL, match="overlap"):  # the output's tag would run into the input
            shm.cipher(GCM, serial, 100, 100, 0, iv=os.urandom(12))
        for in_offset, length, out_offset in ((4 * size - 10, 20, 0), (0, 100, 4 * size - 50),
                                              (2**63, 16, 0), (0, 16, 2**64 - 8)):
            with pytest.raises(E.EINVAL, match="outside"):
                shm.cipher("ctr(aes)", serial, in_offset, length, out_offset, iv=iv)
        region = shm.region
    with pytest.raises(E.EBADF):  # detached when the buffer closed
        client._call(Op.SHM_CIPHER, region, "ctr(aes)", serial, 0, iv, b"", 0, 16, 16)


def test_shared_buffer_cipher_many_seals_and_opens_pieces_in_one_round_trip(client, aes):
    """Each piece as its own cipher() call would make it, all written at once (pieces of 128 KiB: short,
    so they stay on the daemon's loop); a bad piece costs only itself."""
    key, serial = aes
    piece, n = 128 << 10, 6
    out = n * piece
    records = [os.urandom(piece) for _ in range(n)]
    with client.shared_buffer(2 * out + n * 16) as shm:
        for i, record in enumerate(records):
            shm.view[i * piece:(i + 1) * piece] = record
        sealed_at = [out + i * (piece + 16) for i in range(n)]
        ranges = [(i * piece, piece, sealed_at[i]) for i in range(n)]
        aads = [b"record %d" % i for i in range(n)]
        writes, plain_send = [], client._send
        client._send = lambda *args, **kw: (writes.append(1), plain_send(*args, **kw))[1]
        try:
            results = shm.cipher_many(GCM, serial, ranges, aads=aads, random_nonce=True)
        finally:
            del client._send
        assert len(writes) == 1  # one round trip
        nonces = [nonce for _, nonce in results]
        assert [w for w, _ in results] == [piece + 16] * n and len(set(nonces)) == n
        for i, nonce in enumerate(nonces):
            assert AESGCM(key).decrypt(nonce, bytes(shm.view[sealed_at[i]:sealed_at[i] + piece + 16]),
                                       aads[i]) == records[i]
        shm.view[:out] = bytes(out)
        shm.view[sealed_at[2]] ^= 1  # one record tampered with
        aads[4] = b"another record's"  # one opened with the wrong associated data
        opened = shm.cipher_many(GCM, serial, [(at, piece + 16, i * piece) for i, at in enumerate(sealed_at)],
                                 ivs=nonces, aads=aads, decrypt=True)
        assert [type(r) for r in opened] == [tuple, tuple, E.EBADMSG, tuple, E.EBADMSG, tuple]
        for i in (0, 1, 3, 5):
            assert opened[i] == (piece, b"") and shm.view[i * piece:(i + 1) * piece] == records[i]
        for i in (2, 4):  # no unauthenticated plaintext left behind
            assert shm.view[i * piece:(i + 1) * piece] == bytes(piece)
        mixed = shm.cipher_many("ctr(aes)", serial, [(0, 16, 100), (0, 100, 50), (0, 16, 2**40)],
                                ivs=[bytes(16)] * 3)
        assert mixed[0] == (16, b"") and isinstance(mixed[1], E.EINVAL) and isinstance(mixed[2], E.EINVAL)
        assert "overlap" in mixed[1].message and "outside" in mixed[2].message
        endless = ((0, 16, 32) for _ in iter(int, 1))
        for bad, match in (([], "1..1024"), ([(0, 16, 32)] * 1025, "1..1024"), (endless, "1..1024"),
                           (b"\x00" * 3, "sequence"), (5, "sequence"), ([(0, 16)], "in_offset, length, out_offset"),
                           ([(0, 16, -1)], "none negative"), ([(0, "16", 32)], "three integers"),
                           ([(True, 16, 32)], "three integers")):
            with pytest.raises(E.EINVAL, match=match):
                shm.cipher_many(GCM, serial, bad, random_nonce=True)
        with pytest.raises(E.EINVAL, match="one entry per range"):
            shm.cipher_many(GCM, serial, ranges, ivs=nonces[:2])
        with pytest.raises(E.EINVAL, match="nonce"):
            shm.cipher_many(GCM, serial, ranges[:1], ivs=["text"])
    assert client.ping(b"still in step") == b"still in step"


def test_only_sealed_memfds_are_attached(client):
    def memfd(seals: int) -> int:
        fd = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 4096)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd

    unsealed = memfd(0)
    grow_only = memfd(fcntl.F_SEAL_GROW)
    shrink_only = memfd(fcntl.F_SEAL_SHRINK)  # could grow under the mapping, past what is charged
    sealed = memfd(fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    read_end, write_end = os.pipe()
    try:
        for refused in (unsealed, grow_only, shrink_only):
            with pytest.raises(E.EPERM, match="F_SEAL_SHRINK and F_SEAL_GROW"):
                client._call_with_fds(Op.SHM_ATTACH, (4096,), [refused])
        with pytest.raises(E.EBADF):
            client._call_with_fds(Op.SHM_ATTACH, (4096,), [read_end])
        with pytest.raises(E.EBADF):
            client._call(Op.SHM_ATTACH, 4096)  # no descriptor sent
        with pytest.raises(E.EINVAL):
            client._call_with_fds(Op.SHM_ATTACH, (8192,), [sealed])  # larger than the memfd
        (region,) = client._call_with_fds(Op.SHM_ATTACH, (4096,), [sealed])
        client._call(Op.SHM_DETACH, region)
        with pytest.raises(E.EBADF):
            client._call(Op.SHM_DETACH, region)
    finally:
        for fd in (unsealed, grow_only, shrink_only, sealed, read_end, write_end):
            os.close(fd)


def test_a_hugetlb_memfd_is_not_attached(client):
    """A hugetlb memfd takes the seals, but a hole punched in it, with the huge-page pool used up
    elsewhere, made the daemon's next touch of the region a SIGBUS: any uid could kill the daemon on a
    host with huge pages (found by a local-attacker hunt).  Only memfds on the kernel's tmpfs are taken."""
    huge = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    try:
        os.ftruncate(huge, 2 << 20)
        fcntl.fcntl(huge, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(E.EBADF, match="hugetlb"):
            client._call_with_fds(Op.SHM_ATTACH, (2 << 20,), [huge])
    finally:
        os.close(huge)
    assert client.ping(b"still connected") == b"still connected"


def test_shared_regions_are_limited_per_connection(client):
    buffers = [client.shared_buffer(4096) for _ in range(8)]
    with pytest.raises(E.EMFILE):
        client.shared_buffer(4096)
    buffers.pop().close()
    buffers.append(client.shared_buffer(4096))
    for b in buffers:
        b.close()


def test_a_shared_buffer_of_a_size_no_region_can_have_is_einval_before_any_memory_is_made(client):
    """0, negative, too large or not a whole number: EINVAL from the client (it was ValueError, OSError or
    TypeError from mmap and ftruncate, and a 2 GiB memfd made and mapped before the daemon refused it)."""
    for size in (0, -1, MAX_SHARED_REGION + 1, 2 ** 64, 4096.0, "4096", True, None):
        with pytest.raises(E.EINVAL, match="shared buffer"):
            client.shared_buffer(size)
    with client.shared_buffer(1) as shm:  # the smallest, on the same connection
        assert len(shm.view) == 1

    class IndexLike:  # numpy's integers: mmap took them, so must this
        def __index__(self):
            return 4096
    with client.shared_buffer(IndexLike()) as shm:
        assert len(shm.view) == 4096


def test_shared_memory_ranges_are_checked_before_any_work(fresh_daemon):
    """An output range outside the region is refused before the input is read or any output is made,
    for every algorithm: the daemon's memory does not grow by the input or output size."""
    d = fresh_daemon()
    size = 64 << 20
    with d.connect() as c:
        aes_key, mac_key = c.add("logon", "test:aes", os.urandom(32)), c.add("logon", "test:mac", os.urandom(32))
        with c.shared_buffer(size) as shm:
            shm.view[:] = os.urandom(size)  # real pages, which the daemon would map in by reading them
            peak_before = d.memory_kib("VmHWM")
            for alg, key, iv in (("ctr(aes)", aes_key, os.urandom(16)), ("cbc(aes)", aes_key, os.urandom(16)),
                                 ("sha256", 0, b""), ("hmac(sha256)", mac_key, b""), (GCM, aes_key, os.urandom(12))):
                with pytest.raises(E.EINVAL, match="outside"):
                    shm.cipher(alg, key, 0, size - 16, size - 8, iv=iv)
            grown_mib = (d.memory_kib("VmHWM") - peak_before) / 1024
            assert grown_mib < 16, f"the daemon grew by {grown_mib:.0f} MiB for refused requests"
            with pytest.raises(E.EINVAL, match="outside"):  # the range, before the block-size check
                shm.cipher("cbc(aes)", aes_key, 0, 100, size - 50, iv=os.urandom(16))
            assert shm.cipher("sha256", 0, 0, 100, size - 32) == (32, b"")  # exactly up to the end fits
            assert shm.view[size - 32:] == hashlib.sha256(shm.view[:100]).digest()


def test_block_ciphers_in_shared_memory_work_in_place(fresh_daemon):
    """ctr(aes)/cbc(aes) in a region wrote the whole output to a bytes object first, then copied it:
    the daemon's locked memory grew by the data's size, outside the shared-memory budget."""
    d = fresh_daemon()
    half = 48 << 20
    with d.connect() as c:
        key = os.urandom(32)
        serial = c.add("logon", "test:aes", key)
        with c.shared_buffer(2 * half) as shm:
            data, iv = os.urandom(half), os.urandom(16)
            shm.view[:half] = data
            shm.cipher(GCM, serial, 0, half - 16, half, iv=os.urandom(12))  # the daemon has touched every page
            peak_before = d.memory_kib("VmHWM")
            for alg, mode in (("ctr(aes)", modes.CTR), ("cbc(aes)", modes.CBC)):
                assert shm.cipher(alg, serial, 0, half, half, iv=iv) == (half, b"")
                local = Cipher(algorithms.AES(key), mode(iv)).encryptor()
                assert shm.view[half:] == local.update(data) + local.finalize()
                assert shm.cipher(alg, serial, half, half, 0, iv=iv, decrypt=True) == (half, b"")
                assert shm.view[:half] == data
            grown_mib = (d.memory_kib("VmHWM") - peak_before) / 1024
            assert grown_mib < 16, f"the daemon grew by {grown_mib:.0f} MiB for {half >> 20} MiB in place"


def test_shared_memory_is_budgeted_per_uid_and_given_back(fresh_daemon):
    d = fresh_daemon("[quota]\nshm_maxbytes = 1048576\nshm_total_maxbytes = 4194304\n")
    half = 512 * 1024
    with d.connect() as c, d.connect() as other:
        first, second = c.shared_buffer(half), c.shared_buffer(half)
        with pytest.raises(E.ENOMEM, match="per uid"):
            c.shared_buffer(4096)
        with pytest.raises(E.ENOMEM, match="per uid"):  # the budget is the uid's, not the connection's
            other.shared_buffer(4096)
        first.close()  # SHM_DETACH gives its bytes back
        kept = other.shared_buffer(half)
        with pytest.raises(E.ENOMEM):
            c.shared_buffer(4096)
        second.close()
        kept.close()
        c.shared_buffer(half)  # left attached: the connection's end gives it back
        other.shared_buffer(half)
        with d.connect() as third, pytest.raises(E.ENOMEM):  # one region over the whole budget
            third.shared_buffer(2 * half + 4096)
    deadline = time.monotonic() + 10
    while True:  # the daemon unmaps a closed connection's regions when it notices the close
        with d.connect() as c:
            try:
                c.shared_buffer(2 * half).close()
                break
            except E.ENOMEM:
                assert time.monotonic() < deadline, "closed connections never gave their regions back"
        time.sleep(0.05)


def test_a_memfd_is_charged_whole_whatever_size_is_attached(fresh_daemon):
    """The mapping keeps the whole memfd alive (mmap holds a descriptor of it): a 2 MiB memfd attached as
    4 KiB was charged 4 KiB.  Past the largest region, it is refused outright."""
    d = fresh_daemon("[quota]\nshm_maxbytes = 1048576\n")

    def memfd(size: int) -> int:
        fd = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    big, fits, huge = memfd(2 << 20), memfd(1 << 20), memfd((1 << 30) + 4096)
    try:
        with d.connect() as c:
            with pytest.raises(E.ENOMEM, match="per uid"):
                c._call_with_fds(Op.SHM_ATTACH, (4096,), [big])
            with pytest.raises(E.EINVAL, match="larger than a shared region may be"):
                c._call_with_fds(Op.SHM_ATTACH, (4096,), [huge])
            (region,) = c._call_with_fds(Op.SHM_ATTACH, (4096,), [fits])
            with pytest.raises(E.ENOMEM, match="per uid"):
                c.shared_buffer(4096)  # the whole MiB is held
            c._call(Op.SHM_DETACH, region)
            c.shared_buffer(4096).close()  # given back when the detach is answered
    finally:
        for fd in (big, fits, huge):
            os.close(fd)


def test_concurrent_attaches_never_overdraw_the_budget(fresh_daemon):
    """Connections run on their own threads: 16 racing for room for 4 regions get exactly 4."""
    d = fresh_daemon("[quota]\nshm_maxbytes = 1048576\n")
    clients = [d.connect() for _ in range(16)]
    start = threading.Barrier(len(clients))

    def attach(c):
        start.wait()
        try:
            return c.shared_buffer(256 * 1024)
        except E.ENOMEM:
            return None

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        got = list(pool.map(attach, clients))
    assert sum(b is not None for b in got) == 4
    for b in got:
        if b is not None:
            b.close()
    assert [c.shared_buffer(256 * 1024) is not None for c in clients[:4]] == [True] * 4  # all given back
    for c in clients:
        c.close()


def test_an_aead_handle_survives_a_refused_shared_region(fresh_daemon):
    d = fresh_daemon("[quota]\nshm_maxbytes = 1572864\n")  # 1.5 MiB: the 1 MiB default region fits
    with d.connect() as c:
        key = os.urandom(32)
        aead = c.aead(c.add("logon", "test:aes", key))
        data, nonce = os.urandom(dataplane.BULK_THRESHOLD + 1), os.urandom(12)
        assert aead.encrypt(nonce, data, None) == AESGCM(key).encrypt(nonce, data, None)
        with pytest.raises(E.ENOMEM):  # needs a region of twice its size: over the budget
            aead.encrypt(nonce, bytes(1 << 20), None)
        assert aead.decrypt(nonce, aead.encrypt(nonce, data, None), None) == data  # a new region, not the old
        aead.close()


# ---------------------------------------------------------------- refusals


def test_authentication_failures_say_nothing_more(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    nonce = os.urandom(12)
    secret_data = b"TOP-SECRET-PLAINTEXT" * 3
    sealed = AESGCM(key).encrypt(nonce, secret_data, b"ad")
    failures = []
    for attempt in (lambda: aead.decrypt(nonce, sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ad"),
                    lambda: aead.decrypt(nonce, sealed, b"other"),
                    lambda: aead.decrypt(os.urandom(12), sealed, b"ad"),
                    lambda: aead.decrypt(nonce, b"", b"ad"),
                    lambda: aead.decrypt_random(b"\0" * 40)):
        with pytest.raises(E.EBADMSG) as bad:
            attempt()
        failures.append(bad.value)
    for failure in failures:
        assert failure.message == AUTH_FAILED
        text = str(failure) + repr(failure)
        assert secret_data[:8] not in text.encode() and key.hex() not in text and sealed.hex()[:16] not in text


def test_wrong_keys_and_algorithms(client, aes):
    _key, serial = aes
    nonce = os.urandom(12)
    asymmetric = client.generate("ec:p256", "", "@s")
    ring = client.newring("ring")
    for wrong in (asymmetric, ring):
        with pytest.raises(E.ENOPROTOOPT):
            client.aead(wrong).encrypt(nonce, b"x")
        with pytest.raises(E.ENOPROTOOPT):
            client.mac("hmac(sha256)", wrong, b"x")
        with pytest.raises(E.ENOPROTOOPT):
            client.stream("ctr(aes)", wrong, iv=bytes(16))
    for unknown in (lambda: client.cipher("xts(aes)", serial, b"x" * 32, iv=bytes(16)),
                    lambda: client.digest("md5", b"x"),
                    lambda: client.stream("cbc(des)", serial, iv=bytes(8)),
                    lambda: client.aead(serial, "ccm(aes)"),
                    lambda: client.hmac(serial, "hmac(md5)")):
        with pytest.raises(E.ENOENT):
            unknown()
    with pytest.raises(E.EINVAL):
        client.aead(serial).encrypt(nonce[:8], b"x")
    with pytest.raises(E.EINVAL):
        client.aead(client.add("user", "short", os.urandom(16)), CHACHA).encrypt(nonce, b"x")
    with pytest.raises(E.ENOKEY):
        client.aead(0x7ffffff0).encrypt(nonce, b"x")

    aead = client.aead(serial)
    aead.encrypt(nonce, b"works")
    client.revoke(serial)
    for op in (lambda: aead.encrypt(nonce, b"x"), lambda: aead.encrypt_random(b"x"),
               lambda: aead.encrypt_batch([nonce], [b"x"]), lambda: client.stream(GCM, serial, iv=nonce)):
        with pytest.raises(E.EKEYREVOKED):
            op()


def test_aead_helpers_share_the_clients_regions_and_keep_no_huge_one(client, daemon):
    """An Aead per key, used for large data and dropped (as pyca's AESGCM is used) made a region each and
    never gave it back: the 9th failed with EMFILE (8 regions per connection), and each kept the size of
    its largest call mapped and charged to the uid until close()."""
    keys = [os.urandom(32) for _ in range(10)]
    data, nonce = os.urandom(300 << 10), os.urandom(12)
    for key in keys:
        aead = client.aead(client.add("logon", "test:pool", key))
        assert aead.encrypt(nonce, data, None) == AESGCM(key).encrypt(nonce, data, None)
        del aead
    assert len(client.region_pool._free) == 1
    huge = os.urandom(dataplane.POOLED_REGION_MAX // 2 + 1)
    assert client.aead(client.add("logon", "test:pool", keys[0])).encrypt(nonce, huge, None)[:-16] == \
        AESGCM(keys[0]).encrypt(nonce, huge, None)[:-16]
    assert all(shm.size <= dataplane.POOLED_REGION_MAX for shm in client.region_pool._free)
    pid = daemon.proc.pid
    assert not [line for line in open(f"/proc/{pid}/maps") if "keyden-shm" in line and
                int(line.split()[0].split("-")[1], 16) - int(line.split()[0].split("-")[0], 16) >
                dataplane.POOLED_REGION_MAX]  # the daemon unmapped it too


def test_handles_do_not_pickle_or_show_keys(client, aes):
    import pickle

    _key, serial = aes
    for handle in (client.aead(serial), client.hmac(serial)):
        with pytest.raises(TypeError):
            pickle.dumps(handle)
    assert dataplane.BULK_THRESHOLD <= 1 << 20  # the >= 1 MiB tests above do cross it


# ----------------------------------------------------- helpers as pyca users expect


def test_a_stream_whose_finish_never_went_out_can_still_be_closed(client):
    """finalize() refused before sending (bad arguments, over the frame cap) leaves the stream open in
    keyden: the with-block must still close it, or 64 such blocks lock the connection out of streams."""
    key = os.urandom(32)
    mac = client.hmac(client.add("logon", "stream:leak", key))
    for _ in range(70):
        with mac.stream(verify=True) as stream:
            stream.update(b"data")
            with pytest.raises(E.EINVAL):
                stream.finalize(tag=None)
    for _ in range(70):
        with mac.stream(verify=True) as stream:
            with pytest.raises(E.EMSGSIZE):
                stream.finalize(tag=b"x" * (client.max_frame + 1))
    big = b"x" * (client.max_frame + 1)
    with mac.stream() as stream:  # data over the cap is no mistake: it goes through update, in pieces
        assert stream.finalize(big)[1] == pyca_hmac_of(key, big)
    with client.hash() as stream:  # streams still open: none leaked
        assert stream.finalize(b"abc")[1] == hashlib.sha256(b"abc").digest()


def pyca_hmac_of(key: bytes, data: bytes) -> bytes:
    h = pyca_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def test_hmac_of_data_larger_than_a_frame_streams(client):
    key = os.urandom(32)
    mac = client.hmac(client.add("logon", "hmac:large", key))
    data = os.urandom(client.max_frame + (3 << 20))
    h = pyca_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    tag = h.finalize()
    assert mac.mac(data) == tag
    mac.verify(data, tag)
    with pytest.raises(E.EBADMSG):
        mac.verify(data, bytes(32))


def test_helpers_take_bytes_like_data_only_and_copy_as_handles(client, aes):
    """As pyca: text or numbers where bytes belong are refused (an int would be zero bytes); a helper
    is a handle, copied as itself and closed by a with-block."""
    key, serial = aes
    aead = client.aead(serial)
    for call in (lambda: aead.encrypt("twelve bytes", b"x", None), lambda: aead.encrypt(os.urandom(12), 4, None),
                 lambda: aead.encrypt(os.urandom(12), "text", None),
                 lambda: aead.encrypt(os.urandom(12), b"x", "aad as text"),
                 lambda: aead.encrypt(os.urandom(12), b"x" * dataplane.BULK_THRESHOLD, 7),
                 lambda: client.hmac(serial).mac(5), lambda: client.hash().update(3),
                 # batches and the one-request operations too: text's encoding would be a guess
                 lambda: aead.encrypt_batch([os.urandom(12)], ["hello"]),
                 lambda: aead.encrypt_batch(["n" * 12], [b"hello"]),
                 lambda: aead.decrypt_batch([os.urandom(12)], [b"x" * 20], ["aad"]),
                 lambda: client.hmac(serial).mac_batch(["hello"]), lambda: client.hmac(serial).mac_batch(None),
                 lambda: client.digest("sha256", "text"), lambda: client.mac("hmac(sha256)", serial, "text"),
                 lambda: client.cipher("gcm(aes)", serial, "text", iv=os.urandom(12)),
                 lambda: client.cipher("gcm(aes)", serial, b"x", iv="twelve bytes")):
        with pytest.raises(TypeError, match="bytes-like") as refused:  # as pyca: TypeError (and EINVAL)
            call()
        assert isinstance(refused.value, E.EINVAL)
    for nonce in (os.urandom(8), b""):  # a nonce of the wrong size: pyca's ValueError (and EINVAL)
        for call in (lambda: aead.encrypt(nonce, b"x", None), lambda: aead.decrypt(nonce, bytes(32), None),
                     lambda: aead.encrypt(nonce, bytes(dataplane.BULK_THRESHOLD), None)):
            with pytest.raises(ValueError) as refused:
                call()
            assert isinstance(refused.value, E.EINVAL)
        with pytest.raises(ValueError):
            ChaCha20Poly1305(key).encrypt(nonce, b"x", None)
    with pytest.raises(E.EINVAL, match="must be a str, not NoneType"):  # (it was ENOENT: unknown algorithm)
        client.hash(None)
    nonce = os.urandom(12)
    assert aead.encrypt(nonce, bytearray(b"ok"), memoryview(b"h")) == AESGCM(key).encrypt(nonce, b"ok", b"h")
    import copy
    import pickle
    assert copy.copy(aead) is aead and copy.deepcopy(aead) is aead
    with client.hash() as stream:  # a copy would share keyden's stream: pyca refuses to copy a context too
        for refuse in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match=r"state lives in keyden; use its copy\(\) method"):
                refuse(stream)
        stream.update(b"a")
        assert stream.finalize()[1] == hashlib.sha256(b"a").digest()
    with client.hmac(serial) as mac:
        assert len(mac.mac(b"x")) == 32


def test_batches_take_none_for_associated_data_and_hash_takes_only_hashes(client, aes):
    key, serial = aes
    aead = client.aead(serial)
    nonces = [os.urandom(12) for _ in range(3)]
    items = [b"a", b"bb", b""]
    sealed = aead.encrypt_batch(nonces, items, None)  # as pyca's encrypt(nonce, data, None)
    assert sealed == [AESGCM(key).encrypt(n, m, None) for n, m in zip(nonces, items)]
    assert aead.decrypt_batch(nonces, sealed, None) == items
    aads = [b"", b"x", None]  # and per item
    sealed = aead.encrypt_batch(nonces, items, aads)
    assert sealed == [AESGCM(key).encrypt(n, m, a) for n, m, a in zip(nonces, items, aads)]
    assert aead.decrypt_batch(nonces, sealed, aads) == items
    statuses, outputs = client.batch("gcm(aes)", serial, items, ivs=nonces, aads=None)
    assert statuses == [0, 0, 0] and outputs == [AESGCM(key).encrypt(n, m, None) for n, m in zip(nonces, items)]
    for name in ("gcm(aes)", "hmac(sha256)", "no-such"):
        with pytest.raises(E.ENOENT):
            client.hash(name)


def test_any_buffer_shape_is_its_bytes_and_a_finished_stream_is_done_whatever_the_answer(client, aes):
    """Typed, strided and generated inputs are taken as the bytes they hold (a memoryview of uint16 items is
    twice as many bytes as items); a shared-memory nonce is bytes too; a stream the daemon answered is over."""
    from array import array
    key, serial = aes
    aead, local = client.aead(serial), AESGCM(key)
    nonce = os.urandom(12)
    typed = array("H", [1, 2, 3])
    assert aead.encrypt_batch([nonce], [memoryview(typed)]) == [local.encrypt(nonce, typed.tobytes(), None)]
    assert aead.encrypt_batch([nonce], (m for m in [b"gen"])) == [local.encrypt(nonce, b"gen", None)]
    strided = memoryview(bytearray(range(200)))[::2]
    assert aead.encrypt(nonce, strided, None) == local.encrypt(nonce, strided.tobytes(), None)
    big = memoryview(bytearray(os.urandom(2 * dataplane.BULK_THRESHOLD)))[::2]
    assert aead.encrypt(nonce, big, None) == local.encrypt(nonce, big.tobytes(), None)
    with client.shared_buffer(4096) as shm:
        with pytest.raises(E.EINVAL, match="nonce must be bytes-like"):
            shm.cipher(GCM, serial, 0, 16, 100, iv=12)
    mac = client.hmac(client.add("logon", "done:mac", os.urandom(32)))
    with mac.stream(verify=True) as stream:
        stream.update(b"data")
        with pytest.raises(E.EBADMSG):
            stream.finalize(tag=bytes(32))
        assert stream.done  # the daemon ended it: nothing left to abort


def test_failed_authentication_is_catchable_as_pyca_code_expects(client, aes):
    """Code written for AESGCM catches InvalidTag, for HMAC.verify InvalidSignature: keyden's helpers raise
    errors that are both those and EBADMSG, small or large data, one-shot or batch."""
    from cryptography.exceptions import InvalidSignature, InvalidTag
    _key, serial = aes
    aead = client.aead(serial)
    nonce = os.urandom(12)
    for size in (10, 2 * dataplane.BULK_THRESHOLD):
        sealed = bytearray(aead.encrypt(nonce, bytes(size), b"h"))
        sealed[0] ^= 1
        for attempt in (lambda: aead.decrypt(nonce, bytes(sealed), b"h"),
                        lambda: aead.decrypt_into(nonce, bytes(sealed), b"h", bytearray(size))):
            with pytest.raises(InvalidTag) as info:
                attempt()
            assert isinstance(info.value, E.EBADMSG) and str(info.value) == "EBADMSG: authentication failed"
    (bad,) = aead.decrypt_batch([nonce], [bytes(20)])
    assert isinstance(bad, InvalidTag) and isinstance(bad, E.EBADMSG)
    mac = client.hmac(serial)
    with pytest.raises(InvalidSignature) as info:
        mac.verify(b"data", bytes(32))
    assert isinstance(info.value, E.EBADMSG)
    with pytest.raises(E.EBADMSG):  # decrypting something that is not AEAD output stays a plain EBADMSG check
        aead.decrypt(nonce, bytes(4), None)


def test_updates_in_pieces_from_two_threads_or_tasks_are_not_interleaved(fresh_daemon):
    """An update over the frame cap goes in pieces; another thread's (or task's) update or finalize of
    the same stream waits for the last of them, so each call's output is a whole part of the stream (and
    a hash of it, the hash of the two inputs one after the other)."""
    d = fresh_daemon("max_frame = 8192\n")
    with d.connect() as c:
        key = os.urandom(32)
        serial = c.add("logon", "test:aes", key)
        parts = {name: name.encode() * (5 * c.max_frame) for name in "AB"}  # 6 pieces each

        def whole_parts(outputs: dict, last: bytes, tag: bytes, nonce: bytes) -> bool:
            """One output then the other (either may have gone first) is the sealing of one input then the other."""
            for x, y in ("AB", "BA"):
                try:
                    if AESGCM(key).decrypt(nonce, outputs[x] + outputs[y] + last + tag, None) == parts[x] + parts[y]:
                        return True
                except InvalidTag:
                    pass
            return False

        def in_threads(*calls) -> list:
            """Each call in a thread of its own, 20 ms apart (a piece takes 10 ms: they overlap); the results."""
            results: list = [None] * len(calls)

            def run(i):
                try:
                    results[i] = calls[i]()
                except Exception as exc:
                    results[i] = exc
            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
            for t in threads:
                t.start()
                time.sleep(0.02)
            for t in threads:
                t.join()
            return results

        update = c.stream_update
        c.stream_update = lambda *args: (time.sleep(0.01), update(*args))[1]  # each piece's request, slowly
        stream = c.stream(GCM, serial, random_nonce=True)
        a, b = in_threads(lambda: stream.update(parts["A"]), lambda: stream.update(parts["B"]))
        assert whole_parts({"A": a, "B": b}, *stream.finalize(), stream.nonce)
        digest = c.stream("sha256")
        (_, last), late = in_threads(lambda: digest.finalize(parts["A"]), lambda: digest.update(b"late"))
        assert last == hashlib.sha256(parts["A"]).digest() and isinstance(late, dataplane.StreamFinished)
        del c.stream_update

        async def tasks() -> list:
            async with await aio.connect(d.socket) as ac:
                runs = []
                for _ in range(3):
                    stream = await ac.stream(GCM, serial, random_nonce=True)
                    a, b = await asyncio.gather(stream.update(parts["A"]), stream.update(parts["B"]))
                    runs.append(({"A": a, "B": b}, *(await stream.finalize()), stream.nonce))
                digest = await ac.stream("sha256")  # a finalize in pieces: the update behind it comes too late
                _, (_, last), late = await asyncio.gather(digest.update(parts["A"]), digest.finalize(parts["B"]),
                                                          digest.update(b"late"), return_exceptions=True)
                return runs, last, late

        runs, digest, late = asyncio.run(tasks())
        for run in runs:
            assert whole_parts(*run)
        assert digest == hashlib.sha256(parts["A"] + parts["B"]).digest()
        assert isinstance(late, dataplane.StreamFinished)

