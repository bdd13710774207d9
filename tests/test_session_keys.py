"""Session keys that never leave keyden: derive, kdf, key transport, dh_compute.

The centrepiece runs a whole ECDH -> HKDF -> AES-GCM exchange between two
processes that hold only serials, public keys and ciphertexts, and proves
that neither ever had the shared secret or the session key: not in any
response it received, and not anywhere in its memory.  The test knows the
expected bytes because it made the key pairs itself (and uploaded them), so
it can redo the agreement locally with pyca.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.asymmetric import dh, ec, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyden import errors as E
from tests.conftest import REPO
from dhgroups import MODP_2048 as RFC3526_2048

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


def pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def hkdf(hash_name: str, secret: bytes, length: int, salt: bytes, info: bytes) -> bytes:
    return HKDF(HASHES[hash_name](), length, salt or None, info).derive(secret)


def local_exchange(private_key, peer_public) -> bytes:
    if isinstance(private_key, x25519.X25519PrivateKey):
        return private_key.exchange(peer_public)
    return private_key.exchange(ec.ECDH(), peer_public)


def assert_aes_key(client, serial: int, expected: bytes) -> None:
    """The unreadable key ``serial`` is ``expected``: what keyden encrypts with it, pyca decrypts."""
    nonce = os.urandom(12)
    ciphertext = client.aead(serial).encrypt(nonce, b"proof of key", b"ad")
    assert AESGCM(expected).decrypt(nonce, ciphertext, b"ad") == b"proof of key"


def ring_size(client, ring="@s") -> int:
    return len(client.read(ring))


# ------------------------------------------------- two parties, no secrets held

PARTY = r'''
"""One party: it holds serials, public keys and ciphertexts, and records every response it receives."""
import json, os, sys
import keyden
from keyden import protocol

received = []
_decode = protocol.Schema.decode


def recording(self, body):  # every response body the client decodes (errors' too)
    received.append(bytes(body))
    return _decode(self, body)


protocol.Schema.decode = recording


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def receive():
    return json.loads(sys.stdin.readline())


setup = receive()
canary = bytes.fromhex(setup["canary"])  # held on purpose: the parent's scan must find it
client = keyden.connect(setup["socket"], session=setup["session"])
send({"public": client.public_key_bytes(setup["private"])[0].hex()})
peer = bytes.fromhex(receive()["peer"])
session_key = client.derive(setup["private"], peer, salt=bytes.fromhex(setup["salt"]),
                            info=bytes.fromhex(setup["info"]), length=32, description="app:session")
channel = client.aead(session_key)
if setup["role"] == "alice":
    send({"ciphertext": channel.encrypt_random(b"hello bob", b"alice->bob").hex()})
    reply = channel.decrypt_random(bytes.fromhex(receive()["ciphertext"]), b"bob->alice")
    assert reply == b"hello alice", reply
else:
    message = channel.decrypt_random(bytes.fromhex(receive()["ciphertext"]), b"alice->bob")
    assert message == b"hello bob", message
    send({"ciphertext": channel.encrypt_random(b"hello alice", b"bob->alice").hex()})
with open(setup["received_file"], "wb") as f:
    for body in received:
        f.write(len(body).to_bytes(4, "little") + body)
send({"done": os.getpid()})
receive()  # wait here while the parent reads our memory
'''


def memory_contains(pid: int, needles: list[bytes]) -> set[bytes]:
    """Which needles occur anywhere in the readable memory of process ``pid``."""
    found: set[bytes] = set()
    overlap = max(len(n) for n in needles) - 1
    chunk = 16 << 20
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            tail = b""
            for pos in range(start, end, chunk):
                try:
                    mem.seek(pos)
                    data = tail + mem.read(min(chunk, end - pos))
                except (OSError, OverflowError, ValueError):  # [vvar], [vsyscall] and the like
                    break
                found.update(n for n in needles if n in data)
                tail = data[-overlap:]
    return found


def split_frames(blob: bytes) -> list[bytes]:
    bodies, pos = [], 0
    while pos < len(blob):
        n = int.from_bytes(blob[pos:pos + 4], "little")
        bodies.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return bodies


class Party:
    def __init__(self, script: str, env: dict):
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)

    def send(self, **message) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"party exited with {self.proc.wait()}"
        return json.loads(line)

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(exit=True)
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_two_processes_agree_on_a_session_key_neither_ever_holds(daemon, tmp_path):
    """ECDH (P-256) -> HKDF-SHA256 -> AES-GCM between two clients with their own session keyrings."""
    local = {"alice": ec.generate_private_key(ec.SECP256R1()), "bob": ec.generate_private_key(ec.SECP256R1())}
    salt, info = os.urandom(16), b"keyden test v1"
    shared = local_exchange(local["alice"], local["bob"].public_key())
    session_key = hkdf("sha256", shared, 32, salt, info)
    needles = [shared, session_key, shared[:16], shared[16:], session_key[:16], session_key[16:]]

    script = tmp_path / "party.py"
    script.write_text(PARTY)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("KEYDEN_SESSION", None)
    parties, canaries, sessions = {}, {}, []
    try:
        for role in ("alice", "bob"):
            with daemon.connect() as boot:
                _ring, token = boot.join_session()
            sessions.append(token)
            with daemon.connect(session=token) as uploader:  # the test uploads; the party gets a serial
                serial = uploader.add("asymmetric", role, pkcs8(local[role]), "@s")
            canaries[role] = os.urandom(32)
            parties[role] = Party(str(script), env)
            parties[role].send(role=role, socket=daemon.socket, session=token, private=serial, salt=salt.hex(),
                               info=info.hex(), canary=canaries[role].hex(),
                               received_file=str(tmp_path / f"{role}.frames"))
        alice, bob = parties["alice"], parties["bob"]
        public = {role: bytes.fromhex(p.receive()["public"]) for role, p in parties.items()}
        assert public["alice"] == spki(local["alice"].public_key())
        alice.send(peer=public["bob"].hex())
        bob.send(peer=public["alice"].hex())

        to_bob = bytes.fromhex(alice.receive()["ciphertext"])
        # The key the test computed is the one keyden used: else "absent" below would prove nothing.
        assert AESGCM(session_key).decrypt(to_bob[:12], to_bob[12:], b"alice->bob") == b"hello bob"
        bob.send(ciphertext=to_bob.hex())
        to_alice = bytes.fromhex(bob.receive()["ciphertext"])
        alice.send(ciphertext=to_alice.hex())

        for role, party in parties.items():
            pid = party.receive()["done"]
            assert pid == party.proc.pid
            bodies = split_frames((tmp_path / f"{role}.frames").read_bytes())
            assert len(bodies) >= 5  # hello, public key, derive, encrypt/decrypt...
            assert any(to_bob in b or to_alice in b for b in bodies)  # the recorder saw real payloads
            received_secret = sum(n in body for body in bodies for n in needles)
            assert received_secret == 0, f"{role} received secret material"
            found = memory_contains(pid, needles + [canaries[role]])
            assert canaries[role] in found, "the memory scan does not work"
            leaked = len(found - {canaries[role]})  # a count: the assertion must not print the secrets
            assert leaked == 0, f"{role}'s memory holds the shared secret or session key"
    finally:
        for party in parties.values():
            party.finish()
        with daemon.connect() as boot:
            for token in sessions:
                try:
                    boot.leave_session(token)
                except E.KeydenError:
                    pass
    assert all(p.proc.returncode == 0 for p in parties.values())


# ----------------------------------------------------------------- derive

CURVES = {
    "p256": (lambda: ec.generate_private_key(ec.SECP256R1()), "hkdf-sha256", 32),
    "p384": (lambda: ec.generate_private_key(ec.SECP384R1()), "hkdf-sha384", 24),
    "x25519": (x25519.X25519PrivateKey.generate, "hkdf-sha512", 16),
}


def raw_public(public_key, compressed: bool = False) -> bytes:
    if isinstance(public_key, x25519.X25519PublicKey):
        return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    form = serialization.PublicFormat.CompressedPoint if compressed else serialization.PublicFormat.UncompressedPoint
    return public_key.public_bytes(serialization.Encoding.X962, form)


@pytest.mark.parametrize("curve", sorted(CURVES))
def test_derive_equals_the_local_agreement_and_kdf(client, curve):
    generate, kdf, length = CURVES[curve]
    mine, theirs = generate(), generate()
    private = client.add("asymmetric", "", pkcs8(mine), "@s")
    shared = local_exchange(mine, theirs.public_key())
    hash_name = kdf.split("-")[1]
    salt, info = os.urandom(8), b"context"

    peer_forms = [spki(theirs.public_key()), raw_public(theirs.public_key())]
    if curve != "x25519":
        peer_forms.append(raw_public(theirs.public_key(), compressed=True))
    for i, peer in enumerate(peer_forms):
        serial = client.derive(private, peer, kdf=kdf, salt=salt, info=info, length=length,
                               description=f"app:{curve}-{i}")
        assert client.describe(serial).type == "logon"
        assert_aes_key(client, serial, hkdf(hash_name, shared, length, salt, info))

    # the peer as a key held in keyden (an uploaded SubjectPublicKeyInfo)
    peer_key = client.add("asymmetric", "", spki(theirs.public_key()), "@s")
    serial = client.derive(private, peer_key=peer_key, kdf=f"sp800-56a-{hash_name}", info=b"otherinfo",
                           length=32)
    expected = ConcatKDFHash(HASHES[hash_name](), 32, b"otherinfo").derive(shared)
    assert_aes_key(client, serial, expected)

    # a longer key used as an HMAC key: the derived bytes are usable by any algorithm
    serial = client.derive(private, peer_forms[0], kdf=kdf, length=64)
    mac = pyca_hmac.HMAC(hkdf(hash_name, shared, 64, b"", b""), hashes.SHA256())
    mac.update(b"data")
    assert client.hmac(serial).mac(b"data") == mac.finalize()


def test_invalid_peers_are_refused_and_create_nothing(client):
    p256, x = ec.generate_private_key(ec.SECP256R1()), x25519.X25519PrivateKey.generate()
    ec_key = client.add("asymmetric", "", pkcs8(p256), "@s")
    x_key = client.add("asymmetric", "", pkcs8(x), "@s")
    point = raw_public(ec.generate_private_key(ec.SECP256R1()).public_key())
    off_curve = point[:-1] + bytes([point[-1] ^ 1])
    other_curve = spki(ec.generate_private_key(ec.SECP384R1()).public_key())
    x_peer = raw_public(x25519.X25519PrivateKey.generate().public_key())
    before = ring_size(client)
    refused = [
        (ec_key, off_curve), (ec_key, b"\x04" + bytes(64)), (ec_key, other_curve), (ec_key, point[:40]),
        (ec_key, b"not a key"), (ec_key, x_peer), (ec_key, spki(x.public_key())),
        (x_key, bytes(32)), (x_key, (1).to_bytes(32, "little")),  # low-order X25519 points
        (x_key, x_peer[:31]), (x_key, point), (x_key, bytes(4097)),
    ]
    for private, peer in refused:
        with pytest.raises(E.EINVAL):
            client.derive(private, peer)
    peer_key = client.add("asymmetric", "", spki(p256.public_key()), "@s")
    with pytest.raises(E.EINVAL):
        client.derive(ec_key, point, peer_key=peer_key)  # both forms
    with pytest.raises(E.EINVAL):
        client.derive(ec_key)  # neither
    with pytest.raises(E.EINVAL):
        client.derive(x_key, peer_key=peer_key)  # a P-256 key as an X25519 peer
    with pytest.raises(E.ENOENT):
        client.derive(ec_key, point, kdf="md5-kdf")
    with pytest.raises(E.EINVAL):
        client.derive(ec_key, point, kdf="sp800-56a-sha256", salt=b"salt")  # a parameter it would ignore
    with pytest.raises(E.EINVAL):
        client.derive(ec_key, point, length=0)
    with pytest.raises(E.EOPNOTSUPP):
        client.derive(client.generate("ed25519", "", "@s"), point)
    with pytest.raises(E.EOPNOTSUPP):
        client.derive(client.add("user", "not-asymmetric", b"x"), point)
    assert ring_size(client) == before + 3  # the three keys added above; no derived key
    with pytest.raises(E.EOPNOTSUPP):
        client.derive(ec_key, peer_key=client.generate("aes:256", "", "@s"))


def test_derived_keys_are_never_readable(client, tmp_path):
    a, b = client.generate("x25519", "a", "@s"), client.generate("x25519", "b", "@s")
    derived = client.derive(a, peer_key=b, perm=0x3f3f0000)  # read granted: still unreadable
    from_kdf = client.kdf(client.add("user", "master", os.urandom(32)), length=32, perm=0x3f3f0000)
    generated = client.generate("aes:256", "", "@s")
    for serial in (derived, from_kdf, generated):
        assert client.describe(serial).type == "logon"
        with pytest.raises(E.EOPNOTSUPP):
            client.read(serial)
    assert client.describe(derived).perm == 0x3f3f0000


def test_a_derived_key_is_made_with_its_perm_and_timeout_or_not_at_all(client, daemon):
    """No setattr is needed on the new key (it is made with them); a refused request makes nothing, and a
    derived key never displaces a namesake (EEXIST), which may be the only copy of a key."""
    mine = client.generate("x25519", "mine", "@s")
    ring = client.newring("shared-sessions")
    client.setperm(ring, 0x3f3f0000)  # the user (any session of root's) may write, without possessing it
    old = client.generate("aes:256", "app:k", ring, no_export=True)
    with daemon.connect() as elsewhere:  # another session: the ring is not possessed there
        theirs = elsewhere.generate("x25519", "theirs")
        with pytest.raises(E.EEXIST):
            elsewhere.derive(theirs, peer_key=theirs, keyring=ring, description="app:k")
        serial = elsewhere.derive(theirs, peer_key=theirs, keyring=ring, description="app:k2", timeout=60,
                                  perm=0x3f3f0000)
        assert elsewhere.describe(serial).perm == 0x3f3f0000
        with pytest.raises(E.EINVAL):
            elsewhere.derive(theirs, peer_key=theirs, keyring=ring, description="app:k3", perm=0x40000000)
        with pytest.raises(E.EINVAL):
            elsewhere.derive(theirs, peer_key=theirs, keyring=ring, description="app:k3", timeout=-1)
    assert sorted(client.read(ring)) == sorted([old, serial])  # the refused ones made nothing
    assert client.describe(old).description == "app:k"
    assert client.describe(serial).perm == 0x3f3f0000
    nonce = os.urandom(12)
    client.aead(serial).encrypt(nonce, b"usable", None)
    del mine


def test_keys_made_inside_never_displace_a_namesake(client):
    """genkey, derive, kdf and pkey_decrypt --into under a description the keyring holds: EEXIST, and the
    old key (here non-exportable: its only copy) still works.  add_key's update stays add's alone."""
    old = client.generate("aes:256", "app:dbkey", "@s", no_export=True)
    nonce = os.urandom(12)
    sealed = client.aead(old).encrypt(nonce, b"only this key opens it", None)
    x, master = client.generate("x25519", "app:x", "@s"), client.generate("hmac:256", "app:master", "@s")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    transport = client.add("asymmetric", "app:rsa", pkcs8(rsa_key), "@s")
    before = ring_size(client)
    for make in (lambda: client.generate("aes:256", "app:dbkey", "@s"),
                 lambda: client.generate("hmac:256", "app:dbkey", "@s"),
                 lambda: client.derive(x, peer_key=x, description="app:dbkey"),
                 lambda: client.kdf(master, description="app:dbkey"),
                 lambda: client.pkey_decrypt_into(transport, "enc=oaep hash=sha256",
                                                  rsa_key.public_key().encrypt(os.urandom(32), oaep), "app:dbkey"),
                 lambda: client.generate("ed25519", "app:x", "@s")):
        with pytest.raises(E.EEXIST):
            make()
    assert ring_size(client) == before
    assert client.aead(old).decrypt(nonce, sealed, None) == b"only this key opens it"
    assert client.describe(client.generate("aes:256", "app:dbkey-2", "@s")).description == "app:dbkey-2"


def test_a_revoked_or_expired_namesake_gives_way(client):
    """"To replace a key, unlink or revoke it first" (session-keys.md): a revoked or expired namesake still
    refused genkey, derive, kdf and pkey_decrypt --into with EEXIST until the garbage collector took it
    (gc_delay, 5 minutes), where add_key's update passes it over.  Now it gives way; a live one does not."""
    x, master = client.generate("x25519", "app:x", "@s"), client.generate("hmac:256", "app:master", "@s")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    transport = client.add("asymmetric", "app:rsa", pkcs8(rsa_key), "@s")
    makers = {"genkey": lambda name: client.generate("aes:256", name, "@s"),
              "derive": lambda name: client.derive(x, peer_key=x, description=name),
              "kdf": lambda name: client.kdf(master, description=name),
              "pkey_decrypt --into": lambda name: client.pkey_decrypt_into(
                  transport, "enc=oaep hash=sha256", rsa_key.public_key().encrypt(os.urandom(32), oaep), name)}
    for how, make in makers.items():
        old = make(f"app:{how}")
        with pytest.raises(E.EEXIST):
            make(f"app:{how}")
        client.revoke(old)
        new = make(f"app:{how}")
        assert new != old and client.search("@s", "logon", f"app:{how}") == new, how
    expiring = client.generate("aes:256", "app:expiring", "@s")
    client.timeout(expiring, 1)
    time.sleep(1.1)
    assert client.generate("aes:256", "app:expiring", "@s") != expiring


