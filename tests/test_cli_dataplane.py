"""The session-key and data commands of the CLI, run as real subprocesses against a real daemon.

Keys are uploaded with known bytes (or made from key pairs the test holds),
so every output is checked against pyca or hashlib.  Each subprocess costs
~0.2 s, so each test groups related checks.
"""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys

import hashlib
import os
import stat

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import hmac as pyca_hmac
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyden import errors as E
from keyden.cli.support import hexdump
from tests.conftest import default_hangup_and_term
from tests.test_cli import REPO, keyden, ok  # noqa: F401  (keyden is the CLI-runner fixture)
from dhgroups import MODP_2048 as P

NOT_READABLE = "keyctl_read_alloc: Operation not supported\n"


def pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def serial_of(result) -> int:
    return int(ok(result))


def assert_aes_key(client, serial: int, expected: bytes) -> None:
    """The unreadable key ``serial`` is ``expected``: what keyden encrypts with it, pyca decrypts."""
    nonce = os.urandom(12)
    assert AESGCM(expected).decrypt(nonce, client.aead(serial).encrypt(nonce, b"probe", None), None) == b"probe"


def fails(result, status: int, stderr: str) -> None:
    assert (result.rc, result.err) == (status, stderr)


# ------------------------------------------------------------ help and genkey


def test_help_genkey_specs_and_unreadable_keys(keyden, client):
    out = ok(keyden("help"))
    for name in ("aead", "cipher", "derive", "dh_compute", "dh_compute_kdf", "dh_compute_kdf_oi", "hash", "hmac",
                 "hmac_verify", "kdf"):
        assert f"\n  keyden {name} " in out
    assert "  keyden pkey_decrypt <key> <pass> <datafile> [k=v]* --into <desc> <keyring>\n" in out
    assert ok(keyden("help", "dh_compute_kdf_oi")) == (
        "Format:\n  keyden dh_compute_kdf_oi [-x] <private> <prime> <base> <len> <hash_name>\n")

    made = {}
    for spec in ("aes:256", "chacha20", "hmac:512", "x25519"):
        made[spec] = serial_of(keyden("genkey", spec, "@s"))
    for spec, hint in (("aes:256", "aes256"), ("chacha20", "chacha20"), ("hmac:512", "hmac512")):
        d = client.describe(made[spec])
        assert d.type == "logon" and re.fullmatch(f"keyden:{hint}-[0-9a-f]{{8}}", d.description)
    assert client.describe(made["x25519"]).type == "asymmetric"
    named = serial_of(keyden("genkey", "aes:128", "app:named", "@s"))
    assert client.describe(named).description == "app:named"
    fails(keyden("genkey", "aes:100", "@s"), 1,  # keyden's own commands say the daemon's reason too
          "genkey: Invalid argument (unknown key spec 'aes:100'; use aes[-cbc|-ctr]:128|192|256, aes-gcm-siv:128|256, chacha20 or hmac:BITS)\n")

    derived = serial_of(keyden("derive", str(made["x25519"]), str(made["x25519"]), "@s"))
    for command in ("read", "print", "pipe"):
        for key in (made["aes:256"], derived):
            r = keyden(command, str(key))
            assert r.stdout == b""
            fails(r, 1, NOT_READABLE)


# --------------------------------------------------------------- derive, kdf


