"""The kernel's "asymmetric" key type: parsed keys and the KEYCTL_PKEY_* operations.

Pure code: no sockets, no key store, no asyncio.  Every primitive, padding and
signature encoding comes from pyca ``cryptography`` (OpenSSL); this module only
decides policy (which formats, sizes and options are accepted) and maps
failures onto keyden's errno classes.  Whatever bytes or info strings it is
given it raises only ``KeydenError`` subclasses, and no message ever contains
key material.
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import types
import warnings
from dataclasses import replace
from typing import Callable, Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID, PublicKeyAlgorithmOID

from keyden import errors as E
from keyden.core.views import OP_DECRYPT, OP_ENCRYPT, OP_SIGN, OP_VERIFY, PkeyQuery  # (records clients decode)
from keyden.crypto import check_context, symmetric

log = logging.getLogger("keyden.asymmetric")

__all__ = ["OP_ENCRYPT", "OP_DECRYPT", "OP_SIGN", "OP_VERIFY", "MAX_INPUT",
           "ParsedKey", "PkeyQuery", "parse", "generate", "parse_info"]

#: The operations each use a key may be bound to allows (flags.ASYMMETRIC_USE's names), as PKCS#11's
#: CKA_SIGN covers verify and CKA_DECRYPT encrypt; key agreement (derive) is none of the four.
OPS_OF_USE = {"sign": OP_SIGN | OP_VERIFY, "decrypt": OP_ENCRYPT | OP_DECRYPT, "derive": 0}
#: The uses each algorithm has at all: a binding to another would make a key that does nothing.
USES_OF_ALGORITHM = {"rsa": ("sign", "decrypt"), "ecdsa": ("sign", "derive"), "ed25519": ("sign",),
                     "x25519": ("derive",)}
USE_OF_OP = {op: use for use, ops in OPS_OF_USE.items() for op in (OP_ENCRYPT, OP_DECRYPT, OP_SIGN, OP_VERIFY)
             if op & ops}

MAX_INPUT = 1 << 20          # key data larger than this is refused before any parsing
#: A certificate's DER larger than this is refused before pyca parses it: pyca holds the GIL (every thread
#: of the daemon) through parts of a parse, 40-50 ms at a stretch on 820 KB of 60000 extensions.  Web PKI
#: certificates are a few KiB; 1000 subjectAltNames take about 20.
MAX_CERTIFICATE = 64 << 10
MAX_INFO = 4096              # an info string is a short option list, never bulk data (protocol.MAX_PKEY_INFO)
RSA_MIN_BITS, RSA_MAX_BITS = 2048, 4096
ED25519_MAX_DATA = 16 * 1024 * 1024  # pure Ed25519 signs the message itself: up to a frame's worth (the default cap)

_HASHES = {  # protocol.PKEY_HASHES names the same, for the clients
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384, "sha3-512": hashes.SHA3_512,
}

#: curve -> (pyca curve, its byte length, the largest DER signature, the default hash)
_CURVES = {"p256": (ec.SECP256R1, 32, 72, "sha256"), "p384": (ec.SECP384R1, 48, 104, "sha384")}
#: ECDSA's max_data_size, the kernel's (ecdsa_digest_size, 6.13): SHA-512's, whatever the curve.  A digest
#: longer than the curve is cut to its leftmost bits, as FIPS 186 says and OpenSSL does (SHA-384 on P-256).
ECDSA_MAX_DATA = 64
_CURVE_BY_PYCA_NAME = {"secp256r1": "p256", "secp384r1": "p384"}

# Encodings each algorithm knows (first = the kernel default when enc= is absent),
# and the further info keys each encoding takes.
_ENCODINGS = {"rsa": ("raw", "pkcs1", "pss", "oaep"), "ecdsa": ("x962", "p1363"), "ed25519": ("raw",),
              "x25519": ("raw",)}
_ENC_KEYS = {
    ("rsa", "raw"): {"hash"}, ("rsa", "pkcs1"): {"hash"}, ("rsa", "pss"): {"hash", "saltlen", "mgfhash"},
    ("rsa", "oaep"): {"hash", "mgfhash", "label"}, ("ecdsa", "x962"): {"hash"}, ("ecdsa", "p1363"): {"hash"},
    ("ed25519", "raw"): set(), ("x25519", "raw"): set(),
}
_INFO_KEYS = frozenset({"enc", "hash", "saltlen", "mgfhash", "label"})
_RAW_RSA = "raw RSA is not offered; use enc=pkcs1, pss or oaep"
_BAD_SIG = "signature verification failed"
_DECRYPT_FAILED = "decryption failed"   # one message for every failure: no padding oracle


def _show(text: str) -> str:
    """Quote a piece of a (non-secret) info string for a message, bounded in length."""
    return repr(text[:32])


def _as_bytes(value, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise E.EINVAL(f"{what} must be bytes")


def _hash(name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[name]()
    except KeyError:
        raise E.EINVAL(f"unsupported hash {_show(name)}; use one of {', '.join(_HASHES)}") from None


# ---------------------------------------------------------------------------
# info strings


def parse_info(info: str) -> dict[str, str]:
    """Split a kernel-style info string ("enc=pss hash=sha256") into a dict.

    Grammar only (as the kernel's keyctl_pkey_params_parse): whether a value
    makes sense for a key is checked by the operation that uses it.
    """
    if not isinstance(info, str):
        raise E.EINVAL("info must be a string")
    if len(info) > MAX_INFO:
        raise E.EINVAL("info string too long")
    out: dict[str, str] = {}
    for token in re.split(r"[ \t]+", info):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if not sep:
            raise E.EINVAL(f"info token without '=': {_show(token)}")
        if key not in _INFO_KEYS:
            raise E.EINVAL(f"unknown info key {_show(key)}")
        if key in out:
            raise E.EINVAL(f"repeated info key {key}=")
        if not value:
            raise E.EINVAL(f"empty value for {key}=")
        out[key] = value
    return out


# ---------------------------------------------------------------------------
# parsing


def parse(data: bytes, password: bytes | None = None, *, stored: bool = False) -> ParsedKey:
    """Parse key data the way the kernel's asymmetric parsers would, plus PEM.

    Recognised: X.509 certificates, PKCS#8 private keys (optionally
    password-encrypted), traditional PEM private keys, SubjectPublicKeyInfo.
    """
    data = _as_bytes(data, "key data")
    if len(data) > MAX_INPUT:
        raise E.EINVAL("key data larger than 1 MiB")
    if password is not None and not isinstance(password, (bytes, bytearray)):
        raise E.EINVAL("password must be bytes")
    password = bytes(password) if password else None   # pyca treats b"" as "no password" too
    if not data:
        raise E.EINVAL("empty key data")  # asymmetric_key_preparse's answer
    try:
        kind = _DER_SHAPES.get(_der_child_tags(data))
        if kind is not None:
            if kind == "pkcs8-enc" and password is not None:
                return _load_encrypted(data, password)
            return _load(kind, data, False, password, kind == "pkcs8-enc", stored)
        if b"-----BEGIN" in data:
            return _parse_pem(data, password, stored)
        raise E.EBADMSG("unrecognised key data")
    except E.KeydenError:
        raise
    except Exception as exc:  # last-resort net: hostile bytes must never become an internal error
        # ... nor hide a bug of ours for good: the exception's type (never the bytes) goes to the debug log.
        log.debug("key data refused by a parser error: %s", type(exc).__name__)
        raise E.EBADMSG("unrecognised key data") from None


def _der_header(data: bytes, pos: int):
    """(tag, content offset, content length) of the DER TLV at pos, or None."""
    if pos + 2 > len(data):
        return None
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > len(data):
            return None
        length = int.from_bytes(data[pos:pos + size], "big")
        pos += size
    return (tag, pos, length) if pos + length <= len(data) else None


def _der_children(data: bytes, tlv) -> list:
    """The first (up to 8) TLVs inside a SEQUENCE TLV; ValueError if it is not one."""
    if tlv is None or tlv[0] != 0x30:
        raise ValueError("not a SEQUENCE")
    items, pos, end = [], tlv[1], tlv[1] + tlv[2]
    while pos < end and len(items) < 8:
        item = _der_header(data, pos)
        if item is None:
            raise ValueError("bad TLV")
        items.append(item)
        pos = item[1] + item[2]
    return items


def _der_value(data: bytes, tlv, tag: int | None = None) -> bytes:
    """The content octets of a TLV; ValueError if its tag is not ``tag`` (when given)."""
    if tag is not None and tlv[0] != tag:
        raise ValueError("unexpected tag")
    return data[tlv[1]:tlv[1] + tlv[2]]


def _der_count(data: bytes, tlv) -> int:
    """A small INTEGER's value (a count, a cost); one over 8 bytes reads as 2^64, over any limit."""
    if tlv[0] != 0x02:
        raise ValueError("not an INTEGER")
    return int.from_bytes(_der_value(data, tlv), "big", signed=True) if tlv[2] <= 8 else 1 << 64


