"""Trust keyrings, the blacklist and X.509 path validation, over a real daemon.

Certificates are made here with pyca: a root CA, an intermediate, leaves
for servers and clients, and deliberately bad ones (forged signature,
expired, not yet valid, wrong purpose).  Restriction semantics follow the
kernel's crypto/asymmetric_keys/restrict.c; the system keyrings and the
blacklist, certs/system_keyring.c and certs/blacklist.c.

Most tests use the shared daemon in the test's own session keyring.  The
system keyrings are tested on a daemon of this module's own, whose CA bundle
and blacklist file are written here, so nothing depends on the host's CAs.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import math
import os
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import keyden
from keyden import errors as E
from keyden.crypto import x509 as X
from tests.conftest import REPO, Daemon
from tests.test_asymmetric_unit import glued

try:
    from tests.users import run_as, temporary_users
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from users import run_as, temporary_users

NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)
SERVER, CLIENT = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


# ------------------------------------------------------------------ a small PKI


def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def certificate(cn: str, key, issuer: tuple[str, object] | None = None, *, ca: bool = False, eku=None,
                san: tuple = (), not_before=None, not_after=None, signer=None,
                akid: bool = True, emails: tuple[str, ...] = (), constraints: x509.NameConstraints | None = None,
                subject: x509.Name | None = None, issuer_subject: x509.Name | None = None) -> x509.Certificate:
    """A certificate for ``key``, issued by (issuer name, issuer key), else self-signed.

    ``signer`` signs instead of the issuer's key while the names and the
    authority key identifier still point at the issuer: a forgery.  ``akid=False``: no authority key
    identifier, only the issuer's name.  ``san``: DNS names, or general names of any kind; ``emails``:
    emailAddress attributes in the subject, after its common name; ``subject``, ``issuer_subject``: whole
    names instead of the common names'.
    """
    issuer_cn, issuer_key = issuer or (cn, key)
    subject = subject or x509.Name([*name(cn), *(x509.NameAttribute(NameOID.EMAIL_ADDRESS, e) for e in emails)])
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_subject or name(issuer_cn))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before or NOW - 365 * DAY).not_valid_after(not_after or NOW + 365 * DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                      crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if akid:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) if isinstance(s, str) else s
                                                          for s in san]), critical=False)
    if constraints is not None:
        b = b.add_extension(constraints, critical=True)
    signing_key = signer or issuer_key
    return b.sign(signing_key, None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def spki(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def tbs(cert: x509.Certificate) -> str:
    return "tbs:" + hashlib.sha256(cert.tbs_certificate_bytes).hexdigest()


def bin_(blob: bytes) -> str:
    return "bin:" + hashlib.sha256(blob).hexdigest()


@pytest.fixture(scope="module")
def pki():
    root_key, inter_key, leaf_key, evil_key = ec_key(), ec_key(), ec_key(), ec_key()
    root = certificate("Test Root", root_key, ca=True)
    inter_issuer = ("Test Intermediate", inter_key)
    return SimpleNamespace(
        root_key=root_key, root=root, inter_key=inter_key, leaf_key=leaf_key, evil_key=evil_key,
        inter=certificate("Test Intermediate", inter_key, ("Test Root", root_key), ca=True),
        server=certificate("server", leaf_key, inter_issuer, eku=[SERVER], san=("example.com",),
                           not_before=NOW - DAY, not_after=NOW + 30 * DAY),
        client=certificate("client", leaf_key, inter_issuer, eku=[CLIENT], san=("client.example",)),
        expired=certificate("expired", leaf_key, inter_issuer, eku=[SERVER], san=("example.com",),
                            not_before=NOW - 10 * DAY, not_after=NOW - DAY),
        future=certificate("future", leaf_key, inter_issuer, eku=[SERVER], san=("example.com",),
                           not_before=NOW + DAY, not_after=NOW + 10 * DAY),
        forged=certificate("forged", leaf_key, inter_issuer, eku=[SERVER], san=("example.com",), signer=evil_key),
        stranger=certificate("Stranger", evil_key, ca=True),
    )


def add_cert(client, cert, keyring="@s") -> int:
    return client.add("asymmetric", "", pem(cert), keyring)


def refused(call) -> type:
    with pytest.raises(E.KeydenError) as info:
        call()
    return type(info.value)


# ------------------------------------------------------------- signatures (pure)


def test_signed_by_checks_each_signature_scheme_with_the_certificates_own_parameters():
    rsa_key = rsa.generate_private_key(65537, 2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    ec_ca, other = ec_key(), ec_key()
    base = (x509.CertificateBuilder().subject_name(name("s")).issuer_name(name("i"))
            .public_key(other.public_key()).serial_number(1).not_valid_before(NOW - DAY).not_valid_after(NOW + DAY))
    pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
    signed = {
        "rsa-pkcs1": (base.sign(rsa_key, hashes.SHA256()), rsa_key),
        "rsa-pss": (base.sign(rsa_key, hashes.SHA256(), rsa_padding=pss), rsa_key),
        "ecdsa": (base.sign(ec_ca, hashes.SHA384()), ec_ca),
        "ed25519": (base.sign(ed_key, None), ed_key),
    }
    for label, (cert, key) in signed.items():
        assert X.signed_by(cert, key.public_key()), label
        assert not X.signed_by(cert, other.public_key()), label
    assert not X.signed_by(signed["ecdsa"][0], rsa_key.public_key())  # wrong algorithm is "no", not an error
    assert not X.signed_by(signed["rsa-pkcs1"][0], ed_key.public_key())


def test_signed_by_never_checks_with_an_rsa_exponent_over_256_bits():
    """Such checks take milliseconds each (8 ms at 3000 bits), run with the key store held: one user's
    restriction full of them stalled every keyring operation of every user for seconds."""
    twin = rsa.generate_private_key(65537, 2048)
    p, q = twin.private_numbers().p, twin.private_numbers().q
    phi = (p - 1) * (q - 1)
    e = (1 << 300) + 1
    while math.gcd(e, phi) != 1:
        e += 2
    d = pow(e, -1, phi)
    huge = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()
    cert = certificate("s", ec_key(), ("i", huge))
    huge.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256())
    assert not X.signed_by(cert, huge.public_key())
    assert X.signed_by(certificate("s", ec_key(), ("i", twin)), twin.public_key())


def test_a_keyring_of_decoys_claiming_one_issuer_is_refused_before_any_signature_is_checked(client):
    """Every key whose ID the certificate names cost a signature check, under the store lock: 178 decoys
    sharing one subject key ID made each refused add take 1.5 s, and everyone else waited."""
    decoy_id = b"\x42" * 20
    trusted = client.newring("decoys", "@s")
    for i in range(X.MAX_SIGNER_CANDIDATES + 1):
        key = ec_key()
        cert = (x509.CertificateBuilder().subject_name(name(f"decoy {i}")).issuer_name(name(f"decoy {i}"))
                .public_key(key.public_key()).serial_number(i + 1).not_valid_before(NOW - DAY)
                .not_valid_after(NOW + DAY).add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .add_extension(x509.SubjectKeyIdentifier(decoy_id), critical=False).sign(key, hashes.SHA256()))
        add_cert(client, cert, trusted)
    ring = client.newring("restricted-by-decoys", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{trusted}")
    signer = ec_key()
    claimed = (x509.CertificateBuilder().subject_name(name("leaf")).issuer_name(name("decoy 0"))
               .public_key(ec_key().public_key()).serial_number(99).not_valid_before(NOW - DAY)
               .not_valid_after(NOW + DAY)
               .add_extension(x509.AuthorityKeyIdentifier(decoy_id, None, None), critical=False)
               .sign(signer, hashes.SHA256()))
    with pytest.raises(E.EKEYREJECTED, match=f"{X.MAX_SIGNER_CANDIDATES + 1} trusted keys claim to be"):
        add_cert(client, claimed, ring)


def test_copies_of_one_trusted_key_are_one_candidate(client, pki):
    """What costs a signature check is a distinct public key: a CA renewed nine times with the same key is
    one candidate, and its certificates are admitted."""
    trusted = client.newring("copies", "@s")
    add_cert(client, pki.root, trusted)
    for i in range(X.MAX_SIGNER_CANDIDATES):  # the same key, new certificates (each a key of its own here)
        add_cert(client, certificate("Test Root", pki.root_key, ca=True), client.newring(f"renewal {i}", trusted))
    ring = client.newring("restricted-by-copies", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{trusted}")
    inter = add_cert(client, pki.inter, ring)
    assert client.read(ring) == [inter]


# ------------------------------------------------------------------ restrictions


def test_key_or_keyring_admits_only_what_a_trusted_key_signed(client, pki):
    trusted = client.newring("trusted", "@s")
    add_cert(client, pki.root, trusted)
    ring = client.newring("restricted", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{trusted}")

    inter = add_cert(client, pki.inter, ring)  # the root signed it
    assert client.read(ring) == [inter]
    assert refused(lambda: add_cert(client, pki.server, ring)) is E.ENOKEY  # its issuer is not trusted
    assert refused(lambda: add_cert(client, pki.stranger, ring)) is E.ENOKEY  # self-signed, unknown
    assert refused(lambda: client.add("asymmetric", "", spki(pki.leaf_key), ring)) is E.ENOKEY  # bare key
    assert refused(lambda: client.add("user", "u", b"x", ring)) is E.EOPNOTSUPP
    assert refused(lambda: client.newring("sub", ring)) is E.EOPNOTSUPP
    forged_inter = certificate("Test Intermediate", pki.inter_key, ("Test Root", pki.root_key), ca=True,
                               signer=pki.evil_key)
    assert refused(lambda: add_cert(client, forged_inter, ring)) is E.EKEYREJECTED  # names the root, root did not sign

    # Links and moves are admitted by the same rule as adds.
    leaf = add_cert(client, pki.server)
    assert refused(lambda: client.link(leaf, ring)) is E.ENOKEY
    assert refused(lambda: client.move(leaf, "@s", ring)) is E.ENOKEY
    assert client.read(ring) == [inter]

    assert refused(lambda: client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{trusted}")) is E.EEXIST


def test_a_single_trusted_key_and_chain_mode_building_up(client, pki):
    root = add_cert(client, pki.root)
    ring = client.newring("chain", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{root}:chain")
    assert refused(lambda: add_cert(client, pki.server, ring)) is E.ENOKEY  # nothing vouches for it yet
    inter = add_cert(client, pki.inter, ring)  # the trusted key signed it
    leaf = add_cert(client, pki.server, ring)  # :chain: the intermediate now in the ring signed it
    assert sorted(client.read(ring)) == sorted([inter, leaf])
    assert refused(lambda: add_cert(client, pki.forged, ring)) is E.EKEYREJECTED

    plain = client.newring("plain", "@s")
    client.restrict_keyring(plain, "asymmetric", f"key_or_keyring:{root}")
    client.link(inter, plain)
    assert refused(lambda: client.link(leaf, plain)) is E.ENOKEY  # without :chain the ring vouches for nothing

    own_only = client.newring("own only", "@s")
    client.restrict_keyring(own_only, "asymmetric", "key_or_keyring:0:chain")
    assert refused(lambda: client.link(inter, own_only)) is E.ENOKEY


def test_an_anchor_unlinked_everywhere_still_vouches_until_its_restricted_keyring_dies(client, pki):
    """The restriction holds what it trusts, as the kernel's key_restriction holds a reference: unlinking
    the anchor (a key or a keyring) from every keyring neither destroys it nor closes the keyring."""
    root = add_cert(client, pki.root)
    ring = client.newring("by key", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{root}")
    trusted = client.newring("trusted", "@s")
    add_cert(client, pki.root, trusted)
    by_ring = client.newring("by keyring", "@s")
    client.restrict_keyring(by_ring, "asymmetric", f"key_or_keyring:{trusted}")
    client.unlink(root, "@s")
    client.unlink(trusted, "@s")

    assert client.describe(root).type == "asymmetric"  # alive: the restriction holds it
    inter = add_cert(client, pki.inter, ring)
    assert client.read(ring) == [inter]
    inter = add_cert(client, pki.inter, by_ring)
    assert client.read(by_ring) == [inter]
    assert refused(lambda: add_cert(client, pki.stranger, ring)) is E.ENOKEY

    client.unlink(ring, "@s")  # the restricted keyring dies, and with it the only hold on its anchor
    assert refused(lambda: client.describe(root)) is E.ENOKEY
    client.unlink(by_ring, "@s")
    assert refused(lambda: client.describe(trusted)) is E.ENOKEY


@pytest.fixture
def held(pki):
    """An in-process store with a clock, alice in a session of her own, and the PKI's certificates as DER."""
    from keyden.core import trust
    from keyden.core.perm import Credentials
    from keyden.core.store import RESTRICTION_FACTORIES, SESSION, Caller, KeyStore, StoreConfig

    assert RESTRICTION_FACTORIES["asymmetric"] is trust.asymmetric_restriction  # importing trust registers it
    now = [1_000_000.0]
    store = KeyStore(StoreConfig(gc_delay=300.0), clock=lambda: now[0])

    def session(uid: int):
        cred = Credentials(uid, uid, frozenset({uid}))
        _, token = store.join_session(Caller(cred))
        return Caller(cred, process=(uid, 1), session_token=token), token

    alice, token = session(1000)
    der = {name: getattr(pki, name).public_bytes(serialization.Encoding.DER)
           for name in ("root", "inter", "stranger")}

    def restricted(name: str, anchor: int, caller=alice) -> int:
        ring = store.add(caller, "keyring", name, b"", SESSION)
        store.restrict_keyring(caller, ring, "asymmetric", f"key_or_keyring:{anchor}")
        return ring

    def later(seconds: float) -> None:
        now[0] += seconds

    return SimpleNamespace(store=store, alice=alice, token=token, session=session, der=der, S=SESSION,
                           restricted=restricted, later=later)


