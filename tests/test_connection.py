"""The connection handler, fed bytes directly: handshake, dispatch, errors, broken frames."""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import time

import pytest

from keyden import descriptors
from keyden import errors as E
from keyden import protocol as W
from keyden.core.journal import NullJournal
from keyden.core.store import Caller, KeyStore
from keyden.protocol import Op
from keyden.server.connection import Connection
from keyden.server.handlers import Context
from keyden.server.handlers.dataplane import Region
from keyden.server.peer import Peer

from conftest import eventually

PEER = Peer(pid=4242, uid=1000, gid=1000, groups=frozenset(), start_time=99)


def responses(data: bytes) -> list[W.Frame]:
    dec = W.FrameDecoder()
    dec.feed(data)
    return list(dec.frames())


def hello(conn: Connection, session: str = "") -> W.Frame:
    (frame,) = responses(conn.receive(W.encode_request(1, Op.HELLO, 1, 1, session, "test")))
    return frame


@pytest.fixture
def conn():
    c = Connection(KeyStore(), PEER, max_frame=8192)
    assert hello(c).status == 0
    return c


def test_handshake_reports_identity_from_the_peer_not_the_client():
    c = Connection(KeyStore(), PEER)
    frame = hello(c)
    version, max_frame, uid, gid, pid = W.response_schema(Op.HELLO).decode(frame.body)
    assert (version, uid, gid, pid) == (W.VERSION, 1000, 1000, 4242)


def test_first_frame_must_be_hello():
    c = Connection(KeyStore(), PEER)
    (frame,) = responses(c.receive(W.encode_request(1, Op.PING, b"x")))
    assert frame.status == E.EPROTO.code and c.closed


def test_version_mismatch_is_refused_and_closes():
    c = Connection(KeyStore(), PEER)
    (frame,) = responses(c.receive(W.encode_request(1, Op.HELLO, 7, 9, "", "future")))
    assert frame.status == E.EPROTONOSUPPORT.code and c.closed


def test_foreign_session_token_is_refused():
    store = KeyStore()
    c = Connection(store, PEER)
    (frame,) = responses(c.receive(W.encode_request(1, Op.HELLO, 1, 1, "guessed-token", "x")))
    assert frame.status == E.EACCES.code and c.closed


def test_pipelined_requests_answered_in_one_write(conn):
    reqs = b"".join(W.encode_request(i, Op.PING, bytes([i])) for i in range(10, 20))
    frames = responses(conn.receive(reqs))
    assert [f.request_id for f in frames] == list(range(10, 20))
    assert [W.response_schema(Op.PING).decode(f.body)[0] for f in frames] == [bytes([i]) for i in range(10, 20)]


def test_add_read_through_bytes(conn):
    (f,) = responses(conn.receive(W.encode_request(2, Op.ADD, "user", "k", b"secret", -3, b"")))
    (serial,) = W.response_schema(Op.ADD).decode(f.body)
    (f,) = responses(conn.receive(W.encode_request(3, Op.READ, serial)))
    assert W.response_schema(Op.READ).decode(f.body) == (0, b"secret")


def test_malformed_body_is_an_error_but_the_connection_lives(conn):
    frames = responses(conn.receive(W.encode_frame(5, Op.READ, 0, b"\x01")))
    assert frames[0].status == E.EPROTO.code and not conn.closed
    (f,) = responses(conn.receive(W.encode_request(6, Op.PING, b"ok")))
    assert f.status == 0


def test_unknown_opcode_is_enosys(conn):
    (f,) = responses(conn.receive(W.encode_frame(5, 777, 0, b"")))
    assert f.status == E.ENOSYS.code and not conn.closed


def test_an_op_that_is_never_a_request_is_eproto(conn):
    """TLS_ESTABLISHED is a known opcode (the first frame on a plaintext socket), but no request."""
    (f,) = responses(conn.receive(W.encode_frame(5, Op.TLS_ESTABLISHED, 0, b"")))
    assert f.status == E.EPROTO.code and not conn.closed
    assert "TLS_ESTABLISHED" in W.error_of(f).message


def test_oversized_frame_closes_the_connection(conn):
    data = conn.receive(W.HEADER.pack(9000, 8, Op.PING, 0))
    (f,) = responses(data)
    assert f.status == E.EMSGSIZE.code and conn.closed
    assert conn.receive(W.encode_request(9, Op.PING, b"")) == b""