def test_derive_options_description_keyring_perm_timeout(client):
    a, b = client.generate("ec:p256", "a", "@s"), client.generate("ec:p256", "b", "@s")
    ring = client.newring("sessions")
    serial = client.derive(a, peer_key=b, description="app:peer-b", keyring=ring, perm=0x3d3d0000)
    d = client.describe(serial)
    assert (d.type, d.description, d.perm) == ("logon", "app:peer-b", 0x3d3d0000)
    assert client.read(ring) == [serial]

    # without a description each derive is a new key, never displacing an earlier one
    first, second = client.derive(a, peer_key=b), client.derive(b, peer_key=a)
    assert first != second and {first, second} <= set(client.read("@s"))
    first_desc, second_desc = client.describe(first).description, client.describe(second).description
    assert first_desc.startswith("keyden:") and first_desc != second_desc
    nonce = os.urandom(12)  # both sides derived the same key
    assert client.aead(second).decrypt(nonce, client.aead(first).encrypt(nonce, b"same", None), None) == b"same"

    before = ring_size(client)
    with pytest.raises(E.EINVAL):
        client.derive(a, peer_key=b, perm=0xffffffff)
    with pytest.raises(E.EINVAL):
        client.derive(a, peer_key=b, description="no-subclass")  # logon descriptions are subclass:rest
    not_a_ring = client.add("user", "not-a-ring", b"x")
    with pytest.raises(E.ENOTDIR):
        client.derive(a, peer_key=b, keyring=not_a_ring)
    assert ring_size(client) == before + 1

    expiring = client.derive(a, peer_key=b, timeout=1)
    aead = client.aead(expiring)
    aead.encrypt(nonce, b"before", None)
    deadline = time.monotonic() + 10
    while True:
        try:
            aead.encrypt(nonce, b"after", None)
        except E.EKEYEXPIRED:
            break
        assert time.monotonic() < deadline, "the derived key never expired"
        time.sleep(0.1)


