"""Symmetric engines (AEAD, block cipher modes, hashes, HMAC) for keys held by the daemon.

Pure code: no sockets, no key store.  The daemon hands in raw key bytes it
holds (logon/user keys) and algorithm names spelled as the kernel crypto API
spells them ("gcm(aes)", "hmac(sha256)", ...).  Every primitive and
construction is pyca ``cryptography``; this module only decides policy
(names, key/nonce/tag sizes) and maps failures onto keyden's errno classes:

* unknown algorithm, or a name of the wrong kind   -> ENOENT (as the kernel)
* wrong key/nonce/IV size, bad argument           -> EINVAL
* AEAD authentication / HMAC verification failure -> EBADMSG, one fixed message
* streaming asked of an AEAD pyca cannot stream   -> EOPNOTSUPP

No message, repr or pickle ever carries key material or data: engines and
contexts refuse to be pickled or copied (``copy.copy``) and print only their
algorithm name; a hash or HMAC context's own ``copy()`` makes a second context
in the same process, as pyca's does.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from types import MappingProxyType

from cryptography.exceptions import AlreadyFinalized, InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _pyca_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV, ChaCha20Poly1305

from keyden import errors as E

__all__ = [
    "AlgorithmSpec", "ALGORITHMS", "MAX_HMAC_KEY", "spec", "kind",
    "AeadEngine", "aead", "aead_stream", "skcipher", "skcipher_crypt",
    "hash_ctx", "hmac_ctx", "digest", "hmac", "hmac_many", "hmac_verify", "generate_key", "check_final_tag",
]

MAX_HMAC_KEY = 32767        # the largest user/logon payload: any key the daemon can hold
_AES_KEY_SIZES = (16, 24, 32)
_AUTH_FAILED = "authentication failed"      # the only thing a failed decrypt ever says
_HMAC_MISMATCH = "HMAC verification failed"


@dataclass(frozen=True)
class AlgorithmSpec:
    """What a caller needs to know to use an algorithm; sizes in bytes.

    ``key_sizes`` supports ``in`` (a tuple, or a range for HMAC).  ``nonce_size``
    is the AEAD nonce or the skcipher IV; 0 where the kind has none.
    """

    name: str
    kind: str                   # "aead" | "skcipher" | "hash" | "hmac"
    key_sizes: tuple[int, ...] | range = ()
    nonce_size: int = 0
    tag_size: int = 0
    digest_size: int = 0
    block_size: int = 0

    @property
    def key_use(self) -> str:
        """What a key genkey made must be for to key this: the algorithm itself (one AES mode's outputs at
        chosen inputs give out another's secrets), or "hmac" for every HMAC."""
        return "hmac" if self.kind == "hmac" else self.name


# pyca classes behind each name, by kind.  XChaCha20-Poly1305 is absent on
# purpose: pyca (through 50) does not offer it.  "gcm-siv(aes)" (RFC 8452) is
# keyden's own name (the kernel has no GCM-SIV): nonce-misuse resistant, so a
# repeated nonce reveals only that the same message was sealed twice.
_AEADS = {"gcm(aes)": AESGCM, "rfc7539(chacha20,poly1305)": ChaCha20Poly1305, "gcm-siv(aes)": AESGCMSIV}
_SKCIPHERS = {"cbc(aes)": modes.CBC, "ctr(aes)": modes.CTR}
_HASHES = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}
_HMACS = {f"hmac({h})": _HASHES[h] for h in ("sha256", "sha384", "sha512")}


