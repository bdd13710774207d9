"""Key handles and pyca-compatible remote private keys, against a real daemon.

Signatures made inside keyden are verified locally with pyca; ciphertexts
made locally are decrypted inside keyden; PyJWT signs with a key it never sees.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle

import jwt
import pytest
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyden import errors as E
from keyden.client.handles import KeyHandle, remote_private_key

MESSAGE = b"the daemon signs, the application never holds the key"


def pkcs8(private_key) -> bytes:
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def local_rsa():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def rsa_pair(client, local_rsa):
    """(local pyca key, remote key) for the same RSA key uploaded as PKCS#8."""
    serial = client.add("asymmetric", "", pkcs8(local_rsa), "@s")
    return local_rsa, client.private_key(serial)


# --------------------------------------------------------------------- handles


def test_handle_names_a_key_and_forwards_to_the_client(client):
    serial = client.add("user", "handle:test", b"payload-one")
    handle = client.key(serial)
    assert isinstance(handle, KeyHandle)
    assert handle.serial == serial and int(handle) == serial and handle.client is client
    assert handle.read() == b"payload-one"
    assert handle.describe().description == "handle:test"
    handle.update(b"payload-two")
    assert client.read(handle) == b"payload-two"  # a handle goes wherever a serial does
    handle.setperm(0x3f3f0000)
    assert handle.describe().perm == 0x3f3f0000
    uid = client.whoami()[0]
    handle.chown(uid)
    assert handle.describe().uid == uid
    ring = client.newring("handle-ring")
    handle.link(ring)
    assert serial in client.read(ring)
    handle.unlink(ring)
    assert serial not in client.read(ring)
    handle.timeout(1000)
    handle.revoke()
    with pytest.raises(E.EKEYREVOKED):
        handle.read()


def test_handle_invalidate_and_lookup_by_description(client):
    serial = client.add("user", "handle:by-name", b"x")
    handle = client.key("%user:handle:by-name")
    assert handle == client.key(serial) and hash(handle) == hash(serial)
    handle.invalidate()
    with pytest.raises(E.ENOKEY):
        client.describe(serial)


def test_handle_holds_no_material_and_cannot_be_pickled(client):
    secret = b"handle-secret-payload-bytes"
    handle = client.key(client.add("user", "handle:secret", secret))
    assert repr(handle) == f"<KeyHandle serial={handle.serial}>"
    assert not hasattr(handle, "__dict__")
    for dump in (pickle.dumps, lambda h: pickle.dumps(h, protocol=0), lambda h: h.__getstate__()):
        with pytest.raises(TypeError, match="cannot be pickled"):
            dump(handle)
    assert copy.copy(handle) is handle and copy.deepcopy(handle) is handle
    with pytest.raises(AttributeError):
        handle._serial = 1


def test_a_key_with_only_a_public_half_gives_no_private_key_object(client):
    """It gave a RemoteRSAPrivateKey that passed isinstance(.., RSAPrivateKey) and failed only at sign()."""
    local = rsa.generate_private_key(65537, 2048)
    spki = local.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_only = client.add("asymmetric", "public only", spki, "@s")
    with pytest.raises(E.EOPNOTSUPP, match="can neither sign nor decrypt"):
        client.private_key(public_only)
    assert isinstance(client.public_key(public_only), rsa.RSAPublicKey)
    with pytest.raises(E.EOPNOTSUPP, match="key-agreement key"):  # a private key, but not one pyca signs with
        client.private_key(client.generate("x25519"))


def test_handle_rejects_a_non_integer_serial(client):
    with pytest.raises(E.EINVAL):
        KeyHandle(client, "123")
    with pytest.raises(E.EINVAL):
        KeyHandle(client, True)


def test_a_bad_key_reference_names_its_type_never_its_value(client):
    """Key bytes passed where a serial belongs (AESGCM(key) habits, swapped arguments) stay out of errors."""
    secret = os.urandom(32)
    serial = client.add("user", "ref-check", b"v", "@s")
    for call in (lambda: client.aead(secret), lambda: client.update(b"hunter2-SECRET", serial),
                 lambda: client.private_key("not-a-serial-but-a-passphrase"), lambda: client.read(b"x" * 5000)):
        with pytest.raises(E.EINVAL) as info:
            call()
        message = str(info.value)
        assert "bytes" in message or "str" in message
        assert repr(secret) not in message and "hunter2" not in message and "passphrase" not in message
        assert len(message) < 200
    with pytest.raises(E.EINVAL, match="'@q'"):  # a mistyped special name is worth showing
        client.read("@q")
    with pytest.raises(E.EINVAL) as info:  # anything longer may be a secret
        client.read("@hunter2")
    assert "hunter2" not in str(info.value)
    with pytest.raises(E.EINVAL, match="32-bit"):
        client.key(2 ** 40)
    with pytest.raises(E.EINVAL, match="32-bit"):
        client.read(-2 ** 31 - 1)


