"""`keyden tls-proxy`: curl -> the proxy (TLS in keyden) -> a plain HTTP server on loopback.

The proxy is a real subprocess given only a session and a keyring; the certificates and keys are
loaded by the test.  Upstream is Python's http.server over TCP or a Unix socket, or, for
--proxy-protocol, an echo server that reads the PROXY v2 header with a parser of this file's own.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import ipaddress
import os
import queue
import resource
import select
import signal
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from keyden.protocol import Op

try:
    from tests.test_tls import (TIMEOUT, Pki, end_without_close_notify, how_it_ended, load, read_until,
                                send_close_notify)
except ImportError:  # pytest's rootdir-relative import
    from test_tls import (TIMEOUT, Pki, end_without_close_notify, how_it_ended, load, read_until,
                          send_close_notify)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"hello from upstream, {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(daemon, client, pki):
    """Start `keyden tls-proxy` in the test's session; returns its port."""
    load(client, pki.ec_server, pki.rsa_server)
    started = []

    def start(*args: str, listen: str = "127.0.0.1:0", fd_limit: int | None = None) -> int:
        env = dict(os.environ, KEYDEN_SESSION=client.session_token,
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))) if fd_limit else None
        proc = subprocess.Popen([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy",
                                 "--listen", listen, "--keyring", "@s", "--shutdown-timeout", "0", *args],  # (a
                                # test's own --shutdown-timeout wins: the last one does)
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
        start.procs = started
        started.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("tls-proxy: listening on " + listen[:-1]), line + proc.stderr.read().decode()
        return int(line.split(" on ", 1)[1].split(",", 1)[0].rpartition(":")[2])

    yield start
    stopped = []
    for proc in started:
        if proc.poll() is None:
            proc.terminate()
            try:
                stopped.append(proc.wait(TIMEOUT))
            except subprocess.TimeoutExpired:
                proc.kill()  # (never left behind)
                stopped.append(f"no exit at SIGTERM: {proc.wait()}")
        proc.stdout.close()
        proc.stderr.close()
    assert all(status == 0 for status in stopped), stopped


def curl(port: int, pki: Pki, *extra: str, name: str = "a.test") -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(TIMEOUT), "--cacert", pki.ca.cert_path, *extra,
                           "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/path"],
                          capture_output=True, timeout=TIMEOUT + 5)


def test_curl_through_the_proxy_to_a_tcp_upstream(proxy, upstream, pki):
    port = proxy("--forward", upstream, "--alpn", "http/1.1")
    for name in ("a.test", "rsa.test"):  # SNI picks each certificate; a fresh connection each time
        out = curl(port, pki, name=name)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == b"hello from upstream, /path"


def test_forward_to_a_unix_socket(proxy, pki, tmp_path):
    path = str(tmp_path / "upstream.sock")
    server = UnixHttpServer(path, Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = proxy("--forward", f"unix:{path}")
        out = curl(port, pki)
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == b"hello from upstream, /path"
    finally:
        server.shutdown()
        server.server_close()


def test_past_max_connections_a_new_connection_is_closed_at_once(proxy, upstream, pki):
    """--max-connections 1: while one connection holds the slot (its handshake not begun), the next is
    closed at once, not left waiting for --handshake-timeout; once it is let go, clients are served again."""
    port = proxy("--forward", upstream, "--max-connections", "1", "--handshake-timeout", "60")
    held = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # the proxy takes the held connection first; the next one finds no slot
            refused = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            started = time.monotonic()
            with refused:
                closed = refused.recv(1) == b""
            if closed or time.monotonic() > deadline:
                break
        assert closed and time.monotonic() - started < 30
    finally:
        held.close()
    deadline = time.monotonic() + TIMEOUT
    while (out := curl(port, pki)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.2)  # until the proxy has seen the held connection go
    assert out.stdout == b"hello from upstream, /path", out.stderr.decode()


def test_mutual_tls_through_the_proxy(client, proxy, upstream, pki):
    trust = client.newring("proxy-client-trust")
    load(client, pki.client_ca, ring=trust, with_keys=False)
    port = proxy("--forward", upstream, "--client-trust", str(trust), "--require-client-cert")
    out = curl(port, pki, "--cert", pki.client.cert_path, "--key", pki.client.key_path)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello from upstream, /path"
    refused = curl(port, pki)  # no client certificate
    assert refused.returncode != 0 and refused.stdout == b""
    rogue = pki.issue("rogue client", issuer=pki.rogue_ca)
    refused = curl(port, pki, "--cert", rogue.cert_path, "--key", rogue.key_path)
    assert refused.returncode != 0 and refused.stdout == b""
    # A peer's failed handshake (no certificate: ENOKEY) is the peer's, never the configuration's: served on.
    again = curl(port, pki, "--cert", pki.client.cert_path, "--key", pki.client.key_path)
    assert again.returncode == 0 and again.stdout == b"hello from upstream, /path"


def test_with_every_slot_taken_an_idle_connection_of_the_busiest_host_gives_way(proxy, upstream, pki):
    """Eight hosts within their per-host share (or an IPv6 attacker's many /64s) held every slot with
    silent connections, for the idle timeout's twelve hours (a remote-peer hunt).  With every slot taken,
    a connection idle for --evict-idle seconds now gives way: of the host holding the most, its idlest (a
    host with one connection loses it last).  It is cut short, as at a stop: a request may be waiting for a
    slow answer, which must not look whole (no close_notify; found by review)."""
    port = proxy("--forward", upstream, "--max-connections", "3", "--evict-idle", "2")  # (hosts: 32 each)
    request = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"
    answer = b"hello from upstream, /"  # (the body ends the answer)
    with tls_to(port, pki, source="127.0.0.2") as alone, tls_to(port, pki) as second, tls_to(port, pki) as third:
        for tls in (alone, second, third):  # relayed: an answer comes back, then silence
            tls.sendall(request)
            read_until(tls, answer)
        assert curl(port, pki).returncode != 0  # none idle for two seconds yet: no slot
        time.sleep(2.5)
        third.sendall(request)  # not idle any more
        read_until(third, answer)
        out = curl(port, pki)
        assert out.stdout == b"hello from upstream, /path", out.stderr.decode()
        assert how_it_ended(second) == "FIN"  # 127.0.0.1 held two: its idle one went, without close_notify
        alone.sendall(request)  # the idlest of all, but its host's only connection
        read_until(alone, answer)


def test_unreachable_upstream_ends_the_connection_without_close_notify(proxy, pki):
    """An answer nobody gave must not look whole: the client got close_notify and no data, an empty and
    complete answer where one ends with its connection (found by a hunt).  Its session is aborted."""
    port = proxy("--forward", "unix:/nonexistent/keyden-test.sock")
    out = curl(port, pki)
    assert out.returncode != 0 and out.stdout == b""
    with tls_to(port, pki) as tls:
        tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert how_it_ended(tls) == "FIN"


def test_a_configuration_keyden_refuses_stops_the_proxy_at_start(daemon, client):
    env = dict(os.environ, KEYDEN_SESSION=client.session_token)
    out = subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy",
                          "--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", "127.0.0.1:9"],
                         capture_output=True, timeout=TIMEOUT, cwd=REPO, env=env)
    assert out.returncode == 1 and out.stdout == b""
    assert b"no certificate with its private key in the keyring" in out.stderr


