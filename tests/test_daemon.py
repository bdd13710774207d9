"""The daemon as a process: first start, socket, hardening, shutdown, and hostile clients."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields

import pytest

import keyden
from keyden import errors as E
from keyden import protocol as W
from keyden.core.store import StoreConfig
from keyden.protocol import Op
from keyden.protocol.transport import default_socket_path

from conftest import REPO, Daemon, default_hangup_and_term, eventually


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def recv_frames(s: socket.socket) -> list[W.Frame]:
    dec = W.FrameDecoder()
    frames = []
    while True:
        data = s.recv(65536)
        if not data:
            return frames
        dec.feed(data)
        frames += list(dec.frames())
        if frames:
            return frames


def test_socket_path_resolution_order():
    assert default_socket_path({"KEYDEN_SOCKET": "/a.sock", "XDG_RUNTIME_DIR": "/x"}) == "/a.sock"
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/keyden.sock"
    assert default_socket_path({}) == "/run/keyden/keyden.sock"


def test_a_client_in_a_login_session_without_its_own_daemon_uses_the_system_one(tmp_path):
    from keyden.protocol.transport import client_socket_path

    runtime, system = {"XDG_RUNTIME_DIR": str(tmp_path / "user")}, str(tmp_path / "system.sock")
    (tmp_path / "user").mkdir()
    mine = str(tmp_path / "user" / "keyden.sock")
    assert client_socket_path(runtime, system) == mine  # neither: the error will name the user's own path
    (tmp_path / "not-a-socket").write_text("")
    assert client_socket_path(runtime, str(tmp_path / "not-a-socket")) == mine  # no socket there: none
    sockets = [socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)]
    try:
        sockets[0].bind(system)
        assert client_socket_path(runtime, system) == system  # nothing in $XDG_RUNTIME_DIR: the system's
        sockets[1].bind(mine)
        assert client_socket_path(runtime, system) == mine  # a socket of the user's own
    finally:
        for s in sockets:
            s.close()
    assert client_socket_path({"KEYDEN_SOCKET": "/a.sock", **runtime}, system) == "/a.sock"  # named: as it is


def test_first_start_creates_state_and_serves_on_xdg_runtime_dir(tmp_path):
    runtime = tmp_path / "run"
    state = tmp_path / "state" / "keyden"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime), KEYDEN_STATE_DIR=str(state), PYTHONPATH=REPO)
    env.pop("KEYDEN_SOCKET", None)
    runtime.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "keyden", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        sock = runtime / "keyden.sock"
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        with keyden.connect(str(sock)) as c:
            assert c.read(c.add("user", "first", b"start", "@s")) == b"start"
        assert (state / "keyden.toml").exists()
        assert oct(state.stat().st_mode & 0o777) == "0o700"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
    assert proc.returncode == 0, out
    assert not (runtime / "keyden.sock").exists(), "graceful shutdown removes the socket"
    # root's login-session directory: other users' clients will not look there (found by an operator walk)
    assert ("in root's login-session directory" in out) == (os.geteuid() == 0), out


def test_daemon_hardens_itself(daemon):
    pid = daemon.proc.pid
    limits = open(f"/proc/{pid}/limits").read()
    assert re.search(r"Max core file size\s+0\s+0", limits)
    assert "not_dumpable=True" in daemon.read_log()
    status = open(f"/proc/{pid}/status").read()
    vmlck = int(re.search(r"VmLck:\s+(\d+)", status).group(1))
    assert vmlck > 0, "memory is locked (root may mlock)"


def _serve_refused(*args: str) -> str:
    """``keyden serve`` that must refuse to start: its one line on stderr."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "keyden", "serve", *args], env=env, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr.splitlines()[-1]
    assert said.startswith("keyden: not starting: "), proc.stderr
    return said


def test_a_second_daemon_refuses_a_live_socket_and_replaces_a_stale_one(daemon, tmp_path):
    said = _serve_refused("--socket", daemon.socket, "--state-dir", str(tmp_path / "s"))
    assert "already listening" in said and not (tmp_path / "s").exists()  # said before making a store
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    d = Daemon(args=("--socket", str(stale)))
    d.socket = str(stale)
    try:
        d.start()
        with keyden.connect(str(stale)) as c:
            assert c.ping(b"x") == b"x"
    finally:
        d.cleanup()


def test_a_stopping_daemon_leaves_a_socket_another_daemon_bound_since(tmp_path):
    """Its socket file deleted by hand and a second daemon started on the path: the first one's SIGTERM
    must not take the second one's socket with it."""
    path = str(tmp_path / "k.sock")
    first, second = Daemon(), Daemon()
    first.socket = second.socket = path
    try:
        first.start()
        os.unlink(path)
        second.start()
        first.stop()
        assert first.proc.returncode == 0
        with keyden.connect(path) as c:
            assert c.ping(b"x") == b"x"
        second.stop()
        assert not os.path.exists(path)  # its own, it removes
    finally:
        first.cleanup()
        second.cleanup()


def test_broken_frames_close_only_that_connection(daemon, client):
    serial = client.add("user", "survivor", b"still here", "@s")
    s = raw_connect(daemon.socket)
    s.sendall(W.HEADER.pack(1 << 30, 1, Op.HELLO, 0))  # announces a 1 GiB frame
    frames = recv_frames(s)
    assert frames and frames[0].status == E.EMSGSIZE.code
    assert s.recv(10) == b"", "the daemon closed the connection"
    s.close()
    s = raw_connect(daemon.socket)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not our protocol at all
    s.settimeout(5)
    try:
        data = s.recv(65536)
    except socket.timeout:
        data = b"timeout"
    s.close()
    assert data != b"timeout"
    assert client.read(serial) == b"still here"


def test_a_secret_read_is_not_left_in_the_clients_receive_buffer(client):
    """The blocking client reads every reply into one reused 1 MiB buffer: a key's payload stayed there
    until a longer reply came (short ones never overwrote it)."""
    secret = os.urandom(48)
    serial = client.add("user", "wiped from the buffer", secret, "@s")
    assert client.read(serial) == secret
    client.ping(b"x")
    assert bytes(client._buf).find(secret) == -1


def test_request_id_0_and_a_second_hello_are_protocol_errors(daemon):
    """Id 0 is the daemon's, for connection-level errors: a request carrying it was answered, and its
    answer could not be told from "the daemon is closing".  It now is that: EPROTO, then the close.
    A second HELLO was ENOSYS "unknown opcode 1"; it is EPROTO, and the connection goes on."""
    s = raw_connect(daemon.socket)
    s.sendall(W.encode_request(1, Op.HELLO, 1, 1, "", "raw"))
    assert recv_frames(s)[0].status == 0
    s.sendall(W.encode_request(2, Op.HELLO, 1, 1, "", "raw"))
    (again,) = recv_frames(s)
    assert (again.request_id, again.status) == (2, E.EPROTO.code)
    assert "HELLO already" in W.decode_error(again.body)
    s.sendall(W.encode_request(0, Op.PING, b"zero"))
    (refused,) = recv_frames(s)
    assert (refused.request_id, refused.op, refused.status) == (0, 0, E.EPROTO.code)
    assert recv_frames(s) == []  # closed
    s.close()