def test_handle_pkey_operations(client):
    handle = client.key(client.generate("rsa:2048"))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(MESSAGE)
    digest = digest.finalize()
    signature = handle.sign("enc=pkcs1 hash=sha256", digest)
    assert handle.verify("enc=pkcs1 hash=sha256", digest, signature) is None
    handle.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(E.EKEYREJECTED):
        handle.verify("enc=pkcs1 hash=sha256", digest, bytes(len(signature)))
    ciphertext = handle.encrypt("enc=oaep hash=sha256", b"wrapped")
    assert handle.decrypt("enc=oaep hash=sha256", ciphertext) == b"wrapped"
    assert handle.query("enc=pkcs1 hash=sha256").key_size == 2048
    assert handle.certificate() is None
    assert isinstance(handle.private_key(), rsa.RSAPrivateKey)


# ------------------------------------------------------------ remote RSA keys


def test_remote_rsa_key_is_a_pyca_key_with_the_right_public_half(rsa_pair):
    local, remote = rsa_pair
    assert isinstance(remote, rsa.RSAPrivateKey)
    assert remote.key_size == 2048
    assert spki(remote.public_key()) == spki(local.public_key())
    # the proxy holds the connection, the serial and the public half: nothing private
    assert set(vars(remote)) == {"_client", "_serial", "_public"}
    assert isinstance(remote._public, rsa.RSAPublicKey)


def test_rsa_pkcs1v15_signature_matches_the_local_key(rsa_pair):
    local, remote = rsa_pair
    for algorithm in (hashes.SHA256(), hashes.SHA384(), hashes.SHA512(), hashes.SHA3_256()):
        signature = remote.sign(MESSAGE, padding.PKCS1v15(), algorithm)
        # PKCS#1 v1.5 is deterministic: keyden must produce exactly pyca's bytes
        assert signature == local.sign(MESSAGE, padding.PKCS1v15(), algorithm)


@pytest.mark.parametrize("salt", [padding.PSS.DIGEST_LENGTH, padding.PSS.MAX_LENGTH, 20, 0],
                         ids=["digest", "max", "20", "0"])
def test_rsa_pss_signature_verifies_locally(rsa_pair, salt):
    _local, remote = rsa_pair
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt)
    signature = remote.sign(MESSAGE, pss, hashes.SHA256())
    remote.public_key().verify(signature, MESSAGE, pss, hashes.SHA256())
    remote.public_key().verify(signature, MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO),
                               hashes.SHA256())


def test_rsa_pss_with_a_different_mgf_hash(rsa_pair):
    _local, remote = rsa_pair
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA1()), salt_length=padding.PSS.DIGEST_LENGTH)
    signature = remote.sign(MESSAGE, pss, hashes.SHA384())
    remote.public_key().verify(signature, MESSAGE, pss, hashes.SHA384())
    wrong_mgf = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=padding.PSS.DIGEST_LENGTH)
    with pytest.raises(InvalidSignature):
        remote.public_key().verify(signature, MESSAGE, wrong_mgf, hashes.SHA384())


