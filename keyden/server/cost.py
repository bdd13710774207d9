"""What a request may cost, guessed from its frame alone: the loop decides from this where it runs.

Nothing is decoded or checked here (the handler does that); a wrong guess costs time, never correctness.
"""

from __future__ import annotations

import enum
import struct

from keyden import protocol as W
from keyden.core.store import KeyStore


class Cost(enum.IntEnum):
    """How long a request may hold whoever answers it: the loop decides from this where it runs."""

    QUICK = 0  # microseconds: always answered by the loop itself
    SHORT = 1  # a few tenths of a millisecond that pyca spends outside the GIL (AES-GCM on up to 2 MiB): as
    #            HEAVY, but its own connection's waiting requests do not send it to a worker: they would wait
    #            for it there too, and the hand-off costs about what the work does (docs/operations.md)
    HEAVY = 2  # a few bounded milliseconds that pyca spends outside the GIL (RSA and P-384 keys, ciphers
    #            on up to 16 MiB): answered by the loop when nobody else is waiting, else by a worker
    SLOW = 3  # unbounded or blocking (key generation, a password KDF, the disk, TLS set-up): always a worker


#: Requests that may take long whatever their size: key generation, finite-field DH, key agreement and
#: key transport into new keys (RSA, P-384), export and import (their wrapping, the disk), path
#: validation, TLS set-up.
SLOW_OPS = frozenset({
    W.Op.GENKEY, W.Op.GENKEY_FLAGS, W.Op.DH_COMPUTE, W.Op.DH_COMPUTE_KDF, W.Op.DERIVE, W.Op.KDF,
    W.Op.PKEY_DECRYPT_INTO, W.Op.EXPORT, W.Op.IMPORT, W.Op.REKEY, W.Op.X509_VERIFY, W.Op.GET_PERSISTENT,
    W.Op.TLS_ACCEPT, W.Op.TLS_CONNECT,
    W.Op.SHM_DETACH,  # the last reference to a GiB memfd: 0.2 s to free its pages
})
#: Requests whose cost depends on the key.  RSA-2048 signing takes ~0.8 ms and P-384 0.3-0.6 ms: heavy.
#: Ed25519 and P-256 take 35-130 µs, less than handing the request to a worker and back costs under
#: load (8 clients signing with Ed25519 measured 8.3k sig/s on the loop, 4.9k through workers): quick.
PKEY_OPS = frozenset({W.Op.PKEY_SIGN, W.Op.PKEY_DECRYPT, W.Op.PKEY_ENCRYPT, W.Op.PKEY_VERIFY})
#: Requests that parse what they are given: an asymmetric key may be an encrypted PKCS#8 (a password KDF).
#: (UPDATE is not among them: only user-like keys are updatable, and a page of their payload is stored as is.)
ADD_OPS = frozenset({W.Op.ADD, W.Op.ADD_FLAGS})
BULK_BYTES = 64 * 1024  # more data than this in one request is not quick (pyca releases the GIL for bulk work)
#: A batch's cost is its items (1-12 µs each, however small): past QUICK_ITEMS it is heavy, past
#: HEAVY_ITEMS (~10 ms) slow.  65536 empty items fit in 260 KiB and took the loop for up to 0.9 s.
QUICK_ITEMS = 256
HEAVY_ITEMS = 1024
#: How much data a heavy request may bring, by how fast its algorithm runs (measured here, 16 MiB): AES-GCM
#: at ~10 GB/s takes a frame's worth in ~2 ms; CBC, CTR, ChaCha20, hashes and MACs run at 0.5-1.5 GB/s
#: (16 MiB: 11-33 ms, and an HMAC-SHA-512 over the socket held the loop 70 ms), so 2 MiB of them.  More is
#: slow: a worker, while the loop serves the others.  A stream's algorithm is not in its frames: the lower.
#: An eighth of AES-GCM's (2 MiB, ~0.2 ms) is short.
FAST_BULK = b"gcm(aes)"
SHORT_BYTES = 2 * 1024 * 1024
HEAVY_BYTES = 16 * 1024 * 1024
HEAVY_BYTES_OTHER = 2 * 1024 * 1024
_FAST_BULK_FIELD = struct.pack("<I", len(FAST_BULK)) + FAST_BULK  # FAST_BULK as a STR field, length first
_PLAIN_OPS = frozenset(W.Op) - SLOW_OPS - PKEY_OPS - ADD_OPS - {W.Op.SHM_CIPHER, W.Op.BATCH}  # cost: size alone
_ASYMMETRIC_TYPE = struct.pack("<I", 10) + b"asymmetric"  # an ADD's first field, the type, length-prefixed
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def request_cost(store: KeyStore, frame: W.Frame) -> Cost:
    """A cheap guess from the frame alone (nothing is decoded or checked here: the handler does that)."""
    op, body = frame.op, frame.body
    if op in _PLAIN_OPS and len(body) <= BULK_BYTES:  # most requests: decided by one lookup
        return Cost.QUICK
    if op in SLOW_OPS:
        return Cost.SLOW
    if op in ADD_OPS:  # asymmetric payloads are parsed (maybe decrypted); any other is as its size
        return Cost.SLOW if body[:14] == _ASYMMETRIC_TYPE else _bulk(len(body), body, None)
    if op == W.Op.BATCH:  # the larger of what its items and its bytes cost
        items = batch_items(body)
        if items is None:  # its first list is over the limit: refused before any item is made
            return Cost.QUICK
        return Cost.SLOW if items > HEAVY_ITEMS else max(_bulk(len(body), body, 0),
                                                         Cost.HEAVY if items > QUICK_ITEMS else Cost.QUICK)
    if op == W.Op.SHM_CIPHER:  # its length field (in_offset, length, out_offset end the body), or its own size
        if len(body) < 16:        # (associated data comes in the frame)
            return Cost.QUICK
        return max(_bulk(_U64.unpack_from(body, len(body) - 16)[0], body, 4), _bulk(len(body), body, 4))
    if len(body) > BULK_BYTES:
        return _bulk(len(body), body, 0 if op == W.Op.CIPHER else None)
    if op in PKEY_OPS:
        return Cost.HEAVY if len(body) >= 4 and store.slow_asymmetric(_I32.unpack_from(body)[0]) else Cost.QUICK
    return Cost.QUICK


