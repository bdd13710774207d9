"""Peer identity: supplementary groups come from the socket (SO_PEERGROUPS), not from /proc; the
start time from /proc only while SO_PEERPIDFD shows the connecting process has not exited.

/proc/PID, read after connect(), may describe another process if the peer
exited and its pid was reused; the socket's credentials cannot.  The
real-daemon counterparts (a peer that is gone before the daemon looks) are in
test_multiuser.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import signal
import socket
import struct
import tempfile

import pytest

from keyden.server import peer


def test_parser_reads_native_uint32_gids():
    data = struct.pack("=4I", 0, 27, 1000, 0xFFFFFFFE)
    assert peer.parse_peer_groups(data) == frozenset({0, 27, 1000, 0xFFFFFFFE})
    assert peer.parse_peer_groups(b"") == frozenset()


def test_parser_refuses_a_partial_gid():
    with pytest.raises(ValueError):
        peer.parse_peer_groups(b"\x01\x00\x00\x00\x02")


def _groups_seen_by_a_peer_with(groups: list[int]) -> dict:
    """In a child with exactly ``groups``: connect a socket pair and ask what peer_of says of the other end.

    The /proc reader is made to fail in the child, so only the socket can
    have supplied the groups.
    """
    if os.geteuid() != 0:
        pytest.fail("setting supplementary groups needs root, as CI has")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setgroups(groups)

            def no_proc(_pid):
                raise AssertionError("groups were read from /proc")

            peer.supplementary_groups = no_proc
            a, b = socket.socketpair()
            who = peer.peer_of(a)
            report = {"groups": sorted(who.groups), "pid": who.pid, "mine": sorted(os.getgroups())}
        except BaseException as exc:
            report = {"error": repr(exc)}
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(report))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        data = f.read()
    os.waitpid(pid, 0)
    report = json.loads(data)
    assert "error" not in report, report["error"]
    assert report["pid"] == pid
    return report


def test_groups_come_from_the_socket():
    groups = [40001, 40002, 40003]
    report = _groups_seen_by_a_peer_with(groups)
    assert report["groups"] == report["mine"] == groups


@pytest.mark.parametrize("count", [65, 300])  # past the first buffer; past Python's 1024-byte getsockopt cap
def test_a_buffer_too_small_for_every_group_is_grown(count):
    groups = list(range(50000, 50000 + count))
    assert _groups_seen_by_a_peer_with(groups)["groups"] == groups


class _NoPeerGroups:
    """A socket on a kernel older than 4.13: SO_PEERGROUPS is an unknown option."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def getsockopt(self, level, option, size=0):
        if option == peer.SO_PEERGROUPS:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return self._sock.getsockopt(level, option, size)

    def fileno(self):
        return self._sock.fileno()


def test_without_so_peergroups_groups_fall_back_to_proc_logged_once(monkeypatch, caplog):
    peer._warn_once.cache_clear()  # as if this were the first connection
    monkeypatch.setattr(peer, "supplementary_groups", lambda pid: frozenset({pid, 7}))
    a, b = socket.socketpair()
    with a, b, caplog.at_level(logging.WARNING, logger="keyden.peer"):
        first = peer.peer_of(_NoPeerGroups(a))
        second = peer.peer_of(_NoPeerGroups(a))
    assert first.groups == second.groups == frozenset({os.getpid(), 7})
    assert len(caplog.records) == 1 and "SO_PEERGROUPS" in caplog.records[0].getMessage()


def test_other_errors_are_not_papered_over_with_proc(monkeypatch):
    class Broken(_NoPeerGroups):
        def getsockopt(self, level, option, size=0):
            if option == peer.SO_PEERGROUPS:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            return super().getsockopt(level, option, size)

    monkeypatch.setattr(peer, "supplementary_groups", lambda pid: frozenset({1}))
    a, b = socket.socketpair()
    with a, b, pytest.raises(OSError):
        peer.peer_of(Broken(a))


# ------------------------------------------------------------- start time


def _accepted_from_child(stay: bool):
    """Accept a real connection from a forked child; ``stay`` keeps the child alive (blocked reading a pipe).

    Returns (accepted socket, child pid, pipe write end or None).  A child
    that does not stay has exited and been reaped before this returns.
    """
    path = os.path.join(tempfile.mkdtemp(prefix="keyden-peer-"), "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(hold_w)
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)
            status = 0
            if stay:
                os.read(hold_r, 1)  # until the parent closes its end
        finally:
            os._exit(status)
    os.close(hold_r)
    conn, _ = listener.accept()
    listener.close()
    os.unlink(path)
    os.rmdir(os.path.dirname(path))
    if stay:
        return conn, pid, hold_w
    os.close(hold_w)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and not os.path.exists(f"/proc/{pid}")
    return conn, pid, None