def test_a_listen_address_that_cannot_be_used_is_one_plain_line(daemon, client, pki):
    """The system's reason only: socket.create_server appends the address as a Python tuple, and a resolver
    error's negative number has no strerror ("Unknown error -2")."""
    load(client, pki.ec_server)
    env = dict(os.environ, KEYDEN_SESSION=client.session_token)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        said = {}
        for listen in (f"127.0.0.1:{busy.getsockname()[1]}", "nosuch.invalid:8443"):
            out = subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy", "--listen",
                                  listen, "--keyring", "@s", "--forward", "127.0.0.1:9"],
                                 capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env)
            assert out.returncode == 1 and out.stderr.startswith(f"tls-proxy: cannot listen on {listen}: "), out.stderr
            said[listen] = out.stderr
    busy_line, unresolved_line = said.values()
    assert busy_line.endswith(": Address already in use\n")
    assert unresolved_line.count("\n") == 1 and "while attempting" not in unresolved_line
    assert "Unknown error" not in unresolved_line


def test_usage_errors(daemon):
    whole = ["--keyring", "@s", "--forward", "127.0.0.1:1"]
    for args in (["--listen", "127.0.0.1:0"], ["--listen", "nowhere", "--keyring", "@s", "--forward", "x:1"],
                 ["--listen", "127.0.0.1:99999", *whole], ["--listen", "127.0.0.1:0", "--max-connections", "-1", *whole],
                 ["--listen", "127.0.0.1:0", "--max-connections", "0", *whole],
                 *(["--listen", "127.0.0.1:0", "--handshake-timeout", t, *whole] for t in ("0", "500", "nan")),
                 *(["--listen", "127.0.0.1:0", "--close-timeout", t, *whole] for t in ("0", "-1", "4000", "nan", "x")),
                 *(["--listen", "127.0.0.1:0", "--idle-timeout", t, *whole] for t in ("-1", "0.5", "1e9", "nan", "x")),
                 *(["--listen", "127.0.0.1:0", "--shutdown-timeout", t, *whole] for t in ("-1", "1e9", "nan", "x")),
                 # a backend that cannot be: it failed each connection, not the start (found by review)
                 *(["--listen", "127.0.0.1:0", "--keyring", "@s", "--forward", f] for f in ("unix:", ":80",
                                                                                           "127.0.0.1:0", "[]:80"))):
        out = subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy", *args],
                             capture_output=True, timeout=TIMEOUT, cwd=REPO)
        assert out.returncode == 2, (args, out.stderr.decode())
        assert b"Traceback" not in out.stderr and b"listening" not in out.stdout, args


@pytest.mark.parametrize("keep", ["session", "persistent"])
def test_a_proxy_whose_daemon_restarts_stops_with_exit_1_unless_its_keyring_is_there_again(pki, upstream, keep):
    """docs/tls.md: if the daemon goes away, the proxy stops with exit 1 at the next connection, so that its
    supervisor starts it again.  Its client used to reconnect by itself and the proxy refused every client
    from then on, alive: a keyring named by serial is gone with the old daemon's session.  In the persistent
    keyring, linked into @s with no session (the unit's ExecStartPre), it is there again, linked again by
    the new daemon: the proxy goes on serving."""
    from tests.conftest import Daemon

    d = Daemon().start()
    proc = None
    try:
        with d.connect() as boot:
            _serial, token = boot.join_session()
        c = d.connect(session=token)
        ring = c.newring("web", c.get_persistent("@s") if keep == "persistent" else "@s")
        load(c, pki.ec_server, ring=ring)
        c.close()
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("KEYDEN_SESSION", None)
        if keep == "session":
            env["KEYDEN_SESSION"] = token
        else:  # what a unit's ExecStartPre does: link the persistent keyring into the user session keyring
            subprocess.run([sys.executable, "-m", "keyden", "--socket", d.socket, "get_persistent", "@s"], env=env,
                           check=True, capture_output=True, timeout=TIMEOUT)
        proc = subprocess.Popen([sys.executable, "-m", "keyden", "--socket", d.socket, "tls-proxy",
                                 "--listen", "127.0.0.1:0", "--keyring", str(ring), "--forward", upstream],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = proc.stdout.readline().decode()
        assert line.startswith("tls-proxy: listening on 127.0.0.1:"), line + proc.stderr.read().decode()
        port = int(line.split(":")[2].split(",")[0])
        assert curl(port, pki).stdout == b"hello from upstream, /path"
        d.stop()
        d.start()  # the same socket and state: the persistent keyring is back, linked into @us again
        if keep == "persistent":
            assert curl(port, pki).stdout == b"hello from upstream, /path"
            assert proc.poll() is None
            return
        assert curl(port, pki).returncode != 0
        assert proc.wait(TIMEOUT) == 1
        said = proc.stderr.read().decode()
        assert "keyden no longer serves this configuration" in said, said
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        d.cleanup()


@pytest.mark.parametrize("request_error, outcome_error, probe_error, stops", [
    (None, "ENOKEY", None, False),       # a peer without the client certificate asked for: its own failure
    (None, "EKEYEXPIRED", "ENOKEY", False),  # ... an expired one: never a probe, whatever it would say
    ("EAGAIN", None, None, False),       # a limit other connections reached (handshakes per peer)
    ("EACCES", None, "EMFILE", False),   # refused, but the probe meets a session limit: not the configuration
    ("ENOKEY", None, "ENOKEY", True),    # the keyring is gone, and the probe confirms it
    ("EKEYREVOKED", None, "EKEYREVOKED", True),
])
def test_only_the_configuration_stops_the_proxy(monkeypatch, request_error, outcome_error, probe_error, stops):
    """In-process, with keyden's answers chosen: a remote peer can fail its own handshake as it likes (it
    used to make the proxy probe keyden, and a probe refused for a limit stopped the proxy)."""
    from keyden import errors as E
    from keyden import proxy as proxy_module

    calls = []

    def start_accept(client, sock, keyring, **options):
        calls.append(sock)
        error = request_error if len(calls) == 1 else probe_error
        if error:
            raise getattr(E, error)("chosen by the test")
        mine, theirs = socket.socketpair()
        theirs.close()
        return mine

    def established(plain, timeout):
        if outcome_error:
            raise getattr(E, outcome_error)("chosen by the test")

    monkeypatch.setattr(proxy_module.client_tls, "start_accept", start_accept)
    monkeypatch.setattr(proxy_module.client_tls, "established", established)
    monkeypatch.setattr(proxy_module, "splice", lambda a, b: (a.close(), b.close()))
    client = type("Answering", (), {"ping": lambda self, data: data})()
    proxy = proxy_module.Proxy(client, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent/upstream.sock", 1)
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as conn:
        assert proxy._admit(("192.0.2.1", 4242)) == ""  # as run() does before handing a connection over
        proxy._serve(conn, ("192.0.2.1", 4242), listener)
    assert proxy.lost_keyden is stops and not proxy.per_host  # what it took is given back
    probed = request_error in ("ENOKEY", "EACCES", "EKEYREVOKED")
    assert len(calls) == 1 + probed  # a probe only for a refusal of the request that names the keyring


def test_a_handshake_that_ends_after_the_proxy_was_stopped_is_not_keyden_lost(monkeypatch):
    """SIGTERM stops the proxy while handshakes run, and the CLI then closes its client under them.  A peer's
    reset then made a thread probe keyden on the closed client, take that for keyden gone, and shut the
    closed listener down: a traceback on the way out, in a CI run."""
    from keyden import errors as E
    from keyden import proxy as proxy_module

    stopped = threading.Event()

    def established(plain, timeout):
        stopped.wait(TIMEOUT)  # the handshake still runs when the proxy stops
        raise E.ECONNRESET("the peer closed the connection during the TLS handshake")

    def ping(self, data):
        raise E.ECONNRESET("the client is closed")  # as a closed keyden.Client says

    monkeypatch.setattr(proxy_module.client_tls, "start_accept", lambda *args, **options: socket.socket())
    monkeypatch.setattr(proxy_module.client_tls, "established", established)
    running = proxy_module.Proxy(type("Closed", (), {"ping": ping})(), 1234, {"handshake_timeout": 1.0},
                                 "unix:/nonexistent", 8)

    class Signalled(socket.socket):
        def accept(self):
            running.stop()  # what the CLI's SIGTERM handler does, the accept waiting
            return super().accept()

    listener = Signalled()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = ("192.0.2.1", 4242)
    assert running._admit(peer) == ""
    serving = threading.Thread(target=running._serve, args=(socket.socket(), peer, listener))
    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    serving.start()
    try:
        running.run(listener)
        assert listener.fileno() == -1  # run() closes its listener on the way out
        assert running.open_connections() == 1 and running.drain(0.1) == 1  # the handshake still runs
    finally:
        stopped.set()
        serving.join(TIMEOUT)
    assert not failures and not running.lost_keyden and running.open_connections() == 0


def _tls_to(port: int, pki: Pki) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    return context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT), server_hostname="a.test")


