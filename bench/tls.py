"""Helpers for the TLS rows: a throwaway CA, and TLS servers with the key in keyden or in-process.

Both servers are a thread of the benchmark process answering a Python ``ssl`` client in another
thread, so the client's costs (and the GIL) weigh on both sides alike.  ``KeydenServer`` hands each
accepted connection to keyden with ``tls_accept`` and works on the plaintext socket it gets back;
``LocalServer`` is the in-process baseline: the same loop over ``ssl.SSLContext.wrap_socket``.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import tempfile
import threading
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SERVER_NAME = "bench.test"
ACK = b"k"


class Pki:
    """A CA and an ECDSA P-256 leaf for SERVER_NAME, as PEM."""

    def __init__(self):
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

        def cert(name: str, key, issuer: x509.Name, signer, ca: bool, san=()) -> x509.Certificate:
            b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                 .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
            if san:
                b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
            return b.sign(signer, hashes.SHA256())

        ca = cert("bench CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")]), ca_key, True)
        leaf = cert(SERVER_NAME, leaf_key, ca.subject, ca_key, False, (SERVER_NAME,))
        pem = serialization.Encoding.PEM
        self.ca_pem = ca.public_bytes(pem)
        self.cert_pem = leaf.public_bytes(pem)
        self.key_pem = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cadata=self.ca_pem.decode())

    def local_context(self) -> ssl.SSLContext:
        """The baseline server's context: the key loaded from a (temporary) file, as ssl requires."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.NamedTemporaryFile() as cert, tempfile.NamedTemporaryFile() as key:
            cert.write(self.cert_pem)
            key.write(self.key_pem)
            cert.flush()
            key.flush()
            ctx.load_cert_chain(cert.name, key.name)
        return ctx


class _Server:
    """Accepts connections forever (until closed) and runs ``work`` on each one's readable/writable stream."""

    def __init__(self, work: Callable[[socket.socket], None]):
        self.work = work
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                with self.secure(conn) as stream:
                    self.work(stream)
            except OSError:
                pass

    def secure(self, conn: socket.socket) -> socket.socket:  # pragma: no cover - per subclass
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class KeydenServer(_Server):
    def __init__(self, client, keyring, work):
        self.client, self.keyring = client, keyring
        super().__init__(work)

    def secure(self, conn):
        return self.client.tls_accept(conn, self.keyring)[0]


class LocalServer(_Server):
    def __init__(self, ctx: ssl.SSLContext, work):
        self.ctx = ctx
        super().__init__(work)

    def secure(self, conn):
        return self.ctx.wrap_socket(conn, server_side=True)


def acknowledge(stream: socket.socket) -> None:
    """Handshake work: the server side is done once it can write; one byte tells the client so."""
    stream.sendall(ACK)


def sink(size: int) -> Callable[[socket.socket], None]:
    """Bulk work: read ``size`` bytes, acknowledge, repeat until the client leaves."""
    def work(stream: socket.socket) -> None:
        buf = memoryview(bytearray(1 << 18))
        while True:
            left = size
            while left:
                n = stream.recv_into(buf[:min(left, len(buf))])
                if not n:
                    return
                left -= n
            stream.sendall(ACK)
    return work


def handshake(ctx: ssl.SSLContext, port: int) -> None:
    """One full handshake (no resumption) as a client, complete on both sides."""
    with socket.create_connection(("127.0.0.1", port)) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
        if tls.recv(1) != ACK:
            raise RuntimeError("the server did not acknowledge the handshake")


class Sender:
    """A client connection that sends ``data`` and waits for the server's acknowledgement, per call."""

    def __init__(self, ctx: ssl.SSLContext, port: int, data: bytes):
        self.tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=SERVER_NAME)
        self.data = data

    def __call__(self) -> None:
        self.tls.sendall(self.data)
        if self.tls.recv(1) != ACK:
            raise RuntimeError("the server did not acknowledge the transfer")

    def close(self) -> None:
        self.tls.close()
