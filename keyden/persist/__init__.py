"""Durable persistent keyrings: a sealed SQLite store behind the key store's journal.

``open_durable`` runs at start-up, before the daemon listens: it finds the
master key (refusing to start without the right one), loads every stored key
back into the KeyStore with its serial (checking the rows against the sealed
manifest: a deleted, rolled-back or resurrected row is reported, and a stale
one not loaded), and attaches the journal that keeps the store and the
database in step from then on.  See docs/persistence.md.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from keyden import errors as E
from keyden.core.key import Key
from keyden.core.store import KeyStore
from keyden.errors import StartupError
from keyden.persist import records
from keyden.persist.database import Database
from keyden.persist.journal import SealedJournal, reseal
from keyden.persist.manifest import BUCKETS, BadManifest, Bucket, Manifest, bucket_of, open_bucket, open_root, stale
from keyden.persist.master import MANIFEST_VERSION, PASSPHRASE_ENV, KeySource, LegacySealer, Sealer, source_for

__all__ = ["open_durable", "SealedJournal", "PASSPHRASE_ENV", "paths"]

log = logging.getLogger("keyden.persist")


def paths(config) -> tuple[str, str]:
    """(database, master key file) for a ServerConfig: its settings, else files in the state directory.
    A relative setting is under the state directory, as ``audit``'s is (not wherever the daemon started)."""
    passphrase = bool(config.passphrase_file or os.environ.get(PASSPHRASE_ENV))  # then no key file is read
    return (_under_state_dir(config, "db_path", "keys.db"),
            _under_state_dir(config, "master_key_file", "master.key", check=not passphrase))


def _under_state_dir(config, setting: str, default: str, check: bool = True) -> str:
    """A relative setting used to be taken from the working directory: a store found only there is not
    silently replaced by a new, empty one under the state directory (StartupError naming both)."""
    given = getattr(config, setting)
    path = os.path.join(config.state_dir, given or default)
    if check and given and not os.path.isabs(given) and not os.path.exists(path) and os.path.exists(given):
        raise StartupError(f"{setting} = {given!r} is relative, so it is {path} (under the state directory), "
                           f"which does not exist, while {os.path.abspath(given)} does (where earlier versions "
                           f"looked): move it there, or give {setting} as an absolute path")
    return path


#: how far a rebuilt bucket's generation jumps when the root that knew its past is lost
UNKNOWN_PAST = 1 << 32


def open_durable(config, store: KeyStore, check_only: bool = False) -> SealedJournal | None:
    """Open (or create) the store, load it into ``store`` and attach its journal; StartupError if it must not run.

    ``check_only`` (`keyden init`): create the store if there is none, else only check that the master key
    opens it, writing nothing (a store from before the manifest is migrated by the daemon).
    ``config.adopt_orphans``: keys under no persistent keyring are adopted (KeyStore.restore), not dropped.
    """
    db_path, key_path = paths(config)
    source = source_for(key_path, config.passphrase_file, config.master_key_kernel)
    db = Database(db_path)
    merged: list[tuple[Key, Key]] = []
    try:
        meta = db.meta()
        if "check" not in meta:
            if not db.is_empty():
                raise StartupError(f"{db_path} holds keys but no master key check; refusing to start")
            if source.source == "key" and os.path.exists(key_path):
                log.warning("the master key %s exists but the key database %s is new: if keyden ran here before, "
                            "its key store is gone (deleted or replaced)", key_path, db_path)
            beside = os.path.join(config.state_dir, "keys.db")
            if os.path.abspath(beside) != os.path.abspath(db_path) and os.path.exists(beside):
                log.warning("a new, empty key store %s is made while the state directory holds another, %s, "
                            "which is not used: if its keys are wanted, point db_path (and master_key_file) at "
                            "it, or move it there", db_path, beside)
            sealer = source.create()
            manifest = Manifest()
            buckets, root = manifest.seal(manifest.buckets(), sealer)
            db.write((), (), dict(source.meta(), source=source.source.encode(), check=source.check(sealer),
                                  manifest=root), buckets)
            log.info("new key store %s (master key: %s)", db_path, _describe(source.source, key_path))
            _checkpoint(db)
        else:
            stored = meta.get("source", b"").decode(errors="replace")
            if stored != source.source:
                raise StartupError(_mismatch(db_path, stored))
            sealer = source.open(meta["check"], meta)
            if check_only:
                db.close()
                return None
            manifest, merged = _load(db, sealer, store, meta, migrating=sealer.version < MANIFEST_VERSION,
                                     adopt=config.adopt_orphans)
            if isinstance(sealer, LegacySealer):
                sealer = _upgrade(db, manifest, sealer, source)  # (checkpoints the store)
            else:
                _checkpoint(db)
    except BaseException:
        db.close()
        raise
    journal = SealedJournal(store, db, sealer, source, manifest)
    store.journal = journal
    if merged:  # both rows in one transaction: the holder's with its new link, the other's as a member's
        with store.lock:
            for holder, linked in merged:
                journal.on_store(holder)
                journal.on_store(linked)
        try:
            journal.flush()
        except E.KeydenError as exc:  # kept in memory, and written with the next write (or merged again)
            log.warning("the keyrings this start linked (persistent keyrings under an older one, keys adopted by "
                        "--adopt-orphans) could not be written yet (%s): they are written with the next write "
                        "that succeeds; adopted keys need --adopt-orphans again if keyden stops before that",
                        exc.message)
    return journal