def test_kdf_makes_keys_from_a_user_or_logon_key(client):
    master_bytes = os.urandom(32)
    master = client.add("logon", "app:master", master_bytes)
    for hash_name in ("sha256", "sha512"):
        serial = client.kdf(master, kdf=f"hkdf-{hash_name}", salt=b"s", info=b"tenant-7", length=32,
                            description=f"app:tenant-7-{hash_name}")
        assert_aes_key(client, serial, hkdf(hash_name, master_bytes, 32, b"s", b"tenant-7"))
    serial = client.kdf(master, kdf="sp800-56a-sha384", info=b"oi", length=16)
    assert_aes_key(client, serial, ConcatKDFHash(hashes.SHA384(), 16, b"oi").derive(master_bytes))
    # kdf of kdf: a key hierarchy whose every level stays inside
    child = client.kdf(client.kdf(master, info=b"level1"), info=b"level2", length=32)
    assert_aes_key(client, child, hkdf("sha256", hkdf("sha256", master_bytes, 32, b"", b"level1"), 32, b"",
                                       b"level2"))
    with pytest.raises(E.ENOPROTOOPT):
        client.kdf(client.generate("ec:p256", "", "@s"))
    with pytest.raises(E.ENOPROTOOPT):
        client.kdf("@s")
    with pytest.raises(E.ENOENT):
        client.kdf(master, kdf="pbkdf2")
    client.revoke(master)
    with pytest.raises(E.EKEYREVOKED):
        client.kdf(master)


