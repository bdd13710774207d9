"""The audit log, read back from a real daemon: who did what to which key, how it ended, and never a secret."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import threading
import time

import pytest

from keyden import errors as E
from keyden.server import audit as audit_module
from keyden.server.audit import AuditLog

from tests.conftest import Daemon

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


def test_a_keys_listing_names_no_key_its_page_starts_after(fresh_daemon):
    """KEYS' cursor is a serial to list after, not a key used: the line's keys stay empty."""
    d = fresh_daemon()
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        serial = c.add("user", DESCRIPTION, SECRET, "@s")
        c.keys_page(serial)
        records = mine(audit_lines(log_path))
    assert (records[-1]["op"], records[-1]["keys"], records[-1]["result"]) == ("keys", [], "ok")


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
        ("stream_init", [key], "ok"), ("stream_update", [key], "EKEYREVOKED"),  # which closed it: no abort follows
        ("stream_init", [], "ok"), ("stream_final", [], "ok"),
        ("stream_init", [records[-2]["keys"][0]], "ok"), ("stream_abort", [records[-2]["keys"][0]], "ok")]
    assert aborted.done


def test_a_stream_copys_lines_name_its_key(fresh_daemon):
    """STREAM_COPY names a stream by its handle too: its line, and the copy's own, carry the stream's key,
    refused copies included."""
    d = fresh_daemon()
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        key = c.add("logon", "audit:copy", os.urandom(32), "@s")
        with c.hmac(key).stream() as stream:
            stream.copy().finalize(b"the copy's")
            c.revoke(key)
            with pytest.raises(E.EKEYREVOKED):
                stream.copy()
        c.hash().copy().finalize()
        records = [r for r in mine(audit_lines(log_path)) if r["op"].startswith("stream_")]
    assert [(r["op"], r["keys"], r["result"]) for r in records] == [
        ("stream_init", [key], "ok"), ("stream_copy", [key], "ok"), ("stream_final", [key], "ok"),
        ("stream_copy", [key], "EKEYREVOKED"),
        ("stream_abort", [], "EBADF"),  # the revoked key closed it; the with-block's abort finds nothing
        ("stream_init", [], "ok"), ("stream_copy", [], "ok"), ("stream_final", [], "ok")]


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


# ------------------------------------------------- a file moved, deleted, cut short, opened to others

def held_audit_files(d) -> list[str]:
    """What the daemon's descriptors point at that looks like an audit file ("... (deleted)" if unlinked)."""
    fd_dir = f"/proc/{d.proc.pid}/fd"
    held = []
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:  # closed meanwhile
            continue
        if "audit" in target or "moved" in target:
            held.append(target)
    return held


