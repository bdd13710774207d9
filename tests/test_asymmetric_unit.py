"""Behaviour tests for keyden.crypto.asymmetric (the "asymmetric" key type, no daemon)."""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import os
import pickle
import random
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization as S
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, utils, x25519
from cryptography.x509.oid import NameOID

from keyden import errors as E
from keyden import protocol as W
from keyden.core import keytypes as T
from keyden.crypto import asymmetric as A

try:
    from tests import wycheproof
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    import wycheproof

DER, PEM = S.Encoding.DER, S.Encoding.PEM
NOENC = S.NoEncryption()


# ---------------------------------------------------------------------------
# fixtures: keys and certificates made here with pyca


def test_the_clients_know_the_hashes_the_daemon_signs_with():
    """Remote keys refuse other hashes as pyca's UnsupportedAlgorithm before asking (client/handles.py)."""
    assert set(W.PKEY_HASHES) == set(A._HASHES)
    assert all(A._HASHES[name]().name == name for name in W.PKEY_HASHES)  # pyca's names are the info string's
    assert W.MAX_PKEY_INFO == A.MAX_INFO  # the clients check OAEP labels against it


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(65537, 2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def make_cert(priv, *, name=None, skid="spki", serial=None, extensions=()):
    name = name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Signer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(priv.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    if skid == "spki":
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(priv.public_key()), False)
    elif skid is not None:
        builder = builder.add_extension(x509.SubjectKeyIdentifier(skid), False)
    algorithm = None if isinstance(priv, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(priv, algorithm)


def pkcs8(priv, encoding=DER, enc=NOENC):
    return priv.private_bytes(encoding, S.PrivateFormat.PKCS8, enc)


def spki(priv, encoding=DER):
    return priv.public_key().public_bytes(encoding, S.PublicFormat.SubjectPublicKeyInfo)


def spki_id(priv):
    return x509.SubjectKeyIdentifier.from_public_key(priv.public_key()).digest


@pytest.fixture(scope="module")
def parsed(keys):
    """A ParsedKey per algorithm: private (pkcs8) and public (spki)."""
    out = {}
    for name, priv in keys.items():
        out[name] = A.parse(pkcs8(priv))
        out[name + "-pub"] = A.parse(spki(priv))
    return out


# ---------------------------------------------------------------------------
# parsing: every format


@pytest.mark.parametrize("algo", ["rsa", "p256", "p384", "ed25519"])
@pytest.mark.parametrize("encoding", [DER, PEM])
def test_parse_certificate(keys, algo, encoding):
    priv = keys[algo]
    cert = make_cert(priv)
    data = cert.public_bytes(encoding)
    key = A.parse(data)
    assert key.source == "x509" and not key.has_private
    assert key.certificate == cert
    assert key.algo == {"rsa": "rsa", "ed25519": "ed25519"}.get(algo, "ecdsa")
    assert key.curve == (algo if algo in ("p256", "p384") else None)
    assert key.key_bits == {"rsa": 2048, "p256": 256, "p384": 384, "ed25519": 256}[algo]
    # SKID equals the SPKI id here, so it is not repeated: [spki id, serial||issuer].
    serial = cert.serial_number.to_bytes((cert.serial_number.bit_length() + 8) // 8, "big")
    issuer = cert.issuer.public_bytes()
    assert issuer[:2] == b"\x30" + bytes([len(issuer) - 2])  # a short SEQUENCE header, left out:
    assert key.key_ids == (spki_id(priv), serial + issuer[2:])  # the kernel's raw serial ‖ raw issuer
    assert key.default_description == f"Test Signer: {spki_id(priv).hex()}"
    assert key.spki_der == spki(priv)


def test_certificate_with_own_skid_and_without_skid(keys):
    priv = keys["p256"]
    own = A.parse(make_cert(priv, skid=b"\x01\x02\x03\x04").public_bytes(DER))
    assert own.key_ids[:2] == (spki_id(priv), b"\x01\x02\x03\x04") and len(own.key_ids) == 3
    assert own.default_description == "Test Signer: 01020304"
    huge = A.parse(make_cert(priv, skid=b"\x05" * 3000, serial=0x77).public_bytes(DER))
    assert huge.key_ids[1] == b"\x05" * 3000
    assert huge.default_description == "Test Signer: 77"  # bounded length: the serial, as without an SKID
    long_serial = A.parse(make_cert(priv, skid=None, serial=1 << 158).public_bytes(DER))  # 20 bytes: RFC 5280's most
    assert long_serial.default_description == "Test Signer: " + (1 << 158).to_bytes(20, "big").hex()
    with pytest.MonkeyPatch.context() as mp:  # a serial as long as a crafted certificate may carry
        mp.setattr(A, "_serial_bytes", lambda serial: bytes(2100))
        crafted = A.parse(make_cert(priv, skid=None).public_bytes(DER))
    assert crafted.default_description == f"Test Signer: {spki_id(priv).hex()}"  # bounded: the SPKI id
    none = A.parse(make_cert(priv, skid=None, serial=0x80).public_bytes(DER))
    assert none.key_ids[0] == spki_id(priv) and len(none.key_ids) == 2
    assert none.default_description == "Test Signer: 0080"  # the kernel's: the serial's DER content octets


@pytest.mark.parametrize("attributes, name", [
    ([("O", "Example Org"), ("CN", "Signing key")], "Example Org: Signing key"),
    ([("O", "Example"), ("CN", "Example signing key")], "Example signing key"),  # the CN begins with the O
    ([("O", "Example Org"), ("CN", "Example Inc key")], "Example Inc key"),  # the first 7 bytes are shared
    ([("O", "Org"), ("CN", "Orgx")], "Orgx"),
    ([("O", "Only Org")], "Only Org"),
    ([("E", "ca@example.com")], "ca@example.com"),
    ([("C", "DE")], ""),  # no CN, O or e-mail: ": <id>"
    ([("CN", "first"), ("CN", "last")], "last"),  # the kernel's parser keeps the last of each
])
def test_a_certificate_s_default_description_is_the_kernel_s(keys, attributes, name):
    oids = {"O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME, "E": NameOID.EMAIL_ADDRESS,
            "C": NameOID.COUNTRY_NAME}
    subject = x509.Name([x509.NameAttribute(oids[k], v) for k, v in attributes])
    key = A.parse(make_cert(keys["p256"], name=subject, skid=b"\xab\xcd").public_bytes(DER))
    assert key.default_description == f"{name}: abcd"


def test_proc_keys_summary_names_the_kind_the_algorithm_and_a_certificates_skid_tail(keys):
    """asymmetric_key_describe: "X509.<algorithm> <last 4 bytes of the SKID> []", no tail without an SKID
    (nor for a private key, whose kernel parser gives it no id)."""
    assert A.parse(make_cert(keys["p256"], skid=b"\x01\x02\x03\x04\x05").public_bytes(DER)).summary == \
        "X509.ecdsa-nist-p256 02030405 []"
    assert A.parse(make_cert(keys["rsa"], skid=None).public_bytes(DER)).summary == "X509.rsa []"
    assert A.parse(pkcs8(keys["p384"])).summary == "PKCS8.ecdsa-nist-p384 []"
    assert A.parse(spki(keys["ed25519"])).summary == "SPKI.ed25519 []"


@pytest.mark.parametrize("attrs,label", [
    ([(NameOID.ORGANIZATION_NAME, "Acme Ltd"), (NameOID.COUNTRY_NAME, "NL")], "Acme Ltd"),
    ([(NameOID.EMAIL_ADDRESS, "ops@example.org")], "ops@example.org"),
    ([(NameOID.COUNTRY_NAME, "NL")], ""),
    ([(NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "Signer\nTwo")], "Acme: Signer?Two"),
])
def test_certificate_description_fallbacks(keys, attrs, label):
    name = x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])
    key = A.parse(make_cert(keys["ed25519"], name=name).public_bytes(PEM))
    assert key.default_description == f"{label}: {spki_id(keys['ed25519']).hex()}"


@pytest.mark.parametrize("algo,label", [
    ("rsa", "RSA-2048"), ("p256", "ECDSA-P256"), ("p384", "ECDSA-P384"), ("ed25519", "Ed25519"),
])
@pytest.mark.parametrize("encoding", [DER, PEM])
def test_parse_pkcs8_and_spki(keys, algo, label, encoding):
    priv = keys[algo]
    key = A.parse(pkcs8(priv, encoding))
    assert (key.source, key.has_private, key.certificate) == ("pkcs8", True, None)
    assert key.key_ids == (spki_id(priv),)
    assert key.default_description == f"{label} private key: {spki_id(priv).hex()}"
    pub = A.parse(spki(priv, encoding))
    assert (pub.source, pub.has_private) == ("spki", False)
    assert pub.default_description == f"{label} public key: {spki_id(priv).hex()}"
    assert pub.spki_der == key.spki_der == spki(priv)


def test_certificate_and_private_key_share_spki_id(keys):
    for priv in keys.values():
        cert_key = A.parse(make_cert(priv, skid=b"\xaa" * 20).public_bytes(PEM))
        priv_key = A.parse(pkcs8(priv))
        assert cert_key.key_ids[0] == priv_key.key_ids[0]


@pytest.mark.parametrize("encoding", [DER, PEM])
def test_encrypted_pkcs8(keys, encoding):
    data = pkcs8(keys["p256"], encoding, S.BestAvailableEncryption(b"s3cret"))
    key = A.parse(data, b"s3cret")
    assert (key.source, key.has_private, key.algo) == ("pkcs8", True, "ecdsa")
    for missing in (None, b""):
        with pytest.raises(E.EBADMSG, match="wrong or missing password"):
            A.parse(data, missing)
    with pytest.raises(E.EKEYREJECTED):
        A.parse(data, b"wrong")
    with pytest.raises(E.EINVAL):
        A.parse(data, "s3cret")  # str, not bytes


def test_password_for_unencrypted_data_is_refused(keys):
    for data in (pkcs8(keys["rsa"]), spki(keys["rsa"]), make_cert(keys["rsa"]).public_bytes(PEM)):
        with pytest.raises(E.EINVAL, match="password"):
            A.parse(data, b"pw")


@pytest.mark.parametrize("algo,label", [("rsa", "RSA PRIVATE KEY"), ("p384", "EC PRIVATE KEY")])
def test_traditional_pem(keys, algo, label):
    priv = keys[algo]
    data = priv.private_bytes(PEM, S.PrivateFormat.TraditionalOpenSSL, NOENC)
    assert data.startswith(f"-----BEGIN {label}-----".encode())
    key = A.parse(data)
    assert (key.source, key.has_private, key.key_ids) == ("pem", True, (spki_id(priv),))
    encrypted = priv.private_bytes(PEM, S.PrivateFormat.TraditionalOpenSSL, S.BestAvailableEncryption(b"pw"))
    assert A.parse(encrypted, b"pw").source == "pem"
    with pytest.raises(E.EBADMSG, match="wrong or missing password"):
        A.parse(encrypted)
    with pytest.raises(E.EKEYREJECTED):
        A.parse(encrypted, b"nope")
    # Traditional DER is not a kernel format and is refused like garbage.
    with pytest.raises(E.EBADMSG):
        A.parse(priv.private_bytes(DER, S.PrivateFormat.TraditionalOpenSSL, NOENC))


def test_pkcs1_public_key_is_not_spki(keys):
    pub = keys["rsa"].public_key()
    for encoding in (DER, PEM):
        with pytest.raises(E.EBADMSG):
            A.parse(pub.public_bytes(encoding, S.PublicFormat.PKCS1))


def test_an_asymmetric_key_costs_100_bytes_unless_its_payload_is_oversized(keys):
    """The kernel's flat quotalen = 100; past 16 KiB (padding around a PEM block) the excess is paid too."""
    asymmetric = T.REGISTRY["asymmetric"]
    block = spki(keys["rsa"], PEM)
    assert asymmetric.preparse(block)[1] == 100
    assert asymmetric.preparse(make_cert(keys["rsa"]).public_bytes(DER))[1] == 100
    padded = block + b"\n" + b"x" * (20000 - len(block) - 1)
    assert asymmetric.preparse(padded)[1] == 100 + 20000 - 16384


def glued(pem: bytes, where: str) -> bytes:
    """``pem`` with its first base64 line on the BEGIN line, or its last on the END line: pyca reads both."""
    lines = pem.rstrip(b"\n").split(b"\n")
    if where == "begin":
        return b"\n".join([lines[0] + lines[1], *lines[2:]]) + b"\n"
    return b"\n".join([*lines[:-2], lines[-2] + lines[-1]]) + b"\n"


def test_pem_read_as_pyca_reads_it(keys):
    """base64 on the BEGIN or END line is part of the block, as for pyca; the contents must be what the
    label says; openssl ecparam -genkey's EC PARAMETERS block before the key is passed over."""
    priv = keys["p256"]
    for data in (pkcs8(priv, PEM), spki(priv, PEM), make_cert(priv).public_bytes(PEM),
                 priv.private_bytes(PEM, S.PrivateFormat.TraditionalOpenSSL, NOENC)):
        for where in ("begin", "end"):
            assert A.parse(glued(data, where)).key_ids == A.parse(data).key_ids
    public = spki(priv, PEM)
    with pytest.raises(E.EBADMSG, match="not what its label"):
        A.parse(public.replace(b"PUBLIC KEY", b"PRIVATE KEY"))
    with pytest.raises(E.EBADMSG, match="not what its label"):
        A.parse(pkcs8(keys["rsa"], PEM).replace(b"PRIVATE KEY", b"RSA PRIVATE KEY"))
    ec_traditional = priv.private_bytes(PEM, S.PrivateFormat.TraditionalOpenSSL, NOENC)
    with pytest.raises(E.EBADMSG, match="not what its label"):
        A.parse(ec_traditional.replace(b"EC PRIVATE KEY", b"RSA PRIVATE KEY"))
    made = subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey"], check=True,
                          capture_output=True).stdout
    assert made.startswith(b"-----BEGIN EC PARAMETERS-----")
    key = A.parse(made)
    assert (key.source, key.algo, key.has_private) == ("pem", "ecdsa", True)


