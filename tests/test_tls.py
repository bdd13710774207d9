"""TLS inside keyden: handshakes and the record layer run in the daemon, the application sees plaintext.

Every peer is a real TLS implementation nobody here wrote (Python's ssl, openssl s_client, curl),
on loopback.  Certificates come from a throwaway CA made with pyca; the tests load keys into
keyden and the application side gets only keyrings.  The memory-scan test then shows that neither
the private key nor a traffic secret ever reached the application's memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import errno
import hashlib
import ipaddress
import os
import queue
import re
import secrets
import signal
import socket
import ssl
import struct
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import NameOID

from keyden import errors as E
from keyden import protocol as W
from keyden.client import tls as client_tls
from keyden.protocol import Op
from tests.conftest import eventually
from tests.test_audit import audit_lines, mine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 20  # seconds: any single step of these tests, so a failure never hangs the suite


# ------------------------------------------------------------------ a throwaway PKI


@dataclass
class Leaf:
    cert: x509.Certificate
    key: object
    cert_path: str
    key_path: str

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


class Pki:
    """A server CA, a client CA, a rogue CA nobody trusts, and leaves; PEM files for openssl and curl."""

    def __init__(self, directory: str):
        self.dir = directory
        self.ca = self.issue("Test Server CA", ca=True)
        self.client_ca = self.issue("Test Client CA", ca=True)
        self.rogue_ca = self.issue("Rogue CA", ca=True)
        self.ec_server = self.issue("a.test", dns=("a.test", "*.wild.test"), issuer=self.ca)
        self.rsa_server = self.issue("rsa.test", dns=("rsa.test",), kind="rsa", issuer=self.ca)
        self.client = self.issue("client one", issuer=self.client_ca)

    def issue(self, cn: str, *, dns=(), ips=(), kind="ec", issuer: Leaf | None = None, ca=False,
              days=(-1, 30)) -> Leaf:
        key = rsa.generate_private_key(65537, 2048) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(name)
                   .issuer_name(issuer.cert.subject if issuer else name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now + datetime.timedelta(days=days[0]))
                   .not_valid_after(now + datetime.timedelta(days=days[1]))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if dns or ips:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]),
                critical=False)
        cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
        stem = os.path.join(self.dir, re.sub(r"\W", "_", cn) + "-" + secrets.token_hex(4))
        leaf = Leaf(cert, key, stem + ".crt", stem + ".key")
        with open(leaf.cert_path, "wb") as f:
            f.write(leaf.cert_pem)
        with open(leaf.key_path, "wb") as f:
            f.write(leaf.key_pem)
        return leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(str(tmp_path_factory.mktemp("pki")))


def load(client, *leaves: Leaf, ring="@s", with_keys=True) -> None:
    """Certificates (and their private keys) into a keyring of the test's: the application never has them."""
    for leaf in leaves:
        client.add("asymmetric", "", leaf.cert_pem, ring)
        if with_keys:
            client.add("asymmetric", "", leaf.key_pem, ring)


@pytest.fixture
def server_ring(client, pki):
    load(client, pki.ec_server, pki.rsa_server)  # the EC one first: the default without SNI
    return "@s"


@pytest.fixture
def client_trust(client, pki):
    ring = client.newring("client-trust")
    load(client, pki.client_ca, ring=ring, with_keys=False)
    return ring


# ----------------------------------------------------------------- the application


def echo_line(plain: socket.socket) -> None:
    plain.sendall(b"echo: " + read_until(plain, b"\n"))


def http_hello(plain: socket.socket) -> None:
    read_until(plain, b"\r\n\r\n")
    plain.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")


def read_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


class App:
    """The application: accepts TCP connections and hands each to keyden with ``tls_accept``."""

    def __init__(self, client, **tls_options):
        self.client = client
        self.options = tls_options
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.outcomes: queue.Queue = queue.Queue()

    def serve(self, reply=echo_line, count: int = 1) -> None:
        """Serve ``count`` connections in the background; each outcome (TlsInfo or error) is queued."""
        def run():
            for _ in range(count):
                try:
                    conn, _ = self.listener.accept()
                except OSError:  # closed by the test, or nobody came: outcome() reports the missing one
                    return
                try:
                    plain, info = self.client.tls_accept(conn, **self.options)
                except E.KeydenError as exc:
                    conn.close()
                    self.outcomes.put(exc)
                    continue
                self.outcomes.put(info)
                with plain:
                    plain.settimeout(TIMEOUT)
                    reply(plain)
        threading.Thread(target=run, daemon=True).start()

    def outcome(self):
        return self.outcomes.get(timeout=TIMEOUT)

    def close(self):
        self.listener.close()


@pytest.fixture
def app_factory(client):
    made = []

    def make(**options) -> App:
        made.append(App(client, **options))
        return made[-1]
    yield make
    for a in made:
        a.close()


# ---------------------------------------------------------------------- the peers


def python_peer(port: int, server_name: str, ca: Leaf, *, cert: Leaf | None = None, version: str | None = None,
                data: bytes = b"hello\n", alpn=None, keylog: str | None = None, source: str | None = None):
    """Python's ssl as the TLS client; returns (its SSLSocket's view of the session, the reply or the error)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if version:
        ctx.minimum_version = ctx.maximum_version = getattr(ssl.TLSVersion, "TLSv" + version.replace(".", "_"))
    if cert:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if keylog:
        ctx.keylog_filename = keylog
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                  source_address=(source, 0) if source else None) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            served = x509.load_der_x509_certificate(tls.getpeercert(True))
            session = {"version": tls.version(), "cipher": tls.cipher()[0], "alpn": tls.selected_alpn_protocol(),
                       "subject": served.subject.rfc4514_string(), "key": served.public_key()}
            try:
                tls.sendall(data)
                reply = read_until(tls, b"\n")
            except (ssl.SSLError, OSError) as exc:
                reply = exc
            return session, reply


def run(cmd: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=TIMEOUT)


# ------------------------------------------------------------------ serving TLS


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("name, key_type", [("a.test", ec.EllipticCurvePublicKey), ("rsa.test", rsa.RSAPublicKey)])
def test_python_client_both_versions_and_key_types(app_factory, server_ring, pki, version, name, key_type):
    app = app_factory()
    app.serve()
    session, reply = python_peer(app.port, name, pki.ca, version=version)
    info = app.outcome()
    assert reply == b"echo: hello\n"
    assert info.version == session["version"] == f"TLSv{version}"
    assert info.cipher == session["cipher"]
    assert info.server_name == name
    assert session["subject"] == f"CN={name}" and isinstance(session["key"], key_type)
    assert info.peer_subject == "" and info.peer_certificate == b""


def test_tls_from_asyncio_as_tls_md_shows(client, server_ring, pki):
    """The asyncio client has no TLS (it passes no descriptors); tls.md's way: a blocking client's
    tls_accept in a thread, then asyncio's streams over the plaintext socket."""
    import asyncio

    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)

    async def serve_one():
        sock, _ = await asyncio.get_running_loop().sock_accept(listener)
        plain, info = await asyncio.to_thread(client.tls_accept, sock, "@s")  # the handshake, in keyden
        reader, writer = await asyncio.open_connection(sock=plain)              # plaintext from here on
        writer.write(b"echo: " + await reader.readline())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        return info.server_name

    with listener, concurrent.futures.ThreadPoolExecutor(1) as pool:
        served = pool.submit(asyncio.run, serve_one())
        _session, reply = python_peer(listener.getsockname()[1], "a.test", pki.ca)
        assert reply == b"echo: hello\n" and served.result(TIMEOUT) == "a.test"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client(app_factory, server_ring, pki, version):
    app = app_factory()
    app.serve()
    out = run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "rsa.test",
               "-CAfile", pki.ca.cert_path, "-verify_return_error", "-verify_hostname", "rsa.test",
               f"-tls{version.replace('.', '_')}", "-brief", "-ign_eof"], stdin=b"hello openssl\n")
    info = app.outcome()
    assert out.returncode == 0, out.stderr.decode()
    assert b"echo: hello openssl" in out.stdout
    assert f"Protocol version: TLSv{version}".encode() in out.stderr
    assert b"Verification: OK" in out.stderr
    assert info.version == f"TLSv{version}" and info.server_name == "rsa.test"


def test_intermediates_in_the_keyring_are_sent_and_any_trusted_certificate_is_an_anchor(client, app_factory, pki):
    intermediate = pki.issue("Test Intermediate CA", issuer=pki.ca, ca=True)
    leaf = pki.issue("chained.test", dns=("chained.test",), issuer=intermediate)
    load(client, leaf)
    load(client, intermediate, with_keys=False)
    app = app_factory()
    app.serve(count=2)
    _, reply = python_peer(app.port, "chained.test", pki.ca)  # trusts only the root: needs the intermediate sent
    assert reply == b"echo: hello\n" and app.outcome().server_name == "chained.test"
    trust = client.newring("intermediate-only")
    load(client, intermediate, ring=trust, with_keys=False)
    sock = socket.create_connection(("127.0.0.1", app.port), timeout=TIMEOUT)
    plain, info = client.tls_connect(sock, "chained.test", trust=trust)  # the intermediate alone is an anchor
    with plain:
        plain.sendall(b"anchored\n")
        assert read_until(plain, b"\n") == b"echo: anchored\n"
    assert info.peer_subject == "CN=chained.test" and app.outcome().version


def test_a_handshake_timeout_over_the_limit_is_refused_not_shortened(client, server_ring):
    """The client library keeps handshake_timeout to 120 s; on the wire a larger timeout_ms was cut to
    120 s without a word.  It is EINVAL, and 0 still means the default."""
    from keyden.client import tls as client_tls
    from keyden.client.operations import Ref

    mine, theirs = socket.socketpair()
    mine.settimeout(10)
    with mine:
        with theirs, pytest.raises(E.EINVAL, match="at most 120000 ms"):
            client_tls._hand_over(client, Op.TLS_CONNECT, ("example.com", Ref(server_ring), 0, 0, [], 120001),
                                  theirs)
        assert mine.recv(1) == b""  # the daemon's copy was closed, not kept


def test_sni_picks_the_certificate_and_wildcards_match(app_factory, server_ring, pki):
    app = app_factory()
    app.serve(count=3)
    seen = {}
    for name in ("rsa.test", "x.wild.test", "a.test"):
        session, reply = python_peer(app.port, name, pki.ca)
        assert reply == b"echo: hello\n"
        seen[name] = session["subject"]
        assert app.outcome().server_name == name
    assert seen == {"rsa.test": "CN=rsa.test", "x.wild.test": "CN=a.test", "a.test": "CN=a.test"}


def test_without_sni_or_with_an_unknown_name_the_first_certificate_answers(app_factory, server_ring, pki):
    app = app_factory()
    app.serve(count=2)
    for sni, asked in ((["-noservername"], ""), (["-servername", "unknown.test"], "unknown.test")):
        out = run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", *sni, "-ign_eof"], stdin=b"hi\n")
        assert b"echo: hi" in out.stdout
        assert re.search(rb"subject=\s*CN\s*=\s*a\.test", out.stdout), out.stdout.decode()
        assert app.outcome().server_name == asked


def test_an_sni_that_is_no_host_name_ends_the_handshake(app_factory, server_ring, pki):
    """An SNI of any bytes reached the application (TlsInfo.server_name) and a PROXY header's authority:
    CR LF, spaces, '/'.  Such a name is refused with an alert (found by a TLS hunt); a fully-qualified one
    is a name like any other."""
    app = app_factory()
    app.serve(count=2)
    bad = run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "evil\r\nX-Injected: 1"],
              stdin=b"hi\n")
    assert b"illegal parameter" in bad.stdout + bad.stderr and b"echo: hi" not in bad.stdout
    assert isinstance(refused := app.outcome(), E.EPROTO) and "SNI was refused" in refused.message
    good = run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "rsa.test.", "-ign_eof"],
               stdin=b"hi\n")
    assert b"echo: hi" in good.stdout and app.outcome().server_name == "rsa.test."


def test_tls_connect_takes_a_fully_qualified_name_as_curl_does(client, trust_ring, pki):
    """"www.example." names the host "www.example": it failed the certificate's check (and went out as SNI
    with its dot, which RFC 6066 forbids); the dot is taken off (found by a TLS hunt)."""
    listener = socket.create_server(("127.0.0.1", 0))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.ec_server.cert_path, pki.ec_server.key_path)
    names = []
    ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)

    def serve():
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"hi")
    server = threading.Thread(target=serve, daemon=True)
    server.start()
    sock = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    plain, info = client.tls_connect(sock, "a.test.", trust=trust_ring)
    with plain:
        assert plain.recv(10) == b"hi" and names == ["a.test"] and info.server_name == "a.test"
    server.join(TIMEOUT)
    listener.close()