def whoami_until(c, done, seconds: float = 10.0) -> None:
    """Requests (each one an audit line) until ``done()``; the daemon looks at its path about once a second."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "the daemon never reopened its audit path"
        c.whoami()
        time.sleep(0.05)


def test_a_deleted_log_is_started_anew_not_grown_unseen(fresh_daemon):
    """rm audit.log audit.log.1 without SIGHUP: the next rotation (or the next look at the path) starts a
    new file there.  It failed with ENOENT at every rotation while the deleted file grew without bound."""
    d = fresh_daemon("audit_max_bytes = 4096\n")
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        for _ in range(40):
            c.whoami()
        assert os.path.exists(log_path + ".1")
        os.unlink(log_path)
        os.unlink(log_path + ".1")
        for _ in range(60):  # over 4096 bytes of lines: at least one rotation
            c.whoami()
        whoami_until(c, lambda: os.path.exists(log_path))
        c.whoami()
    assert mine(audit_lines(log_path))[-1]["op"] == "whoami"
    assert not [f for f in held_audit_files(d) if f.endswith("(deleted)")]
    assert "rotation failed" not in d.read_log()


def test_a_line_a_full_disk_cut_short_before_a_restart_is_ended_before_the_next(tmp_path):
    """The daemon the disk stopped left `..."exe":` with no line break: the next start's first line was
    glued to it, and lost too (found by an operator walk)."""
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"ts": 1, "op": "add"}\n{"ts": 2, "op": "re')
    path.chmod(0o600)
    log = AuditLog.open(str(path), str(tmp_path))
    log.write(b'{"ts": 3, "op": "hello"}\n')
    log.close()
    assert path.read_bytes().splitlines()[-1] == b'{"ts": 3, "op": "hello"}'


def test_a_reopen_that_fails_is_not_reported_as_done(fresh_daemon):
    """SIGHUP with a file at the path the daemon may not open: it said the audit log was reopened, lines
    went on to the rotated file (found by an operator walk)."""
    d = fresh_daemon('audit = "audit.log"\n')
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        c.whoami()
        os.rename(log_path, log_path + ".1")
        os.mkdir(log_path)  # what stands at the path now cannot be opened for writing
        d.proc.send_signal(signal.SIGHUP)
        whoami_until(c, lambda: "reopen failed" in d.read_log())
    log = d.read_log()
    assert "writing on to the file we hold" in log and "SIGHUP: audit log" not in log


def test_a_log_moved_away_without_sighup_is_followed_by_a_new_file(fresh_daemon, tmp_path):
    """logrotate without the reload (and audit_max_bytes = 0): the moved file keeps what was written before,
    a new file at the path takes the rest, within about a second."""
    d = fresh_daemon("audit_max_bytes = 0\n")
    log_path = os.path.join(d.state_dir, "audit.log")
    moved = os.path.join(d.state_dir, "moved.log")
    with d.connect() as c:
        c.whoami()
        os.rename(log_path, moved)
        whoami_until(c, lambda: os.path.exists(log_path))
        c.add("user", "kd-audit-after-move", b"x", "@s")
    assert mine(audit_lines(log_path))[-1]["op"] == "add"
    assert "whoami" in [r["op"] for r in mine(audit_lines(moved))]  # every line whole in both
    assert held_audit_files(d) == [log_path]
    assert oct(os.stat(log_path).st_mode & 0o777) == "0o600"


def test_a_new_file_put_at_the_path_is_taken_over_and_made_private(fresh_daemon):
    """logrotate's `create 0644` after the move: the daemon writes to the new file, and makes it 0600."""
    d = fresh_daemon("audit_max_bytes = 0\n")
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        c.whoami()
        os.rename(log_path, log_path + ".old")
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.fchmod(fd, 0o644)
        os.close(fd)
        whoami_until(c, lambda: os.path.getsize(log_path) > 0)
    assert mine(audit_lines(log_path))[-1]["op"] == "whoami"
    assert oct(os.stat(log_path).st_mode & 0o777) == "0o600"


def test_an_existing_log_open_to_others_is_made_0600(fresh_daemon, tmp_path):
    """A file chmod 644 (by hand, or by a logrotate `create` line) would hand every user's activity to any
    local user: at start, and whenever the path is reopened (SIGHUP), it is made 0600 again."""
    path = tmp_path / "open.log"
    path.write_text('{"ts": 1.0}\n')
    path.chmod(0o644)
    d = fresh_daemon(f'audit = "{path}"\n')
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert "had mode 0644" in d.read_log()
    path.chmod(0o640)
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while os.stat(path).st_mode & 0o077:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with d.connect() as c:
        c.whoami()
    assert audit_lines(path)[0] == {"ts": 1.0}  # appended to, never truncated


def test_a_log_owned_by_another_uid_refuses_the_start(tmp_path):
    """As with the key database and master key: a file someone else owns is not written to; one line says why."""
    path = tmp_path / "foreign.log"
    path.write_text("")
    os.chown(path, 65534, 65534)
    d = Daemon(f'audit = "{path}"\n')
    try:
        with pytest.raises(RuntimeError, match="exited early"):
            d.start()
        assert d.proc.wait(10) == 1
        log = d.read_log()
        assert f"keyden: not starting: the audit log {path} is owned by uid 65534, not the daemon's uid " \
               f"{os.geteuid()}; refusing to start" in log
        assert "Traceback" not in log
    finally:
        d.cleanup()