# ------------------------------------------------------------ key transport

def test_pkey_decrypt_into_unwraps_a_session_key_that_stays_inside(client):
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    serial = client.add("asymmetric", "", pkcs8(rsa_key), "@s")
    aes_key = AESGCM.generate_key(bit_length=256)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = rsa_key.public_key().encrypt(aes_key, oaep)

    session = client.pkey_decrypt_into(serial, "enc=oaep hash=sha256", wrapped, "app:transported", "@s",
                                       perm=0x3f010000)
    d = client.describe(session)
    assert (d.type, d.description, d.perm) == ("logon", "app:transported", 0x3f010000)
    with pytest.raises(E.EOPNOTSUPP):
        client.read(session)
    nonce = os.urandom(12)
    ciphertext = AESGCM(aes_key).encrypt(nonce, b"sent by the peer", b"hdr")
    assert client.aead(session).decrypt(nonce, ciphertext, b"hdr") == b"sent by the peer"

    before = ring_size(client)
    tampered = bytes([wrapped[0] ^ 1]) + wrapped[1:]
    with pytest.raises(E.EBADMSG):
        client.pkey_decrypt_into(serial, "enc=oaep hash=sha256", tampered, "app:bad")
    with pytest.raises(E.EOPNOTSUPP):
        client.pkey_decrypt_into(client.generate("ec:p256", "", "@s"), "", wrapped, "app:ec")
    assert ring_size(client) == before + 1  # only the EC key