def test_whoami_answers_with_the_session_keyrings_search_bit_cleared(daemon):
    """WHOAMI resolved @s with a search check: a session keyring masked to possessor view-only made the
    caller's own identity EACCES, while QUOTA and SESSIONS still answered."""
    with daemon.connect() as boot:
        serial, token = boot.join_session()
    with daemon.connect(session=token) as c:
        c.setperm("@s", 0x01010000)
        assert c.whoami() == (os.getuid(), os.getgid(), os.getpid(), serial)
        c.leave_session(token)


def test_a_connection_whose_session_is_left_elsewhere_has_no_session_until_it_reconnects(daemon):
    """It kept working on _uid_ses, the keyring every session-less process of the uid possesses: its next
    add to @s landed there."""
    with daemon.connect() as boot:
        serial, token = boot.join_session()
        with daemon.connect(session=token) as inside:
            assert inside.id("@s") == serial
            boot.leave_session(token)
            with pytest.raises(E.ENOKEY, match="session has ended"):
                inside.add("user", "test:after-leave", b"x", "@s")
            assert inside.whoami()[3] == 0
        with pytest.raises(E.ENOKEY):
            boot.search("@us", "user", "test:after-leave")
        with pytest.raises(E.EACCES, match="session token not valid"):
            daemon.connect(session=token).id("@s")


def test_garbage_after_handshake_gets_errors_and_the_connection_survives(daemon):
    s = raw_connect(daemon.socket)
    s.sendall(W.encode_request(1, Op.HELLO, 1, 1, "", "raw"))
    assert recv_frames(s)[0].status == 0
    for rid, (op, body) in enumerate([(Op.ADD, b"\xff" * 7), (Op.READ, b""), (999, b"abc"),
                                      (Op.DESCRIBE, b"\x01\x00\x00\x00\x00")], start=2):
        s.sendall(W.encode_frame(rid, op, 0, body))
        (f,) = recv_frames(s)
        assert f.request_id == rid and f.status in (E.EPROTO.code, E.ENOSYS.code)
    s.sendall(W.encode_request(50, Op.PING, b"alive"))
    (f,) = recv_frames(s)
    assert W.response_schema(Op.PING).decode(f.body) == (b"alive",)
    s.close()


def test_wrong_types_and_unknown_keys_get_errno_errors(client):
    with pytest.raises(E.ENOKEY):
        client.read(0x7FFFFFF0)
    with pytest.raises(E.ENODEV):
        client.add("nosuchtype", "x", b"y", "@s")
    with pytest.raises(E.EPERM):
        client.add(".internal", "x", b"y", "@s")
    with pytest.raises(E.EBADMSG):
        client.add("asymmetric", "", b"this is not a certificate", "@s")
    with pytest.raises(E.EOPNOTSUPP):
        client.pkey_query(client.add("user", "u", b"v", "@s"))
    with pytest.raises(E.EINVAL):
        client.describe("@g")  # (keyctl_read turns every lookup failure into ENOKEY, as the kernel does)


def test_many_clients_in_parallel_each_get_their_own_answers(daemon):
    errors = []

    def worker(n):
        try:
            with daemon.connect() as c:
                ring = c.newring(f"par-{n}", "@s")
                for i in range(100):
                    k = c.add("user", f"k{i}", f"{n}:{i}".encode(), ring)
                    assert c.read(k) == f"{n}:{i}".encode()
                c.unlink(ring, "@s")
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_pipelined_calls_return_values_and_errors_in_order(client):
    k = client.add("user", "p", b"pipelined", "@s")
    results = client.call_many([("read", (k,)), ("read", (12345,)), ("describe", (k,)), ("ping", (b"z",))])
    assert results[0] == b"pipelined"
    assert isinstance(results[1], E.ENOKEY)
    assert results[2].description == "p"
    assert results[3] == b"z"
    (derived,) = client.call_many([("kdf", (client.add("logon", "t:ikm", b"k" * 32, "@s"),),
                                    {"length": 16, "description": "t:okm"})])
    assert client.describe(derived).type == "logon"


@pytest.mark.parametrize("timeout", [None, 30])
def test_many_pipelined_calls_never_wait_on_their_own_answers(daemon, timeout):
    """The client wrote every request before it read an answer; the daemon stops reading a client whose
    answers back up unread, so once both sockets' buffers were full each waited on the other for good
    (20 MiB of pings here; a stock kernel's smaller buffers took ~550 pieces of cipher_many: found by
    review).  The answers are read while the requests are written, with or without a timeout (without
    one, the socket blocks: its first write waited for room for all of them, found by a second review)."""
    payloads = [i.to_bytes(4, "big") * 256 for i in range(20000)]
    answers = []
    with daemon.connect(timeout=timeout) as c:
        calling = threading.Thread(target=lambda: answers.append(c.call_many([("ping", (p,)) for p in payloads])),
                                   daemon=True)
        calling.start()
        calling.join(60)
        assert not calling.is_alive(), "the client and the daemon wait on each other"
        assert answers == [payloads]
        assert c.ping(b"in step") == b"in step"


def test_answers_read_while_pipelined_calls_are_written_stand_when_the_connection_drops(tmp_path):
    """A server that answers the first 5 of 20000 pipelined pings, then closes: the 5 answers, read while
    the rest was written, were dropped and their calls reported lost (a call that made a key would be made
    again by a retry; found by review).  They stand; each call still unanswered gets the error."""
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def answer_five() -> None:
        conn, _ = listener.accept()
        decoder, answered = W.FrameDecoder(1 << 24), 0
        with conn:
            while answered < 6:  # HELLO, then 5 pings
                decoder.feed(conn.recv(65536))
                for frame in decoder.frames():
                    if answered == 0:
                        conn.sendall(W.encode_response(frame.request_id, Op.HELLO,
                                                       (W.VERSION, W.DEFAULT_MAX_FRAME, os.getuid(), 0, 0)))
                    elif answered < 6:
                        conn.sendall(W.encode_response(frame.request_id, Op.PING, (b"answered",)))
                    answered += 1

    server = threading.Thread(target=answer_five, daemon=True)
    server.start()
    with keyden.connect(path, reconnect=False, timeout=30) as c:
        results = c.call_many([("ping", (b"x" * 1024,))] * 20000)
    server.join(10)
    listener.close()
    assert results[:5] == [b"answered"] * 5
    assert all(isinstance(r, E.ECONNRESET) for r in results[5:])


