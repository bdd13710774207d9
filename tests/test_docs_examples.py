"""Every ```python block in README.md and docs/*.md runs, so the documentation cannot rot.

The blocks are read from the markdown when the tests are collected: editing an example changes what
is tested.  Convention: the blocks of one file run in document order in one namespace, as a reader
typing them in would run them (a later block goes on with the `client` or `c` an earlier one made).
Each file gets a fresh session keyring ($KEYDEN_SESSION) on this module's own daemon ($KEYDEN_SOCKET),
so `keyden.connect()` in an example reaches it unchanged.  What a reader would already have (a peer's
public key and messages, a certificate file, a server to connect to) comes from a per-file prelude
below; where an example claims something (a comment's output, an error), a check after it verifies it.
tls.md's examples run on loopback only: its server's ("0.0.0.0", 8443) becomes a free port on 127.0.0.1,
and internal.example:443 a local server.  The README's shell tour runs as a bash script against the same
daemon.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import os
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

import keyden
from keyden import errors as E
from tests.conftest import REPO, Daemon

DOC_FILES = ["README.md"] + sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                                   if name.endswith(".md"))
TIMEOUT = 20  # seconds: the longest any helper thread waits, so a broken example never hangs the suite


def fenced_blocks(path: str) -> list[tuple[int, str, str]]:
    """(line of the opening fence, its info string, the code) for every fenced block of a markdown file."""
    blocks = []
    opening = None
    with open(os.path.join(REPO, path)) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip().startswith("```"):
            continue
        if opening is None:
            opening = (number, line.strip()[3:].strip())
        else:
            first, info = opening
            blocks.append((first, info, textwrap.dedent("\n".join(lines[first:number - 1]))))
            opening = None
    assert opening is None, f"{path}:{opening[0]}: a fence that is never closed"
    return blocks


def python_blocks() -> list[tuple[str, int, str]]:
    found = []
    for path in DOC_FILES:
        for line, info, code in fenced_blocks(path):
            if info.split()[:1] == ["python"]:
                found.append((path, line, code))
    return found


BLOCKS = python_blocks()


# ------------------------------------------------------------------ what a reader already has


def make_certificate(name: str, issuer=None):
    """An EC certificate for ``name`` (a CA when ``issuer`` is None) and its key, valid today."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[0].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if issuer:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256()), key


def pem(cert_or_key) -> bytes:
    if isinstance(cert_or_key, x509.Certificate):
        return cert_or_key.public_bytes(serialization.Encoding.PEM)
    return cert_or_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def session_keys_prelude(doc: "DocFile") -> None:
    """The peer of session-keys.md: an X25519 key pair and a salt; for key transport, the reader's RSA key
    in keyden and what the peer sent: a fresh AES key wrapped to it with RSA-OAEP, and a message under it."""
    doc.peer_private = x25519.X25519PrivateKey.generate()
    doc.namespace["peer_public"] = doc.peer_private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    doc.namespace["salt"] = os.urandom(16)
    with doc.connect() as c:
        rsa_key = c.generate("rsa:2048", "myproto:transport")
        rsa_public = c.public_key(rsa_key)
    session_key = AESGCM.generate_key(256)
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    nonce, aad = os.urandom(12), b"myproto v1"
    doc.peer_message = b"hello from the peer"
    doc.namespace.update(rsa_key=rsa_key, wrapped=rsa_public.encrypt(session_key, oaep), nonce=nonce, aad=aad,
                         ciphertext=AESGCM(session_key).encrypt(nonce, doc.peer_message, aad))