def test_names_in_use_pass_and_a_zone_is_taken_off_an_address():
    """Hyphens at a label's ends and underscores are in names in use (browsers take them); an IPv6 zone
    (fe80::1%eth0) is the local host's, in no certificate: it went out as an SNI (found by a review)."""
    from keyden.server.handlers.tls import _server_name
    from keyden.tls.material import is_host_name

    assert all(is_host_name(n) for n in ("x-.a.test", "-x.a.test", "_srv.a.test", "localhost", "A.TEST.",
                                         "xn--strae-oqa"))
    assert not any(is_host_name(n) for n in ("a b", "a\r\nb", "a/b", "a..b", ".a", "a:b", "*.a", "x" * 64))
    assert [_server_name(n) for n in ("fe80::1%eth0", "::ffff:127.0.0.1", "a.test.", "b\u00fccher.test")] == \
        ["fe80::1", "::ffff:127.0.0.1", "a.test", "b\u00fccher.test"]


def test_curl_https(app_factory, server_ring, pki):
    app = app_factory(alpn=["http/1.1"])
    app.serve(reply=http_hello)
    out = run(["curl", "-sS", "--max-time", str(TIMEOUT), "--cacert", pki.ca.cert_path,
               "--resolve", f"a.test:{app.port}:127.0.0.1", f"https://a.test:{app.port}/"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello"
    info = app.outcome()
    assert info.alpn == "http/1.1" and info.server_name == "a.test"


def test_alpn_the_servers_preference_among_what_the_client_offers(app_factory, server_ring, pki):
    app = app_factory(alpn=["h2", "http/1.1"])
    app.serve(count=2)
    session, _ = python_peer(app.port, "a.test", pki.ca, alpn=["http/1.1", "h2"])
    assert session["alpn"] == "h2" and app.outcome().alpn == "h2"
    session, _ = python_peer(app.port, "a.test", pki.ca, alpn=["spdy/1"])  # nothing in common: no ALPN
    assert session["alpn"] is None and app.outcome().alpn == ""


def test_curl_mutual_tls(app_factory, server_ring, client_trust, pki):
    app = app_factory(client_trust=client_trust, require_client_cert=True)
    app.serve(reply=http_hello)
    out = run(["curl", "-sS", "--max-time", str(TIMEOUT), "--cacert", pki.ca.cert_path,
               "--cert", pki.client.cert_path, "--key", pki.client.key_path,
               "--resolve", f"a.test:{app.port}:127.0.0.1", f"https://a.test:{app.port}/"])
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == b"hello"
    info = app.outcome()
    assert info.peer_subject == "CN=client one"
    assert info.certificate() == pki.client.cert


def test_curl_without_a_client_certificate_is_refused(app_factory, server_ring, client_trust, pki):
    app = app_factory(client_trust=client_trust, require_client_cert=True)
    app.serve(reply=http_hello)
    out = run(["curl", "-sS", "--max-time", str(TIMEOUT), "--cacert", pki.ca.cert_path,
               "--resolve", f"a.test:{app.port}:127.0.0.1", f"https://a.test:{app.port}/"])
    assert out.returncode != 0 and out.stdout == b""
    error = app.outcome()
    assert isinstance(error, E.ENOKEY) and "no certificate" in error.message


def test_optional_client_certificate(app_factory, server_ring, client_trust, pki):
    app = app_factory(client_trust=client_trust)
    app.serve(count=2)
    _, reply = python_peer(app.port, "a.test", pki.ca)
    assert reply == b"echo: hello\n" and app.outcome().peer_subject == ""
    _, reply = python_peer(app.port, "a.test", pki.ca, cert=pki.client)
    assert reply == b"echo: hello\n" and app.outcome().peer_subject == "CN=client one"


def blacklist(client, cert: x509.Certificate) -> None:
    """As root, name the certificate's TBS hash in the system blacklist."""
    client.add("blacklist", "tbs:" + hashlib.sha256(cert.tbs_certificate_bytes).hexdigest(), b"", "%:.blacklist")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("case, error, words", [
    ("expired", E.EKEYEXPIRED, "certificate has expired"),
    ("wrongly signed", E.EKEYREJECTED, "unable to get local issuer certificate"),
    ("blacklisted", E.EKEYREJECTED, "blacklisted"),
])
def test_bad_client_certificates_are_refused(app_factory, server_ring, client_trust, client, pki, case, error, words,
                                             version):
    if case == "expired":
        bad = pki.issue(f"expired {version}", issuer=pki.client_ca, days=(-30, -1))
    elif case == "wrongly signed":
        bad = pki.issue(f"rogue {version}", issuer=pki.rogue_ca)
    else:
        bad = pki.issue(f"blacklisted {version}", issuer=pki.client_ca)
        blacklist(client, bad.cert)
    app = app_factory(client_trust=client_trust, require_client_cert=True)
    app.serve()
    try:
        _, reply = python_peer(app.port, "a.test", pki.ca, cert=bad, version=version)
    except (ssl.SSLError, OSError) as exc:  # TLS 1.2: refused inside the handshake
        reply = exc
    refusal = app.outcome()
    assert isinstance(refusal, error), refusal
    assert words in refusal.message
    assert not isinstance(reply, bytes) or b"echo" not in reply


def resuming_peer(port: int, ca: Leaf, version: str, cert: Leaf | None = None, chain_path: str | None = None):
    """A Python client that offers its previous session again: connect(session) -> (session, reused, reply)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    if cert:
        ctx.load_cert_chain(chain_path or cert.cert_path, cert.key_path)
    ctx.maximum_version = getattr(ssl.TLSVersion, "TLSv" + version.replace(".", "_"))

    def connect(session=None):
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            with ctx.wrap_socket(raw, server_hostname="a.test", session=session) as tls:
                tls.sendall(b"again\n")
                session, reused = tls.session, tls.session_reused
                try:
                    reply = read_until(tls, b"\n")  # in TLS 1.3 the ticket, if any, comes before the reply
                    session = tls.session
                    while tls.recv(4096):  # to keyden's close_notify: a session ended uncleanly is not kept
                        pass
                    tls.unwrap()  # and ours (OpenSSL marks a session closed without one not resumable)
                except (ssl.SSLError, OSError):
                    reply = b""
                return session, reused, reply
    return connect


@pytest.mark.parametrize("version", ["1.2", "1.3"])
@pytest.mark.parametrize("verify", ["none", "optional", "required"])
def test_no_session_is_resumed_when_client_certificates_are_verified(app_factory, server_ring, client_trust, pki,
                                                                      client, version, verify):
    """A resumed session skips verification: with a client trust keyring every connection is verified in full.

    Without one, resumption still works; that shows this client really offers its session.
    """
    options = {} if verify == "none" else {"client_trust": client_trust, "require_client_cert": verify == "required"}
    if verify == "none":  # one identity: with several, TLS 1.3 resumes nothing (the next test)
        single = client.newring("single")
        load(client, pki.ec_server, ring=single)
        options["keyring"] = single
    app = app_factory(**options)
    app.serve(count=2)
    connect = resuming_peer(app.port, pki.ca, version, cert=None if verify == "none" else pki.client)
    session, reused, reply = connect()
    assert reply == b"echo: again\n" and not reused
    _, reused, reply = connect(session)
    assert reply == b"echo: again\n"
    assert reused == (verify == "none")
    first, second = app.outcome(), app.outcome()
    if verify != "none":
        assert first.peer_subject == second.peer_subject == "CN=client one"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_session_is_never_resumed_under_another_identitys_name(app_factory, server_ring, pki, tmp_path, version):
    """Identities share one session cache, and OpenSSL resumed a TLS 1.3 session made for rsa.test when
    the client asked for a.test: the application was told a.test, which rsa.test's certificate does not
    cover.  With several identities TLS 1.3 issues no ticket; TLS 1.2 resumes under the session's own name."""
    app = app_factory()
    app.serve(count=2)
    saved = str(tmp_path / "session.pem")
    common = ["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-CAfile", pki.ca.cert_path,
              f"-tls{version.replace('.', '_')}", "-ign_eof"]
    first = run(common + ["-servername", "rsa.test", "-sess_out", saved], stdin=b"hello\n")
    assert first.returncode == 0 and b"echo: hello" in first.stdout, first.stderr.decode()
    assert app.outcome().server_name == "rsa.test"
    if version == "1.3":
        assert not os.path.exists(saved)
        return
    second = run(common + ["-servername", "a.test", "-sess_in", saved], stdin=b"hello\n")
    assert second.returncode == 0 and b"echo: hello" in second.stdout, second.stderr.decode()
    assert app.outcome().server_name == ("rsa.test" if re.search(rb"^Reused, ", second.stdout, re.M) else "a.test")


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_openssl_s_client_offering_a_saved_session_is_not_resumed_under_mtls(app_factory, server_ring, client_trust,
                                                                            pki, tmp_path, version):
    app = app_factory(client_trust=client_trust, require_client_cert=True)
    app.serve(count=2)
    saved = str(tmp_path / "session.pem")
    common = ["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "a.test",
              "-CAfile", pki.ca.cert_path, "-verify_return_error", "-cert", pki.client.cert_path,
              "-key", pki.client.key_path, f"-tls{version.replace('.', '_')}", "-ign_eof"]
    first = run(common + ["-sess_out", saved], stdin=b"hello openssl\n")
    assert first.returncode == 0, first.stderr.decode()
    assert b"echo: hello openssl" in first.stdout
    if version == "1.3":  # every TLS 1.3 resumption needs a ticket, and none was issued: nothing to save
        assert not os.path.exists(saved)
        return
    second = run(common + ["-sess_in", saved], stdin=b"hello openssl\n")
    assert second.returncode == 0, second.stderr.decode()
    assert b"echo: hello openssl" in second.stdout
    assert re.search(rb"^New, TLSv", second.stdout, re.M) and not re.search(rb"^Reused, ", second.stdout, re.M)
    assert app.outcome().peer_subject == app.outcome().peer_subject == "CN=client one"


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_blacklisted_intermediate_is_refused_on_a_second_connection(app_factory, server_ring, client_trust, client,
                                                                      pki, tmp_path, version):
    """The check the engine makes after the handshake sees the whole chain only if it was verified.

    A resumed session would remember just the leaf, so a blacklisted intermediate (not in the trust
    keyring, so the cached context is unchanged) would go unnoticed.
    """
    intermediate = pki.issue(f"Client Intermediate {version}", issuer=pki.client_ca, ca=True)
    leaf = pki.issue(f"chained client {version}", issuer=intermediate)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.cert_pem + intermediate.cert_pem)
    app = app_factory(client_trust=client_trust, require_client_cert=True)
    app.serve(count=2)
    connect = resuming_peer(app.port, pki.ca, version, cert=leaf, chain_path=str(chain))
    session, _, reply = connect()
    assert reply == b"echo: again\n" and app.outcome().peer_subject == f"CN=chained client {version}"
    blacklist(client, intermediate.cert)
    _, reused, reply = connect(session)
    assert not reused and b"echo" not in reply
    refusal = app.outcome()
    assert isinstance(refusal, E.EKEYREJECTED) and "blacklisted" in refusal.message
    assert f"Client Intermediate {version}" in refusal.message


def test_only_tls13_when_asked(app_factory, server_ring, pki):
    app = app_factory(min_version="1.3")
    app.serve()
    with pytest.raises(ssl.SSLError):
        python_peer(app.port, "a.test", pki.ca, version="1.2")
    assert isinstance(app.outcome(), E.EPROTO)


def test_large_transfers_both_ways_at_once(app_factory, server_ring, pki):
    """4 MiB each way, both directions in flight together: the pump's flow control, no deadlock."""
    size = 4 << 20
    app = app_factory()

    def echo_all(plain):
        while chunk := plain.recv(1 << 16):
            plain.sendall(chunk)
    app.serve(reply=echo_all)
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", app.port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="a.test") as tls:
            received = send_and_receive(tls, payload, size)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def send_and_receive(tls: ssl.SSLSocket, payload: bytes, size: int) -> bytes:
    """Write ``payload`` while reading ``size`` bytes, from one thread: an SSLSocket is not thread-safe."""
    tls.setblocking(False)
    received = bytearray()
    unsent = memoryview(payload)
    deadline = time.monotonic() + TIMEOUT
    while len(received) < size and time.monotonic() < deadline:
        select.select([tls], [tls] if unsent else [], [], 1.0)
        while True:  # all that has arrived, including what OpenSSL has buffered already
            try:
                chunk = tls.recv(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not chunk:
                return bytes(received)
            received += chunk
        if unsent:
            try:  # after a would-block, OpenSSL wants the very same chunk again: unsent has not moved
                unsent = unsent[tls.send(unsent[:1 << 16]):]
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
    return bytes(received)


def test_peer_close_notify_reaches_the_app_as_eof_and_the_app_can_still_answer(client, server_ring, pki):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    out = {}

    def peer():
        out["s_client"] = run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "a.test",
                               "-quiet", "-no_ign_eof"], stdin=b"question\n")
    t = threading.Thread(target=peer)
    t.start()
    with listener:
        listener.settimeout(TIMEOUT)
        conn, _ = listener.accept()
    plain, _info = client.tls_accept(conn)
    with plain:
        plain.settimeout(TIMEOUT)
        got = b""
        while chunk := plain.recv(100):  # ends at the peer's close_notify
            got += chunk
        assert got == b"question\n"
        try:
            plain.sendall(b"late answer\n")
        except OSError:
            pass  # s_client may already be gone: answering after EOF must simply not break keyden
    t.join(TIMEOUT)
    assert out["s_client"].returncode == 0