def _der_child_tags(data: bytes):
    """Tags of the first two elements inside the outer DER SEQUENCE, or None.

    pyca does not say which container it decoded (its DER private-key loader
    also takes traditional PKCS#1/SEC1, its public-key loader PKCS#1), so we
    peek at the shape to pick the one parser that applies and to keep
    ``source`` truthful.  All real decoding is pyca's.
    """
    try:
        first, second = _der_children(data, _der_header(data, 0))[:2]
    except ValueError:
        return None
    return first[0], second[0]


_OID_PBES2 = bytes.fromhex("2a864886f70d01050d")         # 1.2.840.113549.1.5.13
_OID_PBKDF2 = bytes.fromhex("2a864886f70d01050c")        # 1.2.840.113549.1.5.12
_OID_SCRYPT = bytes.fromhex("2b06010401da47040b")        # 1.3.6.1.4.1.11591.4.11
_OID_RSASSA_PSS = bytes.fromhex("2a864886f70d01010a")    # 1.2.840.113549.1.1.10
_OID_PKCS7_DATA = bytes.fromhex("2a864886f70d010701")     # 1.2.840.113549.1.7.1: a PKCS#12 file's content
#: The key algorithms keyden holds: dotted, as pyca names a certificate's, -> DER content octets, as an
#: SPKI or PKCS#8 is read for before pyca loads it.  pyca is given no other (see _check_key_algorithm).
_KEY_ALGORITHMS = {
    "1.2.840.113549.1.1.1": bytes.fromhex("2a864886f70d010101"),  # rsaEncryption
    "1.2.840.10045.2.1": bytes.fromhex("2a8648ce3d0201"),         # id-ecPublicKey
    "1.3.101.112": bytes.fromhex("2b6570"),                       # Ed25519
    "1.3.101.110": bytes.fromhex("2b656e"),                       # X25519
}
OID_RSA, OID_EC, OID_ED25519, OID_X25519 = _KEY_ALGORITHMS.values()
_KEY_OIDS = frozenset(_KEY_ALGORITHMS.values())
# Old roots (the CA bundle's, and any a user loads) have non-positive serials, which RFC 5280 forbids: pyca
# parses them with a deprecation warning, a raw line on the daemon's stderr at each parse.  One filter, set
# once (catch_warnings around a parse is not thread-safe).
warnings.filterwarnings("ignore", "Parsed a serial number which wasn't positive", CryptographyDeprecationWarning)

_UNSUPPORTED = "unsupported key algorithm; RSA, EC P-256/P-384, Ed25519 and X25519 are supported"
MAX_KDF_ITERATIONS = 1 << 21      # ~0.5 s of PBKDF2-SHA256 on a worker; common settings are 2048..1.3M
MAX_SCRYPT_COST = 64 << 20        # 128*N*r*p bytes; OpenSSL's default N=16384,r=8,p=1 is 16 MiB


def _pbes2_kdf(der: bytes, kdf: list) -> tuple[Callable, int | None]:
    """A PBES2 keyDerivationFunc's KDF, as a constructor still to be given its length, and the key length
    it names (None if none); its cost is checked here, before it can run.  ValueError where it does not
    read as expected."""
    kdf_params = _der_children(der, kdf[1])
    salt = _der_value(der, kdf_params[0], 0x04)
    oid = _der_value(der, kdf[0], 0x06)
    if oid == _OID_SCRYPT:  # salt, N, r, p, keyLength?
        n, r, p = (_der_count(der, t) for t in kdf_params[1:4])
        if min(n, r, p) < 1:
            raise ValueError("scrypt parameters below 1")
        if 128 * n * r * p > MAX_SCRYPT_COST:
            raise E.EINVAL("key encryption too costly to undo (scrypt memory)")
        length = _der_count(der, kdf_params[4]) if len(kdf_params) > 4 else None
        return functools.partial(Scrypt, salt, n=n, r=r, p=p), length
    if oid == _OID_PBKDF2:  # salt, iterations, keyLength?, prf? (hmacWithSHA1 by default)
        iterations, rest = _der_count(der, kdf_params[1]), kdf_params[2:]
        if iterations < 1:
            raise ValueError("no PBKDF2 iterations")
        if iterations > MAX_KDF_ITERATIONS:
            raise E.EINVAL("key encryption too costly to undo (PBKDF2 iterations)")
        length = _der_count(der, rest.pop(0)) if rest and rest[0][0] == 0x02 else None
        prf = _PBKDF2_PRFS.get(_der_value(der, _der_children(der, rest[0])[0], 0x06)) if rest else hashes.SHA1
        if prf is None:
            raise E.EINVAL("key encrypted with a PBKDF2 hash keyden does not take (SHA-1 or SHA-2): "
                           "re-encrypt it, e.g. openssl pkcs8 -topk8 -v2 aes-256-cbc")
        return functools.partial(PBKDF2HMAC, prf(), salt=salt, iterations=iterations), length
    raise E.EINVAL("key encrypted with a PBES2 KDF other than PBKDF2 or scrypt; not supported")