def _checkpoint(db: Database) -> None:
    """The store as loaded (or made) copied from the WAL into the database file: the -wal file then holds
    only what changes from here on, so losing it (a crash of the disk, a copy of keys.db alone) never takes
    the store's meta and check value, which would make the next start take it for a new one."""
    try:
        db.checkpoint()
    except sqlite3.Error as exc:
        log.warning("%s could not be checkpointed at start (%s): the store lives partly in its -wal file, "
                    "which is part of it (copy and keep both)", db.path, exc)


def _upgrade(db: Database, manifest: Manifest, legacy: LegacySealer, source: KeySource) -> Sealer:
    """A store sealed as before version 3 (every seal under the master key itself), sealed again as now,
    each seal under a key of its own: rows, manifest and check value in one transaction.  Until it commits,
    the store is as the keyden before left it (``_load`` wrote nothing), so that keyden still runs it."""
    sealer = legacy.upgraded()
    try:
        resealed, stuck = reseal(db, manifest, legacy, sealer, {"check": source.check(sealer)})
    except sqlite3.Error as exc:
        raise StartupError(f"cannot re-seal {db.path} as this version seals ({exc}); refusing to start (it is "
                           "as it was: the version before still runs it)") from None
    log.info("re-sealed the key store %s, each record under a key of its own: %d records", db.path, resealed)
    if stuck:
        log.warning("%d stored keys that did not open keep their old seal, which no longer opens: to put one right "
                    "(an edit undone, a row restored), restore the store from a copy made before this start, put "
                    "the row right, and start again", stuck)
    try:  # the old seals are in the WAL (and maybe in the database) until a checkpoint
        db.checkpoint()
    except sqlite3.Error as exc:
        log.warning("after re-sealing, %s could not be checkpointed (%s): old seals stay on disk until the next "
                    "checkpoint", db.path, exc)
    return sealer


def _describe(source: str, key_path: str) -> str:
    return "a passphrase" if source == "passphrase" else key_path


def _mismatch(db_path: str, stored: str) -> str:
    if stored == "passphrase":
        return (f"the key store {db_path} is sealed under a passphrase; start with --passphrase-file "
                f"or ${PASSPHRASE_ENV}")
    if stored == "key":
        return (f"the key store {db_path} is sealed under its master key file, not a passphrase; "
                f"start without --passphrase-file and ${PASSPHRASE_ENV}")
    return f"the key store {db_path} names an unknown master key source; refusing to start"