def _wait_for_line(stream, text: str) -> str:
    """What ``stream`` (a pipe) says up to the end of the line holding ``text``, not a byte more; within
    TIMEOUT (a proxy that never says it must fail the test, not hang it)."""
    seen = b""
    deadline = time.monotonic() + TIMEOUT
    while text.encode() not in seen or not seen.endswith(b"\n"):
        assert select.select([stream], [], [], max(0.0, deadline - time.monotonic()))[0], seen.decode()
        byte = os.read(stream.fileno(), 1)  # (a buffered read could take the lines after it too)
        assert byte, seen.decode()
        seen += byte
    return seen.decode()


def test_a_stopped_proxy_lets_its_open_connections_finish(proxy, upstream, pki):
    """SIGTERM: no new connections; a request under way still gets its answer, and the proxy exits 0 as
    soon as its last connection has ended, not at --shutdown-timeout.  A signal right after the first (a
    supervisor's and a wrapper's, passing on one stop) does not cut it short."""
    port = proxy("--forward", upstream, "--shutdown-timeout", "600")
    (proc,) = proxy.procs
    with _tls_to(port, pki) as tls:
        tls.sendall(b"GET /under-way HTTP/1.1\r\nHost: a.test\r\n")  # half a request
        proc.terminate()
        proc.send_signal(signal.SIGINT)
        _wait_for_line(proc.stderr, "tls-proxy: stopping: waiting up to 600 s for 1 open connection to end")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        tls.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from upstream, /under-way")
    assert proc.wait(TIMEOUT) == 0  # (well before 600 s)
    assert proc.stderr.read() == b""


@pytest.mark.parametrize("how", ["timeout", "another signal"])
def test_a_stopped_proxy_cuts_what_is_still_open(proxy, upstream, pki, how):
    """An idle keep-alive connection does not end by itself: it is cut at --shutdown-timeout, or at once on
    another SIGTERM or SIGINT, however many come and however fast.  Exit 0 either way: a stop asked for."""
    port = proxy("--forward", upstream, "--shutdown-timeout", "1" if how == "timeout" else "600")
    (proc,) = proxy.procs
    with _tls_to(port, pki) as tls:
        tls.sendall(b"GET /kept HTTP/1.1\r\nHost: a.test\r\n\r\n")
        read_until(tls, b"hello from upstream, /kept")  # (headers and body may come apart)
        proc.terminate()
        _wait_for_line(proc.stderr, "to end (another SIGTERM or SIGINT: stop now)")  # (said once the first is in)
        if how == "another signal":
            time.sleep(1.1)  # (one within a second of the first is its echo)
            for _ in range(20):  # a handler that raised could land in the drain's lock handling: a hang, a traceback
                proc.send_signal(signal.SIGINT)
                proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        assert proc.stderr.read().decode() == "tls-proxy: stopping: 1 open connection cut\n"
        assert how_it_ended(tls) == "FIN"  # cut: it may have been half an answer, which no close_notify vouches for