# ------------------------------------------------------------- isolation and limits


def test_a_silent_peer_times_out_alone(app_factory, server_ring, pki):
    """A peer that never speaks costs its own handshake timeout; another connection meanwhile is served."""
    slow = app_factory(handshake_timeout=2.0)
    slow.serve()
    silent = socket.create_connection(("127.0.0.1", slow.port), timeout=TIMEOUT)
    fast = app_factory()
    fast.serve()
    _, reply = python_peer(fast.port, "a.test", pki.ca)
    assert reply == b"echo: hello\n" and fast.outcome().version
    assert slow.outcomes.empty()  # the silent one is still waiting, and did not hold the other up
    error = slow.outcome()
    silent.close()
    assert isinstance(error, E.ETIMEDOUT) and "did not finish within 2 s" in error.message


def my_audit_records(daemon) -> list[dict]:
    """This process's lines in the shared daemon's audit log."""
    return mine(audit_lines(os.path.join(daemon.state_dir, "audit.log")))


def wait_for_audited(daemon, op: str, count: int) -> None:
    """Until this process's audit lines hold ``count`` of ``op``: the daemon has taken those requests on."""
    deadline = time.monotonic() + TIMEOUT
    while sum(r["op"] == op for r in my_audit_records(daemon)) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_each_handshake_outcome_is_audited_after_its_request(app_factory, server_ring, pki, daemon):
    """tls_accept's own line says the session was taken on; the handshake ends later, and its outcome gets
    a line of its own (op tls_established), written before the application hears it."""
    app = app_factory(handshake_timeout=1.0)
    app.serve(count=2)
    _, reply = python_peer(app.port, "a.test", pki.ca)
    assert reply == b"echo: hello\n" and app.outcome().version
    silent = socket.create_connection(("127.0.0.1", app.port), timeout=TIMEOUT)
    assert isinstance(app.outcome(), E.ETIMEDOUT)
    silent.close()
    lines = my_audit_records(daemon)
    tls_lines = [(r["op"], r["result"]) for r in lines if r["op"] in ("tls_accept", "tls_established")][-4:]
    assert tls_lines == [("tls_accept", "ok"), ("tls_established", "ok"),
                         ("tls_accept", "ok"), ("tls_established", "ETIMEDOUT")]


def test_a_handshake_outcome_known_at_once_is_audited_after_its_request(client, server_ring, daemon):
    """A peer that already sent garbage, or already left, fails the first handshake step, inside the request:
    its tls_established line still comes after the tls_accept line."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    for send in (b"GET / HTTP/1.0\r\n\r\n", b""):
        peer = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if send:
            peer.sendall(send)
        else:
            peer.close()
        conn, _ = listener.accept()
        time.sleep(0.05)  # what the peer did is there before keyden takes the socket
        with pytest.raises((E.EPROTO, E.ECONNRESET)):
            client.tls_accept(conn, "@s")
        conn.close()
        peer.close()
    listener.close()
    ops = [r["op"] for r in my_audit_records(daemon)]
    tls_ops = [op for op in ops if op in ("tls_accept", "tls_established")][-4:]
    assert tls_ops == ["tls_accept", "tls_established"] * 2


def test_an_application_gone_before_the_outcome_is_audited_as_such(client, server_ring, pki, daemon):
    """The application closed its plaintext end while the handshake ran: the peer is not served, and the
    audit line says ECONNRESET, not ok."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peer = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    conn, _ = listener.accept()
    (_fields, fds) = client._call_trading_fds(Op.TLS_ACCEPT, (-3, 0, 0, [], 0), [conn.fileno()])
    conn.close()
    for fd in fds:
        os.close(fd)  # the application is gone before the handshake even starts
    # The daemon closes its own copy of that end just after sending it, on its loop: once the loop has
    # answered a later request, only the application held it (a loaded box could delay that close past
    # the whole handshake, and the daemon then saw the application still there).
    client.ping(b"")
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    try:
        with ctx.wrap_socket(peer, server_hostname="a.test") as tls:
            got = tls.recv(1)  # nobody to speak to: the connection ends
    except (ssl.SSLError, OSError):
        got = b""
    assert got == b""
    listener.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        lines = my_audit_records(daemon)
        if lines and lines[-1]["op"] == "tls_established":
            break
        time.sleep(0.05)
    assert (lines[-1]["op"], lines[-1]["result"]) == ("tls_established", "ECONNRESET")


def test_a_peer_that_hangs_up_mid_handshake(app_factory, server_ring, pki):
    app = app_factory()
    app.serve()
    with socket.create_connection(("127.0.0.1", app.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"\x16\x03\x01\x00\x10")  # the start of a ClientHello, then nothing
    error = app.outcome()
    assert isinstance(error, (E.ECONNRESET, E.EPROTO)), error


def test_stalled_handshakes_from_one_peer_cannot_take_the_users_sessions(client, server_ring, pki, daemon):
    """Anyone who reaches the application's port can start handshakes and stall them.  They counted
    against the uid's 1024 sessions (and the daemon's 2048), so a flood on one service refused TLS to
    every other service and tls_connect of that uid.  Past 32 running from one peer address (256 on one
    listening address), tls_accept is EAGAIN at once; other peers go on, and the slots come back."""
    from keyden.tls.engine import MAX_HANDSHAKES_PER_PEER

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    accepted_before = sum(r["op"] == "tls_accept" for r in my_audit_records(daemon))
    results: queue.Queue = queue.Queue()
    stalled = []
    for _ in range(MAX_HANDSHAKES_PER_PEER):
        stalled.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
        conn, _ = listener.accept()
        threading.Thread(target=lambda conn=conn: results.put(_outcome(client.tls_accept, conn,
                                                                       handshake_timeout=120)),
                         daemon=True).start()
    wait_for_audited(daemon, "tls_accept", accepted_before + len(stalled))  # every one taken on by the daemon

    one_more = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    conn, _ = listener.accept()
    with pytest.raises(E.EAGAIN, match=f"{MAX_HANDSHAKES_PER_PEER} TLS handshakes are already running from "
                                       "127.0.0.1"):
        client.tls_accept(conn)
    conn.close()
    one_more.close()

    def serve_one():
        conn, _ = listener.accept()
        plain, info = client.tls_accept(conn)
        with plain:
            plain.settimeout(TIMEOUT)
            echo_line(plain)
    for source in ("127.0.0.2", "127.0.0.1"):
        server = threading.Thread(target=serve_one, daemon=True)
        server.start()
        _, reply = python_peer(port, "a.test", pki.ca, source=source)
        server.join(TIMEOUT)
        assert reply == b"echo: hello\n"
        if source == "127.0.0.2":  # another peer is served; now the stalled ones go, and with them their slots
            for sock in stalled:
                sock.close()
            for _ in stalled:
                assert isinstance(results.get(timeout=TIMEOUT), (E.ECONNRESET, E.EPROTO))
    listener.close()


def test_a_handshake_running_when_the_daemon_stops_is_told_and_audited(fresh_daemon, pki):
    """It used to end with the process: no outcome line in the audit log, and only a lost connection
    for the application."""
    d = fresh_daemon()
    c = d.connect()
    load(c, pki.ec_server)
    listener = socket.create_server(("127.0.0.1", 0))
    silent = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
    conn, _ = listener.accept()
    results: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: results.put(_outcome(c.tls_accept, conn, handshake_timeout=60)),
                     daemon=True).start()
    wait_for_audited(d, "tls_accept", 1)
    d.stop()
    assert d.proc.returncode == 0
    outcome = results.get(timeout=TIMEOUT)
    assert isinstance(outcome, E.ECONNRESET) and "keyden is stopping" in outcome.message
    (line,) = [r for r in my_audit_records(d) if r["op"] == "tls_established"]
    assert line["result"] == "ECONNRESET"
    silent.close()
    listener.close()


def test_one_client_connection_serves_handshakes_in_parallel(client, server_ring, pki):
    """Threads sharing one keyden client wait on their own sockets, not on each other's handshakes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    silent = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    first, _ = listener.accept()
    results = queue.Queue()
    threading.Thread(target=lambda: results.put(_outcome(client.tls_accept, first, handshake_timeout=5)),
                     daemon=True).start()
    peer = threading.Thread(target=python_peer, args=(port, "a.test", pki.ca), daemon=True)
    peer.start()
    second, _ = listener.accept()
    plain, info = client.tls_accept(second)  # answered while the first is still in its handshake
    with plain:
        plain.settimeout(TIMEOUT)
        echo_line(plain)
    peer.join(TIMEOUT)
    assert info.server_name == "a.test" and results.empty()
    silent.close()  # the first handshake now fails at once, not at its timeout
    assert isinstance(results.get(timeout=TIMEOUT), (E.ECONNRESET, E.EPROTO))
    listener.close()


def _outcome(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except E.KeydenError as exc:
        return exc


def test_refusals_before_the_handshake_leave_the_socket_with_the_app(client, pki):
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(E.ENOKEY):
            client.tls_accept(a)  # an empty keyring
        a.sendall(b"still mine")  # not handed over
        assert b.recv(100) == b"still mine"
        load(client, pki.ec_server)
        with pytest.raises(E.EINVAL):
            client.tls_accept(a, require_client_cert=True)  # no trust keyring to check against
        with pytest.raises(E.ENOKEY, match="client trust keyring"):
            client.tls_accept(a, client_trust=client.newring("no-cas"))  # given, but it vouches for nobody
        with pytest.raises(E.EINVAL):
            client.tls_accept(a, min_version="1.1")
    r, w = os.pipe()
    try:
        with pytest.raises(E.EBADF):
            client.tls_accept(r)
    finally:
        os.close(w)
    unconnected = socket.socket()
    with pytest.raises(E.EINVAL, match="not connected"):
        client.tls_accept(unconnected)
    unconnected.close()
    for wrong in ("x", None, 1.5):  # (they were AttributeErrors: found by a docs hunt)
        for call in (client.tls_accept, client.tls_abort, client.tls_peer_end,
                     lambda s: client.tls_connect(s, "host.test", trust="@s")):
            with pytest.raises(E.EINVAL, match="a socket or a descriptor"):
                call(wrong)
    c, d = socket.socketpair()
    with c, d, pytest.raises(E.EINVAL, match="number of seconds"):
        client.tls_accept(c, handshake_timeout="5")  # (a TypeError)
    # A remote peer's reset before keyden took the socket is the peer's doing, not a bad argument (an
    # application that stops its accept loop on EINVAL could be knocked over from outside).
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with pytest.raises(E.EINVAL, match="a listening socket"):
            client.tls_accept(listener)
        peer = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        time.sleep(0.1)
        with accepted, pytest.raises(E.ECONNRESET, match="before the handshake"):
            client.tls_accept(accepted)


def daemon_fds(daemon) -> dict[str, str]:
    """The daemon's descriptors: number -> what it is (socket:[inode], ...)."""
    where = f"/proc/{daemon.proc.pid}/fd"
    out = {}
    for fd in os.listdir(where):
        try:
            out[fd] = os.readlink(os.path.join(where, fd))
        except OSError:
            pass
    return out