def test_derive_from_keys_and_peer_files(keyden, client, tmp_path):
    mine, theirs = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    private = client.add("asymmetric", "mine", pkcs8(mine), "@s")
    public = theirs.public_key()
    shared = mine.exchange(ec.ECDH(), public)
    spki = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    peer = client.add("asymmetric", "theirs", spki, "@s")

    serial = serial_of(keyden("derive", "%asymmetric:mine", str(peer), "@s", "--salt", "00ff", "--info=6869",
                              "--desc", "app:ab", "--perm", "0x3f010000", "--timeout", "3600"))
    d = client.describe(serial)
    assert (d.type, d.description, d.perm) == ("logon", "app:ab", 0x3f010000)
    assert_aes_key(client, serial, HKDF(hashes.SHA256(), 32, b"\x00\xff", b"hi").derive(shared))
    for bad in ("-1", "4294967296"):  # keyden's own options do not wrap, as keyctl's strtoul would (to 136 years)
        fails(keyden("derive", "%asymmetric:mine", str(peer), "@s", "--timeout", bad), 2,
              f"Out of range timeout: '{bad}' (0 to 4294967295)\n")

    forms = {
        "der": spki,
        "raw": public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint),
        "pem": public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    expected = HKDF(hashes.SHA384(), 24, None, b"").derive(shared)
    for name, data in forms.items():
        path = tmp_path / f"peer.{name}"
        path.write_bytes(data)
        serial = serial_of(keyden("derive", "--kdf", "hkdf-sha384", "--length", "24", str(private),
                                  "--peer-file", str(path), "@s"))
        assert_aes_key(client, serial, expected)
    serial = serial_of(keyden("derive", str(private), str(peer), "@s", "--kdf", "sp800-56a-sha256", "--info", "0102"))
    assert_aes_key(client, serial, ConcatKDFHash(hashes.SHA256(), 32, b"\x01\x02").derive(shared))

    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x04" + bytes(64))
    fails(keyden("derive", str(private), "--peer-file", str(garbage), "@s"), 1,
          "keyden_derive: Invalid argument (peer point is not on the curve)\n")
    fails(keyden("derive", str(private), "--peer-file", str(tmp_path / "absent"), "@s"), 1,
          f"{tmp_path / 'absent'}: No such file or directory\n")
    fails(keyden("derive", str(private), str(peer), "@s", "--kdf", "md5"), 1,
          "keyden_derive: No such file or directory "
          "(unknown KDF; use hkdf-sha256|384|512, sp800-56a-sha256|384|512 or raw)\n")
    fails(keyden("derive", str(private), str(peer), "@s", "--length", "12x"), 2, "Unparsable length: '12x'\n")
    fails(keyden("derive", str(private), str(peer), "@s", "--salt", "0g"), 1, "Bad hex doublet\n")
    assert keyden("derive", str(private), "@s").rc == 2
    assert keyden("derive", str(private), str(peer), "@s", "--peer-file", str(garbage)).rc == 2
    assert keyden("derive", str(private), str(peer), "@s", "--desc").rc == 2


def test_kdf_command(keyden, client):
    master = os.urandom(32)
    key = client.add("user", "master", master)
    serial = serial_of(keyden("kdf", str(key), "@s", "--kdf", "hkdf-sha512", "--salt", "aa", "--info", "bb",
                              "--length", "16", "--desc", "app:child"))
    assert client.describe(serial).description == "app:child"
    assert_aes_key(client, serial, HKDF(hashes.SHA512(), 16, b"\xaa", b"\xbb").derive(master))
    fails(keyden("kdf", "-3", "@s"), 1,  # -3 is @s: a word, not an option
          "keyden_kdf: Protocol not available (keys of type 'keyring' cannot key a cipher, MAC or KDF "
          "(user and logon keys can))\n")
    assert keyden("kdf", str(key)).rc == 2


# ---------------------------------------------------------------- dh_compute



def result_lines(data: bytes) -> str:
    return f"{len(data)} bytes of data in result:\n{hexdump(data)}\n"


def test_dh_compute_commands_print_like_keyctl(keyden, client):
    x, peer_x = (int.from_bytes(os.urandom(32), "big") | 1 for _ in range(2))
    private = client.add("user", "dh:private", x.to_bytes(32, "big"))
    prime = client.add("user", "dh:prime", P.to_bytes(256, "big"))
    base = client.add("user", "dh:base", b"\x02")
    peer = client.add("user", "dh:peer", pow(2, peer_x, P).to_bytes(256, "big"))
    shared = pow(pow(2, peer_x, P), x, P).to_bytes(256, "big")

    assert ok(keyden("dh_compute", str(private), str(prime), str(base))) == result_lines(
        pow(2, x, P).to_bytes(256, "big"))
    assert ok(keyden("dh_compute", "%user:dh:private", "%user:dh:prime", str(peer))) == result_lines(shared)
    assert ok(keyden("dh_compute_kdf", str(private), str(prime), str(peer), "40", "sha256")) == result_lines(
        ConcatKDFHash(hashes.SHA256(), 40, None).derive(shared))
    otherinfo = b"alice bob"
    expected = result_lines(ConcatKDFHash(hashes.SHA512(), 64, otherinfo).derive(shared))
    assert ok(keyden("dh_compute_kdf_oi", str(private), str(prime), str(peer), "64", "sha512",
                     stdin=otherinfo)) == expected
    assert ok(keyden("dh_compute_kdf_oi", "-x", str(private), str(prime), str(peer), "64", "sha512",
                     stdin=otherinfo.hex().encode())) == expected

    fails(keyden("dh_compute", str(private), str(private), str(base)), 1, "keyctl_dh_compute_alloc: Invalid argument\n")
    fails(keyden("dh_compute_kdf", str(private), str(prime), str(peer), "x", "sha256"), 2, "Unparsable length: 'x'\n")
    assert keyden("dh_compute", str(private), str(prime)).rc == 2
    assert keyden("dh_compute_kdf", str(private), str(prime), str(peer), "32").rc == 2
    fails(keyden("dh_compute_kdf", str(private), str(prime), str(peer), "32", "sha1"), 1,
          "keyctl_dh_compute_kdf: No such file or directory\n")
    with pytest.raises(E.ENOENT, match="no hash 'sha1' for the KDF here; use sha256, sha384 or sha512"):
        client.dh_compute_kdf(private, prime, peer, "sha1", 32)