def test_a_stop_that_wakes_nothing_still_ends_the_accept_loop():
    """A signal that comes after Python's last check but before accept(2) sleeps interrupts nothing: its
    handler runs only at the next bytecode, which a quiet listener never reached (then SIGKILL, no drain).
    Here the flag is set with no wake at all."""
    from keyden import proxy as proxy_module

    running = proxy_module.Proxy(None, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent", 8)
    listener = socket.create_server(("127.0.0.1", 0))
    serving = threading.Thread(target=running.run, args=(listener,), daemon=True)
    serving.start()
    time.sleep(0.2)  # in accept now
    running.stop_requested = True
    serving.join(TIMEOUT)
    try:
        assert not serving.is_alive() and listener.fileno() == -1
    finally:
        if serving.is_alive():
            listener.shutdown(socket.SHUT_RDWR)


def test_connection_threads_leave_the_stop_signals_to_the_main_thread():
    """The kernel gives a process's signal to any thread that does not block it; its Python handler runs
    only when the main thread wakes.  Two in a row went to connection threads, and accept() slept on."""
    from keyden import proxy as proxy_module

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    seen = []
    thread = threading.Thread(target=lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    proxy_module._start_unsignalled(thread)
    thread.join(TIMEOUT)
    assert {signal.SIGTERM, signal.SIGINT} <= seen[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # the main thread's own, as it was


def test_a_connection_no_thread_can_serve_is_closed_and_the_proxy_goes_on(monkeypatch, capsys):
    """A limit on threads (RuntimeError: can't start new thread) ended the proxy with a traceback, holding
    the connection's slot; it is now said (at most every 10 s), like a want of descriptors."""
    from keyden import proxy as proxy_module

    running = proxy_module.Proxy(None, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent", 8)
    tried = []

    def no_thread(thread):
        tried.append(thread)
        if len(tried) == 2:
            running.stop()
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(proxy_module, "_start_unsignalled", no_thread)
    listener = socket.create_server(("127.0.0.1", 0))
    clients = [socket.create_connection(listener.getsockname(), timeout=TIMEOUT) for _ in range(2)]
    running.run(listener)
    assert len(tried) == 2 and running.open_connections() == 0 and running.slots.acquire(blocking=False)
    assert [c.recv(1) for c in clients] == [b"", b""]  # each closed
    assert capsys.readouterr().err == \
        "tls-proxy: cannot start a thread for a connection now (can't start new thread); closed it\n"
    for c in clients:
        c.close()


def test_a_connection_whose_relay_cannot_start_its_threads_lets_go_of_its_sockets(monkeypatch):
    from keyden import proxy as proxy_module

    def refused(self):
        raise RuntimeError("can't start new thread")

    a, a_peer = socket.socketpair()
    b, b_peer = socket.socketpair()
    relay = proxy_module.Proxy(None, 0, {}, None, 1)
    monkeypatch.setattr(threading.Thread, "start", refused)
    with pytest.raises(RuntimeError):
        with relay._held(a) as live, b:  # as the serving thread holds them
            assert live
            proxy_module.splice(a, b, idle_timeout=5.0)
    assert not relay.relaying
    assert a.fileno() == -1 and b.fileno() == -1  # (the serving thread reports it; nothing leaks)
    a_peer.close()
    b_peer.close()


class _RecordingKeyden:
    """Stands in for the proxy's keyden client: records the TLS_ABORTs it is sent; ``hang`` holds them."""

    def __init__(self, hang: threading.Event | None = None):
        self.aborted: list[int] = []
        self.hang = hang

    def _call_with_fds(self, op, args, fds):
        assert op == Op.TLS_ABORT and args == ()
        if self.hang is not None:
            self.hang.wait(TIMEOUT)
        self.aborted.append(os.fstat(fds[0]).st_ino)
        return ()


def test_a_connection_that_reaches_the_relay_after_a_cut_is_ended_at_once():
    """A stop's cut names the connections being relayed; one still in its handshake then must not relay
    afterwards, with nobody left to cut it: it is aborted as it arrives."""
    from keyden import proxy as proxy_module

    keyden = _RecordingKeyden()
    relay = proxy_module.Proxy(keyden, 0, {}, None, 1)
    relay.cut()
    a, a_peer = socket.socketpair()
    inode = os.fstat(a.fileno()).st_ino
    with relay._held(a) as live:
        assert not live  # nothing is relayed
    assert keyden.aborted == [inode] and a.fileno() == -1 and not relay.relaying
    a_peer.close()


def test_a_cut_out_of_descriptors_still_aborts_every_connection():
    """A stop that came while the descriptors had run out ended the proxy with a traceback: the cut's
    duplicate of a relayed socket failed (EMFILE).  That socket is now aborted as it is, under the lock."""
    import errno

    from keyden import proxy as proxy_module

    class Undoubled(socket.socket):
        def dup(self):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    keyden = _RecordingKeyden()
    relay = proxy_module.Proxy(keyden, 0, {}, None, 1)
    a, a_peer = socket.socketpair()
    b = Undoubled(fileno=a.detach())
    c, c_peer = socket.socketpair()
    relay.relaying.update((b, c))
    relay.cut()
    assert sorted(keyden.aborted) == sorted(os.fstat(s.fileno()).st_ino for s in (b, c))
    assert b.fileno() != -1  # (not closed by the cut: its relay's thread closes it)
    for s in (b, a_peer, c, c_peer):
        s.close()


def test_a_cut_that_keyden_does_not_answer_holds_the_stop_only_so_long(monkeypatch):
    from keyden import proxy as proxy_module

    monkeypatch.setattr(proxy_module, "CUT_TIMEOUT", 0.3)
    hang = threading.Event()
    relay = proxy_module.Proxy(_RecordingKeyden(hang), 0, {}, None, 1)
    a, a_peer = socket.socketpair()
    relay.relaying.add(a)
    started = time.monotonic()
    relay.cut()
    assert time.monotonic() - started < 2
    hang.set()
    for s in (a, a_peer):
        s.close()


def test_a_proxy_out_of_descriptors_waits_and_goes_on(proxy, upstream, pki):
    """accept(2) failing for want of descriptors (EMFILE) ended the proxy with a traceback.  It now says so,
    pauses, and serves again once connections have gone."""
    port = proxy("--forward", upstream, "--max-connections", "200", "--max-connections-per-host", "200",
                 "--handshake-timeout", "2", fd_limit=40)
    silent = []
    try:
        for _ in range(60):  # more than 40 descriptors' worth: the proxy's accept runs out
            silent.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        time.sleep(1)
    finally:
        for conn in silent:
            conn.close()
    deadline = time.monotonic() + TIMEOUT
    while (out := curl(port, pki)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    assert out.stdout == b"hello from upstream, /path", out.stderr.decode()
    (proc,) = proxy.procs
    assert proc.poll() is None
    proc.terminate()
    proc.wait(TIMEOUT)
    err = proc.stderr.read().decode()
    assert "Traceback" not in err
    # one report a line, whole, though many connections' threads report at once (print() wrote two pieces)
    assert all(line.startswith("tls-proxy: ") and line.count("tls-proxy: ") == 1 for line in err.splitlines()), err


def test_an_accept_that_fails_for_want_of_descriptors_is_said_once_and_tried_again(capsys):
    """Where the descriptors run out first (the accept, or a descriptor keyden passes back) is a race: this
    takes the accept's side every time."""
    import errno

    from keyden import proxy as proxy_module

    running = proxy_module.Proxy(None, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent", 8)

    class Listener(socket.socket):  # (run() closes it on the way out)
        calls = 0

        def accept(self):
            self.calls += 1
            if self.calls <= 3:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            running.lost_keyden = True  # (how the loop ends: keyden gone, the listener shut)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    started = time.monotonic()
    running.run(Listener())
    assert time.monotonic() - started >= 3 * proxy_module.ACCEPT_PAUSE  # a pause after each, not a busy loop
    assert capsys.readouterr().err == "tls-proxy: cannot accept a connection now (Too many open files); trying again\n"

    class Closed(socket.socket):
        def accept(self):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))

    with pytest.raises(OSError):  # anything else is not passed over
        proxy_module.Proxy(None, 1234, {}, "unix:/nonexistent", 8).run(Closed())


def test_one_host_holds_at_most_its_share_of_the_proxys_connections():
    """Handshakes per peer were limited, finished connections not: one host that completed 256 handshakes
    and then said nothing held every slot for --idle-timeout (12 h), and every other client was closed."""
    from keyden import proxy as proxy_module

    proxy = proxy_module.Proxy(None, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent", 8, max_per_host=3)
    greedy, other = ("192.0.2.1", 1), ("192.0.2.2", 1)
    assert [proxy._admit(greedy) for _ in range(3)] == [""] * 3
    assert "too many connections from 192.0.2.1" in proxy._admit(greedy)
    assert [proxy._admit(other) for _ in range(3)] == [""] * 3
    proxy._left(greedy)
    assert proxy._admit(greedy) == ""  # its share again, once one has ended
    third = ("192.0.2.3", 1)
    assert [proxy._admit(third) for _ in range(2)] == ["", ""]  # all 8 held now
    assert proxy._admit(("192.0.2.4", 1)) == "too many connections; closed"
    for peer in [greedy] * 3 + [other] * 3 + [third] * 2:
        proxy._left(peer)
    assert not proxy.per_host and proxy.slots.acquire(blocking=False)
    proxy.slots.release()
    # An IPv6 /64 is one host (one host holds a whole /64): its addresses took every slot, one each.
    same_64 = [(f"2001:db8::{i:x}", 1, 0, 0) for i in range(4)]
    assert [proxy._admit(peer) for peer in same_64] == ["", "", "", "too many connections from 2001:db8::/64 "
                                                        "(--max-connections-per-host); closed"]
    assert proxy._admit(("2001:db8:0:1::1", 1, 0, 0)) == ""  # another /64: another host
    assert proxy._admit(("::ffff:192.0.2.9", 1, 0, 0)) == ""  # IPv4-mapped: its IPv4 address
    assert "192.0.2.9" in proxy.per_host


def test_the_upstream_connection_sends_small_writes_at_once():
    """What the proxy reads it writes upstream at once: Nagle would hold a short write back behind one not
    yet acknowledged, 40 ms with a delayed ACK (an HTTP request's last bytes, a reply's)."""
    from keyden import proxy as proxy_module

    with socket.create_server(("127.0.0.1", 0)) as upstream:
        proxy = proxy_module.Proxy(None, 1234, {}, upstream.getsockname(), 1)
        with proxy._connect_forward() as forward:
            assert forward.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


# ------------------------------------------------------------------ --proxy-protocol

PROXY_V2_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])
TCP_OVER_IPV4, TCP_OVER_IPV6 = (1, 1), (2, 1)  # (family, transport) nibbles
ALPN, AUTHORITY, SSL_TLV, SSL_VERSION, SSL_CN, SSL_CIPHER = 0x01, 0x02, 0x20, 0x21, 0x22, 0x23


def parse_proxy_v2(header: bytes) -> dict:
    """A PROXY protocol v2 header as the spec lays it out, read without keyden's code (or struct)."""
    assert header[:12] == PROXY_V2_SIGNATURE
    assert len(header) == 16 + int.from_bytes(header[14:16], "big")
    family = header[13] >> 4
    size, address = {1: (4, ipaddress.IPv4Address), 2: (16, ipaddress.IPv6Address)}[family]
    body = header[16:]
    ports = body[2 * size:2 * size + 4]
    tlvs = parse_tlvs(body[2 * size + 4:])
    ssl_tlv = tlvs.get(SSL_TLV)
    return {"version": header[12] >> 4, "command": header[12] & 0x0F, "family": (family, header[13] & 0x0F),
            "source": (address(body[:size]), int.from_bytes(ports[:2], "big")),
            "destination": (address(body[size:2 * size]), int.from_bytes(ports[2:], "big")),
            "tlvs": tlvs,
            "ssl": None if ssl_tlv is None else {"client": ssl_tlv[0], "verify": int.from_bytes(ssl_tlv[1:5], "big"),
                                                 "tlvs": parse_tlvs(ssl_tlv[5:])}}


def parse_tlvs(data: bytes) -> dict[int, bytes]:
    tlvs = {}
    while data:
        assert len(data) >= 3, "a TLV cut short"
        kind, length = data[0], int.from_bytes(data[1:3], "big")
        assert len(data) >= 3 + length, "a TLV runs past its container"
        assert kind not in tlvs, f"TLV 0x{kind:02x} twice"
        tlvs[kind] = data[3:3 + length]
        data = data[3 + length:]
    return tlvs


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, f"end of stream after {len(data)} of {n} bytes"
        data += chunk
    return data


class HeaderThenEcho(socketserver.BaseRequestHandler):
    """Reads a PROXY v2 header if the connection starts with one, then one line, echoed; puts (header or
    None, the line as received) in the server's ``seen``."""

    def handle(self):
        try:
            self.request.settimeout(TIMEOUT)
            first = _recv_exactly(self.request, 16)  # the fixed part of a header; the tests' lines are longer
            header = None
            if first.startswith(PROXY_V2_SIGNATURE):
                header = parse_proxy_v2(first + _recv_exactly(self.request, int.from_bytes(first[14:16], "big")))
                first = b""
            line = first
            while not line.endswith(b"\n"):
                chunk = self.request.recv(4096)
                if not chunk:
                    break
                line += chunk
            self.server.seen.put((header, line))
            self.request.sendall(line)
        except BaseException as exc:  # the test reads it from seen and fails with it
            self.server.seen.put(exc)


@pytest.fixture
def header_upstream():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), HeaderThenEcho)
    server.daemon_threads = True
    server.seen = queue.Queue()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def forward_to(server) -> str:
    return "127.0.0.1:%d" % server.server_address[1]


def upstream_saw(server) -> tuple[dict | None, bytes]:
    seen = server.seen.get(timeout=TIMEOUT)
    if isinstance(seen, BaseException):
        raise seen
    return seen


@dataclass
class Exchange:
    """One TLS client's round trip through the proxy, as the client saw it."""

    reply: bytes
    local: tuple  # the client's address and port: the header's source
    remote: tuple  # the proxy's, as connected to: the header's destination
    version: str
    cipher: str
    alpn: str | None


LINE = b"the client's own first bytes, then a newline\n"


def tls_round_trip(port: int, pki, *, host: str = "127.0.0.1", server_name: str | None = "a.test",
                   alpn: list[str] | None = None, leaf=None) -> Exchange:
    """Python's ssl as the client: ``server_name`` None sends no SNI; ``leaf`` is a client certificate."""
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    if server_name is None:
        context.check_hostname = False  # the certificate is still verified, only no name is asked for
    if alpn:
        context.set_alpn_protocols(alpn)
    if leaf is not None:
        context.load_cert_chain(leaf.cert_path, leaf.key_path)
    with socket.create_connection((host, port), timeout=TIMEOUT) as raw:
        local, remote = raw.getsockname(), raw.getpeername()
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(LINE)
            reply = b""
            while chunk := tls.recv(4096):
                reply += chunk
            return Exchange(reply, local, remote, tls.version(), tls.cipher()[0], tls.selected_alpn_protocol())


def assert_header_names(header: dict, exchange: Exchange, family: tuple[int, int]) -> None:
    """The header's fixed part and addresses against what the client's socket really used."""
    assert (header["version"], header["command"], header["family"]) == (2, 1, family)
    assert header["source"] == (ipaddress.ip_address(exchange.local[0]), exchange.local[1])
    assert header["destination"] == (ipaddress.ip_address(exchange.remote[0]), exchange.remote[1])
    assert header["ssl"]["tlvs"][SSL_VERSION] == exchange.version.encode()
    assert header["ssl"]["tlvs"][SSL_CIPHER] == exchange.cipher.encode()


def test_proxy_protocol_tells_the_upstream_the_client_its_sni_and_alpn(proxy, header_upstream, pki):
    port = proxy("--forward", forward_to(header_upstream), "--alpn", "h2,http/1.1", "--proxy-protocol")

    named = tls_round_trip(port, pki, server_name="rsa.test", alpn=["http/1.1"])
    header, line = upstream_saw(header_upstream)
    assert named.reply == LINE and line == LINE  # the header went before the client's bytes, and only it
    assert named.alpn == "http/1.1"
    assert_header_names(header, named, TCP_OVER_IPV4)
    assert set(header["tlvs"]) == {ALPN, AUTHORITY, SSL_TLV}
    assert header["tlvs"][ALPN] == b"http/1.1" and header["tlvs"][AUTHORITY] == b"rsa.test"
    assert (header["ssl"]["client"], header["ssl"]["verify"]) == (0x01, 1)  # TLS; no certificate, so not verified
    assert set(header["ssl"]["tlvs"]) == {SSL_VERSION, SSL_CIPHER}

    bare = tls_round_trip(port, pki, server_name=None)  # no SNI, no ALPN: their TLVs are left out
    header, line = upstream_saw(header_upstream)
    assert bare.reply == LINE and line == LINE and bare.alpn is None
    assert_header_names(header, bare, TCP_OVER_IPV4)
    assert bare.local[1] != named.local[1] and set(header["tlvs"]) == {SSL_TLV}


def test_proxy_protocol_names_a_verified_client_certificate(client, proxy, header_upstream, pki):
    trust = client.newring("proxy-client-trust")
    load(client, pki.client_ca, ring=trust, with_keys=False)
    port = proxy("--forward", forward_to(header_upstream), "--client-trust", str(trust), "--proxy-protocol")

    mutual = tls_round_trip(port, pki, leaf=pki.client)  # CN "client one"
    header, line = upstream_saw(header_upstream)
    assert mutual.reply == LINE and line == LINE
    assert_header_names(header, mutual, TCP_OVER_IPV4)
    assert header["tlvs"][AUTHORITY] == b"a.test"
    assert header["ssl"]["client"] == 0x01 | 0x02 | 0x04  # SSL, CERT_CONN, CERT_SESS
    assert header["ssl"]["verify"] == 0
    assert header["ssl"]["tlvs"][SSL_CN] == b"client one"

    anonymous = tls_round_trip(port, pki)  # the certificate is optional here: one without says so
    header, line = upstream_saw(header_upstream)
    assert anonymous.reply == LINE and line == LINE
    assert (header["ssl"]["client"], header["ssl"]["verify"]) == (0x01, 1)
    assert SSL_CN not in header["ssl"]["tlvs"]


def test_proxy_protocol_on_an_ipv6_listener(proxy, header_upstream, pki):
    port = proxy("--forward", forward_to(header_upstream), "--proxy-protocol", listen="[::1]:0")
    exchange = tls_round_trip(port, pki, host="::1")
    header, line = upstream_saw(header_upstream)
    assert exchange.reply == LINE and line == LINE
    assert_header_names(header, exchange, TCP_OVER_IPV6)
    assert header["source"][0] == ipaddress.IPv6Address("::1")


def test_only_proxy_protocol_adds_a_header(proxy, header_upstream, pki):
    """The same upstream behind two proxies: without the option its first bytes are the client's own."""
    plain_port = proxy("--forward", forward_to(header_upstream))
    pp_port = proxy("--forward", forward_to(header_upstream), "--proxy-protocol")
    assert tls_round_trip(plain_port, pki).reply == LINE
    assert upstream_saw(header_upstream) == (None, LINE)
    assert tls_round_trip(pp_port, pki).reply == LINE
    header, line = upstream_saw(header_upstream)
    assert header is not None and line == LINE


def test_the_proxy_v2_header_byte_by_byte(pki):
    """proxy_v2_header alone, for one fixed handshake outcome: the spec's layout, written out by hand."""
    from cryptography.hazmat.primitives import serialization

    from keyden.proxy import proxy_v2_header
    from keyden.client.tls import TlsInfo

    der = pki.client.cert.public_bytes(serialization.Encoding.DER)  # CN "client one"
    info = TlsInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", "a.test", "h2", "CN=client one", der)
    header = proxy_v2_header(info, socket.AF_INET, ("192.0.2.10", 51234), ("198.51.100.7", 8443))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n"                     # signature
        + bytes([0x21, 0x11, 0x00, 82])                       # v2 PROXY, TCP over IPv4, 12 + 70 bytes follow
        + bytes([192, 0, 2, 10, 198, 51, 100, 7])             # source, destination
        + bytes([0xC8, 0x22, 0x20, 0xFB])                     # ports 51234, 8443
        + b"\x01\x00\x02h2"                                  # ALPN
        + b"\x02\x00\x06a.test"                              # AUTHORITY (SNI)
        + b"\x20\x00\x35" + b"\x07" + b"\x00\x00\x00\x00"      # SSL: 53 bytes; SSL|CERT_CONN|CERT_SESS; verified
        + b"\x21\x00\x07TLSv1.3"                             #   VERSION
        + b"\x22\x00\x0aclient one"                          #   CN
        + b"\x23\x00\x16TLS_AES_128_GCM_SHA256")             #   CIPHER
    assert parse_proxy_v2(header)["ssl"]["tlvs"][SSL_CN] == b"client one"

    # An IPv6 socket's IPv4-mapped client stays IPv6; no certificate: SSL only, verify non-zero.
    anonymous = TlsInfo("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", "", "", "", b"")
    header = proxy_v2_header(anonymous, socket.AF_INET6, ("::ffff:192.0.2.10", 1), ("2001:db8::1", 443, 0, 0))
    assert header[12:16] == bytes([0x21, 0x21, 0x00, 36 + 3 + 5 + 10 + 32])
    assert header[16:52] == (bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 10])
                             + bytes.fromhex("20010db8000000000000000000000001") + b"\x00\x01\x01\xbb")
    assert header[52:60] == b"\x20\x00\x2f\x01\x00\x00\x00\x01"