def test_pem_with_surrounding_text_and_multiple_blocks(keys):
    block = spki(keys["ed25519"], PEM)
    data = b"Bag Attributes\n    friendlyName: x\n" + block + b"\ntrailing words\n"
    key = A.parse(data)
    assert key.source == "spki"
    with pytest.raises(E.EINVAL, match="more than one PEM block"):
        A.parse(block + make_cert(keys["ed25519"]).public_bytes(PEM))
    with pytest.raises(E.EBADMSG):
        A.parse(block.replace(b"PUBLIC KEY", b"OPENSSH PRIVATE KEY"))


def test_der_that_mentions_pem_is_still_der(keys):
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "-----BEGIN PUBLIC KEY-----")])
    key = A.parse(make_cert(keys["p256"], name=name).public_bytes(DER))
    assert key.source == "x509" and key.default_description.startswith("-----BEGIN PUBLIC KEY-----: ")


def test_unsupported_algorithms_and_sizes():
    cases = [
        rsa.generate_private_key(65537, 1024),
        ec.generate_private_key(ec.SECP521R1()),
        ec.generate_private_key(ec.SECP256K1()),
        ed448.Ed448PrivateKey.generate(),
        dsa.generate_private_key(2048),
    ]
    for priv in cases:
        for data in (pkcs8(priv), spki(priv)):
            with pytest.raises(E.EINVAL, match="unsupported"):
                A.parse(data)
    with pytest.raises(E.EINVAL, match="unsupported RSA size"):
        A.parse(make_cert(cases[0]).public_bytes(DER))