def tls_prelude(doc: "DocFile") -> None:
    """tls.md's server example reads server.crt and server.key and waits for a browser on port 8443 (here a free
    port on loopback: ``listen_on_loopback``); its client
    example connects to internal.example:443 with a CA keyring and a client-certificate keyring.  Here: the
    files, a browser (Python's ssl), and a TLS server that internal.example:443 resolves to."""
    ca = make_certificate("Docs Example CA")
    server = make_certificate("www.example.com", issuer=ca)
    with open(os.path.join(doc.workdir, "server.crt"), "wb") as f:
        f.write(pem(server[0]))
    with open(os.path.join(doc.workdir, "server.key"), "wb") as f:
        f.write(pem(server[1]))
    doc.browser = {}
    doc.listening = threading.Event()  # set once the example's listener has its port, in doc.browser["port"]
    doc.browser_thread = threading.Thread(target=browse_port_8443, args=(pem(ca[0]), doc.browser, doc.listening),
                                          daemon=True)
    doc.browser_thread.start()

    internal = make_certificate("internal.example", issuer=ca)
    me = make_certificate("docs example client", issuer=ca)
    with doc.connect() as c:
        doc.namespace["ca_ring"] = c.newring("ca")
        c.add("asymmetric", "", pem(ca[0]), doc.namespace["ca_ring"])
        doc.namespace["my_cert_ring"] = c.newring("my-cert")
        c.add("asymmetric", "", pem(me[0]), doc.namespace["my_cert_ring"])
        c.add("asymmetric", "", pem(me[1]), doc.namespace["my_cert_ring"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with open(os.path.join(doc.workdir, "internal.pem"), "wb") as f:
        f.write(pem(internal[0]) + pem(internal[1]))
    context.load_cert_chain(os.path.join(doc.workdir, "internal.pem"))
    context.load_verify_locations(cadata=pem(ca[0]).decode())
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    doc.internal_example = listener.getsockname()[1]
    doc.internal_server = {}
    threading.Thread(target=serve_internal_example, args=(listener, context, doc.internal_server),
                     daemon=True).start()


def browse_port_8443(ca_pem: bytes, result: dict, listening: threading.Event) -> None:
    """A browser for tls.md's server: waits for the listener, asks for / with SNI www.example.com."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    if not listening.wait(TIMEOUT):
        return
    raw = socket.create_connection(("127.0.0.1", result["port"]), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname="www.example.com") as tls:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
        response = b""
        while chunk := tls.recv(65536):
            response += chunk
    result["response"] = response


def serve_internal_example(listener: socket.socket, context: ssl.SSLContext, result: dict) -> None:
    """internal.example: a TLS server that asks for a client certificate and echoes one message."""
    listener.settimeout(TIMEOUT)
    with listener:
        raw, _ = listener.accept()
    raw.settimeout(TIMEOUT)
    with context.wrap_socket(raw, server_side=True) as tls:
        result["client"] = dict(pair[0] for pair in tls.getpeercert()["subject"])["commonName"]
        tls.sendall(tls.recv(65536))


PRELUDES = {"docs/session-keys.md": session_keys_prelude, "docs/tls.md": tls_prelude}


# ------------------------------------------------------------------ what the examples claim


def check_readme_jwt(doc, code, out):
    assert "{'sub': 'alice'}" in out                      # the token verified with the public half
    assert "private key material never leaves keyden" in out


def check_readme_session_keys(doc, code, out):
    ns = doc.namespace
    assert len(ns["blob"]) == 12 + len(b"attack at dawn") + 16  # nonce || ct || tag
    assert ns["aead"].decrypt_random(ns["blob"]) == b"attack at dawn"
    with pytest.raises(E.EOPNOTSUPP):
        ns["client"].read(ns["k"])                        # the derived key never leaves keyden


def check_dataplane(doc, code, out):
    ns = doc.namespace
    assert ns["pt"] == b"data"
    assert ns["n"] == len(b"data") + 16
    assert ns["pts"] == ns["messages"]
    altered = [bytes([ns["cts"][0][0] ^ 1]) + ns["cts"][0][1:], ns["cts"][1]]
    first, second = ns["client"].aead(ns["key"]).decrypt_batch(ns["nonces"], altered, ns["aads"])
    assert isinstance(first, E.EBADMSG) and second == b"two"   # per item: plaintext, or the EBADMSG instance
    assert ns["digest"] == hashlib.sha256(b"part 1part 2").digest()
    assert (ns["so_far"], ns["both"]) == (hashlib.sha256(b"ClientHello").digest(),
                                          hashlib.sha256(b"ClientHelloServerHello").digest())
    assert ns["out"] + ns["last"] == ns["chunk1"] + ns["chunk2"]   # the stream decrypted what it encrypted
    assert len(ns["s"].nonce) == 12


def check_shared_memory(doc, code, out):
    ns = doc.namespace
    assert ns["client"].aead(ns["key"]).decrypt(ns["nonce"], ns["sealed"], None) == ns["data"]


def check_cipher_many(doc, code, out):
    ns = doc.namespace
    pieces, open_records = ns["pieces"], ns["open_records"]
    assert open_records(pieces) == ns["records"]
    assert len({nonce for nonce, _ in pieces}) == 8   # each piece its own nonce
    for tampered in (pieces[:-1], pieces[1:], [pieces[1], pieces[0], *pieces[2:]], pieces + pieces[-1:], []):
        with pytest.raises(E.EBADMSG):  # cut short, reordered, repeated, emptied: nothing opens
            open_records(tampered)


def check_blocking_client(doc, code, out):
    assert re.fullmatch(r" *\d+: alswrv-\S+ +\d+ +\d+ user: db:password\n", out)


def check_pkey(doc, code, out):
    ns = doc.namespace
    with pytest.raises(E.EKEYREJECTED):
        ns["c"].pkey_verify(ns["serial"], "enc=pss hash=sha256 saltlen=digest", bytes(32), ns["sig"])


def check_asymmetric_use(doc, code, out):
    serial = doc.namespace["signing_only"]
    assert out == f"12\nkey {serial} is bound to sign only, not decrypt\n"


def check_asyncio(doc, code, out):
    assert out.startswith("b'abc' Description(") and "description='token'" in out
    assert ", perm=0x3f010000," in out  # the mask in hex, as keyctl writes it (not 1056964608)


def check_key_handles(doc, code, out):
    ns = doc.namespace
    with pytest.raises(E.ENOKEY):
        ns["c"].read(ns["h"])                             # invalidated
    assert ns["k"].private_key().key_size == 2048
    revoked = ns["c"].key(ns["c"].add("user", "revoked", b"x"))
    revoked.revoke()
    with pytest.raises(E.EKEYREVOKED):
        revoked.invalidate()                              # "refuses everything, invalidate included"


def check_pyjwt(doc, code, out):
    assert doc.namespace["claims"] == {"sub": "alice"}


def check_derive(doc, code, out):
    """The peer, with its own private key, derives the same session key and opens the blob."""
    ns = doc.namespace
    mine = serialization.load_der_public_key(ns["my_public"])
    shared = doc.peer_private.exchange(mine)
    session_key = HKDF(hashes.SHA256(), 32, ns["salt"], b"myproto v1").derive(shared)
    assert AESGCM(session_key).decrypt(ns["blob"][:12], ns["blob"][12:], None) == b"hello"
    assert "cannot be read" in out


def check_key_transport(doc, code, out):
    assert doc.namespace["plaintext"] == doc.peer_message


def check_tls_server(doc, code, out):
    claimed = re.search(r"print\(info\.version.*# (.+)", code)[1]   # the output the example's comment shows
    assert out == claimed + "\n"
    doc.browser_thread.join(TIMEOUT)
    assert doc.browser.get("response", b"").endswith(b"\r\n\r\nok")
    assert doc.namespace["request"].startswith(b"GET / HTTP/1.1\r\n")


def check_tls_client(doc, code, out):
    plain = doc.namespace["plain"]
    plain.settimeout(TIMEOUT)
    plain.sendall(b"ping")
    assert plain.recv(65536) == b"ping"
    assert doc.internal_server["client"] == "docs example client"   # identity=my_cert_ring was presented
    assert doc.namespace["info"].server_name == "internal.example"


# (file, text that picks the block, check): a check whose block is gone fails test_every_check_has_its_block
CHECKS = [
    ("README.md", "jwt.encode", check_readme_jwt),
    ("README.md", "encrypt_random(b\"attack at dawn\")", check_readme_session_keys),
    ("docs/dataplane.md", "client.aead(key)", check_dataplane),
    ("docs/dataplane.md", "client.shared_buffer(", check_shared_memory),
    ("docs/dataplane.md", "cipher_many(", check_cipher_many),
    ("docs/python-api.md", "c.add(\"user\", \"db:password\"", check_blocking_client),
    ("docs/python-api.md", "c.pkey_sign(", check_pkey),
    ("docs/python-api.md", "use=\"sign\")", check_asymmetric_use),
    ("docs/python-api.md", "asyncio.run(main())", check_asyncio),
    ("docs/python-api.md", "h = c.key(", check_key_handles),
    ("docs/python-api.md", "jwt.decode(", check_pyjwt),
    ("docs/session-keys.md", "client.derive(", check_derive),
    ("docs/session-keys.md", "client.pkey_decrypt_into(", check_key_transport),
    ("docs/tls.md", "client.tls_accept(", check_tls_server),
    ("docs/tls.md", "client.tls_connect(", check_tls_client),
]


# ------------------------------------------------------------------ running them


class DocFile:
    """One markdown file's run: the namespace, session token and working directory its blocks share."""

    def __init__(self, path: str, daemon: Daemon, workdir: str):
        self.path = path
        self.daemon = daemon
        self.workdir = workdir
        with daemon.connect() as boot:
            _serial, self.session = boot.join_session()
        self.namespace: dict = {"__name__": "__doc_example__"}
        self.ran: list[int] = []        # lines of the blocks run so far, in order
        self.failed: int | None = None  # the first block that raised
        self.prelude_done = False

    def connect(self):
        return self.daemon.connect(session=self.session)

    def run(self, line: int, code: str) -> str:
        """Run one block in the shared namespace; its stdout."""
        if not self.prelude_done:
            self.prelude_done = True
            if self.path in PRELUDES:
                PRELUDES[self.path](self)
        out = io.StringIO()
        self.ran.append(line)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"{self.path}:{line}", "exec"), self.namespace)
        except BaseException:
            self.failed = self.failed or line  # the first one: what later blocks may miss
            raise
        return out.getvalue()

    def close(self) -> None:
        """What the examples left open: sockets (the TLS listener) and clients."""
        for value in self.namespace.values():
            if isinstance(value, (socket.socket, keyden.client.sync.Client)):
                value.close()