def test_internal_errors_become_generic_eio(conn, monkeypatch, caplog):
    from keyden.server import handlers

    def boom(ctx, data):
        raise RuntimeError("secret detail 0xdeadbeef")

    monkeypatch.setitem(handlers.HANDLERS, Op.PING, boom)
    (f,) = responses(conn.receive(W.encode_request(4, Op.PING, b"")))
    assert f.status == E.EIO.code
    assert b"deadbeef" not in f.body and W.decode_error(f.body) == "internal error"
    assert "secret detail" in caplog.text  # details only in the server log


# ------------------------------------------------------------ connection end


class _FakeRegion:
    def __init__(self, fails: bool = False):
        self.fails, self.closed = fails, False

    def close(self):
        self.closed = True
        if self.fails:
            raise BufferError("kd-secret-in-message")


def _context() -> Context:
    return Context(KeyStore(), Caller(PEER.credentials, PEER.process), PEER.pid)


def test_closing_releases_every_region_and_fd_even_if_one_fails(caplog):
    ctx = _context()
    regions = [_FakeRegion(), _FakeRegion(fails=True), _FakeRegion()]
    ctx.regions = dict(enumerate(regions, 1))
    r, w = os.pipe()
    ctx.fds.add([r, w], 0)
    with caplog.at_level(logging.ERROR, logger="keyden.handlers"):
        ctx.close()
        assert descriptors.drain()  # regions are unmapped on the closers (Region.close)
    assert all(region.closed for region in regions) and ctx.regions == {}
    assert not _is_open(r) and not _is_open(w)
    assert ctx.fds == []
    (record,) = caplog.records
    assert "region 2" in record.getMessage() and "BufferError" in record.getMessage()
    assert "kd-secret" not in caplog.text


def test_idle_closers_end_and_new_ones_start_for_new_work(monkeypatch):
    """Each burst of closes could start closers, up to 64, and none ever ended (found by a leak hunt):
    an idle closer now ends after IDLE_EXIT seconds without work, all but the last."""
    import threading
    import time

    monkeypatch.setattr(descriptors, "IDLE_EXIT", 0.2)

    def closers() -> int:
        return sum(t.name.startswith("keyden-closer-") for t in threading.enumerate())

    for _round in range(2):
        null = os.open(os.devnull, os.O_RDONLY)
        for owner in range(16):  # 64 closes at once: every idle closer is woken (and waits 0.2 s from now)
            descriptors.release([os.dup(null) for _ in range(descriptors.PER_OWNER)], 70000 + owner)
        os.close(null)
        assert descriptors.drain() and closers() > 0
        deadline = time.monotonic() + 10
        while closers() > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert closers() <= 1 and descriptors._closers == closers() == len(descriptors._sleeping)  # the last stays