def test_the_proxy_v2_header_refuses_what_its_lengths_cannot_say():
    """A TLV over 65535 bytes, or a header whose length field would overflow, is refused: never sent corrupt."""
    from keyden.proxy import proxy_v2_header
    from keyden.client.tls import TlsInfo

    addresses = (socket.AF_INET, ("192.0.2.10", 1), ("192.0.2.11", 2))
    with pytest.raises(ValueError, match="65535"):
        proxy_v2_header(TlsInfo("TLSv1.3", "x", "a" * 65536, "", "", b""), *addresses)
    with pytest.raises(ValueError, match="65535"):  # each value fits, together they do not
        proxy_v2_header(TlsInfo("TLSv1.3", "c" * 40000, "a" * 40000, "", "", b""), *addresses)
    fits = proxy_v2_header(TlsInfo("TLSv1.3", "c", "a" * (65535 - 12 - 3 - 3 - 5 - 10 - 4), "", "", b""), *addresses)
    assert len(fits) == 16 + 65535 and fits[14:16] == b"\xff\xff"


# ------------------------------------------------ what splice and the listener owe the two ends


@contextlib.contextmanager
def one_connection_backend(serve, listener: socket.socket):
    """A backend on ``listener`` that accepts one connection and runs ``serve(conn)`` on it in a thread;
    on exit, ``serve``'s wait (its ``release`` event) ends and both are closed."""
    release = threading.Event()

    def run():
        conn, _ = listener.accept()
        with conn:
            serve(conn, release)

    backend = threading.Thread(target=run, daemon=True)
    backend.start()
    try:
        yield
    finally:
        release.set()
        backend.join(TIMEOUT)
        listener.close()