def test_rsa_prehashed_sends_the_digest(rsa_pair):
    local, remote = rsa_pair
    h = hashes.Hash(hashes.SHA256())
    h.update(MESSAGE)
    digest = h.finalize()
    signature = remote.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    assert signature == local.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(E.EINVAL):
        remote.sign(digest[:-1], padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def test_rsa_signs_with_no_digest_info_as_pyca(rsa_pair):
    """PKCS#1 v1.5 over the data as given (TLS 1.1's MD5 || SHA-1, a DigestInfo made elsewhere): pyca's
    NoDigestInfo, the kernel's pkcs1pad without hash= (it was EOPNOTSUPP)."""
    local, remote = rsa_pair
    md5_sha1 = hashlib.md5(MESSAGE).digest() + hashlib.sha1(MESSAGE).digest()
    signature = remote.sign(md5_sha1, padding.PKCS1v15(), utils.NoDigestInfo())
    assert signature == local.sign(md5_sha1, padding.PKCS1v15(), utils.NoDigestInfo())


def test_rsa_sign_rejects_what_keyden_cannot_do(rsa_pair):
    _local, remote = rsa_pair
    with pytest.raises(E.EINVAL, match="AUTO"):
        remote.sign(MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO), hashes.SHA256())
    with pytest.raises(E.EINVAL, match="PKCS1v15 padding only"):
        remote.sign(MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), 32), utils.NoDigestInfo())
    with pytest.raises(E.EINVAL):
        remote.sign(MESSAGE, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None), hashes.SHA256())
    with pytest.raises(E.EINVAL, match="unsupported hash"):
        remote.sign(MESSAGE, padding.PKCS1v15(), hashes.BLAKE2b(64))
    # ... and each as pyca's own exception too, for code written against pyca's keys
    with pytest.raises(ValueError, match="AUTO"):
        remote.sign(MESSAGE, padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO), hashes.SHA256())
    with pytest.raises(UnsupportedAlgorithm):
        remote.sign(MESSAGE, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None), hashes.SHA256())
    for unsupported in (hashes.BLAKE2b(64), hashes.MD5(), hashes.SHA512_256()):
        with pytest.raises(UnsupportedAlgorithm, match="unsupported hash"):
            remote.sign(MESSAGE, padding.PKCS1v15(), unsupported)
    with pytest.raises(ValueError, match="digest of 32 bytes"):
        remote.sign(b"short", padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


@pytest.mark.parametrize("label", [None, b"", b"keyden label \x00\xff"])
@pytest.mark.parametrize("oaep_hash,mgf_hash", [(hashes.SHA256, hashes.SHA256), (hashes.SHA256, hashes.SHA1),
                                                (hashes.SHA512, hashes.SHA384)])
def test_rsa_decrypts_oaep_made_locally(rsa_pair, label, oaep_hash, mgf_hash):
    _local, remote = rsa_pair
    oaep = padding.OAEP(mgf=padding.MGF1(mgf_hash()), algorithm=oaep_hash(), label=label)
    plaintext = os.urandom(32)
    assert remote.decrypt(remote.public_key().encrypt(plaintext, oaep), oaep) == plaintext


def test_rsa_oaep_label_must_match(rsa_pair):
    _local, remote = rsa_pair
    ciphertext = remote.public_key().encrypt(b"labelled", padding.OAEP(padding.MGF1(hashes.SHA256()),
                                                                       hashes.SHA256(), b"right"))
    with pytest.raises(E.EBADMSG):
        remote.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"wrong"))
    with pytest.raises(ValueError):  # as pyca's "Decryption failed": what JWE libraries catch
        remote.decrypt(ciphertext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"wrong"))


def test_what_pyca_refuses_with_value_error_or_type_error_the_remote_keys_refuse_alike(rsa_pair):
    """Drop-in: an argument pyca refuses with ValueError (a salt or a ciphertext too long for the key, a
    label too long to send) is EINVAL and ValueError; one of the wrong kind is pyca's TypeError."""
    local, remote = rsa_pair
    too_salty = padding.PSS(padding.MGF1(hashes.SHA256()), 223)  # 2048-bit key, SHA-256: at most 222
    with pytest.raises(ValueError):
        local.sign(MESSAGE, too_salty, hashes.SHA256())
    with pytest.raises(ValueError) as refused:
        remote.sign(MESSAGE, too_salty, hashes.SHA256())
    assert isinstance(refused.value, E.EINVAL)
    for ciphertext in (bytes(257), bytes(512)):  # longer than the key: an attacker's to choose
        with pytest.raises(ValueError):
            local.decrypt(ciphertext, padding.PKCS1v15())
        with pytest.raises(ValueError) as refused:
            remote.decrypt(ciphertext, padding.PKCS1v15())
        assert isinstance(refused.value, E.EINVAL)
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"L" * 2027)  # the longest that fits
    assert remote.decrypt(remote.public_key().encrypt(b"fits", oaep), oaep) == b"fits"
    with pytest.raises(ValueError, match=r"OAEP label of 2028 bytes .* up to 2027 bytes") as refused:
        remote.decrypt(bytes(256), padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"L" * 2028))
    assert isinstance(refused.value, E.EINVAL)
    for call in (lambda k: k.sign(MESSAGE, padding.PKCS1v15(), None), lambda k: k.sign(MESSAGE, None, hashes.SHA256()),
                 lambda k: k.decrypt(bytes(256), None), lambda k: k.sign(MESSAGE, padding.PKCS1v15(), "sha256"),
                 lambda k: k.decrypt("x" * 256, padding.PKCS1v15()),  # not "decryption failed": a TypeError
                 lambda k: k.sign("message", padding.PKCS1v15(), hashes.SHA256())):
        with pytest.raises(TypeError):
            call(local)
        with pytest.raises(TypeError):
            call(remote)