def test_x25519_keys_are_for_key_agreement_only():
    priv = x25519.X25519PrivateKey.generate()
    for data in (pkcs8(priv), spki(priv)):
        key = A.parse(data)
        assert key.algo == "x25519" and key.query().supported_ops == 0
        assert key.default_description.startswith("X25519 ")
        with pytest.raises(E.EOPNOTSUPP, match="derive"):
            key.verify("", b"m", b"s" * 64)
    assert A.generate("x25519").has_private


def test_a_certificate_over_64_kib_is_refused_before_it_is_parsed(keys):
    """pyca holds the GIL through parts of a certificate's parse (40-50 ms at a stretch on 820 KB of 60000
    extensions, every thread of the daemon stopped: a GIL hunt).  1000 subjectAltNames still fit."""
    names = x509.SubjectAlternativeName([x509.DNSName(f"host{i}.example.com") for i in range(1000)])
    fits = make_cert(keys["p256"], extensions=[(names, False)]).public_bytes(DER)
    assert 20_000 < len(fits) <= A.MAX_CERTIFICATE and A.parse(fits).source == "x509"
    names = x509.SubjectAlternativeName([x509.DNSName(f"host{i}.example.com") for i in range(4000)])
    big = make_cert(keys["p256"], extensions=[(names, False)])
    for data in (big.public_bytes(DER), big.public_bytes(PEM)):
        with pytest.raises(E.EINVAL, match="certificate larger than 64 KiB"):
            A.parse(data)
        # one an earlier version stored comes back at a restart (persist.records restores through restore())
        assert T.REGISTRY["asymmetric"].restore(data)[0].source == "x509"


def test_huge_rsa_private_key_refused_before_validation():
    """An 8192-bit key is refused by size without OpenSSL's multi-second key check."""
    case = next(c for c in wycheproof.load("Cipher", "rsa_oaep_misc_test.json") if c.group["keySize"] == 8192)
    with pytest.raises(E.EINVAL, match="unsupported RSA size"):
        A.parse(case.group_hex("privateKeyPkcs8"))


def _tlv(tag: int, body: bytes) -> bytes:
    n, size = len(body), (len(body).bit_length() + 7) // 8
    head = bytes([n]) if n < 128 else bytes([0x80 | size]) + n.to_bytes(size, "big")
    return bytes([tag]) + head + body


def _int(v: int) -> bytes:
    return _tlv(0x02, v.to_bytes((v.bit_length() + 8) // 8, "big"))


def _oid(hexstr: str) -> bytes:
    return _tlv(0x06, bytes.fromhex(hexstr))


_DH_OID = "2a864886f70d010301"  # PKCS #3 dhKeyAgreement


def _dh_group(p: int) -> bytes:
    return _tlv(0x30, _oid(_DH_OID) + _tlv(0x30, _int(p) + _int(2)))


def _dh_certificate(spki_der: bytes) -> bytes:
    """A signed certificate for the key ``spki_der`` (pyca builds none for a DH key: one is built for an
    X25519 key, then its key swapped and the TBS signed again)."""
    ca = ed25519.Ed25519PrivateKey.generate()
    stand_in = x25519.X25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dh")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(stand_in.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)).sign(ca, None))
    body = cert.tbs_certificate_bytes
    body = body[2 + (body[1] & 0x7F if body[1] & 0x80 else 0):]  # the TBS SEQUENCE's contents
    tbs = _tlv(0x30, body.replace(spki(stand_in), spki_der))
    return _tlv(0x30, tbs + _tlv(0x30, _oid("2b6570")) + _tlv(0x03, b"\0" + ca.sign(tbs)))


def test_a_dh_key_is_refused_unloaded():
    """pyca proves a DH group's prime prime (OpenSSL's DH_check) as it loads the key, holding the GIL, so
    every thread of the daemon: 2-4 s for a 4096-bit prime any uid may send (a DoS hunt).  keyden holds
    no DH key, and refuses one by its algorithm identifier, before pyca sees it.  A composite prime shows
    which came first: pyca's check refuses it as unreadable (EBADMSG)."""
    composite = int.from_bytes(bytes([0xC5] * 256), "big") | 1
    group = _dh_group(composite)
    public = _tlv(0x30, group + _tlv(0x03, b"\0" + _int(5)))  # SubjectPublicKeyInfo
    for data in (public, _tlv(0x30, _int(0) + group + _tlv(0x04, _int(12345))), _dh_certificate(public)):
        with pytest.raises(E.EINVAL, match="unsupported key algorithm"):
            A.parse(data)


def test_a_tls_peers_dh_certificate_is_not_loaded():
    """A TLS peer's chain: each certificate's key is read (a ban of it may exist), but a DH key's is not
    loaded (pyca would prove its group's prime prime, every thread held): it reads as one keyden cannot
    read, which refuses the chain."""
    from keyden.crypto import x509 as keyden_x509

    class DHCertificate:  # (pyca's certificates cannot be told to refuse a load: this one fails the test)
        public_key_algorithm_oid = x509.ObjectIdentifier("1.2.840.10046.2.1")

        def public_key(self):
            raise AssertionError("the DH key was loaded")

    assert keyden_x509.spki_of(DHCertificate()) == b""


def test_an_rsa_key_whose_parts_do_not_fit_is_rejected_without_openssls_key_check():
    """OpenSSL's key check proves p and q prime, holding every thread of the daemon for 290 ms at 4096
    bits (any uid may send keys: a DoS hunt).  keyden checks that the parts fit and that the key signs
    what its public half verifies, which a composite p fails unless d fits its factors too (a multi-prime
    key: it then signs correctly, so OpenSSL's fallback from a CRT result it checks)."""
    good = rsa.generate_private_key(65537, 2048)
    n = good.private_numbers()

    def der(p, q, d, dmp1=None, dmq1=None, iqmp=None):
        numbers = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p) if dmp1 is None else dmp1,
                                        rsa.rsa_crt_dmq1(d, q) if dmq1 is None else dmq1,
                                        rsa.rsa_crt_iqmp(p, q) if iqmp is None else iqmp,
                                        rsa.RSAPublicNumbers(65537, p * q))
        return pkcs8(numbers.private_key(unsafe_skip_rsa_key_validation=True))

    assert A.parse(der(n.p, n.q, n.d)).has_private
    primes = [int(subprocess.run(["openssl", "prime", "-generate", "-bits", str(bits)], capture_output=True,
                                 check=True, text=True).stdout) for bits in (512, 512, 1040)]
    p, q = primes[0] * primes[1], primes[2]  # p composite: n = pq of 2062-2064 bits, d fits (p-1)(q-1)
    d = pow(65537, -1, (p - 1) * (q - 1))
    for bad in (der(n.p, n.q, n.d + 2), der(n.p, n.q, n.d, dmp1=n.dmp1 + 2), der(n.p, n.q, n.d, iqmp=n.iqmp + 1),
                der(p, q, d)):
        with pytest.raises(E.EKEYREJECTED, match="inconsistent RSA private key"):
            A.parse(bad)


