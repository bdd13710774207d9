"""The master key that seals every stored record, and where it comes from.

Two kinds, recorded in the database (meta ``source``) so a start with the
wrong kind is refused instead of creating a second, empty store:

- ``key``: 32 random bytes in a root-only file (default
  ``<state_dir>/master.key``), optionally also held in the kernel keyring
  (``master_key_kernel``, see ``kernel``): tried first, the file is the
  fallback and the durable copy.
- ``passphrase``: scrypt of a passphrase read from a file at start
  (``--passphrase-file`` or $KEYDEN_PASSPHRASE_FILE), salt and cost in the
  database.

A check value (the AEAD seal of a constant, bound to source, salt and the
store's version: whether it keeps a manifest, how it seals) tells a wrong key
from a tampered record.
Rotation of a file key writes ``master.key.new`` first and renames it over
``master.key`` only after the database committed under it; a start after a
crash in between tries both.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyden import errors as E
from keyden.errors import StartupError
from keyden.persist import kernel
from keyden.persist.files import fsync_dir, require_own, require_safe_directory, write_secret_file

log = logging.getLogger("keyden.persist")

KEY_BYTES = 32
NONCE_BYTES = 12
PASSPHRASE_ENV = "KEYDEN_PASSPHRASE_FILE"
SCRYPT_COST = (2**15, 8, 1)  # n, r, p: 32 MiB, about 0.1 s
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_MEMORY = 256 << 20  # 128 * n * r bytes a store's passphrase parameters may ask (it writes 32 MiB)
CHECK_PLAINTEXT = b"keyden master key check"
SALT_BYTES = 32
#: The store's version, sealed into its check value.  1: no manifest (see manifest.py); 2: a manifest;
#: 3: a manifest, and every seal under a key of its own (Sealer).  1 and 2 are migrated at start.
CHECK_VERSION = 3
MANIFEST_VERSION = 2  # the first that keeps a manifest
_SEAL_INFO = b"keyden seal v3"


def write_failure(exc: BaseException) -> type[E.KeydenError]:
    """What a failed write of the key store says: ENOSPC for want of space (the operator's to fix), else EIO."""
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return E.ENOSPC if full else E.EIO


class Sealer:
    """AES-256-GCM under a key of each seal's own: HKDF-SHA256(master key, a random 256-bit salt).

    One key with random 96-bit nonces is good for 2**32 seals (NIST SP 800-38D); a store seals a row at
    every change of a persistent key, so a long-lived, busy one could pass that.  A key per seal has no
    such bound.  Blob: salt (32) | nonce (12) | ciphertext and tag.
    """

    version = CHECK_VERSION  # of the stores it seals

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise StartupError(f"a master key is {KEY_BYTES} bytes, not {len(key)}")
        self._key = key

    def __repr__(self) -> str:
        return f"<{type(self).__name__} v{self.version}>"

    def __reduce__(self):
        raise TypeError("a sealer holds the master key: it cannot be pickled")

    def _aead(self, salt: bytes) -> AESGCM:
        return AESGCM(HKDF(hashes.SHA256(), KEY_BYTES, salt, _SEAL_INFO).derive(self._key))

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        salt_nonce = os.urandom(SALT_BYTES + NONCE_BYTES)
        return salt_nonce + self._aead(salt_nonce[:SALT_BYTES]).encrypt(salt_nonce[SALT_BYTES:], plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        """The plaintext; InvalidTag if the key, the blob or the associated data is not the one sealed,
        TypeError if ``sealed`` (a column's value) is no BLOB."""
        sealed = _blob(sealed)
        start = SALT_BYTES + NONCE_BYTES
        if len(sealed) < start + 16:
            raise InvalidTag()
        return self._aead(sealed[:SALT_BYTES]).decrypt(sealed[SALT_BYTES:start], sealed[start:], aad)

    @staticmethod
    def check_context(source: str, salt: bytes, version: int = CHECK_VERSION) -> bytes:
        return b"keyden-master-check-v%d\0" % version + source.encode() + b"\0" + salt

    def make_check(self, source: str, salt: bytes = b"") -> bytes:
        return self.seal(CHECK_PLAINTEXT, self.check_context(source, salt))

    def for_store(self, check: bytes, source: str, salt: bytes = b"") -> Sealer | LegacySealer | None:
        """What opens the store with this check value under this key: this sealer, a LegacySealer of the
        store's version, or None (another key).  The version is sealed into the check, so that deleting the
        manifest cannot pass for a store written before there was one, nor old seals for a store that has
        none."""
        for sealer in (self, LegacySealer(self._key, MANIFEST_VERSION), LegacySealer(self._key, 1)):
            try:
                if sealer.open(check, self.check_context(source, salt, sealer.version)) == CHECK_PLAINTEXT:
                    return sealer
            except InvalidTag:
                continue
        return None


class LegacySealer:
    """How stores of versions 1 and 2 were sealed: every seal under the master key itself, with a random
    nonce (blob: nonce (12) | ciphertext and tag).  It only opens: such a store is sealed again, whole, at
    start (persist.open_durable), by ``upgraded``."""

    def __init__(self, key: bytes, version: int):
        self._key = key
        self._master = AESGCM(key)
        self.version = version

    __repr__ = Sealer.__repr__
    __reduce__ = Sealer.__reduce__

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        sealed = _blob(sealed)
        if len(sealed) < NONCE_BYTES + 16:
            raise InvalidTag()
        return self._master.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], aad)

    def upgraded(self) -> Sealer:
        """The same master key, sealing as this version does."""
        return Sealer(self._key)