def test_an_anchor_stays_charged_while_held(held):
    store, alice, S = held.store, held.alice, held.S
    root = store.add(alice, "asymmetric", "root", held.der["root"], S)
    ring = held.restricted("r", root)
    charged = store.quota_usage(1000)[:2]
    store.unlink(alice, root, S)
    assert store.quota_usage(1000)[:2] == (charged[0], charged[1] - 4)  # only the link's 4 bytes come back
    store.unlink(alice, ring, S)
    assert store.quota_usage(1000)[0] == charged[0] - 2  # the ring and its anchor


@pytest.mark.parametrize("end, error", [("revoke", E.EKEYREVOKED), ("set_timeout", E.EKEYEXPIRED),
                                        ("invalidate", E.ENOKEY)])
def test_a_dead_trusted_key_refuses_what_it_issued_with_its_state_and_the_rest_as_unknown(held, end, error):
    """As the kernel's restrict_link_by_key_or_keyring: key_validate only on a signer found; before the
    garbage collector has been past and after.  A dead trusted keyring vouches for nothing: ENOKEY."""
    store, alice, S = held.store, held.alice, held.S
    anchor = store.add(alice, "asymmetric", "root", held.der["root"], S)
    ring = held.restricted("by key", anchor)
    trusted = store.add(alice, "keyring", "trusted", b"", S)
    store.add(alice, "asymmetric", "root", held.der["root"], trusted)
    by_ring = held.restricted("by keyring", trusted)
    for target in (anchor, trusted):
        getattr(store, end)(alice, target, *((1,) if end == "set_timeout" else ()))
    held.later(2)
    for collected in (False, True):
        if collected:
            held.later(400)
            store.collect()
        with pytest.raises(error):
            store.add(alice, "asymmetric", "inter", held.der["inter"], ring)
        for stranger_into in (ring, by_ring):
            with pytest.raises(E.ENOKEY, match="no trusted key is the certificate's issuer"):
                store.add(alice, "asymmetric", "stranger", held.der["stranger"], stranger_into)
        with pytest.raises(E.ENOKEY, match="no trusted key is the certificate's issuer"):
            store.add(alice, "asymmetric", "inter", held.der["inter"], by_ring)


def test_a_restriction_may_not_hold_what_holds_it(held):
    """A restriction holds its anchor; an anchor that held the restricted keyring (at any depth, through
    links or other restrictions) would make a loop of holds nothing could ever free: a whole session,
    secrets included, alive and charged until the daemon stopped.  Refused both ways: EDEADLK."""
    store, alice, S = held.store, held.alice, held.S
    session = store.resolve(alice, S)
    ring = store.add(alice, "keyring", "r", b"", S)
    store.add(alice, "user", "secret", b"x" * 100, ring)
    with pytest.raises(E.EDEADLK):
        store.restrict_keyring(alice, ring, "asymmetric", f"key_or_keyring:{session}")
    outer = store.add(alice, "keyring", "outer", b"", S)
    inner = store.add(alice, "keyring", "inner", b"", outer)
    held.restricted("chained", outer)  # trusts outer, and is linked beside it: no loop
    with pytest.raises(E.EDEADLK):
        store.restrict_keyring(alice, inner, "asymmetric", f"key_or_keyring:{outer}")
    loose = held.restricted("loose", outer)
    with pytest.raises(E.EDEADLK):
        store.link(alice, loose, inner)  # below its own anchor
    second = held.restricted("second", loose)  # restriction upon restriction: second -> loose -> outer
    with pytest.raises(E.EDEADLK):
        store.link(alice, second, outer)
    store.leave_session(alice, held.token)
    store.collect()
    assert store.quota_usage(1000)[:2] == (0, 0)  # nothing held for good


def test_a_restriction_holds_only_a_key_its_maker_may_find(held):
    """The kernel's key_lookup asks no permission, but a restriction keeps its anchor alive, charged to
    its owner: another uid could otherwise keep a key alive that its owner had unlinked and could no longer
    revoke."""
    store, alice, S = held.store, held.alice, held.S
    secret = store.add(alice, "user", "alice secret", b"x" * 1000, S)
    bob, _ = held.session(1001)
    with pytest.raises(E.EACCES):
        held.restricted("bob's", secret, caller=bob)


def test_asymmetric_keys_are_found_by_their_key_ids(client, pki):
    """'id:<hex>' matches the end of any of a key's IDs, 'ex:<hex>' one whole (asymmetric_key_match): the
    SHA-1 of its SubjectPublicKeyInfo, its Subject Key Identifier, its serial and issuer."""
    ring = client.newring("by-id", "@s")
    serial = add_cert(client, pki.inter, ring)
    skid = pki.inter.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.key_identifier.hex()
    assert client.search(ring, "asymmetric", f"id:{skid[-8:]}") == serial
    assert client.search(ring, "asymmetric", f"id:{skid[-8:].upper()}") == serial
    assert client.search(ring, "asymmetric", f"ex:{skid}") == serial
    assert client.find("asymmetric", f"id:{skid[-8:]}") == serial
    assert client.search(ring, "asymmetric", f"ex:{skid}", "@s") == serial and serial in client.read("@s")
    for miss in (f"ex:{skid[-8:]}", f"id:{skid[:8]}00"):  # ex: is whole; id: is a tail
        assert refused(lambda: client.search(ring, "asymmetric", miss)) is E.ENOKEY
    for bad in ("id:", "id:abc", "id:zz", "ex:", f"id:{skid[-8:]}  ", f"ex:{skid[:2]} {skid[2:]}"):
        assert refused(lambda: client.search(ring, "asymmetric", bad)) is E.EINVAL  # (spaces: as hex2bin)