def _epki(kdf_oid: str, kdf_params: bytes) -> bytes:
    """A hand-built EncryptedPrivateKeyInfo (PBES2, AES-256-CBC) with chosen KDF parameters."""
    seq = lambda *parts: _tlv(0x30, b"".join(parts))  # noqa: E731
    pbes2 = seq(seq(_oid(kdf_oid), kdf_params), seq(_oid("60864801650304012a"), _tlv(0x04, bytes(16))))
    return seq(seq(_oid("2a864886f70d01050d"), pbes2), _tlv(0x04, os.urandom(64)))


def test_costly_key_encryption_is_refused_before_running_the_kdf():
    salt = _tlv(0x04, os.urandom(16))
    prf = _tlv(0x30, _oid("2a864886f70d0209") + b"\x05\x00")
    pbkdf2 = "2a864886f70d01050c"
    scrypt = "2b06010401da47040b"
    costly = [
        _epki(pbkdf2, _tlv(0x30, salt + _int(1 << 31) + prf)),
        _epki(pbkdf2, _tlv(0x30, salt + _int(1 << 80) + prf)),
        _epki(scrypt, _tlv(0x30, salt + _int(1 << 24) + _int(8) + _int(1))),
        _epki(scrypt, _tlv(0x30, salt + _int(1 << 14) + _int(8) + _int(1 << 20))),
    ]
    for der in costly:
        pem = b"-----BEGIN ENCRYPTED PRIVATE KEY-----\n%s-----END ENCRYPTED PRIVATE KEY-----\n" % (
            base64.encodebytes(der))
        # pyca reads base64 on the BEGIN and END lines too: the check must see the same bytes (it once read
        # the lines between, and a low-cost decoy there let pyca run any iteration count)
        one_line = b"-----BEGIN ENCRYPTED PRIVATE KEY-----%s-----END ENCRYPTED PRIVATE KEY-----" % (
            base64.b64encode(der))
        for data in (der, pem, one_line, glued(pem, "begin"), glued(pem, "end")):
            with pytest.raises(E.EINVAL, match="too costly"):
                A.parse(data, b"pw")
    # Cheap parameters get through to the (failing) decryption.
    cheap = _epki(pbkdf2, _tlv(0x30, salt + _int(1000) + prf))
    with pytest.raises(E.EKEYREJECTED):
        A.parse(cheap, b"pw")
    # A PEM body the check cannot decode is refused rather than handed to pyca unchecked.
    with pytest.raises(E.EBADMSG, match="malformed PEM"):
        A.parse(b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nMII*\n-----END ENCRYPTED PRIVATE KEY-----\n", b"pw")


def test_key_encryption_whose_cost_is_not_bounded_here_is_refused_unrun():
    """Fail closed: pyca runs PBES1's pbeWithMD5AndDES-CBC with any iteration count (2**40: days), and
    would run whatever else it learns; only PBES2 (PBKDF2, scrypt) is let in, and keyden decrypts it."""
    seq = lambda *parts: _tlv(0x30, b"".join(parts))  # noqa: E731
    salt = _tlv(0x04, os.urandom(8))
    for pbes1 in ("2a864886f70d010503", "2a864886f70d01050a", "2a864886f70d010501"):  # MD5-DES, SHA1-DES, MD2-DES
        for iterations in (2048, 1 << 40):  # a regression fails at the first, before the second runs for days
            der = seq(seq(_oid(pbes1), seq(salt, _int(iterations))), _tlv(0x04, os.urandom(144)))
            with pytest.raises(E.EINVAL, match="PBES1"):
                A.parse(der, b"pw")
    unknown_kdf = _epki("2a864886f70d01050e", _tlv(0x30, salt + _int(1000)))  # not PBKDF2 or scrypt
    with pytest.raises(E.EINVAL, match="other than PBKDF2 or scrypt"):
        A.parse(unknown_kdf, b"pw")
    truncated = seq(seq(_oid("2a864886f70d01050d"), seq(seq(_oid("2a864886f70d01050c")))), _tlv(0x04, bytes(16)))
    with pytest.raises(E.EBADMSG, match="malformed encrypted private key"):
        A.parse(truncated, b"pw")
    legit = ec.generate_private_key(ec.SECP256R1())
    pbes2 = legit.private_bytes(DER, S.PrivateFormat.PKCS8, S.BestAvailableEncryption(b"pw"))
    pkcs12_pbe = subprocess.run(  # pyca writes no PKCS#12 PBE into PKCS#8; openssl does
        ["openssl", "pkcs8", "-topk8", "-v1", "PBE-SHA1-3DES", "-passout", "pass:pw", "-outform", "DER"],
        input=legit.private_bytes(PEM, S.PrivateFormat.PKCS8, NOENC), capture_output=True, check=True).stdout
    assert bytes.fromhex("2a864886f70d010c0103") in pkcs12_pbe[:20]  # pbeWithSHAAnd3-KeyTripleDES-CBC
    assert A.parse(pbes2, b"pw").public_key.public_numbers() == legit.public_key().public_numbers()
    with pytest.raises(E.EINVAL, match="PKCS#12 PBE are legacy"):  # only pyca's loader undoes it, and that
        A.parse(pkcs12_pbe, b"pw")                              # hides the key's algorithm (RSASSA-PSS)


def _openssl_pkcs8(priv, *args: str) -> bytes:
    return subprocess.run(["openssl", "pkcs8", "-topk8", *args, "-passout", "pass:pw", "-outform", "DER"],
                          input=priv.private_bytes(PEM, S.PrivateFormat.PKCS8, NOENC), capture_output=True,
                          check=True).stdout


def test_every_pbes2_scheme_openssl_writes_is_decrypted_by_keyden():
    """keyden decrypts PBES2 itself with pyca's primitives (pyca's loader holds the GIL through the KDF, and
    every client waited up to a second): each cipher and PBKDF2 hash openssl offers, and scrypt, must give
    the same key, and a wrong password EKEYREJECTED."""
    legit = ec.generate_private_key(ec.SECP256R1())
    ciphers = ("aes-128-cbc", "aes-192-cbc", "aes-256-cbc", "des3")
    made = [_openssl_pkcs8(legit, "-v2", cipher, "-v2prf", prf, "-iter", "1000")
            for cipher in ciphers for prf in ("hmacWithSHA1", "hmacWithSHA224", "hmacWithSHA256",
                                              "hmacWithSHA384", "hmacWithSHA512")]
    made += [_openssl_pkcs8(legit, "-v2", cipher, "-scrypt", "-scrypt_N", "1024") for cipher in ciphers]
    for der in made:
        assert A.parse(der, b"pw").public_key.public_numbers() == legit.public_key().public_numbers()
        with pytest.raises(E.EKEYREJECTED, match="wrong password"):
            A.parse(der, b"not it")
    camellia = _openssl_pkcs8(legit, "-v2", "camellia-256-cbc", "-iter", "1000")
    with pytest.raises(E.EINVAL, match="cipher keyden does not take"):
        A.parse(camellia, b"pw")
    salt = _tlv(0x04, os.urandom(16))
    sm3 = _epki("2a864886f70d01050c", _tlv(0x30, salt + _int(1000) + _tlv(0x30, _oid("2a811ccf550183750a"))))
    with pytest.raises(E.EINVAL, match="PBKDF2 hash keyden does not take"):
        A.parse(sm3, b"pw")
    for bad in (_int(0), _tlv(0x02, b"\xff")):  # 0 and -1 iterations
        with pytest.raises(E.EBADMSG, match="malformed"):
            A.parse(_epki("2a864886f70d01050c", _tlv(0x30, salt + bad)), b"pw")
    sound = _epki("2a864886f70d01050c", _tlv(0x30, salt + _int(1000)))
    for iv, data in ((bytes(8), bytes(64)), (b"", bytes(64)), (bytes(16), bytes(47)), (bytes(16), b"")):
        seq = lambda *parts: _tlv(0x30, b"".join(parts))  # noqa: E731
        odd = seq(seq(_oid("2a864886f70d01050d"), seq(seq(_oid("2a864886f70d01050c"), _tlv(0x30, salt + _int(1000))),
                                                      seq(_oid("60864801650304012a"), _tlv(0x04, iv)))),
                  _tlv(0x04, data))
        with pytest.raises(E.EBADMSG, match="malformed"):  # before the KDF runs, not a "wrong password"
            A.parse(odd, b"pw")
    with pytest.raises(E.EKEYREJECTED):
        A.parse(sound, b"pw")


def test_a_key_restricted_to_pss_is_refused_inside_an_encrypted_pkcs8_too(tmp_path):
    """pyca decrypted and loaded it as plain RSA, so it signed with PKCS#1 v1.5 and decrypted: the check
    for the restriction read only unencrypted keys (found by review)."""
    pss = subprocess.run(["openssl", "genpkey", "-algorithm", "RSA-PSS", "-pkeyopt", "rsa_keygen_bits:2048"],
                         capture_output=True, check=True).stdout
    encrypted = subprocess.run(["openssl", "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-passout", "pass:pw"],
                               input=pss, capture_output=True, check=True).stdout
    for data in (pss, encrypted):
        with pytest.raises(E.EINVAL, match="restricted to RSASSA-PSS"):
            A.parse(data, b"pw" if data is encrypted else None)


def _all_valid_encodings(keys):
    out = []
    for priv in keys.values():
        out += [pkcs8(priv), pkcs8(priv, PEM), spki(priv), spki(priv, PEM),
                make_cert(priv).public_bytes(DER), make_cert(priv).public_bytes(PEM),
                pkcs8(priv, DER, S.BestAvailableEncryption(b"pw"))]
    return out


def _check_only_keyden(data, password=None):
    try:
        A.parse(data, password)
    except E.KeydenError as exc:
        msg = str(exc)
        assert len(msg) < 200
        if len(data) >= 16:
            assert data[:16].hex() not in msg and data[-16:].hex() not in msg
        return exc
    return None


def test_hostile_inputs_raise_only_keyden_errors(keys):
    rng = random.Random(1234)
    valid = _all_valid_encodings(keys)
    inputs = [rng.randbytes(rng.randrange(1, 3000)) for _ in range(300)]
    inputs += [b"\x30" + rng.randbytes(rng.randrange(0, 400)) for _ in range(300)]
    inputs += [b"-----BEGIN PUBLIC KEY-----\n" + rng.randbytes(200) for _ in range(50)]
    for data in valid:
        step = max(1, len(data) // 60)
        inputs += [data[:cut] for cut in range(0, len(data), step)]          # truncations
        for _ in range(20):                                                   # bit flips
            pos = rng.randrange(len(data))
            inputs.append(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:])
        inputs.append(data + b"\x00")                                         # trailing byte
    for data in inputs:
        for password in (None, b"pw"):
            _check_only_keyden(data, password)


def test_empty_huge_and_non_bytes_inputs():
    with pytest.raises(E.EINVAL):  # as the kernel's asymmetric_key_preparse
        A.parse(b"")
    for garbage in (b"\x00", b"hello world", b"\x30\x80\x00\x00", b"-----BEGIN", os.urandom(5000)):
        with pytest.raises(E.EBADMSG):
            A.parse(garbage)
    with pytest.raises(E.EINVAL, match="1 MiB"):
        A.parse(b"\x30" * (1536 * 1024))
    with pytest.raises(E.EINVAL):
        A.parse("-----BEGIN PUBLIC KEY-----")  # str, not bytes
    assert A.parse(bytearray(spki(ed25519.Ed25519PrivateKey.generate()))).algo == "ed25519"


def test_serial_bytes_match_der_integer_contents():
    for value, expected in [(0, "00"), (127, "7f"), (128, "0080"), (65535, "00ffff"), (-128, "80"), (-129, "ff7f")]:
        assert A._serial_bytes(value).hex() == expected


# ---------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("spec,algo,bits,curve", [
    ("rsa", "rsa", 2048, None), ("rsa:2048", "rsa", 2048, None), ("rsa:3072", "rsa", 3072, None),
    ("rsa:4096", "rsa", 4096, None), ("ec:p256", "ecdsa", 256, "p256"), ("p256", "ecdsa", 256, "p256"),
    ("ec:p384", "ecdsa", 384, "p384"), ("p384", "ecdsa", 384, "p384"), ("ed25519", "ed25519", 256, None),
])
def test_generate(spec, algo, bits, curve):
    key = A.generate(spec)
    assert (key.algo, key.key_bits, key.curve, key.source, key.has_private) == (algo, bits, curve, "generated", True)
    assert key.certificate is None
    assert key.default_description.endswith(" private key: " + key.key_ids[0].hex())
    if algo == "rsa":
        assert key.public_key.public_numbers().e == 65537


