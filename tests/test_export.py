"""Wrapped export and import over the real daemon: round trips, refusals, and no key bytes in any blob.

Exports need read permission by the key's mask (possession counts) and a key
without the non-exportable flag; what comes out is sealed to a public key or
under a wrapping key held in keyden, and goes back in only through keyden.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyden import errors as E
from keyden.core.journal import NullJournal
from keyden.core.perm import Credentials
from keyden.core.store import SESSION, Caller, KeyStore, StoreConfig
from keyden.persist import export as X
from keyden.server.handlers import persist as persist_handlers
from tests.conftest import REPO

READABLE = 0x3F010000  # possessor everything (read included), owner view
ALICE = Credentials(1000, 1000, frozenset({1000}))


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_round_trip_through_every_kind_of_recipient(client):
    payload = os.urandom(32)
    key = client.add("user", "exported", payload, "@s")
    client.setperm(key, 0x3F010003)
    # A recipient's private key, uploaded from outside, and its PEM public half given as bytes.
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    x_key = x25519.X25519PrivateKey.generate()
    recipients = {
        "ec-pem": (_pem_public(ec_key), client.add("asymmetric", "ec-recipient", _pem_private(ec_key), "@s")),
        "rsa-pem": (_pem_public(rsa_key), client.add("asymmetric", "rsa-recipient", _pem_private(rsa_key), "@s")),
        "x25519-pem": (_pem_public(x_key), client.add("asymmetric", "x-recipient", _pem_private(x_key), "@s")),
    }
    generated = client.genkey("x25519", "x-in-keyden", "@s")
    recipients["x25519-serial"] = (generated, generated)
    wrap = client.genkey("aes:256", "backup:wrap", "@s")
    blobs = {name: client.export(key, to_public_key=to) for name, (to, _unwrap) in recipients.items()}
    blobs["wrapping-key"] = client.export(key, wrapping_key=wrap)
    unwrap_with = {name: unwrap for name, (_to, unwrap) in recipients.items()}
    unwrap_with["wrapping-key"] = wrap
    dest = client.newring("imports", "@s")  # not @s: the copy would displace the original there

    modes = {name: X.mode_of(blob) for name, blob in blobs.items()}
    assert modes == {"ec-pem": X.ECDH, "rsa-pem": X.RSA_OAEP, "x25519-pem": X.X25519, "x25519-serial": X.X25519,
                     "wrapping-key": X.WRAPPING_KEY}
    for name, blob in blobs.items():
        assert payload not in blob and b"exported" not in blob, name  # sealed, description included
        back = client.import_key(blob, unwrap_with[name], dest)
        assert back != key
        assert client.read(back) == payload
        d = client.describe(back)
        assert (d.type, d.description, d.perm, d.uid) == ("user", "exported", 0x3F010003, os.geteuid())
        client.unlink(back, dest)
    # Each export is fresh: the same key twice never gives the same blob.
    assert client.export(key, wrapping_key=wrap) != blobs["wrapping-key"]


def test_a_keyring_tree_moves_whole(client):
    top = client.newring("bundle", "@s")
    sub = client.newring("inner", top)
    user = client.add("user", "cfg", b"user-bytes", top)
    logon_bytes = os.urandom(32)
    logon = client.add("logon", "svc:key", logon_bytes, sub)
    signer = client.genkey("ed25519", "signer", sub)
    client.link(user, sub)  # one key in two keyrings of the tree
    for k in (logon, signer):
        client.setperm(k, READABLE)  # unreadable types export only when the mask grants read
    spki, _ = client.public_key_bytes(signer)
    wrap = client.genkey("aes:256", "backup:tree", "@s")

    blob = client.export(top, wrapping_key=wrap)
    assert logon_bytes not in blob
    with pytest.raises(E.EEXIST):  # "bundle" is in @s already: an import never displaces a namesake
        client.import_key(blob, wrap, "@s")
    assert client.read(user) == b"user-bytes"
    new_top = client.import_key(blob, wrap, client.newring("restored", "@s"))
    new_members = {client.describe(k).description: k for k in client.read(new_top)}
    assert set(new_members) == {"inner", "cfg"}
    inner = {client.describe(k).description: k for k in client.read(new_members["inner"])}
    assert set(inner) == {"svc:key", "signer", "cfg"}
    assert inner["cfg"] == new_members["cfg"]  # still one key, linked twice
    assert client.read(new_members["cfg"]) == b"user-bytes"
    assert client.describe(inner["svc:key"]).type == "logon"
    assert client.mac("hmac(sha256)", inner["svc:key"], b"m") == hmac.new(logon_bytes, b"m", "sha256").digest()
    signature = client.pkey_sign(inner["signer"], "", b"message")
    serialization.load_der_public_key(spki).verify(signature, b"message")  # the very same private key


def test_what_may_not_be_exported(client):
    wrap = client.genkey("aes:256", "backup:refusals", "@s")
    with pytest.raises(E.EINVAL, match="to_public_key is empty"):  # (an empty file: "exactly one of" misled)
        client.export(wrap, to_public_key=b"")
    sealed = client.add("user", "sealed", b"stays home", "@s", no_export=True)
    with pytest.raises(E.EPERM):
        client.export(sealed, wrapping_key=wrap)
    client.update(sealed, b"new payload")  # the flag survives an update
    client.add("user", "sealed", b"re-added", "@s")  # and add's update-in-place
    with pytest.raises(E.EPERM):
        client.export(sealed, wrapping_key=wrap)
    ring = client.newring("holder", "@s")
    unreadable = client.add("logon", "svc:first", os.urandom(32), ring)  # met before the sealed key
    client.link(sealed, ring)
    with pytest.raises(E.EPERM):  # one sealed key seals the whole tree, whatever unreadable keys come first
        client.export(ring, wrapping_key=wrap)
    client.unlink(sealed, ring)
    with pytest.raises(E.EACCES, match=f"key {unreadable} "):
        client.export(ring, wrapping_key=wrap)
    kept = client.genkey("ec:p256", "kept", "@s", no_export=True)
    with pytest.raises(E.EPERM):  # its default mask grants no read, but no mask would let it out: EPERM says so
        client.export(kept, wrapping_key=wrap)
    client.setperm(kept, READABLE)
    with pytest.raises(E.EPERM):
        client.export(kept, wrapping_key=wrap)
    client.setperm(kept, 0x08000000)  # searchable by its possessor, and nothing else: the flag is not shown
    with pytest.raises(E.EACCES):
        client.export(kept, wrapping_key=wrap)
    # Read permission by mask is needed: a logon key's default mask has none.
    logon = client.add("logon", "svc:default", os.urandom(32), "@s")
    with pytest.raises(E.EACCES):
        client.export(logon, wrapping_key=wrap)
    user = client.add("user", "plain", b"x" * 16, "@s")
    with pytest.raises(E.EINVAL):
        client.export(user, to_public_key=client.genkey("ed25519", "signing-only", "@s"))  # cannot encrypt to it
    with pytest.raises(E.EINVAL):
        client.export(user, wrapping_key=client.add("logon", "svc:short", b"too short", "@s"))
    imported = client.import_key(client.export(user, wrapping_key=wrap), wrap, client.newring("in", "@s"),
                                 no_export=True)
    with pytest.raises(E.EPERM):
        client.export(imported, wrapping_key=wrap)  # marked on import
    # A restriction cannot go with an export: the copy of a closed keyring would take any link.
    closed = client.newring("closed", "@s")
    client.add("user", "member", b"x", closed)
    client.restrict_keyring(closed)
    outer = client.newring("outer", "@s")
    client.link(closed, outer)
    for tree in (closed, outer):
        with pytest.raises(E.EOPNOTSUPP, match=f"keyring {closed} is restricted"):
            client.export(tree, wrapping_key=wrap)


@pytest.mark.parametrize("u", [0, 1])
def test_an_export_to_a_low_order_x25519_key_is_einval(client, u):
    """A low-order X25519 recipient makes an all-zero shared secret, which pyca refuses with a ValueError:
    the export was EIO "internal error" (a traceback in the daemon's log), given as bytes or as a key."""
    low = x25519.X25519PublicKey.from_public_bytes(u.to_bytes(32, "little")).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = client.add("user", "to a low-order point", b"stays home", "@s")
    with pytest.raises(E.EINVAL, match="low-order"):
        client.export(key, to_public_key=low)
    with pytest.raises(E.EINVAL, match="low-order"):
        client.export(key, to_public_key=client.add("asymmetric", "", low, "@s"))


def test_hostile_and_mismatched_blobs_are_refused(client):
    wrap = client.genkey("aes:256", "backup:a", "@s")
    other = client.genkey("aes:256", "backup:b", "@s")
    x = client.genkey("x25519", "x", "@s")
    key = client.add("user", "k", b"payload bytes", "@s")
    blob = client.export(key, wrapping_key=wrap)
    with pytest.raises(E.EBADMSG):
        client.import_key(blob, other, "@s")  # wrong wrapping key
    with pytest.raises(E.ENOPROTOOPT):
        client.import_key(blob, x, "@s")  # made for a wrapping key, offered a private key
    with pytest.raises(E.EOPNOTSUPP):
        client.import_key(client.export(key, to_public_key=x), wrap, "@s")  # and the other way round
    for i in (0, 7, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[i] ^= 0x20
        with pytest.raises((E.EBADMSG, E.EINVAL)):
            client.import_key(bytes(bad), wrap, "@s")
    for junk in (b"", b"KDNX", blob[:30], os.urandom(200)):
        with pytest.raises(E.EBADMSG):
            client.import_key(junk, wrap, "@s")
    before = client.read("@s")
    # A well-sealed blob whose tree is malformed (a link out of range) is refused whole.
    crafted = X.wrap_to_public_key(X.TREE.encode(([X.ENTRY.encode(("keyring", "r", READABLE, b"", 0))], [0, 5])),
                                   client.public_key(x))
    with pytest.raises(E.EBADMSG):
        client.import_key(crafted, x, "@s")
    # A tree that fails half-way (the second key's payload is refused) leaves nothing behind.
    entries = [X.ENTRY.encode(("keyring", "r", READABLE, b"", 0)),
               X.ENTRY.encode(("user", "ok", READABLE, b"fine", 0)), X.ENTRY.encode(("user", "bad", READABLE, b"", 0))]
    crafted = X.wrap_to_public_key(X.TREE.encode((entries, [0, 1, 0, 2])), client.public_key(x))
    with pytest.raises(E.EINVAL):
        client.import_key(crafted, x, "@s")
    assert client.read("@s") == before


def test_non_exportable_and_a_generated_keys_use_survive_a_restart(fresh_daemon):
    d = fresh_daemon()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    c = d.connect(session=token)
    ring = c.get_persistent("@s")
    wrap = c.genkey("aes:256", "backup:persist", ring)
    sealed = c.add("user", "sealed", b"never leaves", ring, no_export=True)
    free = c.add("user", "free", b"may leave", ring)
    ctr = c.genkey("aes-ctr:128", "app:ctr-only", ring)
    d.stop(signal.SIGKILL)
    d.start()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    c = d.connect(session=token)
    c.get_persistent("@s")
    with pytest.raises(E.EPERM):
        c.export(sealed, wrapping_key=wrap)
    assert c.read(c.import_key(c.export(free, wrapping_key=wrap), wrap, "@s")) == b"may leave"
    assert len(c.cipher("ctr(aes)", ctr, b"abc", iv=bytes(16))) == 3
    with pytest.raises(E.ENOPROTOOPT, match=r"generated for ctr\(aes\) only"):
        c.aead(ctr, "gcm(aes)").encrypt(bytes(12), b"abc", None)  # named: the daemon refuses it

# ------------------------------------------------------------------ a generated key's use


def _use(client, serial) -> str:
    """The use a key is bound to, as `keyden keys` shows it ("32 for gcm(aes)"), or "" for none."""
    summary = next(k.summary for k in client.keys() if k.serial == serial)
    return summary.partition(" for ")[2]


def _ctr(client, key) -> bytes:
    return client.cipher("ctr(aes)", key, b"counter mode", iv=bytes(16))


def _gcm(client, key) -> bytes:
    return client.aead(key, "gcm(aes)").encrypt(bytes(12), b"galois mode", None)  # named: the daemon checks


def _keys_only_its_use(client, original, copy, use):
    """The copy keys ``use`` as the original does (the same material) and, as the original, nothing else."""
    if use == "gcm(aes)":
        nonce = os.urandom(12)
        sealed = client.aead(original).encrypt(nonce, b"for the copy", b"ad")
        assert client.aead(copy).decrypt(nonce, sealed, b"ad") == b"for the copy"
        other = _ctr
    elif use == "hmac":
        assert client.mac("hmac(sha256)", copy, b"m") == client.mac("hmac(sha256)", original, b"m")
        other = _ctr
    else:
        assert use == "ctr(aes)"
        assert _ctr(client, copy) == _ctr(client, original)
        other = _gcm
    for key in (original, copy):
        with pytest.raises(E.ENOPROTOOPT, match=rf"generated for {re.escape(use)} only"):
            other(client, key)
    assert _use(client, copy) == _use(client, original) == use


@pytest.mark.parametrize("spec, use", [("aes:256", "gcm(aes)"), ("hmac:256", "hmac"), ("aes-ctr:128", "ctr(aes)")])
def test_an_imported_key_keys_only_what_the_exported_one_did(client, spec, use):
    """A version 1 export carried no use: an aes:256 key exported to oneself came back keying ctr(aes), whose
    keystream at IV 0 is GCM's hash key.  The use now travels in the blob, to every kind of recipient."""
    key = client.genkey(spec, f"app:{spec}", "@s")
    client.setperm(key, READABLE)  # a logon key opts in to export
    wrap = client.genkey("aes:256", "backup:use", "@s")
    x = client.genkey("x25519", "use-recipient-x", "@s")
    ec_key = client.genkey("ec:p256", "use-recipient-ec", "@s")
    blobs = [(client.export(key, wrapping_key=wrap), wrap), (client.export(key, to_public_key=x), x),
             (client.export(key, to_public_key=client.public_key_bytes(ec_key)[0]), ec_key)]
    dest = client.newring("use-imports", "@s")
    for blob, unwrap_with in blobs:
        copy = client.import_key(blob, unwrap_with, dest)
        _keys_only_its_use(client, key, copy, use)
        client.unlink(copy, dest)
        assert X.version_of(blob) == 2


def _tree(client, top) -> dict[str, int]:
    """Every key under ``top`` by description."""
    found = {}
    for serial in client.read(top):
        d = client.describe(serial)
        found[d.description] = serial
        if d.type == "keyring":
            found.update(_tree(client, serial))
    return found


def test_a_keyring_tree_keeps_each_members_use(client):
    """Bound and unbound members side by side: each comes back as it left, through a plain import, one with
    --no-export (which still marks every key, and takes no use away) and one of the keyring's contents."""
    top = client.newring("bound-bundle", "@s")
    sub = client.newring("inner", top)
    gcm = client.genkey("aes:256", "app:gcm", top)
    mac = client.genkey("hmac:256", "app:mac", sub)
    ctr = client.genkey("aes-ctr:128", "app:ctr", sub)
    free_bytes = os.urandom(32)
    free = client.add("logon", "app:free", free_bytes, sub)
    client.add("user", "cfg", b"user bytes", top)
    for k in (gcm, mac, ctr, free):
        client.setperm(k, READABLE)
    wrap = client.genkey("aes:256", "backup:bound-tree", "@s")
    blob = client.export(top, wrapping_key=wrap)
    imports = [("plain", dict()), ("no-export", dict(no_export=True)), ("contents", dict(contents=True))]
    for name, options in imports:
        dest = client.newring(f"restored-{name}", "@s")
        made = client.import_key(blob, wrap, dest, **options)
        copies = _tree(client, made)  # with contents, ``made`` is ``dest``
        assert set(copies) == {"inner", "app:gcm", "app:mac", "app:ctr", "app:free", "cfg"}, name
        _keys_only_its_use(client, gcm, copies["app:gcm"], "gcm(aes)")
        _keys_only_its_use(client, mac, copies["app:mac"], "hmac")
        _keys_only_its_use(client, ctr, copies["app:ctr"], "ctr(aes)")
        for unbound in ("app:free", "cfg", "inner"):
            assert _use(client, copies[unbound]) == "", (name, unbound)
        # Unbound, as the original: it keys GCM and CTR both, with the exported bytes.
        assert AESGCM(free_bytes).decrypt(bytes(12), _gcm(client, copies["app:free"]), None) == b"galois mode"
        assert _ctr(client, copies["app:free"]) == _ctr(client, free)
        status = {k.serial: k for k in client.keys()}
        assert {status[s].no_export for s in copies.values()} == {name == "no-export"}, name
        if name == "no-export":
            with pytest.raises(E.EPERM):
                client.export(copies["app:gcm"], wrapping_key=wrap)


#: A version 1 blob, made by the version 1 code (main at cd35713, before exports carried a key's use):
#: ``wrap_with_key(encode_tree([keyring "v1-bundle", logon "app:v1-aes" = V1_AES_KEY, user "v1-cfg" =
#: b"v1 user bytes"], [(0, 1), (0, 2)]), V1_WRAPPING_KEY)``, every mask 0x3f010000.
V1_WRAPPING_KEY = hashlib.sha256(b"keyden export v1 test: wrapping key").digest()
V1_AES_KEY = hashlib.sha256(b"keyden export v1 test: an aes:256 key").digest()
V1_BLOB = bytes.fromhex(
    "4b444e58010420000be624fc82d52c409e447a051ef0d23fcbe6e0629ea3fef10aa7cbdae3e8ee23a6fff2a579164d361f16"
    "365e2a29f1eac96ad52145f21f223131b8ff6184f1574aecb28a56ed154d56728accaf97385ab507e286de513860b4ef5a8b"
    "d98e22fd0bb194da916bacfb06d74a59f7b638d90b6b03b5262bf9ea6d7e1ffe04c0c6fab42b4ede126bfc0d5d55c9b1f434"
    "6db57e37fab0716b8eb086ef9a39783644b108f1eb271ebd083aa7dda9a577c5240a4fd8ae6ca0393c3b4f7bd506a5da6001"
    "43eae720f9a0ce468c399b8b351ba8624c70dbe43d56556e1bf52d74adf469d5fb752b40907d")


def test_a_version_1_blob_still_imports_bound_to_no_use(client):
    """Blobs made before exports carried a use are read as they were: their keys key anything.  The
    version is in the authenticated header: relabelled 2, the same blob does not open."""
    wrap = client.add("logon", "backup:v1", V1_WRAPPING_KEY, "@s")
    assert X.version_of(V1_BLOB) == 1
    dest = client.newring("v1-imports", "@s")
    copies = _tree(client, client.import_key(V1_BLOB, wrap, dest))
    assert set(copies) == {"app:v1-aes", "v1-cfg"}
    assert client.read(copies["v1-cfg"]) == b"v1 user bytes"
    aes = copies["app:v1-aes"]
    assert _use(client, aes) == ""
    assert AESGCM(V1_AES_KEY).decrypt(bytes(12), _gcm(client, aes), None) == b"galois mode"
    ctr = Cipher(algorithms.AES(V1_AES_KEY), modes.CTR(bytes(16))).encryptor()
    assert _ctr(client, aes) == ctr.update(b"counter mode") + ctr.finalize()
    relabelled = bytearray(V1_BLOB)
    relabelled[4] = 2
    with pytest.raises(E.EBADMSG, match="does not open"):
        client.import_key(bytes(relabelled), wrap, dest)
    relabelled[4] = 3
    with pytest.raises(E.EBADMSG, match="format 3"):
        client.import_key(bytes(relabelled), wrap, dest)
    assert len(client.read(dest)) == 1  # the first import's keyring, and nothing of the refused ones


def test_flags_a_version_2_entry_may_not_carry_are_refused(client):
    """A blob sealed with a wrapping key the test holds: a use keyden knows goes through; a bit it does not
    know (NO_EXPORT too: the import's own option sets that), two uses, or a use on a key that keys no
    cipher is EBADMSG, and the whole import makes nothing.  A version 2 blob relabelled 1, to come back
    unbound, does not open."""
    known = os.urandom(32)
    wrap = client.add("logon", "backup:known", known, "@s")
    dest = client.newring("flag-imports", "@s")
    material = os.urandom(32)

    def sealed(*entries, links=()):
        return X.wrap_with_key(X.TREE.encode(([X.ENTRY.encode(e) for e in entries], list(links))), known)

    bound = client.import_key(sealed(("logon", "app:ctr", READABLE, material, 0x10)), wrap, dest)
    assert _use(client, bound) == "ctr(aes)"
    with pytest.raises(E.ENOPROTOOPT):
        _gcm(client, bound)
    client.unlink(bound, dest)
    for flags in (0x80, 0x1, 0x11, 0x80000000, 0x2 | 0x10):
        with pytest.raises(E.EBADMSG, match="flags this keyden does not know|more than one use"):
            client.import_key(sealed(("logon", "app:x", READABLE, material, flags)), wrap, dest)
    with pytest.raises(E.EBADMSG, match="keys no cipher"):
        client.import_key(sealed(("keyring", "r", READABLE, b"", 0x2)), wrap, dest)
    with pytest.raises(E.EBADMSG, match="does not know"):  # deep in a tree, after keys that are fine
        client.import_key(sealed(("keyring", "r", READABLE, b"", 0), ("user", "u", READABLE, b"v", 0),
                                 ("logon", "app:y", READABLE, material, 0x100), links=(0, 1, 0, 2)), wrap, dest)
    with pytest.raises(E.EBADMSG, match="malformed"):  # version 1's entries under a version 2 header
        client.import_key(X.wrap_with_key(X.TREE.encode(([X.ENTRY_V1.encode(("logon", "app:z", READABLE,
                                                                             material))], [])), known), wrap, dest)
    assert client.read(dest) == []
    blob = sealed(("logon", "app:ctr", READABLE, material, 0x10))
    relabelled = bytearray(blob)
    relabelled[4] = 1
    with pytest.raises(E.EBADMSG, match="does not open"):
        client.import_key(bytes(relabelled), wrap, dest)
    assert client.read(dest) == []


def test_entries_decode_by_the_blobs_version_offline():
    """decode_tree reads each version's entries and no other's."""
    v1 = X.TREE.encode(([X.ENTRY_V1.encode(("logon", "a:b", READABLE, b"k" * 16))], []))
    v2 = X.TREE.encode(([X.ENTRY.encode(("logon", "a:b", READABLE, b"k" * 16, 0x2))], []))
    assert X.decode_tree(v1, 1)[0][0].flags == 0
    assert X.decode_tree(v2, 2)[0][0].flags == 0x2
    for plaintext, version in ((v1, 2), (v2, 1), (v2, 3)):
        with pytest.raises(E.EBADMSG):
            X.decode_tree(plaintext, version)


def _cli(daemon, token, *args, stdin=b"", cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO, KEYDEN_SESSION=token)
    return subprocess.run([sys.executable, "-m", "keyden", "--socket", daemon.socket, *args], input=stdin,
                          capture_output=True, env=env, timeout=60, cwd=cwd)


def test_cli_export_import_and_get_persistent(daemon, client, tmp_path):
    token = client.session_token
    dest = str(client.newring("imports", "@s"))
    wrap = client.genkey("aes:256", "backup:cli", "@s")
    key = client.add("user", "cli-key", b"cli payload", "@s")
    out = tmp_path / "blob"
    r = _cli(daemon, token, "export", str(key), "--wrapping-key", str(wrap), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert os.stat(out).st_mode & 0o777 == 0o600 and b"cli payload" not in out.read_bytes()
    r = _cli(daemon, token, "import", str(out), "--unwrap-with", str(wrap), dest)
    assert r.returncode == 0, r.stderr
    assert client.read(int(r.stdout)) == b"cli payload"
    # To a PEM public key file, back through stdin.
    x = client.genkey("x25519", "cli-x", "@s")
    pem = tmp_path / "recipient.pem"
    pem.write_bytes(serialization.load_der_public_key(client.public_key_bytes(x)[0]).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = _cli(daemon, token, "export", str(key), "--to-public-key", str(pem))
    assert r.returncode == 0 and b"cli payload" not in r.stdout
    client.clear(int(dest))
    r = _cli(daemon, token, "import", "--no-export", "-", "--unwrap-with", str(x), dest, stdin=r.stdout)
    assert r.returncode == 0, r.stderr
    assert client.read(int(r.stdout)) == b"cli payload"
    # A key named by its serial is that key, even beside a file of that name (planted in a shared directory).
    planted = x25519.X25519PrivateKey.generate()
    (tmp_path / str(x)).write_bytes(planted.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = _cli(daemon, token, "export", str(key), "--to-public-key", str(x), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with pytest.raises(E.EBADMSG):
        X.unwrap_with_private_key(r.stdout, planted)
    client.clear(int(dest))
    assert client.read(client.import_key(r.stdout, x, int(dest))) == b"cli payload"
    r = _cli(daemon, token, "add", "--no-export", "user", "cli-sealed", "v", "@s")
    sealed = int(r.stdout)
    r = _cli(daemon, token, "export", str(sealed), "--wrapping-key", str(wrap))
    assert (r.returncode, r.stderr) == (1, f"export: Operation not permitted (key {sealed} is marked "
                                         f"non-exportable)\n".encode())
    r = _cli(daemon, token, "export", str(key))
    assert r.returncode == 2 and b"--wrapping-key" in r.stderr  # usage
    # keyctl's get_persistent: <keyring> [<uid>]
    r = _cli(daemon, token, "get_persistent", "@s")
    assert r.returncode == 0 and int(r.stdout) in client.read("@s")
    client.unlink(int(r.stdout), "@s")  # the shared daemon's root persistent keyring: leave it as found
    r = _cli(daemon, token, "get_persistent", "@s", "nobody")
    assert (r.returncode, r.stderr) == (2, b"Unparsable uid: 'nobody'\n")
    r = _cli(daemon, token, "get_persistent", "2147483000")  # no such keyring to link it into
    assert (r.returncode, r.stderr) == (1, b"keyctl_get_persistent: Required key not available\n")


def test_cli_init_creates_the_key_and_checks_it(tmp_path):
    state = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "keyden", "init", "--state-dir", str(state),
                        "--config", os.devnull], capture_output=True, env=env, timeout=60)
    assert r.returncode == 0 and b"ready" in r.stdout, r.stderr
    key = (state / "master.key").read_bytes()
    assert len(key) == 32 and os.stat(state / "master.key").st_mode & 0o777 == 0o600
    again = subprocess.run([sys.executable, "-m", "keyden", "init", "--state-dir", str(state),
                            "--config", os.devnull], capture_output=True, env=env, timeout=60)
    assert again.returncode == 0 and (state / "master.key").read_bytes() == key  # idempotent
    (state / "master.key").write_bytes(os.urandom(32))
    wrong = subprocess.run([sys.executable, "-m", "keyden", "init", "--state-dir", str(state),
                            "--config", os.devnull], capture_output=True, env=env, timeout=60)
    assert wrong.returncode == 1 and b"does not open" in wrong.stderr


def test_blob_format_offline():
    """The format needs no daemon: wrapping to a public key and back with its private key."""
    plaintext = X.TREE.encode(([X.ENTRY.encode(("user", "d", READABLE, b"secret bytes", 0))], []))
    for private in (x25519.X25519PrivateKey.generate(), ec.generate_private_key(ec.SECP384R1()),
                    rsa.generate_private_key(public_exponent=65537, key_size=2048)):
        blob = X.wrap_to_public_key(plaintext, private.public_key())
        assert b"secret bytes" not in blob
        assert X.unwrap_with_private_key(blob, private) == plaintext
        assert X.version_of(blob) == X.VERSION == 2
        entries, links = X.decode_tree(X.unwrap_with_private_key(blob, private), X.version_of(blob))
        assert (entries[0].payload, links) == (b"secret bytes", [])


@pytest.mark.parametrize("size", [7, 16, 24, 33])
def test_a_forged_rsa_export_with_a_content_key_of_another_size_is_ebadmsg(size):
    """Anyone may OAEP-encrypt to a public key: a content key of 7 bytes was an internal error (AESGCM
    refused it) and 16 or 24 bytes opened, where every export carries 32."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    plaintext = X.TREE.encode(([X.ENTRY.encode(("user", "d", READABLE, b"forged", 0))], []))
    content_key = os.urandom(size)
    field = private.public_key().encrypt(content_key, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                                   algorithm=hashes.SHA256(), label=X.LABEL))
    header = X._HEADER.pack(X.MAGIC, X.VERSION, X.RSA_OAEP, len(field)) + field
    nonce = os.urandom(X.NONCE)
    sealed = AESGCM(content_key).encrypt(nonce, plaintext, header) if size in (16, 24) else bytes(len(plaintext) + 16)
    with pytest.raises(E.EBADMSG):
        X.unwrap_with_private_key(header + nonce + sealed, private)


@pytest.mark.parametrize("tree", [([b""] * 4_000_000, []), ([b""], [0] * 4_000_000)], ids=["entries", "links"])
def test_a_blob_of_millions_of_entries_or_links_is_refused_before_any_is_made(tree):
    """Whoever has a recipient's public key can make a blob: 4 million empty entries cost 66 MB and a second
    before they were counted, 4 million links ~150 MB of ints."""
    import tracemalloc

    plaintext = X.TREE.encode(tree)
    tracemalloc.start()
    try:
        with pytest.raises(E.EBADMSG):
            X.decode_tree(plaintext, X.VERSION)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("links", [[(0, 1), (1, 2), (2, 1)], [(0, 1), (1, 1)], [(0, 1), (1, 2), (2, 3), (3, 1)]],
                         ids=["two", "self", "three"])
def test_a_blob_whose_keyrings_hold_one_another_is_malformed(links):
    """persistence.md: no loops, and a malformed tree is EBADMSG (a loop reached the build, EDEADLK)."""
    rings = [X.ENTRY.encode(("keyring", f"r{i}", READABLE, b"", 0)) for i in range(1 + max(map(max, links)))]
    plaintext = X.TREE.encode((rings, [n for link in links for n in link]))
    with pytest.raises(E.EBADMSG, match="loop"):
        X.decode_tree(plaintext, X.VERSION)


def test_a_tree_too_large_to_import_is_not_exported():
    """A blob no keyden would open is refused when it is made, not when it is needed."""
    key = X.Exported("user", "k", 0x3f010000, b"v", 0)
    with pytest.raises(E.E2BIG, match="at most 100000 keys and 400000 links"):
        X.encode_tree([key] * (X.MAX_ENTRIES + 1), [])
    with pytest.raises(E.E2BIG):
        X.encode_tree([key] * 2, [(0, 1)] * (X.MAX_LINKS + 1))
    entries, links = X.decode_tree(X.encode_tree([X.Exported("keyring", "r", 0x3f010000, None, 0), key],
                                                 [(0, 1)]), X.VERSION)
    assert [e.type for e in entries] == ["keyring", "user"] and links == [(0, 1)]


class _WatchingJournal(NullJournal):
    """Notes each key as the journal sees it: what a group commit at that moment would write."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def on_store(self, key):
        self.seen.append((key.description, key.perm))


def _importing(journal: NullJournal, config: StoreConfig | None = None):
    """A store with a persistent keyring reported to ``journal``, and a ctx to run the import handler in."""
    store = KeyStore(config or StoreConfig())
    store.journal = journal
    _, token = store.join_session(Caller(ALICE))
    caller = Caller(ALICE, process=(4242, 1), session_token=token)
    persistent = store.get_persistent(caller, -1, SESSION)
    return SimpleNamespace(store=store, caller=caller), persistent


def test_an_import_reaches_a_persistent_keyring_whole_in_one_step():
    """A group commit may write what another request changed at any moment between two store operations.
    The tree is built below a detached top, so the journal first hears of it at the final link, with
    every key made and masked: a crash mid-import leaves none of it on disk (it used to leave the part
    built so far, with the build mask)."""
    journal = _WatchingJournal()
    ctx, persistent = _importing(journal)
    entries = [X.Entry("keyring", "bundle", 0x3F010000, b""), X.Entry("keyring", "inner", 0x3F030000, b"")]
    entries += [X.Entry("user", f"k{i}", READABLE, b"v") for i in range(5)]
    links = [(0, 1)] + [(1, i) for i in range(2, 7)] + [(0, 2)]
    journal.seen.clear()
    top = persist_handlers._make_tree(ctx, entries, links, persistent, 0)
    described = [desc for desc, _ in journal.seen]
    assert set(described) == {"bundle", "inner"} | {f"k{i}" for i in range(5)}
    assert all(perm != persist_handlers.BUILDING_PERM for _, perm in journal.seen)
    assert ctx.store.read(ctx.caller, persistent) == [top]


def test_an_import_is_built_while_no_other_request_can_see_it(monkeypatch):
    """Its keys wear BUILDING_PERM (the owner may read and re-mask them) until the masks go on at the end:
    another connection of the importer's uid listed and exported hundreds of them meanwhile, masks the blob
    denies (found by a hunt).  The build holds the store: another thread cannot get in until it is over."""
    import threading

    ctx, persistent = _importing(_WatchingJournal())
    entries = [X.Entry("keyring", "bundle", 0x3F010000, b"")]
    entries += [X.Entry("logon", f"s:k{i}", 0x09090000, b"v") for i in range(3)]
    others_got_in = []
    plain_setperm = ctx.store.setperm

    def setperm(*args):
        if not others_got_in:  # mid-build: every key is made, none has its mask yet
            def try_the_store():
                got = ctx.store.lock.acquire(timeout=0.3)
                if got:
                    ctx.store.lock.release()
                others_got_in.append(got)
            other = threading.Thread(target=try_the_store)
            other.start()
            other.join()
        return plain_setperm(*args)
    monkeypatch.setattr(ctx.store, "setperm", setperm)
    persist_handlers._make_tree(ctx, entries, [(0, 1), (0, 2), (0, 3)], persistent, 0)
    assert others_got_in == [False]


def test_an_imported_asymmetric_key_without_a_description_gets_the_kernels():
    """A blob's top entry with an empty description made a key described "" (a member got the default),
    and a second such import then failed with EEXIST."""
    ctx, persistent = _importing(_WatchingJournal())
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    made = persist_handlers._make_tree(ctx, [X.Entry("asymmetric", "", READABLE, pem)], [], persistent, 0)
    assert ctx.store.describe(ctx.caller, made).description.startswith("ECDSA-P256 private key: ")


def test_an_import_refused_while_parsing_wipes_what_it_parsed(monkeypatch):
    """Payloads are parsed before the build: one refused there left the ones parsed before it unwiped."""
    from keyden.core import keytypes as T

    ctx, persistent = _importing(_WatchingJournal())
    parsed = []
    plain = T.UserType.preparse
    monkeypatch.setattr(T.UserType, "preparse", lambda self, *a: parsed.append(plain(self, *a)) or parsed[-1])
    entries = [X.Entry("keyring", "top", 0x3F010000, b""), X.Entry("user", "a", READABLE, b"secret-a"),
               X.Entry("keyring", "sub", 0x3F010000, b""), X.Entry("keyring", ".bad", 0x3F010000, b"")]
    with pytest.raises(E.EPERM):
        persist_handlers._make_tree(ctx, entries, [(0, 1), (0, 2), (2, 3)], persistent, 0)
    assert [bytes(value) for value, _ in parsed] == [bytes(8)]


def test_an_import_that_fails_leaves_nothing():
    """A key the import cannot make (here a reserved '.' keyring name) destroys what was made before it."""
    journal = _WatchingJournal()
    ctx, persistent = _importing(journal)
    keys_before = len(ctx.store)
    entries = [X.Entry("keyring", "bundle", 0x3F010000, b""), X.Entry("user", "k", READABLE, b"v"),
               X.Entry("keyring", ".reserved", 0x3F010000, b"")]
    journal.seen.clear()
    with pytest.raises(E.EPERM):
        persist_handlers._make_tree(ctx, entries, [(0, 1), (0, 2)], persistent, 0)
    assert journal.seen == [] and len(ctx.store) == keys_before
    assert ctx.store.read(ctx.caller, persistent) == []


def test_a_machine_move_imports_the_persistent_keyrings_contents_into_the_new_one(tmp_path):
    """Two daemons, the CLI only: the new machine's recipient key (public_key), the old persistent keyring
    exported to it, and `import --contents` into the new persistent keyring.  Without --contents the keys
    arrived in a nested `_persistent.<uid>` keyring whose persistent mask (no setattr) could never be
    changed.  A namesake already there refuses the whole import; a single key has no contents."""
    from tests.conftest import Daemon

    old, new = Daemon().start(), Daemon().start()
    try:
        tokens = {}
        for d in (old, new):
            with d.connect() as boot:
                tokens[d] = boot.join_session()[1]
        run = lambda d, *args, stdin=b"": _cli(d, tokens[d], *args, stdin=stdin)  # noqa: E731
        ring = int(run(old, "get_persistent", "@s").stdout)
        user = int(run(old, "add", "user", "db:password", "s3cret", str(ring)).stdout)
        logon = int(run(old, "add", "logon", "svc:token", "t0ken", str(ring)).stdout)
        assert run(old, "setperm", str(logon), "0x3f010000").returncode == 0  # a logon key opts in to export
        recipient = run(new, "genkey", "x25519", "move-in", "@s").stdout.strip()
        (tmp_path / "move-in.pem").write_bytes(run(new, "public_key", recipient).stdout)
        r = run(old, "export", str(ring), "--to-public-key", str(tmp_path / "move-in.pem"), "-o",
                str(tmp_path / "keys.kdnx"))
        assert r.returncode == 0, r.stderr
        target = int(run(new, "get_persistent", "@s").stdout)
        r = run(new, "import", "--contents", str(tmp_path / "keys.kdnx"), "--unwrap-with", recipient, str(target))
        assert (r.returncode, int(r.stdout or 0)) == (0, target), r.stderr
        with new.connect(session=tokens[new]) as c:
            moved = {c.describe(k).description: k for k in c.read(target)}
            assert set(moved) == {"db:password", "svc:token"}
            assert c.read(moved["db:password"]) == b"s3cret"
            assert c.describe(moved["svc:token"]).perm == 0x3F010000
        again = run(new, "import", "--contents", str(tmp_path / "keys.kdnx"), "--unwrap-with", recipient,
                    str(target))
        assert again.returncode == 1 and b"File exists" in again.stderr  # nothing displaced, nothing added
        with new.connect(session=tokens[new]) as c:
            assert sorted(c.read(target)) == sorted(moved.values())
        one = run(old, "export", str(user), "--to-public-key", str(tmp_path / "move-in.pem"))
        r = run(new, "import", "--contents", "-", "--unwrap-with", recipient, "@s", stdin=one.stdout)
        assert r.returncode == 1 and b"only an exported keyring has contents" in r.stderr
        new.stop()
        new.start()  # on disk: the new persistent keyring holds them after a restart
        with new.connect() as boot:
            token = boot.join_session()[1]
        with new.connect(session=token) as c:
            assert c.get_persistent("@s") == target and len(c.read(target)) == 2
    finally:
        old.cleanup()
        new.cleanup()


def test_an_import_of_contents_a_keyring_refuses_leaves_nothing():
    """Every member is linked under the store lock, or none: a target that takes no links refuses the lot,
    and the keys made for it are destroyed."""
    ctx, persistent = _importing(_WatchingJournal())
    closed = ctx.store.add(ctx.caller, "keyring", "closed", b"", persistent)
    ctx.store.restrict_keyring(ctx.caller, closed)  # no further links
    keys_before = len(ctx.store)
    entries = [X.Entry("keyring", "bundle", READABLE, b"")] + [X.Entry("user", f"k{i}", READABLE, b"v")
                                                              for i in range(3)]
    with pytest.raises(E.EPERM):
        persist_handlers._make_tree(ctx, entries, [(0, 1), (0, 2), (0, 3)], closed, 0, contents=True)
    assert len(ctx.store) == keys_before and ctx.store.read(ctx.caller, closed) == []


def test_an_import_of_contents_judges_the_members_not_the_keyring_they_came_in():
    """With contents, the exported keyring itself is never filed in the target: a namesake of it there (the
    nested copy a plain import of the same export made) or a restriction it would fail refuse nothing."""
    ctx, persistent = _importing(_WatchingJournal())
    entries = [X.Entry("keyring", "bundle", READABLE, b""), X.Entry("user", "k", READABLE, b"v")]
    nested = persist_handlers._make_tree(ctx, entries, [(0, 1)], persistent, 0)
    assert persist_handlers._make_tree(ctx, entries, [(0, 1)], persistent, 0, contents=True) == persistent
    names = {ctx.store.describe(ctx.caller, k).description for k in ctx.store.read(ctx.caller, persistent)}
    assert names == {"bundle", "k"} and nested in ctx.store.read(ctx.caller, persistent)


def test_an_import_of_contents_refused_half_way_takes_back_what_it_linked(monkeypatch):
    """The third member is refused (as a restriction or a quota would): the two linked before it are taken
    back before the store lock is let go, so no journal record holds part of the import."""
    journal = _WatchingJournal()
    ctx, persistent = _importing(journal)
    keys_before = len(ctx.store)
    link_checked, calls = ctx.store._link_checked, []

    def refuse_the_third(ring, key):
        if ring.serial == persistent:
            calls.append(key.description)
            if len(calls) == 3:
                raise E.EDQUOT("over quota")
        link_checked(ring, key)
    monkeypatch.setattr(ctx.store, "_link_checked", refuse_the_third)
    entries = [X.Entry("keyring", "bundle", READABLE, b"")] + [X.Entry("user", f"k{i}", READABLE, b"v")
                                                              for i in range(3)]
    with pytest.raises(E.EDQUOT):
        persist_handlers._make_tree(ctx, entries, [(0, 1), (0, 2), (0, 3)], persistent, 0, contents=True)
    assert len(calls) == 3 and len(ctx.store) == keys_before and ctx.store.read(ctx.caller, persistent) == []


def test_an_import_of_contents_fits_a_quota_it_ends_exactly_at():
    """The exported keyring, held for the length of the request only, is charged to no quota: an import
    whose keys end exactly at the quota goes in (it was EDQUOT: one key and its links' bytes over), one
    byte less is refused, and nothing is left of the refused one."""
    entries = [X.Entry("keyring", "bundle", READABLE, b"")] + [X.Entry("user", f"k{i}", READABLE, b"v" * 10)
                                                              for i in range(3)]
    links = [(0, 1), (0, 2), (0, 3)]
    ctx, persistent = _importing(_WatchingJournal())
    before = ctx.store.quota_usage(ALICE.uid)[:2]
    persist_handlers._make_tree(ctx, entries, links, persistent, 0, contents=True)
    keys, used = ctx.store.quota_usage(ALICE.uid)[:2]

    ctx, persistent = _importing(_WatchingJournal(), StoreConfig(maxkeys=keys, maxbytes=used))
    assert persist_handlers._make_tree(ctx, entries, links, persistent, 0, contents=True) == persistent
    assert ctx.store.quota_usage(ALICE.uid)[:2] == (keys, used)

    ctx, persistent = _importing(_WatchingJournal(), StoreConfig(maxkeys=keys, maxbytes=used - 1))
    with pytest.raises(E.EDQUOT):
        persist_handlers._make_tree(ctx, entries, links, persistent, 0, contents=True)
    assert ctx.store.quota_usage(ALICE.uid)[:2] == before and ctx.store.read(ctx.caller, persistent) == []


def test_a_detached_top_changed_while_its_tree_is_built_is_never_filed():
    """Another request of the owner's may find the top (a listing shows it): linked elsewhere (a persistent
    keyring would keep it half built) it is EBUSY; revoked, expired or collected meanwhile, the import fails
    rather than report keys it did not bring.  A top made to carry its members is never filed itself (it
    is charged to no quota)."""
    from keyden.core import keytypes as T

    clock = [1_000_000.0]
    ctx, persistent = _importing(_WatchingJournal(), StoreConfig(gc_delay=0))
    ctx.store.clock = lambda: clock[0]
    changes = {E.EKEYREVOKED: lambda top: ctx.store.revoke(ctx.caller, top),
               E.EKEYEXPIRED: lambda top: ctx.store.set_timeout(ctx.caller, top, 1) or clock.__setitem__(0, clock[0] + 2),
               E.ENOKEY: lambda top: (ctx.store.set_timeout(ctx.caller, top, 1), clock.__setitem__(0, clock[0] + 2),
                                      ctx.store.collect())}
    for filed in (True, False):
        for error, change in changes.items():
            top = ctx.store.create_detached(ctx.caller, T.KEYRING, "bundle", None, 0, persistent, 0x3F3F0000,
                                            filed=filed)
            with pytest.raises(E.EBUSY):
                ctx.store.link(ctx.caller, top, persistent)
            change(top)
            with pytest.raises(error):
                if filed:
                    ctx.store.attach(ctx.caller, top, persistent, READABLE)
                else:
                    ctx.store.attach_members(ctx.caller, top, persistent)
            ctx.store.discard_detached(top)
    carrier = ctx.store.create_detached(ctx.caller, T.KEYRING, "bundle", None, 0, persistent, 0x3F3F0000,
                                        filed=False)
    with pytest.raises(E.ENOKEY):
        ctx.store.attach(ctx.caller, carrier, persistent, READABLE)
    assert ctx.store.read(ctx.caller, persistent) == []


def test_cli_rekey_refuses_a_passphrase_file_others_may_read(daemon, client, tmp_path):
    """Checked before anything is sent: a passphrase others could read is spent already."""
    loose = tmp_path / "new-passphrase"
    loose.write_bytes(b"a new passphrase\n")
    loose.chmod(0o644)
    r = _cli(daemon, client.session_token, "rekey", "--passphrase-file", str(loose))
    assert r.returncode == 1 and r.stderr.startswith(b"rekey: Permission denied (the passphrase file"), r.stderr
    assert b"has mode 0644, open to group or others" in r.stderr


def test_an_imports_tree_order_is_worked_out_in_one_pass():
    """Walked from every entry anew, a blob of one chain of 100,000 keyrings (the most an export holds)
    cost n²/2 steps before anything was checked against the quota: minutes of a worker per request."""
    chain = {0: 12345, **{i: i - 1 for i in range(1, X.MAX_ENTRIES)}}
    depth = persist_handlers._depths(chain)
    assert depth[X.MAX_ENTRIES - 1] == X.MAX_ENTRIES - 1 and depth[0] == 0
    shared = {0: 7, 1: 0, 2: 1, 3: 1, 4: 3}
    assert persist_handlers._depths(shared) == {0: 0, 1: 1, 2: 2, 3: 2, 4: 3}
    with pytest.raises(E.EBADMSG, match="one tree"):
        persist_handlers._depths({0: 7, 1: 2, 2: 3, 3: 1})  # a round that never reaches the top


def test_search_on_a_wrapping_or_recipient_key_does_not_rebuild_an_exports_content_key(client):
    """The content key is HKDF(wrapping key, salt, LABEL...) or HKDF(ECDH(recipient, ephemeral), LABEL...),
    or OAEP(LABEL) to an RSA recipient: kdf, derive and pkey_decrypt, which need only search, would rebuild
    or unwrap it with the blob's public fields, and open every key inside, logon and private keys too."""
    secret = client.add("logon", "app:secret", b"no mask makes this readable", "@s")
    client.setperm(secret, 0x3f3f0000)
    wrap = client.generate("hmac:256", "app:wrap")
    blob = client.export(secret, wrapping_key=wrap)
    _mode, salt, _header, _rest = X._parse(blob)
    with pytest.raises(E.EINVAL, match="reserved for keyden's exports"):
        client.kdf(wrap, salt=salt, info=X.LABEL + b" wrapping key", length=32)
    recipient = client.generate("x25519", "app:recipient")
    blob = client.export(secret, to_public_key=recipient)
    _mode, ephemeral, _header, _rest = X._parse(blob)
    with pytest.raises(E.EINVAL, match="reserved"):
        client.derive(recipient, peer=ephemeral, info=X.LABEL + b" agreement\0" + ephemeral)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_recipient = client.add("asymmetric", "app:rsa", rsa_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), "@s")
    blob = client.export(secret, to_public_key=rsa_recipient)
    _mode, wrapped, _header, _rest = X._parse(blob)
    with pytest.raises(E.EINVAL, match="reserved"):
        client.pkey_decrypt(rsa_recipient, f"enc=oaep hash=sha256 label={X.LABEL.hex()}", wrapped)
    elsewhere = client.newring("import here")
    assert client.describe(client.import_key(blob, rsa_recipient, elsewhere)).description == "app:secret"  # still works


def test_an_exports_key_copies_never_pickle():
    """What an export carries from the store to its wrapping, and an import from its blob to the store,
    holds a key's payload: as keys, parsed keys and handles, it refuses pickle and copy."""
    import copy
    import pickle

    from keyden.core.store import Exported

    for entry in (Exported("logon", "secret", 0x3f010000, b"payload bytes"),
                  X.Entry("logon", "secret", 0x3f010000, b"payload bytes")):
        for leak in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot be pickled or copied"):
                leak(entry)
        assert b"payload" not in repr(entry).encode()