def test_call_many_finds_names_in_call_order_and_reports_every_failure_per_call(client):
    """A '%type:name' is looked up after the calls before it (so it finds a key they made); bad arguments,
    names that are not operations and failed lookups are that call's result, and the others still run."""
    results = client.call_many([
        ("add", ("user", "cm:new", b"v1", "@s")),
        ("read", ("%user:cm:new",)),
        ("read", ("%user:cm:missing",)),
        ("read", (None,)),
        ("read", (2 ** 40,)),
        ("add", ("user", "cm:zeros", 32, "@s")),
        ("aead", (1,)),
        ("no_such_operation", ()),
        ("read", (1, 2, 3)),
        ("register", ()),  # the operations' base class's own (ABC.register), no operation
        ("ping", (b"last",)),
    ])
    assert isinstance(results[0], int) and results[1] == b"v1"
    assert isinstance(results[2], E.ENOKEY)
    assert all(isinstance(r, E.EINVAL) for r in results[3:10]), results
    assert "call_many pipelines" in str(results[6]) and "_Recorder" not in str(results[7])
    assert "'register' is not one" in str(results[9])
    assert results[10] == b"last"
    with pytest.raises(E.ENOKEY):
        client.find("user", "cm:zeros")  # refused, so never sent


def test_a_client_timeout_is_etimedout_and_the_next_request_reconnects(fresh_daemon):
    d = fresh_daemon()
    c = keyden.connect(d.socket, timeout=0.3)
    os.kill(d.proc.pid, signal.SIGSTOP)  # a daemon that does not answer in time
    try:
        with pytest.raises(E.ETIMEDOUT, match="may still be carried out"):
            c.ping(b"lost")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    assert not c.closed
    assert c.ping(b"again") == b"again" and c.generation == 1  # a new connection: no stale answer read
    c.close()
    assert c.closed
    for wrong in (0, -1, float("nan"), float("inf"), "1", True):  # 0 made the socket non-blocking: "connection lost"
        with pytest.raises(E.EINVAL, match="timeout must be None or a positive number"):
            keyden.connect(d.socket, timeout=wrong)


def test_a_busy_polling_daemon_polls_between_requests_and_sleeps_when_they_stop(fresh_daemon):
    """busy_poll: after each round the loop looks for the next request for up to that long before it
    sleeps, so requests 5 ms apart keep it busy; once they stop it polls one more time and sleeps.  A
    busy-polling client reconnects once the daemon closed its idle connection."""
    d = fresh_daemon("busy_poll = 10000\nidle_timeout = 0.5\n")
    with d.connect(busy_poll=10_000) as c:
        c.ping(b"")
        before = _cpu_seconds(d.proc.pid)
        for i in range(100):  # 0.5 s, each gap within the 10 ms poll
            assert c.ping(b"%d" % i) == b"%d" % i
            time.sleep(0.005)
        polling = _cpu_seconds(d.proc.pid) - before
        time.sleep(0.1)
        before = _cpu_seconds(d.proc.pid)
        time.sleep(1)  # (the idle timeout closes the connection meanwhile)
        idle = _cpu_seconds(d.proc.pid) - before
        assert c.ping(b"again") == b"again" and c.generation == 1
    assert polling > 0.15 and idle < 0.05, (polling, idle)  # (without polling: ~0.01 s for the 100 pings)


