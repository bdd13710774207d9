"""Objects that stand for a key inside keyden while holding nothing but its serial.

``KeyHandle`` is the client-side name of a key (like Tink's keyset handle it
carries a connection and an id, never material, and refuses to be pickled).
``remote_private_key`` returns an object implementing pyca ``cryptography``'s
private-key interfaces, so libraries written for pyca (PyJWT, signxml, ...)
sign and decrypt with a key they never get to see: each operation becomes a
KEYCTL_PKEY_* request, and only the public half is ever held locally.
"""

from __future__ import annotations

import inspect

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from keyden import errors as E
from keyden.client.operations import InvalidArgument, as_value_error, binary
from keyden.protocol import MAX_PKEY_INFO, PKEY_HASHES

__all__ = ["KeyHandle", "load_public_key", "remote_private_key",
           "RemoteRSAPrivateKey", "RemoteECPrivateKey", "RemoteEd25519PrivateKey"]

NEVER_LEAVES = "private key material never leaves keyden"


def _no_pickle(self, *args):
    raise TypeError(f"a {type(self).__name__} cannot be pickled: it names a key held by a live keyden connection")


def _serial_of(key) -> int:
    serial = getattr(key, "serial", key)
    if isinstance(serial, bool) or not isinstance(serial, int):
        raise E.EINVAL("a key handle needs an integer serial (resolve names with client.key())")
    return serial


class KeyHandle:
    """A key by serial, bound to the client that reaches it.

    Every method forwards to the client, so with the asyncio client they
    return awaitables.  Accepted wherever a key serial is.
    """

    __slots__ = ("_client", "_serial")

    def __init__(self, client, serial: int):
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "_serial", _serial_of(serial))

    @property
    def serial(self) -> int:
        return self._serial

    @property
    def client(self):
        return self._client

    def __int__(self) -> int:
        return self._serial

    def __repr__(self) -> str:
        return f"<KeyHandle serial={self._serial}>"

    def __eq__(self, other) -> bool:
        if not isinstance(other, KeyHandle):
            return NotImplemented
        return self._serial == other._serial and self._client is other._client

    def __hash__(self) -> int:
        return hash(self._serial)

    def __setattr__(self, name, value):
        raise AttributeError("a KeyHandle is immutable")

    __delattr__ = __setattr__
    __reduce__ = __reduce_ex__ = __getstate__ = _no_pickle

    def __copy__(self):
        return self  # immutable, and a connection has no meaningful copy

    def __deepcopy__(self, memo):
        return self

    # forwarding: keyctl operations on this key
    def describe(self):
        return self._client.describe(self._serial)

    def read(self):
        return self._client.read(self._serial)

    def update(self, payload):
        return self._client.update(self._serial, payload)

    def revoke(self):
        return self._client.revoke(self._serial)

    def invalidate(self):
        return self._client.invalidate(self._serial)

    def link(self, keyring):
        return self._client.link(self._serial, keyring)

    def unlink(self, keyring):
        return self._client.unlink(self._serial, keyring)

    def setperm(self, perm: int):
        return self._client.setperm(self._serial, perm)

    def chown(self, uid: int, gid: int = -1):
        return self._client.chown(self._serial, uid, gid)

    def timeout(self, seconds: int):
        return self._client.timeout(self._serial, seconds)

    # public-key operations (kernel info strings, e.g. "enc=pkcs1 hash=sha256")
    def query(self, info: str = ""):
        return self._client.pkey_query(self._serial, info)

    def sign(self, info: str, data):
        return self._client.pkey_sign(self._serial, info, data)

    def verify(self, info: str, data, signature):
        return self._client.pkey_verify(self._serial, info, data, signature)

    def encrypt(self, info: str, data):
        return self._client.pkey_encrypt(self._serial, info, data)

    def decrypt(self, info: str, data):
        return self._client.pkey_decrypt(self._serial, info, data)

    def public_key(self):
        return self._client.public_key(self._serial)

    def certificate(self):
        return self._client.certificate(self._serial)

    def private_key(self):
        return self._client.private_key(self._serial)


def load_public_key(spki_der: bytes):
    """A local pyca public key from SubjectPublicKeyInfo DER (public data: safe to hold)."""
    try:
        return serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError):
        raise E.EBADMSG("the daemon sent an unreadable public key") from None


_SUPPORTS_DECRYPT, _SUPPORTS_SIGN = 0x02, 0x04  # KEYCTL_SUPPORTS_*: what pkey_query says a key can do