@contextlib.contextmanager
def tls_to(port: int, pki, source: str | None = None):
    """A TLS connection through the proxy on ``port``, as a client of a.test trusting the test CA (from the
    address ``source``, if given)."""
    context = ssl.create_default_context(cafile=pki.ca.cert_path)
    where = (source, 0) if source else None
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT, source_address=where) as raw, \
            context.wrap_socket(raw, server_hostname="a.test") as tls:
        yield tls


def unix_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    return listener


def test_an_upstream_that_stops_reading_still_gets_its_answer_to_the_client(proxy, pki, tmp_path):
    """A backend that refuses an upload (stops reading, answers later, closes: an early 413) must have its
    answer delivered, as straight over TCP: only the direction towards it is over."""
    path = str(tmp_path / "early.sock")

    def refuse_the_upload(conn, _release):
        conn.shutdown(socket.SHUT_RD)  # the proxy's writes fail from now on (EPIPE) ...
        threading.Event().wait(1.0)    # ... before the answer comes
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")

    with one_connection_backend(refuse_the_upload, unix_listener(path)):
        port = proxy("--forward", "unix:" + path)
        with tls_to(port, pki) as tls:
            tls.sendall(b"PUT /upload HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + bytes(256 << 10))
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
    assert answer == b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n"


def test_a_listener_on_every_ipv6_address_takes_ipv4_clients_too(proxy, upstream, pki):
    """--listen [::]:PORT is dual-stack where the system allows it: an IPv4 client gets through."""
    if not socket.has_dualstack_ipv6():
        pytest.fail("this machine has no dual-stack IPv6 sockets")
    port = proxy("--forward", upstream, listen="[::]:0")
    out = curl(port, pki)  # curl resolves a.test to 127.0.0.1: IPv4
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello from upstream, /path"


def test_a_side_that_stops_reading_but_never_answers_lets_go_of_the_connection():
    """splice, in-process: once a write to a side fails, the other direction has ``close_timeout`` seconds
    to finish; a backend that neither reads, nor answers, nor closes must not hold a proxy slot for ever."""
    from keyden import proxy as proxy_module

    client_side, plain = socket.socketpair()
    upstream, backend = socket.socketpair()
    backend.shutdown(socket.SHUT_RD)  # reads no more, and will say nothing
    spliced = threading.Thread(target=proxy_module.splice, args=(plain, upstream, 0.3), daemon=True)
    spliced.start()
    client_side.sendall(b"an upload the backend will not take")
    spliced.join(5)  # well under the default close timeout of 10 s
    assert not spliced.is_alive()
    client_side.settimeout(TIMEOUT)
    assert client_side.recv(100) == b""  # the client is told: end of file
    for s in (client_side, plain, upstream, backend):
        s.close()


def test_an_upstream_that_breaks_mid_answer_ends_the_client_without_close_notify(proxy, pki):
    """A backend reset half-way through its answer must not reach the client as a clean end (close_notify
    after half a body of unknown length): the proxy aborts the TLS session, and the client sees a truncation."""
    listener = socket.create_server(("127.0.0.1", 0))

    def half_then_reset(conn, _release):
        read_until(conn, b"\r\n\r\n")
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe first half")  # a body that ends where the connection does
        time.sleep(0.2)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with one_connection_backend(half_then_reset, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}")
        with tls_to(port, pki) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_until(tls, b"the first half").endswith(b"the first half")
            assert how_it_ended(tls) == "FIN"


@pytest.mark.parametrize("how", ["proxy killed", "answer ended"])
def test_a_proxy_killed_mid_answer_leaves_its_client_a_truncation(proxy, pki, how):
    """The kernel closes a killed proxy's plaintext sockets, and keyden took such an end for a graceful
    one: close_notify after half an answer of unknown length.  The proxy's sessions now send close_notify
    only when the backend's answer ended (explicit close; found by a TLS hunt)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def half_then_wait(conn, release):
        read_until(conn, b"\r\n\r\n")
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe first half")  # a body that ends where the connection does
        if how == "proxy killed":
            release.wait(TIMEOUT)

    with one_connection_backend(half_then_wait, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}")
        with tls_to(port, pki) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_until(tls, b"the first half").endswith(b"the first half")
            if how == "proxy killed":
                (proc,) = proxy.procs
                proc.kill()
                proc.wait(TIMEOUT)  # (reaped: the fixture stops only what still runs)
            assert how_it_ended(tls) == ("FIN" if how == "proxy killed" else "close_notify")


@pytest.mark.parametrize("how", ["truncated", "close_notify"])
def test_a_clients_end_reaches_a_tcp_backend_as_a_reset_only_if_truncated(proxy, pki, how):
    """The other way round: half a request, then the client's TCP end without close_notify, must not reach
    a TCP backend as a clean end of data (a FIN after half an upload of unknown length): it gets a reset.
    A client's close_notify still reaches it as a FIN."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = queue.Queue()
    with one_connection_backend(_receiver(seen), listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}")
        with tls_to(port, pki) as tls:
            tls.sendall(b"POST /upload HTTP/1.0\r\n\r\nhalf an upl")
            if how == "close_notify":
                send_close_notify(tls)
            else:
                end_without_close_notify(tls)
            got, end = seen.get(timeout=TIMEOUT)
    assert got == b"POST /upload HTTP/1.0\r\n\r\nhalf an upl"
    assert end == ("reset" if how == "truncated" else "FIN")


def test_a_stop_that_cuts_an_upload_reaches_a_tcp_backend_as_a_reset(proxy, pki):
    """A stop's cut ends the client's session without close_notify, and the backend receiving half an
    upload must not take the cut for the upload's end: it gets a reset, as for a truncated client."""
    listener = socket.create_server(("127.0.0.1", 0))
    arrived, seen = threading.Event(), queue.Queue()
    with one_connection_backend(_receiver(seen, arrived), listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}", "--shutdown-timeout", "1")
        (proc,) = proxy.procs
        with tls_to(port, pki) as tls:
            tls.sendall(b"POST /upload HTTP/1.0\r\n\r\nhalf an upl")
            assert arrived.wait(TIMEOUT)
            proc.terminate()
            got, end = seen.get(timeout=TIMEOUT)
            assert proc.wait(TIMEOUT) == 0
            assert how_it_ended(tls) == "FIN"  # the client's side of the cut, as before
    assert got == b"POST /upload HTTP/1.0\r\n\r\nhalf an upl" and end == "reset"


def _receiver(seen: queue.Queue, arrived: threading.Event | None = None):
    """A backend's ``serve`` that reads until the connection ends, then puts (what it got, "FIN" or
    "reset") in ``seen``; ``arrived`` is set once the first bytes are in."""
    def receive(conn, _release):
        got = b""
        try:
            while chunk := conn.recv(65536):
                got += chunk
                if arrived is not None:
                    arrived.set()
            seen.put((got, "FIN"))
        except ConnectionResetError:
            seen.put((got, "reset"))
    return receive


def test_a_truncated_client_whose_session_breaks_with_an_answer_unread_still_resets_the_backend():
    """splice, in-process: keyden closes a truncated session with the backend's bytes unread in its end of
    the socketpair, so the relay reads a reset (ECONNRESET), not end of file: the backend must get a reset
    all the same, not a FIN."""
    for _ in range(5):  # (which of the relay's threads hears the reset varies)
        _truncated_client_with_an_answer_unread()


def _truncated_client_with_an_answer_unread() -> None:
    from keyden import proxy as proxy_module

    listener = socket.create_server(("127.0.0.1", 0))
    seen = queue.Queue()

    def backend():
        conn, _ = listener.accept()
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # until every buffer on the way is full (and no further:
            for _ in range(4096):                   # a reset's error is told once, and recv below must hear it)
                conn.send(bytes(65536))
        conn.settimeout(TIMEOUT)
        try:
            while conn.recv(65536):
                pass
            seen.put("FIN")
        except ConnectionResetError:
            seen.put("reset")
        conn.close()

    threading.Thread(target=backend, daemon=True).start()
    a, keyden_end = socket.socketpair()
    b = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    relay = threading.Thread(target=proxy_module.splice, args=(a, b), kwargs={"truncated": lambda: True})
    relay.start()
    keyden_end.sendall(b"half an upl")
    time.sleep(0.3)  # the backend's answer fills keyden's end, unread
    keyden_end.close()  # with it unread: the relay's recv gets ECONNRESET
    relay.join(TIMEOUT)
    assert not relay.is_alive()
    a.close()
    b.close()  # the caller's close: SO_LINGER 0 made it a reset
    assert seen.get(timeout=TIMEOUT) == "reset"
    listener.close()


def test_an_early_answer_from_a_tcp_backend_that_resets_still_reaches_the_client(proxy, pki):
    """A TCP backend that answers an upload early (413) and closes with the upload unread makes its kernel
    send a reset: the answer it sent before still reaches the client, whole, and then the end without
    close_notify that stands for the reset (whichever direction of the relay heard it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    answer = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def refuse_uploads():
        for _ in range(10):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(4096)
                if head.endswith(b"\r\n\r\n"):  # none of the upload yet: closing now would be a clean FIN
                    select.select([conn], [], [], TIMEOUT)
                conn.sendall(answer)  # and close, the upload unread: a reset

    backend = threading.Thread(target=refuse_uploads, daemon=True)
    backend.start()
    port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}")
    try:
        for _ in range(10):  # (the answer raced the reset's abort: lost one time in twenty)
            with tls_to(port, pki) as tls:
                tls.sendall(b"PUT /upload HTTP/1.1\r\nContent-Length: 4194304\r\n\r\n")
                try:
                    for _ in range(16):
                        tls.sendall(bytes(256 << 10))
                except OSError:
                    pass  # the proxy stopped taking it
                assert read_until(tls, b"\r\n\r\n") == answer
                assert how_it_ended(tls) == "FIN"  # the reset, passed on: no close_notify
    finally:
        listener.close()
        backend.join(TIMEOUT)


def test_close_timeout_bounds_a_backend_that_stops_reading_and_never_answers(proxy, pki, tmp_path):
    """--close-timeout, through the real proxy: once a write to the backend fails (it shut its end for
    reading), the client is let go of after the timeout, not the default 10 s, while the backend still
    holds its end open."""
    path = str(tmp_path / "mute.sock")

    def stop_reading_and_say_nothing(conn, release):
        conn.shutdown(socket.SHUT_RD)
        release.wait(TIMEOUT)

    with one_connection_backend(stop_reading_and_say_nothing, unix_listener(path)):
        port = proxy("--forward", "unix:" + path, "--close-timeout", "0.5")
        with tls_to(port, pki) as tls:
            tls.settimeout(5)  # well under the default close timeout of 10 s
            tls.sendall(b"PUT /upload HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n" + bytes(64 << 10))
            # let go of, and not with close_notify (the answer was cut short): a FIN alone, or a reset if
            # what it still sent was left unread
            assert how_it_ended(tls) in ("FIN", "reset")


def test_idle_timeout_ends_a_connection_to_a_backend_that_neither_reads_nor_closes(proxy, pki):
    """A TCP backend that stops reading but keeps its end open never makes a write fail: the proxy's write
    just blocks.  --idle-timeout ends such a connection once no byte has moved either way for that long."""
    listener = socket.create_server(("127.0.0.1", 0))

    def stall(_conn, release):
        release.wait(TIMEOUT)  # reads nothing, answers nothing, closes nothing

    with one_connection_backend(stall, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}", "--idle-timeout", "1")
        with tls_to(port, pki) as tls:
            tls.settimeout(0.5)
            with pytest.raises(TimeoutError):  # every buffer on the way fills, then the upload stalls
                for _ in range(4096):  # 256 MiB at most
                    tls.sendall(bytes(64 << 10))
            tls.settimeout(5)  # well under the default idle timeout of 12 hours
            assert tls.recv(100) == b""  # the proxy let go: keyden's close_notify


def test_idle_timeout_cuts_without_close_notify_as_it_cannot_tell_idle_from_stalled(proxy, pki):
    """An idle keep-alive connection and an answer whose backend paused half-way look the same to the proxy:
    the idle timeout gave both close_notify, which vouched for half an answer (found by a reliability
    hunt).  Both are cut now; a client between requests takes that as a close."""
    listener = socket.create_server(("127.0.0.1", 0))

    def half_then_pause(conn, release):
        read_until(conn, b"\r\n\r\n")
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe first half")  # a body that ends where the connection does
        release.wait(TIMEOUT)

    with one_connection_backend(half_then_pause, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}", "--idle-timeout", "1")
        with tls_to(port, pki) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert read_until(tls, b"the first half").endswith(b"the first half")
            assert how_it_ended(tls) == "FIN"


def test_idle_timeout_cuts_an_answer_the_client_stopped_reading_without_close_notify(proxy, pki):
    """The idle timeout ends an idle keep-alive connection cleanly, but an answer still waiting to be written
    to a client that stopped reading is cut short: no close_notify may vouch for it (found by a review)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def endless(conn, release):
        read_until(conn, b"\r\n\r\n")
        with contextlib.suppress(OSError):
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + bytes(64 << 20))  # more than every buffer on the way
        release.wait(TIMEOUT)

    with one_connection_backend(endless, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}", "--idle-timeout", "1")
        context = ssl.create_default_context(cafile=pki.ca.cert_path)
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with context.wrap_socket(raw, server_hostname="a.test", suppress_ragged_eofs=False) as tls:
            tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
            time.sleep(3)  # reads nothing: the proxy's write waits, and no byte moves
            with pytest.raises(ssl.SSLEOFError):  # a truncation, after what was on its way
                while tls.recv(1 << 16):
                    pass