@pytest.mark.parametrize("spec", ["", "rsa:1024", "rsa:8192", "ec:p521", "RSA", "ed448", "x448", None, 2048])
def test_generate_rejects_unknown_specs(spec):
    with pytest.raises(E.EINVAL):
        A.generate(spec)


# ---------------------------------------------------------------------------
# info grammar


def test_parse_info_grammar():
    assert A.parse_info("") == {}
    assert A.parse_info("  \t ") == {}
    assert A.parse_info("enc=pss \thash=sha256  saltlen=max mgfhash=sha1 label=00ff") == {
        "enc": "pss", "hash": "sha256", "saltlen": "max", "mgfhash": "sha1", "label": "00ff"}
    assert A.parse_info("enc=a=b") == {"enc": "a=b"}  # value is the rest, as in the kernel


@pytest.mark.parametrize("info,match", [
    ("foo=bar", "unknown"), ("enc=pkcs1 enc=pss", "repeated"), ("hash=", "empty"),
    ("enc", "without '='"), ("=sha256", "unknown"), ("Hash=sha256", "unknown"), ("x" * 5000, "too long"),
])
def test_parse_info_errors(info, match):
    with pytest.raises(E.EINVAL, match=match):
        A.parse_info(info)
    with pytest.raises(E.EINVAL):
        A.parse_info(b"enc=pkcs1")