def _memfd(size: int) -> int:
    fd = os.memfd_create("kd-test", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_a_region_still_in_use_is_refunded_once_it_is_unmapped():
    """Unmapping refuses while a view is held (an operation's, or an uncollected traceback's): the memory
    stays mapped and locked until that view goes, and the budget counts it until then, not less."""
    ctx = _context()
    budget = ctx.store.shm_budget
    regions = []
    for size in (8192, 4096):
        fd = _memfd(size)
        regions.append(Region(fd, size, size, budget, PEER.uid))
        os.close(fd)  # as SHM_ATTACH does: the mapping needs no descriptor of ours
    busy, idle = regions
    ctx.regions = {1: busy, 2: idle}
    held = busy.span(0, 16)
    assert budget.held(PEER.uid) == 12288
    ctx.close()
    assert descriptors.drain()  # the closers unmap them: the last reference to a memfd may free a GiB
    assert budget.held(PEER.uid) == 8192 and ctx.regions == {}  # the idle one went at once
    held[0] = 1  # still mapped for whoever held the view
    held.release()
    assert budget.held(PEER.uid) == 0


# ------------------------------------------------------- where the loop answers a request

def frame(op: Op, *fields) -> W.Frame:
    return W.Frame(1, op, 0, W.request_schema(op).encode(fields))


def test_the_cost_of_a_request_decides_where_it_runs(conn):
    from keyden.server.cost import Cost

    ctx = conn.context
    from keyden.server.handlers import dispatch

    rsa = dispatch(ctx, Op.GENKEY, ("rsa:2048", "kd-cost-rsa", -3))[0]
    ed = dispatch(ctx, Op.GENKEY, ("ed25519", "kd-cost-ed", -3))[0]
    shm = lambda length: frame(Op.SHM_CIPHER, 1, "gcm(aes)", 5, 0, b"", b"", 0, length, length)  # noqa: E731
    assert conn.cost(frame(Op.PING, b"")) is Cost.QUICK
    user = dispatch(ctx, Op.ADD, ("user", "kd-cost-user", b"secret", -3, b""))[0]
    p384 = dispatch(ctx, Op.GENKEY, ("p384", "kd-cost-p384", -3))[0]
    assert conn.cost(frame(Op.PKEY_SIGN, ed, "", bytes(64))) is Cost.QUICK  # less than a hand-off costs
    assert conn.cost(frame(Op.PKEY_VERIFY, p384, "", bytes(48), bytes(104))) is Cost.HEAVY
    assert conn.cost(frame(Op.PKEY_SIGN, user, "", bytes(64))) is Cost.QUICK  # refused at once (not asymmetric)
    assert conn.cost(frame(Op.PKEY_SIGN, 0x7FFF_FFF0, "", bytes(64))) is Cost.QUICK  # no such key: ENOKEY
    assert conn.cost(frame(Op.PKEY_SIGN, rsa, "enc=pkcs1 hash=sha256", bytes(32))) is Cost.HEAVY
    assert conn.cost(frame(Op.CIPHER, "gcm(aes)", 5, 0, bytes(12), b"", bytes(100_000))) is Cost.SHORT
    assert conn.cost(shm(4096)) is Cost.QUICK
    assert conn.cost(shm(1 << 20)) is Cost.SHORT
    assert conn.cost(shm(2 << 20)) is Cost.SHORT
    assert conn.cost(shm((2 << 20) + 1)) is Cost.HEAVY
    assert conn.cost(frame(Op.MAC, "hmac(sha512)", 5, bytes(200 << 10))) is Cost.HEAVY  # ~0.5 ms: not short
    assert conn.cost(shm(256 << 20)) is Cost.SLOW  # never on the loop: it would stall every other client
    assert conn.cost(frame(Op.GENKEY, "ed25519", "x", -3)) is Cost.SLOW
    assert conn.cost(frame(Op.SHM_DETACH, 7)) is Cost.SLOW  # the last unmap of a GiB memfd frees all of it
    assert conn.cost(frame(Op.ADD, "asymmetric", "", b"pem", -3, b"")) is Cost.SLOW  # maybe a password KDF
    assert conn.cost(frame(Op.ADD, "user", "x", b"y", -3, b"")) is Cost.QUICK
    assert conn.cost(frame(Op.UPDATE, user, b"y" * 4096)) is Cost.QUICK  # only user-like keys update: no parsing
    assert conn.cost(frame(Op.ADD, "asymmetrical", "x", b"y", -3, b"")) is Cost.QUICK  # no such type: EINVAL
    # decoding and checking a 16 MiB description (refused: EINVAL) took the loop 16-37 ms (a DoS hunt)
    assert conn.cost(frame(Op.ADD, "user", "x" * (1 << 20), b"y", -3, b"")) is Cost.HEAVY
    assert conn.cost(frame(Op.ADD, "user", "x" * (3 << 20), b"y", -3, b"")) is Cost.SLOW  # as any 3 MiB request
    assert conn.cost(frame(Op.ADD_FLAGS, "asymmetric", "", b"pem", -3, b"", 1)) is Cost.SLOW
    # a batch costs its items, however small: 65536 empty HMAC verifications held the loop for 0.9 s
    batch = lambda n, ivs=(), aads=(), item=b"": frame(Op.BATCH, "hmac(sha256)", 5, 0,  # noqa: E731
                                                       list(ivs), list(aads), [item] * n)
    assert conn.cost(batch(10, [bytes(32)] * 10)) is Cost.QUICK
    assert conn.cost(batch(1000, aads=[b"a"] * 1000)) is Cost.HEAVY  # 8 KiB, but a thousand items
    assert conn.cost(batch(65536, [bytes(32)] * 65536)) is Cost.SLOW
    assert conn.cost(batch(65536)) is Cost.SLOW
    assert conn.cost(batch(2, item=bytes(512 << 10))) is Cost.HEAVY  # few items, many bytes: by size
    assert conn.cost(batch(2000)) is Cost.SLOW  # 2000 CBC blocks held the loop ~16 ms: past HEAVY_ITEMS
    # By the algorithm's speed: AES-GCM's 16 MiB takes ~2 ms, another cipher's, a hash's or a MAC's 11-70
    assert conn.cost(shm(16 << 20)) is Cost.HEAVY
    slow_shm = frame(Op.SHM_CIPHER, 1, "cbc(aes)", 5, 0, bytes(16), b"", 0, 16 << 20, 16 << 20)
    assert conn.cost(slow_shm) is Cost.SLOW
    big_aad = frame(Op.SHM_CIPHER, 1, "gcm-siv(aes)", 5, 0, bytes(12), bytes(15 << 20), 0, 16, 4096)
    assert conn.cost(big_aad) is Cost.SLOW  # its associated data comes in the frame: that counts too
    assert conn.cost(frame(Op.CIPHER, "gcm(aes)", 5, 0, bytes(12), b"", bytes(4 << 20))) is Cost.HEAVY
    for big in (frame(Op.CIPHER, "ctr(aes)", 5, 0, bytes(16), b"", bytes(4 << 20)),
                frame(Op.MAC, "hmac(sha512)", 5, bytes(4 << 20)), frame(Op.DIGEST, "sha1", bytes(4 << 20)),
                frame(Op.STREAM_UPDATE, 1, bytes(4 << 20)), batch(2, item=bytes(2 << 20))):
        assert conn.cost(big) is Cost.SLOW
    assert conn.cost(frame(Op.MAC, "hmac(sha512)", 5, bytes(1 << 20))) is Cost.HEAVY
    assert conn.cost(W.Frame(1, Op.BATCH, 0, b"\xff" * 30)) is Cost.QUICK  # malformed: EPROTO at once
    hostile = W.request_schema(Op.BATCH).encode(("hmac(sha256)", 5, 0, [b""] * 70000, [], []))
    assert conn.cost(W.Frame(1, Op.BATCH, 0, hostile)) is Cost.QUICK  # over the limit: E2BIG, nothing summed


def test_the_loop_writes_audit_lines_before_any_reply_leaves(tmp_path):
    """However a reply comes to be sent (end of round, room to write again, backpressure), the audit
    lines held so far are written first."""
    import socket

    from keyden.server.audit import AuditLog
    from keyden.server.config import ServerConfig
    from keyden.server.reactor import Channel, Reactor

    audit = AuditLog.open("audit.log", str(tmp_path))
    reactor = Reactor(ServerConfig(socket=str(tmp_path / "s"), state_dir=str(tmp_path)), None, audit)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    ch = Channel(ours, Connection(KeyStore(), PEER, audit=audit.connection(PEER.pid, PEER.uid, PEER.gid)),
                 lambda: None)
    reactor._channels[ch.fd] = ch
    reactor._epoll.register(ch.fd, 0)
    ch.conn.receive(W.encode_request(1, Op.HELLO, 1, 1, "", "test"))
    assert audit.holding  # the handshake's line, held
    reactor._queue(ch, W.encode_response(2, Op.WHOAMI, (1, 2, 3, 4)))
    assert reactor._flush(ch)  # the path taken when a socket has room again
    assert theirs.recv(4096)
    with open(tmp_path / "audit.log") as f:
        assert '"op": "hello"' in f.read()
    theirs.close()
    reactor._pool.shutdown()


class WorkerBench:
    """A reactor with two workers and no loop running: channels of chosen uids, and work that blocks until
    released, recording the order it started in (the test drives the completions)."""

    def __init__(self, tmp_path):
        import threading

        from keyden.server.config import ServerConfig
        from keyden.server.reactor import Reactor

        self.reactor = Reactor(ServerConfig(socket=str(tmp_path / "s"), state_dir=str(tmp_path), workers=2), None)
        self.started: list[str] = []
        self.release: dict[str, threading.Event] = collections.defaultdict(threading.Event)
        self.lock = threading.Lock()
        self.peer_ends = []  # the clients' ends, kept open

    def channel(self, uid: int):
        import socket

        from keyden.server.reactor import Channel

        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self.peer_ends.append(theirs)
        peer = Peer(pid=4242, uid=uid, gid=uid, groups=frozenset(), start_time=99)
        ch = Channel(ours, Connection(KeyStore(), peer), lambda: None)
        self.reactor._channels[ch.fd] = ch
        self.reactor._epoll.register(ch.fd, 0)
        return ch

    def work(self, name: str):
        release = self.release[name]

        def run() -> bytes:
            with self.lock:
                self.started.append(name)
            assert release.wait(10)
            return W.encode_response(1, Op.PING, (b"",))
        return run

    def wait_until(self, done) -> None:
        for _ in range(1000):
            self.reactor._completions()
            with self.lock:
                if done():
                    return
            time.sleep(0.01)
        raise AssertionError(f"started: {self.started}")

    def close(self) -> None:
        self.reactor._pool.shutdown()
        self.reactor._syncer.shutdown()
        for end in self.peer_ends:
            end.close()


@pytest.mark.parametrize("cost, events, on_the_loop", [
    ("SHORT", 1, ["r1", "r2", "r3"]), ("HEAVY", 1, []), ("SHORT", 2, []), ("QUICK", 2, ["r1", "r2", "r3"])])
def test_a_connections_own_pipeline_sends_only_heavy_requests_to_a_worker(tmp_path, monkeypatch, cost, events,
                                                                          on_the_loop):
    """Requests waiting behind a short one on its own connection would wait for it on a worker too: it
    stays on the loop (a hand-off cost a pipelined 1 MiB AES-GCM call as much as the AES).  A heavy one
    (an RSA-4096 signature: 6 ms) still goes, so the loop stays free for the others; and a short one
    goes too when other connections are waiting (two events in the round)."""
    from keyden.server import reactor as reactor_module
    from keyden.server.cost import Cost

    monkeypatch.setattr(reactor_module, "TURN_SECONDS", 60)  # one turn, however slowly a loaded box runs it
    bench = WorkerBench(tmp_path)
    reactor = bench.reactor
    ch = bench.channel(1001)
    conn = ch.conn
    handled, submitted = [], []
    conn.cost = lambda frame: Cost[cost]
    conn.handle = lambda frame: (handled.append(f"r{frame.request_id}"), W.encode_response(
        frame.request_id, Op.PING, (b"",)))[1]
    reactor._submit = lambda ch, work: (submitted.append(work), setattr(ch, "busy", True))
    conn.feed(b"".join(W.encode_request(i, Op.PING, b"") for i in (1, 2, 3)))
    reactor._round_size = events
    reactor._serve(ch)
    assert handled == on_the_loop
    assert len(submitted) == (0 if on_the_loop else 1)
    bench.close()


def test_one_uid_never_holds_every_worker(tmp_path):
    """Slow requests of one uid beyond half the workers wait for that uid's own to finish; another
    uid's request goes to a worker at once (one user's dh_compute flood must not stall everyone)."""
    bench = WorkerBench(tmp_path)
    reactor, started, release = bench.reactor, bench.started, bench.release
    a = [bench.channel(1001) for _ in range(3)]
    b = bench.channel(1002)
    for i, ch in enumerate(a, 1):
        reactor._submit(ch, bench.work(f"a{i}"))
    reactor._submit(b, bench.work("b1"))
    bench.wait_until(lambda: len(started) >= 2)
    assert started == ["a1", "b1"]  # a2 and a3 wait: uid 1001 has its one worker of two
    release["b1"].set()
    bench.wait_until(lambda: not b.busy)
    assert started == ["a1", "b1"]  # b's worker is free, but a's share is still one
    release["a1"].set()
    bench.wait_until(lambda: len(started) >= 3)
    assert started == ["a1", "b1", "a2"]  # a's next, in order, once its first is done
    reactor._close(a[2])  # closed while waiting: never run, released when its turn comes
    release["a2"].set()
    bench.wait_until(lambda: not a[2].busy)
    assert started == ["a1", "b1", "a2"] and a[2].sock.fileno() == -1
    assert not reactor._busy and not reactor._working and not reactor._waiting_work
    bench.close()


def test_requests_a_worker_takes_up_after_the_stop_are_not_done_and_fsyncs_wait_behind_none(tmp_path):
    """Slow requests of several uids fill the workers and queue behind them.  A persistent change's fsync
    waited in that queue, and a stop dropped its answer after its 5 s grace though the change was made and
    written (found by a race hunt): fsyncs have a thread of their own.  And a request a worker took up
    from the queue after the stop was done, its answer dropped at the close: it is not done now, and the
    replies to what its connection asked before still go out (found by review)."""
    bench = WorkerBench(tmp_path)
    reactor, started, release = bench.reactor, bench.started, bench.release
    a, b, c, d = (bench.channel(uid) for uid in (1001, 1002, 1003, 1004))
    reactor._submit(a, bench.work("a1"))
    reactor._submit(b, bench.work("b1"))
    reactor._submit(c, bench.work("c1"))  # both workers busy: it waits in the pool's queue
    release["sync"].set()
    reactor._sync(d, bench.work("sync"))
    bench.wait_until(lambda: not d.busy)
    assert started == ["a1", "b1", "sync"] and d.out  # answered while the slow ones still run
    earlier = W.encode_response(7, Op.PING, (b"answered before",))
    reactor._queue(c, earlier)  # a reply made before, not written yet (its client reads slowly)
    reactor.stop()
    release["a1"].set()  # a worker is free: it takes c1 up, after the stop
    bench.wait_until(lambda: not a.busy and not c.busy)
    assert "c1" not in started and c.sock.fileno() == -1  # not done; its connection closed unanswered...
    client_c = bench.peer_ends[2]
    client_c.settimeout(5)
    assert client_c.recv(65536) == earlier and client_c.recv(1) == b""  # ...once the earlier reply was out
    release["b1"].set()
    bench.wait_until(lambda: not b.busy)
    bench.close()


def test_work_a_stop_cancels_releases_its_connection(tmp_path):
    """Slow requests whose clients left, one still waiting for a worker: the stop cancels that one, whose
    completion then never came, so its connection was never released (its regions, descriptors and
    connection count kept for good, in an embedding process; found by a lifecycle hunt)."""
    import socket
    import threading

    bench = WorkerBench(tmp_path)
    reactor, release = bench.reactor, bench.release
    a, b, c = (bench.channel(uid) for uid in (1001, 1002, 1003))
    for ch, name in ((a, "a1"), (b, "b1"), (c, "c1")):
        reactor._submit(ch, bench.work(name))  # c1 waits in the pool's queue
    closed = []
    for ch in (a, b, c):
        ch.conn.close = lambda closed_conn=ch.conn, plain=ch.conn.close: (closed.append(closed_conn), plain())
        reactor._close(ch)  # its client left: released once its work comes back
    threading.Timer(0.3, lambda: (release["a1"].set(), release["b1"].set())).start()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "listening"))
    listener.listen()
    reactor.stop()
    reactor.run(listener)  # a1 and b1 come back; c1, taken up after the stop, is not started
    assert "c1" not in bench.started and not reactor._busy
    assert sorted(map(id, closed)) == sorted(map(id, (a.conn, b.conn, c.conn)))  # each released once
    listener.close()
    for end in bench.peer_ends:
        end.close()