def test_rsa_decrypts_pkcs1v15_made_locally(rsa_pair):
    _local, remote = rsa_pair
    ciphertext = remote.public_key().encrypt(b"session key bytes", padding.PKCS1v15())
    assert remote.decrypt(ciphertext, padding.PKCS1v15()) == b"session key bytes"
    with pytest.raises(E.EINVAL):
        remote.decrypt(ciphertext, padding.PSS(padding.MGF1(hashes.SHA256()), 32))


# ------------------------------------------------------------- remote EC keys


@pytest.mark.parametrize("spec,curve,algorithm", [("ec:p256", ec.SECP256R1, hashes.SHA256),
                                                  ("ec:p384", ec.SECP384R1, hashes.SHA384),
                                                  ("ec:p384", ec.SECP384R1, hashes.SHA256)])
def test_ecdsa_signature_verifies_locally(client, spec, curve, algorithm):
    remote = client.private_key(client.generate(spec))
    assert isinstance(remote, ec.EllipticCurvePrivateKey)
    assert isinstance(remote.curve, curve) and remote.key_size == curve.key_size
    signature = remote.sign(MESSAGE, ec.ECDSA(algorithm()))
    utils.decode_dss_signature(signature)  # DER, as pyca returns
    remote.public_key().verify(signature, MESSAGE, ec.ECDSA(algorithm()))