def test_restriction_strings_and_cycles(client):
    ring = client.newring("r", "@s")
    for text, error in (("key_or_keyring", E.EINVAL), ("key_or_keyring:", E.EINVAL),
                        ("key_or_keyring:12x", E.EINVAL), ("key_or_keyring:5:bogus", E.EINVAL),
                        ("signed_by:5", E.EINVAL), ("key_or_keyring:0", E.ENOKEY),
                        ("key_or_keyring:2147483647", E.ENOKEY), ("key_or_keyring:99999999999", E.EINVAL)):
        assert refused(lambda: client.restrict_keyring(ring, "asymmetric", text)) is error, text
    assert refused(lambda: client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{ring}")) is E.EDEADLK
    other = client.newring("other", "@s")
    client.restrict_keyring(other, "asymmetric", f"key_or_keyring:{hex(ring)}:chain")  # kstrtos32 takes 0x
    assert refused(lambda: client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{other}")) is E.EDEADLK
    # A trusted key that is neither a keyring nor an asymmetric key: each certificate is EOPNOTSUPP, as the
    # kernel's key_or_keyring_common answers (it was ENOKEY, "no trusted key is the issuer")
    by_user_key = client.newring("by a user key", "@s")
    client.restrict_keyring(by_user_key, "asymmetric", f"key_or_keyring:{client.add('user', 'u', b'x', '@s')}")
    assert refused(lambda: add_cert(client, certificate("any", ec_key(), ca=True), by_user_key)) is E.EOPNOTSUPP
    client.restrict_keyring(ring)  # no type: nothing may be linked any more
    assert refused(lambda: client.add("user", "u", b"x", ring)) is E.EPERM


# ------------------------------------------------------------------- x509_verify


@pytest.fixture
def rings(client, pki):
    """A trust keyring holding the root, a chain keyring holding the intermediate."""
    trust, chain = client.newring("trust", "@s"), client.newring("intermediates", "@s")
    return SimpleNamespace(trust=trust, chain=chain, root=add_cert(client, pki.root, trust),
                           inter=add_cert(client, pki.inter, chain))


def rejection(call) -> str:
    with pytest.raises(E.EKEYREJECTED) as info:
        call()
    return info.value.message


def test_x509_verify_returns_the_validated_chain(client, pki, rings):
    leaf = add_cert(client, pki.server)
    verify = client.x509_verify
    assert verify(leaf, rings.trust, rings.chain, host="example.com", purpose="server") == [
        (leaf, "CN=server"), (rings.inter, "CN=Test Intermediate"), (rings.root, "CN=Test Root")]
    assert [s for s, _ in verify(leaf, rings.trust, rings.chain)] == [leaf, rings.inter, rings.root]
    assert "unknown issuer" in rejection(lambda: verify(leaf, rings.trust))  # no intermediates given
    strangers = client.newring("strangers", "@s")
    add_cert(client, pki.stranger, strangers)
    assert "unknown issuer" in rejection(lambda: verify(leaf, strangers, rings.chain))
    assert [s for s, _ in verify(leaf, rings.chain)] == [leaf, rings.inter]  # whatever the trust keyring holds is an anchor
    assert "hostname mismatch" in rejection(lambda: verify(leaf, rings.trust, rings.chain, host="other.example"))
    assert "bad signature" in rejection(lambda: verify(add_cert(client, pki.forged), rings.trust, rings.chain))
    chain_too = client.newring("chain and leaf", "@s")  # the leaf also in the chain keyring, as another key
    client.link(rings.inter, chain_too)
    other_copy = add_cert(client, pki.server, chain_too)
    assert other_copy != leaf
    assert [s for s, _ in verify(leaf, rings.trust, chain_too)] == [leaf, rings.inter, rings.root]

    assert refused(lambda: verify(rings.trust, rings.trust)) is E.EOPNOTSUPP  # a keyring is no certificate
    assert refused(lambda: verify(client.add("asymmetric", "", spki(pki.leaf_key), "@s"), rings.trust)) \
        is E.EOPNOTSUPP
    assert refused(lambda: verify(leaf, leaf)) is E.ENOTDIR
    assert refused(lambda: verify(leaf, rings.trust, purpose="both")) is E.EINVAL
    assert refused(lambda: verify(leaf, rings.trust, host="bad host!")) is E.EINVAL
    assert refused(lambda: verify(leaf, rings.trust, host="example.com", purpose="client")) is E.EINVAL


def test_x509_verify_validity_periods_and_the_time_of_validation(client, pki, rings):
    args = (rings.trust, rings.chain)
    leaf, expired, future = (add_cert(client, c) for c in (pki.server, pki.expired, pki.future))
    assert "has expired" in rejection(lambda: client.x509_verify(expired, *args))
    assert "not yet valid" in rejection(lambda: client.x509_verify(future, *args))
    ts = lambda when: int(when.timestamp())  # noqa: E731
    assert client.x509_verify(expired, *args, at=ts(NOW - 5 * DAY))[0][0] == expired  # valid back then
    assert client.x509_verify(future, *args, at=ts(NOW + 5 * DAY))[0][0] == future
    assert "has expired" in rejection(lambda: client.x509_verify(leaf, *args, at=ts(NOW + 60 * DAY)))
    assert "not yet valid" in rejection(lambda: client.x509_verify(leaf, *args, at=ts(NOW - 2 * DAY)))
    # The intermediate's validity counts too: two years on, only the leaf's own check could not tell.
    long_leaf = certificate("long", pki.leaf_key, ("Test Intermediate", pki.inter_key), eku=[SERVER],
                            san=("example.com",), not_after=NOW + 800 * DAY)
    assert "expired or not yet valid" in rejection(
        lambda: client.x509_verify(add_cert(client, long_leaf), *args, at=ts(NOW + 400 * DAY)))


def test_x509_verify_applies_name_constraints_to_subjects_as_openssl_and_tls(client, pki, rings):
    """pyca checks an issuer's name constraints against subjectAltNames only: a CA constrained to
    good.example issued leaves x509_verify took for CN=evil.example (no SAN), or for a client whose
    subject's emailAddress is boss@evil.example (its SAN in bounds).  OpenSSL and keyden's TLS refuse
    them: subjects' emailAddress, and the leaf's host-like common names when it has no DNS SAN, count."""
    inter_key = ec_key()
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("good.example"), x509.RFC822Name("good.example")],
        excluded_subtrees=[x509.DNSName("bad.good.example")])
    chain = client.newring("constrained chain", "@s")
    add_cert(client, certificate("Constrained CA", inter_key, ("Test Root", pki.root_key), ca=True,
                                 constraints=constraints), chain)

    def leaf(cn: str, email: str = "", sans=(), eku=CLIENT, issuer=("Constrained CA", inter_key)):
        return add_cert(client, certificate(cn, ec_key(), issuer, eku=[eku], san=sans,
                                            emails=(email,) if email else ()))

    verify = lambda serial, **kw: client.x509_verify(serial, rings.trust, chain, **kw)  # noqa: E731
    for refused_leaf, kw in ((leaf("evil.example"), {}),
                             (leaf("x.bad.good.example"), {}),
                             (leaf("Boss", "boss@evil.example", [x509.RFC822Name("a@good.example")]),
                              {"purpose": "client"})):
        assert "name constraints" in rejection(lambda: verify(refused_leaf, **kw))
    assert len(verify(leaf("www.good.example"))) == 3
    assert len(verify(leaf("Alice Smith", "alice@good.example", [x509.RFC822Name("alice@good.example")]),
                      purpose="client")) == 3  # a common name no host name: not a DNS name to check
    assert len(verify(leaf("evil.example", sans=[x509.DNSName("www.good.example")], eku=SERVER),
                      host="www.good.example", purpose="server")) == 3  # a DNS SAN: the CN is not a name

    # Excluded subtrees only, as OpenSSL reads them: a common name with "_" is still a host name, "@domain"
    # excludes every mailbox there, and an emailAddress without "@" cannot be checked, so it is refused.
    banning_key = ec_key()
    add_cert(client, certificate("Banning CA", banning_key, ("Test Root", pki.root_key), ca=True,
                                 constraints=x509.NameConstraints(None, [x509.DNSName("evil.example"),
                                                                         x509.RFC822Name("@evil.example")])), chain)
    banning = ("Banning CA", banning_key)
    for refused_leaf in (leaf("evil_x.evil.example", issuer=banning), leaf("Boss", "boss@evil.example", issuer=banning),
                         leaf("Boss", "bossevil.example", issuer=banning)):
        assert "name constraints" in rejection(lambda: verify(refused_leaf)), refused_leaf
    assert len(verify(leaf("Boss", "boss@fine.example", issuer=banning))) == 3
    # As OpenSSL's cn2dnsid and NAME_CONSTRAINTS_check: trailing NULs are cut from a common name, one inside
    # it cannot be checked, nor can an emailAddress that is no IA5String: refused under any constraint.
    utf8_mail = x509.Name([*name("Boss"), x509.NameAttribute(NameOID.EMAIL_ADDRESS, "boss@fine.example",
                                                             _type=x509.name._ASN1Type.UTF8String)])
    for refused_leaf in (leaf("www.evil.example\0", issuer=banning), leaf("www.evil.example\0.x", issuer=banning),
                         add_cert(client, certificate("", ec_key(), banning, eku=[CLIENT], subject=utf8_mail))):
        assert "name constraints" in rejection(lambda: verify(refused_leaf)), refused_leaf

    # A self-issued intermediate (a CA's new key, certified by its old one) is left out, as RFC 5280 and
    # OpenSSL leave it: its subject, the CA's own, names what the CA's own constraints exclude.
    mail_ca = x509.Name([*name("Mail CA"), x509.NameAttribute(NameOID.EMAIL_ADDRESS, "ca@evil.example")])
    old_key, new_key = ec_key(), ec_key()
    add_cert(client, certificate("", old_key, ("Test Root", pki.root_key), ca=True, subject=mail_ca,
                                 constraints=x509.NameConstraints(None, [x509.RFC822Name("@evil.example")])), chain)
    add_cert(client, certificate("", new_key, ("", old_key), ca=True, subject=mail_ca, issuer_subject=mail_ca),
             chain)
    below = add_cert(client, certificate("", ec_key(), ("", new_key), eku=[CLIENT], issuer_subject=mail_ca,
                                         subject=x509.Name([*name("Boss"), x509.NameAttribute(
                                             NameOID.EMAIL_ADDRESS, "boss@fine.example")])))
    assert len(verify(below)) >= 4