def _decrypt_pkcs8(der: bytes, password: bytes) -> bytes:
    """An EncryptedPrivateKeyInfo's PrivateKeyInfo, decrypted here with pyca's primitives: PBES2, with
    PBKDF2 or scrypt, then AES- or 3DES-CBC and PKCS#7 unpadding.

    Why not pyca's loader: it holds the GIL through the KDF, ~1 s at the 2^21 PBKDF2 rounds allowed,
    in which the loop, and so every client, waits (pyca's KDF primitives release it); and it hides
    the algorithm of the key inside, so an RSA key restricted to RSASSA-PSS loaded as plain RSA.  Why
    check the cost first: a KDF runs with any iteration count or memory it is given, so a few hundred
    bytes could pin a core for days or allocate gigabytes inside the daemon.  So this fails closed:
    PBES1 (obsolete DES and RC2), PKCS#12 PBE (legacy, and only pyca's loader undoes it), a KDF or
    cipher not named above, and parameters that do not read as expected are refused before any KDF
    runs.
    """
    try:
        outer = _der_children(der, _der_header(der, 0))
        algorithm = _der_children(der, outer[0])
        oid, params = _der_value(der, algorithm[0], 0x06), algorithm[1]
        if oid != _OID_PBES2:
            raise E.EINVAL("key encryption not supported (PBES1's DES and RC2 and PKCS#12 PBE are legacy): "
                           "re-encrypt it with PBES2, e.g. openssl pkcs8 -topk8 -v2 aes-256-cbc")
        kdf, scheme = (_der_children(der, tlv) for tlv in _der_children(der, params)[:2])
        kdf_of, length = _pbes2_kdf(der, kdf)
        cipher = _PBES2_CIPHERS.get(_der_value(der, scheme[0], 0x06))
        if cipher is None:
            raise E.EINVAL("key encrypted with a cipher keyden does not take (AES-CBC or 3DES-CBC): re-encrypt "
                           "it, e.g. openssl pkcs8 -topk8 -v2 aes-256-cbc")
        algorithm_of, key_size = cipher
        iv, data = _der_value(der, scheme[1], 0x04), _der_value(der, outer[1], 0x04)
        block = algorithm_of.block_size // 8
        if length not in (None, key_size) or len(iv) != block or not data or len(data) % block:
            raise ValueError("a key length, IV or ciphertext the cipher does not take")
        kdf_run = kdf_of(length=key_size)
        mode = modes.CBC(iv)
    except (ValueError, IndexError, TypeError):
        raise E.EBADMSG("malformed encrypted private key") from None
    try:
        algorithm_run = algorithm_of(kdf_run.derive(password))
        decryptor = Cipher(algorithm_run, mode).decryptor()
        unpadder = sym_padding.PKCS7(algorithm_of.block_size).unpadder()
        return unpadder.update(decryptor.update(data) + decryptor.finalize()) + unpadder.finalize()
    except ValueError:  # the data or IV not whole blocks, or the padding a wrong password leaves
        raise E.EKEYREJECTED("wrong password, or corrupt encrypted key") from None


def _load_encrypted(der: bytes, password: bytes) -> ParsedKey:
    """An encrypted PKCS#8 key, decrypted (``_decrypt_pkcs8``), then loaded and checked as an unencrypted
    one is (a key restricted to RSASSA-PSS inside was loaded as plain RSA when pyca decrypted it)."""
    plain = _decrypt_pkcs8(der, password)
    if _DER_SHAPES.get(_der_child_tags(plain)) != "pkcs8":
        raise E.EKEYREJECTED("wrong password, or corrupt encrypted key")
    try:
        return _load("pkcs8", plain, False, None, False)
    except E.EBADMSG:  # what a wrong password decrypts to, with padding that happened to look right
        raise E.EKEYREJECTED("wrong password, or corrupt encrypted key") from None


_PBKDF2_PRFS = {  # RFC 8018 B.1.2: hmacWithSHA1 .. hmacWithSHA512 (1.2.840.113549.2.7-11)
    bytes.fromhex("2a864886f70d0207"): hashes.SHA1, bytes.fromhex("2a864886f70d0208"): hashes.SHA224,
    bytes.fromhex("2a864886f70d0209"): hashes.SHA256, bytes.fromhex("2a864886f70d020a"): hashes.SHA384,
    bytes.fromhex("2a864886f70d020b"): hashes.SHA512,
}
_PBES2_CIPHERS = {  # RFC 8018 B.2 and RFC 3565: the scheme's OID -> (pyca algorithm, key bytes)
    bytes.fromhex("608648016503040102"): (algorithms.AES, 16),  # aes128-CBC 2.16.840.1.101.3.4.1.2
    bytes.fromhex("608648016503040116"): (algorithms.AES, 24),  # aes192-CBC ...1.22
    bytes.fromhex("60864801650304012a"): (algorithms.AES, 32),  # aes256-CBC ...1.42
    bytes.fromhex("2a864886f70d0307"): (TripleDES, 24),         # des-EDE3-CBC 1.2.840.113549.3.7
}


# (first, second) child tags -> container.  Certificate: tbs SEQUENCE, algorithm
# SEQUENCE; PKCS#8: version INTEGER, algorithm SEQUENCE; EncryptedPrivateKeyInfo:
# algorithm SEQUENCE, OCTET STRING; SPKI: algorithm SEQUENCE, BIT STRING.
# Traditional DER (PKCS#1 RSAPrivateKey, SEC1) is refused, like the kernel does.
_DER_SHAPES = {(0x30, 0x30): "x509", (0x02, 0x30): "pkcs8", (0x30, 0x04): "pkcs8-enc", (0x30, 0x03): "spki"}
#: a traditional PEM label -> the shape its DER must have: PKCS#1 RSAPrivateKey (version, modulus), SEC1
#: ECPrivateKey (version, private key OCTET STRING)
_TRADITIONAL = {b"RSA PRIVATE KEY": (0x02, 0x02), b"EC PRIVATE KEY": (0x02, 0x04)}
_PEM_LABELS = {
    "CERTIFICATE": "x509", "PRIVATE KEY": "pkcs8", "ENCRYPTED PRIVATE KEY": "pkcs8-enc",
    "RSA PRIVATE KEY": "pem", "EC PRIVATE KEY": "pem", "PUBLIC KEY": "spki",
}
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")