def test_keys_made_from_a_private_key_export_only_as_that_key_would(client):
    """derive and pkey_decrypt_into make an exportable key only for a caller who could export the private
    key itself: not from a NO_EXPORT key, nor from one the caller may only use (search, no read), else
    search alone would carry a static-DH oracle's answers out of keyden.  kdf's keys never export."""
    wrap = client.generate("aes:256", "backup:wrap", "@s")
    peer = client.generate("x25519", "peer", "@s")
    readable = 0x3f3f0000  # export needs read permission by the mask

    def exportable(serial):
        try:
            client.export(serial, wrapping_key=wrap)
            return True
        except E.EPERM:
            return False

    sealed_x = client.generate("x25519", "sealed", "@s", no_export=True)
    free_x = client.generate("x25519", "free", "@s")
    assert not exportable(client.derive(free_x, peer_key=peer, perm=readable))  # a private key's mask: no read
    for key in (sealed_x, free_x, peer):
        client.setperm(key, readable)
    assert not exportable(client.derive(sealed_x, peer_key=peer, perm=readable))
    assert exportable(client.derive(free_x, peer_key=peer, perm=readable))
    assert exportable(client.derive(peer, peer_key=sealed_x, perm=readable))  # the peer gives only its public half
    used_x = client.generate("x25519", "used only", "@s")
    client.setperm(used_x, 0x3d3d3d3d)  # everything but read, for everyone: search lets anyone use it
    with pytest.raises(E.EACCES):
        client.export(used_x, wrapping_key=wrap)
    raw = client.derive(used_x, peer_key=peer, kdf="raw", length=32, perm=readable)  # the shared secret itself
    assert not exportable(raw)

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    wrapped = rsa_key.public_key().encrypt(os.urandom(32), oaep)
    sealed_rsa = client.add("asymmetric", "", pkcs8(rsa_key), "@s", no_export=True)
    client.setperm(sealed_rsa, readable)
    assert not exportable(client.pkey_decrypt_into(sealed_rsa, "enc=oaep hash=sha256", wrapped, "app:sealed", "@s",
                                                   perm=readable))
    client.unlink(sealed_rsa, "@s")  # the same private key, uploaded again without the flag
    free_rsa = client.add("asymmetric", "free-rsa", pkcs8(rsa_key), "@s")
    client.setperm(free_rsa, readable)
    assert exportable(client.pkey_decrypt_into(free_rsa, "enc=oaep hash=sha256", wrapped, "app:free", "@s",
                                               perm=readable))
    client.setperm(free_rsa, 0x3d3d0000)
    assert not exportable(client.pkey_decrypt_into(free_rsa, "enc=oaep hash=sha256", wrapped, "app:used", "@s",
                                                   perm=readable))

    master = client.add("logon", "app:master", os.urandom(32), "@s")
    assert not exportable(client.kdf(master, perm=readable))