@dataclass
class Rotation:
    """A new master key, and what to do once the database has committed under it."""

    sealer: Sealer
    meta: dict[str, bytes] = field(default_factory=dict)
    finish: Callable[[], None] = lambda: None


class KeySource(ABC):
    """Where the master key comes from; ``open`` finds the one that opens an existing store."""

    source = ""
    salt = b""  # bound into the check value (a passphrase's salt)

    def check(self, sealer: Sealer) -> bytes:
        return sealer.make_check(self.source, self.salt)

    def meta(self) -> dict[str, bytes]:
        """What the database records about this source besides the check value."""
        return {}

    @abstractmethod
    def create(self) -> Sealer:
        """A new master key, for a new store."""

    @abstractmethod
    def open(self, check: bytes, meta: dict[str, bytes]) -> Sealer | LegacySealer:
        """The master key that opens the store with this check value (StartupError if there is none)."""

    @abstractmethod
    def rotate(self, passphrase: bytes) -> Rotation:
        """A new master key for ``rekey``, not yet in place (see Rotation)."""


class FileKey(KeySource):
    """A random key in a root-only file, optionally held in the kernel keyring too."""

    source = "key"

    def __init__(self, path: str, kernel_description: str = ""):
        self.path = path
        self.pending = path + ".new"
        self._stranded: bytes | None = None  # a rekey's key the store is sealed under, not moved into place
        require_safe_directory(path, "master key file")  # before anything in it is read or written
        self.kernel_description = kernel_description
        self.kernel_ok = False
        if kernel_description:
            try:
                kernel.probe()
                self.kernel_ok = True
            except kernel.KernelUnavailable as exc:
                log.warning("kernel keyring unavailable (%s): the master key is kept in %s only", exc, path)

    def create(self) -> Sealer:
        """First start: the existing file (from `keyden init`), else a key the kernel holds, else a new key.
        Whichever it is, the file holds it afterwards: a store whose only key is in the kernel keyring (a
        stale one, or another daemon's under the same description) would be lost at the next reboot."""
        if os.path.exists(self.path):
            key = self._read(self.path)
        else:
            key = self._kernel_read()
            taken = key is not None
            if not taken:
                key = os.urandom(KEY_BYTES)
            try:
                write_secret_file(self.path, key)
            except OSError as exc:
                raise StartupError(f"cannot write the new master key file {self.path}: {exc.strerror}") from None
            if taken:
                log.warning("the new key store takes the master key already in the kernel keyring (%s), written "
                            "to %s too; if another keyden uses that description, the two share a master key",
                            self.kernel_description, self.path)
            else:
                log.info("generated a new master key in %s", self.path)
        self._hold_in_kernel(key)
        return Sealer(key)

    def open(self, check: bytes, meta: dict[str, bytes]) -> Sealer | LegacySealer:
        tried = []
        for where, key in self._candidates():
            tried.append(where)
            sealer = Sealer(key).for_store(check, self.source)
            if sealer is not None:
                self._adopt(where, key)
                return sealer
        if not tried:
            raise StartupError(f"the master key file {self.path} is missing, and the key store needs it; "
                               "restore the file (keyden never starts over an existing store)")
        raise StartupError(f"the master key in {' or '.join(tried)} does not open the key store "
                           "(wrong key file?); refusing to start")

    def _candidates(self):
        key = self._kernel_read()
        if key is not None:
            yield f"the kernel keyring ({self.kernel_description})", key
        for path in (self.path, self.pending):
            if os.path.exists(path):
                yield path, self._read(path)

    def _adopt(self, where: str, key: bytes) -> None:
        """Make the file (and kernel copy) agree with the key that opened the store: finish or undo a rekey."""
        if where != self.path and self._holds(self.pending, key):  # also from the kernel: its only durable copy
            where = self.pending
        if where == self.pending:
            self._stranded = key
            try:
                self._move_into_place(key)
                log.warning("finished an interrupted rekey: %s now holds the new master key", self.path)
            except E.KeydenError:  # logged; the store opens all the same, and the next rekey tries again
                pass
        elif os.path.exists(self.pending):
            try:
                os.unlink(self.pending)  # written by a rekey that never committed
            except OSError as exc:  # nothing is sealed under it: the next rekey writes over it
                log.warning("cannot remove %s, left by a rekey that never committed (%s)", self.pending,
                            exc.strerror)
        if where != self.path and where != self.pending:
            log.info("master key taken from the kernel keyring")
            if os.path.exists(self.path) and self._read(self.path) != key:
                log.warning("%s holds another key, which does not open the store; keep a copy of the right one",
                            self.path)
        self._hold_in_kernel(key)

    def _kernel_read(self) -> bytes | None:
        if not self.kernel_ok:
            return None
        try:
            key = kernel.read(self.kernel_description)
        except (kernel.KernelUnavailable, OSError) as exc:
            log.warning("cannot read the master key from the kernel keyring: %s", exc)
            return None
        return key if key is not None and len(key) == KEY_BYTES else None

    def _hold_in_kernel(self, key: bytes) -> bool:
        """Put the key in the kernel keyring too, if configured; whether the kernel now holds it."""
        if not self.kernel_ok:
            return False
        if self._kernel_read() == key:
            return True
        try:
            kernel.store(self.kernel_description, key)
        except (kernel.KernelUnavailable, OSError) as exc:
            log.warning("cannot hold the master key in the kernel keyring: %s", exc)
            return False
        log.info("master key held in the kernel keyring as user key %r", self.kernel_description)
        return True

    def rotate(self, passphrase: bytes) -> Rotation:
        if passphrase:
            raise E.EINVAL("this store is sealed under a master key file, not a passphrase")
        if not os.path.exists(self.path) and self._kernel_read() is not None:
            # Held only in the kernel, whose copy dies with a reboot: the offline copy would open nothing
            # after a rotation, and the new key would exist nowhere that lasts.  (With no kernel copy
            # either, the file was lost: the rekey writes a new one, the store's only way back.)
            raise E.EPERM(f"the master key file {self.path} is offline (the kernel keyring holds the key): "
                          "put it back for the rekey, then move the new one offline again")
        if self._stranded is not None:  # the pending file is the only key that opens the store: never overwritten
            self._move_into_place(self._stranded)
        key = os.urandom(KEY_BYTES)
        try:
            write_secret_file(self.pending, key, replace=True)
        except OSError as exc:  # a full disk is the operator's to fix, not an internal error
            log.error("rekey failed writing the new master key file %s (%s); the old master key stays",
                      self.pending, exc.strerror)
            raise write_failure(exc)(f"rekey failed: cannot write the new master key file {self.pending} ({exc.strerror}); "
                        "the old master key stays in use") from None

        def finish() -> None:
            self._stranded = key  # until it is in place: the store is sealed under it now
            self._move_into_place(key)

        return Rotation(Sealer(key), finish=finish)

    def _move_into_place(self, key: bytes) -> None:
        """The pending file becomes the key file.  If it cannot, it stays the only key that opens the store,
        and later rekeys try again before they write a new one over it (unless it is in place already:
        moved there by hand, or renamed before a failed directory sync)."""
        if not os.path.lexists(self.pending) and self._holds(self.path, key):
            self._stranded = None
            self._hold_in_kernel(key)
            return
        try:
            os.replace(self.pending, self.path)
            fsync_dir(self.path)
        except OSError as exc:
            log.error("the key database is sealed under the master key in %s, which cannot be moved to %s (%s): "
                      "keep that file, it is the only key that opens the store", self.pending, self.path,
                      exc.strerror)
            raise E.EIO(f"the store is sealed under the new master key in {self.pending}, which cannot be moved "
                        f"to {self.path} ({exc.strerror}): keep that file, it is the only key that opens the "
                        "store; once the cause is fixed, rekey again (or move it yourself)") from None
        self._stranded = None
        self._hold_in_kernel(key)

    def _holds(self, path: str, key: bytes) -> bool:
        try:
            return self._read(path) == key
        except (StartupError, OSError):
            return False

    def _read(self, path: str) -> bytes:
        key = read_private_file(path, "master key file", KEY_BYTES + 1, follow_symlinks=False)
        if len(key) != KEY_BYTES:
            raise StartupError(f"the master key file {path} does not hold a {KEY_BYTES}-byte key")
        return key