@pytest.fixture(scope="module")
def docs_daemon():
    d = Daemon().start()
    yield d
    d.cleanup()


@pytest.fixture(scope="module")
def doc_files(docs_daemon, tmp_path_factory):
    files: dict[str, DocFile] = {}

    def get(path: str) -> DocFile:
        if path not in files:
            files[path] = DocFile(path, docs_daemon, str(tmp_path_factory.mktemp("doc")))
        return files[path]

    yield get
    for doc in files.values():
        doc.close()


def listen_on_loopback(doc: DocFile):
    """socket.create_server with tls.md's ("0.0.0.0", 8443) on a free loopback port: tests touch no other
    interface, and a port in use elsewhere cannot fail them."""
    real_create_server = socket.create_server

    def create_server(address, *args, **kwargs):
        if tuple(address) != ("0.0.0.0", 8443):
            return real_create_server(address, *args, **kwargs)
        listener = real_create_server(("127.0.0.1", 0), *args, **kwargs)
        doc.browser["port"] = listener.getsockname()[1]
        doc.listening.set()
        return listener
    return create_server


def resolver_for(doc: DocFile):
    """getaddrinfo with internal.example:443 at the local server tls_prelude started (tls.md's client example)."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if (host, port) == ("internal.example", 443):
            return real_getaddrinfo("127.0.0.1", doc.internal_example, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)
    return getaddrinfo


@pytest.mark.parametrize("path,line,code", BLOCKS, ids=[f"{path}:{line}" for path, line, _ in BLOCKS])
def test_python_example(path, line, code, doc_files, docs_daemon, monkeypatch):
    doc = doc_files(path)
    monkeypatch.setenv("KEYDEN_SOCKET", docs_daemon.socket)
    monkeypatch.setenv("KEYDEN_SESSION", doc.session)
    monkeypatch.chdir(doc.workdir)
    if path == "docs/tls.md":
        monkeypatch.setattr(socket, "getaddrinfo", resolver_for(doc))
        monkeypatch.setattr(socket, "create_server", listen_on_loopback(doc))
    # a block goes on from the ones before it: run those first when this one is run alone
    for earlier_path, earlier_line, earlier_code in BLOCKS:
        if earlier_path != path or earlier_line >= line or earlier_line in doc.ran:
            continue
        doc.run(earlier_line, earlier_code)
    try:
        out = doc.run(line, code)
    except Exception as exc:
        if doc.failed != line:
            exc.add_note(f"{path}:{doc.failed} failed before it, and this block may go on from that one")
        raise
    for check_path, marker, check in CHECKS:
        if check_path == path and marker in code:
            check(doc, code, out)


def test_every_check_has_its_block():
    for path, marker, check in CHECKS:
        assert any(p == path and marker in code for p, _, code in BLOCKS), f"{check.__name__}: no block in {path}"


def test_every_python_looking_block_is_run():
    """A fence spelled ```py, ```Python or ```python3 would be left out of BLOCKS without a word."""
    for path in DOC_FILES:
        for line, info, _code in fenced_blocks(path):
            language = info.split()[0].lower() if info else ""
            assert not language.startswith("py") or info.split()[0] == "python", f"{path}:{line}: ```{info}"


