"""Data shoveling by key serial: AF_ALG's operations with the key held here.

Keys are user or logon keys (and keys derived or generated inside keyden);
other types get ENOPROTOOPT, as ALG_SET_KEY_BY_KEY_SERIAL does.  Search
permission suffices.  Three shapes: one-shot (CIPHER, DIGEST, MAC), many
small items in one frame (BATCH), data of any size in pieces (STREAM_*),
and buffers processed in shared memory that never crosses the socket (SHM_*).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import weakref
from typing import Callable, NamedTuple

from keyden import descriptors
from keyden import errors as E
from keyden.crypto import symmetric
from keyden.protocol import DECRYPT, MAX_SHARED_REGION, RANDOM_NONCE, Op
from keyden.server.handlers.base import handles

MAX_STREAMS = 64
MAX_REGIONS = 8
_KNOWN_FLAGS = DECRYPT | RANDOM_NONCE


# ---------------------------------------------------------------- key access

def material(ctx, serial: int, alg: str) -> bytes:
    """The key's bytes for ``alg``, copied under the store's lock (a concurrent revoke wipes the original);
    ENOPROTOOPT for a key genkey made for another use."""
    return ctx.store.material(ctx.caller, serial, symmetric.spec(alg).key_use)


def aead_engine(ctx, alg: str, serial: int) -> symmetric.AeadEngine:
    """The AEAD engine for (key, alg): kept with the key's payload, for every connection, and dropped
    with it (permission, state and the key's use are checked every call)."""
    use = symmetric.spec(alg, "aead").key_use  # an unknown name must not become a cache entry
    return ctx.store.engine(ctx.caller, serial, use, alg, lambda material: symmetric.aead(alg, material))


def _check_flags(flags: int) -> tuple[bool, bool]:
    if flags & ~_KNOWN_FLAGS:
        raise E.EINVAL("unknown flags")
    return bool(flags & DECRYPT), bool(flags & RANDOM_NONCE)


def one_shot(ctx, alg: str, serial: int, flags: int) -> Callable[[bytes, bytes, bytes], bytes]:
    """A function (iv, aad, data) -> output for this algorithm, key and direction."""
    decrypt, random_nonce = _check_flags(flags)
    kind = symmetric.kind(alg)
    if random_nonce and kind != "aead":
        raise E.EINVAL("keyden-chosen nonces are for AEAD algorithms")

    def no_aad(aad):
        if aad:
            raise E.EINVAL(f"{alg} takes no associated data")

    if kind == "aead":
        eng = aead_engine(ctx, alg, serial)
        if random_nonce:
            def run(iv, aad, data):
                if iv:
                    raise E.EINVAL("with a keyden-chosen nonce, send no IV")
                return eng.decrypt_random_nonce(data, aad) if decrypt else eng.encrypt_random_nonce(data, aad)
            return run
        return (lambda iv, aad, data: eng.decrypt(iv, data, aad)) if decrypt else \
               (lambda iv, aad, data: eng.encrypt(iv, data, aad))
    if kind == "skcipher":
        key = material(ctx, serial, alg)

        def run(iv, aad, data):
            no_aad(aad)
            return symmetric.skcipher_crypt(alg, key, iv, data, decrypt)
        return run
    if kind == "hash":
        if serial or decrypt:
            raise E.EINVAL(f"{alg} is a hash: no key, no direction")

        def run(iv, aad, data):
            no_aad(aad)
            if iv:
                raise E.EINVAL(f"{alg} is a hash: no IV")
            return symmetric.digest(alg, data)
        return run
    key = material(ctx, serial, alg)  # hmac

    def run(iv, aad, data):
        no_aad(aad)
        if decrypt:  # verify: the expected MAC travels in the IV field
            symmetric.hmac_verify(alg, key, data, iv)
            return b""
        if iv:  # a tag sent without DECRYPT would be ignored, and the MAC read as its verdict (a fuzzing hunt)
            raise E.EINVAL(f"{alg} takes no IV: a MAC to verify goes there with DECRYPT")
        return symmetric.hmac(alg, key, data)
    return run


# ------------------------------------------------------------------ one-shot

@handles(Op.CIPHER)
def _cipher(ctx, alg, key, flags, iv, aad, data):
    return (one_shot(ctx, alg, key, flags)(iv, aad, data),)


@handles(Op.DIGEST)
def _digest(ctx, alg, data):
    symmetric.spec(alg, "hash")  # ENOENT for another kind, as crypto_alloc_shash would say
    return (symmetric.digest(alg, data),)


@handles(Op.MAC)
def _mac(ctx, alg, key, data):
    symmetric.spec(alg, "hmac")
    return (symmetric.hmac(alg, material(ctx, key, alg), data),)


@handles(Op.MAC_VERIFY)
def _mac_verify(ctx, alg, key, data, mac):
    symmetric.spec(alg, "hmac")
    symmetric.hmac_verify(alg, material(ctx, key, alg), data, mac)
    return ()


@handles(Op.BATCH)
def _batch(ctx, alg, key, flags, ivs, aads, items):
    """Many small items, one frame: per-item status (0 or errno) and output."""
    n = len(items)  # at most protocol.MAX_BATCH: the request's decoder refused more (E2BIG)
    if ivs and len(ivs) != n or aads and len(aads) != n:
        raise E.EINVAL("ivs and aads must be empty or have one entry per item")
    decrypt, random_nonce = _check_flags(flags)
    kind = symmetric.kind(alg)
    reply = _batch_reply_bound(alg, kind, decrypt, random_nonce, items)
    if reply > ctx.max_frame:
        raise E.EMSGSIZE(f"the batch's reply could take {reply} bytes, over the {ctx.max_frame}-byte frame cap; "
                         "send fewer or smaller items")
    if kind == "aead" and not random_nonce:  # the common case, without a call per item through one_shot
        return aead_engine(ctx, alg, key).crypt_many(ivs or [b""] * n, items, aads, decrypt)
    if kind == "hmac" and not decrypt and not ivs and not aads:
        return [0] * n, symmetric.hmac_many(alg, material(ctx, key, alg), items)
    run = one_shot(ctx, alg, key, flags)
    status, results = [], []
    for i, item in enumerate(items):
        try:
            results.append(run(ivs[i] if ivs else b"", aads[i] if aads else b"", item))
            status.append(0)
        except E.KeydenError as exc:
            results.append(b"")
            status.append(exc.code)
    return (status, results)


def _batch_reply_bound(alg: str, kind: str, decrypt: bool, random_nonce: bool, items) -> int:
    """The most bytes a BATCH reply body can take, known before any item is processed.

    Status words and lengths take 8 + 8n; then each item's output: AEAD
    encryption adds a tag (and the nonce keyden chose), decryption takes them
    off, block ciphers keep the length, hashes and MACs give a digest each.
    """
    n = len(items)
    fixed = 8 + 8 * n  # I32S status (count, n words) and BYTESLIST (count, n lengths)
    if kind in ("hash", "hmac"):
        return fixed if kind == "hmac" and decrypt else fixed + n * symmetric.spec(alg).digest_size
    data = sum(map(len, items))
    if kind == "skcipher":
        return fixed + data
    s = symmetric.spec(alg)
    grow = s.tag_size + (s.nonce_size if random_nonce else 0)
    if not decrypt:
        return fixed + data + n * grow
    if n and min(map(len, items)) >= grow:  # every item loses its tag (and nonce); else: at most its input
        data -= n * grow
    return fixed + data


@handles(Op.KEY_ALGORITHM)
def _key_algorithm(ctx, key):
    return (ctx.store.symmetric_use(ctx.caller, key),)


# ----------------------------------------------------------------- streaming

class OpenStream(NamedTuple):
    """What a connection holds for one stream handle."""

    kind: str
    decrypt: bool  # AEAD/skcipher: decrypting; HMAC: verifying the tag STREAM_FINAL brings
    stream: symmetric.AeadStream | symmetric.SkcipherStream | symmetric.DigestContext
    key: int  # the key's serial, checked on every use; 0 for a hash


def _room_for_a_stream(ctx) -> None:
    """EMFILE once the connection holds MAX_STREAMS, checked before any work; copies count as any stream."""
    if len(ctx.streams) >= MAX_STREAMS:
        raise E.EMFILE(f"at most {MAX_STREAMS} open streams per connection")


def _add_stream(ctx, opened: OpenStream) -> int:
    handle = ctx.new_handle()
    ctx.streams[handle] = opened
    return handle


@handles(Op.STREAM_INIT)
def _stream_init(ctx, alg, key, flags, iv, aad):
    """Open a stream (MSG_MORE-style): gcm(aes), cbc/ctr(aes), hashes, HMACs."""
    decrypt, random_nonce = _check_flags(flags)
    _room_for_a_stream(ctx)
    kind = symmetric.kind(alg)
    if kind != "aead" and aad:
        raise E.EINVAL(f"{alg} takes no associated data")
    if random_nonce:
        if kind != "aead" or decrypt or iv:
            raise E.EINVAL("a keyden-chosen nonce is for AEAD encryption, with no IV sent")
        iv = os.urandom(symmetric.spec(alg).nonce_size)
    if kind == "aead":
        stream = symmetric.aead_stream(alg, material(ctx, key, alg), iv, aad, decrypt=decrypt)
    elif kind == "skcipher":
        stream = symmetric.skcipher(alg, material(ctx, key, alg), iv, decrypt)
    elif kind == "hash":
        if key or iv or decrypt:
            raise E.EINVAL(f"{alg} is a hash: no key, no IV, no direction")
        stream = symmetric.hash_ctx(alg)
    else:  # hmac; with DECRYPT it verifies the tag given to STREAM_FINAL
        if iv:
            raise E.EINVAL(f"{alg} takes no IV")
        stream = symmetric.hmac_ctx(alg, material(ctx, key, alg))
    return (_add_stream(ctx, OpenStream(kind, decrypt, stream, key if kind != "hash" else 0)),
            iv if random_nonce else b"")


def _stream(ctx, handle) -> OpenStream:
    """An open stream, once its key is still usable by the caller.

    The key is checked again on every call, as one-shot calls check it: a
    stream opened before its key was revoked, expired, unlinked or had its
    permission taken away stops there, and is closed.
    """
    try:
        opened = ctx.streams[handle]
    except KeyError:
        raise E.EBADF(f"no open stream {handle}") from None
    if opened.key:
        ctx.audit_keys = [opened.key]
        try:
            ctx.store.operand(ctx.caller, opened.key)
        except E.KeydenError:
            ctx.streams.pop(handle, None)
            raise
    return opened


def _reply_room(ctx, stream, kind: str, data: bytes, tail: int) -> None:
    """EMSGSIZE before the stream takes ``data`` if the reply might not fit the frame cap: a refused
    piece must leave the stream as it was, so that sending it again in smaller pieces is right.
    The reply is the length-prefixed output, then ``tail`` bytes (FINAL's length-prefixed tag)."""
    out = stream.held + len(data) if kind in ("aead", "skcipher") else 0
    body = 4 + out + tail
    if body > ctx.max_frame:
        raise E.EMSGSIZE(f"the reply could take {body} bytes, over the {ctx.max_frame}-byte frame cap; nothing "
                         "was processed: send the data in smaller pieces")


@handles(Op.STREAM_UPDATE)
def _stream_update(ctx, handle, data):
    kind, _decrypt, stream, _key = _stream(ctx, handle)
    _reply_room(ctx, stream, kind, data, 0)
    try:
        out = stream.update(data)
    except E.KeydenError:
        ctx.streams.pop(handle, None)
        raise
    return (out if kind in ("aead", "skcipher") else b"",)


@handles(Op.STREAM_FINAL)
def _stream_final(ctx, handle, data, tag):
    """Finish: returns (last output, tag).  tag is the AEAD tag, or the digest/MAC.

    A tag is taken only to be checked: by an AEAD decryption, or an HMAC stream opened with DECRYPT
    (verify, in constant time: EBADMSG on mismatch, nothing returned).
    """
    kind, decrypt, stream, _key = _stream(ctx, handle)
    symmetric.check_final_tag(stream.name, decrypt, tag)
    spec = symmetric.spec(stream.name)
    tag_size = 0 if decrypt else spec.tag_size if kind == "aead" else spec.digest_size
    _reply_room(ctx, stream, kind, data, 4 + tag_size)
    # From here on the stream ends, whatever the outcome: only the refusals above, made before anything was
    # processed (a tag where none belongs or none where one does, EMSGSIZE), leave it open.
    del ctx.streams[handle]
    out = stream.update(data) if data else b""
    if kind == "aead":
        if decrypt:
            return (out + stream.finalize_with_tag(tag), b"")
        ct_tail_and_tag = stream.finalize()
        cut = len(ct_tail_and_tag) - tag_size
        return (out + ct_tail_and_tag[:cut], ct_tail_and_tag[cut:])
    if kind == "skcipher":
        return (out + stream.finalize(), b"")
    if decrypt:
        stream.verify(tag)
        return (b"", b"")
    return (b"", stream.finalize())


@handles(Op.STREAM_ABORT)
def _stream_abort(ctx, handle):
    opened = ctx.streams.pop(handle, None)
    if opened is None:
        raise E.EBADF(f"no open stream {handle}")
    if opened.key:
        ctx.audit_keys = [opened.key]
    return ()


@handles(Op.STREAM_COPY)
def _stream_copy(ctx, handle):
    """A second stream that goes on from where a hash or HMAC stream is (pyca's ``Hash.copy``/``HMAC.copy``):
    a running transcript hash, or MACs of several messages with a common prefix.  Its key is checked
    as any piece's is.  AEAD and block cipher streams are not copied: two copies would go on with the
    same keystream (a GCM nonce used twice), and pyca's cipher contexts have no copy either."""
    opened = _stream(ctx, handle)
    if opened.kind not in ("hash", "hmac"):
        raise E.EOPNOTSUPP(f"{opened.stream.name} streams cannot be copied: two copies would go on with the same "
                           "keystream and nonce; only hash and HMAC streams copy")
    _room_for_a_stream(ctx)
    return (_add_stream(ctx, opened._replace(stream=opened.stream.copy())),)


# ------------------------------------------------------------- shared memory

class Region:
    """A client's sealed memfd, mapped here: bulk data is processed in it, never copied over the socket.

    The memfd's whole size is charged to the owner's shared-memory budget
    for as long as it is mapped; ``close`` (detach, or the connection's end) refunds it.
    """

    def __init__(self, fd: int, size: int, held: int, budget, uid: int):
        """Maps ``size`` bytes of ``fd`` (``held`` in all), which the caller still owns (and closes: the
        mapping needs no descriptor)."""
        budget.charge(uid, held)
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            budget.refund(uid, held)
            raise
        self.open, self.size, self.held, self.budget, self.uid = True, size, held, budget, uid
        self.view = memoryview(self.map)

    def span(self, offset: int, length: int) -> memoryview:
        """region[offset:offset+length], checked before anything is read or written."""
        if offset < 0 or length < 0 or offset > self.size or length > self.size - offset:
            raise E.EINVAL("range outside the shared region")
        return self.view[offset:offset + length]

    def close(self) -> None:
        """Unmap and refund the budget.  Not on the loop: the mapping may be the last reference to the
        memfd, and freeing a GiB of its pages takes a fifth of a second (SHM_DETACH runs on a worker, a
        connection's end gives its regions to a closer).

        Unmapping is refused (BufferError) while a view of the map is still
        held, by an operation or by a traceback not yet collected; Python
        unmaps it when the last view goes, and the refund waits for that: the
        budget bounds the memory mapped (and locked), never less.
        """
        if not self.open:
            return
        self.open = False
        try:
            self.view.release()
            self.map.close()
        except BufferError:
            weakref.finalize(self.map, self.budget.refund_soon, self.uid, self.held)
            del self.map, self.view  # ours go now; the last other view unmaps it and refunds
            return
        self.budget.refund(self.uid, self.held)


def _sealed_size(fd: int) -> int:
    """The memfd's size, which must stay as it is: sealed against shrinking, or the client could make us
    fault (SIGBUS), and against growing, or what our mapping keeps alive could grow past what is charged.

    And an ordinary memfd, on the kernel's own tmpfs: a hugetlb one (MFD_HUGETLB) takes the seals too,
    but a hole punched in it takes its huge page away, and with the pool used up elsewhere our next touch
    of the region is a SIGBUS that kills the daemon; a hole punched in
    a tmpfs memfd reads back as zeros."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise E.EBADF("the descriptor is not a memfd (create it with MFD_ALLOW_SEALING)") from None
    st = os.fstat(fd)
    if st.st_dev != _memfd_device():
        raise E.EBADF("the descriptor is not a memfd on the kernel's tmpfs (a hugetlb memfd is not taken)")
    if seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) != fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW:
        raise E.EPERM("seal the memfd with F_SEAL_SHRINK and F_SEAL_GROW before attaching it")
    return st.st_size


@functools.cache
def _memfd_device() -> int:
    """The device of the kernel's internal tmpfs mount, where every memfd made without MFD_HUGETLB lives."""
    fd = os.memfd_create("keyden-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


@handles(Op.SHM_ATTACH)
def _shm_attach(ctx, size):
    fd = ctx.fds.take("the memfd")
    try:  # closed whatever happens: a mapping needs no descriptor (Python's mmap keeps a copy of its own)
        if len(ctx.regions) >= MAX_REGIONS:
            raise E.EMFILE(f"at most {MAX_REGIONS} shared regions per connection")
        if not 0 < size <= MAX_SHARED_REGION:
            raise E.EINVAL(f"shared regions are 1..{MAX_SHARED_REGION} bytes")
        held = _sealed_size(fd)  # all of it stays alive while mapped (mmap keeps a descriptor): all is charged
        if held < size:
            raise E.EINVAL("the memfd is smaller than the size given")
        if held > MAX_SHARED_REGION:
            raise E.EINVAL(f"the memfd is larger than a shared region may be ({MAX_SHARED_REGION} bytes)")
        try:
            region = Region(fd, size, held, ctx.store.shm_budget, ctx.caller.uid)
        except OSError as exc:
            if exc.errno in (errno.ENOMEM, errno.EAGAIN):  # mlockall(MCL_FUTURE) past RLIMIT_MEMLOCK
                raise E.ENOMEM("keyden cannot map that much more memory") from None
            raise E.EACCES("the memfd cannot be mapped read-write (sealed against writes?)") from None
        except ValueError:  # write-sealed or read-only memfds cannot be mapped for writing
            raise E.EACCES("the memfd cannot be mapped read-write (sealed against writes?)") from None
    finally:
        descriptors.release((fd,), ctx.caller.uid)  # the client's choice of file: its close may wait
    handle = ctx.new_handle()
    ctx.regions[handle] = region
    return (handle,)


@handles(Op.SHM_DETACH)
def _shm_detach(ctx, handle):
    region = ctx.regions.pop(handle, None)
    if region is None:
        raise E.EBADF(f"no shared region {handle}")
    region.close()
    return ()


@handles(Op.SHM_CIPHER)
def _shm_cipher(ctx, handle, alg, key, flags, iv, aad, in_offset, length, out_offset):
    """Process region[in_offset:+length] into region[out_offset:]; returns (bytes written, nonce used).

    Both ranges are checked before any work, for every algorithm: a refused
    request must not first cost the daemon a pass over (and a copy of) up to
    a gigabyte of data.
    """
    region = ctx.regions.get(handle)
    if region is None:
        raise E.EBADF(f"no shared region {handle}")
    decrypt, random_nonce = _check_flags(flags)
    src = region.span(in_offset, length)
    kind = symmetric.kind(alg)
    if kind == "aead":
        eng = aead_engine(ctx, alg, key)
        out_len = length - eng.tag_size if decrypt else length + eng.tag_size
        if out_len < 0:
            raise E.EBADMSG("authentication failed")
    else:
        out_len = _plain_output_size(alg, kind, decrypt, length)
    _no_overlap(in_offset, length, out_offset, out_len)
    dst = region.span(out_offset, out_len)
    if kind == "aead":
        if random_nonce:
            if decrypt or iv:
                raise E.EINVAL("a keyden-chosen nonce is for encryption, with no IV sent")
            iv = os.urandom(eng.nonce_size)
        written = eng.decrypt_into(iv, src, aad, dst) if decrypt else eng.encrypt_into(iv, src, aad, dst)
        return (written, iv if random_nonce else b"")
    if kind == "skcipher":  # in place, a piece at a time (one_shot would hold the whole output in memory)
        if random_nonce:
            raise E.EINVAL("keyden-chosen nonces are for AEAD algorithms")
        if aad:
            raise E.EINVAL(f"{alg} takes no associated data")
        return (symmetric.skcipher_crypt_into(alg, material(ctx, key, alg), iv, src, dst, decrypt), b"")
    out = one_shot(ctx, alg, key, flags)(iv, aad, src)  # a digest, a MAC or a verdict: small
    dst[:len(out)] = out  # len(out) == out_len: _plain_output_size is exact
    return (len(out), b"")


def _plain_output_size(alg: str, kind: str, decrypt: bool, length: int) -> int:
    """What a non-AEAD algorithm writes for ``length`` bytes in: known before running it."""
    if kind == "skcipher":
        return length  # no padding: cbc takes whole blocks only, ctr any length
    if kind == "hmac" and decrypt:
        return 0  # verify: a verdict, no output
    return symmetric.spec(alg).digest_size


def _no_overlap(a: int, alen: int, b: int, blen: int) -> None:
    if alen and blen and a < b + blen and b < a + alen:  # an empty range overlaps nothing
        raise E.EINVAL("input and output ranges overlap")