def test_a_foreign_file_at_the_path_is_never_written_to(tmp_path, monkeypatch, caplog):
    """After a move, a file of another uid's at the path is left alone: lines go on to the file we hold."""
    monkeypatch.setattr(audit_module, "PATH_CHECK_INTERVAL", 0.0, raising=False)
    audit = AuditLog.open("audit.log", str(tmp_path))
    audit.write(b'{"n": 1}\n')
    os.rename(tmp_path / "audit.log", tmp_path / "ours.log")
    (tmp_path / "audit.log").write_text("")
    os.chown(tmp_path / "audit.log", 65534, 65534)
    with caplog.at_level(logging.ERROR, logger="keyden.audit"):
        audit.write(b'{"n": 2}\n')
        audit.write(b'{"n": 3}\n')
    audit.close()
    assert (tmp_path / "audit.log").read_bytes() == b""
    assert (tmp_path / "ours.log").read_bytes() == b'{"n": 1}\n{"n": 2}\n{"n": 3}\n'
    assert len(caplog.records) == 1 and "owned by uid 65534" in caplog.text  # throttled


class Disk:
    """os.write for one descriptor as a filling disk does it: ``room`` bytes more (a short write), then
    ENOSPC; ``room = None`` has space again.  ``per_call`` caps each write (a signal cutting one short)."""

    def __init__(self, monkeypatch, fd: int, per_call: int | None = None):
        self.fd, self.room, self.per_call = fd, None, per_call
        self._write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def write(self, fd, data):
        if fd != self.fd:
            return self._write(fd, data)
        data = bytes(data)[: self.per_call]
        if self.room is None:
            return self._write(fd, data)
        if not self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = self._write(fd, data[: self.room])
        self.room -= n
        return n


def line(n: int) -> bytes:
    return json.dumps({"ts": n, "op": "whoami", "keys": []}).encode() + b"\n"


def test_a_write_the_disk_cuts_short_never_runs_two_lines_together(tmp_path, monkeypatch, caplog):
    """A full disk takes part of a batch: the rest is dropped, the next write that succeeds first ends the
    torn line, and every line after it is whole JSON (they ran on: `{"ts": 17957199{"ts": ...`)."""
    audit = AuditLog.open("audit.log", str(tmp_path))
    disk = Disk(monkeypatch, audit._fd)
    audit.write(line(0))
    disk.room = len(line(1)) + 10  # line 1 and the start of line 2
    with caplog.at_level(logging.INFO, logger="keyden.audit"):
        audit.write(line(1) + line(2) + line(3))
        audit.write(line(4))  # refused whole
        audit.write(line(5))
        disk.room = None  # room again
        audit.write(line(6))
        audit.write(line(7))
    audit.close()
    text = (tmp_path / "audit.log").read_bytes()
    assert text == line(0) + line(1) + line(2)[:10] + b"\n" + line(6) + line(7)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["audit log write failed (No space left on device); lines are being lost"]  # once
    assert "4 lines were lost or cut short" in caplog.text  # 2 (cut short), 3, 4, 5


def test_a_write_cut_short_with_room_left_is_finished(tmp_path, monkeypatch):
    """A short write is not a failure: the rest follows (a signal may cut a write to a pipe short)."""
    audit = AuditLog.open("audit.log", str(tmp_path))
    Disk(monkeypatch, audit._fd, per_call=7)
    audit.write(line(1) + line(2))
    audit.write(line(3))
    audit.close()
    assert (tmp_path / "audit.log").read_bytes() == line(1) + line(2) + line(3)
