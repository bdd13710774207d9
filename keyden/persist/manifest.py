"""The sealed manifest: which stored keys have rows, and at which version.

Each row authenticates on its own, which cannot show a row deleted, replaced
by an older sealed copy of itself, or put back after its key was deleted.
The manifest lists (serial, version) for every row, sealed with the rows'
``Sealer`` and written in the same transaction, so at start a row the
manifest does not expect, or an entry without its row, stands out.

It is split in ``BUCKETS`` buckets by ``serial % BUCKETS``, so a commit
re-seals only the buckets it touches.  Each bucket has a generation, raised
by every commit that rewrites it; the rows that commit writes take the new
generation as their version, so a serial's versions only grow and are never
reused, even by a later key given a freed serial.  A bucket's plaintext is
its generation, then its serials, then their versions, in one order (two
columns packed in one call: at a million keys, sorting and packing pair by
pair cost ten times more per commit, and the AEAD needs no canonical order);
its associated data is a format tag and the bucket's number, so buckets
cannot be swapped with each other or with rows.

The **root** (meta ``manifest``) lists every bucket's generation and is
re-sealed by every commit: an older copy of one bucket, put back together
with its rows, is consistent with itself but not with the root.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from keyden.persist.master import Sealer

BUCKETS = 64
FORMAT = b"keyden-manifest-v1\0"
ROOT_FORMAT = b"keyden-manifest-root-v1\0"
_GENERATION = struct.Struct("<Q")
_ROOT = struct.Struct(f"<{BUCKETS}Q")
_ENTRY_BYTES = 4 + 8  # a serial (<i) and a version (<Q)
_NUMBER = struct.Struct("<I")


class BadManifest(Exception):
    """A bucket or root that cannot be trusted (missing, failed authentication, malformed)."""


@dataclass
class Bucket:
    entries: dict[int, int] = field(default_factory=dict)  # serial -> version of its row
    generation: int = 0  # raised by every commit that rewrites the bucket; no row's version is above it

    def copy(self) -> Bucket:
        return Bucket(dict(self.entries), self.generation)


def bucket_of(serial: int) -> int:
    return serial % BUCKETS


def associated_data(number: int) -> bytes:
    return FORMAT + _NUMBER.pack(number)


def seal_bucket(number: int, bucket: Bucket, sealer: Sealer) -> bytes:
    entries, count = bucket.entries, len(bucket.entries)
    plaintext = _GENERATION.pack(bucket.generation) + struct.pack(f"<{count}i{count}Q", *entries, *entries.values())
    return sealer.seal(plaintext, associated_data(number))


def open_bucket(number: int, sealed: object, sealer: Sealer) -> Bucket:
    """The bucket a sealed blob holds; BadManifest if it is not one keyden sealed under this number."""
    plaintext = _open(sealed, associated_data(number), sealer)
    count, odd = divmod(len(plaintext) - _GENERATION.size, _ENTRY_BYTES)
    if count < 0 or odd:
        raise BadManifest("is malformed")
    generation, *columns = struct.unpack(f"<Q{count}i{count}Q", plaintext)
    entries = dict(zip(columns[:count], columns[count:]))
    if len(entries) != count or any(bucket_of(s) != number or v > generation for s, v in entries.items()):
        raise BadManifest("is malformed")
    return Bucket(entries, generation)


def seal_root(generations: list[int], sealer: Sealer) -> bytes:
    return sealer.seal(_ROOT.pack(*generations), ROOT_FORMAT)


def open_root(sealed: object, sealer: Sealer) -> list[int]:
    """Every bucket's generation, as the last commit left them; BadManifest if the root cannot be trusted."""
    plaintext = _open(sealed, ROOT_FORMAT, sealer)
    if len(plaintext) != _ROOT.size:
        raise BadManifest("is malformed")
    return list(_ROOT.unpack(plaintext))


def _open(sealed: object, aad: bytes, sealer: Sealer) -> bytes:
    if sealed is None:
        raise BadManifest("is missing")
    try:
        return sealer.open(sealed, aad)
    except (InvalidTag, TypeError):
        raise BadManifest("failed authentication") from None


def stale(listed: int | None, version: int) -> str | None:
    """Why a row of this version must not load, given what the manifest lists for its serial (None: it may)."""
    if listed is None:
        return "not in the manifest (a deleted key's row put back?)"
    if version < listed:
        return f"rolled back: version {version} on disk, {listed} in the manifest"
    if version > listed:
        return f"version {version} on disk is newer than the manifest's {listed}"
    return None


class Manifest:
    """The manifest as keyden last committed it: one dict per bucket, so a commit touches only its buckets."""

    def __init__(self, buckets: dict[int, Bucket] | None = None):
        buckets = buckets or {}
        self._buckets = [buckets[n] if n in buckets else Bucket() for n in range(BUCKETS)]

    def __repr__(self) -> str:
        return f"<Manifest {sum(len(b.entries) for b in self._buckets)} entries>"

    def next_version(self, serial: int) -> int:
        """The version of the row to write for ``serial`` in the next commit: its bucket's next generation."""
        return self._buckets[bucket_of(serial)].generation + 1

    def with_changes(self, changes: dict[int, int | None]) -> dict[int, Bucket]:
        """The buckets ``changes`` (serial -> new version, or None: row deleted) alter, as they would be.

        Nothing here changes until ``adopt``: a write that fails leaves the manifest as it was.
        """
        touched: dict[int, Bucket] = {}
        for serial, version in changes.items():
            number = bucket_of(serial)
            bucket = touched.get(number, self._buckets[number])
            if version is None and serial not in bucket.entries:
                continue  # never written (made and dropped within one batch)
            if number not in touched:
                bucket = touched[number] = bucket.copy()
                bucket.generation += 1
            if version is None:
                del bucket.entries[serial]
            else:
                bucket.entries[serial] = version
                bucket.generation = max(bucket.generation, version)
        return touched

    def seal(self, buckets: dict[int, Bucket], sealer: Sealer) -> tuple[dict[int, bytes], bytes]:
        """``buckets`` (changed ones, or all) sealed, and the root that goes with them."""
        generations = [buckets[n].generation if n in buckets else b.generation for n, b in enumerate(self._buckets)]
        sealed = {number: seal_bucket(number, bucket, sealer) for number, bucket in buckets.items()}
        return sealed, seal_root(generations, sealer)

    def adopt(self, buckets: dict[int, Bucket]) -> None:
        """Take buckets that are now on disk."""
        for number, bucket in buckets.items():
            self._buckets[number] = bucket

    def buckets(self) -> dict[int, Bucket]:
        """All of them (a new master key re-seals every one)."""
        return dict(enumerate(self._buckets))