def _build_table() -> dict[str, AlgorithmSpec]:
    table = {
        "gcm(aes)": AlgorithmSpec("gcm(aes)", "aead", _AES_KEY_SIZES, nonce_size=12, tag_size=16,
                                  block_size=1),
        "rfc7539(chacha20,poly1305)": AlgorithmSpec("rfc7539(chacha20,poly1305)", "aead", (32,),
                                                    nonce_size=12, tag_size=16, block_size=1),
        "gcm-siv(aes)": AlgorithmSpec("gcm-siv(aes)", "aead", (16, 32), nonce_size=12, tag_size=16,
                                      block_size=1),  # RFC 8452 defines AES-128 and AES-256 only
        "cbc(aes)": AlgorithmSpec("cbc(aes)", "skcipher", _AES_KEY_SIZES, nonce_size=16, block_size=16),
        "ctr(aes)": AlgorithmSpec("ctr(aes)", "skcipher", _AES_KEY_SIZES, nonce_size=16, block_size=1),
    }
    for name, cls in _HASHES.items():
        table[name] = AlgorithmSpec(name, "hash", digest_size=cls.digest_size, block_size=cls.block_size)
    for name, cls in _HMACS.items():
        table[name] = AlgorithmSpec(name, "hmac", range(1, MAX_HMAC_KEY + 1), tag_size=cls.digest_size,
                                    digest_size=cls.digest_size, block_size=cls.block_size)
    return table


ALGORITHMS = MappingProxyType(_build_table())


# ---------------------------------------------------------------------------
# argument checks


def spec(name: str, want_kind: str | None = None) -> AlgorithmSpec:
    """The spec of ``name``; ENOENT if unknown or (with ``want_kind``) of another kind.

    ENOENT for both, as the kernel's crypto_alloc_*() when no algorithm of
    that name and type exists.
    """
    if not isinstance(name, str):
        raise E.EINVAL(f"an algorithm's name must be a str, not {type(name).__name__}")
    found = ALGORITHMS.get(name)
    if found is None:
        raise E.ENOENT(f"unknown algorithm {_show(name)}")
    if want_kind is not None and found.kind != want_kind:
        raise E.ENOENT(f"{found.name} is {_a(found.kind)} algorithm, not {_a(want_kind)}")
    return found


def kind(name: str) -> str:
    return spec(name).kind


def _a(kind: str) -> str:
    """'an aead', 'an hmac', 'a skcipher', 'a hash' (the article as the kinds are read aloud)."""
    return f"an {kind}" if kind in ("aead", "hmac") else f"a {kind}"


def _show(name) -> str:
    """An algorithm name (never secret) for a message, bounded."""
    return repr(name[:40]) if isinstance(name, str) else type(name).__name__


def _buffer(value, what: str):
    """A bytes-like argument as a flat byte buffer, without copying when possible.

    pyca reads buffers directly, so large data is not duplicated; a memoryview
    is flattened to bytes so that len() and slicing count bytes.
    """
    if isinstance(value, (bytes, bytearray)):
        return value
    if isinstance(value, memoryview):
        return value.cast("B") if value.c_contiguous else value.tobytes()
    raise E.EINVAL(f"{what} must be bytes")


def _key(alg: AlgorithmSpec, key) -> bytes:
    key = bytes(_buffer(key, "key"))
    if len(key) not in alg.key_sizes:
        # The key's own length is not named: using a key needs only search permission, and such a caller
        # learns no more than whether the cipher takes it (the kernel's setkey says EINVAL and no more).
        raise E.EINVAL(f"{alg.name}: the key is not {_sizes(alg.key_sizes)} bytes long")
    return key


def check_final_tag(name: str, decrypt: bool, tag) -> None:
    """A stream's finish takes a tag only to check it: an AEAD decryption's or an HMAC verification's.
    The daemon and the clients check this before anything is processed, so a mistake leaves the stream open."""
    takes_tag = decrypt and spec(name).kind in ("aead", "hmac")
    if bool(tag) != takes_tag:
        raise E.EINVAL("finishing AEAD decryption or HMAC verification takes the tag to check" if takes_tag else
                       "a tag is given only to finish AEAD decryption or HMAC verification")


def _sizes(sizes: tuple[int, ...] | range) -> str:
    if isinstance(sizes, range):
        return f"{sizes.start} to {sizes.stop - 1}"
    *most, last = map(str, sizes)
    return f"{', '.join(most)} or {last}" if most else last