def test_pkey_decrypt_into_a_new_key(keyden, client, tmp_path):
    local = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_key = client.add("asymmetric", "transport", pkcs8(local), "@s")
    session_key = os.urandom(32)
    wrapped = tmp_path / "wrapped"
    wrapped.write_bytes(local.public_key().encrypt(
        session_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)))

    serial = serial_of(keyden("pkey_decrypt", str(rsa_key), "0", str(wrapped), "enc=oaep", "hash=sha256",
                              "--into", "app:transported", "@s"))
    assert client.describe(serial).description == "app:transported"
    assert_aes_key(client, serial, session_key)
    assert keyden("pkey_decrypt", str(rsa_key), "0", str(wrapped), "enc=oaep", "hash=sha256").stdout == session_key
    keys_before = len(client.read("@s"))
    fails(keyden("pkey_decrypt", str(rsa_key), "0", str(wrapped), "enc=oaep", "hash=sha1", "--into", "app:x", "@s"),
          1, "keyden_pkey_decrypt_into: Bad message (decryption failed)\n")  # OAEP's hash must match: none made
    assert keyden("pkey_decrypt", str(rsa_key), "0", str(wrapped), "--into", "app:x").rc == 2
    assert keyden("pkey_decrypt", str(rsa_key), "0", "--into", "app:x", "@s").rc == 2
    assert len(client.read("@s")) == keys_before


# ------------------------------------------------------------------- aead