def _parse_pem(data: bytes, password: bytes | None, stored: bool = False) -> ParsedKey:
    """One PEM block, decoded here and handed to pyca's DER loaders: the checks made before a loader runs
    (a password KDF's cost, a key restricted to PSS) must see the very bytes it reads.  (pyca's PEM reader
    takes base64 on the BEGIN and END lines too, which a reader of the lines between them would not see.)
    Only an encrypted traditional key goes to pyca as PEM: its headers say how to decrypt it, with one
    round of a hash, and the key inside has no algorithm to check."""
    labels = [label for label in _PEM_BEGIN.findall(data) if label != b"EC PARAMETERS"]  # (openssl ecparam
    if len(labels) > 1:                                                                  # -genkey's first block)
        raise E.EINVAL("more than one PEM block; give one key or certificate")
    if not labels:
        raise E.EBADMSG("malformed PEM")
    label = re.escape(labels[0])
    match = re.search(rb"-----BEGIN " + label + rb"-----(.*?)-----END " + label + rb"-----", data, re.S)
    kind = _PEM_LABELS.get(labels[0].decode("ascii"))
    if match is None or kind is None:
        raise E.EBADMSG("unrecognised PEM block")
    if kind == "pem" and b"Proc-Type: 4,ENCRYPTED" in match[1]:
        return _load(kind, match[0], True, password, True)
    der = _pem_der(match[1])
    tags = _der_child_tags(der)
    if not (tags == _TRADITIONAL[labels[0]] if kind == "pem" else _DER_SHAPES.get(tags) == kind):
        raise E.EBADMSG(f"the PEM block's contents are not what its label ({labels[0].decode()}) says")
    if kind == "pkcs8-enc" and password is not None:
        return _load_encrypted(der, password)
    return _load(kind, der, False, password, kind == "pkcs8-enc", stored)


def _key_algorithm(der: bytes, kind: str) -> bytes | None:
    """The OID (content octets) of an SPKI's or a PKCS#8 PrivateKeyInfo's key algorithm, or None."""
    try:
        algorithm = _der_children(der, _der_header(der, 0))[0 if kind == "spki" else 1]
        oid = _der_children(der, algorithm)[0]
    except (ValueError, IndexError):
        return None
    return _der_value(der, oid) if oid[0] == 0x06 else None


def spki_algorithm(der: bytes) -> bytes | None:
    """The key algorithm OID (content octets, as OID_RSA...) an SPKI names, or None: what a public key
    from a client must be checked against before pyca loads it (see _check_key_algorithm)."""
    return _key_algorithm(der, "spki")


def _check_key_algorithm(der: bytes, kind: str) -> None:
    """An SPKI or PKCS#8 key of an algorithm keyden holds, known before pyca loads it: pyca validates a
    finite-field DH group as it loads the key, which holds every thread of the daemon for seconds.  And
    pyca loads an id-RSASSA-PSS key as a plain RSA key, dropping its restriction to PSS signatures; keyden
    would then sign PKCS#1 v1.5 and decrypt with it, so such keys are refused (nor does the kernel take them)."""
    oid = _key_algorithm(der, kind)
    if oid is None:
        raise E.EBADMSG("unrecognised key data")
    if oid == _OID_RSASSA_PSS:
        raise E.EINVAL("unsupported key algorithm: an RSA key restricted to RSASSA-PSS "
                       "(keyden could not enforce the restriction)")
    if oid == _OID_PKCS7_DATA:  # (a PFX reads as a PKCS#8 key whose algorithm is its content type)
        raise E.EINVAL("a PKCS#12 file is not taken: give its key and its certificate apart (PEM or DER), e.g. "
                       "openssl pkcs12 -in file.p12 -nocerts -nodes, and -nokeys for the certificate (with "
                       "OpenSSL 3, -legacy for an old RC2-encrypted file)")
    if oid not in _KEY_OIDS:
        raise E.EINVAL(_UNSUPPORTED)


def _signature_fields_agree(der: bytes) -> bool:
    """RFC 5280 4.1.1.2: a certificate's signatureAlgorithm must equal the signature field inside its
    TBS.  pyca's parser does not check it, and a signature is verified under the outer one only."""
    try:
        tbs, outer = _der_children(der, _der_header(der, 0))[:2]
        fields = _der_children(der, tbs)
        inner = fields[2] if fields[0][0] == 0xA0 else fields[1]  # after [0] version (if any) and serial
    except (ValueError, IndexError):
        return False
    return outer[0] == inner[0] and _der_value(der, outer) == _der_value(der, inner)


def _signature_bits_whole(der: bytes) -> bool:
    """Does the certificate's signatureValue BIT STRING say 0 unused bits?  pyca takes 1-7 and hands back
    the same signature, so the same certificate had another DER, a "bin:" ban's hash another value;
    OpenSSL's X509_verify refuses it (so the kernel cannot meet it)."""
    try:
        value = _der_children(der, _der_header(der, 0))[2]
    except (ValueError, IndexError):
        return False
    return value[0] == 0x03 and value[2] >= 1 and der[value[1]] == 0


def _check_signature_algorithm(cert: x509.Certificate) -> None:
    """pyca loads a certificate whose RSASSA-PSS parameters it cannot read (absent, or an unknown mask
    generation function) and raises ValueError only when they are asked for: refused here, so nothing
    that checks a signature or a blacklist entry later meets it.  An unknown algorithm is no error: such
    a certificate is kept, and vouches for nothing."""
    try:
        cert.signature_algorithm_parameters
        cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        pass
    except ValueError:
        raise E.EBADMSG("malformed certificate: its signature algorithm's parameters cannot be read") from None


def _pem_der(body: bytes) -> bytes:
    """The DER a PEM block's base64 encodes: strictly, with nothing else between its BEGIN and END lines."""
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", body), validate=True)
    except ValueError:
        raise E.EBADMSG("malformed PEM") from None