def _nonce(alg: AlgorithmSpec, nonce, what: str = "nonce") -> bytes:
    nonce = bytes(_buffer(nonce, what))
    if len(nonce) != alg.nonce_size:
        raise E.EINVAL(f"{alg.name}: {what} must be {alg.nonce_size} bytes, not {len(nonce)}")
    return nonce


def _writable(out, size: int) -> memoryview:
    """The first ``size`` bytes of a caller's output buffer, checked writable and large enough."""
    try:
        view = memoryview(out)
    except TypeError:
        raise E.EINVAL("output buffer must support the buffer protocol") from None
    if view.readonly or not view.c_contiguous:
        raise E.EINVAL("output buffer must be writable and contiguous")
    view = view.cast("B")
    if view.nbytes < size:
        raise E.EINVAL(f"output buffer too small: {size} bytes needed")
    return view[:size]


class _Sealed:
    """Holds key state: prints only the algorithm, refuses pickling and copying."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    def _refuse(self, *args):
        raise TypeError(f"{type(self).__name__} cannot be pickled or copied: it holds key material")

    __reduce__ = __reduce_ex__ = __getstate__ = __copy__ = __deepcopy__ = _refuse


# ---------------------------------------------------------------------------
# AEAD, one shot


#: Items one map() runs: pyca holds the GIL through a small AEAD call, and a map runs its calls from C,
#: where CPython never passes the GIL on; 65536 items in one map held every thread of the daemon 40-90 ms.
#: Between runs of 256 (0.2-0.5 ms), the interpreter lets the others in.
MAP_RUN = 256


class AeadEngine(_Sealed):
    """One AEAD key.  Output is ``ct || tag``, as the kernel's AF_ALG aead."""

    __slots__ = ("name", "nonce_size", "tag_size", "_spec", "_cipher")

    def __init__(self, alg: AlgorithmSpec, key: bytes):
        self.name, self.nonce_size, self.tag_size, self._spec = alg.name, alg.nonce_size, alg.tag_size, alg
        self._cipher = _AEADS[alg.name](key)

    def encrypt(self, nonce, data, aad=b"") -> bytes:
        nonce = _nonce(self._spec, nonce)
        data, aad = _buffer(data, "data"), _buffer(aad, "aad")
        try:
            return self._cipher.encrypt(nonce, data, aad)
        except OverflowError:
            raise E.EINVAL("data or aad too long") from None

    def decrypt(self, nonce, ct_and_tag, aad=b"") -> bytes:
        nonce = _nonce(self._spec, nonce)
        ct_and_tag, aad = _buffer(ct_and_tag, "ciphertext"), _buffer(aad, "aad")
        try:
            return self._cipher.decrypt(nonce, ct_and_tag, aad)
        except (InvalidTag, ValueError, OverflowError):
            raise E.EBADMSG(_AUTH_FAILED) from None

    def encrypt_into(self, nonce, data, aad, out) -> int:
        """Encrypt into the start of ``out`` (at least len(data) + tag_size bytes); returns bytes written."""
        nonce = _nonce(self._spec, nonce)
        data, aad = _buffer(data, "data"), _buffer(aad, "aad")
        size = len(data) + self.tag_size
        try:
            return self._cipher.encrypt_into(nonce, data, aad, _writable(out, size))
        except OverflowError:
            raise E.EINVAL("data or aad too long") from None

    def decrypt_into(self, nonce, ct_and_tag, aad, out) -> int:
        """Decrypt into the start of ``out``; returns bytes written.

        pyca writes unauthenticated plaintext into the buffer before it checks
        the tag, so on failure the written region is zeroed before EBADMSG.
        """
        nonce = _nonce(self._spec, nonce)
        ct_and_tag, aad = _buffer(ct_and_tag, "ciphertext"), _buffer(aad, "aad")
        size = len(ct_and_tag) - self.tag_size
        if size < 0:
            raise E.EBADMSG(_AUTH_FAILED)
        target = _writable(out, size)
        try:
            return self._cipher.decrypt_into(nonce, ct_and_tag, aad, target)
        except (InvalidTag, ValueError, OverflowError):
            _zero(target)
            raise E.EBADMSG(_AUTH_FAILED) from None

    def crypt_many(self, nonces, items, aads, decrypt: bool) -> tuple[list[int], list[bytes]]:
        """Many independent small messages in one call: (per-item status, 0 or errno; per-item output).

        One bad item fails alone (EINVAL for a wrong nonce size, EBADMSG for a
        failed decryption).  The loop calls pyca directly: per-item checks are
        the nonce size and pyca's own.
        """
        run = self._cipher.decrypt if decrypt else self._cipher.encrypt
        size, fail = self.nonce_size, (E.EBADMSG.code if decrypt else E.EINVAL.code)
        if set(map(len, nonces)) <= {size}:  # every nonce fits: pyca called straight from C, by map
            try:
                out = []
                for at in range(0, len(items), MAP_RUN):  # (between runs, the GIL can pass: see MAP_RUN)
                    end = at + MAP_RUN
                    out += map(run, nonces[at:end], items[at:end], aads[at:end] if aads else itertools.repeat(None))
                return [0] * len(items), out
            except (InvalidTag, ValueError, OverflowError):
                pass  # some item fails: sort them out one by one below
        status, out = [], []
        for i, (nonce, data) in enumerate(zip(nonces, items)):
            if len(nonce) != size:
                status.append(E.EINVAL.code)
                out.append(b"")
                continue
            try:
                out.append(run(nonce, data, aads[i] if aads else None))
                status.append(0)
            except (InvalidTag, ValueError, OverflowError):
                status.append(fail)
                out.append(b"")
        return status, out

    def encrypt_random_nonce(self, data, aad=b"") -> bytes:
        """``nonce || ct || tag`` with a fresh random nonce: the caller cannot reuse one.

        96-bit random nonces: keep well under 2**32 messages per key.
        """
        nonce = os.urandom(self.nonce_size)
        return nonce + self.encrypt(nonce, data, aad)

    def decrypt_random_nonce(self, blob, aad=b"") -> bytes:
        blob = memoryview(_buffer(blob, "ciphertext"))
        if len(blob) < self.nonce_size + self.tag_size:
            raise E.EBADMSG(_AUTH_FAILED)
        return self.decrypt(blob[:self.nonce_size], blob[self.nonce_size:], aad)