def test_aead_gcm_streams_with_keyden_or_caller_nonces(keyden, client, tmp_path):
    key = os.urandom(32)
    serial = str(client.add("logon", "app:gcm", key))
    data = os.urandom((5 << 20) // 2)  # several 1 MiB pieces
    aad = b"header"

    sealed = keyden("aead", "encrypt", serial, "--aad", aad.hex(), stdin=data).stdout
    assert len(sealed) == 12 + len(data) + 16
    assert AESGCM(key).decrypt(sealed[:12], sealed[12:], aad) == data
    assert keyden("aead", "decrypt", serial, "--aad", aad.hex(), stdin=sealed).stdout == data

    nonce = os.urandom(12)
    given = keyden("aead", "encrypt", serial, "--nonce", nonce.hex(), stdin=b"short message").stdout
    assert given == AESGCM(key).encrypt(nonce, b"short message", None)
    target = tmp_path / "plain"
    assert ok(keyden("aead", "decrypt", serial, "--nonce", nonce.hex(), "-o", str(target), stdin=given)) == ""
    assert target.read_bytes() == b"short message" and stat.S_IMODE(target.stat().st_mode) == 0o600

    empty = keyden("aead", "encrypt", serial, stdin=b"").stdout
    assert len(empty) == 28 and AESGCM(key).decrypt(empty[:12], empty[12:], None) == b""
    assert ok(keyden("aead", "decrypt", serial, stdin=empty)) == ""


def test_unverified_plaintext_is_held_back_from_stdout_up_to_the_limit(monkeypatch, capfdbinary):
    """What cannot wait in memory goes out before the tag is checked, in order, and nothing is lost."""
    from keyden.cli import dataplane

    monkeypatch.setattr(dataplane, "ONE_SHOT_LIMIT", 10)
    with dataplane.Output(None) as out:
        held = dataplane.Unverified(out)
        held.write(b"abcd")
        held.write(b"efgh")
        assert capfdbinary.readouterr().out == b""  # 8 bytes: held
        held.write(b"ijk")  # 11 > 10: everything so far goes out, the rest streams
        assert capfdbinary.readouterr().out == b"abcdefghijk"
        held.write(b"lm")
        held.verified()
    assert capfdbinary.readouterr().out == b"lm"


def test_aead_decrypt_failures_leave_no_plaintext_file(keyden, client, tmp_path):
    key = os.urandom(16)
    serial = str(client.add("user", "gcm128", key))
    nonce, data = os.urandom(12), os.urandom(3 << 20)
    tampered = bytearray(nonce + AESGCM(key).encrypt(nonce, data, None))
    tampered[-1] ^= 1  # the tag: every piece of plaintext decrypts fine, only the end fails

    target = tmp_path / "out"
    target.write_bytes(b"previous contents")
    before = sorted(os.listdir(tmp_path))
    fails(keyden("aead", "decrypt", serial, "-o", str(target), stdin=bytes(tampered)), 1,
          "keyden_aead: Bad message (authentication failed)\n")
    assert target.read_bytes() == b"previous contents" and sorted(os.listdir(tmp_path)) == before

    to_stdout = keyden("aead", "decrypt", serial, stdin=bytes(tampered))
    fails(to_stdout, 1, "keyden_aead: Bad message (authentication failed)\n")
    assert to_stdout.stdout == b""  # three pieces decrypted fine, and were held back until the tag failed
    genuine = keyden("aead", "decrypt", serial, stdin=bytes(tampered[:-1]) + bytes([tampered[-1] ^ 1]))
    assert genuine.rc == 0 and genuine.stdout == data
    fails(keyden("aead", "decrypt", serial, stdin=bytes(27)), 1, "keyden_aead: Bad message\n")
    fails(keyden("aead", "decrypt", serial, "--nonce", nonce.hex(), stdin=bytes(15)), 1,
          "keyden_aead: Bad message\n")
    fails(keyden("aead", "encrypt", serial, "-a", "cbc(aes)", stdin=b"x"), 1,
          "keyden_aead: No such file or directory (cbc(aes) is a skcipher algorithm, not an aead)\n")
    fails(keyden("aead", "encrypt", "0x7ffffff0", stdin=b"x"), 1,
          "keyden_aead: Required key not available (no key with serial 2147483632)\n")
    fails(keyden("aead", "encrypt", serial, "--aad", "abc", stdin=b"x"), 1, "Short hex doublet\n")
    assert keyden("aead", "seal", serial).rc == 2
    assert keyden("aead", "encrypt").rc == 2


def test_aead_without_an_algorithm_uses_the_one_genkey_made_the_key_for(keyden, client):
    chacha = str(client.generate("chacha20", "app:cli-chacha", "@s"))
    sealed = keyden("aead", "encrypt", chacha, stdin=b"hello").stdout
    assert keyden("aead", "decrypt", chacha, "-a", "rfc7539(chacha20,poly1305)", stdin=sealed).stdout == b"hello"
    assert keyden("aead", "decrypt", chacha, stdin=sealed).stdout == b"hello"
    cbc = client.generate("aes-cbc:256", "app:cli-cbc", "@s")
    fails(keyden("aead", "encrypt", str(cbc), stdin=b"x"), 1,
          f"keyden_aead: Protocol not available (key {cbc} was generated for cbc(aes) only, not an AEAD)\n")


def test_aead_chacha20_poly1305_is_one_shot(keyden, client):
    key = os.urandom(32)
    serial = str(client.add("logon", "app:chacha", key))
    alg = "rfc7539(chacha20,poly1305)"
    data = os.urandom(300_000)  # past the shared-memory threshold
    sealed = keyden("aead", "encrypt", serial, "-a", alg, "--aad", "01", stdin=data).stdout
    assert ChaCha20Poly1305(key).decrypt(sealed[:12], sealed[12:], b"\x01") == data
    assert keyden("aead", "decrypt", serial, "-a", alg, "--aad", "01", stdin=sealed).stdout == data
    nonce = os.urandom(12)
    given = keyden("aead", "encrypt", serial, "-a", alg, "--nonce", nonce.hex(), stdin=b"hi").stdout
    assert given == ChaCha20Poly1305(key).encrypt(nonce, b"hi", None)
    fails(keyden("aead", "decrypt", serial, "-a", alg, stdin=sealed[:-1]), 1,
          "keyden_aead: Bad message (authentication failed)\n")
    # A --nonce of the wrong size is the caller's mistake, said as gcm(aes)'s streaming decrypt says it.
    fails(keyden("aead", "decrypt", serial, "-a", alg, "--nonce", "00", stdin=given), 1,
          f"keyden_aead: Invalid argument ({alg}: nonce must be 12 bytes, not 1)\n")


# ----------------------------------------------------- cipher, hash, hmac


def test_cipher_hash_hmac_commands(keyden, client, tmp_path):
    key, iv = os.urandom(24), os.urandom(16)
    serial = str(client.add("user", "aes192", key))
    data = os.urandom((3 << 20) // 2)  # a whole number of blocks, over one piece
    for alg, mode in (("cbc(aes)", modes.CBC), ("ctr(aes)", modes.CTR)):
        enc = Cipher(algorithms.AES(key), mode(iv)).encryptor()
        expected = enc.update(data) + enc.finalize()
        assert keyden("cipher", "encrypt", serial, "-a", alg, "--iv", iv.hex(), stdin=data).stdout == expected
        target = tmp_path / alg
        ok(keyden("cipher", "decrypt", serial, "-a", alg, "--iv", iv.hex(), "-o", str(target), stdin=expected))
        assert target.read_bytes() == data
    fails(keyden("cipher", "encrypt", serial, "-a", "cbc(aes)", "--iv", iv.hex(), stdin=b"partial block"), 1,
          "keyden_cipher: Invalid argument (cbc(aes): data is not a multiple of the block size)\n")
    fails(keyden("cipher", "encrypt", serial, "-a", "gcm(aes)", "--iv", iv.hex()), 1,
          "keyden_cipher: No such file or directory (gcm(aes) is an aead algorithm, not a skcipher)\n")
    assert keyden("cipher", "encrypt", serial, "-a", "ctr(aes)").rc == 2

    assert ok(keyden("hash", "sha256", stdin=data)) == hashlib.sha256(data).hexdigest() + "\n"
    assert ok(keyden("hash", "sha384", stdin=b"")) == hashlib.sha384(b"").hexdigest() + "\n"
    fails(keyden("hash", "hmac(sha256)"), 1,
          "keyden_hash: No such file or directory (hmac(sha256) is an hmac algorithm, not a hash)\n")

    mac_key = os.urandom(64)
    mac_serial = str(client.add("logon", "app:mac", mac_key))
    tags = {}
    for alg, hash_cls in (("hmac(sha256)", hashes.SHA256), ("hmac(sha512)", hashes.SHA512)):
        h = pyca_hmac.HMAC(mac_key, hash_cls())
        h.update(data)
        tags[alg] = h.finalize().hex()
    assert ok(keyden("hmac", mac_serial, stdin=data)) == tags["hmac(sha256)"] + "\n"
    assert ok(keyden("hmac", mac_serial, "-a", "hmac(sha512)", stdin=data)) == tags["hmac(sha512)"] + "\n"
    assert ok(keyden("hmac_verify", mac_serial, tags["hmac(sha512)"], "-a", "hmac(sha512)", stdin=data)) == ""
    fails(keyden("hmac_verify", mac_serial, tags["hmac(sha256)"], stdin=data + b"!"), 1,
          "keyden_hmac_verify: Bad message (HMAC verification failed)\n")
    fails(keyden("hmac_verify", mac_serial, tags["hmac(sha256)"][:32], stdin=data), 1,
          "keyden_hmac_verify: Invalid argument "
          "(hmac(sha256): tag must be 32 bytes, not 16; truncated HMAC tags are not supported)\n")
    fails(keyden("hmac_verify", mac_serial, "zz"), 1, "Bad hex doublet\n")
    fails(keyden("hmac_verify", mac_serial, ""), 1,  # (it said no more than "Invalid argument")
          "keyden_hmac_verify: Invalid argument (a tag to check, in hex, is required)\n")


def test_closed_standard_streams_are_an_error_not_a_traceback(daemon, client):
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=client.session_token)
    serial = str(client.add("logon", "closed:aes", os.urandom(32)))
    for args, closed, said in ((["hash", "sha256"], "<&-", "stdin: Bad file descriptor"),
                               (["aead", "encrypt", serial], "<&-", "stdin: Bad file descriptor"),
                               (["aead", "encrypt", serial], ">&-", "stdout: Bad file descriptor"),
                               (["id", "@s"], ">&-", "stdout: Bad file descriptor")):
        command = " ".join([shlex.quote(sys.executable), "-m", "keyden", "--socket", daemon.socket, *args])
        proc = subprocess.run(["sh", "-c", f"{command} {closed}"], input=b"data", capture_output=True,
                              env=env, timeout=60)
        assert proc.returncode == 1, (args, closed, proc.stderr)
        assert said in proc.stderr.decode() and "Traceback" not in proc.stderr.decode(), (args, closed)


def test_with_standard_error_closed_a_failure_says_nothing_on_stdout_and_keeps_its_status(daemon, client):
    """`id=$(keyden request user nope 2>&-)` put keyctl's error line into $id, and a usage error exited 1
    (print() falls back to stdout when sys.stderr is None; found by a CLI hunt).  As with keyctl, what
    goes to a closed stderr is lost, and nothing else changes."""
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=client.session_token)
    base = " ".join([shlex.quote(sys.executable), "-m", "keyden", "--socket", daemon.socket])
    for args, status in (("request user kd:never-there", 1), ("describe @x", 2), ("list", 2), ("", 2),
                         ("--socket /nonexistent/keyden.sock list @s", 1)):
        proc = subprocess.run(["sh", "-c", f"{base} {args} 2>&-"], capture_output=True, env=env, timeout=60)
        assert (proc.returncode, proc.stdout) == (status, b""), (args, proc.stdout)