@pytest.mark.parametrize("answer, error", [(b"\xff" * 12, E.EPROTO), (b"", E.ECONNRESET)])
def test_a_socket_that_answers_hello_as_keyden_never_does_is_said_to_be_no_keyden(tmp_path, answer, error):
    """A server that sent garbage ("frame of 4294967295 bytes exceeds the 65536-byte cap") or closed at once
    ("connection to keyden lost: [Errno 104] ...") was reported as if keyden had said so; the CLI then
    asked whether the daemon was running (found by a CLI hunt)."""
    path = str(tmp_path / "impostor.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()

    def answer_once():
        conn, _ = server.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(answer)

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        with pytest.raises(error, match=f"^{error.__name__}: {path} .* \\(is it keyden\\?\\)$"):
            keyden.connect(path, timeout=5)
    finally:
        thread.join(10)
        server.close()


def test_a_busy_polling_client_polls_for_its_answer_only_as_long_as_it_was_told(tmp_path, monkeypatch):
    """A client's busy_poll bounds its polling: waiting on a server that never answers, it looks for the
    answer for 10 ms, then sleeps until its timeout; without busy_poll it does not look at all."""
    from keyden.client import sync

    path = str(tmp_path / "silent.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    try:
        for busy_poll in (0, 10_000):
            looked: list[float] = []  # each time the client reads the clock while it polls
            monkeypatch.setattr(sync, "_clock", lambda: looked.append(time.monotonic()) or looked[-1])
            start = time.monotonic()
            with pytest.raises(E.ETIMEDOUT, match="is it keyden"):
                keyden.connect(path, timeout=0.5, busy_poll=busy_poll)
            if busy_poll:
                assert len(looked) > 2 and looked[-1] - looked[0] >= 0.01, looked
                assert looked[-1] - start < 0.25  # then it slept (polling the whole 0.5 s would end at 0.5)
            else:
                assert not looked
        for wrong in (-1, 10_001, 1.5, "10", True):  # out of range, or no whole number
            with pytest.raises(E.EINVAL, match="busy_poll must be a whole number of microseconds from 0 to 10000"):
                keyden.connect(path, busy_poll=wrong)
    finally:
        server.close()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU seconds a process has used so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_call_many_never_sends_a_call_twice_when_a_round_trip_fails(fresh_daemon):
    """A connection lost under one of call_many's round trips fails that round's calls; they are not sent
    again on the next connection (the daemon may have done them: an unnamed key would be made twice)."""
    d = fresh_daemon()
    with d.connect() as setup:
        ring = setup.newring("cm-once", "@u")
    c = keyden.connect(d.socket, timeout=0.3)
    os.kill(d.proc.pid, signal.SIGSTOP)
    resume = threading.Timer(0.5, os.kill, (d.proc.pid, signal.SIGCONT))
    resume.start()
    try:
        results = c.call_many([("generate", ("ed25519", "", ring)), ("read", ("%user:cm-marker",)),
                               ("ping", (b"after",))])
    finally:
        resume.join()
        os.kill(d.proc.pid, signal.SIGCONT)
    assert isinstance(results[0], E.ETIMEDOUT)
    assert isinstance(results[1], (E.ETIMEDOUT, E.ENOKEY))
    c._timeout = None  # (for the checks below only)
    with d.connect() as check:
        deadline = time.monotonic() + 10
        while not check.read(ring) and time.monotonic() < deadline:  # the stalled daemon may still do it
            time.sleep(0.05)
        assert len(check.read(ring)) == 1


def test_call_many_reports_malformed_entries_per_call_without_their_values(client):
    results = client.call_many([("ping",), "ping", ("x509_verify", (1, 2), {"at": b"secretpw"}),
                                ("ping", (b"ok",), {}), ("read", ("@hunter2",))])
    assert all(isinstance(r, E.EINVAL) for r in results[:3]) and results[3] == b"ok"
    assert isinstance(results[4], E.EINVAL)
    assert not any("secretpw" in str(r) or "hunter2" in str(r) for r in results)
    (not_bytes,) = client.call_many([("digest", ("sha256", 5))])  # keyden's own refusal keeps its words
    assert isinstance(not_bytes, E.EINVAL) and "must be bytes-like" in not_bytes.message


def test_text_that_utf8_cannot_encode_and_items_that_are_no_sequence_are_einval_without_their_value(client):
    """A lone surrogate in a text payload raised UnicodeEncodeError (its .object the whole payload); a
    batch's items given as None or a number, TypeError from list().  Both are bad arguments: EINVAL."""
    secret = "hunter2-\udcff"
    key = client.generate("ec:p256", "surrogates")
    for call in (lambda: client.add("user", "surrogate", secret), lambda: client.pkey_sign(key, "", secret),
                 lambda: client.import_key(secret, key)):
        with pytest.raises(E.EINVAL, match="lone surrogate") as refused:
            call()
        assert "hunter2" not in str(refused.value) and refused.value.__cause__ is None
    for items in (None, 5):
        with pytest.raises(E.EINVAL, match="must be a sequence of bytes-like objects"):
            client.batch("sha256", 0, items)


def test_call_many_keeps_the_answers_it_read_before_the_connection_failed(client, monkeypatch):
    """Answers already read stand (the caller must not redo what succeeded); only calls still unanswered
    get the connection's error, and a call refused locally keeps its own error."""
    real_wait = client._wait
    waits = []

    def failing_wait(rid, received=None):
        waits.append(rid)
        if len(waits) == 2:
            client._pending.clear()  # as if the rest had not come when the connection failed (else they stand)
            raise OSError("connection lost under the second answer")
        return real_wait(rid, received)
    monkeypatch.setattr(client, "_wait", failing_wait)
    results = client.call_many([("ping", (b"one",)), ("ping", (b"two",)), ("ping", (b"x" * (client.max_frame + 1),)),
                                ("ping", (b"three",))])
    monkeypatch.undo()
    assert results[0] == b"one"
    assert isinstance(results[1], E.ECONNRESET) and isinstance(results[3], E.ECONNRESET)
    assert isinstance(results[2], E.EMSGSIZE)
    assert client.ping(b"after") == b"after"  # the next request reconnects


def test_connect_refuses_a_path_that_is_not_one():
    with pytest.raises(E.EINVAL, match="socket path"):
        keyden.connect(5)


def test_a_client_outlives_a_daemon_restart_for_persistent_keys(fresh_daemon):
    d = fresh_daemon()
    c = d.connect()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    in_session = d.connect(session=token)
    ring = c.get_persistent("@s")
    key = c.add("user", "kd-restart", b"survives", ring)
    c.setperm(key, 0x3F3F0000)  # its owner may read it without possessing it
    d.stop()
    d.start()
    assert c.read(key) == b"survives"  # the request that found the old connection gone went on a new one
    assert c.generation == 1
    with pytest.raises(E.EACCES, match="session"):  # its session died with the old daemon: said, not hidden
        in_session.ping(b"")
    c.close()
    in_session.close()


def test_socket_path_mistakes_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    state = ("--state-dir", str(tmp_path / "state"))
    assert "is not a socket" in _serve_refused("--socket", str(tmp_path / "file"), *state)
    assert "k.sock: Not a directory" in _serve_refused("--socket", str(tmp_path / "file" / "k.sock"), *state)
    assert "too long" in _serve_refused("--socket", str(tmp_path / ("x" * 120) / "k.sock"), *state)
    assert not (tmp_path / "state").exists()  # each said before a store was made


def test_a_config_file_that_cannot_be_created_is_one_line(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "keyden.toml").symlink_to(tmp_path / "nowhere")  # dangling
    said = _serve_refused("--socket", str(tmp_path / "k.sock"), "--state-dir", str(state))
    assert "cannot create the config file" in said


def test_a_config_file_named_but_missing_is_refused(tmp_path):
    said = _serve_refused("--socket", str(tmp_path / "k.sock"), "--state-dir", str(tmp_path / "state"),
                          "--config", str(tmp_path / "typo.toml"))
    assert f"the config file {tmp_path / 'typo.toml'} does not exist" in said


def test_first_start_under_a_loose_umask_makes_files_it_accepts_again(tmp_path):
    """umask 000: the config file is 0644, the socket's directories and the state directory's new parents
    0755 (they were 0777: anyone could rename the state directory away and plant one of their own, whose
    audit.log, a symlink, root then appended to)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    state, sock = tmp_path / "var" / "lib" / "state", tmp_path / "run" / "deeper" / "k.sock"
    command = [sys.executable, "-m", "keyden", "init", "--state-dir", str(state)]
    for _ in range(2):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: os.umask(0))
        assert proc.returncode == 0, proc.stderr
    assert oct((state / "keyden.toml").stat().st_mode & 0o777) == "0o644"
    assert [oct(p.stat().st_mode & 0o777) for p in (state, state.parent, state.parent.parent)] == \
        ["0o700", "0o755", "0o755"]
    d = Daemon(args=("--socket", str(sock)))
    d.socket = str(sock)
    try:
        d.start(preexec_fn=lambda: os.umask(0))
        for directory in (sock.parent, sock.parent.parent):
            assert oct(directory.stat().st_mode & 0o777) == "0o755"
    finally:
        d.cleanup()


#: `keyden serve` whose socket, once bound, a "local attacker" swaps for a symbolic link to $TARGET (as one
#: with write access to the socket's directory could, racing the daemon)
SWAPPED_SOCKET = """
import os, socket, sys, types
from keyden.server import server
from keyden.cli.main import main
class Swapped(socket.socket):
    def bind(self, path):
        super().bind(path)
        os.symlink(os.environ["TARGET"], path + ".swap")
        os.rename(path + ".swap", path)
        open(os.environ["TARGET"] + ".bound", "w").close()
server.socket = types.ModuleType("socket")
server.socket.__dict__.update(vars(socket), socket=Swapped)
sys.exit(main(sys.argv[1:]))
"""


def test_the_socket_gets_its_mode_from_the_bind_not_from_a_chmod_that_follows_a_swapped_link(tmp_path):
    """The socket was bound, then chmod-ed 0666 by its path: whoever could rename a symbolic link onto that
    path in between had the daemon (root) make any file world-writable.  Its mode now comes from the umask
    of the bind (0666 under any umask of the daemon's), and a directory others may write is refused."""
    target = tmp_path / "shadow"
    target.write_text("secret")
    target.chmod(0o600)
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    d = Daemon()  # (its directories; started here, as it never answers on its socket)
    d.proc = subprocess.Popen([sys.executable, "-c", SWAPPED_SOCKET, "serve", "--socket", str(run / "k.sock"),
                               "--state-dir", d.state_dir, "--config", d.config],
                              env=dict(os.environ, PYTHONPATH=REPO, TARGET=str(target)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert eventually(lambda: os.path.exists(f"{target}.bound"))
        time.sleep(0.5)  # (where the chmod came, at once)
        assert d.proc.poll() is None and oct(target.stat().st_mode & 0o777) == "0o600"
    finally:
        d.stop()
        d.cleanup()
    for umask in (0o077, 0o000):
        d = Daemon(args=("--socket", str(run / "k.sock")))
        d.socket = str(run / "k.sock")
        try:
            d.start(preexec_fn=lambda: os.umask(umask))
            assert oct(os.stat(d.socket).st_mode & 0o777) == "0o666"
        finally:
            d.cleanup()
    run.chmod(0o777)
    said = _serve_refused("--socket", str(run / "k.sock"), "--state-dir", str(tmp_path / "state"))
    assert f"the socket {run / 'k.sock'} is under {run}, mode 0777, writable by group or others" in said
    assert not (tmp_path / "state").exists()  # said before a store was made


def test_keyden_serve_ignores_hangups_from_its_first_import():
    """A reload while the interpreter is still importing must not kill the daemon (SIGHUP's default);
    other commands keep the default."""
    probe = ("import signal, sys; sys.argv = ['keyden'] + sys.argv[1:]; import keyden.cli.main; "
             "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)")
    env = dict(os.environ, PYTHONPATH=REPO)
    for args, ignored in ((["serve"], "True"), (["--socket", "/x.sock", "serve"], "True"),
                          (["add", "user", "serve", "x"], "False")):
        r = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True, timeout=60,
                           preexec_fn=default_hangup_and_term)
        assert r.stdout.strip() == ignored, (args, r.stderr)


def test_signals_after_the_loop_or_during_a_stop_are_harmless(tmp_path):
    """A SIGHUP once the loop is over must not write into a descriptor that took its wake-up's number,
    and a second SIGTERM arriving while the first is being handled must not hang (no lock is taken)."""
    from keyden.server.config import ServerConfig
    from keyden.server.reactor import Reactor
    from keyden.server.server import Server

    reactor = Reactor(ServerConfig(socket=str(tmp_path / "s"), state_dir=str(tmp_path)), None)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s"))
    listener.listen()
    reactor.stop()
    reactor.run(listener)
    listener.close()
    r, w = os.pipe()  # the lowest free numbers: the wake-up's among them
    try:
        reactor.call_soon(lambda: None)
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 8)
    finally:
        os.close(r)
        os.close(w)

    server = Server(ServerConfig(socket=str(tmp_path / "t"), state_dir=str(tmp_path)))
    done = threading.Event()

    def second_signal_inside_the_first():
        with server._stopping._cond:  # as if the first handler were inside Event.set()
            server._on_stop_signal()
        done.set()

    threading.Thread(target=second_signal_inside_the_first, daemon=True).start()
    assert done.wait(10) and server._stop_signalled


def test_a_request_a_worker_holds_at_sigterm_gets_its_answer(fresh_daemon):
    """A stop lets the requests under way finish and sends their answers before it closes: such a request
    may have made a key (here one whose password takes 2^21 PBKDF2 rounds to undo, on a worker), and a
    client told ECONNRESET instead would retry it and make a second (found by the lifecycle hunt)."""
    pem = _slow_pem()
    d = fresh_daemon()
    answers = []
    with d.connect() as c, d.connect() as idle:
        assert idle.ping() is not None
        adding = threading.Thread(target=lambda: answers.append(_outcome(
            lambda: c.add("asymmetric", "slow", pem, "@u", password=b"pw"))))
        adding.start()
        time.sleep(0.2)
        assert adding.is_alive(), "the import was not slow enough to be under way at the stop"
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        adding.join(30)
        assert d.proc.wait(30) == 0
    assert answers and isinstance(answers[0], int), answers
    assert time.monotonic() - started < 4, "the idle connection held the stop"


def test_a_persistent_change_whose_fsync_waits_for_a_worker_at_sigterm_gets_its_answer(fresh_daemon):
    """A change made on the loop leaves only its fsync for another thread.  When that was a worker, with its
    uid's share of workers busy (two slow imports of four workers), the fsync waited, and the stop dropped it
    as never started: the key was made, and written at the shutdown, but its client heard ECONNRESET.
    Whether the change is answered before or during the stop, its client hears it was made."""
    pem = _slow_pem()
    d = fresh_daemon("workers = 4\n")
    answers = {}
    with d.connect() as setup:
        persistent = setup.get_persistent("@u")
    clients = [d.connect() for _ in range(3)]
    try:
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, _outcome(
            lambda: clients[i].add("asymmetric", f"slow{i}", pem, "@u", password=b"pw")))) for i in range(2)]
        threads.append(threading.Thread(target=lambda: answers.__setitem__("add", _outcome(
            lambda: clients[2].add("user", "made-at-stop", b"v", persistent)))))
        for thread in threads:
            thread.start()
            time.sleep(0.03)  # in order; an import takes 0.3-0.5 s (the second must be running at the check)
        assert all(thread.is_alive() for thread in threads[:2]), "the imports were not slow enough"
        d.proc.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(30)
        assert d.proc.wait(30) == 0
    finally:
        for c in clients:
            c.close()
    assert all(isinstance(answer, int) for answer in answers.values()) and len(answers) == 3, answers
    d.start()
    with d.connect() as c:
        assert c.search(c.get_persistent("@u"), "user", "made-at-stop") == answers["add"]