def aead(name: str, key) -> AeadEngine:
    alg = spec(name, "aead")
    return AeadEngine(alg, _key(alg, key))


# ---------------------------------------------------------------------------
# streaming contexts (update / finalize)


class _Stream(_Sealed):
    """A pyca encryptor/decryptor/hash context with errors mapped and finalize enforced once."""

    __slots__ = ("name", "_ctx", "_done", "held")

    def __init__(self, name: str, ctx):
        self.name, self._ctx, self._done = name, ctx, False
        self.held = 0  # bytes taken but not yet given back (cbc's partial block): the next output may carry them

    def _live(self):
        if self._done:
            raise E.EINVAL(f"{self.name}: context already finalized")
        return self._ctx

    def update(self, data) -> bytes:
        data = _buffer(data, "data")
        try:
            out = self._live().update(data)
        except (ValueError, OverflowError, AlreadyFinalized):
            self._done = True   # e.g. GCM's 2**36-byte limit: the context is unusable now
            raise E.EINVAL(f"{self.name}: update refused (data limit?)") from None
        if out is not None:  # a cipher (a hash or HMAC gives nothing back until finalize)
            self.held += len(data) - len(out)
        return out

    def _finish(self, call, *args):
        ctx = self._live()
        self._done = True
        return call(ctx, *args)