def test_a_reader_that_goes_away_or_a_full_disk_is_not_a_traceback(daemon, client):
    """`keyden print k | head -c1` ends quietly with keyctl's status, 141 (it dies of SIGPIPE); a full stdout
    is said, exit 1."""
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=client.session_token)
    client.add("user", "pipe:big", os.urandom(32767))
    client.add("logon", "pipe:aes", os.urandom(32))
    base = " ".join([shlex.quote(sys.executable), "-m", "keyden", "--socket", daemon.socket])
    for command in ("print %user:pipe:big", "read %user:pipe:big", "pipe %user:pipe:big",
                    "hash sha256", "aead encrypt %logon:pipe:aes"):
        proc = subprocess.run(["bash", "-c", f"head -c 5000000 /dev/zero | {base} {command} | head -c1 >/dev/null;"
                               " exit ${PIPESTATUS[1]}"], capture_output=True, env=env, timeout=60)
        assert proc.stderr == b"", (command, proc.stderr)
        if command.startswith("aead"):  # 5 MB out: the reader is surely gone before the last write
            assert proc.returncode == 128 + signal.SIGPIPE, command
        full = subprocess.run(["sh", "-c", f"head -c 5000000 /dev/zero | {base} {command} > /dev/full"],
                              capture_output=True, env=env, timeout=60)
        assert full.returncode == 1 and full.stderr.decode() == "stdout: No space left on device\n", \
            (command, full.stderr)
    proc = subprocess.run(["sh", "-c", f"{base} --help > /dev/full"], capture_output=True, env=env, timeout=60)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr


# ------------------------------------------------- output and input that misbehave


def _cli(daemon, client, *args: str, **popen):
    """The CLI as a subprocess with the caller's own stdin/stdout (descriptors, limits), in the test's session."""
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=client.session_token, **popen.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "keyden", "--socket", daemon.socket, *args], env=env, **popen)


def _file_size_limit(size: int):
    """A preexec_fn: writes past ``size`` bytes fail with EFBIG (SIGXFSZ ignored), as a disk that is full."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_failed_write_leaves_no_partial_output_and_the_old_file_intact(daemon, client, tmp_path):
    """A -o file is written whole or not at all: a disk that fills (here, a file size limit) leaves the old
    target and no temporary file of plaintext behind, for a forged message and a good one alike."""
    key = os.urandom(32)
    serial = str(client.add("logon", "cli:fsize", key))
    plaintext = b"SECRET-PLAINTEXT-" * 300  # 5100 bytes: over the 4096-byte limit
    sealed = bytearray(AESGCM(key).encrypt(bytes(12), plaintext, None))
    target = tmp_path / "target"
    target.write_bytes(b"the old contents")
    forged = bytes(sealed[:-1]) + bytes([sealed[-1] ^ 1])
    for message in (forged, bytes(sealed)):
        proc = _cli(daemon, client, "aead", "decrypt", serial, "--nonce", "00" * 12, "-o", str(target),
                    stdin=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_file_size_limit(4096))
        _out, err = proc.communicate(message, timeout=60)
        assert proc.returncode == 1 and b"Traceback" not in err, err
        assert target.read_bytes() == b"the old contents"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no .keyden-* temporary left
    exported = tmp_path / "export.kdnx"  # an export's -o is written the same way
    exported.write_bytes(b"an earlier export")
    wrapping = str(client.add("logon", "cli:fsize-wrap", os.urandom(32)))
    big = str(client.add("user", "cli:fsize-big", os.urandom(8000)))
    proc = _cli(daemon, client, "export", big, "--wrapping-key", wrapping, "-o", str(exported),
                stderr=subprocess.PIPE, preexec_fn=_file_size_limit(4096))
    assert proc.wait(timeout=60) == 1 and b"File too large" in proc.stderr.read()
    proc.stderr.close()
    assert exported.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.kdnx", "target"]


def test_short_writes_and_non_blocking_pipes_lose_no_bytes(daemon, client, tmp_path):
    """stdout unbuffered (PYTHONUNBUFFERED=1) takes a short write as it comes: the rest must follow, or the
    command fail.  A non-blocking stdin that is empty for now is not the end of the input, nor is a
    non-blocking stdout that is full a reason to give up."""
    import fcntl
    import struct
    import termios
    import threading
    import time

    key = os.urandom(32)
    serial = str(client.add("logon", "cli:short", key))
    out = tmp_path / "out"
    for alg in ("gcm(aes)", "rfc7539(chacha20,poly1305)"):  # streamed, and one-shot
        with open(out, "wb") as sink:
            proc = _cli(daemon, client, "aead", "encrypt", serial, "-a", alg, stdin=subprocess.PIPE, stdout=sink,
                        stderr=subprocess.PIPE, env={"PYTHONUNBUFFERED": "1"}, preexec_fn=_file_size_limit(1 << 20))
            _o, err = proc.communicate(bytes(3_000_000), timeout=60)
        assert proc.returncode == 1 and err == b"stdout: File too large\n", (alg, err)

    def non_blocking(fd: int) -> int:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        return fd

    def pending(fd: int) -> int:
        """Bytes waiting in the pipe ``fd`` is an end of."""
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "the command never got there"
            time.sleep(0.01)

    read_end, write_end = os.pipe()
    proc = _cli(daemon, client, "hash", "sha256", stdin=non_blocking(read_end), stdout=subprocess.PIPE)
    os.write(write_end, b"a" * 100)
    until(lambda: pending(read_end) == 0)  # the command has read the first 100 bytes ...
    time.sleep(0.2)                        # ... and found the pipe empty (EAGAIN), not at its end
    os.close(read_end)
    os.write(write_end, b"b" * 100)
    os.close(write_end)
    assert proc.communicate(timeout=60)[0].decode().strip() == hashlib.sha256(b"a" * 100 + b"b" * 100).hexdigest()

    read_end, write_end = os.pipe()
    nonce = os.urandom(12)
    proc = _cli(daemon, client, "aead", "encrypt", serial, "--nonce", nonce.hex(), stdin=subprocess.PIPE,
                stdout=non_blocking(write_end), env={"PYTHONUNBUFFERED": "1"})
    os.close(write_end)
    feeder = threading.Thread(target=proc.communicate, args=(bytes(3 << 20),), kwargs={"timeout": 60})
    feeder.start()
    until(lambda: pending(read_end) >= fcntl.fcntl(read_end, fcntl.F_GETPIPE_SZ))  # full: its writes got EAGAIN
    received = bytearray()
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read(1 << 16):
            received += chunk
    feeder.join()
    assert proc.returncode == 0 and bytes(received) == AESGCM(key).encrypt(nonce, bytes(3 << 20), None)


def test_what_aead_encrypt_writes_aead_decrypt_reads_back_at_the_one_shot_limit(keyden, client):
    """The one-shot AEADs' limit is on the plaintext: decrypt takes the nonce and tag on top of it."""
    from keyden.cli import dataplane

    key = os.urandom(32)
    serial = str(client.add("logon", "cli:limit", key))
    plaintext = os.urandom(dataplane.ONE_SHOT_LIMIT)
    sealed = keyden("aead", "encrypt", serial, "-a", "rfc7539(chacha20,poly1305)", stdin=plaintext)
    assert sealed.rc == 0 and len(sealed.stdout) == len(plaintext) + 28
    back = keyden("aead", "decrypt", serial, "-a", "rfc7539(chacha20,poly1305)", stdin=sealed.stdout)
    assert back.rc == 0 and back.stdout == plaintext
    fails(keyden("aead", "encrypt", serial, "-a", "rfc7539(chacha20,poly1305)", stdin=plaintext + b"!"),
          1, "keyden_aead: input over 64 MiB; only gcm(aes) streams\n")