def test_a_refused_request_takes_its_socket_and_leaves_it_as_it_was(daemon, client, pki, trust_ring):
    """Refused before anything starts: the daemon keeps no copy, the next request gets its own socket, and
    the application's socket keeps its own flags (blocking, Nagle)."""
    load(client, pki.ec_server)
    servers = {}
    for name, reply in (("first", b"from the first server\n"), ("second", b"from the second server\n")):
        app = App(client)
        app.serve(reply=lambda plain, reply=reply: (read_until(plain, b"\n"), plain.sendall(reply)))
        servers[name] = app
    first = socket.create_connection(("127.0.0.1", servers["first"].port), timeout=TIMEOUT)
    first.settimeout(None)  # a blocking socket, as most applications have
    with pytest.raises(E.EINVAL, match="server name"):
        client.tls_connect(first, "", trust=trust_ring)
    assert os.get_blocking(first.fileno()) and first.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    ours = f"socket:[{os.fstat(first.fileno()).st_ino}]"
    assert eventually(lambda: ours not in daemon_fds(daemon).values())  # no copy of it left in the daemon
    first.close()
    second = socket.create_connection(("127.0.0.1", servers["second"].port), timeout=TIMEOUT)
    plain, _info = client.tls_connect(second, "a.test", trust=trust_ring)
    with plain:
        plain.settimeout(TIMEOUT)
        plain.sendall(b"hello\n")
        assert read_until(plain, b"\n") == b"from the second server\n"
    second.close()

    a, b = socket.socketpair()
    with a, b:
        assert os.get_blocking(a.fileno())
        with pytest.raises(E.ENOKEY):
            client.tls_accept(a, client.newring("empty"))
        assert os.get_blocking(a.fileno())  # refused: still blocking, as the application made it
        r, w = os.pipe()
        try:  # three descriptors with one request: it takes the first, the others are closed
            with pytest.raises(E.ENOKEY):
                client._call_trading_fds(Op.TLS_ACCEPT, (client.newring("empty-2"), 0, 0, [], 0), [a.fileno(), r, w])
            with pytest.raises(E.EBADF, match="send the connected socket"):  # nothing left for the next one
                client._call_trading_fds(Op.TLS_ACCEPT, (client.newring("empty-3"), 0, 0, [], 0), [])
        finally:
            os.close(r)
            os.close(w)
    for app in servers.values():
        app.close()


def test_the_applications_last_answer_gets_out_when_it_closes_with_input_unread(app_factory, server_ring, pki):
    """An HTTP-style early answer (413) and close(), while the peer is still sending: the peer must get the
    answer and a clean close_notify, not a reset."""
    def answer_early(plain: socket.socket) -> None:
        plain.recv(10)
        plain.sendall(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
    app = app_factory()
    app.serve(reply=answer_early, count=3)
    for size in (100, 64 << 10, 4 << 20):
        ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        with socket.create_connection(("127.0.0.1", app.port), timeout=TIMEOUT) as raw, \
                ctx.wrap_socket(raw, server_hostname="a.test") as tls:
            tls.sendall(b"x" * size)  # completes: once the application has left, keyden reads and drops it
            got = b""
            while True:
                try:
                    chunk = tls.recv(4096)
                except ssl.SSLZeroReturnError:
                    break
                if not chunk:
                    break
                got += chunk
            assert got == b"HTTP/1.1 413 Payload Too Large\r\n\r\n", size


def how_it_ended(tls: ssl.SSLSocket) -> str:
    """How a TLS connection with nothing more to read ends: "close_notify", "reset" or "FIN" (without
    close_notify: a truncation).  Seen below OpenSSL, which reports a reset and a FIN alike."""
    select.select([tls], [], [], TIMEOUT)
    with socket.socket(fileno=os.dup(tls.fileno())) as raw:
        raw.settimeout(TIMEOUT)
        try:
            if not raw.recv(1, socket.MSG_PEEK):
                return "FIN"
        except ConnectionResetError:
            return "reset"
    data = tls.recv(4096)  # (a FIN after data without close_notify: SSLEOFError, as suppress_ragged_eofs is off)
    return f"data: {data!r}" if data else "close_notify"


def send_close_notify(tls: ssl.SSLSocket) -> None:
    """Our close_notify, without waiting for the other side's (as a blocking unwrap would)."""
    tls.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.unwrap()


def end_without_close_notify(tls: ssl.SSLSocket, reset: bool = False) -> None:
    """End the TCP connection under ``tls`` with no close_notify: a FIN now, or with ``reset`` a reset when
    ``tls`` is closed."""
    if reset:
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    else:
        socket.socket.shutdown(tls, socket.SHUT_WR)  # (SSLSocket.shutdown would drop the TLS layer first)


def strict_peer(port: int, ca: Leaf) -> ssl.SSLSocket:
    """A TLS client that tells a truncation from an end (suppress_ragged_eofs off)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.decode())
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return ctx.wrap_socket(raw, server_hostname="a.test", suppress_ragged_eofs=False)


@pytest.mark.parametrize("how", ["abort", "close"])
def test_an_aborted_session_ends_without_close_notify_where_a_close_ends_it_cleanly(client, app_factory, server_ring,
                                                                                  pki, how):
    """An answer cut short (the application's upstream failed mid-answer) must not reach the peer as a whole
    one: after tls_abort, what the application wrote still goes out, and then the connection ends with no
    close_notify (a truncation, to the peer), where a close sends close_notify."""
    def answer_half(plain: socket.socket) -> None:
        read_until(plain, b"\n")
        plain.sendall(b"the first half\n" + bytes(2 << 20))  # more than the buffers on the way hold
        if how == "abort":
            client.tls_abort(plain)
            assert plain.recv(100) == b""  # from the answer on: end of file ...
            with pytest.raises(BrokenPipeError):
                plain.sendall(b"more")  # ... and nothing more goes out; the application still closes it
    app = app_factory()
    app.serve(reply=answer_half)
    with strict_peer(app.port, pki.ca) as tls:
        tls.sendall(b"question\n")
        got = b""
        while len(got) < len(b"the first half\n") + (2 << 20):
            got += tls.recv(1 << 16)
        assert got == b"the first half\n" + bytes(2 << 20)  # all of it, abort or not
        assert how_it_ended(tls) == ("FIN" if how == "abort" else "close_notify")


@pytest.mark.parametrize("how", ["died", "close_notify"])
def test_with_explicit_close_an_application_that_dies_mid_answer_leaves_its_peer_a_truncation(
        client, app_factory, server_ring, pki, how):
    """A close of the plaintext socket was always a graceful end, so an application killed mid-answer (the
    kernel closes its sockets) had keyden send close_notify: its peer took half an answer for a whole one,
    where an in-process TLS stack dies with its process and sends none.  With explicit_close only
    tls_close_notify sends it; a bare end of file is a truncation (found by a TLS hunt)."""
    def answer(plain: socket.socket) -> None:
        read_until(plain, b"\n")
        plain.sendall(b"the answer\n" + bytes(1 << 20))
        if how == "close_notify":
            client.tls_close_notify(plain)
            with pytest.raises(BrokenPipeError):
                plain.sendall(b"more")  # the write side is shut from the answer on
    app = app_factory(explicit_close=True)
    app.serve(reply=answer)  # (then the plaintext socket is closed: what the kernel does at a death too)
    with strict_peer(app.port, pki.ca) as tls:
        tls.sendall(b"question\n")
        got = b""
        while len(got) < len(b"the answer\n") + (1 << 20):
            got += tls.recv(1 << 16)
        assert how_it_ended(tls) == ("FIN" if how == "died" else "close_notify")


#: an application (its session from KEYDEN_SESSION) that takes one connection with explicit_close, answers
#: half of what it means to, and is killed
KILLED_APP = """
import os, signal, socket, sys, keyden
listener = socket.socket(fileno=int(sys.argv[2]))
conn, _ = listener.accept()
plain, _ = keyden.connect(sys.argv[1]).tls_accept(conn, "@s", explicit_close=True)
plain.recv(100)
plain.sendall(b"half an answer")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_application_killed_mid_answer_with_explicit_close(daemon, client, server_ring, pki):
    """The same, with a real death: a process that took the session, wrote half its answer and was killed."""
    listener = socket.create_server(("127.0.0.1", 0))
    env = dict(os.environ, KEYDEN_SESSION=client.session_token,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = subprocess.Popen([sys.executable, "-c", KILLED_APP, daemon.socket, str(listener.fileno())], env=env,
                           pass_fds=(listener.fileno(),))
    try:
        with strict_peer(listener.getsockname()[1], pki.ca) as tls:
            tls.sendall(b"question\n")
            assert read_until(tls, b"answer") == b"half an answer"
            assert how_it_ended(tls) == "FIN"
        assert app.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        app.kill()
        listener.close()


def test_abort_during_the_handshake_and_after_the_end(client, server_ring, pki, daemon):
    """An abort before the handshake has finished ends it (the peer gets a reset, the audit log an outcome);
    one after the session has ended is no error; a socket that was never a session's is EBADF, left open,
    even one that is hung up as an ended session's is."""
    outcomes = sum(r["op"] == "tls_established" for r in my_audit_records(daemon))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)  # sends no ClientHello
        conn, _ = listener.accept()
    with peer:
        plain = client_tls.start_accept(client, conn)
        with plain:
            client.tls_abort(plain)
            with pytest.raises(E.ECONNRESET):
                client_tls.established(plain, TIMEOUT)
            with pytest.raises(ConnectionResetError):
                peer.recv(100)
            client.tls_abort(plain)  # the session is over: nothing to do
    wait_for_audited(daemon, "tls_established", outcomes + 1)
    assert [r["result"] for r in my_audit_records(daemon) if r["op"] == "tls_established"][-1] == "ECONNRESET"
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(E.EBADF, match="not the plaintext socket"):
            client.tls_abort(a)
        a.sendall(b"still mine")
        assert b.recv(100) == b"still mine"
        b.close()  # hung up, as an ended session's socket is, but never keyden's
        with pytest.raises(E.EBADF, match="not the plaintext socket"):
            client.tls_abort(a)
    with socket.socket(socket.AF_UNIX) as unconnected, pytest.raises(E.EBADF, match="not the plaintext socket"):
        client.tls_abort(unconnected)
    r, w = os.pipe()
    try:
        with pytest.raises(E.EBADF, match="not a socket"):
            client.tls_abort(r)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("how, told", [("close_notify", "close_notify"), ("FIN", "truncated"),
                                        ("reset", "truncated")])
def test_the_application_can_tell_a_truncation_from_an_end(client, server_ring, pki, how, told):
    """End of file on the plaintext socket reads the same however the peer ended; tls_peer_end tells a
    close_notify from a connection cut short (a FIN alone, a reset), and what came before arrives (a reset
    may destroy what keyden had not read yet, as it would over TCP).  It still answers once the session
    has ended."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        conn, _ = listener.accept()
    outcome = {}
    peer_ready = threading.Event()

    def peer():
        with ctx.wrap_socket(raw, server_hostname="a.test") as tls:
            peer_ready.set()
            tls.sendall(b"x" * 100000)
            if how == "close_notify":
                send_close_notify(tls)
            else:
                end_without_close_notify(tls, reset=how == "reset")
            outcome["open"] = True
    t = threading.Thread(target=peer)
    t.start()
    plain, _info = client.tls_accept(conn)
    with plain:
        plain.settimeout(TIMEOUT)
        assert peer_ready.wait(TIMEOUT)
        got = plain.recv(10)
        assert client.tls_peer_end(plain) in ("open", told)  # (the end may have come already)
        while chunk := plain.recv(65536):
            got += chunk
        t.join(TIMEOUT)
        assert outcome["open"]
        if how == "reset":
            assert got == b"x" * len(got)  # a reset may destroy what keyden had not read yet, as over TCP
        else:
            assert got == b"x" * 100000
        assert client.tls_peer_end(plain) == told
        plain.shutdown(socket.SHUT_WR)  # both sides done: the session ends (keyden closes its end) ...
        hung_up = select.poll()
        hung_up.register(plain, 0)
        assert eventually(lambda: any(events & select.POLLHUP for _fd, events in hung_up.poll(0)))
        assert client.tls_peer_end(plain) == told  # ... and is still told
    with socket.socket(socket.AF_UNIX) as foreign, pytest.raises(E.EBADF):
        client.tls_peer_end(foreign)


def test_a_session_that_just_ended_is_still_told_not_ebadf(client, server_ring, pki):
    """The peer resets; the application reads its last words and the end, writes (keyden's write fails:
    the session ends) and asks at once.  Until keyden's closer closed its end, the ended session was not
    recognised: EBADF, 25 times in 300, and tls-proxy then passed a cut-off upload on as a whole one
    (found by the TLS hunt)."""
    ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    told = collections.Counter()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for _ in range(100):
            raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
            conn, _ = listener.accept()

            def peer(raw=raw):
                with ctx.wrap_socket(raw, server_hostname="a.test") as tls:
                    tls.sendall(b"last words\n")
                    tls.recv(1)  # once the application has them
                    end_without_close_notify(tls, reset=True)
            t = threading.Thread(target=peer)
            t.start()
            plain, _info = client.tls_accept(conn)
            with plain:
                plain.settimeout(TIMEOUT)
                assert read_until(plain, b"\n") == b"last words\n"
                plain.sendall(b"!")
                t.join(TIMEOUT)
                assert plain.recv(100) == b""
                with contextlib.suppress(OSError):
                    plain.sendall(b"an answer nobody reads\n")
                told[str(_outcome(client.tls_peer_end, plain))] += 1
    assert told == {"truncated": 100}, told


def test_descriptors_sent_on_a_unix_network_socket_never_stall_a_tls_loop(client, pki):
    """The network side may be a Unix socket, whose peer can send descriptors with its bytes: read with a
    plain recv, the kernel dropped them and ran their last close on the TLS loop's thread, a TCP socket's
    linger (as long as the sender set it) in which every session of that loop waited (found by a
    local-attacker hunt).  They go to the closers now."""
    from keyden.client.tls import _hand_over, established
    from keyden.protocol import Op
    from keyden.tls.engine import LOOP_THREADS

    trust = client.newring("unix-trust")
    load(client, pki.ca, ring=trust, with_keys=False)
    never_read = socket.socket()
    never_read.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    never_read.bind(("127.0.0.1", 0))
    never_read.listen(8)
    held = []

    def lingering() -> socket.socket:
        tcp = socket.create_connection(never_read.getsockname())
        tcp.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                tcp.send(bytes(65536))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 4))
        return tcp
    try:
        sessions = []  # (the peer's end, the plaintext socket): attackers, then victims, one on each loop
        for _ in range(2 * LOOP_THREADS):  # every hand-over first: the kernel may hold one that passes a
            ours, theirs = socket.socketpair()  # descriptor while a close of one in flight lingers
            # The application's own options on the socket it shares with keyden take room in each read's
            # control data: what did not fit, the kernel closed in the read (found by review).
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sessions.append((theirs, _hand_over(client, Op.TLS_CONNECT, ("a.test", trust, 0, 0, [], 60000), ours)))
            held += sessions[-1]
            ours.close()
            theirs.settimeout(TIMEOUT)
            theirs.recv(65536)  # the ClientHello: the session is on its loop
        null = os.open(os.devnull, os.O_RDONLY)
        for theirs, _plain in sessions[:LOOP_THREADS]:
            tcp = lingering()
            fds = [null] * 252 + [tcp.fileno()]  # as many as one message carries, the lingering one last
            theirs.sendmsg([b"\x16"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("253i", *fds))])
            tcp.close()  # the copy in flight is the last
        os.close(null)
        time.sleep(0.3)  # the loops read the byte and what came with it
        started = time.monotonic()
        for theirs, plain in sessions[LOOP_THREADS:]:
            theirs.sendall(b"not TLS at all\r\n\r\n" * 4)
            with pytest.raises(E.KeydenError):
                established(plain, TIMEOUT)  # the loop's answer: the handshake failed
        assert time.monotonic() - started < 2, "a TLS loop waited on a close that lingers (4 s)"
    finally:
        for sock in held:
            sock.close()
        never_read.close()


SO_PASSPIDFD = 76  # (Linux 6.5; not in Python 3.11's socket module)


def _link(path: str) -> str:
    """A /proc/PID/fd entry's target, or "" if it closed since it was listed (the closers run meanwhile)."""
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return ""


def test_a_pidfd_the_application_asks_the_network_socket_for_is_closed(fresh_daemon, pki):
    """SO_PASSPIDFD set by the application on the socket it shares with keyden had each of keyden's reads
    install a pidfd, which nothing closed: any uid could use up the daemon's descriptors (found by review)."""
    from keyden.client.tls import _hand_over
    from keyden.protocol import Op

    d = fresh_daemon()
    with d.connect() as c:
        trust = c.newring("trust")
        load(c, pki.ca, ring=trust, with_keys=False)
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
        plain = _hand_over(c, Op.TLS_CONNECT, ("a.test", trust, 0, 0, [], 60000), ours)
        ours.close()
        theirs.settimeout(TIMEOUT)
        theirs.recv(65536)

        def pidfds() -> int:
            fds = f"/proc/{d.proc.pid}/fd"
            return sum(1 for fd in os.listdir(fds) if _link(f"{fds}/{fd}") == "anon_inode:[pidfd]")
        before = pidfds()
        theirs.send(b"\x16\x03\x03\x40\x00")  # a 16 KiB record's header: OpenSSL reads on, a byte at a time
        for i in range(300):
            theirs.send(b"\x02")
            if i % 50 == 0:
                time.sleep(0.005)
        time.sleep(0.3)
        assert eventually(lambda: pidfds() <= before + 2), (before, pidfds())
        theirs.close()
        plain.close()


def test_a_certificate_out_of_date_gives_way_to_a_valid_one_for_the_same_name(client, app_factory, pki):
    """A renewal with a new key (certbot's default) leaves the old certificate and key beside the new
    ones: the expired one, linked first, was served (found by the TLS hunt).  Valid ones come first."""
    expired = pki.issue("a.test", dns=("a.test",), issuer=pki.ca, days=(-60, -1))
    load(client, expired, pki.ec_server)
    app = app_factory()
    app.serve(count=2)
    session, reply = python_peer(app.port, "a.test", pki.ca)
    assert reply == b"echo: hello\n"
    assert session["key"].public_numbers() == pki.ec_server.key.public_key().public_numbers()
    out = run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-noservername", "-CAfile",
               pki.ca.cert_path, "-ign_eof"], stdin=b"hi\n")  # the default, without a name to match
    assert b"echo: hi" in out.stdout and b"Verify return code: 0 (ok)" in out.stdout, out.stdout.decode()


