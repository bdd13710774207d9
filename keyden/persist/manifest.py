"""The sealed manifest: which stored keys have rows, and at which version.

Each row authenticates on its own, which cannot show a row deleted, replaced
by an older sealed copy of itself, or put back after its key was deleted.
The manifest lists (serial, version) for every row, sealed with the rows'
``Sealer`` and written in the same transaction, so at start a row the
manifest does not expect, or an entry without its row, stands out.

It is split in ``BUCKETS`` buckets by ``serial % BUCKETS``, so a commit
re-seals only the buckets it touches.  A bucket's plaintext is the highest
version it ever listed (``high``: deleted keys included, so a key that later
gets a freed serial starts above every old row of that serial and an old row
can never pass for it), then its serials, then their versions, in one order
(two columns packed in one call: at a million keys, sorting and packing
pair by pair cost ten times more per commit, and the AEAD needs no canonical
order); its associated data is a format tag and the bucket's number, so
buckets cannot be swapped with each other or with rows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag

from keyden.persist.master import Sealer

BUCKETS = 64
FORMAT = b"keyden-manifest-v1\0"
_HIGH = struct.Struct("<Q")
_ENTRY_BYTES = 4 + 8  # a serial (<i) and a version (<Q)
_NUMBER = struct.Struct("<I")


class BadBucket(Exception):
    """A bucket that cannot be trusted (missing, failed authentication, malformed): its rows go unchecked."""


@dataclass
class Bucket:
    entries: dict[int, int] = field(default_factory=dict)  # serial -> version of its row
    high: int = 0  # the highest version this bucket ever listed

    def copy(self) -> Bucket:
        return Bucket(dict(self.entries), self.high)


def bucket_of(serial: int) -> int:
    return serial % BUCKETS


def associated_data(number: int) -> bytes:
    return FORMAT + _NUMBER.pack(number)


def seal_bucket(number: int, bucket: Bucket, sealer: Sealer) -> bytes:
    entries, count = bucket.entries, len(bucket.entries)
    plaintext = _HIGH.pack(bucket.high) + struct.pack(f"<{count}i{count}Q", *entries, *entries.values())
    return sealer.seal(plaintext, associated_data(number))


def seal_buckets(buckets: dict[int, Bucket], sealer: Sealer) -> dict[int, bytes]:
    return {number: seal_bucket(number, bucket, sealer) for number, bucket in buckets.items()}


def open_bucket(number: int, sealed: object, sealer: Sealer) -> Bucket:
    """The bucket a sealed blob holds; BadBucket if it is not the one keyden sealed under this number."""
    if sealed is None:
        raise BadBucket("is missing")
    try:
        plaintext = sealer.open(bytes(sealed), associated_data(number))
    except (InvalidTag, TypeError):
        raise BadBucket("failed authentication") from None
    count, odd = divmod(len(plaintext) - _HIGH.size, _ENTRY_BYTES)
    if count < 0 or odd:
        raise BadBucket("is malformed")
    high, *columns = struct.unpack(f"<Q{count}i{count}Q", plaintext)
    entries = dict(zip(columns[:count], columns[count:]))
    if len(entries) != count or any(bucket_of(s) != number or v > high for s, v in entries.items()):
        raise BadBucket("is malformed")
    return Bucket(entries, high)


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
        """The version of the row to write for ``serial``: its last one plus one, or above any its bucket held."""
        bucket = self._buckets[bucket_of(serial)]
        listed = bucket.entries.get(serial)
        return (bucket.high if listed is None else listed) + 1

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
            if version is None:
                del bucket.entries[serial]
            else:
                bucket.entries[serial] = version
                bucket.high = max(bucket.high, version)
        return touched

    def adopt(self, buckets: dict[int, Bucket]) -> None:
        """Take buckets that are now on disk."""
        for number, bucket in buckets.items():
            self._buckets[number] = bucket

    def buckets(self) -> dict[int, Bucket]:
        """All of them (a new master key re-seals every one)."""
        return dict(enumerate(self._buckets))