def test_a_stop_does_not_wait_past_its_grace_for_work_still_running(tmp_path, monkeypatch):
    """A request still running when the grace is over (a disk that does not answer) kept the stop waiting
    for as long as it ran, the socket still there, new clients hanging on it: now the loop returns, the
    request left to its thread, and says how many it left.  Work not started yet is cancelled, and its
    connection released."""
    import socket

    from keyden.server import reactor as reactor_module

    monkeypatch.setattr(reactor_module, "STOP_GRACE", 0.2)
    bench = WorkerBench(tmp_path)
    reactor, release = bench.reactor, bench.release
    a, b, c, d = (bench.channel(uid) for uid in (1001, 1002, 1003, 1004))
    for ch, name in ((a, "stuck"), (b, "done"), (c, "also stuck"), (d, "queued")):
        reactor._submit(ch, bench.work(name))  # two workers: the last two wait in the pool's queue
    release["done"].set()
    bench.wait_until(lambda: not b.busy and "also stuck" in bench.started)
    closed = []
    for ch in (a, c, d):
        ch.conn.close = lambda closed_conn=ch.conn, plain=ch.conn.close: (closed.append(closed_conn), plain())
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "listening"))
    listener.listen()
    reactor.stop()
    started = time.monotonic()
    reactor.run(listener)
    assert time.monotonic() - started < 2  # it waited as long as "stuck" would run (here: for ever)
    assert reactor.abandoned == 2 and bench.started == ["stuck", "done", "also stuck"]
    assert closed == [d.conn]  # the cancelled one is released; the running ones keep their connections
    release["stuck"].set()
    release["also stuck"].set()  # ... until they end: then they are released (an embedding process goes on)
    assert eventually(lambda: len(closed) == 3) and {id(conn) for conn in closed} == {id(a.conn), id(c.conn),
                                                                                       id(d.conn)}
    assert not reactor._busy
    listener.close()
    for end in bench.peer_ends:
        end.close()


