"""The journal that keeps persistent keys in the sealed database, with group commit.

The store reports changes with its lock held; they are only noted (serial ->
live key, or None to delete).  ``sync``, called by the server before it
answers, copies the noted keys' current state under the store lock (so a
batch holds whole operations), then seals and writes them in one synced
transaction outside it.  Requests that arrive while a write is in progress wait for the
next one, which takes all of their changes at once: one fsync for many
operations.  A request only waits if it made changes not yet on disk (the
thread that ran it marks them), and only a failed write of its own changes
fails it.  Each write re-seals the manifest buckets its rows fall in and the
manifest's root, in the same transaction, so the manifest never disagrees
with the rows on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading

from keyden import errors as E
from keyden.core.journal import Journal
from keyden.core.key import Key
from keyden.core.store import KeyStore
from keyden.logs import Throttled, reason
from keyden.persist import records
from keyden.persist.database import Database
from keyden.persist.manifest import Manifest
from keyden.persist.master import KeySource, LegacySealer, Sealer, write_failure

log = logging.getLogger("keyden.persist")


class _ThreadMark(threading.local):
    """The last change noted by each thread.  A class default, not getattr's: a thread that never noted
    one (the loop, answering a read) would raise and catch an AttributeError twice per request."""

    seq = 0


class SealedJournal(Journal):
    def __init__(self, store: KeyStore, db: Database, sealer: Sealer, source: KeySource,
                 manifest: Manifest):
        self.store = store
        self.db = db
        self.sealer = sealer
        self.source = source
        self._manifest = manifest  # serial -> version of its row, as on disk
        self._dirty: dict[int, Key | None] = {}
        self._writing: dict[int, Key | None] = {}  # the batch _write_pending took from _dirty, until it is written
        self._seq = 0  # changes noted so far
        self._durable = 0  # changes on disk
        self._local = _ThreadMark()
        self._write_lock = threading.Lock()
        self._closed = False
        # A full disk fails every request that changes a persistent keyring, from any user: one line per
        # 10 s says so, not one per request.
        self._write_failures = Throttled(log)
        self._failing = False

    def __repr__(self) -> str:
        return f"<SealedJournal {self.db.path}>"

    # ------------------------------------------------ the store's reports

    def on_store(self, key: Key) -> None:
        self._dirty[key.serial] = key
        self._note()

    def pending_for(self, serial: int) -> bool:
        return serial in self._dirty or serial in self._writing

    def on_forget(self, serial: int) -> None:
        self._dirty[serial] = None
        self._note()

    def _note(self) -> None:
        self._seq += 1
        self._local.seq = self._seq

    # ------------------------------------------------------------- writing

    def mark(self) -> int:
        return self._local.seq

    def pending(self) -> int:
        seq = self._seq  # one read: another thread may note more meanwhile (their replies wait for theirs)
        return seq if seq > self._durable else 0

    def synced(self, upto: int) -> bool:
        return upto <= self._durable

    def sync(self, upto: int) -> None:
        if upto <= self._durable:
            return
        with self._write_lock:
            if upto > self._durable:
                self._write_pending()  # EIO if the database is closed: the change cannot be made durable

    def flush(self) -> None:
        """Everything noted so far, whoever noted it (shutdown, garbage collection)."""
        with self._write_lock:
            if self._seq > self._durable and not self._closed:
                self._write_pending()

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            try:
                if self._seq > self._durable:
                    try:
                        self._write_pending()
                    except E.KeydenError as exc:  # its message is for a request, which may retry: not now
                        raise type(exc)(f"{len(self._dirty)} changes to persistent keyrings are lost: the key "
                                        f"database {self.db.path} could not be written") from None
            finally:
                self._closed = True
                self.db.close()

    def _write_pending(self) -> None:
        """Seal and write the noted changes (write lock held).  If that fails, they are kept for the next
        write, and the error says the change is made but not on disk yet."""
        if self._closed:
            raise E.EIO("the key database is closed")
        snapshots: list[tuple[records.Row, bytearray]] = []
        batch: dict[int, Key | None] = {}
        try:
            with self.store.lock:  # one hold: the batch, and the state it is copied in, hold whole operations
                batch, self._dirty = self._dirty, {}
                self._writing = batch
                upto = self._seq
                deletes = self._snapshot(batch, snapshots)
            try:
                upserts = [records.seal(row, plaintext, self.sealer) for row, plaintext in snapshots]
            finally:  # outside the lock: requests go on while a large batch is sealed
                _wipe(snapshots)
            changes: dict[int, int | None] = {serial: None for serial in deletes}
            changes.update((row.serial, row.version) for row in upserts)
            buckets = self._manifest.with_changes(changes)
            sealed, root = self._manifest.seal(buckets, self.sealer)
            self.db.write(upserts, deletes, {"manifest": root} if buckets else None, sealed)
        except BaseException as exc:  # (an interrupt too: no copy may stay unwiped, no batch be lost)
            _wipe(snapshots)  # (a copy that failed before sealing)
            with self.store.lock:
                self._keep(batch)
            if not isinstance(exc, Exception):
                raise
            raise self._write_failed(exc, len(batch)) from None  # logged outside the lock
        self._manifest.adopt(buckets)
        self._durable = upto
        self._writing = {}
        if self._failing:
            self._failing = False
            log.info("the key database is written again: the changes kept in memory are on disk")

    def _snapshot(self, batch: dict[int, Key | None], snapshots: list[tuple[records.Row, bytearray]]) -> list[int]:
        """Add the batch's rows as they are now, unsealed, to ``snapshots`` (as they are made: a failure
        leaves the caller those to wipe); return the serials to delete.  Store lock held."""
        deletes = []
        for serial, key in batch.items():
            if key is None or key.dead or not key.persisted:
                deletes.append(serial)
                continue
            try:
                root = self.store.is_persistent_keyring(key)
                snapshots.append(records.snapshot(key, self._manifest.next_version(serial), root))
            except records.NotStorable as exc:
                log.warning("not persisted: %s", exc)
            except MemoryError:
                raise  # for now: the batch is kept for the next write
            except Exception as exc:  # a key that never copies must not fail every later write of every key
                log.error("key %d not persisted: its state could not be copied (%s)", serial, type(exc).__name__)
        return deletes

    def _keep(self, batch: dict[int, Key | None]) -> None:
        """A batch not written goes back for the next write (store lock held); newer notes win."""
        for serial, key in batch.items():
            self._dirty.setdefault(serial, key)
        self._writing = {}

    def _write_failed(self, exc: Exception, changes: int) -> E.KeydenError:
        """Log a failed write (throttled) and make the error its requests get."""
        error = write_failure(exc)
        self._failing = True
        self._write_failures.error("writing the key database failed (%s: %s); %d changes kept for the next "
                                   "attempt", type(exc).__name__, reason(exc), changes)
        return error("the change is made but not on disk yet: the key database could not be written"
                     f"{' (the disk is full)' if error is E.ENOSPC else ''}; it is written with the next write "
                     "that succeeds, unless the daemon stops first")


    # --------------------------------------------------------------- rekey

    def rekey(self, passphrase: bytes = b"") -> int:
        """A new master key; every row and manifest bucket re-sealed under it in one transaction.

        Returns the rows re-sealed.

        Requests go on meanwhile: changes wait in memory and are sealed
        under the new key.  Rows that no longer open (tampered) keep their
        old seal and stay unreadable.
        """
        with self._write_lock:
            if self._seq > self._durable:
                try:
                    self._write_pending()
                except E.KeydenError as exc:  # its message is for the request whose change it was
                    raise type(exc)("rekey not started: changes waiting to be written could not be written "
                                    f"first{' (the disk is full)' if exc.code == E.ENOSPC.code else ''}; "
                                    "the old master key stays in use") from None
            rotation = self.source.rotate(passphrase)
            check = rotation.sealer.make_check(self.source.source, rotation.meta.get("salt", b""))
            try:
                resealed, stuck = reseal(self.db, self._manifest, self.sealer, rotation.sealer,
                                         dict(rotation.meta, check=check))
            except Exception as exc:
                log.error("rekey failed writing the database (%s: %s); the old master key stays",
                          type(exc).__name__, reason(exc))
                error = write_failure(exc)
                raise error(f"rekey failed{': the disk is full' if error is E.ENOSPC else ''}; the old master key "
                            "stays in use") from None
            with self.store.lock:
                self.sealer = rotation.sealer
            rotation.finish()
            try:  # the old seals are still in the WAL (and maybe in the database) until a checkpoint
                self.db.checkpoint()
            except sqlite3.Error as exc:
                log.warning("after the rekey, the key database could not be checkpointed (%s): rows sealed "
                            "under the old master key stay on disk until the next checkpoint", exc)
            log.info("rekeyed: %d records re-sealed under the new master key%s", resealed,
                     f"; {stuck} unreadable records left as they were" if stuck else "")
            return resealed


def reseal(db: Database, manifest: Manifest, old: Sealer | LegacySealer, new: Sealer,
           meta: dict[str, bytes]) -> tuple[int, int]:
    """Every row and manifest bucket sealed again under ``new``, with ``meta`` (the check value that says
    so), in one transaction: (rows re-sealed, rows left as they were because they no longer open).

    Until a checkpoint, the old seals stay in the WAL.
    """
    resealed, stuck = [], 0
    for row in db.rows():
        try:
            aad, plaintext = records.open_sealed(row, old)
        except records.Unusable:
            stuck += 1
            continue
        resealed.append(dataclasses.replace(row, sealed=new.seal(plaintext, aad)))
    buckets, root = manifest.seal(manifest.buckets(), new)
    db.write(resealed, (), dict(meta, manifest=root), buckets)
    return len(resealed), stuck


def _wipe(snapshots: list[tuple[records.Row, bytearray]]) -> None:
    for _row, plaintext in snapshots:
        plaintext[:] = bytes(len(plaintext))