def test_o_writes_through_links_and_to_special_files(daemon, client, keyden, tmp_path):
    """-o replaces a regular file whole, found as the kernel resolves the path (through a symbolic link,
    which stays; `dir/link/../f` where the kernel puts it), and a forged message leaves it as it was;
    anything else is written through: a FIFO or a device opened, /dev/stdout and /dev/fd/N taken as the
    descriptors they name (an appended log keeps what it had)."""
    import threading

    key = os.urandom(32)
    serial = str(client.add("logon", "cli:special", key))
    nonce = os.urandom(12)
    expected = AESGCM(key).encrypt(nonce, b"through", None)
    real, link = tmp_path / "real", tmp_path / "link"
    real.write_bytes(b"old")
    link.symlink_to(real)
    sealed = AESGCM(key).encrypt(nonce, b"x" * 1000, None)
    forged = sealed[:-1] + bytes([sealed[-1] ^ 1])  # (a fixed last byte would be the real one, 1 time in 256)
    fails(keyden("aead", "decrypt", serial, "--nonce", nonce.hex(), "-o", str(link), stdin=forged),
          1, "keyden_aead: Bad message (authentication failed)\n")
    assert real.read_bytes() == b"old"
    assert ok(keyden("aead", "encrypt", serial, "--nonce", nonce.hex(), "-o", str(link), stdin=b"through")) == ""
    assert link.is_symlink() and real.read_bytes() == expected
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (tmp_path / "dirlink").symlink_to(elsewhere / "sub")
    dotdot = str(tmp_path / "dirlink" / ".." / "dotdot")  # the kernel: elsewhere/dotdot; the text: tmp_path/dotdot
    assert ok(keyden("aead", "encrypt", serial, "--nonce", nonce.hex(), "-o", dotdot, stdin=b"through")) == ""
    assert (elsewhere / "dotdot").read_bytes() == expected
    (tmp_path / "dirlink").unlink()
    (elsewhere / "dotdot").unlink()
    (elsewhere / "sub").rmdir()
    elsewhere.rmdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = keyden("aead", "encrypt", serial, "--nonce", nonce.hex(), "-o", str(fifo), stdin=b"through")
    reader.join(timeout=60)
    if reader.is_alive():  # the command never opened the FIFO: let the reader go, then say why
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert ok(result) == "" and got == [expected] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert ok(keyden("aead", "encrypt", serial, "-o", os.devnull, stdin=b"through")) == ""
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)
    fails(keyden("aead", "encrypt", serial, "-o", "/proc/version", stdin=b"through"), 1,  # it exists: not ENOENT
          "/proc/version: cannot write a new file beside it (written whole, then renamed into place): "
          "No such file or directory\n")
    log = tmp_path / "log"
    log.write_bytes(b"earlier lines\n")
    command = " ".join([shlex.quote(sys.executable), "-m", "keyden", "--socket", daemon.socket, "aead", "encrypt",
                        serial, "--nonce", nonce.hex()])
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=client.session_token)
    script = (f"{{ echo header; {command} -o /dev/stdout; {command} -o /dev/fd/3 3>&1; echo footer; }} "
              f">> {shlex.quote(str(log))}")
    assert subprocess.run(["sh", "-c", script], input=b"through", env=env, timeout=60).returncode == 0
    sealed_nothing = AESGCM(key).encrypt(nonce, b"", None)  # the first command took all the input
    assert log.read_bytes() == b"earlier lines\nheader\n" + expected + sealed_nothing + b"footer\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link", "log", "real"]