def _is_open(fd: int) -> bool:
    """After every close released so far ran (they run on the closer thread: keyden.descriptors)."""
    from keyden import descriptors

    assert descriptors.drain()
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_descriptors_belong_to_the_request_they_came_with(conn):
    """A descriptor rides on the first byte of its request: a request that is refused before its handler
    runs (a body that does not decode, an op this daemon does not know), or that takes no descriptor,
    must not leave it to the next one."""
    truncated = W.encode_request(5, Op.SHM_ATTACH, 4096)[:-1]
    truncated = W.HEADER.pack(len(truncated) - W.HEADER_SIZE, 5, Op.SHM_ATTACH, 0) + truncated[W.HEADER_SIZE:]
    unknown = W.HEADER.pack(0, 6, 0x7FFE, 0)
    ping = W.encode_request(7, Op.PING, b"")
    for refused in (truncated, unknown, ping):
        small = _memfd(4096)
        (reply,) = responses(conn.receive(refused, [small]))
        assert not _is_open(small)  # closed with its request, not left for the next
        big = _memfd(8192)
        (attached,) = responses(conn.receive(W.encode_request(8, Op.SHM_ATTACH, 8192), [big]))
        assert attached.status == 0, W.decode_error(attached.body)  # its own memfd, not the one before
    # Pipelined in one read, the descriptor behind the first request: the second, which carries it, takes it.
    memfd = _memfd(4096)
    replies = responses(conn.receive(ping + W.encode_request(9, Op.SHM_ATTACH, 4096), [memfd]))
    assert [r.status for r in replies] == [0, 0]
    assert conn.context.fds == []