def _read_to_the_end(conn: socket.socket) -> tuple[str, int]:
    """A backend's reading of an upload to its end: ("FIN" or "reset", bytes read)."""
    got = 0
    try:
        while chunk := conn.recv(1 << 16):
            got += len(chunk)
        return "FIN", got
    except ConnectionResetError:
        return "reset", got


def test_an_upload_the_idle_timeout_cut_reaches_a_tcp_backend_as_a_reset(proxy, pki):
    """A client that stalls mid-upload: the idle timeout ended the backend's side with a FIN, which a
    backend reading to its end of file took for the whole upload (found by a review)."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []
    with one_connection_backend(lambda conn, _release: seen.append(_read_to_the_end(conn)), listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}", "--idle-timeout", "1")
        with tls_to(port, pki) as tls:
            tls.sendall(b"POST / HTTP/1.0\r\n\r\n" + bytes(1000))  # a body that ends where the connection does
            assert tls.recv(100) == b""  # (then it stalls: the idle timeout ends the connection)
    assert [how for how, _got in seen] == ["reset"], seen


def test_an_upload_the_proxys_close_notify_cut_reaches_the_backend_as_a_reset(proxy, pki):
    """A backend that answers at once and half-closes, reading on: the answer's end is the session's
    (close_notify), after which keyden drops what the client still sends, and the backend read a FIN: a
    cut upload taken for a whole one (found by a reliability hunt).  It gets a reset now."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list = []

    def answer_then_read(conn, release):
        got = len(conn.recv(1 << 16))  # the request's start: answered at once
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\naccepted")
        conn.shutdown(socket.SHUT_WR)
        how, rest = _read_to_the_end(conn)
        seen.append((how, got + rest))

    body = 50 << 20
    with one_connection_backend(answer_then_read, listener):
        port = proxy("--forward", f"127.0.0.1:{listener.getsockname()[1]}")
        with tls_to(port, pki) as tls:
            tls.sendall(b"POST / HTTP/1.0\r\nContent-Length: %d\r\n\r\n" % body + bytes(1 << 20))  # the start
            assert read_until(tls, b"accepted").endswith(b"accepted")
            deadline = time.monotonic() + TIMEOUT  # the client still open: its own end must not be what
            while not seen and time.monotonic() < deadline:  # reaches the backend
                time.sleep(0.05)
    (how, got), = seen
    assert how == "reset" or got >= body, seen