class AeadStream(_Stream):
    """gcm(aes) in pieces.  Concatenated outputs equal the one-shot ``ct || tag``.

    Decrypting releases plaintext before the tag is checked at finalize: the
    caller must not act on (or pass on) any of it until finalize succeeds.
    """

    __slots__ = ("_decrypt", "_tag")

    def __init__(self, name, ctx, decrypt: bool, tag: bytes | None):
        super().__init__(name, ctx)
        self._decrypt, self._tag = decrypt, tag

    def finalize(self) -> bytes:
        """Encrypt: returns the tag.  Decrypt: checks the tag given at init, returns b""."""
        if not self._decrypt:
            return self._finish(lambda ctx: ctx.finalize() + ctx.tag)
        if self._tag is None:
            raise E.EINVAL(f"{self.name}: no tag given; use finalize_with_tag")
        return self._finish(_verify_gcm)

    def finalize_with_tag(self, tag) -> bytes:
        if not self._decrypt:
            raise E.EINVAL(f"{self.name}: finalize_with_tag is for decryption")
        if self._tag is not None:
            raise E.EINVAL(f"{self.name}: the tag was already given at init")
        tag = bytes(_buffer(tag, "tag"))
        return self._finish(_verify_gcm, tag)


def _verify_gcm(ctx, tag: bytes | None = None) -> bytes:
    try:
        return ctx.finalize() if tag is None else ctx.finalize_with_tag(_gcm_tag(tag))
    except (InvalidTag, ValueError):
        raise E.EBADMSG(_AUTH_FAILED) from None


def _gcm_tag(tag: bytes) -> bytes:
    """Only full 16-byte tags; a tag of another length is simply not authentic."""
    if len(tag) != ALGORITHMS["gcm(aes)"].tag_size:
        raise E.EBADMSG(_AUTH_FAILED)
    return tag


def aead_stream(name: str, key, nonce, aad=b"", decrypt: bool = False, tag=None) -> AeadStream:
    """Streaming AEAD; gcm(aes) only (pyca has no streaming ChaCha20-Poly1305, and GCM-SIV is two-pass)."""
    alg = spec(name, "aead")
    if alg.name != "gcm(aes)":
        raise E.EOPNOTSUPP(f"streaming is offered for gcm(aes) only, not {alg.name}: encrypt in one call, in a "
                           "batch of pieces (each its own nonce), or through a shared buffer")
    key, nonce, aad = _key(alg, key), _nonce(alg, nonce), _buffer(aad, "aad")
    if tag is not None:
        if not decrypt:
            raise E.EINVAL("a tag is only given when decrypting")
        tag = _gcm_tag(bytes(_buffer(tag, "tag")))
    cipher = Cipher(algorithms.AES(key), modes.GCM(nonce, tag))
    ctx = cipher.decryptor() if decrypt else cipher.encryptor()
    ctx.authenticate_additional_data(aad)
    return AeadStream(alg.name, ctx, bool(decrypt), tag)


class SkcipherStream(_Stream):
    """cbc(aes)/ctr(aes) in pieces; no padding, as the kernel's skcipher."""

    __slots__ = ()

    def finalize(self) -> bytes:
        def finish(ctx):
            try:
                return ctx.finalize()
            except ValueError:
                raise E.EINVAL(f"{self.name}: data is not a multiple of the block size") from None
        return self._finish(finish)


def skcipher(name: str, key, iv, decrypt: bool = False) -> SkcipherStream:
    alg = spec(name, "skcipher")
    key, iv = _key(alg, key), _nonce(alg, iv, "IV")
    cipher = Cipher(algorithms.AES(key), _SKCIPHERS[alg.name](iv))
    return SkcipherStream(alg.name, cipher.decryptor() if decrypt else cipher.encryptor())