def test_ecdsa_prehashed_and_refusals(client):
    local = ec.generate_private_key(ec.SECP256R1())
    remote = client.private_key(client.add("asymmetric", "", pkcs8(local), "@s"))
    assert spki(remote.public_key()) == spki(local.public_key())
    h = hashes.Hash(hashes.SHA256())
    h.update(MESSAGE)
    signature = remote.sign(h.finalize(), ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    local.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(E.EOPNOTSUPP, match=r"never leaves keyden: use client.derive\(private, peer_key"):
        remote.exchange(ec.ECDH(), local.public_key())
    with pytest.raises(E.EOPNOTSUPP, match="deterministic"):
        remote.sign(MESSAGE, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


@pytest.mark.parametrize("spec,algorithm", [("ec:p256", hashes.SHA384), ("ec:p256", hashes.SHA512),
                                            ("ec:p384", hashes.SHA512)])
def test_ecdsa_with_a_hash_longer_than_the_curve_signs_as_pyca_does(client, spec, algorithm):
    """ECDSA uses the leftmost bits of a longer digest (pyca, OpenSSL, FIPS 186): so do remote keys."""
    remote = client.private_key(client.generate(spec))
    remote.public_key().verify(remote.sign(MESSAGE, ec.ECDSA(algorithm())), MESSAGE, ec.ECDSA(algorithm()))
    h = hashes.Hash(algorithm())
    h.update(MESSAGE)
    prehashed = remote.sign(h.finalize(), ec.ECDSA(utils.Prehashed(algorithm())))
    remote.public_key().verify(prehashed, MESSAGE, ec.ECDSA(algorithm()))
    for wrong in (31, 33, 64):  # as pyca: prehashed data is exactly a digest, never cut to fit
        with pytest.raises(E.EINVAL, match="prehashed data must be"):
            remote.sign(os.urandom(wrong), ec.ECDSA(utils.Prehashed(hashes.SHA256())))


# -------------------------------------------------------- remote Ed25519 keys


def test_ed25519_signature_matches_the_local_key(client):
    local = ed25519.Ed25519PrivateKey.generate()
    remote = client.private_key(client.add("asymmetric", "", pkcs8(local), "@s"))
    assert isinstance(remote, ed25519.Ed25519PrivateKey)
    # Ed25519 is deterministic: same key, same message, same signature
    assert remote.sign(MESSAGE) == local.sign(MESSAGE)
    remote.public_key().verify(remote.sign(b""), b"")


def test_generated_ed25519_key_signs(client):
    remote = client.private_key(client.generate("ed25519"))
    remote.public_key().verify(remote.sign(MESSAGE), MESSAGE)


def test_ed25519_signs_messages_past_64_kib(client):
    """pyca signs a message of any size; keyden takes up to a frame's worth (a JWT with a large payload)."""
    remote = client.private_key(client.generate("ed25519"))
    message = os.urandom(1 << 20)
    remote.public_key().verify(remote.sign(message), message)
    token = jwt.encode({"blob": "a" * 70000}, remote, algorithm="EdDSA")
    assert jwt.decode(token, remote.public_key(), algorithms=["EdDSA"])["blob"] == "a" * 70000


@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256", "ed25519"])
def test_remote_keys_refuse_numbers_for_data(client, spec):
    """bytes(5) is five zero bytes: an int where data belongs must be refused, never signed as zeros."""
    remote = client.private_key(client.generate(spec))
    with pytest.raises(E.EINVAL, match="bytes-like"):
        if spec == "ed25519":
            remote.sign(5)
        elif spec == "ec:p256":
            remote.sign(32, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            remote.sign(32, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    with pytest.raises(E.EINVAL, match="bytes-like"):
        client.pkey_sign(remote.serial, "", None)


# ------------------------------------------------------ material never leaves


@pytest.mark.parametrize("spec", ["rsa:2048", "ec:p256", "ed25519"])
def test_private_material_is_refused(client, spec):
    remote = client.private_key(client.generate(spec))
    with pytest.raises(E.EOPNOTSUPP, match="never leaves keyden"):
        remote.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    if isinstance(remote, ed25519.Ed25519PrivateKey):
        with pytest.raises(E.EOPNOTSUPP, match="never leaves keyden"):
            remote.private_bytes_raw()
    else:
        with pytest.raises(E.EOPNOTSUPP, match="never leaves keyden"):
            remote.private_numbers()
    for dump in (pickle.dumps, lambda k: pickle.dumps(k, protocol=2), lambda k: k.__getstate__()):
        with pytest.raises(TypeError, match="cannot be pickled"):
            dump(remote)
    assert copy.copy(remote) is remote and copy.deepcopy(remote) is remote
    assert repr(remote).endswith(f"private key serial={remote.serial}>")
    assert remote.handle() == client.key(remote.serial)


def test_remote_key_needs_an_asymmetric_key(client):
    serial = client.add("user", "not:asymmetric", b"x")
    with pytest.raises(E.EOPNOTSUPP):
        client.private_key(serial)
    with pytest.raises(E.EOPNOTSUPP):
        remote_private_key(client, client.key(serial))


def test_revoked_key_stops_signing(client):
    serial = client.generate("ed25519")
    remote = client.private_key(serial)
    client.revoke(serial)
    with pytest.raises(E.EKEYREVOKED):
        remote.sign(MESSAGE)


# ------------------------------------------------------------------- PyJWT


@pytest.mark.parametrize("spec,algorithm", [("rsa:2048", "RS256"), ("rsa:2048", "PS256"), ("rsa:2048", "RS512"),
                                            ("ec:p256", "ES256"), ("ec:p384", "ES384"), ("ed25519", "EdDSA")])
def test_pyjwt_signs_with_a_remote_key(client, spec, algorithm):
    remote = client.private_key(client.generate(spec, f"jwt-{algorithm}"))
    claims = {"sub": "keyden", "aud": "tests", "n": 42}
    token = jwt.encode(claims, remote, algorithm=algorithm, headers={"kid": str(remote.serial)})
    assert jwt.get_unverified_header(token)["alg"] == algorithm
    assert jwt.decode(token, remote.public_key(), algorithms=[algorithm], audience="tests") == claims
    head, payload, signature = token.split(".")
    tampered = ".".join((head, payload, ("B" if signature[0] == "A" else "A") + signature[1:]))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tampered, remote.public_key(), algorithms=[algorithm], audience="tests")