@pytest.mark.parametrize("disconnect", ["kernel", "refused"])
@pytest.mark.parametrize("backend", ["reads nothing", "reads to the end"])
def test_the_idle_cut_lets_go_and_ends_a_tcp_backend_with_a_reset(monkeypatch, disconnect, backend):
    """splice, in-process: the idle cut of an upload to a TCP backend.  Shut for reading only, a write to a
    backend that reads nothing blocked for good and held the connection's slot; shut for writing, a FIN
    could reach a backend reading to its end first, which took the stalled upload for whole (found by
    reviews).  Disconnected at once now; where the kernel refuses that (EBUSY on 5.10-6.5 while a thread
    waits on the socket), a reset at the close, with a blocked write failed."""
    from keyden import proxy as proxy_module

    if disconnect == "refused":
        def refused(sock):
            raise OSError(errno.EBUSY, "Device or resource busy")
        monkeypatch.setattr(proxy_module.descriptors, "disconnect", refused)
    client_side, plain = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = socket.create_connection(listener.getsockname())
    backend_side, _ = listener.accept()
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    spliced = threading.Thread(target=proxy_module.splice, args=(plain, upstream, 10.0, 1.0), daemon=True)
    spliced.start()
    if backend == "reads nothing":
        def upload():
            with contextlib.suppress(OSError):
                while True:
                    client_side.sendall(bytes(1 << 16))
        threading.Thread(target=upload, daemon=True).start()
    else:
        client_side.sendall(bytes(1000))  # then it stalls
    spliced.join(6)  # the idle timeout (1 s), well under the close timeout (10 s)
    assert not spliced.is_alive()
    upstream.close()  # (the caller's close, as the proxy's)
    backend_side.settimeout(TIMEOUT)
    assert _read_to_the_end(backend_side)[0] == "reset"
    for s in (client_side, plain, backend_side, listener):
        s.close()


def test_idle_timeout_spares_a_connection_whose_bytes_keep_moving(proxy, pki, tmp_path):
    """Traffic in either direction keeps a connection alive past --idle-timeout: it is not a lifetime."""
    path = str(tmp_path / "echo.sock")

    def echo(conn, _release):
        while data := conn.recv(100):
            conn.sendall(data)

    with one_connection_backend(echo, unix_listener(path)):
        port = proxy("--forward", "unix:" + path, "--idle-timeout", "1")
        with tls_to(port, pki) as tls:
            for i in range(8):  # 8 x 0.4 s: over three times the idle timeout in all
                tls.sendall(b"%d" % i)
                assert tls.recv(100) == b"%d" % i
                threading.Event().wait(0.4)