def test_descriptors_in_the_same_read_as_hello_wait_for_it():
    """A client may pipeline its first requests behind HELLO; a descriptor among them is kept, and one
    sent with a refused HELLO is closed with the connection."""
    c = Connection(KeyStore(), PEER)
    memfd = _memfd(4096)
    replies = responses(c.receive(W.encode_request(1, Op.HELLO, 1, 1, "", "test") +
                                  W.encode_request(2, Op.SHM_ATTACH, 4096), [memfd]))
    assert [r.status for r in replies] == [0, 0] and c.context.fds == []
    c.close()
    refused = Connection(KeyStore(), PEER)
    memfd = _memfd(4096)
    responses(refused.receive(W.encode_request(1, Op.HELLO, 7, 9, "", "future"), [memfd]))
    assert refused.closed and not _is_open(memfd)


def test_descriptors_piled_onto_a_handshake_are_bounded():
    """A client may split its HELLO into one-byte writes, each carrying descriptors: the daemon keeps a
    few messages for the requests behind it, and closes the rest at once."""
    from keyden.server.handlers import MAX_PENDING_FDS

    c = Connection(KeyStore(), PEER)
    hello = W.encode_request(1, Op.HELLO, 1, 1, "", "test")
    sent = []
    for i in range(len(hello) - 1):
        r, w = os.pipe()
        os.close(w)
        sent.append(r)
        assert c.receive(hello[i:i + 1], [r]) == b""
    assert sum(map(_is_open, sent)) == MAX_PENDING_FDS  # the first few, waiting for the handshake
    (reply,) = responses(c.receive(hello[-1:]))
    assert reply.status == 0
    assert not any(map(_is_open, sent)) and c.context.fds == []  # they came with HELLO, which took none