def _load(kind: str, blob: bytes, pem: bool, password, encrypted: bool, stored: bool = False) -> ParsedKey:
    """Run the one pyca loader for ``kind`` and turn its errors into errnos.  ``blob`` is DER, but for an
    encrypted traditional key (``pem``: the PEM block, whose headers say how to decrypt it).  ``stored``:
    taken back from keyden's own store, where an earlier version may have put a certificate over
    MAX_CERTIFICATE: it loads still (a restart must lose no key)."""
    if kind in ("x509", "spki") and password is not None:
        raise E.EINVAL("a password was given but the data is not an encrypted private key")
    if kind in ("spki", "pkcs8"):
        _check_key_algorithm(blob, kind)
    try:
        if kind == "x509":
            if len(blob) > MAX_CERTIFICATE and not stored:
                raise E.EINVAL(f"certificate larger than {MAX_CERTIFICATE >> 10} KiB")
            try:
                cert = x509.load_der_x509_certificate(blob)
            except ValueError:
                raise E.EBADMSG("malformed certificate, or an encoding keyden's X.509 parser refuses "
                                "(e.g. a PrintableString holding '@')") from None
            if not _signature_bits_whole(blob):
                raise E.EBADMSG("malformed certificate: its signature is not a whole number of bytes (unused "
                                "bits in its BIT STRING), which OpenSSL refuses")
            if not _signature_fields_agree(cert.public_bytes(serialization.Encoding.DER)):
                raise E.EBADMSG("malformed certificate: its signatureAlgorithm differs from the signature "
                                "field inside what was signed")
            _check_signature_algorithm(cert)
            if cert.public_key_algorithm_oid == PublicKeyAlgorithmOID.RSASSA_PSS:
                raise E.EINVAL("unsupported key algorithm: a certificate for an RSA key restricted to "
                               "RSASSA-PSS (keyden could not enforce the restriction)")
            if cert.public_key_algorithm_oid.dotted_string not in _KEY_ALGORITHMS:
                raise E.EINVAL(_UNSUPPORTED)  # (unloaded, as in _check_key_algorithm)
            return _build(cert.public_key(), None, cert, "x509")
        if kind == "spki":
            return _build(serialization.load_der_public_key(blob), None, None, "spki")
        load_priv = serialization.load_pem_private_key if pem else serialization.load_der_private_key
        priv = load_priv(blob, password, unsafe_skip_rsa_key_validation=True)
        if isinstance(priv, rsa.RSAPrivateKey):
            _check_rsa_bits(priv.key_size)
            _check_rsa_consistent(priv)
    except TypeError:
        if kind in ("x509", "spki"):
            raise E.EBADMSG("unrecognised key data") from None
        # pyca's TypeError means the password does not fit the key's encryptedness.
        if password is None:
            raise E.EBADMSG("wrong or missing password") from None
        raise E.EINVAL("a password was given but the key is not encrypted") from None
    except UnsupportedAlgorithm:
        raise E.EINVAL("unsupported key algorithm or key encryption") from None
    except ValueError:
        if encrypted and password is not None:
            raise E.EKEYREJECTED("wrong password, or corrupt encrypted key") from None
        raise E.EBADMSG("unrecognised key data") from None
    source = "pem" if kind == "pem" else "pkcs8"
    return _build(priv.public_key(), priv, None, source)