def test_a_servers_sessions_last_one_epoch_then_its_contexts_are_made_anew(pki, monkeypatch):
    """OpenSSL keeps a server's sessions 7200 s; keyden's comment said 300 (found by the TLS hunt).  The
    contexts, and their session caches, are now made anew each SESSION_EPOCH, and the old dropped."""
    from keyden.crypto import asymmetric
    from keyden.tls import contexts

    keys = [asymmetric.parse(pki.ec_server.cert_pem), asymmetric.parse(pki.ec_server.key_pem)]
    clock = [1_000_000.0]
    monkeypatch.setattr(contexts.time, "time", lambda: clock[0])
    first = contexts.server_context(keys, None, 0, ())
    assert contexts.server_context(keys, None, 0, ()) is first
    clock[0] += contexts.SESSION_EPOCH
    second = contexts.server_context(keys, None, 0, ())
    assert second is not first and first not in contexts._cache.values()


def test_a_uid_making_contexts_by_the_dozen_pushes_out_its_own_not_anothers(pki):
    """The context cache dropped the least recently used of all: one uid serving from keyrings by the
    dozen pushed every other uid's server contexts out, and their sessions with them (noted by a
    fairness hunt).  Past the limit, the least recently used of the uid holding the most goes."""
    from keyden.crypto import asymmetric
    from keyden.tls import contexts

    keys = [asymmetric.parse(pki.ec_server.cert_pem), asymmetric.parse(pki.ec_server.key_pem)]
    theirs = contexts.server_context(keys, None, 0, (), uid=4242)
    for i in range(2 * contexts.MAX_CACHED):
        contexts.server_context(keys, None, 0, (f"proto-{i}",), uid=4343)  # another context each
    assert len(contexts._cache) <= contexts.MAX_CACHED
    assert contexts.server_context(keys, None, 0, (), uid=4242) is theirs  # still cached
    assert contexts._held[4242] == 1 and sum(contexts._held.values()) == len(contexts._cache)


def test_a_loop_steps_every_ready_session_of_a_uid_in_turn_past_a_polls_default_cap():
    """A loop's shares by uid keep the descriptors a uid could not step in a round waiting, first in line
    for the next; one not reported by the next poll is taken for no longer ready.  With more ready than
    a poll's default cap (1023), most were never reported, and never stepped (found by review)."""
    import resource
    import select
    import time

    from keyden.tls.engine import Loop

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    stepped: dict[int, int] = {}

    class Busy:  # a session always ready, whose steps take long enough to use up its uid's share
        owner, established, closed = 4444, True, False

        def step(self, fd, events):
            stepped[fd] = stepped.get(fd, 0) + 1
            time.sleep(0.0001)

    loop = Loop("kdtest-loop")
    ready = [os.eventfd(1, os.EFD_NONBLOCK) for _ in range(1100)]  # readable until read: always ready
    try:
        for fd in ready:
            loop.register(fd, Busy(), select.EPOLLIN)
        deadline = time.monotonic() + 20
        while len(stepped) < len(ready) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stepped) == len(ready)
    finally:
        loop.stopping = True
        loop.call_soon(lambda: None)
        loop.stopped.wait(5)
        for fd in ready:
            os.close(fd)


def test_a_peer_that_never_stops_sending_holds_no_loop(client, server_ring, pki):
    """A peer that kept its socket full of 1-byte records, to an application that read them all, held a
    step of its session, so its TLS loop and every session on it (every uid's), for as long as it went on
    (a remote-peer hunt: one connection per loop froze all of keyden's TLS).  A step now makes at most
    STEP_CALLS reads and writes, and the loop steps the others in between.  Told without a clock: a new
    session's handshake and round trip end while every loop's flood still runs."""
    from keyden.tls.engine import LOOP_THREADS

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    stop, sinks = threading.Event(), []

    def serve():  # one thread hands every connection over, in order: the floods', then the victim's
        for i in range(LOOP_THREADS + 1):
            conn, _ = listener.accept()
            plain, _info = client.tls_accept(conn)
            if i == LOOP_THREADS:
                with plain:
                    plain.settimeout(TIMEOUT)
                    echo_line(plain)
                return
            sinks.append(plain)
            threading.Thread(target=lambda p=plain: _read_all(p, stop), daemon=True).start()

    def flood(flooding: threading.Event, outlasted: list) -> None:
        ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    incoming.write(raw.recv(65536))
            raw.sendall(outgoing.read())
            deadline = time.monotonic() + 15
            while not stop.is_set():
                for _ in range(2000):
                    tls.write(b"x")  # a record each
                raw.sendall(outgoing.read())
                flooding.set()
                if time.monotonic() > deadline:
                    outlasted.append(True)  # the victim waited for the flood's end
                    return

    threading.Thread(target=serve, daemon=True).start()
    outlasted: list = []
    floods = [threading.Event() for _ in range(LOOP_THREADS)]
    threads = [threading.Thread(target=flood, args=(flooding, outlasted), daemon=True) for flooding in floods]
    try:
        for thread, flooding in zip(threads, floods):  # one after another: one session on each loop
            thread.start()
            assert flooding.wait(TIMEOUT)
        _, reply = python_peer(port, "a.test", pki.ca)
        ended_first = not outlasted
    finally:
        stop.set()
        for thread in threads:
            thread.join(TIMEOUT)
        listener.close()
        for plain in sinks:
            plain.close()
    assert reply == b"echo: hello\n" and ended_first


def _read_all(plain: socket.socket, stop: threading.Event) -> None:
    plain.settimeout(1)
    with contextlib.suppress(OSError):
        while not stop.is_set() and plain.recv(1 << 20):
            pass


def test_a_uid_that_ends_sessions_by_the_thousand_forgets_its_own_peer_ends_not_anothers():
    """Past the limit, the oldest record of the uid holding the most goes: another uid's session can
    still be asked about (one shared first-in-first-out list let anyone push it out)."""
    from keyden.protocol import TLS_PEER_CLOSE_NOTIFY, TLS_PEER_TRUNCATED
    from keyden.tls.engine import EndedSessions

    ended = EndedSessions(limit=4)
    ended.remember(1000, (1, 1), TLS_PEER_CLOSE_NOTIFY)
    for i in range(10):
        ended.remember(2000, (2, i), TLS_PEER_TRUNCATED)
    assert len(ended) == 4 and ended.get((1, 1)) == TLS_PEER_CLOSE_NOTIFY
    assert [ended.get((2, i)) for i in range(10)] == [None] * 7 + [TLS_PEER_TRUNCATED] * 3
    ended.remember(1000, (2, 9), TLS_PEER_CLOSE_NOTIFY)  # an inode reused: the newest record stands
    assert ended.get((2, 9)) == TLS_PEER_CLOSE_NOTIFY and len(ended) == 4
    for i in range(2, 6):  # now uid 1000 holds the most: its own oldest go
        ended.remember(1000, (1, i), TLS_PEER_TRUNCATED)
    assert ended.get((1, 1)) is None and ended.get((2, 8)) == TLS_PEER_TRUNCATED and len(ended) == 4