class _Pending(NullJournal):
    """A journal whose change ``noted`` (a mark) is on its way to disk, and never gets there."""

    noted = 0
    dirty: set[int] = set()  # keys with a change noted

    def pending(self) -> int:
        return self.noted

    def pending_for(self, serial: int) -> bool:
        return serial in self.dirty

    def synced(self, upto: int) -> bool:
        return upto <= 0


def test_a_reply_that_may_show_a_change_not_yet_on_disk_waits_for_it():
    """Another connection's persistent change, noted but not yet written: a read now could hand out a
    value a crash would take back, so this reply waits for the same write (and a quiet store costs
    nothing)."""
    store = KeyStore()
    store.journal = _Pending()
    c = Connection(store, PEER)
    assert hello(c).status == 0
    c.handle(W.Frame(2, Op.WHOAMI, 0, b""))
    assert c.unsynced == 0 and not c.needs_sync()
    store.journal.noted = 7  # e.g. an update by another connection, its write still to come
    frame = W.Frame(3, Op.WHOAMI, 0, b"")
    reply = c.handle(frame)
    assert c.unsynced == 7 and c.needs_sync() and not c.changed

    def failing_write(upto):
        raise E.EIO("the disk failed")

    store.journal.sync = failing_write  # the writer is told; this reader gets its answer all the same
    assert c.durable(frame, reply, c.unsynced, c.changed) == reply
    assert responses(c.durable(frame, reply, c.unsynced, True))[0].status == E.EIO.code