def remote_private_key(client, serial):
    """A pyca private key whose sign/decrypt run inside keyden; it holds the client and serial only.

    Needs a blocking client: pyca's interfaces are synchronous.
    """
    serial = _serial_of(serial)
    pair = client.public_key_bytes(serial)
    if inspect.isawaitable(pair):
        if hasattr(pair, "cancel"):
            pair.cancel()
        raise E.EOPNOTSUPP("pyca key objects are synchronous: use a blocking client (keyden.connect)")
    public = load_public_key(pair[0])
    if not client.pkey_query(serial).supported_ops & (_SUPPORTS_SIGN | _SUPPORTS_DECRYPT):
        # a certificate, an SPKI, an X25519 key or one bound to derive only (agreement is c.derive): nothing
        # a pyca private-key object could do
        raise E.EOPNOTSUPP(f"key {serial} can neither sign nor decrypt: it is a public key or certificate, or a "
                           f"key-agreement key (an X25519 key, or one bound to derive only: use derive)")
    for public_type, remote_type in _REMOTE_TYPES:
        if isinstance(public, public_type):
            return remote_type(client, serial, public)
    raise E.EOPNOTSUPP(f"no pyca private-key interface for a {type(public).__name__}")


# ---------------------------------------------------------------------------
# errors pyca users catch


class NotSupported(E.EINVAL, UnsupportedAlgorithm):
    """EINVAL for a padding, hash or algorithm keyden does not offer: pyca's UnsupportedAlgorithm too."""


class DecryptionFailed(E.EBADMSG, ValueError):
    """EBADMSG from a failed RSA decryption, and pyca's ValueError ("Decryption failed")."""


# ---------------------------------------------------------------------------
# pyca arguments -> kernel info strings


def _hash_name(algorithm: hashes.HashAlgorithm) -> str:
    """The info-string name of a pyca hash (pyca's names are the kernel's), if keyden signs with it."""
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError("Expected instance of hashes.HashAlgorithm.")  # pyca's words
    name = algorithm.name
    if name not in PKEY_HASHES:
        raise NotSupported(f"unsupported hash {name[:32]!r}; keyden offers {', '.join(PKEY_HASHES)}")
    return name


def _digest(data, algorithm) -> tuple[bytes, str]:
    """(digest, hash name): the kernel signs a digest, so hash here unless pyca says it is prehashed."""
    data = binary(data)
    if isinstance(algorithm, utils.Prehashed):
        name = _hash_name(algorithm._algorithm)
        if len(data) != algorithm.digest_size:  # as pyca: a prehashed digest is exactly the hash's size
            raise InvalidArgument(f"prehashed data must be a {name} digest of {algorithm.digest_size} bytes")
        return data, name
    if isinstance(algorithm, utils.NoDigestInfo):  # (RemoteRSAPrivateKey.sign takes it, with PKCS#1 v1.5)
        raise E.EOPNOTSUPP("NoDigestInfo is for RSA with PKCS1v15 padding only")
    name = _hash_name(algorithm)
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), name


def _mgf_hash(pad) -> str:
    mgf = pad.mgf
    if not isinstance(mgf, padding.MGF1):
        raise NotSupported("only MGF1 is supported")
    return _hash_name(mgf._algorithm)


def _pss_saltlen(pad: padding.PSS) -> str:
    salt = pad._salt_length  # pyca offers no public accessor
    if salt is padding.PSS.DIGEST_LENGTH:
        return "digest"
    if salt is padding.PSS.MAX_LENGTH:
        return "max"
    if isinstance(salt, int):
        return str(salt)
    raise InvalidArgument("PSS.AUTO only applies to verification; sign with DIGEST_LENGTH, MAX_LENGTH or a length")


def _padding(pad) -> None:
    if not isinstance(pad, padding.AsymmetricPadding):
        raise TypeError("Padding must be an instance of AsymmetricPadding.")  # pyca's words


_PKCS1V15 = padding.PKCS1v15


def _rsa_sign_info(pad, hash_name: str) -> str:
    _padding(pad)
    if isinstance(pad, padding.PKCS1v15):
        return f"enc=pkcs1 hash={hash_name}"
    if isinstance(pad, padding.PSS):
        return f"enc=pss hash={hash_name} mgfhash={_mgf_hash(pad)} saltlen={_pss_saltlen(pad)}"
    raise NotSupported(f"unsupported signature padding {getattr(pad, 'name', type(pad).__name__)}")


def _rsa_decrypt_info(pad) -> str:
    _padding(pad)
    if isinstance(pad, padding.PKCS1v15):
        return "enc=pkcs1"
    if isinstance(pad, padding.OAEP):
        info = f"enc=oaep hash={_hash_name(pad.algorithm)} mgfhash={_mgf_hash(pad)}"
        label = pad._label  # pyca offers no public accessor
        if not label:
            return info
        info += " label=" + bytes(label).hex()
        if len(info) > MAX_PKEY_INFO:  # the kernel's info string is one page; the label travels in it as hex
            raise InvalidArgument(f"an OAEP label of {len(label)} bytes is too long for keyden: the info string "
                                  f"carries it as hex in at most {MAX_PKEY_INFO} characters (labels up to "
                                  f"{(MAX_PKEY_INFO - len(info) + 2 * len(label)) // 2} bytes)")
        return info
    raise NotSupported(f"unsupported decryption padding {getattr(pad, 'name', type(pad).__name__)}")


