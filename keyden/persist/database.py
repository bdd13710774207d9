"""The SQLite file: WAL mode, every commit synced (synchronous=FULL), one connection behind a lock.

Three tables: ``meta`` (name -> value: source, salt, check value),
``keys`` (one row per persisted key, see ``records``) and ``manifest`` (the
sealed list of rows and their versions, in buckets, see ``manifest``).  A
write is one transaction holding whole operations, rows and manifest
together, so a crash leaves either all of an operation's changes or none.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import stat
from typing import Iterable, Iterator

from keyden.errors import StartupError
from keyden.persist.files import make_dirs, require_own, require_safe_directory
from keyden.persist.records import COLUMNS, Row, read_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    serial INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    description TEXT NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    perm INTEGER NOT NULL,
    expiry REAL NOT NULL,
    flags INTEGER NOT NULL,
    version INTEGER NOT NULL,
    revoked_at REAL,
    ctime REAL NOT NULL,
    quota_len INTEGER NOT NULL,
    sealed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS manifest (bucket INTEGER PRIMARY KEY, sealed BLOB NOT NULL);
"""
_TABLES = frozenset({"meta", "keys", "manifest"})
#: The layout of tables and rows this code reads and writes, kept in SQLite's user_version.  A store of a
#: newer format is refused before anything is written to it: an older keyden must not take a newer one's
#: rows for damaged ones.  1: this layout (0: a store from before the number was kept); 2: rows whose flags
#: bind an asymmetric key to its uses (flags.ASYMMETRIC_USE), which a keyden reading format 1 would load
#: unbound; 3: every blob sealed under a key of its own (master.Sealer), which no keyden reading format 1
#: or 2 opens.  This code writes format 3 only: its first write numbers the store (a store of format 1 or
#: 2 is re-sealed at start, persist.open_durable), and no number is ever lowered.
STORE_FORMAT = 3
WAL_PAGES = 64  # pages in the WAL before a commit copies them into the database
_UPSERT = f"INSERT OR REPLACE INTO keys ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Database:
    def __init__(self, path: str):
        self.path = path
        _create_private(path)
        self._lock_fd = _lock(path)
        self.conn: sqlite3.Connection | None = None
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.text_factory = read_text  # a text column that is not UTF-8 is one row's problem
            mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StartupError(f"{path}: cannot switch to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed: no old seal lingers in them
            # Each change writes a few pages to the WAL; at SQLite's default (1000 pages) a young store lived
            # in its -wal file alone, and a lost or damaged -wal took every key (a start then found a new,
            # empty database).  Copied into the database every 64 pages, it holds all but the last few.
            self.conn.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            verdict = self.conn.execute("PRAGMA quick_check").fetchone()[0]
            if verdict != "ok":
                verdict = " ".join(verdict.split())  # (SQLite's is several lines: the start's error is one)
                raise StartupError(f"{path} is damaged ({verdict}); refusing to start")
            stored = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if stored > STORE_FORMAT:
                raise StartupError(f"{path} was written by a newer keyden (store format {stored}; this one "
                                   f"reads format {STORE_FORMAT}): run that version, or one that reads it")
            listed = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            self._tables = {name for (name,) in listed}
            if "keys" not in self._tables:  # a new store: nothing in it to keep as it was
                self.conn.executescript(SCHEMA)
                self._tables = set(_TABLES)
            self._format = stored  # numbered, and an older store's tables completed, by the first write: opening
            #                        writes nothing (a store kept as a way back stays as that version left it)
        except sqlite3.DatabaseError as exc:
            self._give_up()
            raise StartupError(f"{path} is not a usable key database: {exc}") from None
        except BaseException:
            self._give_up()
            raise

    def _give_up(self) -> None:
        """A refused store: its connection closed now, before the lock (a connection left to the garbage
        collector would close later, under whoever holds the store by then, and tidy its WAL away)."""
        if self.conn is not None:
            self.conn.close()
        os.close(self._lock_fd)

    def close(self) -> None:
        self.conn.close()
        os.close(self._lock_fd)

    def meta(self) -> dict[str, bytes]:
        """Values keyden wrote (blobs); another kind (edited outside keyden) counts as missing, which
        refuses the start or is reported, as the value it replaced would be if deleted."""
        if "meta" not in self._tables:  # (a table dropped outside keyden: the start says what is missing)
            return {}
        return {name: value for name, value in self.conn.execute("SELECT name, value FROM meta")
                if isinstance(value, bytes)}

    def is_empty(self) -> bool:
        return self.conn.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is None

    def rows(self) -> Iterator[Row]:
        """Every stored row, as stored (types unchecked: ``records.open_row`` judges them)."""
        for values in self.conn.execute(f"SELECT {', '.join(COLUMNS)} FROM keys ORDER BY rowid"):
            yield Row(*values)

    def manifest(self) -> dict[int, object]:
        """Bucket number -> sealed bucket, as stored (``manifest.open_bucket`` judges them); none in a store
        from before the manifest."""
        return dict(self.conn.execute("SELECT bucket, sealed FROM manifest")) if "manifest" in self._tables else {}

    def write(self, upserts: Iterable[Row], deletes: Iterable[int], meta: dict[str, bytes] | None = None,
              buckets: dict[int, bytes] | None = None) -> None:
        """One transaction (rows, manifest buckets and meta together); on disk (WAL synced) when this returns."""
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            if self._tables < _TABLES:  # (a store from before the manifest: its table, in the same transaction)
                for statement in filter(str.strip, SCHEMA.split(";")):
                    cur.execute(statement)
            cur.executemany("DELETE FROM keys WHERE serial = ?", [(s,) for s in deletes])
            cur.executemany(_UPSERT, [tuple(getattr(r, c) for c in COLUMNS) for r in upserts])
            if buckets:
                cur.executemany("INSERT OR REPLACE INTO manifest (bucket, sealed) VALUES (?, ?)",
                                list(buckets.items()))
            if meta:
                cur.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", list(meta.items()))
            if self._format != STORE_FORMAT:
                cur.execute(f"PRAGMA user_version = {STORE_FORMAT}")
            cur.execute("COMMIT")
            self._format = STORE_FORMAT
            self._tables |= _TABLES
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def checkpoint(self) -> None:
        """Copy the WAL into the database and empty it: rows overwritten before this leave no old version
        behind in either file (after a rekey, nothing sealed under the old master key stays on disk)."""
        busy, _log, _done = self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise sqlite3.OperationalError("the WAL checkpoint could not complete (a reader held it)")


def _lock(path: str) -> int:
    """One process at a time: two daemons (or a daemon and `keyden init`) writing one store would each
    seal a manifest the other's rows do not match.  flock(2) on a descriptor of our own, held until close;
    SQLite's own locks are fcntl(2) locks, which flock does not touch."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StartupError(f"the key database {path} is in use by another process (a running keyden, or "
                           "keyden init); refusing to open it twice") from None
    return fd


def _create_private(path: str) -> None:
    """Make the file 0600 before SQLite does (its -wal and -shm files copy the database's mode).

    An existing database, -wal or -shm file must be the daemon's own and private to it: it is
    refused otherwise (``require_own``), as is a directory others could swap the files in
    (``require_safe_directory``).
    """
    require_safe_directory(path, "key database")
    try:
        make_dirs(os.path.dirname(os.path.abspath(path)))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot open the key database {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"the key database {path} is not a regular file")
        require_own(path, st, "key database")
    finally:
        os.close(fd)
    for side in (path + "-wal", path + "-shm"):
        try:
            st = os.lstat(side)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StartupError(f"cannot examine {side}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise StartupError(f"the key database's {side} is not a regular file")
        require_own(side, st, "key database file")