class PassphraseKey(KeySource):
    """scrypt(passphrase, salt): nothing secret on disk; the passphrase is needed at every start."""

    source = "passphrase"

    def __init__(self, passphrase: bytes):
        self.passphrase = passphrase
        self.salt = b""
        self.cost = SCRYPT_COST

    def meta(self) -> dict[str, bytes]:
        return {"salt": self.salt, "scrypt": ",".join(map(str, self.cost)).encode()}

    def create(self) -> Sealer:
        self.salt = os.urandom(16)
        return Sealer(derive(self.passphrase, self.salt, self.cost))

    def open(self, check: bytes, meta: dict[str, bytes]) -> Sealer | LegacySealer:
        self.salt = meta.get("salt", b"")
        try:
            n, r, p = (int(v) for v in meta.get("scrypt", b"").decode().split(","))
        except ValueError:
            raise StartupError("the key store's passphrase parameters are unreadable") from None
        if not (1 < n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 4
                and 128 * n * r <= MAX_SCRYPT_MEMORY):  # (a row edited to 4 GiB x 16 hung the start)
            raise StartupError("the key store's passphrase parameters are out of range")
        self.cost = (n, r, p)
        sealer = Sealer(derive(self.passphrase, self.salt, self.cost)).for_store(check, self.source, self.salt)
        if sealer is None:
            raise StartupError("the passphrase does not open the key store; refusing to start")
        return sealer

    def rotate(self, passphrase: bytes) -> Rotation:
        if not passphrase:
            raise E.EINVAL("this store is sealed under a passphrase: give the new one (it may be the same)")
        if passphrase != normalize_passphrase(passphrase) or len(passphrase) > MAX_PASSPHRASE:
            # start-up reads the file through normalize_passphrase: anything else could never open the store
            raise E.EINVAL(f"a passphrase is 1..{MAX_PASSPHRASE} bytes and does not end in a line break")
        salt = os.urandom(16)
        sealer = Sealer(derive(passphrase, salt, SCRYPT_COST))

        def finish() -> None:
            self.passphrase, self.salt, self.cost = passphrase, salt, SCRYPT_COST

        meta = {"salt": salt, "scrypt": ",".join(map(str, SCRYPT_COST)).encode()}
        return Rotation(sealer, meta, finish)