def test_ended_sessions_always_evict_the_oldest_record_of_a_uid_holding_the_most():
    """Against a model that scans every uid: whatever the order of ends, reuses and ties, the record
    forgotten is the oldest of a uid holding the most, and nothing else is lost."""
    import random
    from keyden.tls.engine import EndedSessions

    rng = random.Random(7)
    ended, model = EndedSessions(limit=16), {}  # model: identity -> uid, oldest first
    for step in range(5000):
        uid, identity = rng.choice((1, 2, 3, 4, 5, 6)), (rng.randrange(3), rng.randrange(40))
        model.pop(identity, None)
        model[identity] = uid
        counts = collections.Counter(model.values())
        ended.remember(uid, identity, step)
        if len(model) > 16:
            lost = [i for i in model if ended.get(i) is None]
            assert len(lost) == 1, step
            owner = model[lost[0]]
            assert counts[owner] == max(counts.values()), step
            assert lost[0] == next(i for i, u in model.items() if u == owner), step
            del model[lost[0]]
        assert len(ended) == len(model) and all(ended.get(i) is not None for i in model), step


def test_a_peer_that_has_not_ended_is_open(app_factory, client, server_ring, pki):
    seen = queue.Queue()

    def ask(plain):
        read_until(plain, b"\n")
        seen.put(client.tls_peer_end(plain))
        plain.sendall(b"ok\n")
    app = app_factory()
    app.serve(reply=ask)
    _, reply = python_peer(app.port, "a.test", pki.ca)
    assert reply == b"ok\n" and seen.get(timeout=TIMEOUT) == "open"


def test_a_peer_certificate_pyca_cannot_parse_is_refused_not_an_internal_error(pki):
    """OpenSSL verifies certificates whose names pyca will not parse (a PrintableString holding '@'):
    the chain check raised ValueError, and the application got EIO "internal error"."""
    from keyden.core.store import KeyStore
    from keyden.server.handlers.tls import refuse_blacklisted

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "we_ird@x.test")])  # a UTF8String ...
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(pki.ca.cert.subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(pki.ca.key, hashes.SHA256()))
    der = cert.public_bytes(serialization.Encoding.DER)
    at = der.index(b"we_ird@x.test") - 2
    weird = der[:at] + b"\x13" + der[at + 1:]  # ... made a PrintableString, which '@' and '_' may not be in
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(weird).subject.rfc4514_string()
    store = KeyStore()
    refuse_blacklisted(store, [pki.ca.cert.public_bytes(serialization.Encoding.DER), der])  # fine: no error
    with pytest.raises(E.EKEYREJECTED, match="cannot parse"):
        refuse_blacklisted(store, [weird])
    # A key pyca cannot load (here an algorithm it does not know) has no "bin:" name: a ban of it could not
    # be checked, so the chain is refused, not passed (found by a security hunt)
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")  # the SPKI's algorithm: 1.2.840.10045.2.1
    unknown_key = der.replace(ec_public_key, bytes.fromhex("06072a8648ce3d0209"), 1)
    with pytest.raises(UnsupportedAlgorithm):
        x509.load_der_x509_certificate(unknown_key).public_key()
    with pytest.raises(E.EKEYREJECTED, match="whose key keyden cannot read"):
        refuse_blacklisted(store, [unknown_key])


def test_a_server_name_that_is_not_ascii_is_refused_without_a_traceback(app_factory, server_ring, pki, daemon):
    """ssl decodes the SNI before our callback runs; a name that is not ASCII made Python print a
    traceback to the daemon's stderr for every such handshake, unthrottled."""
    app = app_factory()
    app.serve(count=3)
    before = len(daemon.read_log())
    for _ in range(3):
        run(["openssl", "s_client", "-connect", f"127.0.0.1:{app.port}", "-servername", "caf\xe9.test"])
        assert isinstance(app.outcome(), E.EPROTO)
    log = daemon.read_log()[before:]
    assert "Traceback" not in log and "caf" not in log
    assert log.count("a peer's TLS server name is not ASCII") == 1  # one line (throttled), naming no bytes


def test_a_blacklisted_certificate_of_our_own_is_never_served(client, pki):
    leaf = pki.issue("own.test", dns=("own.test",), issuer=pki.ca)
    ring = client.newring("own-identity")
    load(client, leaf, ring=ring)
    blacklist(client, leaf.cert)
    a, b = socket.socketpair()
    with a, b, pytest.raises(E.ENOKEY):  # the keyring has no certificate left that we may present
        client.tls_accept(a, ring)


def test_keyring_and_keys_need_search_permission(daemon, client, pki):
    load(client, pki.ec_server)
    with daemon.connect() as outsider:  # same uid, another session: the test's @s is not its possession
        a, b = socket.socketpair()
        with a, b, pytest.raises(E.EACCES):
            outsider.tls_accept(a, client.describe("@s").serial)
    client.setperm(private_key_in(client, "@s"), 0x31010000)  # the possessor loses search on the private key
    a, b = socket.socketpair()
    with a, b, pytest.raises(E.ENOKEY):
        client.tls_accept(a)


def private_key_in(client, ring) -> int:
    return next(s for s in client.read(ring) if "private key" in client.describe(s).description)


def test_a_revoked_key_stops_serving(client, app_factory, pki):
    load(client, pki.ec_server)
    client.revoke(private_key_in(client, "@s"))
    a, b = socket.socketpair()
    with a, b, pytest.raises(E.ENOKEY):
        client.tls_accept(a)


# ----------------------------------------------------------------- keyden as client


