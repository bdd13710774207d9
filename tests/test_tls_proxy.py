"""`keyden tls-proxy`: curl -> the proxy (TLS in keyden) -> a plain HTTP server on loopback.

The proxy is a real subprocess given only a session and a keyring; the certificates and keys are
loaded by the test.  Upstream is Python's http.server over TCP or a Unix socket.
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import threading

import pytest

try:
    from tests.test_tls import TIMEOUT, Pki, load
except ImportError:  # pytest's rootdir-relative import
    from test_tls import TIMEOUT, Pki, load

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

    def start(*args: str) -> int:
        env = dict(os.environ, KEYDEN_SESSION=client.session_token,
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy",
                                 "--listen", "127.0.0.1:0", "--keyring", "@s", *args],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        line = proc.stdout.readline().decode()
        assert line.startswith("tls-proxy: listening on 127.0.0.1:"), line + proc.stderr.read().decode()
        return int(line.split(":")[2].split(",")[0])

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(TIMEOUT)
        proc.stdout.close()
        proc.stderr.close()


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


def test_unreachable_upstream_closes_the_connection(proxy, pki):
    port = proxy("--forward", "unix:/nonexistent/keyden-test.sock")
    out = curl(port, pki)
    assert out.returncode != 0 and out.stdout == b""


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
                 *(["--listen", "127.0.0.1:0", "--handshake-timeout", t, *whole] for t in ("0", "500", "nan"))):
        out = subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, "tls-proxy", *args],
                             capture_output=True, timeout=TIMEOUT, cwd=REPO)
        assert out.returncode == 2, (args, out.stderr.decode())
        assert b"Traceback" not in out.stderr and b"listening" not in out.stdout, args


@pytest.mark.parametrize("keep", ["session", "persistent"])
def test_a_proxy_whose_daemon_restarts_without_its_keyring_stops_with_exit_1(pki, upstream, keep):
    """docs/tls.md: if the daemon goes away, the proxy stops with exit 1 at the next connection, so that its
    supervisor starts it again.  Its client used to reconnect by itself and the proxy refused every client
    from then on, alive: a keyring named by serial is gone with the old daemon, and the persistent keyring
    is no longer linked into the session until get_persistent runs again."""
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
        d.start()  # the same socket and state: the persistent keyring is back, not linked into any session
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
    from keyden.cli import tls as proxy_cli

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

    monkeypatch.setattr(proxy_cli.client_tls, "start_accept", start_accept)
    monkeypatch.setattr(proxy_cli.client_tls, "established", established)
    monkeypatch.setattr(proxy_cli, "splice", lambda a, b: (a.close(), b.close()))
    client = type("Answering", (), {"ping": lambda self, data: data})()
    proxy = proxy_cli._Proxy(client, 1234, {"handshake_timeout": 1.0}, "unix:/nonexistent/upstream.sock", 1)
    with socket.create_server(("127.0.0.1", 0)) as listener, socket.socket() as conn:
        assert proxy.slots.acquire(blocking=False)  # as run() does before handing a connection over
        proxy._serve(conn, ("192.0.2.1", 4242), listener)
    assert proxy.lost_keyden is stops
    probed = request_error in ("ENOKEY", "EACCES", "EKEYREVOKED")
    assert len(calls) == 1 + probed  # a probe only for a refusal of the request that names the keyring