# ---------------------------------------------------------------------------
# query


@pytest.mark.parametrize("name,expected", [
    ("rsa-pub", (A.OP_ENCRYPT | A.OP_VERIFY, 2048, 256, 256, 256, 256)),
    ("rsa", (15, 2048, 256, 256, 256, 256)),
    ("p256-pub", (A.OP_VERIFY, 256, 64, 72, 0, 0)),  # max_data_size: SHA-512's, as the kernel (6.13)
    ("p256", (A.OP_SIGN | A.OP_VERIFY, 256, 64, 72, 0, 0)),
    ("p384", (A.OP_SIGN | A.OP_VERIFY, 384, 64, 104, 0, 0)),
    ("ed25519-pub", (A.OP_VERIFY, 256, 16 * 1024 * 1024, 64, 0, 0)),
    ("ed25519", (A.OP_SIGN | A.OP_VERIFY, 256, 16 * 1024 * 1024, 64, 0, 0)),
])
def test_query(parsed, name, expected):
    q = parsed[name].query()
    assert (q.supported_ops, q.key_size, q.max_data_size, q.max_sig_size, q.max_enc_size, q.max_dec_size) == expected
    assert parsed[name].query("") == q


def test_query_validates_info(parsed):
    assert parsed["rsa"].query("enc=pss hash=sha256").key_size == 2048
    for name, info in [("rsa", "enc=x962"), ("p256", "enc=oaep"), ("ed25519", "hash=sha256"),
                       ("rsa", "hash=md5"), ("rsa", "bogus=1")]:
        with pytest.raises(E.EINVAL):
            parsed[name].query(info)


# ---------------------------------------------------------------------------
# sign / verify


def _digest(name: str, msg: bytes = b"keyden test message") -> bytes:
    return hashlib.new(name.replace("-", "_"), msg).digest()


@pytest.mark.parametrize("info,hash_name", [
    ("enc=pkcs1 hash=sha256", "sha256"), ("enc=pkcs1 hash=sha1", "sha1"), ("enc=pkcs1 hash=sha512", "sha512"),
    ("enc=pkcs1 hash=sha3-256", "sha3-256"), ("enc=pss hash=sha256", "sha256"),
    ("enc=pss hash=sha384 saltlen=0", "sha384"), ("enc=pss hash=sha256 saltlen=max mgfhash=sha1", "sha256"),
    ("enc=pss hash=sha512 saltlen=20", "sha512"),
])
def test_rsa_sign_verify(parsed, keys, info, hash_name):
    digest = _digest(hash_name)
    sig = parsed["rsa"].sign(info, digest)
    assert len(sig) == 256
    parsed["rsa"].verify(info, digest, sig)
    parsed["rsa-pub"].verify(info, digest, sig)
    if "pss" in info:  # PSS salts are random; auto-detection verifies any salt length
        parsed["rsa-pub"].verify(info.replace("saltlen=max", "").replace("saltlen=0", "").replace("saltlen=20", "")
                                 + " saltlen=auto", digest, sig)
    with pytest.raises(E.EKEYREJECTED):
        parsed["rsa-pub"].verify(info, _digest(hash_name, b"other"), sig)
    with pytest.raises(E.EKEYREJECTED):
        parsed["rsa-pub"].verify(info, digest, sig[:-1] + bytes([sig[-1] ^ 1]))


