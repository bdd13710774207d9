"""Durability under SIGKILL: whatever the daemon acknowledged is there after it is killed and restarted.

Two clients add keys into a persistent keyring (directly, into a keyring
nested under it, and by adding to the session keyring then linking) as
fast as they can while the daemon is killed with SIGKILL at random moments.
After every restart each key whose add (and link) returned success must be
present with its payload, and the store must have opened without
complaint.  Operations cut off mid-flight may go either way.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import threading
import time

import keyden

KILLS = 20
BUDGET = 30.0  # seconds: the loop stops early rather than run away on a slow machine
MIN_KILLS = 10


def _session(daemon):
    with daemon.connect() as boot:
        _serial, token = boot.join_session()
    return daemon.connect(session=token)


def _hammer(daemon, persistent: int, nested: int, tag: str, acked: dict, stop: threading.Event) -> None:
    """Add and link until the connection dies; record (serial -> payload) only for acknowledged keys."""
    try:
        client = _session(daemon)
        client.get_persistent("@s")  # possess the persistent keyring through this session
    except keyden.KeydenError:
        return
    i = 0
    try:
        while not stop.is_set():
            i += 1
            payload = os.urandom(24) + f"{tag}-{i}".encode()
            way = i % 3
            if way == 0:
                serial = client.add("user", f"{tag}-direct-{i}", payload, persistent)
            elif way == 1:
                serial = client.add("user", f"{tag}-nested-{i}", payload, nested)
            else:
                serial = client.add("user", f"{tag}-linked-{i}", payload, "@s")
                client.link(serial, persistent)  # acknowledged only once the link returned
            acked[serial] = payload
    except keyden.KeydenError:
        return  # the daemon died under us
    finally:
        client.close()


def test_acknowledged_keys_survive_sigkill(fresh_daemon):
    rng = random.Random(0x5EED)
    d = fresh_daemon()
    setup = _session(d)
    persistent = setup.get_persistent("@s")
    nested = setup.newring("nested", persistent)
    setup.close()
    acked: dict[int, bytes] = {}
    kills = 0
    started = time.monotonic()
    log_mark = len(d.read_log())
    while kills < KILLS and time.monotonic() - started < BUDGET:
        stop = threading.Event()
        workers = [threading.Thread(target=_hammer, args=(d, persistent, nested, f"w{n}k{kills}", acked, stop))
                   for n in range(2)]
        for w in workers:
            w.start()
        time.sleep(rng.uniform(0.02, 0.4))
        d.stop(signal.SIGKILL)
        kills += 1
        stop.set()
        for w in workers:
            w.join(10)
        d.start()

        # Every acknowledged key, with its payload, and the store opened cleanly.
        check = _session(d)
        assert check.get_persistent("@s") == persistent
        assert nested in check.read(persistent)
        serials = list(acked)
        found = check.call_many([("read", (serial,)) for serial in serials])  # one round trip
        lost = [s for s, got in zip(serials, found) if got != acked[s]]
        assert not lost, f"{len(lost)} acknowledged keys lost or changed after kill {kills}: {lost[:5]}"
        check.close()
        log = d.read_log()[log_mark:]
        log_mark += len(log)
        assert "ERROR keyden.persist" not in log and "loaded" in log, log

    print(f"{kills} kills, {len(acked)} keys acknowledged in {time.monotonic() - started:.1f} s")
    assert kills >= MIN_KILLS, f"only {kills} kills in {BUDGET} s"
    assert len(acked) > 10 * kills, f"only {len(acked)} keys acknowledged across {kills} kills"
    d.stop()
    db = sqlite3.connect(os.path.join(d.state_dir, "keys.db"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {row[0] for row in db.execute("SELECT serial FROM keys")}
    finally:
        db.close()
    assert set(acked) <= stored


def test_a_lost_wal_loses_at_most_its_last_pages_never_the_store(fresh_daemon):
    """The store lived in keys.db-wal alone until SQLite's checkpoint at 1000 pages (~160 changes): killed,
    then the -wal file lost or damaged, every key was gone, and the next start made a new, empty store
    over the old one.  Now the store is in keys.db from its first start, and the WAL is copied into it
    every 64 pages."""
    from keyden.persist.database import WAL_PAGES

    d = fresh_daemon()
    with _session(d) as c:
        persistent = c.get_persistent("@s")
        added = {c.add("user", f"w{i}", os.urandom(32), persistent): i for i in range(40)}
    d.stop(signal.SIGKILL)
    wal = os.path.join(d.state_dir, "keys.db-wal")
    assert os.path.getsize(wal) < (WAL_PAGES + 8) * 4200  # copied into keys.db as it grew
    os.unlink(wal)
    log_mark = len(d.read_log())
    d.start()
    with _session(d) as c:
        assert c.get_persistent("@s") == persistent  # the same store, not a new one
        kept = [serial for serial in c.read(persistent) if serial in added]
    assert len(kept) >= 20 and sorted(added[serial] for serial in kept) == list(range(len(kept)))  # the first ones
    assert "is new" not in d.read_log()[log_mark:]