def batch_items(body: bytes) -> int | None:
    """A BATCH frame's item count, read where the schema puts it: 0 if malformed (EPROTO at once).  A list
    over MAX_BATCH is E2BIG, refused by the decoder when it meets that list, after making the items of the
    lists before it: their count, or None if there were none (refused before any item is made)."""
    try:
        pos = 4 + _U32.unpack_from(body)[0] + 8  # alg (length-prefixed), key, flags
        made = 0  # items the decoder makes before it meets a list over the limit
        for _ in range(2):  # ivs, aads: a count, that many lengths, the bytes
            count = _U32.unpack_from(body, pos)[0]
            if count > W.MAX_BATCH:
                return made or None
            if count:
                if 4 + 4 * count > len(body) - pos:
                    return 0
                pos += sum(struct.unpack_from(f"<{count}I", body, pos + 4))
            pos += 4 + 4 * count
            made += count
        count = _U32.unpack_from(body, pos)[0]
        return count if count <= W.MAX_BATCH else made or None
    except struct.error:
        return 0


def _bulk(size: int, body: bytes, alg_at: int | None) -> Cost:
    """The cost of ``size`` bytes of data, by the speed of the algorithm the STR field at ``alg_at`` names
    (None: a frame that names none), looked at only for more than BULK_BYTES."""
    if size <= BULK_BYTES:
        return Cost.QUICK
    fast = alg_at is not None and body.startswith(_FAST_BULK_FIELD, alg_at)
    if fast and size <= SHORT_BYTES:
        return Cost.SHORT
    return Cost.HEAVY if size <= (HEAVY_BYTES if fast else HEAVY_BYTES_OTHER) else Cost.SLOW