def test_a_persistent_change_is_answered_without_waiting_for_its_uids_slow_requests(fresh_daemon):
    """The fsync of a change made on the loop went to a worker like a slow request, so with its uid's share
    of workers busy it waited behind that uid's slow imports, made long before it (three here)."""
    pem = _slow_pem()
    d = fresh_daemon("workers = 2\n")  # one worker per uid
    answered = []
    with d.connect() as setup:
        persistent = setup.get_persistent("@u")
    clients = [d.connect() for _ in range(4)]
    try:
        imports = [threading.Thread(target=lambda i=i: answered.append(_outcome(
            lambda: clients[i].add("asymmetric", f"slow{i}", pem, "@u", password=b"pw")))) for i in range(3)]
        for thread in imports:
            thread.start()
        time.sleep(0.2)
        clients[3].add("user", "made-meanwhile", b"v", persistent)
        imports_answered_first = len(answered)
        for thread in imports:
            thread.join(30)
    finally:
        for c in clients:
            c.close()
    assert imports_answered_first <= 1 and len(answered) == 3  # it waited for all three, one after the other


def test_other_clients_are_answered_while_a_key_password_is_undone(fresh_daemon):
    """pyca's key loader holds the GIL through the password's KDF: at the 2^21 PBKDF2 rounds allowed, every
    client of the daemon waited about a second per import (found by review).  keyden runs the KDF with
    pyca's primitives, which release it, so the loop answers others meanwhile."""
    pem = _slow_pem()
    d = fresh_daemon()
    with d.connect() as c, d.connect() as other:
        importing = threading.Thread(target=lambda: c.add("asymmetric", "slow", pem, "@u", password=b"pw"))
        importing.start()
        time.sleep(0.1)
        pings = 0
        while importing.is_alive():
            other.ping()
            pings += 1
        importing.join()
    assert pings >= 20, f"{pings} pings answered during the import"