# ------------------------------------------------------------------ the README's shell tour


def test_readme_shell_tour(docs_daemon, tmp_path):
    """The tour as a bash script: `keyden` is this checkout's, the session fresh, temp files in tmp_path."""
    tours = [code for line, info, code in fenced_blocks("README.md") if info == "sh" and "keyden show" in code]
    assert len(tours) == 1
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "keyden").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m keyden "$@"\n')
    (bin_dir / "keyden").chmod(0o755)
    (tmp_path / "tmp").mkdir()
    with docs_daemon.connect() as boot:
        _serial, session = boot.join_session()
    env = dict(os.environ, KEYDEN_SOCKET=docs_daemon.socket, KEYDEN_SESSION=session, TMPDIR=str(tmp_path / "tmp"),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(["bash", "-c", tours[0]], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, err[-2000:]
    certificate = re.search(r"asymmetric: www\.example: ([0-9a-f]{40})$", out, re.M)
    private_key = re.search(r"asymmetric: RSA-2048 private key: ([0-9a-f]{40})$", out, re.M)
    assert certificate and private_key and certificate[1] == private_key[1]   # they share the key id
    assert re.search(r"keyring: _persistent\.\d+\n.*\\_ asymmetric: www\.example", out)   # in the persistent ring
    assert "\nverified\n" in out
    assert "keyctl_read_alloc: Operation not supported" in err   # the private key is not readable
    assert re.fullmatch(r"\d+", out.splitlines()[-1])           # genkey printed the new serial
    assert not list((tmp_path / "tmp").rglob("web.key"))                 # keyden holds the only copy