def test_a_trust_keyring_holds_what_a_search_from_it_finds(client, pki, rings):
    """A keyring named by a special ID (@u) is possessed, and so is what a search from it finds: a CA
    there with the default mask (search for its possessor only) is an anchor, as `search @u` finds it.
    x509_verify left it out: it asked whether the caller's own keyrings (a session here) possessed it."""
    leaf = add_cert(client, pki.server)
    root = add_cert(client, pki.root, "@u")
    try:
        assert client.search("@u", "asymmetric", client.describe(root).description) == root
        assert [s for s, _ in client.x509_verify(leaf, "@u", rings.chain)] == [leaf, rings.inter, root]
    finally:
        client.unlink(root, "@u")


def test_a_keyring_met_deep_first_is_entered_from_its_shallowest_link(client, pki):
    """top -> r0 -> ... -> r5, and a keyring of CAs linked below r5 (7 levels: past the search's 6) and
    then into top itself: the CAs are one level down, whatever the order the links were made in.  The
    trust walk marked the keyring seen at its deep link and never entered it from top."""
    top = client.newring("deep top", "@s")
    below = top
    for level in range(6):
        below = client.newring(f"deep r{level}", below)
    cas = client.newring("deep CAs", "@s")
    add_cert(client, pki.root, cas)
    client.link(cas, below)
    client.link(cas, top)
    restricted = client.newring("deep restricted", "@s")
    client.restrict_keyring(restricted, "asymmetric", f"key_or_keyring:{top}")
    assert add_cert(client, pki.inter, restricted)  # the root, one level below top, signed it
    chain = client.newring("deep chain", "@s")
    inter = add_cert(client, pki.inter, chain)
    leaf = add_cert(client, pki.server)
    assert [s for s, _ in client.x509_verify(leaf, top, chain)][:2] == [leaf, inter]


def test_x509_verify_purpose_follows_extended_key_usage(client, pki, rings):
    args = (rings.trust, rings.chain)
    server, tls_client = add_cert(client, pki.server), add_cert(client, pki.client)
    assert client.x509_verify(tls_client, *args, purpose="client")[0] == (tls_client, "CN=client")
    assert "wrong purpose" in rejection(lambda: client.x509_verify(tls_client, *args, purpose="server"))
    assert "wrong purpose" in rejection(
        lambda: client.x509_verify(tls_client, *args, host="client.example", purpose="server"))
    assert "wrong purpose" in rejection(lambda: client.x509_verify(server, *args, purpose="client"))
    assert client.x509_verify(server, *args, purpose="server")[0][0] == server  # no host: no name check
    for leaf in (server, tls_client):  # no purpose: any extended key usage
        assert client.x509_verify(leaf, *args)[0][0] == leaf


def test_x509_verify_takes_no_any_extended_key_usage_for_a_purpose_as_openssl_and_tls(client, pki, rings):
    """An intermediate whose EKU is anyExtendedKeyUsage only: OpenSSL and keyden's TLS refuse its leaves
    for server or client use; x509_verify refused them only for a server without a host (pyca's own
    profiles, used for the rest, take it on a CA)."""
    any_eku = x509.ObjectIdentifier("2.5.29.37.0")
    inter_key = ec_key()
    inter = certificate("Any EKU CA", inter_key, ("Test Root", pki.root_key), ca=True, eku=[any_eku])
    leaf = add_cert(client, certificate("both", ec_key(), ("Any EKU CA", inter_key), eku=[SERVER, CLIENT],
                                        san=("example.com",)))
    chain = client.newring("any eku chain", "@s")
    add_cert(client, inter, chain)
    for how in ({"purpose": "server"}, {"purpose": "server", "host": "example.com"}, {"purpose": "client"}):
        assert "wrong purpose" in rejection(lambda: client.x509_verify(leaf, rings.trust, chain, **how)), how
    assert len(client.x509_verify(leaf, rings.trust, chain)) == 3  # no purpose: any EKU


