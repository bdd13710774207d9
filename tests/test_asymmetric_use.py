"""Asymmetric keys bound to their uses (PKCS#11's CKA_SIGN, CKA_DECRYPT, CKA_DERIVE), over the real daemon.

A key made with ``use`` does only what it names, for good: pkey_sign and pkey_verify are ``sign``,
pkey_encrypt, pkey_decrypt and key transport ``decrypt``, key agreement ``derive``; anything else is
EOPNOTSUPP naming the key, its uses and the one refused.  pkey_query reports only what the binding
allows.  A key made without one does everything, as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import ssl

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils, x25519

from keyden import errors as E
from keyden.client import aio
from keyden.core import keytypes as T
from keyden.core import flags as F
from keyden.core.perm import Credentials
from keyden.core.flags import FOR_USE
from keyden.core.store import SESSION, Caller, KeyStore
from keyden.crypto.asymmetric import OP_DECRYPT, OP_ENCRYPT, OP_SIGN, OP_VERIFY, generate
from keyden.persist import export as X
from keyden.protocol import NO_EXPORT, Op
from keyden.tls import contexts
from tests import test_trust as trust_pki
from tests.test_export import _cli
from tests.test_tls import App, Pki, python_peer

DIGEST = hashlib.sha256(b"a message").digest()
OAEP = "enc=oaep hash=sha256"
OAEP_PADDING = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
READABLE = 0x3F010000  # possessor everything (read included), owner view: exportable
ALL_OPS = OP_ENCRYPT | OP_DECRYPT | OP_SIGN | OP_VERIFY
#: flags.ASYMMETRIC_USE's bits, spelt out: they are stored with persistent keys and in exports, for good.
SIGN, DECRYPT, DERIVE = 0x800, 0x1000, 0x2000


def _refused(key: int, use: str, bound: str):
    """pytest.raises for an op of ``use`` on ``key``, bound to ``bound`` only: the message names all three."""
    return pytest.raises(E.EOPNOTSUPP, match=rf": key {key} is bound to {bound} only, not {use}$")


def _summary(client, serial) -> str:
    return next(k.summary for k in client.keys() if k.serial == serial)


def _peer_point() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _x25519_peer() -> bytes:
    return x25519.X25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                        serialization.PublicFormat.Raw)


# ------------------------------------------------------------------ each use, each kind of key


def test_an_rsa_key_bound_to_sign_signs_and_never_decrypts(client):
    key = client.genkey("rsa:2048", "signer", "@s", use="sign")
    signature = client.pkey_sign(key, "enc=pss hash=sha256", DIGEST)
    assert client.pkey_verify(key, "enc=pss hash=sha256", DIGEST, signature) is None
    with _refused(key, "decrypt", "sign"):
        client.pkey_encrypt(key, OAEP, b"secret")
    with _refused(key, "decrypt", "sign"):
        client.pkey_decrypt(key, OAEP, bytes(256))  # refused before any padding is looked at
    with _refused(key, "decrypt", "sign"):
        client.pkey_decrypt_into(key, OAEP, bytes(256), "app:unwrapped", "@s")
    assert client.pkey_query(key).supported_ops == OP_SIGN | OP_VERIFY
    assert _summary(client, key).endswith(" for sign")


def test_an_rsa_key_bound_to_decrypt_decrypts_and_never_signs(client):
    key = client.genkey("rsa:2048", "decrypter", "@s", use="decrypt")
    assert client.pkey_decrypt(key, OAEP, client.pkey_encrypt(key, OAEP, b"secret")) == b"secret"
    session = client.pkey_decrypt_into(key, OAEP, client.pkey_encrypt(key, OAEP, os.urandom(32)), "app:k", "@s")
    assert client.describe(session).type == "logon"
    with _refused(key, "sign", "decrypt"):
        client.pkey_sign(key, "enc=pkcs1 hash=sha256", DIGEST)
    with _refused(key, "sign", "decrypt"):
        client.pkey_verify(key, "enc=pkcs1 hash=sha256", DIGEST, bytes(256))
    assert client.pkey_query(key).supported_ops == OP_ENCRYPT | OP_DECRYPT
    remote = client.private_key(key)  # pyca's interface: decrypts, and its sign is refused the same way
    assert remote.decrypt(remote.public_key().encrypt(b"pyca", OAEP_PADDING), OAEP_PADDING) == b"pyca"
    with _refused(key, "sign", "decrypt"):
        remote.sign(b"m", padding.PKCS1v15(), hashes.SHA256())


def test_an_ec_key_bound_to_sign_never_agrees_and_one_bound_to_derive_never_signs(client):
    signer = client.genkey("ec:p256", "ec-signer", "@s", use="sign")
    agreer = client.genkey("ec:p256", "ec-agreer", "@s", use="derive")
    assert client.pkey_verify(signer, "hash=sha256", DIGEST, client.pkey_sign(signer, "hash=sha256", DIGEST)) is None
    with _refused(signer, "derive", "sign"):
        client.derive(signer, _peer_point())
    # A peer's key by serial lends its public half only, which public_key gives out anyway (PKCS#11 checks
    # CKA_DERIVE on the base key alone): a key bound to sign is a peer as any other.
    assert client.describe(client.derive(agreer, peer_key=signer)).type == "logon"
    assert client.describe(client.derive(agreer, _peer_point())).type == "logon"
    other = client.genkey("ec:p256", "ec-peer", "@s", use="derive")
    assert client.describe(client.derive(agreer, peer_key=other)).type == "logon"
    with _refused(agreer, "sign", "derive"):
        client.pkey_sign(agreer, "hash=sha256", DIGEST)
    with _refused(agreer, "sign", "derive"):
        client.pkey_verify(agreer, "hash=sha256", DIGEST, bytes(64))
    assert client.pkey_query(signer).supported_ops == OP_SIGN | OP_VERIFY
    assert client.pkey_query(agreer).supported_ops == 0
    with pytest.raises(E.EOPNOTSUPP, match="bound to derive only: use derive"):
        client.private_key(agreer)  # nothing a pyca private-key object could do with it


def test_x25519_and_ed25519_keys_bound_to_their_one_use(client):
    x_derive = client.genkey("x25519", "x-derive", "@s", use="derive")
    assert client.describe(client.derive(x_derive, _x25519_peer())).type == "logon"
    assert client.pkey_query(x_derive).supported_ops == 0
    ed_sign = client.genkey("ed25519", "ed-sign", "@s", use="sign")
    assert client.pkey_verify(ed_sign, "", b"m", client.pkey_sign(ed_sign, "", b"m")) is None
    with _refused(ed_sign, "derive", "sign"):
        client.derive(ed_sign, _x25519_peer())


def test_a_binding_names_only_uses_the_algorithm_has(client, tmp_path):
    """PKCS#11's CKR_TEMPLATE_INCONSISTENT: a key bound to a use its algorithm does not have would do nothing
    at all (or only what the caller did not ask for): EINVAL, and nothing is made, generated, loaded or
    imported."""
    before = client.read("@s")
    for spec, use, words in [("x25519", "sign", "x25519 keys cannot sign; they can derive"),
                             ("ed25519", "derive", "ed25519 keys cannot derive; they can sign"),
                             ("ed25519", "sign,decrypt", "ed25519 keys cannot decrypt; they can sign"),
                             ("rsa:2048", "derive", "rsa keys cannot derive; they can sign,decrypt"),
                             ("ec:p256", "decrypt", "ecdsa keys cannot decrypt; they can sign,derive")]:
        with pytest.raises(E.EINVAL, match=words):
            client.genkey(spec, "inconsistent", "@s", use=use)
    pki = Pki(str(tmp_path))
    leaf = pki.issue("inconsistent.test", kind="ec", issuer=pki.ca)
    with pytest.raises(E.EINVAL, match="ecdsa keys cannot decrypt"):
        client.add("asymmetric", "", leaf.cert_pem, "@s", use="decrypt")
    with pytest.raises(E.EINVAL, match="ecdsa keys cannot decrypt"):
        client.add("asymmetric", "", leaf.key_pem, "@s", use="sign,decrypt")
    known = os.urandom(32)
    wrap = client.add("logon", "backup:inconsistent", known, "@s")
    der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    blob = X.wrap_with_key(X.TREE.encode(([X.ENTRY.encode(("asymmetric", "a", READABLE, der, DECRYPT))], [])),
                           known)
    with pytest.raises(E.EINVAL, match="ecdsa keys cannot decrypt"):
        client.import_key(blob, wrap, "@s")
    client.unlink(wrap, "@s")
    assert client.read("@s") == before


def test_several_uses_allow_each_and_no_binding_allows_all(client):
    both = client.genkey("ec:p256", "ec-both", "@s", use=("sign", "derive"))
    client.pkey_sign(both, "hash=sha256", DIGEST)
    client.derive(both, _peer_point())
    assert _summary(client, both).endswith(" for sign,derive")
    rsa_both = client.genkey("rsa:2048", "rsa-both", "@s", use="decrypt, sign")  # any order, spaces allowed
    client.pkey_sign(rsa_both, "enc=pkcs1 hash=sha256", DIGEST)
    assert client.pkey_decrypt(rsa_both, OAEP, client.pkey_encrypt(rsa_both, OAEP, b"x")) == b"x"
    assert client.pkey_query(rsa_both).supported_ops == ALL_OPS
    with _refused(rsa_both, "derive", "sign,decrypt"):
        client.derive(rsa_both, _peer_point())
    unbound = client.genkey("rsa:2048", "rsa-unbound", "@s")
    client.pkey_sign(unbound, "enc=pkcs1 hash=sha256", DIGEST)
    assert client.pkey_decrypt(unbound, OAEP, client.pkey_encrypt(unbound, OAEP, b"y")) == b"y"
    assert client.pkey_query(unbound).supported_ops == ALL_OPS
    assert " for " not in _summary(client, unbound)
    ec_unbound = client.genkey("ec:p256", "ec-unbound", "@s")
    client.pkey_sign(ec_unbound, "hash=sha256", DIGEST)
    client.derive(ec_unbound, _peer_point())


def test_loaded_keys_and_certificates_are_bound_as_generated_ones(client, tmp_path):
    """A private key added from PEM, and a certificate (a public key: verify, encrypt) bound to one use."""
    pki = Pki(str(tmp_path))
    leaf = pki.issue("bound.test", kind="rsa", issuer=pki.ca)
    cert = client.add("asymmetric", "", leaf.cert_pem, "@s", use="sign")
    private = client.add("asymmetric", "", leaf.key_pem, "@s", use="decrypt", no_export=True)
    with _refused(private, "sign", "decrypt"):
        client.pkey_sign(private, "enc=pss hash=sha256", DIGEST)
    with _refused(cert, "decrypt", "sign"):
        client.pkey_encrypt(cert, OAEP, b"to the certificate")
    assert client.pkey_query(cert).supported_ops == OP_VERIFY
    ciphertext = leaf.cert.public_key().encrypt(b"for the key", OAEP_PADDING)
    assert client.pkey_decrypt(private, OAEP, ciphertext) == b"for the key"
    signature = leaf.key.sign(DIGEST, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert client.pkey_verify(cert, "enc=pkcs1 hash=sha256", DIGEST, signature) is None
    status = {k.serial: k for k in client.keys()}
    assert status[private].no_export and status[private].summary.endswith(" for decrypt")
    assert not status[cert].no_export and status[cert].summary.endswith(" for sign")


# ------------------------------------------------------------------ what cannot be bound


def test_uses_bind_asymmetric_keys_only_and_only_known_ones(client):
    """Asymmetric uses on a user, logon or keyring key, or on a symmetric genkey, are EINVAL, as are bits
    the wire does not know, an unknown name, and an empty list; nothing is made."""
    before = client.read("@s")
    with pytest.raises(E.EINVAL, match="user keys cannot be bound to sign"):
        client.add("user", "u", b"payload", "@s", use="sign")
    with pytest.raises(E.EINVAL, match="logon keys cannot be bound to decrypt"):
        client.add("logon", "app:l", os.urandom(32), "@s", use="decrypt")
    with pytest.raises(E.EINVAL, match="keyring keys cannot be bound to derive"):
        client.add("keyring", "r", b"", "@s", use="derive")
    with pytest.raises(E.EINVAL, match="logon keys cannot be bound to sign"):
        client.genkey("aes:256", "app:aes", "@s", use="sign")
    with pytest.raises(E.EINVAL, match="unknown key flags"):  # a wire bit no use has
        client._call(Op.GENKEY_FLAGS, "ed25519", "bits", -3, NO_EXPORT | 0x10)
    with pytest.raises(E.EINVAL, match="unknown use 'verify'"):
        client.genkey("ed25519", "e", "@s", use="sign,verify")
    with pytest.raises(E.EINVAL, match="name at least one use"):
        client.genkey("ed25519", "e", "@s", use=())
    for odd, kind in ((b"sign", "bytes"), (["sign", None], "NoneType"), (5, "int")):  # TypeError too, as Python's
        with pytest.raises(TypeError, match=f"use takes a name.*not {kind}$") as refused:
            client.genkey("ed25519", "e", "@s", use=odd)
        assert isinstance(refused.value, E.EINVAL)
    assert client.read("@s") == before


def test_the_store_refuses_a_cipher_use_on_an_asymmetric_key_and_an_asymmetric_use_on_others():
    """What no request can ask for today (no wire flag carries a cipher use): the store itself refuses it."""
    assert F.ASYMMETRIC_USE == {"sign": SIGN, "decrypt": DECRYPT, "derive": DERIVE}
    store = KeyStore()
    alice = Caller(Credentials(1000, 1000, frozenset({1000})))
    store.resolve(alice, SESSION, create=True)
    asymmetric = T.REGISTRY["asymmetric"]
    with pytest.raises(E.EINVAL, match="asymmetric keys cannot be bound to gcm\\(aes\\)"):
        store.create_internal(alice, asymmetric, "k", generate("ed25519"), 100, SESSION,
                              flags=FOR_USE["gcm(aes)"])
    with pytest.raises(E.EINVAL, match="user keys cannot be bound to sign"):
        store.add(alice, "user", "u", b"x", SESSION, flags=SIGN)
    serial = store.create_internal(alice, asymmetric, "k", generate("ed25519"), 100, SESSION,
                                   flags=SIGN)
    assert store.asymmetric(alice, serial, "sign") is not None
    with pytest.raises(E.EOPNOTSUPP, match=rf"key {serial} is bound to sign only, not derive"):
        store.asymmetric(alice, serial, "derive")


# ------------------------------------------------------------------ TLS


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_a_tls_identity_key_signs_the_handshake_so_it_must_be_free_to_sign(client, tmp_path, version):
    """TLS authenticates by signing (keyden offers no RSA key transport, TLS 1.2's ECDHE-RSA suites sign):
    an identity key bound to sign serves; one bound to decrypt is refused before the handshake.  A private
    key in the keyring that no certificate names is not used, whatever it is bound to."""
    pki = Pki(str(tmp_path))
    leaf = pki.issue("rsa.bound.test", dns=("rsa.bound.test",), kind="rsa", issuer=pki.ca)
    signing = client.newring("tls-signing")
    client.add("asymmetric", "", leaf.cert_pem, signing)
    client.add("asymmetric", "", leaf.key_pem, signing, use="sign")
    client.genkey("x25519", "unrelated", signing, use="derive")
    app = App(client, keyring=signing)
    try:
        app.serve()
        session, reply = python_peer(app.port, "rsa.bound.test", pki.ca, version=version)
        info = app.outcome()
    finally:
        app.close()
    assert reply == b"echo: hello\n" and info.version == f"TLSv{version}"
    if version == "1.2":
        assert session["cipher"].startswith(("ECDHE-RSA-", "DHE-RSA-"))
    decrypting = client.newring("tls-decrypting")
    client.add("asymmetric", "", leaf.cert_pem, decrypting)
    key = client.add("asymmetric", "", leaf.key_pem, decrypting, use="decrypt")
    for start in (lambda sock: client.tls_accept(sock, decrypting),
                  lambda sock: client.tls_connect(sock, "rsa.bound.test", trust=signing, identity=decrypting)):
        ours, theirs = socket.socketpair()
        with ours, theirs, _refused(key, "sign", "decrypt"):
            start(ours)


def test_a_key_transport_identity_beside_a_servers_own_does_not_stop_the_server(client, tmp_path):
    """A certificate whose key is bound to decrypt (key transport) filed in the same keyring as the server's
    identity is no identity: the server still serves, and only when no identity may sign is it refused."""
    pki = Pki(str(tmp_path))
    transport = pki.issue("transport.mixed.test", dns=("transport.mixed.test",), kind="rsa", issuer=pki.ca)
    server = pki.issue("ec.mixed.test", dns=("ec.mixed.test",), issuer=pki.ca)
    mixed = client.newring("tls-mixed")
    client.add("asymmetric", "", transport.cert_pem, mixed)
    client.add("asymmetric", "", transport.key_pem, mixed, use="decrypt")
    client.add("asymmetric", "", server.cert_pem, mixed)
    client.add("asymmetric", "", server.key_pem, mixed, use="sign")
    app = App(client, keyring=mixed)
    try:
        app.serve()
        _session, reply = python_peer(app.port, "ec.mixed.test", pki.ca)
        assert reply == b"echo: hello\n"
    finally:
        app.close()


def test_the_same_key_loaded_twice_serves_whichever_copy_may_sign(client, tmp_path):
    """One key pair loaded twice, bound differently: the copy free to sign makes the identity, in either
    order of loading (pairing used to keep only the last private key of each key id)."""
    pki = Pki(str(tmp_path))
    server = pki.issue("twice.test", dns=("twice.test",), issuer=pki.ca)
    for first, second in (("sign", "derive"), ("derive", "sign")):
        ring = client.newring(f"tls-twice-{first}")
        client.add("asymmetric", "", server.cert_pem, ring)
        client.add("asymmetric", f"{first} copy", server.key_pem, ring, use=first)
        client.add("asymmetric", f"{second} copy", server.key_pem, ring, use=second)
        app = App(client, keyring=ring)
        try:
            app.serve()
            _session, reply = python_peer(app.port, "twice.test", pki.ca)
            assert reply == b"echo: hello\n", (first, second)
        finally:
            app.close()


def test_the_tls_contexts_offer_no_rsa_key_transport_whatever_pythons_defaults(monkeypatch):
    """An RSA identity key must never decrypt a client's premaster secret, a decrypt use of a key bound to
    sign: keyden sets its own cipher list rather than take what this Python was built with (here, as a
    CPython built --with-ssl-default-suites=openssl makes its contexts: RSA key transport offered)."""
    made = ssl.SSLContext.__new__

    def openssl_defaults(cls, protocol=None, *args, **kwargs):
        ctx = made(cls, protocol, *args, **kwargs)
        ctx.set_ciphers("DEFAULT")
        return ctx
    monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(openssl_defaults))
    assert "kx-rsa" in {c["kea"] for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()}
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        offered = {c["kea"] for c in contexts._base(protocol, 0, ()).get_ciphers()}
        assert offered == {"kx-any", "kx-ecdhe", "kx-dhe"}, offered  # TLS 1.3's, and (EC)DHE's


def test_the_tls_contexts_keep_the_systems_choice_of_suites_but_rsa_key_transport(monkeypatch):
    """A system policy's cipher list (crypto-policies: its own order and suites) stands, narrowed to (EC)DHE
    suites authenticated by a certificate, with encryption; one with none left turns TLS 1.2 off rather than
    offer RSA key transport; one of "ALL" offers no anonymous or null suite."""
    made = ssl.SSLContext.__new__
    policy = ["AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:DHE-RSA-AES256-GCM-SHA384"]

    def system_policy(cls, protocol=None, *args, **kwargs):
        ctx = made(cls, protocol, *args, **kwargs)
        ctx.set_ciphers(policy[0])
        return ctx
    monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(system_policy))
    ctx = contexts._base(ssl.PROTOCOL_TLS_SERVER, 0, ())
    assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"] == [
        "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "DHE-RSA-AES256-GCM-SHA384"]
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    policy[0] = "AES128-GCM-SHA256:AES256-GCM-SHA384"  # RSA key transport only
    ctx = contexts._base(ssl.PROTOCOL_TLS_SERVER, 0, ())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    policy[0] = "ALL:eNULL:@SECLEVEL=0"  # anonymous (aNULL) and unencrypted (eNULL) suites too
    for protocol in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        kept = [c for c in contexts._base(protocol, 0, ()).get_ciphers() if c["protocol"] != "TLSv1.3"]
        assert kept and {(c["kea"], c["auth"]) for c in kept} <= {
            ("kx-ecdhe", "auth-rsa"), ("kx-ecdhe", "auth-ecdsa"), ("kx-dhe", "auth-rsa")}, kept
        assert all(c["symmetric"] for c in kept)


# ------------------------------------------------------------------ exports and restarts


def test_an_export_carries_the_binding_and_the_copy_does_only_what_the_original_did(client):
    wrap = client.genkey("aes:256", "backup:asym", "@s")
    top = client.newring("asym-bundle", "@s")
    signer = client.genkey("rsa:2048", "bundle-signer", top, use="sign")
    agreer = client.genkey("ec:p256", "bundle-agreer", top, use=("sign", "derive"))
    free = client.genkey("ed25519", "bundle-free", top)
    for serial in (top, signer, agreer, free):
        client.setperm(serial, READABLE)
    blob = client.export(top, wrapping_key=wrap)
    restored = client.import_key(blob, wrap, client.newring("asym-restored", "@s"))
    copies = {client.describe(s).description: s for s in client.read(restored)}
    assert _summary(client, copies["bundle-signer"]).endswith(" for sign")
    with _refused(copies["bundle-signer"], "decrypt", "sign"):
        client.pkey_encrypt(copies["bundle-signer"], OAEP, b"x")
    client.pkey_sign(copies["bundle-signer"], "enc=pkcs1 hash=sha256", DIGEST)
    assert _summary(client, copies["bundle-agreer"]).endswith(" for sign,derive")
    client.derive(copies["bundle-agreer"], _peer_point())
    assert " for " not in _summary(client, copies["bundle-free"])


def test_a_key_an_export_is_wrapped_to_or_opened_with_is_used_to_decrypt_rsa_or_to_derive(client):
    """Wrapping to or opening with an RSA key is key transport (decrypt); opening with an EC or X25519 key,
    key agreement (derive), while wrapping to one uses its public half only."""
    secret = client.add("user", "to-move", b"moved", "@s")
    client.setperm(secret, READABLE)
    rsa_transport = client.genkey("rsa:2048", "rsa-transport", "@s", use="decrypt")
    rsa_signer = client.genkey("rsa:2048", "rsa-signer", "@s", use="sign")
    x_agree = client.genkey("x25519", "x-agree", "@s", use="derive")
    ec_signer = client.genkey("ec:p256", "ec-signer", "@s", use="sign")
    dest = client.newring("transported", "@s")
    for recipient in (rsa_transport, x_agree):
        copy = client.import_key(client.export(secret, to_public_key=recipient), recipient, dest)
        assert client.read(copy) == b"moved"
        client.unlink(copy, dest)
    with _refused(rsa_signer, "decrypt", "sign"):
        client.export(secret, to_public_key=rsa_signer)
    # Wrapping to an EC key agrees an ephemeral key with its public half only (as derive's peer): no use.
    blob = client.export(secret, to_public_key=ec_signer)
    with _refused(ec_signer, "derive", "sign"):  # opening it is the private half's agreement: derive
        client.import_key(blob, ec_signer, dest)
    # Sealed to their public halves from outside, the blobs still do not open with them.
    for holder, use in ((rsa_signer, "decrypt"), (ec_signer, "derive")):
        blob = client.export(secret, to_public_key=client.public_key_bytes(holder)[0])
        with _refused(holder, use, "sign"):
            client.import_key(blob, holder, dest)
    # A key that can wrap nothing is EINVAL, bound or not: not a refusal of a use it never had.
    for ed in (client.genkey("ed25519", "ed-bound", "@s", use="sign"), client.genkey("ed25519", "ed-free", "@s")):
        with pytest.raises(E.EINVAL, match="exports go to an X25519, EC P-256/P-384 or RSA public key"):
            client.export(secret, to_public_key=ed)


def test_key_transport_checks_the_info_strings_grammar_before_the_keys_binding(client):
    """As every KEYCTL_PKEY_* op: a malformed info string is EINVAL whatever the key."""
    signer = client.genkey("rsa:2048", "grammar-signer", "@s", use="sign")
    for call in (lambda: client.pkey_decrypt(signer, "enc=oaep junk==", bytes(256)),
                 lambda: client.pkey_decrypt_into(signer, "enc=oaep junk==", bytes(256), "app:k", "@s")):
        with pytest.raises(E.EINVAL, match="junk"):
            call()


def test_genkey_refuses_an_impossible_binding_before_making_the_key(monkeypatch):
    """An RSA-4096 key takes a second to make: a binding its algorithm cannot have is refused first."""
    from keyden.protocol import KEY_USES
    from keyden.server.handlers import pkey

    def made(spec):
        raise AssertionError(f"{spec} was generated before its binding was checked")
    monkeypatch.setattr(pkey.asymmetric, "generate", made)
    with pytest.raises(E.EINVAL, match="rsa keys cannot derive"):
        pkey._genkey(None, "rsa:4096", "x", 0, KEY_USES["derive"])


def test_a_crafted_blob_binding_a_key_wrongly_is_refused_whole(client):
    """Asymmetric uses travel only on asymmetric entries, and cipher uses only on keys that key ciphers;
    anything else (NO_EXPORT, a bit nobody knows) is EBADMSG, and the import makes nothing."""
    known = os.urandom(32)
    wrap = client.add("logon", "backup:crafted", known, "@s")
    dest = client.newring("crafted-imports", "@s")
    der = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    def sealed(*entries, links=()):
        return X.wrap_with_key(X.TREE.encode(([X.ENTRY.encode(e) for e in entries], list(links))), known)

    bound = client.import_key(sealed(("asymmetric", "crafted", READABLE, der, SIGN | DERIVE)), wrap, dest)
    assert _summary(client, bound).endswith(" for sign,derive")
    client.unlink(bound, dest)
    refused = [
        (("asymmetric", "a", READABLE, der, FOR_USE["gcm(aes)"]), "keys no cipher"),
        (("asymmetric", "a", READABLE, der, SIGN | FOR_USE["hmac"]), "keys no cipher"),
        (("asymmetric", "a", READABLE, der, SIGN | 0x1), "does not know"),  # NO_EXPORT: the import's own option
        (("asymmetric", "a", READABLE, der, 0x4000), "does not know"),
        (("user", "u", READABLE, b"bytes", SIGN), "not asymmetric"),
        (("logon", "app:l", READABLE, known, DERIVE), "not asymmetric"),
        (("logon", "app:l", READABLE, known, FOR_USE["gcm(aes)"] | SIGN), "not asymmetric"),
    ]
    for entry, words in refused:
        with pytest.raises(E.EBADMSG, match=words):
            client.import_key(sealed(entry), wrap, dest)
    with pytest.raises(E.EBADMSG, match="not asymmetric"):  # deep in a tree, after keys that are fine
        client.import_key(sealed(("keyring", "r", READABLE, b"", 0), ("asymmetric", "a", READABLE, der, SIGN),
                                 ("keyring", "inner", READABLE, b"", DERIVE), links=(0, 1, 0, 2)), wrap, dest)
    with pytest.raises(E.EINVAL, match="an import takes no uses"):  # the import's flags bind nothing
        client._call(Op.IMPORT, sealed(("asymmetric", "a", READABLE, der, 0)), wrap, dest, 0x2)
    assert client.read(dest) == []


def test_a_persistent_keys_binding_survives_a_restart(fresh_daemon):
    d = fresh_daemon()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    with d.connect(session=token) as c:
        ring = c.get_persistent("@s")
        signer = c.genkey("rsa:2048", "persistent-signer", ring, use="sign")
        agreer = c.genkey("x25519", "persistent-agreer", ring, use="derive", no_export=True)
    d.stop(signal.SIGKILL)
    d.start()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    with d.connect(session=token) as c:
        c.get_persistent("@s")
        c.pkey_sign(signer, "enc=pkcs1 hash=sha256", DIGEST)
        with _refused(signer, "decrypt", "sign"):
            c.pkey_decrypt(signer, OAEP, bytes(256))
        assert c.pkey_query(signer).supported_ops == OP_SIGN | OP_VERIFY
        c.derive(agreer, _x25519_peer())
        status = {k.serial: k for k in c.keys()}
        assert status[agreer].summary.endswith(" for derive") and status[agreer].no_export
        assert status[signer].summary.endswith(" for sign")


# ------------------------------------------------------------------ the command line and asyncio


def test_cli_use_on_genkey_and_padd_shown_by_keys(daemon, client, tmp_path):
    token = client.session_token
    made = _cli(daemon, token, "genkey", "--use", "sign,derive", "ec:p256", "cli-both", "@s")
    assert made.returncode == 0, made.stderr
    both = int(made.stdout)
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    added = _cli(daemon, token, "padd", "--use=derive", "--no-export", "asymmetric", "cli-agree", "@s", stdin=pem)
    assert added.returncode == 0, added.stderr
    agree = int(added.stdout)
    keys = _cli(daemon, token, "keys").stdout.decode()
    assert re.search(rf"^{both:08x} .* cli-both: PKCS8\.ecdsa-nist-p256 \[\] for sign,derive$", keys, re.M), keys
    assert re.search(rf"^{agree:08x} .* cli-agree: PKCS8\.ecdsa-nist-p256 \[\] for derive$", keys, re.M), keys
    digest = tmp_path / "digest"
    digest.write_bytes(DIGEST)
    refused = _cli(daemon, token, "pkey_sign", str(agree), "0", str(digest), "hash=sha256")
    assert (refused.returncode, refused.stderr) == (1, b"keyctl_pkey_sign: Operation not supported\n")
    query = _cli(daemon, token, "pkey_query", str(agree), "0").stdout.decode()
    assert "sign=n" in query and "verify=n" in query
    assert _cli(daemon, token, "pkey_sign", str(both), "0", str(digest), "hash=sha256").returncode == 0
    for words in (("genkey", "--use", "verify", "ed25519", "@s"), ("genkey", "--use", "", "ed25519", "@s"),
                  ("add", "--use", "sign,bogus", "asymmetric", "x", "data", "@s")):
        bad = _cli(daemon, token, *words)
        assert bad.returncode == 2, bad
        first, _, usage = bad.stderr.decode().partition("\n")
        assert first.startswith("keyden: ") and ("unknown use" in first or "at least one use" in first), first
        assert usage.startswith("Format:\n") and "--use <uses>" in usage
    user = _cli(daemon, token, "add", "--use", "sign", "user", "cli-user", "x", "@s")
    assert (user.returncode, user.stderr) == (1, b"add_key: Invalid argument\n")


def test_the_asyncio_client_binds_as_the_blocking_one(daemon, client):
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    async def scenario():
        async with await aio.connect(daemon.socket, session=client.session_token) as c:
            signer = await c.generate("ed25519", "aio-signer", use="sign")
            loaded = await c.add("asymmetric", "aio-loaded", pem, use=["derive"])
            return signer, loaded, [(await c.pkey_query(k)).supported_ops for k in (signer, loaded)]
    signer, loaded, ops = asyncio.run(scenario())
    assert ops == [OP_SIGN | OP_VERIFY, 0]
    with _refused(loaded, "sign", "derive"):
        client.pkey_sign(loaded, "hash=sha256", DIGEST)


def test_a_binding_changes_nothing_in_certificate_path_validation(client):
    """Trust keyrings and restrictions only check signatures with public keys: certificates bound to
    derive still anchor a path and vouch for what they signed (their own pkey_verify is refused)."""
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = trust_pki.certificate("Bound Root", root_key, ca=True)
    leaf = trust_pki.certificate("bound leaf", leaf_key, ("Bound Root", root_key), san=("leaf.example",))
    trust = client.newring("bound-trust")
    anchor = client.add("asymmetric", "", trust_pki.pem(root), trust, use="derive")
    vouched = client.newring("vouched")
    client.restrict_keyring(vouched, "asymmetric", f"key_or_keyring:{anchor}")
    cert = client.add("asymmetric", "", trust_pki.pem(leaf), vouched, use="derive")
    assert [serial for serial, _ in client.x509_verify(cert, trust, host="leaf.example")] == [cert, anchor]
    with _refused(anchor, "sign", "derive"):
        client.pkey_verify(anchor, "hash=sha256", DIGEST, bytes(64))