def _serial_bytes(serial: int) -> bytes:
    """The certificate serial as its DER INTEGER content octets (the kernel's raw_serial)."""
    magnitude = serial if serial >= 0 else ~serial
    return serial.to_bytes((magnitude.bit_length() + 8) // 8, "big", signed=True)


def _cert_name(cert: x509.Certificate) -> str:
    """The kernel's x509_fabricate_name: the subject's CN, after "<O>: " unless the CN begins with the O (or
    shares its first 7 bytes); without a CN its O, else its e-mail address, else nothing.  The last of
    each attribute counts, as the kernel's parser keeps the last; printable and bounded here."""
    def last(oid) -> bytes:
        values = [a.value for a in cert.subject.get_attributes_for_oid(oid) if isinstance(a.value, str)]
        return values[-1].encode()[:128] if values else b""

    cn, o = last(NameOID.COMMON_NAME), last(NameOID.ORGANIZATION_NAME)
    if cn and o and not cn.startswith(o) and not (len(cn) >= 7 and len(o) >= 7 and cn[:7] == o[:7]):
        name = o + b": " + cn
    else:
        name = cn or o or last(NameOID.EMAIL_ADDRESS)
    return "".join(c if c.isprintable() else "?" for c in name.decode(errors="replace"))


def _der_contents(der: bytes) -> bytes:
    """A DER element's contents, without its tag and length (what the kernel's ASN.1 actions are given)."""
    size = der[1]
    return der[2 + (size & 0x7F if size & 0x80 else 0):]


def _weak_digest_info(data: bytes) -> bool:
    """Is ``data`` a DigestInfo of MD2, MD4 or MD5 (1.2.840.113549.2.2/4/5), with or without the NULL
    parameters?  Signing one without hash= would make the signatures hash= refuses to."""
    for last in (0x02, 0x04, 0x05):
        oid = bytes.fromhex("06082a864886f70d02") + bytes([last])
        for algorithm in (b"\x30\x0c" + oid + b"\x05\x00", b"\x30\x0a" + oid):
            prefix = bytes([0x30, len(algorithm) + 18]) + algorithm + b"\x04\x10"
            if len(data) == len(prefix) + 16 and data.startswith(prefix):
                return True
    return False


def _check_rsa_consistent(priv: rsa.RSAPrivateKey) -> None:
    """EKEYREJECTED for an RSA key whose parts do not fit together, which OpenSSL might mishandle.

    Not pyca's own validation (OpenSSL's RSA_check_key): its primality tests of p and q hold the GIL, so
    every thread of the daemon, for 40 ms at 2048 bits and 290 ms at 4096, and any uid may send keys.
    Instead, as Go's rsa.PrivateKey.Validate: n = pq, e odd, and each CRT part what pyca computes from d,
    p and q; then a signature made with the key must verify under its public half (OpenSSL, GIL free).
    A composite p or q gets through only with a d that fits its factors: a multi-prime key, which signs
    and decrypts correctly (OpenSSL checks each CRT result and falls back to d itself).
    """
    n = priv.private_numbers()
    pub = n.public_numbers
    try:
        whole = (1 < n.p < pub.n and 1 < n.q < pub.n and n.p * n.q == pub.n and n.p != n.q
                 and pub.e % 2 == 1 and 3 <= pub.e < pub.n and n.d > 0
                 and n.dmp1 == rsa.rsa_crt_dmp1(n.d, n.p) and n.dmq1 == rsa.rsa_crt_dmq1(n.d, n.q)
                 and n.iqmp == rsa.rsa_crt_iqmp(n.p, n.q)
                 and pub.e * n.dmp1 % (n.p - 1) == 1 and pub.e * n.dmq1 % (n.q - 1) == 1)
    except ValueError:  # (q has no inverse mod p)
        whole = False
    if not whole:
        raise E.EKEYREJECTED("inconsistent RSA private key")
    if pub.n.bit_length() > _RSA_SMALL_MODULUS_BITS and pub.e.bit_length() > _RSA_MAX_PUBEXP_BITS:
        return  # OpenSSL takes no public operation with such a key: it signs, nobody verifies
    probe = b"keyden: does this key sign what its public half verifies?"
    try:
        priv.public_key().verify(priv.sign(probe, padding.PKCS1v15(), hashes.SHA256()), probe,
                                 padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError):
        raise E.EKEYREJECTED("inconsistent RSA private key") from None


#: OpenSSL's OPENSSL_RSA_SMALL_MODULUS_BITS and OPENSSL_RSA_MAX_PUBEXP_BITS: past 3072 bits of modulus it
#: refuses public exponents of more than 64 bits.
_RSA_SMALL_MODULUS_BITS, _RSA_MAX_PUBEXP_BITS = 3072, 64


def _check_rsa_bits(bits: int) -> int:
    if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
        raise E.EINVAL(f"unsupported RSA size ({bits} bits; {RSA_MIN_BITS}..{RSA_MAX_BITS} supported)")
    return bits


def _build(pub, priv, cert, source: str) -> ParsedKey:
    """Apply the algorithm/size policy and derive ids and description."""
    if isinstance(pub, rsa.RSAPublicKey):
        algo, curve, bits = "rsa", None, _check_rsa_bits(pub.key_size)
        label = f"RSA-{bits}"
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        curve = _CURVE_BY_PYCA_NAME.get(pub.curve.name)
        if curve is None:
            raise E.EINVAL(f"unsupported EC curve {_show(pub.curve.name)}; P-256 and P-384 are supported")
        algo, bits, label = "ecdsa", pub.curve.key_size, f"ECDSA-{curve.upper()}"
    elif isinstance(pub, ed25519.Ed25519PublicKey):
        algo, curve, bits, label = "ed25519", None, 256, "Ed25519"
    elif isinstance(pub, x25519.X25519PublicKey):
        algo, curve, bits, label = "x25519", None, 256, "X25519"  # key agreement only (derive)
    else:
        raise E.EINVAL(_UNSUPPORTED)

    # RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits.  A certificate
    # and its private key therefore share this id.
    spki_id = x509.SubjectKeyIdentifier.from_public_key(pub).digest
    ids = [spki_id]
    if cert is not None:
        try:
            skid = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.key_identifier
        except x509.ExtensionNotFound:
            skid = None
        if skid and skid != spki_id:
            ids.append(skid)
        serial = _serial_bytes(cert.serial_number)
        ids.append(serial + _der_contents(cert.issuer.public_bytes()))  # the kernel's raw serial ‖ raw issuer
        # The kernel's: the SKID, else the serial.  A description stays short (at most 4095 bytes): an SKID
        # over 64 bytes gives way to the serial, and a serial as long to the SPKI id.
        shown = skid if skid and len(skid) <= 64 else serial if len(serial) <= 64 else spki_id
        description = f"{_cert_name(cert)}: {shown.hex()}"
    else:
        half = "private" if priv is not None else "public"
        description = f"{label} {half} key: {spki_id.hex()}"
    return ParsedKey(
        algo=algo, curve=curve, source=source, key_bits=bits, has_private=priv is not None,
        certificate=cert, public_key=pub, key_ids=tuple(ids), default_description=description,
        spki_der=pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        _private=priv,
    )


_GENERATE = {
    "rsa": ("rsa", 2048), "rsa:2048": ("rsa", 2048), "rsa:3072": ("rsa", 3072), "rsa:4096": ("rsa", 4096),
    "ec:p256": ("ec", "p256"), "p256": ("ec", "p256"), "ec:p384": ("ec", "p384"), "p384": ("ec", "p384"),
    "ed25519": ("ed25519", None), "x25519": ("x25519", None),
}


def _generation(spec: str) -> tuple[str, object]:
    """What ``generate`` makes for a spec: (kind, size or curve); EINVAL for one it does not know."""
    if not isinstance(spec, str) or spec not in _GENERATE:
        shown = repr(spec[:40]) if isinstance(spec, str) else type(spec).__name__  # a spec is never secret
        raise E.EINVAL(f"unknown key spec {shown}; use one of {', '.join(_GENERATE)}, or for symmetric keys "
                       f"{symmetric.KEY_SPECS}")
    return _GENERATE[spec]


def algorithm_of_spec(spec: str) -> str:
    """The algorithm (ParsedKey.algo) ``generate(spec)`` would make, known before any work is done."""
    kind, _arg = _generation(spec)
    return {"rsa": "rsa", "ec": "ecdsa", "x25519": "x25519"}.get(kind, "ed25519")


def check_uses(algo: str, uses: Iterable[str]) -> None:
    """EINVAL unless every use a key is bound to is one its algorithm has (PKCS#11's
    CKR_TEMPLATE_INCONSISTENT): an Ed25519 key bound to decrypt would do nothing at all."""
    possible = USES_OF_ALGORITHM[algo]
    impossible = [use for use in uses if use not in possible]
    if impossible:
        raise E.EINVAL(f"{algo} keys cannot {','.join(impossible)}; they can {','.join(possible)}")


def generate(spec: str) -> ParsedKey:
    """Create a fresh private key inside the daemon (RSA e=65537, P-256/P-384, Ed25519)."""
    kind, arg = _generation(spec)
    if kind == "rsa":
        priv = rsa.generate_private_key(public_exponent=65537, key_size=arg)
    elif kind == "ec":
        priv = ec.generate_private_key(_CURVES[arg][0]())
    elif kind == "x25519":
        priv = x25519.X25519PrivateKey.generate()
    else:
        priv = ed25519.Ed25519PrivateKey.generate()
    return _build(priv.public_key(), priv, None, "generated")


# ---------------------------------------------------------------------------
# the key object and its operations


@functools.lru_cache(maxsize=1024)
def check_info(info: str) -> None:
    """``parse_info``'s grammar check alone, cached: it runs before the key is looked up on every
    KEYCTL_PKEY_* request (errors are raised, never cached)."""
    parse_info(info)


@functools.lru_cache(maxsize=1024)
def _prepared(algo: str, has_private: bool, op: int, info: str) -> tuple[str, Mapping[str, str]]:
    """(encoding, options) for ``op`` with ``info`` on such a key.  Cached: a server signs with the same few
    info strings all day, and the answer depends on nothing else (errors are raised, never cached)."""
    opts = parse_info(info)
    if algo == "x25519":
        raise E.EOPNOTSUPP("X25519 keys only agree on keys; use derive")
    if op & (OP_ENCRYPT | OP_DECRYPT) and algo != "rsa":
        raise E.EOPNOTSUPP(f"{algo} keys cannot encrypt or decrypt")
    if op & (OP_SIGN | OP_DECRYPT) and not has_private:
        raise E.EINVAL("this operation needs the private key, which this key does not hold")  # the kernel's
    return _check_options(algo, opts), types.MappingProxyType(opts)


def _check_options(algo: str, opts: Mapping[str, str]) -> str:
    """Check each option against the algorithm; returns the encoding in force."""
    enc = opts.get("enc", _ENCODINGS[algo][0])
    if enc not in _ENCODINGS[algo]:
        raise E.EINVAL(f"enc={_show(enc)} is not valid for {algo} keys (use {', '.join(_ENCODINGS[algo])})")
    allowed = _ENC_KEYS[(algo, enc)]
    for key, value in opts.items():
        if key == "enc":
            continue
        if key not in allowed:
            if algo == "ed25519" and key == "hash":
                raise E.EINVAL("Ed25519 signs the message itself; hash= is not accepted")
            raise E.EINVAL(f"{key}= does not apply to {algo} enc={enc}")
        if key in ("hash", "mgfhash"):
            _hash(value)
        elif key == "saltlen" and not re.fullmatch(r"[0-9]{1,5}|digest|max|auto", value):
            raise E.EINVAL("saltlen= must be an integer, 'digest', 'max' or 'auto'")
        elif key == "label" and not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", value):
            raise E.EINVAL("label= must be hex")
    return enc


#: called with a ParsedKey once keyden has destroyed the key: caches built from it drop it (tls.contexts)
_RELEASE_HOOKS: list[Callable[["ParsedKey"], None]] = []


def on_release(hook: Callable[["ParsedKey"], None]) -> None:
    _RELEASE_HOOKS.append(hook)


class ParsedKey:
    """Parsed form of an asymmetric key.  Immutable, and refuses to be pickled or copied."""

    __slots__ = ("algo", "curve", "source", "key_bits", "has_private", "certificate", "public_key",
                 "key_ids", "default_description", "spki_der", "_private", "_released")

    def __init__(self, **fields):
        """Internal: built by parse()/generate(); takes every slot by name (``_private`` too)."""
        for name in self.__slots__[:-1]:
            object.__setattr__(self, name, fields.pop(name))
        if fields:
            raise TypeError(f"unexpected ParsedKey fields: {sorted(fields)}")
        object.__setattr__(self, "_released", False)

    def __setattr__(self, name, value):
        raise AttributeError("ParsedKey is immutable")

    def __delattr__(self, name):
        raise AttributeError("ParsedKey is immutable")

    def __repr__(self) -> str:
        half = "private" if self.has_private else "public"
        return f"<ParsedKey {self.algo} {self.key_bits}-bit {half} from {self.source} id={self.key_ids[0].hex()}>"

    @property
    def summary(self) -> str:
        """As /proc/keys describes an asymmetric key (asymmetric_key_describe): how it came (X509, PKCS8, or
        SPKI for a bare public key) and the kernel's name for its algorithm; for a certificate with a
        subject key identifier, its last 4 bytes; and "[]" as the kernel ends it."""
        kind = "X509" if self.certificate is not None else "PKCS8" if self.has_private else "SPKI"
        algorithm = f"ecdsa-nist-{self.curve}" if self.algo == "ecdsa" else self.algo
        tail = ""
        if self.certificate is not None:
            try:
                skid = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                tail = f" {skid.key_identifier[-4:].hex()}"
            except x509.ExtensionNotFound:
                pass
        return f"{kind}.{algorithm}{tail} []"

    @property
    def slow(self) -> bool:
        """0.3-0.8 ms per operation (RSA, P-384), not tens of µs: worth a worker thread when others wait."""
        return self.algo == "rsa" or self.curve == "p384"

    def _refuse(self, *args):
        raise TypeError("ParsedKey cannot be pickled or copied: it may hold private key material")

    __reduce__ = __reduce_ex__ = __getstate__ = _refuse

    def release(self) -> None:
        """The key is destroyed: whatever was built from it (a TLS context holding it in OpenSSL) lets go,
        so the material does not outlive the key."""
        object.__setattr__(self, "_released", True)
        for hook in _RELEASE_HOOKS:
            hook(self)

    @property
    def released(self) -> bool:
        """Destroyed in keyden: a cache must not keep anything built from it (see ``release``)."""
        return self._released

    def private_key_for_internal_use(self):
        """The pyca private key, for the daemon's own use (never for clients)."""
        if self._private is None:
            raise E.EOPNOTSUPP("this key has no private half")
        return self._private

    def storage_der(self) -> bytes:
        """DER that ``parse`` turns back into this key: unencrypted PKCS#8, else the certificate, else the SPKI.

        Only for the daemon's own sealed storage and wrapped exports (the
        original upload is not kept); never for a reply.
        """
        if self._private is not None:
            return self._private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
        if self.certificate is not None:
            return self.certificate.public_bytes(serialization.Encoding.DER)
        return self.spki_der

    # -- sizes and option checking -----------------------------------------

    def _limits(self) -> PkeyQuery:
        """The kernel's software_key_query() numbers for this key."""
        if self.algo == "rsa":
            ops = OP_ENCRYPT | OP_VERIFY | ((OP_DECRYPT | OP_SIGN) if self.has_private else 0)
            size = (self.key_bits + 7) // 8
            return PkeyQuery(ops, self.key_bits, size, size, size, size)
        if self.algo == "x25519":
            return PkeyQuery(0, 256, 0, 0, 0, 0)
        ops = OP_VERIFY | (OP_SIGN if self.has_private else 0)
        if self.algo == "ecdsa":
            return PkeyQuery(ops, self.key_bits, ECDSA_MAX_DATA, _CURVES[self.curve][2], 0, 0)
        return PkeyQuery(ops, 256, ED25519_MAX_DATA, 64, 0, 0)

    def _prepare(self, op: int, info: str) -> tuple[str, Mapping[str, str]]:
        """Check grammar, then that this key can do ``op`` at all, then the options."""
        return _prepared(self.algo, self.has_private, op, info)

    def _rsa_padding(self, op: int, enc: str, opts: dict[str, str]):
        """pyca padding object and hash (None for PKCS#1 v1.5 encryption) for an RSA op."""
        if enc == "raw":
            raise E.EOPNOTSUPP(_RAW_RSA)
        if op in (OP_SIGN, OP_VERIFY):
            if enc not in ("pkcs1", "pss"):
                raise E.EINVAL(f"enc={enc} is an encryption scheme; sign/verify take pkcs1 or pss")
            if "hash" not in opts and enc == "pkcs1":
                return padding.PKCS1v15(), None  # the kernel's pkcs1pad(rsa): data is the whole encoded payload
            if "hash" not in opts:
                raise E.EINVAL("hash= is required for PSS signatures")
            h = _hash(opts["hash"])
            if enc == "pkcs1":
                return padding.PKCS1v15(), h
            mgf = padding.MGF1(_hash(opts.get("mgfhash", opts["hash"])))
            return padding.PSS(mgf=mgf, salt_length=self._salt_length(op, opts, h)), h
        if enc not in ("pkcs1", "oaep"):
            raise E.EINVAL(f"enc={enc} is a signature scheme; encrypt/decrypt take pkcs1 or oaep")
        if enc == "pkcs1":
            if "hash" in opts:
                _hash(opts["hash"])  # named, so it must exist; PKCS#1 v1.5 encryption uses none (the kernel's pkcs1pad)
            return padding.PKCS1v15(), None
        hash_name = opts.get("hash", "sha256")
        label = bytes.fromhex(opts["label"]) if "label" in opts else None
        if label:
            check_context(label, "an OAEP label")
        mgf = padding.MGF1(_hash(opts.get("mgfhash", hash_name)))
        h = _hash(hash_name)
        return padding.OAEP(mgf=mgf, algorithm=h, label=label), h

    def _salt_length(self, op: int, opts: dict[str, str], h) -> int | object:
        value = opts.get("saltlen", "digest")
        if value == "max":
            return padding.PSS.MAX_LENGTH
        if value == "auto":
            if op != OP_VERIFY:
                raise E.EINVAL("saltlen=auto is only meaningful for verify")
            return padding.PSS.AUTO
        n = h.digest_size if value == "digest" else int(value)
        limit = (self.key_bits + 6) // 8 - h.digest_size - 2   # emLen - hLen - 2 (RFC 8017 9.1.1)
        if n > limit:
            raise E.EINVAL(f"saltlen={n} is too large for this key and hash (max {limit})")
        return n

    def _sig_params(self, op: int, enc: str, opts: dict[str, str], data: bytes):
        """(RSA padding, hash) for sign/verify, once ``data`` is checked: for RSA and
        ECDSA it is a digest of exactly the hash's size, for Ed25519 the message."""
        pad = None
        if self.algo == "ed25519":
            if len(data) > ED25519_MAX_DATA:
                raise E.EINVAL(f"Ed25519 data longer than {ED25519_MAX_DATA} bytes")
            return None, None
        if self.algo == "rsa":
            pad, h = self._rsa_padding(op, enc, opts)
            if h is None:  # enc=pkcs1, no hash: what the signature's padding wraps, DigestInfo and all
                if not data:
                    raise E.EINVAL("data to sign or verify is required")
                size = self._limits().max_data_size  # as keyctl_pkey_params_get_2 checks
                if len(data) > size:
                    raise E.EINVAL(f"data longer than the key size ({size} bytes)")
                if op == OP_SIGN and len(data) > size - 11:  # as pkcs1pad's sign: no room for the padding
                    raise E.EOVERFLOW(f"data longer than the key size less PKCS#1's 11 bytes ({size - 11})")
                if op == OP_SIGN and _weak_digest_info(data):
                    raise E.EINVAL("an MD2, MD4 or MD5 DigestInfo: keyden signs no such digest (hash= refuses "
                                   "them too)")
                return pad, None
        else:
            h = _hash(opts.get("hash", _CURVES[self.curve][3]))  # (no digest is over ECDSA_MAX_DATA)
        if len(data) != h.digest_size:
            raise E.EINVAL(f"data must be a {h.name} digest of {h.digest_size} bytes")
        return pad, h

    # -- KEYCTL_PKEY_* ----------------------------------------------------

    def query(self, info: str = "", uses: Iterable[str] = tuple(OPS_OF_USE)) -> PkeyQuery:
        """KEYCTL_PKEY_QUERY: validates info like the kernel, then reports fixed sizes, and the operations
        this key can do that ``uses`` (the key's binding) allow."""
        _check_options(self.algo, parse_info(info))
        limits = self._limits()
        allowed = 0
        for use in uses:
            allowed |= OPS_OF_USE[use]
        return replace(limits, supported_ops=limits.supported_ops & allowed)

    def encrypt(self, info: str, data: bytes) -> bytes:
        """KEYCTL_PKEY_ENCRYPT with the public half (RSA only)."""
        enc, opts = self._prepare(OP_ENCRYPT, info)
        data = _as_bytes(data, "data")
        pad, h = self._rsa_padding(OP_ENCRYPT, enc, opts)
        size = self._limits().max_enc_size
        limit = size - 11 if h is None else size - 2 * h.digest_size - 2
        if len(data) > size:
            raise E.EINVAL(f"data longer than the key size ({size} bytes)")
        if len(data) > limit:  # as the kernel's padding answers
            raise E.EOVERFLOW(f"data too long for this key and padding (max {limit} bytes)")
        try:
            return self.public_key.encrypt(data, pad)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise E.EINVAL("encryption failed") from None

    def decrypt(self, info: str, data: bytes) -> bytes:
        """KEYCTL_PKEY_DECRYPT.  Every failure is the same EBADMSG (no padding oracle).

        Note: OpenSSL answers a bad PKCS#1 v1.5 padding with implicit rejection
        (a deterministic pseudo-random plaintext), so that case may not fail at all.
        """
        enc, opts = self._prepare(OP_DECRYPT, info)
        data = _as_bytes(data, "data")
        pad, _ = self._rsa_padding(OP_DECRYPT, enc, opts)
        size = self._limits().max_dec_size
        if len(data) > size:
            raise E.EINVAL(f"ciphertext longer than the key size ({size} bytes)")
        if len(data) != size:
            raise E.EBADMSG(_DECRYPT_FAILED)
        try:
            return self._private.decrypt(data, pad)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise E.EBADMSG(_DECRYPT_FAILED) from None

    def sign(self, info: str, data: bytes) -> bytes:
        """KEYCTL_PKEY_SIGN: ``data`` is the digest (RSA, ECDSA) or the message (Ed25519)."""
        enc, opts = self._prepare(OP_SIGN, info)
        data = _as_bytes(data, "data")
        priv = self._private
        pad, h = self._sig_params(OP_SIGN, enc, opts, data)
        try:
            if self.algo == "ed25519":
                return priv.sign(data)
            if self.algo == "rsa":
                return priv.sign(data, pad, utils.NoDigestInfo() if h is None else utils.Prehashed(h))
            der = priv.sign(data, ec.ECDSA(utils.Prehashed(h)))
            if enc == "x962":
                return der
            r, s = utils.decode_dss_signature(der)
            n = _CURVES[self.curve][1]
            return r.to_bytes(n, "big") + s.to_bytes(n, "big")
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise E.EINVAL("signing failed with these parameters") from None

    def verify(self, info: str, data: bytes, signature: bytes) -> None:
        """KEYCTL_PKEY_VERIFY: returns None if good, raises EKEYREJECTED if not."""
        enc, opts = self._prepare(OP_VERIFY, info)
        data = _as_bytes(data, "data")
        sig = _as_bytes(signature, "signature")
        limits = self._limits()
        pad, h = self._sig_params(OP_VERIFY, enc, opts, data)
        if len(sig) > limits.max_sig_size:
            raise E.EINVAL(f"signature longer than {limits.max_sig_size} bytes")
        try:
            if self.algo == "ed25519":
                if len(sig) != 64:
                    raise InvalidSignature
                self.public_key.verify(sig, data)
            elif self.algo == "rsa":
                if len(sig) != limits.max_sig_size:  # as the kernel's pkcs1pad: malformed, not a mismatch
                    raise E.EINVAL(f"an RSA signature is the key's size, {limits.max_sig_size} bytes")
                self.public_key.verify(sig, data, pad, utils.NoDigestInfo() if h is None else utils.Prehashed(h))
            else:
                self.public_key.verify(self._ecdsa_der(enc, sig), data, ec.ECDSA(utils.Prehashed(h)))
        except (InvalidSignature, ValueError, TypeError, OverflowError, UnsupportedAlgorithm):
            raise E.EKEYREJECTED(_BAD_SIG) from None

    def _ecdsa_der(self, enc: str, sig: bytes) -> bytes:
        """Canonical DER signature for pyca, from x962 (strict DER) or p1363 (fixed r||s)."""
        if enc == "p1363":
            n = _CURVES[self.curve][1]
            if len(sig) != 2 * n:
                raise InvalidSignature
            return utils.encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
        r, s = utils.decode_dss_signature(sig)
        # Only the one DER encoding of (r, s) is accepted: no BER, no padding, no
        # trailing bytes (signature malleability).  Signatures are public, so a
        # plain comparison is fine here.
        if utils.encode_dss_signature(r, s) != sig:
            raise InvalidSignature
        return sig