# ---------------------------------------------------------------------------
# the remote keys


class _RemoteKey:
    """What every remote key shares: identity, the public half, and refusals."""

    _label = "asymmetric"

    def __init__(self, client, serial: int, public):
        self._client = client
        self._serial = serial
        self._public = public

    @property
    def serial(self) -> int:
        return self._serial

    def handle(self) -> KeyHandle:
        return KeyHandle(self._client, self._serial)

    def public_key(self):
        return self._public

    def private_bytes(self, encoding=None, format=None, encryption_algorithm=None) -> bytes:
        raise E.EOPNOTSUPP(NEVER_LEAVES)

    def private_numbers(self):
        raise E.EOPNOTSUPP(NEVER_LEAVES)

    def __copy__(self):
        return self  # as pyca's own keys: immutable, so a copy is the same key

    def __deepcopy__(self, memo):
        return self

    __reduce__ = __reduce_ex__ = __getstate__ = _no_pickle

    def __repr__(self) -> str:
        return f"<keyden {self._label} private key serial={self._serial}>"

    def _sign(self, info: str, data: bytes) -> bytes:
        try:
            return self._client.pkey_sign(self._serial, info, data)
        except E.EINVAL as exc:  # e.g. a PSS salt too long for the key: pyca's ValueError
            raise as_value_error(exc) from None


class RemoteRSAPrivateKey(_RemoteKey, rsa.RSAPrivateKey):
    _label = "RSA"

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def sign(self, data, padding, algorithm) -> bytes:
        if isinstance(algorithm, utils.NoDigestInfo):  # the data as given in the block: TLS 1.1's MD5 || SHA-1
            if not isinstance(padding, _PKCS1V15):
                raise InvalidArgument("NoDigestInfo is for PKCS1v15 padding only")
            return self._sign("enc=pkcs1", binary(data))
        digest, hash_name = _digest(data, algorithm)
        return self._sign(_rsa_sign_info(padding, hash_name), digest)

    def decrypt(self, ciphertext, padding) -> bytes:
        info = _rsa_decrypt_info(padding)
        try:
            return self._client.pkey_decrypt(self._serial, info, binary(ciphertext, "ciphertext"))
        except E.EBADMSG as exc:  # JWE and other libraries catch pyca's ValueError here
            raise DecryptionFailed(exc.message) from None
        except E.EINVAL as exc:  # a ciphertext longer than the key: pyca's ValueError too
            raise as_value_error(exc) from None


class RemoteECPrivateKey(_RemoteKey, ec.EllipticCurvePrivateKey):
    _label = "EC"

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def sign(self, data, signature_algorithm) -> bytes:
        """ECDSA, DER-encoded (enc=x962), as pyca returns it."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise NotSupported("only ECDSA signatures are supported")
        if signature_algorithm.deterministic_signing:
            raise E.EOPNOTSUPP("deterministic (RFC 6979) ECDSA is not offered by keyden")
        digest, hash_name = _digest(data, signature_algorithm.algorithm)
        size = _CURVE_BYTES.get(self._public.curve.name)
        if size is not None and len(digest) > size:
            # ECDSA uses the leftmost bits of a longer hash (as pyca and OpenSSL do); on these curves, whole
            # bytes.  The kernel's info grammar wants a hash of the curve's size: name the one that size has.
            digest, hash_name = digest[:size], _CURVE_BYTES_HASH[size]
        return self._sign(f"enc=x962 hash={hash_name}", digest)

    def exchange(self, algorithm, peer_public_key) -> bytes:
        raise E.EOPNOTSUPP("the shared secret never leaves keyden: use client.derive(private, peer_key=...) "
                           "for a session key that stays inside")


class RemoteEd25519PrivateKey(_RemoteKey, ed25519.Ed25519PrivateKey):
    _label = "Ed25519"

    def sign(self, data) -> bytes:
        """Pure Ed25519: the daemon signs the message itself."""
        return self._sign("", binary(data))

    def private_bytes_raw(self) -> bytes:
        raise E.EOPNOTSUPP(NEVER_LEAVES)


#: curves keyden holds whose order is a whole number of bytes: a longer digest is cut to this many bytes
_CURVE_BYTES = {"secp256r1": 32, "secp384r1": 48}
_CURVE_BYTES_HASH = {32: "sha256", 48: "sha384"}

_REMOTE_TYPES = (
    (rsa.RSAPublicKey, RemoteRSAPrivateKey),
    (ec.EllipticCurvePublicKey, RemoteECPrivateKey),
    (ed25519.Ed25519PublicKey, RemoteEd25519PrivateKey),
)