#: `keyden serve` with a key database whose writes hang while the file $STALL exists (a disk that stopped
#: answering; each write that does touches $STALL.hit): the real daemon, with one fault injected, and a
#: stop's grace for requests still running cut to STALLED_GRACE seconds
STALLED_GRACE = 2.0
STALLING_DISK = f"""
import os, sys, time
from keyden.persist import database
from keyden.server import reactor
from keyden.cli.main import main
reactor.STOP_GRACE = {STALLED_GRACE}
plain_write = database.Database.write
def write(self, *args, **kw):
    if os.path.exists(os.environ["STALL"]):
        open(os.environ["STALL"] + ".hit", "w").close()
    while os.path.exists(os.environ["STALL"]):
        time.sleep(0.05)
    return plain_write(self, *args, **kw)
database.Database.write = write
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("exit_meanwhile", [False, True])
def test_a_stop_does_not_wait_for_a_disk_that_does_not_answer(tmp_path, exit_meanwhile):
    """A persistent change whose write never returns held the stop until it did (for good, with a dead
    disk), the socket still there and new clients hanging on it.  The stop now waits its grace, then
    exits, the socket removed; the change its client never heard of is lost, as in a crash, and the key
    database opens whole at the next start.  So too when a process exits meanwhile: the collection of
    its keyrings waits on the same write, and the stop waited for it (found by review)."""
    from keyden.server.server import STUCK_STEP_WAIT

    stall = tmp_path / "stall"
    d = Daemon(program=("-c", STALLING_DISK), env={"STALL": str(stall)})
    env = dict(os.environ, PYTHONPATH=REPO)
    try:
        d.start()
        answers = []
        with d.connect() as c:
            persistent = c.get_persistent("@u")
            before = c.add("user", "written", b"v1", persistent)
            with_keyring = subprocess.Popen(
                [sys.executable, "-c", f"import keyden, sys; keyden.connect({d.socket!r}).add('user', 'p', b'x', "
                                       "'@p'); print('ready', flush=True); sys.stdin.readline()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert with_keyring.stdout.readline() == b"ready\n"
            stall.touch()
            adding = threading.Thread(target=lambda: answers.append(_outcome(
                lambda: c.add("user", "stalled", b"v2", persistent))))
            adding.start()
            assert eventually(lambda: os.path.exists(f"{stall}.hit")), "the change's write never came"
            assert adding.is_alive(), "the change was answered: its write did not stall"
            if exit_meanwhile:  # its process keyring goes: the watcher's collection waits on the write
                with_keyring.stdin.close()
                assert with_keyring.wait(10) == 0
                time.sleep(0.3)
            started = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            longest = STALLED_GRACE + 2 * STUCK_STEP_WAIT
            assert d.proc.wait(longest + 10) == 1  # changes left unwritten: as a close that failed
            took = time.monotonic() - started
            adding.join(10)
            with_keyring.stdin.close()
            with_keyring.wait(10)
        assert STALLED_GRACE - 0.5 < took < longest + 3, took
        assert isinstance(answers[0], E.ECONNRESET) and not os.path.exists(d.socket)
        log = d.read_log()
        assert "stopping with 1 requests still running" in log and "could not be closed" in log
        assert ("process-exit watcher did not stop" in log) == exit_meanwhile
        stall.unlink()
        d.start()
        with d.connect() as c:
            persistent = c.get_persistent("@u")
            assert c.search(persistent, "user", "written") == before and c.read(before) == b"v1"
            with pytest.raises(E.ENOKEY):
                c.search(persistent, "user", "stalled")
        assert "quick_check" not in d.read_log() and "damaged" not in d.read_log()
    finally:
        stall.unlink(missing_ok=True)
        d.cleanup()


def _slow_pem() -> bytes:
    """A P-256 key whose password takes 2^21 PBKDF2 rounds to undo: ~0.5 s on a worker."""
    from keyden.crypto.asymmetric import MAX_KDF_ITERATIONS

    key = subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                         capture_output=True, check=True).stdout
    return subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-iter", str(MAX_KDF_ITERATIONS),
                           "-passout", "pass:pw"], input=key, capture_output=True, check=True).stdout


def _outcome(call):
    try:
        return call()
    except keyden.KeydenError as exc:
        return exc


def test_the_daemon_is_hardened_before_it_reads_a_secret(tmp_path, monkeypatch):
    """No core dump or ptrace may catch the master key: hardening came after the store was opened (the
    master key read, every persistent key decrypted), and a crash there dumped them (found by a hunt)."""
    from keyden.server import server as server_module
    from keyden.server.config import ServerConfig

    order = []
    monkeypatch.setattr(server_module.harden, "harden", lambda lock_memory: order.append("harden") or {})
    opened = server_module.open_durable
    monkeypatch.setattr(server_module, "open_durable", lambda cfg, store: order.append("store") or opened(cfg, store))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    server = server_module.Server(ServerConfig(socket=str(tmp_path / "k.sock"), state_dir=str(state), harden=True))
    server._open_store()
    server.journal.close()
    assert order == ["harden", "store"]


def test_sighup_reopens_the_audit_file_and_the_daemon_serves_on(fresh_daemon):
    """logrotate moves the file and sends SIGHUP: lines go to a new file at the same path."""
    d = fresh_daemon('audit = "audit.log"\n')
    log_path = os.path.join(d.state_dir, "audit.log")
    with d.connect() as c:
        c.add("user", "before", b"x", "@s")
        os.rename(log_path, log_path + ".1")
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not os.path.exists(log_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        c.add("user", "after", b"x", "@s")
    assert d.proc.poll() is None  # SIGHUP used to kill it, and every key held in memory with it
    assert '"op": "add"' in open(log_path + ".1").read() and '"op": "add"' in open(log_path).read()


def test_sighup_in_the_middle_of_rotations_never_hangs_the_daemon(fresh_daemon):
    """The handler runs on the loop's thread, maybe inside a rotation holding the lock a reopen takes."""
    d = fresh_daemon('audit = "audit.log"\naudit_max_bytes = 1\n')  # every write rotates
    stop, served = threading.Event(), []

    def load():
        with d.connect(timeout=20) as c:
            while not stop.is_set():
                c.whoami()
                served.append(1)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(100):
            d.proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and len(served) > 100
    with d.connect(timeout=5) as c:
        assert c.ping(b"still here") == b"still here"


def test_every_setting_the_generated_config_shows_can_be_set_to_its_default(tmp_path):
    """Uncommenting a line of the commented keyden.toml must never stop the daemon (shm_total_maxbytes'
    4 GiB default was over the 2**31-1 every number was held to), and the file names every setting."""
    from keyden.server.config import DEFAULT_CONFIG_TEXT, ServerConfig

    state = tmp_path / "state"
    config = ServerConfig(socket=str(tmp_path / "k.sock"), state_dir=str(state))
    config.prepare_state_dir()
    lines = []
    for line in DEFAULT_CONFIG_TEXT.splitlines():
        setting = re.match(r"# (\w+) = (\S+)", line)
        if setting and "<state_dir>" not in line and setting[1] not in ("socket", "ca_bundle", "state_dir"):
            line = f"{setting[1]} = {setting[2]}"
        lines.append(line)
    (state / "keyden.toml").write_text("\n".join(lines) + "\n")
    config.load_file()
    assert config.store.shm_total_maxbytes == 4 << 30 and config.harden is True
    shown = set(re.findall(r"^# (\w+) =", DEFAULT_CONFIG_TEXT, re.M))
    settable = {f.name for f in fields(ServerConfig) if f.name not in ("store", "adopt_orphans")}
    assert shown == settable | {f.name for f in fields(StoreConfig)}