def test_x509_verify_takes_no_wildcard_over_a_single_label_as_openssl_and_tls(client, pki, rings):
    """pyca matches "*.com" to example.com; OpenSSL (and so keyden's TLS) wants two labels under a
    wildcard."""
    issuer = ("Test Intermediate", pki.inter_key)
    args = (rings.trust, rings.chain)
    wide = add_cert(client, certificate("wide", ec_key(), issuer, eku=[SERVER], san=("*.com",)))
    assert "hostname mismatch" in rejection(lambda: client.x509_verify(wide, *args, host="example.com"))
    assert "hostname mismatch" in rejection(
        lambda: client.x509_verify(wide, *args, host="example.com", purpose="server"))
    both = add_cert(client, certificate("both", ec_key(), issuer, eku=[SERVER], san=("*.com", "Example.com")))
    assert client.x509_verify(both, *args, host="example.com")[0][0] == both  # named itself
    two = add_cert(client, certificate("two", ec_key(), issuer, eku=[SERVER], san=("*.example.com",)))
    assert client.x509_verify(two, *args, host="www.example.com")[0][0] == two
    assert "hostname mismatch" in rejection(lambda: client.x509_verify(two, *args, host="example.com"))


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 0x80 else bytes([0x80 | (size.bit_length() + 7) // 8]) + \
        size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def test_a_certificate_whose_two_signature_algorithms_differ_is_malformed(client, pki):
    """RFC 5280 4.1.1.2: the TBS's signature field names the algorithm too.  Here it says ECDSA-SHA384
    while the signature (valid) is ECDSA-SHA256: pyca parses it and checks only the outer one, so a
    restricted keyring admitted it; openssl and the kernel refuse it."""
    good = certificate("mismatch", ec_key(), ("Test Root", pki.root_key), eku=[SERVER], san=("example.com",))
    ecdsa_sha256, ecdsa_sha384 = bytes.fromhex("300a06082a8648ce3d040302"), bytes.fromhex("300a06082a8648ce3d040303")
    tbs_der = good.tbs_certificate_bytes
    header = 2 + (tbs_der[1] & 0x7F if tbs_der[1] & 0x80 else 0)
    assert tbs_der[header:].count(ecdsa_sha256) == 1
    altered = _der(0x30, tbs_der[header:].replace(ecdsa_sha256, ecdsa_sha384))
    signature = pki.root_key.sign(altered, ec.ECDSA(hashes.SHA256()))
    crafted = _der(0x30, altered + ecdsa_sha256 + _der(0x03, b"\x00" + signature))
    x509.load_der_x509_certificate(crafted)  # pyca takes it
    trusted, ring = client.newring("sigalg trust", "@s"), client.newring("sigalg ring", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{add_cert(client, pki.root, trusted)}")
    with pytest.raises(E.EBADMSG, match="signatureAlgorithm differs"):
        client.add("asymmetric", "", crafted, ring)
    with pytest.raises(E.EBADMSG, match="signatureAlgorithm differs"):
        client.add("asymmetric", "", crafted, "@s")
    assert add_cert(client, good, ring)  # the same certificate unaltered is admitted


def _with_signature_algorithm(cert: x509.Certificate, algorithm: bytes) -> bytes:
    """``cert`` with both its signatureAlgorithm fields (the TBS's and the outer one) replaced: no longer
    validly signed, which is beside the point."""
    tbs_der = cert.tbs_certificate_bytes
    header = 2 + (tbs_der[1] & 0x7F if tbs_der[1] & 0x80 else 0)
    ecdsa_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    assert tbs_der[header:].count(ecdsa_sha256) == 1
    tbs = _der(0x30, tbs_der[header:].replace(ecdsa_sha256, algorithm))
    return _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + cert.signature))


RSASSA_PSS = "06092a864886f70d01010a"
UNREADABLE_PSS = {  # pyca loads these, and raises ValueError only when the parameters are asked for
    "no parameters": bytes.fromhex("300b" + RSASSA_PSS),
    "an unknown mask generation function": _der(0x30, bytes.fromhex(RSASSA_PSS) + _der(0x30, _der(
        0xA1, _der(0x30, bytes.fromhex("06092a864886f70d010109") + bytes.fromhex("300b0609608648016503040201")))))
}


@pytest.mark.parametrize("what", sorted(UNREADABLE_PSS))
def test_a_certificate_whose_pss_parameters_pyca_cannot_read_is_malformed(client, pki, what):
    """Added into a restricted keyring (the signature check) or anywhere once the blacklist held an entry
    (its tbs: hash), such a certificate was EIO 'internal error' with a traceback; the same from a TLS
    peer.  Now it is refused when added, and the checks that meet one elsewhere answer, not raise."""
    issued = certificate("pss", ec_key(), ("Test Root", pki.root_key), eku=[SERVER], san=("example.com",))
    crafted = _with_signature_algorithm(issued, UNREADABLE_PSS[what])
    cert = x509.load_der_x509_certificate(crafted)  # pyca takes it...
    with pytest.raises(ValueError):
        cert.signature_algorithm_parameters  # ...and fails later
    assert not X.signed_by(cert, pki.root_key.public_key())
    assert X.tbs_hashes(cert)[0] == X.tbs_hash(cert)  # no ValueError: the SHA-256 form, and the kernel's if known
    ring = client.newring("pss ring", "@s")
    client.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{add_cert(client, pki.root)}")
    for keyring in (ring, "@s"):
        with pytest.raises(E.EBADMSG, match="signature algorithm's parameters cannot be read"):
            client.add("asymmetric", "", crafted, keyring)


def test_rsa_keys_restricted_to_pss_are_refused_not_used_as_plain_rsa(client, tmp_path):
    """pyca loads an id-RSASSA-PSS key as plain RSA: keyden signed PKCS#1 v1.5 and decrypted with it,
    which openssl refuses for such a key.  The key, its public half and its certificate are refused."""
    key, pub, cert = (str(tmp_path / n) for n in ("pss.key", "pss.pub", "pss.pem"))
    for command in (["genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key],
                    ["pkey", "-in", key, "-pubout", "-out", pub],
                    ["req", "-x509", "-new", "-key", key, "-subj", "/CN=pss only", "-days", "2", "-out", cert]):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    for path in (key, pub, cert):
        with open(path, "rb") as f:
            data = f.read()
        # (base64 on the BEGIN or END line, which pyca reads, once kept the check from seeing the key's OID)
        for variant in (data, glued(data, "begin"), glued(data, "end")):
            with pytest.raises(E.EINVAL, match="RSASSA-PSS"):
                client.add("asymmetric", "", variant, "@s")
        der = serialization.load_pem_private_key(data, None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()) \
            if path == key else None
        if der is not None:  # pyca writes it back as a plain RSA key: that one is an RSA key like any other
            assert client.describe(client.add("asymmetric", "", der, "@s")).description.startswith("RSA-2048")


def test_a_pkcs12_file_is_refused_as_one_not_as_a_key_of_an_unsupported_algorithm(client, tmp_path):
    """A PFX reads as a PKCS#8 key whose algorithm is its content type: "unsupported key algorithm" (for an
    RSA key) sent its user looking in the wrong place."""
    key, cert, pfx = (str(tmp_path / n) for n in ("k.pem", "c.pem", "f.p12"))
    for command in (["req", "-x509", "-newkey", "rsa:2048", "-noenc", "-keyout", key, "-out", cert, "-subj", "/CN=p12",
                     "-days", "2"],
                    ["pkcs12", "-export", "-inkey", key, "-in", cert, "-out", pfx, "-passout", "pass:secret"]):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    with open(pfx, "rb") as f:
        data = f.read()
    for password in (None, "secret"):
        with pytest.raises(E.EINVAL, match="a PKCS#12 file is not taken: give its key and its certificate apart"):
            client.add("asymmetric", "", data, "@s", password=password)


def test_a_certificate_with_a_negative_serial_loads_without_a_warning_in_the_log(fresh_daemon, tmp_path):
    """Old roots (in the CA bundle too) have non-positive serials: pyca parses them with a deprecation
    warning, which went to the daemon's stderr, a raw traceback line in its log at each parse (the bundle's
    load alone silenced it)."""
    key, cert = str(tmp_path / "neg.key"), str(tmp_path / "neg.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-subj", "/CN=negative", "-days", "2", "-set_serial", "-5"],
                   check=True, capture_output=True)
    d = fresh_daemon()
    with d.connect() as c, open(cert, "rb") as f:
        serial = c.add("asymmetric", "", f.read(), "@s")
        assert c.describe(serial).description.startswith("negative: ")
        assert c.pkey_query(serial).max_sig_size > 0
    assert "Warning" not in d.read_log()


def test_x509_verify_any_extended_key_usage_is_not_server_or_client_auth(client, pki, rings):
    """A leaf whose only EKU is anyExtendedKeyUsage passed purpose=server without a host (with one, pyca
    refused it; so does openssl)."""
    any_eku = certificate("any eku", ec_key(), ("Test Intermediate", pki.inter_key),
                          eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], san=("example.com",))
    leaf = add_cert(client, any_eku)
    for purpose in ("server", "client"):
        assert "wrong purpose" in rejection(lambda: client.x509_verify(leaf, rings.trust, rings.chain,
                                                                       purpose=purpose))
    assert client.x509_verify(leaf, rings.trust, rings.chain)[0][0] == leaf  # any purpose


def test_x509_verify_name_constraints_and_their_cost(client, pki, rings):
    """Name constraints hold; a chain whose names against constraints would cost pyca up to a million
    comparisons (half a second holding the interpreter lock, every client stalled) is refused first."""
    def constrained_ca(label: str, permitted: list[str], excluded: list[str] | None = None):
        key = ec_key()
        constraints = x509.NameConstraints([x509.DNSName(d) for d in permitted] or None,
                                           [x509.DNSName(d) for d in excluded or ()] or None)
        return key, certificate(label, key, ("Test Root", pki.root_key), ca=True, constraints=constraints)

    key, ca = constrained_ca("Constrained CA", ["example.com"], ["bad.example.com"])
    chain = client.newring("nc chain", "@s")
    add_cert(client, ca, chain)
    issuer = ("Constrained CA", key)
    inside = add_cert(client, certificate("in", ec_key(), issuer, eku=[SERVER], san=("www.example.com",)))
    outside = add_cert(client, certificate("out", ec_key(), issuer, eku=[SERVER], san=("www.example.org",)))
    excluded = add_cert(client, certificate("ex", ec_key(), issuer, eku=[SERVER], san=("bad.example.com",)))
    assert client.x509_verify(inside, rings.trust, chain, host="www.example.com", purpose="server")[0][0] == inside
    for leaf in (outside, excluded):
        reason = rejection(lambda: client.x509_verify(leaf, rings.trust, chain))
        assert reason.startswith("name constraints"), reason

    key, wide = constrained_ca("Wide CA", [f"d{i}.example" for i in range(300)])
    wide_chain = client.newring("wide chain", "@s")
    add_cert(client, wide, wide_chain)
    many = certificate("many", ec_key(), ("Wide CA", key), eku=[SERVER], san=tuple(f"h{i}.d1.example" for i in range(300)))
    reason = rejection(lambda: client.x509_verify(add_cert(client, many), rings.trust, wide_chain))
    assert reason.startswith("name constraints too costly to check"), reason
    # A subject's names count too: pyca leaves them to keyden, which compares each with each constraint.
    key = ec_key()
    mail_ca = certificate("Mail CA", key, ("Test Root", pki.root_key), ca=True, constraints=x509.NameConstraints(
        None, [x509.RFC822Name(f"m{i}.example") for i in range(300)]))
    add_cert(client, mail_ca, wide_chain)
    mailer = certificate("mailer", ec_key(), ("Mail CA", key), eku=[CLIENT], emails=tuple(f"u{i}@x.example"
                                                                                          for i in range(300)))
    reason = rejection(lambda: client.x509_verify(add_cert(client, mailer), rings.trust, wide_chain))
    assert reason.startswith("name constraints too costly to check"), reason