# ---------------------------------------------------------------- dh_compute



def be(value: int, size: int | None = None) -> bytes:
    return value.to_bytes(size or (value.bit_length() + 7) // 8, "big")


def test_dh_compute_and_dh_compute_kdf_match_pyca(client):
    p = RFC3526_2048
    params = dh.DHParameterNumbers(p, 2)
    x_a, x_b = (int.from_bytes(os.urandom(32), "big") | 1 for _ in range(2))
    local_a = dh.DHPrivateNumbers(x_a, dh.DHPublicNumbers(pow(2, x_a, p), params)).private_key()
    y_b = pow(2, x_b, p)
    prime = client.add("user", "dh:prime", be(p))
    base = client.add("user", "dh:base", b"\x02")
    private = client.add("user", "dh:private", be(x_a))

    public = client.dh_compute(private, prime, base)
    assert public == be(local_a.public_key().public_numbers().y, 256)

    peer = client.add("user", "dh:peer", be(y_b))
    shared = client.dh_compute(private, prime, peer)
    assert shared == local_a.exchange(dh.DHPublicNumbers(y_b, params).public_key()).rjust(256, b"\0")
    assert len(shared) == 256

    for hash_name, length, otherinfo in (("sha256", 32, b""), ("sha512", 100, b"party-u party-v")):
        got = client.dh_compute_kdf(private, prime, peer, hash_name, length, otherinfo)
        assert got == ConcatKDFHash(HASHES[hash_name](), length, otherinfo or None).derive(shared)

    with pytest.raises(E.EINVAL):
        client.dh_compute(private, client.add("user", "dh:small", be(2**127 - 1)), base)
    with pytest.raises(E.EINVAL):
        client.dh_compute(private, prime, client.add("user", "dh:one", b"\x01"))
    # As the kernel: user keys only (EOPNOTSUPP), and read permission itself, not possession with
    # search as for keyctl_read: any failure to look one up that way is ENOKEY.
    hidden = client.add("logon", "dh:hidden", be(x_a))
    with pytest.raises(E.ENOKEY):  # a logon key grants no read
        client.dh_compute(hidden, prime, base)
    client.setperm(hidden, 0x3f010000)  # and with read granted, it is still not a user key
    with pytest.raises(E.EOPNOTSUPP):
        client.dh_compute(hidden, prime, base)
    with pytest.raises(E.EOPNOTSUPP):
        client.dh_compute("@s", prime, base)
    search_only = client.add("user", "dh:search-only", be(x_a), "@s")
    client.setperm(search_only, 0x08000000)  # the possessor may search, not read
    assert client.read(search_only) == be(x_a)  # keyctl_read lets a possessor with search read...
    with pytest.raises(E.ENOKEY, match="read"):
        client.dh_compute(search_only, prime, base)  # ...KEYCTL_DH_COMPUTE does not
    with pytest.raises(E.ENOKEY):
        client.dh_compute(0x7FFF_FFF0, prime, base)
    client.revoke(peer)
    with pytest.raises(E.ENOKEY, match="revoked"):
        client.dh_compute(private, prime, peer)


def test_keys_derived_from_a_held_key_are_no_way_around_its_permissions(client):
    """Using a key needs only search: a KDF from it must not yield a copy that can be read out or exported."""
    source = client.add("logon", "test:master", b"M" * 32, "@s")
    with pytest.raises(E.EINVAL):
        client.kdf(source, kdf="raw", length=32, description="test:copy")
    derived = client.kdf(source, kdf="hkdf-sha256", info=b"ctx", length=32, description="test:ctx",
                         perm=0x3F3F0000)
    recipient = client.generate("x25519", "test:recipient", "@s")
    with pytest.raises(E.EPERM):
        client.export(derived, to_public_key=recipient)


def _recovered_prefix(client, make_key) -> bytes:
    """The attack a short derived key allowed: ``make_key(n)`` makes the n-byte key (the first n bytes of
    the longer ones: HKDF's outputs are each other's prefixes); its HMAC of a probe, which search allows,
    gives its last byte to 256 guesses.  Whatever bytes were recovered before a length was refused."""
    known = b""
    while len(known) < 4:
        try:
            short = make_key(len(known) + 1)
        except E.EINVAL:
            break
        tag = client.mac("hmac(sha256)", short, b"probe")
        known += next(bytes([b]) for b in range(256)
                      if pyca_hmac_sha256(known + bytes([b]), b"probe") == tag)
        client.invalidate(short)
    return known


def pyca_hmac_sha256(key: bytes, data: bytes) -> bytes:
    h = pyca_hmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def test_a_derived_key_cannot_be_told_a_byte_at_a_time_by_whoever_may_only_use_its_source(client):
    """kdf and derive took lengths from 1 byte: with search on a master key (all a user of it needs), one
    made the 1-byte key, MACed a probe with it, guessed its byte, then the 2-byte key, and so on, and read
    out every per-tenant key kdf made from the master, and through derive any session key a private key
    agreed (found by a security hunt).  A key keyden keeps is 16 bytes or more."""
    master = client.generate("hmac:256", "test:master", "@s")
    assert _recovered_prefix(client, lambda n: client.kdf(master, info=b"tenant-7", length=n)) == b""
    mine, theirs = client.generate("p256", "test:mine", "@s"), ec.generate_private_key(ec.SECP256R1())
    point = theirs.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.UncompressedPoint)
    assert _recovered_prefix(client, lambda n: client.derive(mine, point, length=n)) == b""
    for make in (lambda n: client.kdf(master, length=n), lambda n: client.derive(mine, point, length=n)):
        with pytest.raises(E.EINVAL, match="16..8160"):
            make(15)
        client.mac("hmac(sha256)", make(16), b"16 bytes are made")