def test_state_dir_in_a_named_config_file_applies(tmp_path):
    import argparse

    from keyden.cli.serve import load_config

    (tmp_path / "etc.toml").write_text(f'state_dir = "{tmp_path / "from-file"}"\n')
    (tmp_path / "etc.toml").chmod(0o644)
    named = argparse.Namespace(state_dir=None, config=str(tmp_path / "etc.toml"), passphrase_file=None)
    assert load_config(named).state_dir == str(tmp_path / "from-file")
    named.state_dir = str(tmp_path / "from-command-line")  # the command line wins, as --socket does
    assert load_config(named).state_dir == str(tmp_path / "from-command-line")


@pytest.mark.parametrize("setting, said", [
    ("bogus = 1", "unknown setting 'bogus'"),
    ('max_frame = "abc"', "max_frame must be an int, not str"),
    ('harden = "false"', "harden must be a bool, not str"),  # a string is no bool: never silently true
    ('ca_bundle = "/nonexistent/bundle.pem"', "cannot read the CA bundle /nonexistent/bundle.pem"),
    ("workers = -1", "workers must be a finite number from 0 to 2147483647"),
    ("gc_interval = inf", "gc_interval must be a finite number from 0.01"),  # no collection, silently
    ("max_frame = 0", "max_frame must be a finite number from 8192"),
    ("handshake_timeout = nan", "handshake_timeout must be a finite number"),
    ("busy_poll = 10001", "busy_poll must be a finite number from 0 to 10000"),  # 10 ms: longer only burns a CPU
    ("busy_poll = 0.5", "busy_poll must be an int, not float"),
    ("quota = 5", "quota must be a table"),
    ("[quota]\nidle_timeout = 600", "unknown setting 'idle_timeout' in [quota]"),  # appended after [quota]
    ('[quota]\nmaxkeys = "5"', "[quota] maxkeys must be an int, not str"),
    ("adopt_orphans = true", "adopt_orphans is for one start: pass --adopt-orphans to keyden serve"),  # not a policy
    ('audit = "a\\u0000b"', "audit contains a NUL character"),  # (was a traceback: open() raised ValueError)
    ('master_key_kernel = "a:\\u0000b"', "master_key_kernel contains a NUL character"),
    ('state_dir = ""', "state_dir takes a path, not an empty string"),  # (was the current directory)
    ('socket = ""', "socket takes a path, not an empty string"),
])
def test_a_bad_setting_is_one_line_naming_it(tmp_path, setting, said):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "keyden.toml").write_text(setting + "\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    commands = [["serve", "--socket", str(tmp_path / "k.sock")]] + ([["init"]] if "bundle" not in said else [])
    for command in commands:  # (init reads the settings too, but loads no CA bundle)
        proc = subprocess.run([sys.executable, "-m", "keyden", *command, "--state-dir", str(state)],
                              capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (command, proc.stderr)
        assert said in proc.stderr.strip().splitlines()[-1], (command, proc.stderr)


def test_keys_pages_through_every_viewable_key_under_the_smallest_frame_cap(fresh_daemon):
    """The /proc/keys view over the wire: pages end where the next record would pass the frame cap (a key
    with the longest description still fits the smallest), every state field is carried (time left,
    revoked, no-export), and each type's summary is as the kernel describes it."""
    d = fresh_daemon("max_frame = 8192\n")
    with d.connect() as c:
        plain = c.add("user", "kd-keys:plain", b"12345", "@s")
        c.timeout(plain, 3 * 86400 + 60)
        gone = c.add("user", "kd-keys:gone", b"x", "@s")
        c.revoke(gone)
        sealed = c.generate("ed25519", "kd-keys:sealed", "@s", no_export=True)
        longest = c.add("user", "L" * 4095, b"x", "@s")
        wide = {c.add("user", f"{i}" * 3000, b"x", "@s") for i in range(5)}
        found = c.keys()
        pages, after = 0, 0
        while True:
            page, after = c.keys_page(after)
            pages += 1
            if not after:
                break
    assert pages >= 4  # 4 KiB and 3 KB descriptions: at most two keys a page
    serials = [k.serial for k in found]
    assert serials == sorted(set(serials)) and {plain, gone, sealed, longest} | wide <= set(serials)
    by = {k.serial: k for k in found}
    assert by[longest].description == "L" * 4095
    assert by[plain].time_left(time.time()) == "3d" and by[plain].summary == "5" and not by[plain].revoked
    assert by[gone].revoked and by[gone].proc_line(time.time()).split()[1] == "IR-Q---"
    assert by[sealed].no_export and by[sealed].type == "asymmetric" and by[sealed].summary == "PKCS8.ed25519 []"



# ------------------------------------------------------------- process keyrings at exit

_ADD_TO_PROCESS_KEYRING = r"""
import sys, keyden
sock, mode = sys.argv[1], sys.argv[2]
with keyden.connect(sock) as c:
    ring = c.get_keyring_id("@p", create=True)
    key = c.add("user", "kd-exit:p", b"in @p", "@p")
    thread_key = c.add("user", "kd-exit:t", b"in @t", "@t")
print(ring, key, thread_key, flush=True)
if mode == "live":  # its connection is closed, and it lives on: it connects again, and again
    sys.stdin.readline()
    for _ in range(3):
        with keyden.connect(sock) as c:
            print(c.get_keyring_id("@p"), c.read(key).decode(), c.read(thread_key).decode(), flush=True)
    sys.stdin.readline()
"""


def _child(d, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _ADD_TO_PROCESS_KEYRING, d.socket, mode], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=REPO))


def _serials(c) -> set[int]:
    return {k.serial for k in c.keys()}


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces and parentheses)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _process_state(pid: int) -> str:
    return _stat_fields(pid)[0].decode()


def _watched_processes(d) -> int:
    """The daemon's pidfds: one per live process it watches for its exit."""
    fd_dir = f"/proc/{d.proc.pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(f"{fd_dir}/{name}") == "anon_inode:[pidfd]"
        except OSError:
            pass  # closed meanwhile
    return count


# gc_interval 300: the sweep never runs while these tests do, so only the exit itself can collect.
NO_SWEEP = "gc_interval = 300\n"


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_a_process_keyrings_go_when_it_exits_not_at_the_next_sweep(fresh_daemon, reaped):
    """The kernel puts a process's @p and @t at exit, and what only they held is collected at once: no
    other process lists them or finds them by name afterwards.  At exit, not when its parent reaps it."""
    d = fresh_daemon(NO_SWEEP)
    child = _child(d, "exit")
    try:
        ring, key, thread_key = map(int, child.stdout.readline().split())
        if reaped:
            assert child.wait(60) == 0
        else:
            assert eventually(lambda: _process_state(child.pid) == "Z", 60)  # exited; its parent (we) waits
        with d.connect() as c:
            assert eventually(lambda: not {ring, key, thread_key} & _serials(c), 2.0)
            for description in ("kd-exit:p", "kd-exit:t"):
                with pytest.raises(E.ENOKEY):
                    c.find("user", description)
    finally:
        child.wait(60)


