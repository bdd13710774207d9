"""Durable persistent keyrings: a sealed SQLite store behind the key store's journal.

``open_durable`` runs at start-up, before the daemon listens: it finds the
master key (refusing to start without the right one), loads every stored key
back into the KeyStore with its serial, and attaches the journal that keeps
the store and the database in step from then on.  See docs/persistence.md.
"""

from __future__ import annotations

import logging
import os

from keyden.core.store import KeyStore
from keyden.persist import records
from keyden.persist.database import Database
from keyden.persist.journal import SealedJournal
from keyden.persist.master import PASSPHRASE_ENV, Sealer, StartupError, source_for

__all__ = ["open_durable", "SealedJournal", "StartupError", "PASSPHRASE_ENV", "paths"]

log = logging.getLogger("keyden.persist")


def paths(config) -> tuple[str, str]:
    """(database, master key file) for a ServerConfig: its settings, else files in the state directory."""
    return (config.db_path or os.path.join(config.state_dir, "keys.db"),
            config.master_key_file or os.path.join(config.state_dir, "master.key"))


def open_durable(config, store: KeyStore) -> SealedJournal:
    """Open (or create) the store, load it into ``store`` and attach its journal; StartupError if it must not run."""
    db_path, key_path = paths(config)
    source = source_for(key_path, config.passphrase_file, config.master_key_kernel)
    db = Database(db_path)
    try:
        meta = db.meta()
        if "check" not in meta:
            if not db.is_empty():
                raise StartupError(f"{db_path} holds keys but no master key check; refusing to start")
            sealer = source.create()
            db.write((), (), dict(source.meta(), source=source.source.encode(), check=source.check(sealer)))
            versions: dict[int, int] = {}
            log.info("new key store %s (master key: %s)", db_path, _describe(source.source, key_path))
        else:
            stored = meta.get("source", b"").decode(errors="replace")
            if stored != source.source:
                raise StartupError(_mismatch(db_path, stored))
            sealer = source.open(meta["check"], meta)
            versions = _load(db, sealer, store)
    except BaseException:
        db.close()
        raise
    journal = SealedJournal(store, db, sealer, source, versions)
    store.journal = journal
    return journal


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


def _load(db: Database, sealer: Sealer, store: KeyStore) -> dict[int, int]:
    """Every row that authenticates becomes a key again; the others are reported (never their contents)."""
    keys, links, roots, versions = [], [], [], {}
    skipped: list[int] = []
    for row in db.rows():
        try:
            key, members = records.open_row(row, sealer)
        except records.Unusable as exc:
            log.error("stored key %.20r skipped: %s", row.serial, exc)
            skipped.append(row.serial)  # an INTEGER PRIMARY KEY: always an int; reserved, never overwritten
            continue
        keys.append(key)
        versions[key.serial] = row.version
        links += [(key.serial, member) for member in members]
        if row.flags & records.ROOT:
            roots.append(key.serial)
    orphans = store.restore(keys, links, roots, skipped)
    for serial in orphans:
        log.error("stored key %d skipped: it is under no persistent keyring any more", serial)
    log.info("loaded %d persistent keys from %s%s", len(keys) - len(orphans), db.path,
             f" ({len(skipped) + len(orphans)} skipped)" if skipped or orphans else "")
    return versions