def _whole_blocks(stream: "SkcipherStream", data):
    """``data``, if whole blocks of the stream's cipher (cbc(aes)'s 16 bytes; ctr(aes)'s 1): else EINVAL,
    before any of it is processed."""
    data = _buffer(data, "data")
    if len(data) % ALGORITHMS[stream.name].block_size:
        raise E.EINVAL(f"{stream.name}: data is not a multiple of the block size")
    return data


def skcipher_crypt(name: str, key, iv, data, decrypt: bool = False) -> bytes:
    """One-shot skcipher; cbc(aes) data must be whole blocks (EINVAL, nothing processed)."""
    stream = skcipher(name, key, iv, decrypt)
    data = _whole_blocks(stream, data)
    return stream.update(data) + stream.finalize()


_PIECE = 1 << 20  # a whole number of blocks


def skcipher_crypt_into(name: str, key, iv, data, out, decrypt: bool = False) -> int:
    """``skcipher_crypt`` written into ``out`` (len(data) bytes) a MiB at a time: for shared memory, where
    the data may be a gigabyte and the daemon's memory is locked, never a copy of the whole."""
    stream = skcipher(name, key, iv, decrypt)
    data = _whole_blocks(stream, data)
    pos = 0
    for start in range(0, len(data), _PIECE):
        piece = stream.update(data[start:start + _PIECE])
        out[pos:pos + len(piece)] = piece
        pos += len(piece)
    tail = stream.finalize()
    out[pos:pos + len(tail)] = tail
    return pos + len(tail)


class DigestContext(_Stream):
    """A hash or HMAC in pieces; ``finalize`` returns the digest."""

    __slots__ = ()

    def copy(self) -> "DigestContext":
        """A second context that goes on from here, as pyca's ``Hash.copy``/``HMAC.copy`` (a running
        transcript hash; MACs of messages with a common prefix).  The one copy this module makes on
        purpose: it stays inside the daemon (``copy.copy`` and pickling are still refused).  EINVAL once
        finalized, as ``update``."""
        return DigestContext(self.name, self._live().copy())

    def finalize(self) -> bytes:
        return self._finish(lambda ctx: ctx.finalize())

    def verify(self, tag) -> None:
        """HMAC only: constant-time check of a full-length tag; mismatch -> EBADMSG."""
        if ALGORITHMS[self.name].kind != "hmac":
            raise E.EINVAL(f"{self.name}: verify is for HMAC")
        tag = bytes(_buffer(tag, "tag"))
        if len(tag) != ALGORITHMS[self.name].digest_size:
            raise E.EINVAL(_tag_size_message(self.name, len(tag)))

        def check(ctx):
            try:
                ctx.verify(tag)
            except InvalidSignature:
                raise E.EBADMSG(_HMAC_MISMATCH) from None
        self._finish(check)


_ZEROS = bytes(1 << 20)


def _zero(view: memoryview) -> None:
    """Overwrite a buffer of any size with zeros, a MiB at a time (no allocation its size)."""
    for start in range(0, len(view), len(_ZEROS)):
        piece = view[start:start + len(_ZEROS)]
        piece[:] = _ZEROS[:len(piece)]


def hash_ctx(name: str) -> DigestContext:
    alg = spec(name, "hash")
    return DigestContext(alg.name, hashes.Hash(_HASHES[alg.name]()))


def hmac_ctx(name: str, key) -> DigestContext:
    alg = spec(name, "hmac")
    return DigestContext(alg.name, _pyca_hmac.HMAC(_key(alg, key), _HMACS[alg.name]()))


def digest(name: str, data) -> bytes:
    ctx = hash_ctx(name)
    ctx.update(data)
    return ctx.finalize()


def hmac(name: str, key, data) -> bytes:
    ctx = hmac_ctx(name, key)
    ctx.update(data)
    return ctx.finalize()


def hmac_many(name: str, key, items) -> list[bytes]:
    """One MAC per item: the key is set up once and each item's context copied from it."""
    alg = spec(name, "hmac")
    base = _pyca_hmac.HMAC(_key(alg, key), _HMACS[alg.name]())
    out = []
    for item in items:
        ctx = base.copy()
        ctx.update(item)
        out.append(ctx.finalize())
    return out