def test_a_reply_that_shows_no_persistent_key_does_not_wait_for_others_writes():
    """Every request waited for any pending write, whatever it showed: one uid making persistent changes
    back to back slowed every other uid's pings and cipher calls to its writes' pace (found by a fairness
    hunt).  A request that reads no key, or uses one in no persistent keyring, now goes at once; one that
    uses a key in a persistent keyring, or one that is gone, still waits."""
    store = KeyStore()
    store.journal = _Pending()
    store.journal.noted = 7  # another connection's change, its write still to come
    c = Connection(store, PEER)
    assert hello(c).status == 0
    key = responses(c.handle(W.Frame(2, Op.ADD, 0, W.request_schema(Op.ADD).encode(
        ("user", "kd:plain", b"k" * 32, -4, b"")))))[0]
    serial = W.response_schema(Op.ADD).decode(key.body)[0]

    def waits(op, *args) -> bool:
        reply = responses(c.handle(W.Frame(3, op, 0, W.request_schema(op).encode(args))))[0]
        assert reply.status == 0 or op == Op.MAC and args[1] == 2**31 - 1, reply
        return c.needs_sync()

    assert not waits(Op.PING, b"x")
    assert not waits(Op.DIGEST, "sha256", b"x")
    assert not waits(Op.MAC, "hmac(sha256)", serial, b"x")  # a key in no persistent keyring
    assert waits(Op.MAC, "hmac(sha256)", 2**31 - 1, b"x")  # gone: its removal may be the change on its way
    assert waits(Op.DESCRIBE, serial)  # not one of the single-key uses: as before
    store._keys[serial].persisted = True  # as if linked under a persistent keyring
    assert waits(Op.MAC, "hmac(sha256)", serial, b"x")
    store._keys[serial].persisted = False
    store.journal.dirty = {serial}  # no longer persistent, but its unlink (or an update before) not yet written
    assert waits(Op.MAC, "hmac(sha256)", serial, b"x")  # (found by review)
    store.journal.dirty = set()
    stream = W.response_schema(Op.STREAM_INIT).decode(responses(c.handle(W.Frame(
        4, Op.STREAM_INIT, 0, W.request_schema(Op.STREAM_INIT).encode(("hmac(sha256)", serial, 0, b"", b"")))))[0].body)[0]
    assert not waits(Op.STREAM_UPDATE, stream, b"more")
    store.journal.dirty = {serial}  # a stream's step checks its key again: a revoke on its way shows there
    assert waits(Op.STREAM_UPDATE, stream, b"more")  # (found by review)


def test_a_batch_over_the_item_limit_is_refused_on_the_loop_at_once():
    """Refused by the decoder before any item is made, it is cheap: no worker is spent on it."""
    from keyden.server.cost import Cost, request_cost

    conn = Connection(KeyStore(), PEER)
    assert hello(conn).status == 0
    body = W.SCHEMAS[Op.BATCH][0].encode(("hmac(sha256)", 1, 0, [], [], [b""] * (W.MAX_BATCH + 1)))
    frame = W.Frame(7, Op.BATCH, 0, body)
    assert request_cost(conn.store, frame) is Cost.QUICK
    # A list over the limit after full ones is met only once those are made (131072 items): a worker's job.
    behind = W.SCHEMAS[Op.BATCH][0].encode(("gcm(aes)", 1, 0, [bytes(12)] * W.MAX_BATCH, [b"a"] * W.MAX_BATCH,
                                            [b""] * (W.MAX_BATCH + 1)))
    assert request_cost(conn.store, W.Frame(8, Op.BATCH, 0, behind)) is Cost.SLOW
    (reply,) = responses(conn.receive(W.encode_frame(7, Op.BATCH, 0, body)))
    assert reply.status == E.E2BIG.code
