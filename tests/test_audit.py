"""The audit log, read back from a real daemon: who did what to which key, how it ended, and never a secret."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from keyden import errors as E

SECRET = b"kd-AUDIT-SECRET-payload-7f3a"
DESCRIPTION = "kd-audit-description-91c2"
NO_SUCH_KEY = 0x7FFFFFF0


def audit_lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def mine(lines: list[dict]) -> list[dict]:
    return [rec for rec in lines if rec["pid"] == os.getpid()]


def test_every_operation_is_recorded_with_caller_keys_and_result(fresh_daemon):
    d = fresh_daemon()  # the default: <state_dir>/audit.log
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        serial = c.add("user", DESCRIPTION, SECRET, "@s")
        assert c.read(serial) == SECRET
        c.describe(serial)
        with pytest.raises(E.ENOKEY):
            c.read(NO_SUCH_KEY)
        ring = c.newring("kd-audit-ring", "@s")
        c.link(serial, ring)
        # The lines are on disk as soon as the reply is: no flush, no shutdown needed.
        records = mine(audit_lines(log_path))[-7:]  # (before these: the fixture's start-up probe)
    assert [r["op"] for r in records] == ["hello", "add", "read", "describe", "read", "add", "link"]
    hello, add, read, describe, missing, newring, link = records
    assert hello["result"] == "ok" and hello["keys"] == []
    assert add == {**add, "keys": [-3], "serial": serial, "result": "ok"}
    assert (read["keys"], read["result"]) == ([serial], "ok")
    assert describe["keys"] == [serial]
    assert (missing["keys"], missing["result"]) == ([NO_SUCH_KEY], "ENOKEY")
    assert link["keys"] == [serial, ring] and newring["serial"] == ring
    for rec in records:
        assert (rec["uid"], rec["gid"]) == (os.getuid(), os.getgid())
        assert rec["exe"] == os.path.realpath(sys.executable)
        assert isinstance(rec["ts"], float)


def test_a_streams_lines_name_its_key(fresh_daemon):
    """STREAM_UPDATE/FINAL/ABORT name a stream by its handle: their lines carry the stream's key (they
    said "keys": [] even when the key had been revoked under them)."""
    d = fresh_daemon()
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        key = c.add("logon", "audit:stream", os.urandom(32), "@s")
        with c.stream("gcm(aes)", key, iv=os.urandom(12)) as stream:
            stream.update(b"data")
            stream.finalize()
        with c.stream("gcm(aes)", key, iv=os.urandom(12)) as stream:
            c.revoke(key)
            with pytest.raises(E.EKEYREVOKED):
                stream.update(b"data")
        c.hash().finalize(b"no key")
        with c.stream("ctr(aes)", c.add("logon", "audit:ctr", os.urandom(32), "@s"), iv=bytes(16)) as aborted:
            pass
        records = [r for r in mine(audit_lines(log_path)) if r["op"].startswith("stream_")]
    assert [(r["op"], r["keys"], r["result"]) for r in records] == [
        ("stream_init", [key], "ok"), ("stream_update", [key], "ok"), ("stream_final", [key], "ok"),
        ("stream_init", [key], "ok"), ("stream_update", [key], "EKEYREVOKED"),
        ("stream_abort", [], "EBADF"),  # the revoked key closed it; the with-block's abort finds nothing
        ("stream_init", [], "ok"), ("stream_final", [], "ok"),
        ("stream_init", [records[-2]["keys"][0]], "ok"), ("stream_abort", [records[-2]["keys"][0]], "ok")]
    assert aborted.done


def test_no_key_material_descriptions_or_data_ever_reach_the_audit_log(fresh_daemon):
    d = fresh_daemon()
    with d.connect() as c:
        serial = c.add("user", DESCRIPTION, SECRET, "@s")
        c.read(serial)
        c.update(serial, SECRET + b"-2")
        aes = c.add("logon", "kd:audit-aes", b"K" * 32, "@s")
        sealed = c.cipher("gcm(aes)", aes, SECRET, random_nonce=True)
        assert c.cipher("gcm(aes)", aes, sealed, decrypt=True, random_nonce=True) == SECRET
        signer = c.generate("ed25519", DESCRIPTION + "-signer")
        c.pkey_sign(signer, "", SECRET)
        c.ping(SECRET)  # not recorded at all (a liveness probe), let alone its data
    with open(os.path.join(d.state_dir, "audit.log"), "rb") as f:
        text = f.read()
    assert text.count(b"\n") >= 9
    for forbidden in (SECRET, SECRET.hex().encode(), DESCRIPTION.encode(), b"K" * 16, sealed[-16:]):
        assert forbidden not in text


def test_stderr_and_off(fresh_daemon):
    loud = fresh_daemon('audit = "stderr"\n')
    with loud.connect() as c:
        c.add("user", "kd-audit-stderr", b"x", "@s")
    lines = [json.loads(line) for line in loud.read_log().splitlines() if line.startswith('{"ts"')]
    assert "add" in [r["op"] for r in mine(lines)]
    assert not os.path.exists(os.path.join(loud.state_dir, "audit.log"))

    quiet = fresh_daemon('audit = "off"\n')
    with quiet.connect() as c:
        c.add("user", "kd-audit-off", b"x", "@s")
    assert not os.path.exists(os.path.join(quiet.state_dir, "audit.log"))
    assert '"op"' not in quiet.read_log()


def test_an_absolute_path_and_refused_connections(fresh_daemon, tmp_path):
    path = tmp_path / "elsewhere.log"
    d = fresh_daemon(f'audit = "{path}"\nmax_connections_per_uid = 1\n')
    for _ in range(100):  # the start-up probe's connection may still be counted for a moment
        try:
            first = d.connect()
            break
        except E.EMFILE:
            time.sleep(0.05)
    with first as c:
        c.whoami()
        with pytest.raises(E.EMFILE):
            d.connect()
    records = mine(audit_lines(path))
    assert [(r["op"], r["result"]) for r in records][-1] == ("hello", "EMFILE")
    assert ("whoami", "ok") in [(r["op"], r["result"]) for r in records]
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_the_file_is_rotated_at_its_size_cap_and_lines_never_interleave(fresh_daemon):
    d = fresh_daemon("audit_max_bytes = 20000\n")
    log_path = os.path.join(d.state_dir, "audit.log")
    errors = []

    def hammer():
        try:
            with d.connect() as c:
                for _ in range(150):
                    c.whoami()
        except Exception as exc:  # reported below: a thread's failure must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    current, rotated = audit_lines(log_path), audit_lines(log_path + ".1")  # every line whole JSON
    assert os.path.getsize(log_path) < 20000 + 4096 and os.path.getsize(log_path + ".1") < 20000 + 4096
    assert {r["op"] for r in current + rotated} <= {"hello", "whoami"}
    assert len(current) + len(rotated) < 600  # older lines were dropped with the older file


def test_a_ping_is_not_recorded(fresh_daemon):
    d = fresh_daemon()
    with d.connect() as c:
        c.ping(b"")
        c.whoami()  # the last line, written before its reply
    ops = [r["op"] for r in mine(audit_lines(os.path.join(d.state_dir, "audit.log")))]
    assert ops[-2:] == ["hello", "whoami"] and "ping" not in ops


def test_a_flush_on_another_thread_never_lets_the_loop_reply_before_the_lines_it_took(tmp_path, monkeypatch):
    """The loop sends a round's replies once ``holding`` is false; a TLS outcome's flush on another thread
    takes the loop's held lines too, so until they are written the loop must still see them as held."""
    import threading
    from keyden.server.audit import AuditLog
    audit = AuditLog.open("audit.log", str(tmp_path))
    audit.hold()
    audit.write(b"the loop's line\n")
    writing, release = threading.Event(), threading.Event()
    real_write = audit._write

    def slow_write(line):
        writing.set()
        release.wait(5)
        real_write(line)
    monkeypatch.setattr(audit, "_write", slow_write)
    other = threading.Thread(target=audit.flush)  # e.g. record_now on the TLS engine's thread
    other.start()
    assert writing.wait(5)
    assert audit.holding  # taken, not yet written: the loop must flush (and so wait) before replying
    release.set()
    audit.flush()  # the loop's own flush: returns once the other thread's write is done
    assert (tmp_path / "audit.log").read_bytes() == b"the loop's line\n"
    other.join(5)