def _tag_size_message(name: str, got: int) -> str:
    want = ALGORITHMS[name].digest_size
    return (f"{name}: tag must be {want} bytes, not {got}" +
            ("; truncated HMAC tags are not supported" if got < want else ""))


def hmac_verify(name: str, key, data, tag) -> None:
    """Returns None when ``tag`` is right; EBADMSG when not; EINVAL for a tag of another length."""
    ctx = hmac_ctx(name, key)
    ctx.update(data)
    ctx.verify(tag)


# ---------------------------------------------------------------------------
# key generation

_KEY_SPEC = re.compile(r"(aes(?:-gcm-siv|-cbc|-ctr)?):(128|192|256)|(chacha20)|(hmac):([1-9][0-9]{0,5})")
#: a symmetric key spec's first part -> the one use (AlgorithmSpec.key_use) a key it makes serves
_SPEC_USES = {"aes": "gcm(aes)", "aes-gcm-siv": "gcm-siv(aes)", "aes-cbc": "cbc(aes)", "aes-ctr": "ctr(aes)",
              "chacha20": "rfc7539(chacha20,poly1305)", "hmac": "hmac"}
#: the specs generate_key takes, for messages; and how they begin (any other spec names a key pair)
KEY_SPECS = "aes[-cbc|-ctr]:128|192|256, aes-gcm-siv:128|256, chacha20 or hmac:BITS"
KEY_SPEC_PREFIXES = ("aes:", "aes-", "chacha20", "hmac:")


class GeneratedKey(_Sealed):
    """A new random key on its way into a logon key: like the engines, it prints no material and cannot
    be pickled or copied."""

    __slots__ = ("material", "hint", "use", "name")

    def __init__(self, material: bytes, hint: str, use: str):
        self.material = material
        self.hint = hint  # "aes256", "aes256-ctr", "chacha20", "hmac512": short, safe in a key description
        self.use = use  # the one AlgorithmSpec.key_use it serves
        self.name = hint  # what repr shows


def generate_key(key_spec: str) -> GeneratedKey:
    """Random key for ``aes:BITS`` (GCM), ``aes-gcm-siv:BITS``, ``aes-cbc:BITS``, ``aes-ctr:BITS`` (BITS 128,
    192 or 256; GCM-SIV 128 or 256), ``chacha20`` or ``hmac:N`` (N bits, 128..1024, N % 8 == 0).

    Each key serves one use: an AES mode's keystream or block function at
    chosen inputs gives out another mode's secrets (CTR at IV 0 yields GCM's
    hash key; GCM's keystream, GCM-SIV's per-nonce keys).
    """
    match = _KEY_SPEC.fullmatch(key_spec) if isinstance(key_spec, str) else None
    if match is None:
        raise E.EINVAL(f"unknown key spec {_show(key_spec)}; use {KEY_SPECS}")
    if match[3]:
        return GeneratedKey(os.urandom(32), "chacha20", _SPEC_USES["chacha20"])
    family, bits = (match[1], int(match[2])) if match[1] else (match[4], int(match[5]))
    if family == "hmac" and not (128 <= bits <= 1024 and bits % 8 == 0):
        raise E.EINVAL("hmac key size must be a multiple of 8 bits in 128..1024")
    use = _SPEC_USES[family]
    if use != "hmac" and bits // 8 not in ALGORITHMS[use].key_sizes:  # GCM-SIV: AES-128 and AES-256 only
        raise E.EINVAL(f"{use} takes keys of {', '.join(str(8 * n) for n in ALGORITHMS[use].key_sizes)} bits")
    mode = family.partition("-")[2]
    return GeneratedKey(os.urandom(bits // 8), f"aes{bits}-{mode}" if mode else f"{family}{bits}", use)