def test_rsa_signatures_interoperate_with_pyca(keys, parsed):
    msg = b"interop"
    sig = parsed["rsa"].sign("enc=pkcs1 hash=sha256", _digest("sha256", msg))
    keys["rsa"].public_key().verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
    pss = keys["rsa"].sign(msg, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    parsed["rsa-pub"].verify("enc=pss hash=sha256", _digest("sha256", msg), pss)


def test_pkcs1_verify_without_a_hash_checks_the_whole_encoded_payload_as_the_kernel(keys, parsed):
    """The kernel's pkcs1pad(rsa) without hash= verifies the payload the padding wraps, DigestInfo and
    digest as given (keyctl pkey_verify ... enc=pkcs1): keyden refused it, EINVAL (found by a differential
    run against the kernel).  Signing without one pads the data as given, as the kernel's pkcs1pad and
    OpenSSL's rsautl -sign (TLS 1.1's MD5+SHA-1 signatures are such), up to the key size less 11 bytes."""
    msg = b"hello"
    sig = keys["rsa"].sign(msg, padding.PKCS1v15(), hashes.SHA256())
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + _digest("sha256", msg)  # RFC 8017
    parsed["rsa-pub"].verify("enc=pkcs1", digest_info, sig)
    for wrong in (digest_info[:-1] + b"\x00", digest_info[:-1], _digest("sha256", msg)):
        with pytest.raises(E.EKEYREJECTED):
            parsed["rsa-pub"].verify("enc=pkcs1", wrong, sig)
    with pytest.raises(E.EKEYREJECTED):  # no PKCS#1 block at all (the kernel tells a few such apart; not keyden)
        parsed["rsa-pub"].verify("enc=pkcs1", digest_info, bytes(255) + b"\x01")
    with pytest.raises(E.EINVAL, match="the key's size"):
        parsed["rsa-pub"].verify("enc=pkcs1", digest_info, sig[1:])
    for oversized in (bytes(257), bytes(1 << 20)):  # over max_data_size: EINVAL, as the kernel (EKEYREJECTED)
        with pytest.raises(E.EINVAL, match="longer than the key size"):
            parsed["rsa-pub"].verify("enc=pkcs1", oversized, sig)
    assert parsed["rsa"].sign("enc=pkcs1", digest_info) == sig  # PKCS#1 v1.5 signatures are deterministic
    md5_sha1 = _digest("md5", msg) + _digest("sha1", msg)
    raw = parsed["rsa"].sign("enc=pkcs1", md5_sha1)
    assert keys["rsa"].public_key().recover_data_from_signature(raw, padding.PKCS1v15(), None) == md5_sha1
    parsed["rsa-pub"].verify("enc=pkcs1", md5_sha1, raw)
    size = keys["rsa"].key_size // 8
    assert len(parsed["rsa"].sign("enc=pkcs1", bytes(size - 11))) == size
    with pytest.raises(E.EOVERFLOW, match="less PKCS#1's 11 bytes"):
        parsed["rsa"].sign("enc=pkcs1", bytes(size - 10))
    with pytest.raises(E.EINVAL, match="longer than the key size"):
        parsed["rsa"].sign("enc=pkcs1", bytes(size + 1))
    with pytest.raises(E.EINVAL, match="required"):
        parsed["rsa"].sign("enc=pkcs1", b"")
    md5_info = bytes.fromhex("3020300c06082a864886f70d020505000410") + _digest("md5", msg)  # hash=md5 is refused:
    with pytest.raises(E.EINVAL, match="MD5 DigestInfo"):                                   # so is its DigestInfo
        parsed["rsa"].sign("enc=pkcs1", md5_info)
    parsed["rsa-pub"].verify("enc=pkcs1", md5_info, keys["rsa"].sign(md5_info, padding.PKCS1v15(), utils.NoDigestInfo()))
    with pytest.raises(E.EINVAL, match="hash= is required"):
        parsed["rsa"].sign("enc=pss", digest_info)
    with pytest.raises(E.EINVAL, match="hash= is required"):
        parsed["rsa-pub"].verify("enc=pss", digest_info, sig)


@pytest.mark.parametrize("curve", ["p256", "p384"])
@pytest.mark.parametrize("enc", ["", "enc=x962", "enc=p1363"])
def test_ecdsa_sign_verify(parsed, keys, curve, enc):
    default = {"p256": "sha256", "p384": "sha384"}[curve]
    for info, hash_name in [(enc, default), (f"{enc} hash=sha1", "sha1"), (f"{enc} hash=sha224", "sha224")]:
        digest = _digest(hash_name)
        sig = parsed[curve].sign(info, digest)
        parsed[curve + "-pub"].verify(info, digest, sig)
        if "p1363" in enc:
            assert len(sig) == {"p256": 64, "p384": 96}[curve]
            n = len(sig) // 2
            der = utils.encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
        else:
            der = sig
        keys[curve].public_key().verify(der, digest, ec.ECDSA(utils.Prehashed(getattr(hashes, hash_name.upper())())))
        with pytest.raises(E.EKEYREJECTED):
            parsed[curve + "-pub"].verify(info, _digest(hash_name, b"other"), sig)


def test_ecdsa_refuses_non_der_and_mismatched_encodings(parsed):
    digest = _digest("sha256")
    der = parsed["p256"].sign("enc=x962", digest)
    assert der[0] == 0x30 and der[1] < 0x80
    ber = b"\x30\x81" + der[1:]          # same value, long-form length: BER, not DER
    for bad in (ber, der + b"\x00", der[:-1]):
        # DER signatures vary in length (70..72 bytes); past max_sig_size (72) it is EINVAL.
        with pytest.raises(E.EINVAL if len(bad) > 72 else E.EKEYREJECTED):
            parsed["p256-pub"].verify("enc=x962", digest, bad)
    with pytest.raises(E.EKEYREJECTED):   # a DER signature is not a p1363 one
        parsed["p256-pub"].verify("enc=p1363", digest, der)
    p1363 = parsed["p256"].sign("enc=p1363", digest)
    for bad in (p1363[:-1], p1363 + b"\x00", bytes(64)):
        with pytest.raises(E.EKEYREJECTED):
            parsed["p256-pub"].verify("enc=p1363", digest, bad)


def test_ed25519_sign_verify(parsed, keys):
    for msg in (b"", b"hello", os.urandom(65536)):
        sig = parsed["ed25519"].sign("", msg)
        assert sig == keys["ed25519"].sign(msg)
        parsed["ed25519-pub"].verify("enc=raw", msg, sig)
    with pytest.raises(E.EKEYREJECTED):
        parsed["ed25519-pub"].verify("", b"hellO", parsed["ed25519"].sign("", b"hello"))


def test_public_key_cannot_sign_or_decrypt(parsed):
    """EINVAL, as the kernel answers (its RSA finds no private exponent)."""
    with pytest.raises(E.EINVAL, match="needs the private key"):
        parsed["rsa-pub"].sign("enc=pkcs1 hash=sha256", _digest("sha256"))
    with pytest.raises(E.EINVAL, match="needs the private key"):
        parsed["rsa-pub"].decrypt("enc=pkcs1", bytes(256))
    for name in ("p256-pub", "ed25519-pub"):
        with pytest.raises(E.EINVAL, match="needs the private key"):
            parsed[name].sign("", _digest("sha256"))


def test_rsa_encryption_input_limits_and_pkcs1_hash_as_the_kernel(parsed):
    """Over the key size is EINVAL; within it but over what the padding carries, EOVERFLOW (the kernel's
    pkcs1pad); hash= with PKCS#1 v1.5 encryption is taken and unused, as the kernel's pkcs1pad(rsa,HASH)."""
    rsa_pub = parsed["rsa-pub"]
    with pytest.raises(E.EINVAL):
        rsa_pub.encrypt("enc=pkcs1", bytes(257))
    with pytest.raises(E.EOVERFLOW):
        rsa_pub.encrypt("enc=pkcs1", bytes(256))
    with pytest.raises(E.EOVERFLOW):
        rsa_pub.encrypt("enc=oaep hash=sha256", bytes(256 - 65))
    assert len(rsa_pub.encrypt("enc=pkcs1 hash=sha256", b"x" * 245)) == 256
    with pytest.raises(E.EINVAL):
        rsa_pub.encrypt("enc=pkcs1 hash=md4", b"x")


@pytest.mark.parametrize("name", ["p256", "p384-pub", "ed25519", "ed25519-pub"])
def test_non_rsa_keys_cannot_encrypt(parsed, name):
    with pytest.raises(E.EOPNOTSUPP):
        parsed[name].encrypt("", b"x")
    with pytest.raises(E.EOPNOTSUPP):
        parsed[name].decrypt("", b"x")


@pytest.mark.parametrize("info", ["", "enc=raw", "hash=sha256", "enc=raw hash=sha256"])
def test_raw_rsa_is_not_offered(parsed, info):
    digest = _digest("sha256")
    for call in (lambda: parsed["rsa"].sign(info, digest), lambda: parsed["rsa"].verify(info, digest, bytes(256)),
                 lambda: parsed["rsa"].encrypt(info, b"x"), lambda: parsed["rsa"].decrypt(info, bytes(256))):
        with pytest.raises(E.EOPNOTSUPP, match="raw RSA"):
            call()


# ---------------------------------------------------------------------------
# encrypt / decrypt


@pytest.mark.parametrize("info", [
    "enc=pkcs1", "enc=oaep", "enc=oaep hash=sha256", "enc=oaep hash=sha1", "enc=oaep hash=sha512 mgfhash=sha1",
    "enc=oaep label=6b657964656e", "enc=oaep hash=sha384 label=00",
])
def test_rsa_encrypt_decrypt(parsed, info):
    msg = b"session key material"
    ct = parsed["rsa-pub"].encrypt(info, msg)
    assert len(ct) == 256
    assert parsed["rsa"].decrypt(info, ct) == msg
    assert parsed["rsa"].decrypt(info, parsed["rsa"].encrypt(info, b"")) == b""


def test_oaep_interop_and_label_mismatch(keys, parsed):
    ct = keys["rsa"].public_key().encrypt(b"m", padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"L"))
    assert parsed["rsa"].decrypt("enc=oaep label=4c", ct) == b"m"
    for info in ("enc=oaep", "enc=oaep label=4d", "enc=oaep hash=sha1"):
        with pytest.raises(E.EBADMSG, match="^EBADMSG: decryption failed$"):
            parsed["rsa"].decrypt(info, ct)