def _load(db: Database, sealer: Sealer | LegacySealer, store: KeyStore, meta: dict[str, bytes],
          migrating: bool, adopt: bool = False) -> tuple[Manifest, list[tuple[Key, Key]]]:
    """Every row that authenticates and that the manifest expects becomes a key again; the others, and
    manifest entries without a row, are reported (never their contents).

    Buckets that cannot be trusted are sealed again from the rows that opened, and the root with them.
    ``migrating``: the store was written before it kept a manifest; one is built from the rows as
    loaded.  A store sealed as before version 3 (a LegacySealer) is written nothing here: ``_upgrade``
    seals it again whole, the manifest with it, and a check value that says it keeps one.  Also returns
    the persistent keyrings linked under another of their uid's (KeyStore.restore), and with ``adopt`` the
    keyrings orphans were filed in, with what holds them: pairs whose rows the journal writes once it is
    attached.
    """
    if migrating:
        trusted, floors, root_ok = {}, dict.fromkeys(range(BUCKETS), 0), False
    else:  # floors: untrusted bucket -> the generation its new copy must exceed
        trusted, floors, root_ok = _open_manifest(db, meta, sealer)
    keys, links, roots = [], [], []
    skipped: list[int] = []
    present: set[int] = set()  # serials with a row, whatever became of it
    rebuilt = {number: Bucket() for number in floors}  # the untrusted buckets, from the rows that open
    for row in db.rows():
        present.add(row.serial)  # an INTEGER PRIMARY KEY: always an int
        try:
            key, members = records.open_row(row, sealer)
        except records.Unusable as exc:
            log.error("stored key %.20r skipped: %s", row.serial, exc)
            skipped.append(row.serial)  # reserved, never overwritten
            continue
        number = bucket_of(key.serial)
        if number in trusted:
            reason = stale(trusted[number].entries.get(key.serial), row.version)
            if reason:
                log.error("stored key %d skipped: %s", key.serial, reason)
                skipped.append(key.serial)  # its manifest entry (if any) is carried forward unchanged
                continue
        else:
            rebuilt[number].entries[key.serial] = row.version
            floors[number] = max(floors[number], row.version)
        keys.append(key)
        links += [(key.serial, member) for member in members]
        if row.flags & records.ROOT:
            roots.append(key.serial)
    missing = sorted(serial for bucket in trusted.values() for serial in bucket.entries if serial not in present)
    for serial in missing:
        log.error("stored key %d is missing: its row was deleted outside keyden", serial)
    orphans, merged, adopted = store.restore(keys, links, roots, skipped + missing, adopt)  # missing: entries kept
    for holder, linked in merged:
        log.error("two persistent keyrings of one uid on disk (a row restored after a new one was made): %d, "
                  "the newer, is now linked into %d, the older; move what you need out of %d and unlink it",
                  linked.serial, holder.serial, linked.serial)
    for serial in orphans:
        log.error("stored key %d skipped: it is under no persistent keyring any more%s", serial,
                  "" if adopt else " (`keyden serve --adopt-orphans` files it under its owner's)")
    for ring, filed in adopted:
        log.warning("adopted %d stored keys under no persistent keyring, with what hangs below them, into %d "
                    "(%s, uid %d): %s", len(filed), ring.serial, ring.description, ring.uid,
                    " ".join(str(key.serial) for key in filed))
        merged += [(holder, ring) for holder in ring.parents]
    log.info("loaded %d persistent keys from %s%s%s", len(keys) - len(orphans), db.path,
             f" ({len(skipped) + len(orphans)} skipped)" if skipped or orphans else "",
             f" ({len(missing)} missing)" if missing else "")
    if migrating:
        log.warning("%s had no manifest: built one from the %d stored keys that opened; a deletion or "
                    "rollback of a stored key from before this start cannot be detected", db.path, len(keys))
    for number, bucket in rebuilt.items():
        # Above every version its rows or the root ever had.  Without the root, the bucket's past is not
        # known (its newest row may be gone): a margin no run of commits reaches keeps versions unused.
        bucket.generation = floors[number] + (1 if root_ok else UNKNOWN_PAST)
    manifest = Manifest({**trusted, **rebuilt})
    if (rebuilt or not root_ok) and isinstance(sealer, Sealer):
        buckets, root = manifest.seal(rebuilt, sealer)
        try:
            db.write((), (), {"manifest": root}, buckets)
        except sqlite3.Error as exc:
            raise StartupError(f"cannot write the manifest to {db.path} ({exc}); refusing to start") from None
    return manifest, merged


def _open_manifest(db: Database, meta: dict[str, bytes],
                   sealer: Sealer | LegacySealer) -> tuple[dict[int, Bucket], dict[int, int], bool]:
    """The buckets that can be trusted; for the others (each reported), the generation a new copy must
    exceed; and whether the root opened."""
    try:
        generations: list[int] | None = open_root(meta.get("manifest"), sealer)
    except BadManifest as exc:
        log.error("the manifest's root %s: a bucket put back together with its rows from an older copy cannot "
                  "be seen at this start; the root is sealed again", exc)
        generations = None
    stored = db.manifest()
    trusted, floors = {}, {}
    for number in range(BUCKETS):
        expected = generations[number] if generations else 0
        try:
            bucket = open_bucket(number, stored.get(number), sealer)
        except BadManifest as exc:
            problem = str(exc)
        else:
            if generations is None or bucket.generation == expected:
                trusted[number] = bucket
                continue
            problem = f"is at generation {bucket.generation} where the root says {expected} (another copy)"
            expected = max(expected, bucket.generation)
        log.error("manifest bucket %d %s: its stored keys load unchecked (a deletion or rollback among "
                  "them cannot be seen) and it is sealed again from them", number, problem)
        floors[number] = expected
    for number in sorted(set(stored) - set(range(BUCKETS))):  # INTEGER PRIMARY KEY: ints
        log.error("the manifest holds an unknown bucket %d; ignored, left on disk", number)
    return trusted, floors, generations is not None
