"""Peer identity: supplementary groups come from the socket (SO_PEERGROUPS), not from /proc.

/proc/PID/status, read after connect(), may describe another process if the
peer exited and its pid was reused; the socket's credentials cannot.  The
real-daemon counterpart (a peer that is gone before the daemon looks) is in
test_multiuser.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct

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
    monkeypatch.setattr(peer, "_fallback_logged", type(peer._fallback_logged)())
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