def test_cert_public_half_encrypts_for_pkcs8_private_half(keys):
    cert_key = A.parse(make_cert(keys["rsa"]).public_bytes(PEM))
    ct = cert_key.encrypt("enc=oaep", b"secret")
    assert A.parse(pkcs8(keys["rsa"], PEM)).decrypt("enc=oaep", ct) == b"secret"


def test_size_limits(keys, parsed):
    rsa_key, rsa_pub = parsed["rsa"], parsed["rsa-pub"]
    assert len(rsa_pub.encrypt("enc=pkcs1", bytes(245))) == 256
    assert len(rsa_pub.encrypt("enc=oaep", bytes(190))) == 256
    for info, n in [("enc=pkcs1", 246), ("enc=oaep", 191), ("enc=oaep hash=sha512", 127)]:
        with pytest.raises(E.EOVERFLOW, match="too long"):
            rsa_pub.encrypt(info, bytes(n))
    with pytest.raises(E.EINVAL):
        rsa_key.decrypt("enc=oaep", bytes(257))
    with pytest.raises(E.EBADMSG):
        rsa_key.decrypt("enc=oaep", bytes(255))
    digest = _digest("sha256")
    for bad_digest in (digest[:-1], digest + b"\x00", b""):
        with pytest.raises(E.EINVAL, match="digest"):
            rsa_key.sign("enc=pkcs1 hash=sha256", bad_digest)
        with pytest.raises(E.EINVAL, match="digest"):
            parsed["p256"].sign("", bad_digest)
    with pytest.raises(E.EINVAL):
        rsa_pub.verify("enc=pkcs1 hash=sha256", digest, bytes(257))
    with pytest.raises(E.EINVAL, match="the key's size"):  # as the kernel's pkcs1pad (it was EKEYREJECTED)
        rsa_pub.verify("enc=pkcs1 hash=sha256", digest, bytes(255))
    for name, pyca_hash in (("sha384", hashes.SHA384()), ("sha512", hashes.SHA512())):  # cut to the curve's size
        signature = parsed["p256"].sign(f"hash={name}", _digest(name))  # (FIPS 186), as the kernel and OpenSSL
        keys["p256"].public_key().verify(signature, _digest(name), ec.ECDSA(utils.Prehashed(pyca_hash)))
        parsed["p256-pub"].verify(f"hash={name}", _digest(name), signature)
    with pytest.raises(E.EINVAL):
        parsed["p256-pub"].verify("", digest, b"\x30" + bytes(72))
    assert len(parsed["ed25519"].sign("", bytes(65537))) == 64  # any message up to a frame's worth
    with pytest.raises(E.EINVAL, match="longer than 16777216"):
        parsed["ed25519"].sign("", bytes(16 * 1024 * 1024 + 1))
    with pytest.raises(E.EINVAL):
        parsed["ed25519-pub"].verify("", b"m", bytes(65))
    with pytest.raises(E.EKEYREJECTED):
        parsed["ed25519-pub"].verify("", b"m", bytes(63))


@pytest.mark.parametrize("name,method,info", [
    ("rsa", "sign", "enc=pss"),                              # hash required
    ("rsa", "sign", "enc=oaep hash=sha256"),                 # encryption scheme for a signature
    ("rsa", "encrypt", "enc=pss hash=sha256"),               # signature scheme for encryption
    ("rsa", "sign", "enc=pkcs1 hash=sha256 saltlen=32"),     # saltlen only for pss
    ("rsa", "sign", "enc=pss hash=sha256 saltlen=auto"),     # auto only for verify
    ("rsa", "sign", "enc=pss hash=sha256 saltlen=300"),      # longer than the key allows
    ("rsa", "sign", "enc=pss hash=sha256 saltlen=-1"),
    ("rsa", "sign", "enc=pss hash=sha256 saltlen=big"),
    ("rsa", "sign", "enc=pss hash=sha256 mgfhash=md5"),
    ("rsa", "encrypt", "enc=oaep label=xyz1"),
    ("rsa", "encrypt", "enc=oaep label=abc"),                 # odd-length hex
    ("rsa", "encrypt", "enc=pkcs1 label=00"),
    ("rsa", "sign", "enc=pkcs1 hash=md5"),
    ("rsa", "sign", "enc=pkcs1 hash=SHA256"),
    ("p256", "sign", "enc=pkcs1"),
    ("p256", "sign", "enc=raw"),
    ("p256", "sign", "enc=x962 saltlen=1"),
    ("ed25519", "sign", "hash=sha512"),
    ("ed25519", "sign", "enc=x962"),
    ("ed25519", "sign", "bogus=1"),
])
def test_option_errors(parsed, name, method, info):
    with pytest.raises(E.EINVAL):
        getattr(parsed[name], method)(info, _digest("sha256") if method == "sign" else b"x")


def test_non_bytes_arguments_are_einval(parsed):
    with pytest.raises(E.EINVAL):
        parsed["ed25519"].sign("", "text")
    with pytest.raises(E.EINVAL):
        parsed["ed25519"].verify("", b"m", "sig")
    with pytest.raises(E.EINVAL):
        parsed["ed25519"].sign(None, b"m")


# ---------------------------------------------------------------------------
# the object itself: no dumping, no material in repr


def test_pickle_and_copy_refused(parsed):
    for key in parsed.values():
        for dump in (pickle.dumps, copy.copy, copy.deepcopy, lambda k: k.__getstate__(), lambda k: k.__reduce__()):
            with pytest.raises(TypeError, match="cannot be pickled"):
                dump(key)


def test_immutable(parsed):
    with pytest.raises(AttributeError):
        parsed["rsa-pub"].has_private = True
    with pytest.raises(AttributeError):
        del parsed["rsa"].algo
    with pytest.raises(AttributeError):
        parsed["rsa"].extra = 1  # __slots__: no __dict__
    assert not hasattr(parsed["rsa"], "__dict__")


def test_repr_shows_no_material(parsed, keys):
    numbers = keys["rsa"].private_numbers()
    text = repr(parsed["rsa"]) + str(parsed["rsa"])
    for secret in (numbers.p, numbers.q, numbers.d, numbers.dmp1, numbers.dmq1, numbers.iqmp):
        assert f"{secret:x}" not in text and str(secret) not in text
    assert "rsa" in text and "2048" in text and "pkcs8" in text and "private" in text
    assert parsed["rsa"].key_ids[0].hex() in text
    ec_secret = f"{keys['p256'].private_numbers().private_value:x}"
    assert ec_secret not in repr(parsed["p256"])
    ed_raw = keys["ed25519"].private_bytes(S.Encoding.Raw, S.PrivateFormat.Raw, NOENC).hex()
    assert ed_raw not in repr(parsed["ed25519"])


def test_private_key_for_internal_use(parsed):
    assert isinstance(parsed["rsa"].private_key_for_internal_use(), rsa.RSAPrivateKey)
    assert isinstance(parsed["ed25519"].private_key_for_internal_use(), ed25519.Ed25519PrivateKey)
    with pytest.raises(E.EOPNOTSUPP):
        parsed["p256-pub"].private_key_for_internal_use()