def test_the_cli_finds_nothing_a_finished_command_left_in_its_process_keyring(fresh_daemon):
    """docs/cli.md: each keyden command has its own @p and @t, gone when it exits."""
    d = fresh_daemon(NO_SWEEP)
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("KEYDEN_SESSION", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "keyden", "--socket", d.socket, *args], capture_output=True,
                              text=True, timeout=60, env=env)

    added = [cli("add", "user", f"kd-cli:{ring}", "secret", f"@{ring}") for ring in "pt"]
    assert [r.returncode for r in added] == [0, 0], [r.stderr for r in added]
    assert eventually(lambda: "kd-cli:" not in cli("keys").stdout, 2.0)
    for ring in "pt":
        found = cli("print", f"%user:kd-cli:{ring}")
        assert found.returncode == 1 and "Can't find 'user:kd-cli:" in found.stderr, found.stderr


def test_a_process_keeps_its_keyrings_across_its_connections_and_loses_them_at_exit(fresh_daemon):
    """Its last connection closed is not its exit: it connects again and finds @p as it left it.  The daemon
    watches it once however many connections it opens (a pidfd), and a process without @p not at all."""
    d = fresh_daemon(NO_SWEEP)
    with d.connect() as c:  # we never make a process keyring: nothing watches us
        c.add("user", "kd-live:s", b"x", "@s")
        assert _watched_processes(d) == 0
        child = _child(d, "live")
        try:
            ring, key, thread_key = map(int, child.stdout.readline().split())
            assert eventually(lambda: _watched_processes(d) == 1, 10)
            assert {ring, key, thread_key} <= _serials(c)  # its connection is closed; it is alive
            child.stdin.write("\n")
            child.stdin.flush()
            for _ in range(3):
                assert child.stdout.readline().split() == [str(ring), "in", "@p", "in", "@t"]
            assert _watched_processes(d) == 1
            child.stdin.write("\n")
            child.stdin.close()
            assert child.wait(60) == 0
        finally:
            child.kill()
            child.wait(60)
        assert eventually(lambda: not {ring, key, thread_key} & _serials(c), 2.0)
        assert _watched_processes(d) == 0


def test_a_connect_waits_for_room_in_a_busy_daemons_listen_queue(fresh_daemon):
    """With its HELLO timeout set before connect(), a client found a full listen queue EAGAIN at once
    (a non-blocking connect) where it used to wait: a burst of clients failed against a busy daemon."""
    import socket as socketlib
    import threading

    d = fresh_daemon("max_connections = 4096\nmax_connections_per_uid = 4096\n")  # the fillers count once let in
    os.kill(d.proc.pid, signal.SIGSTOP)
    filling = []
    try:
        while True:  # fill the listen queue while nothing accepts
            s = socketlib.socket(socketlib.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(d.socket)
            except BlockingIOError:
                s.close()
                break
            filling.append(s)
            assert len(filling) < 5000
        threading.Timer(1.0, os.kill, (d.proc.pid, signal.SIGCONT)).start()
        with keyden.connect(d.socket) as c:
            assert c.ping(b"in") == b"in"
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
        for s in filling:
            s.close()


def test_a_destroyed_keys_payload_and_a_password_do_not_stay_in_the_daemons_receive_buffers(fresh_daemon):
    """The daemon reads requests into buffers it keeps: a revoked key's payload, or the password of an
    encrypted private key (taken or refused), stayed there, verbatim, until a longer request came (on a
    quiet daemon, never).  Received bytes are wiped once they are taken out of the read buffers (the frame
    decoder's: test_protocol).  (Freed Python objects keep copies until their memory is reused, which
    connections that come and go do: so the daemon is looked at once they have gone.)"""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.test_session_keys import memory_contains

    d = fresh_daemon()
    marks = {name: name.encode() + b"-" + os.urandom(8).hex().encode() for name in
             ("payload", "piecewise", "password", "wrong")}
    with d.connect() as c:
        c.revoke(c.add("logon", "test:small", marks["payload"], "@s"))
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(marks["password"]))
        c.invalidate(c.add("asymmetric", "", pem, "@s", password=marks["password"]))
        with pytest.raises(E.EKEYREJECTED):
            c.add("asymmetric", "", pem, "@s", password=marks["wrong"])
    frame = W.encode_request(2, Op.ADD, "logon", "test:pieces", marks["piecewise"], -3, b"")  # (-3: @s)
    with socket.socket(socket.AF_UNIX) as raw:  # one request in two reads: through the decoder
        raw.connect(d.socket)
        raw.sendall(W.encode_request(1, Op.HELLO, W.VERSION, W.VERSION, "", "test"))
        decoder = W.FrameDecoder()
        raw.sendall(frame[:20])
        time.sleep(0.1)
        raw.sendall(frame[20:])
        frames: list = []
        while len(frames) < 2:
            decoder.feed(raw.recv(4096))
            frames += decoder.frames()
        (serial,) = W.response_schema(Op.ADD).decode(frames[1].body)
        raw.sendall(W.encode_request(3, Op.REVOKE, serial))
        decoder.feed(raw.recv(4096))
        (revoked,) = decoder.frames()
    assert frames[1].status == revoked.status == 0
    with d.connect() as c:
        c.ping(b"x")
    assert memory_contains(d.proc.pid, list(marks.values())) == set()


def test_the_client_wipes_its_receive_buffer_of_every_reply(client):
    """The blocking client's receive buffer is kept for the next read: a key's payload or a plaintext in a
    reply stayed there unless it came in one read by itself (call_many, pipelined replies, the decoder's
    path).  Found by a review."""
    marks = [f"mark-{i}-".encode() + os.urandom(8).hex().encode() for i in range(3)]
    serials = [client.add("user", f"test:wipe{i}", mark) for i, mark in enumerate(marks)]
    assert client.read(serials[0]) == marks[0]  # one reply, one read
    assert client.call_many([("read", (s,)) for s in serials[1:]] + [("ping", (b"x",))]) == marks[1:] + [b"x"]
    assert not any(mark in bytes(client._buf) for mark in marks)
    assert not any(mark in bytes(client._decoder._buf) for mark in marks)


def test_a_config_file_made_by_another_start_meanwhile_is_taken_as_there(tmp_path, monkeypatch):
    """Two daemons started at once on a new state directory: the one whose O_EXCL create lost stopped with
    "cannot create the config file ...: File exists" (found by an operations hunt)."""
    import pathlib

    from keyden.server.config import DEFAULT_CONFIG_TEXT, ServerConfig

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "keyden.toml").write_text("# the other start's\n")
    cfg = ServerConfig(socket=str(tmp_path / "k.sock"), state_dir=str(state))
    real_exists = pathlib.Path.exists
    monkeypatch.setattr(pathlib.Path, "exists", lambda p: False if p.name == "keyden.toml" else real_exists(p))
    cfg.prepare_state_dir()  # looked for it before the other start made it
    assert (state / "keyden.toml").read_text() == "# the other start's\n" != DEFAULT_CONFIG_TEXT