class PythonServer:
    """A plain Python ssl server for tls_connect to talk to; ``client_ca`` makes it ask for client certs."""

    def __init__(self, leaf: Leaf, client_ca: Leaf | None = None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
        if client_ca:
            self.ctx.load_verify_locations(cadata=client_ca.cert_pem.decode())
            self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.seen: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.listener.accept()
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(TIMEOUT)
                cert = tls.getpeercert(True)
                self.seen.put(x509.load_der_x509_certificate(cert).subject.rfc4514_string() if cert else "")
                echo_line(tls)
        except (ssl.SSLError, OSError) as exc:
            self.seen.put(exc)

    def close(self):
        self.listener.close()


@pytest.fixture
def trust_ring(client, pki):
    ring = client.newring("server-trust")
    load(client, pki.ca, ring=ring, with_keys=False)
    return ring


def test_tls_connect_to_a_python_server(client, pki, trust_ring):
    server = PythonServer(pki.ec_server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    plain, info = client.tls_connect(sock, "a.test", trust=trust_ring)
    with plain:
        plain.sendall(b"hi there\n")
        assert read_until(plain, b"\n") == b"echo: hi there\n"
    assert sock.fileno() == -1  # handed over
    assert info.version == "TLSv1.3" and info.server_name == "a.test" and info.peer_subject == "CN=a.test"
    assert server.seen.get(timeout=TIMEOUT) == ""
    server.close()


def test_tls_connect_with_a_client_certificate(client, pki, trust_ring):
    identity = client.newring("identity")
    load(client, pki.client, ring=identity)
    server = PythonServer(pki.rsa_server, client_ca=pki.client_ca)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    plain, info = client.tls_connect(sock, "rsa.test", trust=trust_ring, identity=identity, min_version="1.3")
    with plain:
        plain.sendall(b"mtls\n")
        assert read_until(plain, b"\n") == b"echo: mtls\n"
    assert server.seen.get(timeout=TIMEOUT) == "CN=client one"
    assert info.peer_subject == "CN=rsa.test"
    server.close()


@pytest.mark.parametrize("case", ["wrong CA", "hostname mismatch", "name in the CN only", "blacklisted server"])
def test_tls_connect_refuses_bad_servers(client, pki, trust_ring, case):
    leaf, name = pki.ec_server, "a.test"
    if case == "wrong CA":
        leaf = pki.issue("a.test", dns=("a.test",), issuer=pki.rogue_ca)
    elif case == "hostname mismatch":
        name = "b.test"
    elif case == "name in the CN only":  # RFC 9525, and x509_verify's rule: the name must be in subjectAltName
        leaf = pki.issue("a.test", issuer=pki.ca)
    else:
        leaf = pki.issue("a.test", dns=("a.test",), issuer=pki.ca)
        blacklist(client, leaf.cert)
    server = PythonServer(leaf)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with pytest.raises(E.EKEYREJECTED) as refused:
        client.tls_connect(sock, name, trust=trust_ring)
    words = {"wrong CA": "unable to get local issuer certificate", "hostname mismatch": "Hostname mismatch",
             "name in the CN only": "Hostname mismatch", "blacklisted server": "blacklisted"}[case]
    assert words in refused.value.message
    server.close()


def test_tls_connect_to_an_ip_address_reports_no_server_name(client, pki, trust_ring):
    """RFC 6066: SNI carries host names only, so a connection to an address sends none, and says so."""
    server = PythonServer(pki.issue("127.0.0.1", ips=("127.0.0.1",), issuer=pki.ca))
    asked = []
    server.ctx.sni_callback = lambda _sock, name, _ctx: asked.append(name)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    plain, info = client.tls_connect(sock, "127.0.0.1", trust=trust_ring)
    with plain:
        plain.sendall(b"by address\n")
        assert read_until(plain, b"\n") == b"echo: by address\n"
    assert asked == [None] and info.server_name == "" and info.peer_subject == "CN=127.0.0.1"
    server.close()


def test_a_server_that_refuses_our_alpn_protocols_says_so(client, pki, trust_ring):
    """OpenSSL names some alerts in words only ("tlsv1 alert no application protocol"): still the peer's refusal."""
    server = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1",
                               "-cert", pki.ec_server.cert_path, "-key", pki.ec_server.key_path, "-alpn", "h2"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # EOF: it quits
    try:
        while not (line := server.stdout.readline()).startswith(b"ACCEPT"):  # after its notes: listening
            assert line, "openssl s_server ended before it listened"
        port = int(line.rsplit(b":", 1)[1])  # "ACCEPT 127.0.0.1:PORT", the port it was given
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with pytest.raises(E.EPROTO, match=r"the peer refused the TLS handshake: tlsv1 alert no application protocol$"):
            client.tls_connect(sock, "a.test", trust=trust_ring, alpn=["spdy/1"])
    finally:
        server.kill()
        server.communicate()


def test_alpn_names_that_are_not_ascii_text_or_bytes_are_einval(client, trust_ring):
    """A non-ASCII name raised Python's UnicodeEncodeError, and a number became that many zero bytes."""
    for alpn in (["é"], [5], "h2", [None], 5):
        mine, _theirs = socket.socketpair()
        with mine, _theirs, pytest.raises(E.EINVAL):
            client.tls_connect(mine, "a.test", trust=trust_ring, alpn=alpn)


def test_a_server_that_shares_no_version_is_a_protocol_error_not_a_refused_certificate(client, pki, trust_ring):
    server = PythonServer(pki.ec_server)
    server.ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with pytest.raises(E.EPROTO, match="PROTOCOL_VERSION"):  # the server's alert names no certificate
        client.tls_connect(sock, "a.test", trust=trust_ring, min_version="1.3")
    server.close()


def test_the_system_ca_bundle_can_be_the_trust_keyring(client, pki):
    """.builtin_trusted_keys holds the machine's CA bundle: fine for the Internet, not for our private CA."""
    server = PythonServer(pki.ec_server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    with pytest.raises(E.EKEYREJECTED, match="unable to get local issuer certificate"):
        client.tls_connect(sock, "a.test", trust="%keyring:.builtin_trusted_keys")
    server.close()


def test_tls_connect_needs_trust(client, pki):
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(E.ENOKEY):
            client.tls_connect(a, "a.test", trust=client.newring("empty"))
        with pytest.raises(E.EINVAL):
            client.tls_connect(a, "", trust="@s")


# --------------------------------------------------------------- the memory proof


APP = r"""
import socket, sys
import keyden

socket_path, canary = sys.argv[1], bytes.fromhex(sys.argv[2])  # the canary: held on purpose, to be found
client = keyden.connect(socket_path)  # the session comes from KEYDEN_SESSION; no key was ever here
listener = socket.create_server(("127.0.0.1", 0))
listener.settimeout(20)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
plain, info = client.tls_accept(conn, "@s")
plain.settimeout(20)
line = b""
while not line.endswith(b"\n"):
    line += plain.recv(100)
plain.sendall(b"echo: " + line)
plain.close()
print("served", info.version, flush=True)
sys.stdin.read()  # stay alive, TLS done, until the test has looked
"""


def process_memory(pid: int):
    """Every readable mapping of a process (needs root or the same uid and ptrace rights)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if perms[0] != "r" or end - start > 1 << 30:
                continue
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue  # [vvar] and the like


def found(pid: int, needles: dict[str, bytes]) -> set[str]:
    hits = set()
    for region in process_memory(pid):
        hits.update(name for name, needle in needles.items() if needle in region)
    return hits


def hkdf_expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """RFC 8446 7.1, to turn the logged traffic secrets into the record keys that protect the data."""
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(hashes.SHA384() if len(secret) == 48 else hashes.SHA256(), length, info).derive(secret)


def key_material(private: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """The private key's bytes in every form it could sit in memory: PKCS#8, PEM, d/p/q both byte orders."""
    numbers = private.private_numbers()
    der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pem_line = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()).splitlines()[5]
    needles = {"pkcs8 der": der, "pem line": pem_line}
    for name, value in (("d", numbers.d), ("p", numbers.p), ("q", numbers.q)):
        raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
        needles[f"{name} big-endian"] = raw
        needles[f"{name} little-endian"] = raw[::-1]
    return needles


def test_neither_the_private_key_nor_traffic_secrets_reach_the_application(daemon, client, pki, tmp_path):
    load(client, pki.rsa_server)
    canary = secrets.token_bytes(32)
    env = dict(os.environ, KEYDEN_SESSION=client.session_token,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    app = subprocess.Popen([sys.executable, "-c", APP, daemon.socket, canary.hex()], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = app.stdout.readline()
        assert line.strip().isdigit(), app.stderr.read().decode()  # else the app failed to start
        port = int(line)
        keylog = str(tmp_path / "keylog")
        _, reply = python_peer(port, "rsa.test", pki.ca, data=b"secret business\n", keylog=keylog)
        assert reply == b"echo: secret business\n"
        assert app.stdout.readline().startswith(b"served TLSv1.3")

        needles = key_material(pki.rsa_server.key)
        with open(keylog) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                label, _random, secret = line.split()
                needles[label] = bytes.fromhex(secret)
                if label.endswith("TRAFFIC_SECRET_0"):
                    needles[label + " key"] = hkdf_expand_label(bytes.fromhex(secret), b"key", 32)
        assert {"CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"} <= needles.keys()
        needles["canary"] = canary

        assert found(app.pid, needles) == {"canary"}  # the scanner works, and found nothing else
        assert "d little-endian" in found(daemon.proc.pid, {"d little-endian": needles["d little-endian"]})
    finally:
        app.stdin.close()
        app.wait(TIMEOUT)
        app.stdout.close()
        app.stderr.close()


def engine_server_ctx(pki) -> ssl.SSLContext:
    """A server context for the engine in this process, as keyden's own in what matters here."""
    from keyden.tls import contexts

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # as keyden's own contexts (contexts._base)
    assert not contexts._base(ssl.PROTOCOL_TLS_SERVER, 0, ()).options & ssl.OP_IGNORE_UNEXPECTED_EOF
    server_ctx.load_cert_chain(pki.ec_server.cert_path, pki.ec_server.key_path)
    return server_ctx


@contextlib.contextmanager
def engine_session(pki, eng):
    """The TLS engine in this process, serving one connection from a Python ssl peer: (app, peer)."""
    from keyden.tls.transport import TlsTransport

    server_ctx = engine_server_ctx(pki)
    client_ctx = ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw:
        theirs, _ = listener.accept()
        theirs.setblocking(False)
        tls = TlsTransport.wrap(theirs, server_ctx, server_side=True)  # (as the handlers wrap them)
        app = eng.start(4242, tls, TIMEOUT, lambda chain: None)
        with app, client_ctx.wrap_socket(raw, server_hostname="a.test") as peer:
            app.settimeout(TIMEOUT)
            assert app.recv(65536)  # the TLS_ESTABLISHED frame
            yield app, peer


def test_an_application_that_half_closes_gets_its_end_of_file_at_once(pki, monkeypatch):
    """After the application's request and shutdown(SHUT_WR), the peer answers and stays open: the
    application reads the answer, then end of file, without waiting for the peer to close."""
    from keyden.tls import engine as tls_engine

    monkeypatch.setattr(tls_engine, "CLOSE_GRACE", 3 * TIMEOUT)  # waiting it out would fail the test
    eng = tls_engine.Engine(threads=1)
    with engine_session(pki, eng) as (app, peer):
        app.sendall(b"request\n")
        app.shutdown(socket.SHUT_WR)
        assert read_until(peer, b"\n") == b"request\n"
        got = b""
        while chunk := app.recv(100):
            got += chunk
        assert got == b""  # the answer below comes after our close_notify: the peer keeps it
        peer.sendall(b"response\n")


def test_a_peer_that_ends_without_close_notify_is_told_as_a_truncation(pki):
    """A bare TCP end (no close_notify) reads as end of file, as close_notify does, and TLS_PEER_END says it
    was a truncation (docs/tls.md).  As for OpenSSL in one process, that end is an error: the session takes
    no late answer."""
    from keyden.protocol import TLS_PEER_OPEN, TLS_PEER_TRUNCATED
    from keyden.tls import engine as tls_engine

    eng = tls_engine.Engine(threads=1)
    with engine_session(pki, eng) as (app, peer):
        peer.sendall(b"question\n")
        assert read_until(app, b"\n") == b"question\n"
        assert eng.peer_end(app) == TLS_PEER_OPEN
        end_without_close_notify(peer)
        assert app.recv(100) == b""
        assert eng.peer_end(app) == TLS_PEER_TRUNCATED
        with contextlib.suppress(OSError):
            app.sendall(b"late answer\n")
        app.shutdown(socket.SHUT_WR)
        peer.settimeout(TIMEOUT)
        try:
            got = peer.recv(100)
        except ssl.SSLError:  # OpenSSL's alert for the unexpected end (decode_error)
            got = b""
        assert got == b""  # an alert or the end, never the answer (a timeout fails the test)


def test_a_session_whose_application_left_ends_when_the_peer_reads_nothing(pki, monkeypatch):
    """The engine in-process: the application writes more than the buffers hold, then closes; the peer never
    reads.  The session must end after DRAIN_TIMEOUT without progress (it held a per-uid slot before)."""
    from keyden.tls import engine as tls_engine

    monkeypatch.setattr(tls_engine, "DRAIN_TIMEOUT", 1.0)
    eng = tls_engine.Engine(threads=1)
    with engine_session(pki, eng) as (app, _peer):  # the peer handshakes, then never reads
        app.settimeout(0.5)
        with pytest.raises(TimeoutError):
            while True:  # fill every buffer between here and the silent peer
                app.sendall(b"x" * 65536)
        assert eng._per_uid[4242] == 1
        app.close()  # gone, with its data still queued behind a peer that reads nothing
        deadline = time.monotonic() + TIMEOUT
        while eng._per_uid.get(4242) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not eng._per_uid.get(4242), "the session outlived its application and its drain timeout"


def test_a_peer_that_resets_before_the_handshake_is_econnreset_not_einval(pki):
    """The peer sent the start of a ClientHello and reset after the request's checks saw the socket
    connected: wrapping it, ssl found it unconnected with data waiting, and the application was told
    EINVAL, its own mistake (found by review: 2 in ~3,200 accepts under churn).  The wrap touches the
    socket no more; the handshake meets the reset and says so."""
    from keyden.server.handlers.tls import _wrap
    from keyden.tls import engine as tls_engine
    from keyden.tls.transport import TlsTransport

    server_ctx = engine_server_ctx(pki)
    eng = tls_engine.Engine(threads=1)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        theirs, _ = listener.accept()
        with theirs:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start, unread
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()  # a reset
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                try:
                    theirs.getpeername()
                except OSError:
                    break
                time.sleep(0.01)
            tls = _wrap(theirs, lambda dup: TlsTransport.wrap(dup, server_ctx, server_side=True))
            app = eng.start(4242, tls, TIMEOUT, lambda chain: None)
            with app:
                app.settimeout(TIMEOUT)
                decoder = W.FrameDecoder()
                decoder.feed(app.recv(65536))
                assert next(decoder.frames()).status == E.ECONNRESET.code


def test_an_application_that_clears_o_nonblock_on_its_socket_cannot_stall_a_tls_loop(pki):
    """keyden drives a duplicate of the application's socket: one open file description, whose O_NONBLOCK
    the application may clear after the hand-over.  A peer that then sent one byte of a record held the
    loop's thread in a blocking read, and every session on that loop with it (found by review: two such
    sessions denied TLS to every user).  Every read and write now carries MSG_DONTWAIT."""
    import fcntl

    from keyden.tls import engine as tls_engine
    from keyden.tls.transport import TlsTransport

    server_ctx = engine_server_ctx(pki)
    eng = tls_engine.Engine(threads=1)
    handed, peer = socket.socketpair()
    kept = os.dup(handed.fileno())  # the application's own copy of the open file description
    try:
        wedge = eng.start(4242, TlsTransport.wrap(handed.dup(), server_ctx, server_side=True), TIMEOUT,
                          lambda chain: None)
        fcntl.fcntl(kept, fcntl.F_SETFL, fcntl.fcntl(kept, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        peer.sendall(b"\x16")  # one byte of a record, and no more
        time.sleep(0.2)  # the loop has read it by now
        with engine_session(pki, eng) as (app, other_peer):  # the same loop serves another session
            other_peer.sendall(b"still served\n")
            assert read_until(app, b"\n") == b"still served\n"
    finally:
        os.close(kept)
        handed.close()
        peer.close()
    wedge.close()


def test_descriptors_planted_in_a_sessions_plaintext_socket_are_closed_off_the_tls_loop(pki):
    """The application can queue descriptors in keyden's end of its plaintext socket (SCM_RIGHTS) that
    nobody reads before the handshake ends; closing that end was their last close, on the TLS loop's
    thread: a TCP socket lingering over unsent data held the loop, and every session on it, for as long
    as its SO_LINGER said (found by review).  The end goes to the uid's closers instead."""
    from keyden.tls import engine as tls_engine
    from keyden.tls.transport import TlsTransport

    server_ctx = engine_server_ctx(pki)
    eng = tls_engine.Engine(threads=1)
    with socket.create_server(("127.0.0.1", 0)) as sink:  # accepts (the backlog) and never reads
        lingering = socket.create_connection(sink.getsockname())
        lingering.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                lingering.send(b"x" * 65536)  # until its send buffer is full: a close must wait to send it
        lingering.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3 * TIMEOUT))
        handed, silent_peer = socket.socketpair()
        with handed, silent_peer:
            app = eng.start(4242, TlsTransport.wrap(handed.dup(), server_ctx, server_side=True), 0.2,
                            lambda chain: None)  # a handshake that never comes: over in 0.2 s
            with app:
                app.sendmsg([b"z"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", lingering.fileno()))])
                lingering.close()  # keyden's queue now holds its last reference
                time.sleep(0.5)  # the session has timed out and closed its end
                with engine_session(pki, eng) as (served, peer):  # the same loop serves another session
                    peer.sendall(b"still served\n")
                    assert read_until(served, b"\n") == b"still served\n"


@contextlib.contextmanager
def small_buffer_session(pki, eng, server_ctx=None, client_ctx=None, tcp_buffer=32768):
    """engine_session with small TCP buffers on both sides, so that records wait for room in keyden."""
    from keyden.tls.transport import TlsTransport

    server_ctx = server_ctx or engine_server_ctx(pki)
    client_ctx = client_ctx or ssl.create_default_context(cadata=pki.ca.cert_pem.decode())
    with socket.create_server(("127.0.0.1", 0)) as listener:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, tcp_buffer)
        raw.connect(listener.getsockname())
        theirs, _ = listener.accept()
        theirs.setblocking(False)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, tcp_buffer)
        app = eng.start(4242, TlsTransport.wrap(theirs, server_ctx, server_side=True), TIMEOUT, lambda chain: None)
        with app, client_ctx.wrap_socket(raw, server_hostname="a.test", suppress_ragged_eofs=False,
                                          do_handshake_on_connect=False) as peer:
            peer.settimeout(TIMEOUT)
            app.settimeout(TIMEOUT)
            yield app, peer


def test_a_full_duplex_session_never_waits_on_itself(pki):
    """Found by review of the non-blocking transport: reading stopped while records waited for room, so a
    peer that sends its whole upload before reading and an application that answers as it reads waited
    for each other for good (tls-proxy included).  Reading goes on, with records waiting."""
    from keyden.tls import engine as tls_engine

    size = 8 << 20
    with small_buffer_session(pki, tls_engine.Engine(threads=1)) as (app, peer):
        peer.do_handshake()
        assert app.recv(65536)  # TLS_ESTABLISHED
        got = []

        def application():
            writer = threading.Thread(target=app.sendall, args=(b"d" * size,), daemon=True)
            writer.start()
            n = 0
            while n < size:
                n += len(app.recv(1 << 16))
            writer.join(TIMEOUT)
            got.append(n)
        worker = threading.Thread(target=application, daemon=True)
        worker.start()
        peer.sendall(b"u" * size)  # all of the upload first
        received = 0
        while received < size:
            received += len(peer.recv(1 << 16))
        worker.join(TIMEOUT)
        assert got == [size] and received == size


def test_an_answer_waiting_for_a_slow_reader_all_arrives_before_close_notify(pki, monkeypatch):
    """Found by review: the end of an answer could still wait for room in keyden when the application
    closed, and CLOSE_GRACE (the time close_notify gets) then dropped it: a slow reader got a truncation.
    The session closes only once all of the answer is out."""
    from keyden.tls import engine as tls_engine

    monkeypatch.setattr(tls_engine, "CLOSE_GRACE", 0.2)
    size = 6 * tls_engine.WRITE_CHUNK  # the last write a whole chunk: it waits for room as the app closes
    with small_buffer_session(pki, tls_engine.Engine(threads=1), tcp_buffer=65536) as (app, peer):
        peer.do_handshake()
        assert app.recv(65536)
        app.sendall(b"a" * size)
        app.shutdown(socket.SHUT_WR)
        received = 0
        while chunk := peer.recv(4096):  # about 100 KB/s: the last records wait longer than CLOSE_GRACE
            received += len(chunk)
            time.sleep(0.04)
        assert received == size  # and the end was close_notify (a truncation raises)


def test_an_abort_sends_what_the_application_wrote_then_ends_without_spinning(pki):
    """Found by review: an abort shut the socket with records still waiting for room (lost), and the loop
    then spun on EPOLLOUT.  What the application wrote goes out, then the end without close_notify."""
    from keyden.tls import engine as tls_engine

    eng = tls_engine.Engine(threads=1)
    with small_buffer_session(pki, eng) as (app, peer):
        peer.do_handshake()
        assert app.recv(65536)
        app.sendall(b"a" * 300_000)
        eng.abort(app)
        received = 0
        while received < 100_000:
            received += len(peer.recv(min(1 << 16, 100_000 - received)))
        loop_thread = next(t for t in threading.enumerate() if t.name == "keyden-tls-0")
        cpu_before = _thread_cpu(loop_thread)
        time.sleep(1.0)  # the peer reads nothing meanwhile
        assert _thread_cpu(loop_thread) - cpu_before < 0.5  # it waited, not spun
        with pytest.raises(ssl.SSLEOFError):  # no close_notify: a truncation, after all of it
            while chunk := peer.recv(1 << 16):
                received += len(chunk)
        assert received == 300_000


def _thread_cpu(thread) -> float:
    with open(f"/proc/self/task/{thread.native_id}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_refused_handshake_still_tells_the_peer_why(pki):
    """Found by review: the alert OpenSSL wrote when a handshake failed stayed in memory, and the peer saw
    a bare end.  A client without the certificate required hears certificate_required."""
    from keyden.tls import engine as tls_engine

    server_ctx = engine_server_ctx(pki)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=pki.ca.cert_pem.decode())
    with small_buffer_session(pki, tls_engine.Engine(threads=1), server_ctx=server_ctx) as (app, peer):
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            peer.do_handshake()
            peer.recv(1)  # (TLS 1.3: the server's verdict comes after the client's flight)


def test_ended_sessions_let_go_of_their_buffers_and_tls_state_at_once(pki):
    """A closed session's deadline entries stayed in its loop's heap until their time came (the handshake
    timeout, or DRAIN_TIMEOUT after its application left), and the session with them: its two 64 KiB
    buffers and OpenSSL's connection.  At hundreds of short connections a second that was gigabytes of
    locked memory (found by review).  Now a session frees them as it closes, and the heap is bounded."""
    import gc

    from keyden.tls import engine as tls_engine

    eng = tls_engine.Engine(threads=1)
    for i in range(3 * tls_engine.STALE_DEADLINES):
        with engine_session(pki, eng) as (app, peer):
            peer.sendall(b"ping\n")
            assert read_until(app, b"\n") == b"ping\n"
    deadline = time.monotonic() + TIMEOUT
    while eng._per_uid.get(4242) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not eng._per_uid.get(4242)
    loop = eng._loops[0]
    # Bounded, not one per session (192 here): the heap is rebuilt when it passes STALE_DEADLINES plus the
    # sessions open then, and one ending as the next begins may still have been open (a CI run saw 66).
    assert len(loop.deadlines) <= tls_engine.STALE_DEADLINES + 4
    ended = [obj for obj in gc.get_objects() if isinstance(obj, tls_engine.Session) and obj.closed]
    assert ended, "no ended session to look at"  # (the heap keeps a few)
    for session in ended:
        assert len(session.up) == len(session.down) == 0
        assert session.tls.obj is None  # its SSL object is gone


def test_an_application_that_shuts_its_reading_side_still_answers(pki, monkeypatch):
    """shutdown(SHUT_RD) on the plaintext socket made the peer's next bytes fail to deliver (EPIPE), which
    was taken for the application's leaving: DRAIN_TIMEOUT later the session ended, and the answer the
    application then wrote was lost.  It only reads no more: what it writes still goes out."""
    from keyden.tls import engine as tls_engine

    monkeypatch.setattr(tls_engine, "DRAIN_TIMEOUT", 0.5)
    eng = tls_engine.Engine(threads=1)
    with engine_session(pki, eng) as (app, peer):
        app.shutdown(socket.SHUT_RD)
        peer.sendall(b"ignored\n")
        time.sleep(1.5)  # past the drain timeout
        app.sendall(b"late answer\n")
        assert read_until(peer, b"\n") == b"late answer\n"


def test_a_destroyed_key_leaves_no_tls_context_behind(pki):
    """The context cache holds keys loaded in OpenSSL: destroying a key (unlinked, or collected after a
    revoke) drops every context built with it, so the material does not outlive the key."""
    from keyden.core import keytypes
    from keyden.crypto import asymmetric
    from keyden.tls import contexts

    cert = asymmetric.parse(pki.ec_server.cert_pem)
    key = asymmetric.parse(pki.ec_server.key_pem)
    other = asymmetric.parse(pki.rsa_server.cert_pem), asymmetric.parse(pki.rsa_server.key_pem)
    contexts.server_context([cert, key], None, 0, ())
    contexts.client_context([pki.ca.cert], [cert, key], 0, ())
    contexts.server_context(list(other), None, 0, ())

    def cached_with(parsed) -> int:
        return sum(any(p is parsed or isinstance(p, tuple) and parsed in p for p in k) for k in contexts._cache)
    assert cached_with(key) == 2 and cached_with(other[1]) == 1
    keytypes.REGISTRY["asymmetric"].destroy(key)
    assert cached_with(key) == 0 and cached_with(other[1]) == 1  # only what was built with it goes


def test_a_context_built_with_a_key_destroyed_meanwhile_is_used_once_and_not_kept(pki):
    from keyden.core import keytypes
    from keyden.crypto import asymmetric
    from keyden.tls import contexts

    cert, key = asymmetric.parse(pki.ec_server.cert_pem), asymmetric.parse(pki.ec_server.key_pem)
    keytypes.REGISTRY["asymmetric"].destroy(key)  # gone after the request collected its keys
    assert key.released
    assert contexts.server_context([cert, key], None, 0, ()) is not None
    assert not any(key in k[1] for k in contexts._cache if k[0] == "server")


class _StubLoop:
    """What a Session asks of its loop, recorded: registrations, and deadlines handed over."""

    def __init__(self):
        self.registered: dict[int, int] = {}
        loop = self

        class Arrivals(list):
            def append(self, session):  # the loop may run the session's deadline from here on
                assert session.tls.fileno() in loop.registered, "deadline handed over before the socket"
                super().append(session)

        self.arrivals = Arrivals()

    def register(self, fd, session, mask):
        self.registered[fd] = mask

    def modify(self, fd, mask):
        self.registered[fd] = mask

    def unregister(self, fd):
        if self.registered.pop(fd, None) is None:
            raise FileNotFoundError(2, "not registered")

    def at(self, when, session):
        pass


def test_a_session_is_registered_before_its_deadline_and_always_gives_back_its_count():
    """A deadline already passed when the loop adopts a session closes it there: the socket must be
    registered by then, and a close that finds it unregistered still releases the session's count."""
    from keyden.tls.engine import Session
    from keyden.tls.transport import TlsTransport

    released = []
    loop = _StubLoop()
    peer, ours = socket.socketpair()
    app, plain = socket.socketpair()
    ours.setblocking(False)
    tls = TlsTransport.wrap(ours, ssl.create_default_context(), server_side=False, server_hostname="x.example")
    session = Session(loop, 0, tls, plain, 0.001, lambda chain: None, lambda: released.append(1))
    session.start()  # sends its ClientHello and waits for the peer
    assert loop.arrivals == [session] and not session.closed
    loop.registered.clear()  # as if it had not been registered yet
    session.deadline_passed(session.deadline)
    assert session.closed and released == [1] and plain.fileno() == -1
    for s in (peer, app):
        s.close()


def test_a_session_whose_start_fails_after_its_handshake_ended_gives_its_handshake_slot_back_once(pki,
                                                                                                 monkeypatch):
    """A handshake whose end was told in the session's first step had its slots given back then; a start
    that fails after that (its socket not registered: ENOSPC, out of epoll watches) gave them back again,
    taking another handshake's count on the same service, so the caps could be passed (found by a review)."""
    from keyden.tls import engine as tls_engine
    from keyden.tls.transport import TlsTransport

    def start_then_fail(session):
        report, session.report = session.report, None
        report(0)  # the handshake's end, told in the first step
        raise OSError(errno.ENOSPC, "no more epoll watches")

    monkeypatch.setattr(tls_engine.Session, "start", start_then_fail)
    eng = tls_engine.Engine(threads=1)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
        theirs, _ = listener.accept()
        tls = TlsTransport.wrap(theirs, engine_server_ctx(pki), server_side=True)
        slots = tls_engine._handshake_slots(4242, tls)
        eng._handshaking.update(slots)  # another handshake on the same service, from the same host
        with pytest.raises(OSError):
            eng.start(4242, tls, TIMEOUT, lambda chain: None)
        assert all(eng._handshaking[slot] == 1 for slot in slots)  # the other one's, still counted
        assert eng._per_uid[4242] == 0
        theirs.close()
    eng.stop()


def test_a_stopped_engine_is_replaced_not_reused(monkeypatch):
    """A server's stop ends its TLS engine's loops; another server in the same process (tests, embedders)
    must get a running engine, not hand its sessions to the stopped loops."""
    from keyden.tls import engine as tls_engine

    monkeypatch.setattr(tls_engine, "_engine", None)
    first = tls_engine.engine()
    assert tls_engine.engine() is first  # one engine while it runs
    first._start()
    tls_engine.stop()
    assert all(loop.stopped.is_set() for loop in first._loops)
    second = tls_engine.engine()
    assert second is not first
    tls_engine.stop()


@pytest.mark.parametrize("name", ["a..b", ".a.test", "a\0b.test", "x" * 300, ".".join(["a" * 63] * 4) + ".ab",
                                  ".".join(["a" * 63] * 5), "a b.test", "a.test/x", "*.a.test", "a.test\r\nX: 1"])
def test_a_server_name_wrap_socket_would_refuse_is_einval_before_it_takes_the_socket(client, trust_ring, name):
    """Labels of 63 bytes make a name IDNA takes and OpenSSL's SNI (255 bytes at most) does not: that was
    EIO "internal error" with a traceback, and ssl closed the application's socket on the worker."""
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(E.EINVAL, match="not a valid host name"):
            client.tls_connect(a, name, trust=trust_ring)
        assert a.fileno() >= 0 and a.getpeername() == b.getsockname()  # still the application's