def test_a_terminated_command_leaves_no_plaintext_beside_its_output(daemon, client, tmp_path):
    """SIGTERM, SIGHUP, SIGQUIT (Ctrl-\\), SIGUSR1/2 or SIGALRM while -o is being written unwinds as Ctrl-C
    does: the temporary file goes (SIGQUIT left it, holding unauthenticated plaintext)."""
    import signal
    import time

    key = os.urandom(32)
    serial = str(client.add("logon", "cli:term", key))
    target = tmp_path / "plain"
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1):
        proc = _cli(daemon, client, "aead", "decrypt", serial, "--nonce", "00" * 12, "-o", str(target),
                    stdin=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_hangup_and_term,
                    env={"PYTHONFAULTHANDLER": "1"})  # SIGABRT below: where a hung one was, on its stderr
        proc.stdin.write(os.urandom(3 << 20))  # plaintext in the temporary file, the tag not yet come
        proc.stdin.flush()
        deadline = time.monotonic() + 30
        while not [p for p in tmp_path.iterdir() if p.name.startswith(".keyden-") and p.stat().st_size]:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            time.sleep(0.01)
        proc.send_signal(signum)
        try:
            status = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait(10)
            raise AssertionError(f"{signal.Signals(signum).name} did not end it: {proc.stderr.read().decode()}")
        assert status == 128 + signum
        proc.stdin.close()
        proc.stderr.close()
        assert list(tmp_path.iterdir()) == []


def test_a_session_hung_up_passes_it_on_and_gives_the_session_up_when_its_program_ends(daemon, client, tmp_path):
    """keyctl execs the program, so a SIGHUP or SIGTERM sent to `keyctl session` reaches the program.
    `keyden session` died of it at once, and its token stayed for good (its quota too); now it passes the
    signal on and waits: a program that survives it (a trap, nohup) keeps its session, and when it ends
    the token is given up.  One that dies of it ends keyden session alike."""
    import signal
    import time

    keyden_cmd = " ".join([shlex.quote(sys.executable), "-m", "keyden", "--socket", daemon.socket])
    started, go, out = tmp_path / "started", tmp_path / "go", tmp_path / "out"

    def sessions() -> set[bytes]:
        return set(_cli(daemon, client, "sessions", stdout=subprocess.PIPE).communicate(timeout=30)[0].split())
    before = sessions()
    for trap, signum in (("trap '' HUP TERM; ", signal.SIGHUP), ("trap '' HUP TERM; ", signal.SIGTERM),
                         ("", signal.SIGTERM)):
        script = (f'{trap}touch {started}; i=0; '  # waits for go, 60 s at most: never left behind
                  f'while [ ! -e {go} ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i+1)); done; '
                  f'{keyden_cmd} id @s > {out} 2>&1; echo "rc=$?" >> {out}')
        for marker in (started, go, out):
            marker.unlink(missing_ok=True)
        proc = _cli(daemon, client, "session", "-", "sh", "-c", script, stderr=subprocess.DEVNULL,
                    preexec_fn=default_hangup_and_term)
        try:
            deadline = time.monotonic() + 30
            while not started.exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)
            proc.send_signal(signum)
            if trap:
                time.sleep(0.3)
                assert proc.poll() is None  # it waits for its program, which goes on
        finally:
            go.touch()
        if trap:
            assert proc.wait(timeout=60) == 0  # the program's status
            text = out.read_text()
            assert text.endswith("rc=0\n") and int(text.split()[0]) != 0, text  # still in its session
        else:
            assert proc.wait(timeout=60) == -signum and not out.exists()  # dead of it, as its program
        assert sessions() == before  # the token given up either way