def test_x509_verify_bounds_the_path_search(client, pki, rings):
    """pyca's path search tries every certificate named as an issuer at every step up, 8 intermediates
    deep, remembering nothing that failed: self-issued CAs sharing a name and key, put in a chain keyring
    by anyone, made it take c + c**2 + ... + c**9 signature checks (four: 44 s; five: minutes; eight:
    hours, on a worker thread nothing stops).  The candidates are de-duplicated and bounded before pyca starts."""
    loop_key = ec_key()
    loops = [certificate("Loop CA", loop_key, ("Loop CA", loop_key), ca=True) for _ in range(X.MAX_SAME_SUBJECT + 1)]
    leaf = add_cert(client, certificate("looped", ec_key(), ("Loop CA", loop_key), eku=[SERVER], san=("example.com",)))

    def chain_of(label: str, certs: list, copies: int = 1) -> int:
        """A chain keyring holding ``certs`` (one name and key: each its own description), ``copies`` times."""
        ring = client.newring(label, "@s")
        for copy in range(copies):
            for i, cert in enumerate(certs):
                client.add("asymmetric", f"{label} {i}.{copy}", pem(cert), ring)
        return ring

    reason = rejection(lambda: client.x509_verify(leaf, rings.trust, chain_of("over the cap", loops)))
    assert reason.startswith(f"too many certificates named CN=Loop CA in the chain keyring "
                             f"({X.MAX_SAME_SUBJECT + 1} "), reason
    reason = rejection(lambda: client.x509_verify(leaf, rings.trust, chain_of("three", loops[:3])))
    assert reason.startswith("path search too costly: pyca could try 29523 signature checks"), reason
    # Two loop, and are searched to the end (1022 checks); copies of one certificate count once.
    reason = rejection(lambda: client.x509_verify(leaf, rings.trust, chain_of("two, thrice", loops[:2], copies=3)))
    assert reason.startswith("no path"), reason  # to the end, or as far as pyca's own limit (50 has one)

    # X issued by Y beside Y issued by X loops just as well, under names within the cap.
    ping_key, pong_key = ec_key(), ec_key()
    pings = [certificate("Ping", ping_key, ("Pong", pong_key), ca=True) for _ in range(3)]
    pongs = [certificate("Pong", pong_key, ("Ping", ping_key), ca=True) for _ in range(3)]
    pinged = add_cert(client, certificate("pinged", ec_key(), ("Ping", ping_key), eku=[SERVER], san=("example.com",)))
    reason = rejection(lambda: client.x509_verify(pinged, rings.trust, chain_of("ping pong", pings + pongs)))
    assert reason.startswith("path search too costly"), reason
    reason = rejection(lambda: client.x509_verify(pinged, rings.trust, chain_of("ping pong 2", pings[:2] + pongs[:2])))
    assert reason.startswith("no path"), reason

    # A real PKI's renewals: as many intermediates under one name as the cap allows still validate.
    renewed = [certificate("Test Intermediate", pki.inter_key, ("Test Root", pki.root_key), ca=True,
                           not_before=NOW - (400 + i) * DAY) for i in range(X.MAX_SAME_SUBJECT)]
    server = add_cert(client, pki.server)
    chain = client.x509_verify(server, rings.trust, chain_of("renewed", renewed), host="example.com")
    assert [subject for _, subject in chain] == ["CN=server", "CN=Test Intermediate", "CN=Test Root"]