def _blob(value: object) -> bytes:
    """A sealed column's bytes; TypeError for any other SQL type (bytes() of an integer, from a row edited
    outside keyden, would allocate that many zeros, or fail with ValueError or MemoryError)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"a {type(value).__name__} where a BLOB belongs")
    return bytes(value)


def derive(passphrase: bytes, salt: bytes, cost: tuple[int, int, int]) -> bytes:
    n, r, p = cost
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(passphrase)


MAX_PASSPHRASE = 4096


def normalize_passphrase(raw: bytes) -> bytes:
    """What a passphrase file means: its bytes without trailing line breaks."""
    return raw.rstrip(b"\r\n")


def read_passphrase(path: str) -> bytes:
    """The passphrase file, held to the master key file's rule (whoever can read it can open the key
    store); a symlink is followed, as mounted secrets often are one."""
    passphrase = normalize_passphrase(read_private_file(path, "passphrase file", MAX_PASSPHRASE + 1))
    if not passphrase or len(passphrase) > MAX_PASSPHRASE:
        raise StartupError(f"the passphrase file {path} must hold 1..{MAX_PASSPHRASE} bytes")
    return passphrase


def read_private_file(path: str, what: str, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """Up to ``limit`` bytes of a secret file, refused unless a regular file of the daemon's own, 0600.

    O_NONBLOCK so that a FIFO is refused, not waited on.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise StartupError(f"cannot open the {what} {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory naming only the descriptor
        os.close(fd)
        raise StartupError(f"the {what} {path} is not a regular file; refusing to start")
    with os.fdopen(fd, "rb") as f:
        require_own(path, st, what)
        try:
            return f.read(limit)
        except OSError as exc:
            raise StartupError(f"cannot read the {what} {path}: {exc.strerror}") from None


def source_for(master_key_file: str, passphrase_file: str, kernel_description: str) -> KeySource:
    """The passphrase if one is configured (flag, config or $KEYDEN_PASSPHRASE_FILE), else the key file."""
    passphrase_file = passphrase_file or os.environ.get(PASSPHRASE_ENV, "")
    if passphrase_file:
        return PassphraseKey(read_passphrase(passphrase_file))
    return FileKey(master_key_file, kernel_description)