def test_a_live_peer_gets_its_real_start_time():
    conn, pid, hold = _accepted_from_child(stay=True)
    try:
        with conn:
            who = peer.peer_of(conn)
            expected = peer.process_start_time(pid)
    finally:
        os.close(hold)
        os.waitpid(pid, 0)
    assert expected is not None and expected > 0
    assert who.pid == pid and who.start_time == expected and who.process == (pid, expected)
    assert who.exe == os.path.realpath(sys.executable)  # the forked child runs this interpreter


def test_a_peer_gone_before_the_daemon_looks_gets_no_start_time(monkeypatch):
    """/proc/<pid> is made to describe another live process (ours), as if the pid had been reused.

    The pidfd still names the process that connected, which has exited: the
    start time read from /proc is not its, so the peer gets none, and no
    process keyring.
    """
    conn, pid, _ = _accepted_from_child(stay=False)
    real = peer.process_start_time
    monkeypatch.setattr(peer, "process_start_time", lambda _pid: real(os.getpid()))
    monkeypatch.setattr(peer, "executable", lambda _pid: "/usr/bin/someone-else")  # the reused pid's program
    with conn:
        who = peer.peer_of(conn)
    assert who.pid == pid
    assert who.start_time == peer.UNKNOWN_START and who.process is None
    assert who.exe is None  # nor is the other process's program put in the audit log as the caller's


def test_a_peer_that_exited_but_is_not_reaped_gets_no_start_time():
    """A zombie still has /proc/<pid>/stat, but it has exited: it will never make another call."""
    conn, pid, hold = _accepted_from_child(stay=True)
    os.kill(pid, signal.SIGKILL)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited; left a zombie
    try:
        assert peer.process_start_time(pid) is not None
        with conn:
            assert peer.peer_of(conn).start_time == peer.UNKNOWN_START
    finally:
        os.close(hold)
        os.waitpid(pid, 0)


def test_the_pidfd_is_closed():
    a, b = socket.socketpair()
    before = set(os.listdir("/proc/self/fd"))
    with a, b:
        for _ in range(3):
            peer.peer_of(a)
        assert set(os.listdir("/proc/self/fd")) == before


class _NoPeerPidfd(_NoPeerGroups):
    """A socket on a kernel older than 6.5: SO_PEERPIDFD is an unknown option."""

    def getsockopt(self, level, option, size=0):
        if option == peer.SO_PEERPIDFD:
            raise OSError(errno.ENOPROTOOPT, os.strerror(errno.ENOPROTOOPT))
        return self._sock.getsockopt(level, option, size)


def test_without_so_peerpidfd_start_time_falls_back_to_proc_logged_once(caplog):
    peer._warn_once.cache_clear()  # as if this were the first connection
    a, b = socket.socketpair()
    with a, b, caplog.at_level(logging.WARNING, logger="keyden.peer"):
        first = peer.peer_of(_NoPeerPidfd(a))
        second = peer.peer_of(_NoPeerPidfd(a))
    assert first.start_time == second.start_time == peer.process_start_time(os.getpid())
    assert len(caplog.records) == 1 and "SO_PEERPIDFD" in caplog.records[0].getMessage()


def test_a_proc_that_cannot_be_read_is_no_exit(monkeypatch):
    """Out of descriptors, /proc/<pid>/stat cannot be opened: that says nothing about the process.  It was
    taken for an exit, and a live process's @p was collected with its keys (by the exit watcher at once,
    by the sweep at its next round)."""
    import builtins

    me = (os.getpid(), peer.process_start_time(os.getpid()))
    real_open = builtins.open

    def no_descriptors(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_descriptors)
    assert peer.process_alive(*me)
    with pytest.raises(OSError):  # the exit watcher leaves it to the sweep
        peer.open_pidfd(me)
    monkeypatch.setattr(builtins, "open", real_open)
    assert peer.process_alive(*me) and peer.open_pidfd((me[0], me[1] + 1)) is None  # another start: not ours


def test_the_uid_alone_is_had_even_from_a_peer_that_is_gone():
    """What a refused connection's descriptors are charged to (descriptors: each uid's share of the
    closers): its uid from SO_PEERCRED, with no /proc to read; a socket that cannot say is NOBODY's."""
    from keyden import descriptors

    conn, _pid, _ = _accepted_from_child(stay=False)
    with conn:
        assert peer.uid_of(conn) == os.getuid()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # no peer credentials at all
        assert peer.uid_of(udp) == descriptors.NOBODY