def test_x509_verify_reasons_and_subjects_are_plain_single_lines(client, pki, rings, tmp_path):
    """pyca's texts carried Rust debug dumps and Python reprs; subjects were printed raw, so a crafted CN
    could add lines of its own to the CLI's output (a forged chain) or reorder a terminal's text."""
    files = {n: str(tmp_path / n) for n in ("ca.pem", "ca.key", "leaf.key", "leaf.csr", "leaf.pem", "ext")}
    with open(files["ca.pem"], "wb") as f:
        f.write(pem(pki.inter))
    with open(files["ca.key"], "wb") as f:
        f.write(pki.inter_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    with open(files["ext"], "w") as f:
        f.write("subjectAltName=DNS:example.com\nauthorityKeyIdentifier=keyid\n")
    for command in (["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", files["leaf.key"], "-subj", "/CN=sha1 leaf", "-out", files["leaf.csr"]],
                    ["x509", "-req", "-in", files["leaf.csr"], "-CA", files["ca.pem"], "-CAkey", files["ca.key"],
                     "-sha1", "-days", "2", "-extfile", files["ext"], "-out", files["leaf.pem"]]):
        subprocess.run(["openssl", *command], check=True, capture_output=True)
    with open(files["leaf.pem"], "rb") as f:
        sha1 = client.add("asymmetric", "", f.read(), "@s")
    reason = rejection(lambda: client.x509_verify(sha1, rings.trust, rings.chain))
    assert reason.startswith("weak or unsupported signature algorithm"), reason

    crafted = certificate("evil\n 999999 CN=Test Root\u202e", ec_key(), ("Test Intermediate", pki.inter_key),
                          eku=[SERVER], san=("example.com",))
    leaf = add_cert(client, crafted)
    subject = client.x509_verify(leaf, rings.trust, rings.chain)[0][1]
    assert subject == "CN=evil\\n 999999 CN=Test Root\\u202e" and subject.isprintable()


# -------------------------------------------------------------- system keyrings


@pytest.fixture(scope="module")
def system(pki):
    """A daemon whose CA bundle is this module's root (plus one the parser refuses and one blacklisted)."""
    p521 = ec.generate_private_key(ec.SECP521R1())
    banned_key = ec_key()
    banned_ca = certificate("Banned CA", banned_key, ca=True)
    bin_banned = certificate("Banned by bin", ec_key(), ("Test Root", pki.root_key), ca=True)
    files = tempfile.mkdtemp(prefix="keyden-trust-")
    bundle, blacklist = os.path.join(files, "ca.pem"), os.path.join(files, "blacklist")
    with open(bundle, "wb") as f:
        reissued = certificate("Test Root", pki.root_key, ca=True)  # the same root and key, issued again first
        f.write(b"".join(pem(c) for c in (reissued, pki.root, certificate("P-521 CA", p521, ca=True), banned_ca)))
    with open(blacklist, "w") as f:
        f.write(f"# banned at start\n{tbs(banned_ca)}\n\n{bin_(bin_banned.public_bytes(serialization.Encoding.DER))}"
                "  # a comment\n")
    d = Daemon(f'ca_bundle = "{bundle}"\nblacklist_file = "{blacklist}"\n').start()
    with d.connect() as boot:
        _serial, token = boot.join_session()
    c = d.connect(session=token)
    c.session_token = token
    yield SimpleNamespace(daemon=d, client=c, banned_ca=banned_ca, banned_key=banned_key, bin_banned=bin_banned,
                          files=files)
    c.close()
    d.cleanup()


def test_system_keyrings_hold_their_files_whatever_keyring_max_links():
    """A CA bundle (or blacklist file) longer than keyring_max_links stopped the daemon ("keyring ... is
    full", naming neither): the cap bounds users' keyrings, and the daemon's own take what root gives."""
    from keyden.core import trust as core_trust
    from keyden.core.store import KeyStore, StoreConfig

    store = KeyStore(StoreConfig(keyring_max_links=2))
    bundle = b"".join(pem(certificate(f"Bundle CA {i}", ec_key(), ca=True)) for i in range(3))
    bans = "".join(f"tbs:{i:02x}{'00' * 31}\n" for i in range(3)).encode()
    system = core_trust.install_system_keyrings(store, ("ca.pem", bundle), ("blacklist", bans))
    assert len(system.builtin.links) == 3 and len(system.blacklist.links) == 3


def test_system_keyrings_are_made_at_start_and_cannot_be_removed(system, pki):
    c = system.client
    builtin, secondary, blacklist = (c.find("keyring", n) for n in
                                     (".builtin_trusted_keys", ".secondary_trusted_keys", ".blacklist"))
    for ring, perm in ((builtin, 0x1F0B0B0B), (secondary, 0x1F0F0B0B), (blacklist, 0x1F0F0B0B)):
        d = c.describe(ring)
        assert (d.type, d.uid, d.gid, d.perm) == ("keyring", 0, 0, perm)
    (root,) = c.read(builtin)  # the P-521 CA was refused by the parser, the banned CA by the blacklist
    assert c.describe(root).description.startswith("Test Root: ")
    assert c.read(secondary) == [builtin]
    assert sorted(c.describe(k).description for k in c.read(blacklist)) == sorted(
        [tbs(system.banned_ca), bin_(system.bin_banned.public_bytes(serialization.Encoding.DER))])
    assert c.describe(root).description.startswith("Test Root: ")  # the later of the two, as add_key would
    listed = {k.serial: k for k in c.keys()}  # as /proc/keys: a blacklist entry is its description alone
    assert {listed[k].proc_line(0).split(" blacklist ")[1].strip() for k in c.read(blacklist)} == {
        c.describe(k).description for k in c.read(blacklist)}
    assert listed[builtin].summary == "1"
    assert ".builtin_trusted_keys: holds 1 certificates from ; 1 replaced an earlier one with the same " \
           "description, 1 the parser refused, 1 blacklisted" in system.daemon.read_log().replace(
               system.files + "/ca.pem", "")

    # KEY_FLAG_KEEP: whatever the masks grant, nobody (root included) revokes, invalidates or clears them.
    for call in (lambda: c.invalidate(builtin), lambda: c.invalidate(root), lambda: c.clear(secondary),
                 lambda: c.revoke(secondary), lambda: c.unlink(builtin, secondary),
                 lambda: c.unlink(c.read(blacklist)[0], blacklist)):
        assert refused(call) is E.EPERM
    assert refused(lambda: c.timeout(blacklist, 5)) is E.EACCES  # and the masks grant no setattr
    assert refused(lambda: c.newring(".builtin_trusted_keys", "@s")) is E.EPERM  # '.' names are the daemon's
    assert c.read(builtin) == [root]


def test_builtin_and_secondary_restrictions(system, pki):
    c = system.client
    builtin, secondary = c.find("keyring", ".builtin_trusted_keys"), c.find("keyring", ".secondary_trusted_keys")
    by_builtin = c.newring("by builtin", "@s")
    c.restrict_keyring(by_builtin, "asymmetric", "builtin_trusted")
    inter = add_cert(c, pki.inter, by_builtin)  # the builtin root signed it
    assert refused(lambda: add_cert(c, pki.server, by_builtin)) is E.ENOKEY
    # Without an authority key identifier the issuer is found by its name, as since Linux 5.18 (the
    # issuer's name is an authority ID of its own); a name that is no trusted key's is still ENOKEY.
    add_cert(c, certificate("Test Intermediate B", pki.inter_key, ("Test Root", pki.root_key), ca=True, akid=False),
             by_builtin)
    stray = certificate("Stray", pki.evil_key, ("Nobody's Root", pki.root_key), ca=True, akid=False)
    assert refused(lambda: add_cert(c, stray, by_builtin)) is E.ENOKEY

    # Root adds to the secondary keyring what a builtin or secondary key signed; then those vouch too.
    assert refused(lambda: add_cert(c, pki.stranger, secondary)) is E.ENOKEY
    assert refused(lambda: c.add("user", "u", b"x", secondary)) is E.EOPNOTSUPP
    c.link(inter, secondary)
    by_both = c.newring("by both", "@s")
    c.restrict_keyring(by_both, "asymmetric", "builtin_and_secondary_trusted")
    leaf = add_cert(c, pki.server, by_both)  # the intermediate, now secondary, signed it
    assert refused(lambda: c.link(leaf, by_builtin)) is E.ENOKEY  # builtin alone still does not vouch for it
    assert [s for s, _ in c.x509_verify(leaf, secondary, host="example.com", purpose="server")] == \
        [leaf, inter]  # the intermediate is itself trusted now: the chain ends there
    assert c.x509_verify(leaf, builtin, by_builtin)[-1][0] == c.read(builtin)[0]


def test_blacklist_refuses_keys_wherever_they_would_enter(system, pki):
    c = system.client
    blacklist = c.find("keyring", ".blacklist")
    assert refused(lambda: add_cert(c, system.banned_ca)) is E.EKEYREJECTED  # tbs: from the blacklist file
    assert refused(lambda: add_cert(c, system.bin_banned)) is E.EKEYREJECTED  # bin: from the blacklist file

    # Certificates of this test's own: entries stay for the daemon's life, other tests use the module's.
    inter_key, leaf_key, bare_key = ec_key(), ec_key(), ec_key()
    inter_cert = certificate("Doomed Intermediate", inter_key, ("Test Root", pki.root_key), ca=True)
    issuer = ("Doomed Intermediate", inter_key)
    client_cert = certificate("doomed client", leaf_key, issuer, eku=[CLIENT])
    server_cert = certificate("doomed server", leaf_key, issuer, eku=[SERVER], san=("example.com",))
    trust, chain = c.newring("trust", "@s"), c.newring("chain", "@s")
    add_cert(c, pki.root, trust)
    inter = add_cert(c, inter_cert, chain)
    leaf, server = add_cert(c, client_cert), add_cert(c, server_cert)
    bare = c.add("asymmetric", "", spki(bare_key), "@s")
    assert c.x509_verify(leaf, trust, chain)[0][0] == leaf

    entry = c.add("blacklist", tbs(client_cert), b"", blacklist)  # root may add; the key held is now refused
    with pytest.raises(E.EPERM):  # as the kernel's blacklist_key_update: the entry stays (it was replaced)
        c.add("blacklist", tbs(client_cert), b"", blacklist)
    assert c.search(blacklist, "blacklist", tbs(client_cert)) == entry
    assert refused(lambda: c.link(leaf, trust)) is E.EKEYREJECTED
    assert refused(lambda: c.move(leaf, "@s", chain)) is E.EKEYREJECTED
    assert refused(lambda: add_cert(c, client_cert, chain)) is E.EKEYREJECTED
    assert rejection(lambda: c.x509_verify(leaf, trust, chain)) == "certificate is blacklisted"

    c.add("blacklist", bin_(spki(bare_key)), b"", blacklist)  # a bare key's bin: is its SPKI's hash
    assert refused(lambda: c.link(bare, trust)) is E.EKEYREJECTED
    assert refused(lambda: c.add("asymmetric", "", spki(bare_key), "@s")) is E.EKEYREJECTED

    # A blacklisted intermediate breaks every chain through it, and vouches for nothing.
    restricted = c.newring("restricted", "@s")
    c.restrict_keyring(restricted, "asymmetric", f"key_or_keyring:{inter}")
    assert c.x509_verify(server, trust, chain)[1][0] == inter
    c.add("blacklist", bin_(inter_cert.public_bytes(serialization.Encoding.DER)), b"", blacklist)
    reason = rejection(lambda: c.x509_verify(server, trust, chain))
    assert "blacklisted" in reason and "CN=Doomed Intermediate" in reason
    assert refused(lambda: c.link(server, restricted)) is E.EKEYREJECTED


def test_a_blacklisted_key_refuses_every_certificate_for_it(system, pki):
    """bin: of a key's SubjectPublicKeyInfo refused only the bare key: a certificate for it was admitted
    and validated, and a CA certificate for a banned key still vouched for what it signed."""
    c = system.client
    blacklist = c.find("keyring", ".blacklist")
    ca_key, leaf_key = ec_key(), ec_key()
    ca_cert = certificate("Key-banned CA", ca_key, ("Test Root", pki.root_key), ca=True)
    issuer = ("Key-banned CA", ca_key)
    own = certificate("key-banned leaf", leaf_key, issuer, eku=[SERVER], san=("example.com",))
    vouched = certificate("vouched leaf", ec_key(), issuer, eku=[SERVER], san=("example.com",))
    trust, chain, restricted = c.newring("kb trust", "@s"), c.newring("kb chain", "@s"), c.newring("kb ring", "@s")
    add_cert(c, pki.root, trust)
    ca = add_cert(c, ca_cert, chain)
    c.restrict_keyring(restricted, "asymmetric", f"key_or_keyring:{ca}")
    leaf = add_cert(c, vouched)
    assert c.x509_verify(leaf, trust, chain)[1][0] == ca

    c.add("blacklist", bin_(spki(leaf_key)), b"", blacklist)
    assert refused(lambda: add_cert(c, own)) is E.EKEYREJECTED
    c.add("blacklist", bin_(spki(ca_key)), b"", blacklist)
    assert refused(lambda: c.link(ca, trust)) is E.EKEYREJECTED
    assert "blacklisted certificates were not used: CN=Key-banned CA" in rejection(
        lambda: c.x509_verify(leaf, trust, chain))
    assert refused(lambda: add_cert(c, vouched, restricted)) is E.EKEYREJECTED

    # "tbs:" also matches the TBS hashed with the certificate's own algorithm, as the kernel hashes it.
    sha384 = (x509.CertificateBuilder().subject_name(name("sha384 leaf")).issuer_name(name("Test Root"))
              .public_key(ec_key().public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY).sign(pki.root_key, hashes.SHA384()))
    c.add("blacklist", "tbs:" + hashlib.sha384(sha384.tbs_certificate_bytes).hexdigest(), b"", blacklist)
    assert refused(lambda: add_cert(c, sha384)) is E.EKEYREJECTED


def ecdsa_twin(cert: x509.Certificate, order: int) -> bytes:
    """``cert`` (ECDSA with SHA-256) with its signature (r, s) as (r, order - s): as valid, and anyone can
    make it."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
    from cryptography.x509.oid import SignatureAlgorithmOID

    def tlv(tag: int, body: bytes) -> bytes:
        n, size = len(body), (len(body).bit_length() + 7) // 8
        return bytes([tag]) + (bytes([n]) if n < 128 else bytes([0x80 | size]) + n.to_bytes(size, "big")) + body
    assert cert.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    r, s_ = decode_dss_signature(cert.signature)
    algorithm = tlv(0x30, tlv(0x06, bytes.fromhex("2a8648ce3d040302")))  # 1.2.840.10045.4.3.2, no parameters
    return tlv(0x30, cert.tbs_certificate_bytes + algorithm + tlv(0x03, b"\x00" + encode_dss_signature(r, order - s_)))


P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def test_a_bin_ban_refuses_an_ecdsa_certificates_twin(system, pki):
    """ECDSA's (r, s) and (r, n - s) both verify: from a banned certificate alone anyone made its twin,
    whose whole-DER hash differs, and a "bin:" ban let the twin in, vouch and build chains (found by the
    X.509 hunt)."""
    c = system.client
    blacklist = c.find("keyring", ".blacklist")
    inter_key = ec_key()
    inter_cert = certificate("Twin Intermediate", inter_key, ("Test Root", pki.root_key), ca=True)
    twin = ecdsa_twin(inter_cert, P256_ORDER)
    x509.load_der_x509_certificate(twin).verify_directly_issued_by(pki.root)  # a valid certificate
    assert twin != inter_cert.public_bytes(serialization.Encoding.DER)
    trust, restricted = c.newring("tw trust", "@s"), c.newring("tw ring", "@s")
    add_cert(c, pki.root, trust)
    c.restrict_keyring(restricted, "asymmetric", f"key_or_keyring:{trust}:chain")
    c.add("blacklist", bin_(inter_cert.public_bytes(serialization.Encoding.DER)), b"", blacklist)
    for blob in (inter_cert.public_bytes(serialization.Encoding.DER), twin):
        for keyring in ("@s", restricted):
            assert refused(lambda: c.add("asymmetric", "", blob, keyring)) is E.EKEYREJECTED


@pytest.mark.parametrize("curve", sorted(X.CURVE_ORDERS))
def test_an_ecdsa_certificate_has_a_twin_for_its_signers_curve(curve):
    """Each curve order keyden knows makes the twin a verifier accepts (a wrong constant would not), and a
    ban of either one names the other: P-521, brainpool and secp256k1 signers reach keyden in TLS chains."""
    curves = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1, "secp521r1": ec.SECP521R1,
              "secp256k1": ec.SECP256K1, "brainpoolP256r1": ec.BrainpoolP256R1,
              "brainpoolP384r1": ec.BrainpoolP384R1, "brainpoolP512r1": ec.BrainpoolP512R1}
    issuer_key = ec.generate_private_key(curves[curve]())
    issuer = certificate("Curve Issuer", issuer_key, ca=True)
    leaf = certificate("curve leaf", ec_key(), ("Curve Issuer", issuer_key))
    twins = X.signature_twins(leaf)
    verifying = [t for t in twins if _verifies(x509.load_der_x509_certificate(t), issuer)]
    assert len(verifying) == 1 and verifying[0] != leaf.public_bytes(serialization.Encoding.DER)
    twin = x509.load_der_x509_certificate(verifying[0])
    assert bin_(leaf.public_bytes(serialization.Encoding.DER)) in X.blacklist_descriptions(twin)
    assert bin_(verifying[0]) in X.blacklist_descriptions(leaf)


def _verifies(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


def test_a_signature_with_unused_bits_is_refused(client, pki):
    """pyca takes a signature BIT STRING with 1-7 unused bits and hands back the same signature: the same
    certificate with another DER, and another "bin:" hash (for RSA and Ed25519 too).  OpenSSL refuses it."""
    der = next(d for d in (certificate("padded", ec_key(), ("Test Root", pki.root_key)).public_bytes(
        serialization.Encoding.DER) for _ in range(64)) if d[-1] % 2 == 0)
    assert der[-len(x509.load_der_x509_certificate(der).signature) - 1] == 0  # the unused-bits byte
    padded = bytearray(der)
    padded[-len(x509.load_der_x509_certificate(der).signature) - 1] = 1
    assert x509.load_der_x509_certificate(bytes(padded)).signature == x509.load_der_x509_certificate(der).signature
    with pytest.raises(E.EBADMSG, match="unused bits"):
        client.add("asymmetric", "", bytes(padded), "@s")


def test_a_banned_copy_of_a_signer_does_not_shadow_an_unbanned_one(system, pki):
    """Two certificates for one CA key, the older banned by tbs: whether the CA vouched depended on which
    was linked first (only the first copy of a key was tried; found by the X.509 hunt).  With the banned
    copy alone, the signer is blacklisted."""
    c = system.client
    blacklist = c.find("keyring", ".blacklist")
    ca_key = ec_key()
    old = certificate("Renewed CA 2025", ca_key, ("Test Root", pki.root_key), ca=True)  # (descriptions differ:
    current = certificate("Renewed CA", ca_key, ("Test Root", pki.root_key), ca=True)   # one keyring holds both)
    leaf_cert = certificate("renewed leaf", ec_key(), ("Renewed CA", ca_key), eku=[SERVER], san=("example.com",))
    restricted = []
    for i, order in enumerate(((old, current), (current, old), (old,))):  # all linked before the ban (after
        trust = c.newring(f"renewed trust {i}", "@s")                     # it, refused)
        for cert in order:
            add_cert(c, cert, trust)
        ring = c.newring(f"renewed ring {i}", "@s")
        c.restrict_keyring(ring, "asymmetric", f"key_or_keyring:{trust}")
        restricted.append(ring)
    c.add("blacklist", tbs(old), b"", blacklist)
    add_cert(c, leaf_cert, restricted[0])
    add_cert(c, leaf_cert, restricted[1])
    assert rejection(lambda: add_cert(c, leaf_cert, restricted[2])) == "the certificate's signer is blacklisted"


def test_blacklist_entries_are_checked_and_live_in_blacklist_only(system):
    c = system.client
    blacklist = c.find("keyring", ".blacklist")
    good = "tbs:" + "ab" * 32
    for desc in ("tbs:" + "AB" * 32, "tbs:abc", "tbs:", "sha:" + "ab" * 32, "ab" * 32, "bin:" + "ab" * 65):
        assert refused(lambda: c.add("blacklist", desc, b"", blacklist)) is E.EINVAL, desc
    assert refused(lambda: c.add("blacklist", good, b"data", blacklist)) is E.EINVAL
    assert refused(lambda: c.add("blacklist", good, b"", "@s")) is E.EPERM
    assert refused(lambda: c.add("user", "not a hash", b"x", blacklist)) is E.EOPNOTSUPP
    entry = c.add("blacklist", good, b"", blacklist)
    assert c.search(blacklist, "blacklist", good) == entry
    assert (c.describe(entry).perm, c.describe(entry).uid) == (0x09090909, 0)
    assert refused(lambda: c.invalidate(entry)) is E.EPERM  # permanent, as the kernel's


def test_a_bad_blacklist_file_stops_the_daemon():
    with tempfile.NamedTemporaryFile("w", suffix=".blacklist") as f:
        f.write("tbs:" + "AB" * 32 + "\n")
        f.flush()
        d = Daemon(f'ca_bundle = ""\nblacklist_file = "{f.name}"\n')
        try:
            with pytest.raises(RuntimeError, match="exited early"):
                d.start()
            assert f"{f.name}:1:" in d.read_log()
        finally:
            d.cleanup()


def test_another_user_finds_uses_but_cannot_change_the_system_keyrings(system, pki):
    sock = system.daemon.socket
    server_pem = pem(pki.server)
    inter_pem = pem(pki.inter)

    def probe():
        with keyden.connect(sock) as c:
            _, token = c.join_session()
        with keyden.connect(sock, session=token) as c:
            builtin = c.find("keyring", ".builtin_trusted_keys")
            secondary = c.find("keyring", ".secondary_trusted_keys")
            (root,) = c.read(builtin)
            chain = c.newring("chain", "@s")
            c.add("asymmetric", "", inter_pem, chain)
            leaf = c.add("asymmetric", "", server_pem, "@s")
            outcome = {}
            for label, call in (
                    ("search", lambda: c.search(builtin, "asymmetric", c.describe(root).description) == root),
                    ("verify", lambda: len(c.x509_verify(leaf, "%:.builtin_trusted_keys", chain, host="example.com"))),
                    ("link a system certificate", lambda: c.link(root, "@s")),
                    ("add to secondary", lambda: c.add("asymmetric", "", inter_pem, secondary)),
                    ("add to blacklist", lambda: c.add("blacklist", "tbs:" + "cd" * 32, b"", "%:.blacklist")),
                    ("link builtin", lambda: c.link(builtin, "@s")),
                    ("invalidate builtin", lambda: c.invalidate(builtin)),
                    ("restrict builtin", lambda: c.restrict_keyring(builtin)),
                    ("setperm builtin", lambda: c.setperm(builtin, 0x3F3F3F3F))):
                try:
                    outcome[label] = call()
                except keyden.KeydenError as exc:
                    outcome[label] = type(exc).__name__
            return outcome

    with temporary_users({"t": ()}) as (made, _gids):
        assert run_as(made["t"], probe) == {
            "search": True, "verify": 3, "link a system certificate": None, "add to secondary": "EACCES",
            "add to blacklist": "EACCES", "link builtin": "EACCES", "invalidate builtin": "EPERM",
            "restrict builtin": "EACCES", "setperm builtin": "EACCES"}


# ------------------------------------------------------------------------- CLI


def cli(socket: str, *args: str, session: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), KEYDEN_SESSION=session)
    return subprocess.run([sys.executable, "-m", "keyden", "--socket", socket, *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


def test_cli_x509_verify_restrict_and_blacklist(system, pki):
    c = system.client
    run = functools.partial(cli, system.daemon.socket, session=c.session_token)
    trust, chain = c.newring("cli trust", "@s"), c.newring("cli chain", "@s")
    root, inter = add_cert(c, pki.root, trust), add_cert(c, pki.inter, chain)
    leaf, future = add_cert(c, pki.server), add_cert(c, pki.future)

    ok = run("x509_verify", str(leaf), str(trust), "--chain", str(chain), "--host", "example.com",
             "--purpose", "server")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.decode().splitlines() == ["OK", f"{leaf:9d} CN=server", f"{inter:9d} CN=Test Intermediate",
                                               f"{root:9d} CN=Test Root"]
    bad = run("x509_verify", str(leaf), str(trust), f"--chain={chain}", "--host", "other.example")
    assert (bad.returncode, bad.stderr.decode()) == (
        1, "x509_verify: hostname mismatch: the certificate is not valid for other.example\n")
    later = (NOW + 5 * DAY).strftime("%Y-%m-%dT%H:%M:%S")
    assert run("x509_verify", str(future), str(trust), "--chain", str(chain), "--at", later).returncode == 0
    assert run("x509_verify", str(future), str(trust), "--chain", str(chain),
               "--at", str(int(time.time()))).stderr.decode().startswith("x509_verify: certificate is not yet valid")
    assert run("x509_verify", str(leaf), str(trust), "--purpose", "email").returncode == 2
    assert run("x509_verify", str(leaf), str(trust), "--at", "yesterday").returncode == 2

    ring = c.newring("cli restricted", "@s")
    r = run("restrict_keyring", str(ring), "asymmetric", f"key_or_keyring:{trust}:chain")
    assert r.returncode == 0, r.stderr
    assert run("link", str(leaf), str(ring)).stderr.decode() == "keyctl_link: Required key not available\n"
    assert run("link", str(inter), str(ring)).returncode == 0

    doomed = certificate("cli doomed", ec_key(), ("Test Intermediate", pki.inter_key), eku=[SERVER])
    doomed_serial = add_cert(c, doomed)
    printed = run("x509_hashes", str(doomed_serial)).stdout.decode().split()
    assert printed == [tbs(doomed), bin_(doomed.public_bytes(serialization.Encoding.DER)),
                       bin_(doomed.public_key().public_bytes(serialization.Encoding.DER,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo))]
    r = run("padd", "blacklist", printed[0], "%:.blacklist")
    assert r.returncode == 0, r.stderr
    assert run("x509_verify", str(doomed_serial), str(trust), "--chain", str(chain)).stderr.decode() == \
        "x509_verify: certificate is blacklisted\n"
