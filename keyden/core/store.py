"""The key store: keys, keyrings, possession, quotas and garbage collection.

Every method is one keyctl operation with keyctl's argument order and the
kernel's checks, evaluated for a ``Caller``.  Pure: no sockets, no asyncio.
The server supplies who is calling; this module decides what they may do.
One lock guards the store; long crypto runs outside it (callers get the
parsed payload and work on it after the lookup returns).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core import perm as P
from keyden.core.perm import Credentials

# Special key IDs (keyctl.h).
THREAD, PROCESS, SESSION, USER, USER_SESSION, GROUP, REQKEY_AUTH = -1, -2, -3, -4, -5, -6, -7
SPECIAL_NAMES = {"@t": THREAD, "@p": PROCESS, "@s": SESSION, "@u": USER, "@us": USER_SESSION, "@g": GROUP, "@a": REQKEY_AUTH}

MAX_NESTING = 6
MAX_SERIAL = 2**31 - 1

# KEYCTL_CAPABILITIES bits (byte 0 / byte 1), as keyctl supports reports them.
CAPABILITIES = {
    "capabilities": True,
    "persistent_keyrings": False,
    "dh_compute": False,
    "public_key": True,
    "big_key_type": False,
    "key_invalidate": True,
    "restrict_keyring": True,
    "move_key": True,
    "ns_keyring_name": False,
    "ns_keyring_id": False,
    "notify": False,
}


@dataclass
class StoreConfig:
    """Limits, with the kernel's defaults (key.maxkeys and friends)."""

    maxkeys: int = 200
    maxbytes: int = 20000
    root_maxkeys: int = 1000000
    root_maxbytes: int = 25000000
    gc_delay: float = 300.0
    keyring_max_links: int = 65536


@dataclass(frozen=True)
class Caller:
    """One request's identity: credentials plus the process and session it runs in."""

    cred: Credentials
    process: tuple[int, int] | None = None  # (pid, start time): names its process keyring
    session_token: str | None = None

    @property
    def uid(self) -> int:
        return self.cred.uid


class Key:
    """A key as the store keeps it.  Never leaves the daemon."""

    __slots__ = (
        "serial", "type", "description", "uid", "gid", "perm", "expiry", "payload", "quota_len",
        "revoked_at", "invalidated", "dead", "links", "parents", "pins", "restriction", "charged",
        "ctime", "flags", "__weakref__",
    )

    def __init__(self, serial: int, ktype: T.KeyType, description: str, uid: int, gid: int, perm: int,
                 payload: Any, quota_len: int, charged: bool = True):
        self.serial = serial
        self.type = ktype
        self.description = description
        self.uid = uid
        self.gid = gid
        self.perm = perm
        self.expiry = 0.0
        self.payload = payload
        self.quota_len = quota_len
        self.revoked_at = 0.0
        self.invalidated = False
        self.dead = False
        self.links: dict[tuple[str, str], Key] | None = {} if ktype.is_keyring else None
        self.parents: set[Key] = set()
        self.pins = 0
        self.restriction: Restriction | None = None
        self.charged = charged
        self.ctime = time.time()
        self.flags: set[str] = set()

    @property
    def index(self) -> tuple[str, str]:
        return (self.type.name, self.description)

    def state_error(self, now: float) -> E.KeydenError | None:
        if self.revoked_at:
            return E.EKEYREVOKED()
        if self.expiry and now >= self.expiry:
            return E.EKEYEXPIRED()
        return None

    def __reduce__(self):
        raise TypeError("keys cannot be pickled")

    def __repr__(self) -> str:
        return f"<Key {self.serial} {self.type.name}:{self.description!r}>"


class Restriction:
    """What a restricted keyring admits.  ``check`` raises to refuse a link."""

    description = "unrestricted"

    def check(self, store: "KeyStore", keyring: Key, key: Key) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class DenyAll(Restriction):
    description = "no links"

    def check(self, store, keyring, key):
        raise E.EPERM("keyring is restricted against all links")


#: restriction factories by key type: (store, caller, restriction string) -> Restriction.
RESTRICTION_FACTORIES: dict[str, Callable[["KeyStore", Caller, str], Restriction]] = {}


@dataclass
class Description:
    """What keyctl describe shows."""

    serial: int
    type: str
    uid: int
    gid: int
    perm: int
    description: str


@dataclass
class _Quota:
    keys: int = 0
    bytes: int = 0


@dataclass
class _Session:
    keyring: Key
    uid: int
    name: str | None = None


class KeyStore:
    def __init__(self, config: StoreConfig | None = None, clock: Callable[[], float] = time.time):
        self.config = config or StoreConfig()
        self.clock = clock
        self.lock = threading.RLock()
        self._keys: dict[int, Key] = {}
        self._quota: dict[int, _Quota] = {}
        self._user_keyrings: dict[int, Key] = {}
        self._user_session_keyrings: dict[int, Key] = {}
        self._process_keyrings: dict[tuple[int, int], Key] = {}
        self._sessions: dict[str, _Session] = {}

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return len(self._keys)

    def _new_serial(self) -> int:
        while True:
            serial = secrets.randbelow(MAX_SERIAL) + 1
            if serial not in self._keys:
                return serial

    def _quota_for(self, uid: int) -> _Quota:
        return self._quota.setdefault(uid, _Quota())

    def _limits(self, uid: int) -> tuple[int, int]:
        c = self.config
        return (c.root_maxkeys, c.root_maxbytes) if uid == 0 else (c.maxkeys, c.maxbytes)

    def _charge(self, uid: int, nkeys: int, nbytes: int) -> None:
        q = self._quota_for(uid)
        maxkeys, maxbytes = self._limits(uid)
        if (nkeys > 0 and q.keys + nkeys > maxkeys) or (nbytes > 0 and q.bytes + nbytes > maxbytes):
            raise E.EDQUOT(f"uid {uid} is over its key quota")
        q.keys += nkeys
        q.bytes += nbytes

    def quota_usage(self, uid: int) -> tuple[int, int, int, int]:
        """(keys, bytes, maxkeys, maxbytes) as /proc/key-users shows them."""
        with self.lock:
            q = self._quota_for(uid)
            return (q.keys, q.bytes, *self._limits(uid))

    def _create(self, ktype: T.KeyType, description: str, cred: Credentials, perm: int, payload: Any,
                quota_len: int, charged: bool = True) -> Key:
        if charged:
            self._charge(cred.uid, 1, len(description.encode()) + quota_len)
        key = Key(self._new_serial(), ktype, description, cred.uid, cred.gid, perm, payload, quota_len, charged)
        self._keys[key.serial] = key
        return key

    def _destroy(self, key: Key) -> None:
        """Drop a key nobody references any more: free its quota, wipe its payload."""
        if key.dead:
            return
        key.dead = True
        self._keys.pop(key.serial, None)
        if key.charged:
            q = self._quota_for(key.uid)
            q.keys -= 1
            q.bytes -= len(key.description.encode()) + key.quota_len
        if key.links is not None:
            children = list(key.links.values())
            key.links.clear()
            for child in children:
                self._drop_parent(child, key)
        key.type.destroy(key.payload)
        key.payload = None

    def _drop_parent(self, child: Key, parent: Key) -> None:
        child.parents.discard(parent)
        self._maybe_destroy(child)

    def _maybe_destroy(self, key: Key) -> None:
        if not key.parents and key.pins == 0:
            self._destroy(key)

    def _link_raw(self, ring: Key, key: Key) -> None:
        old = ring.links.get(key.index)
        ring.links[key.index] = key
        key.parents.add(ring)
        if old is not None and old is not key:
            self._drop_parent(old, ring)

    def _unlink_raw(self, ring: Key, key: Key) -> None:
        if ring.links.get(key.index) is key:
            del ring.links[key.index]
            self._drop_parent(key, ring)

    # ------------------------------------------------------- special keyrings

    def _pinned_keyring(self, description: str, cred: Credentials, perm: int) -> Key:
        key = self._create(T.KEYRING, description, cred, perm, None, 0, charged=False)
        key.pins += 1
        return key

    def _user_keyring(self, uid: int, gid: int) -> Key:
        ring = self._user_keyrings.get(uid)
        if ring is None or ring.dead:
            ring = self._pinned_keyring(f"_uid.{uid}", Credentials(uid, gid), P.DEFAULT_UID_KEYRING)
            self._user_keyrings[uid] = ring
        return ring

    def _user_session_keyring(self, uid: int, gid: int) -> Key:
        ring = self._user_session_keyrings.get(uid)
        if ring is None or ring.dead:
            ring = self._pinned_keyring(f"_uid_ses.{uid}", Credentials(uid, gid), P.DEFAULT_UID_KEYRING)
            self._link_raw(ring, self._user_keyring(uid, gid))
            self._user_session_keyrings[uid] = ring
        return ring

    def _process_keyring(self, caller: Caller, create: bool) -> Key | None:
        if caller.process is None:
            return None
        ring = self._process_keyrings.get(caller.process)
        if (ring is None or ring.dead) and create:
            ring = self._pinned_keyring("_pid", caller.cred, P.DEFAULT_PROCESS_KEYRING)
            self._process_keyrings[caller.process] = ring
        return ring if ring is not None and not ring.dead else None

    def _session_keyring(self, caller: Caller) -> Key:
        if caller.session_token:
            session = self._sessions.get(caller.session_token)
            if session is not None and session.uid == caller.uid and not session.keyring.dead:
                return session.keyring
        return self._user_session_keyring(caller.uid, caller.cred.gid)

    def _special(self, caller: Caller, key_id: int, create: bool) -> Key:
        if key_id in (THREAD, PROCESS):
            ring = self._process_keyring(caller, create)
            if ring is None:
                raise E.ENOKEY("this process has no process keyring")
            return ring
        if key_id == SESSION:
            return self._session_keyring(caller)
        if key_id == USER:
            return self._user_keyring(caller.uid, caller.cred.gid)
        if key_id == USER_SESSION:
            return self._user_session_keyring(caller.uid, caller.cred.gid)
        if key_id == REQKEY_AUTH:
            raise E.ENOKEY("no request-key authorisation key")
        raise E.EINVAL(f"unsupported special key id {key_id}")

    def _possession_roots(self, caller: Caller) -> Iterator[Key]:
        ring = self._process_keyring(caller, create=False)
        if ring is not None:
            yield ring
        yield self._session_keyring(caller)

    # ----------------------------------------------------- lookup & permission

    def _rights(self, caller: Caller, key: Key, possessed: bool) -> int:
        return P.effective(key.perm, key.uid, key.gid, caller.cred, possessed)

    def _search_tree(self, caller: Caller, ring: Key, match: Callable[[Key], bool],
                     state_errors: list | None = None, now: float | None = None,
                     possessed: bool = True) -> Key | None:
        """Kernel keyring search: the keys at each level first, then descend.

        Only keyrings granting search are entered; a match must grant search
        too.  Possession, if the start keyring has it, carries down the path.
        """
        now = self.clock() if now is None else now
        if not (self._rights(caller, ring, possessed) & P.SEARCH):
            return None
        if match(ring) and ring.state_error(now) is None:
            return ring
        seen: set[int] = set()

        def walk(current: Key, depth: int) -> Key | None:
            nested = []
            for key in list(current.links.values()):
                if key.dead:
                    continue
                if match(key):
                    err = key.state_error(now)
                    if err is not None:
                        if state_errors is not None:
                            state_errors.append(err)
                    elif self._rights(caller, key, possessed) & P.SEARCH:
                        return key
                if key.links is not None:
                    nested.append(key)
            if depth >= MAX_NESTING:
                return None
            for sub in nested:
                if sub.serial in seen or sub.state_error(now) is not None:
                    continue
                seen.add(sub.serial)
                if self._rights(caller, sub, possessed) & P.SEARCH:
                    found = walk(sub, depth + 1)
                    if found is not None:
                        return found
            return None

        if ring.state_error(now) is not None:
            return None
        return walk(ring, 1)

    def _is_possessed(self, caller: Caller, key: Key) -> bool:
        for root in self._possession_roots(caller):
            if self._search_tree(caller, root, lambda k: k is key) is not None:
                return True
        return False

    def _lookup(self, caller: Caller, key_id: int, need: int = 0, *, create: bool = False,
                partial: bool = False) -> tuple[Key, bool]:
        """Resolve an ID to (key, possessed), checking state and permission like lookup_user_key."""
        if not isinstance(key_id, int):
            raise E.EINVAL("key IDs are integers")
        if key_id < 0:
            key = self._special(caller, key_id, create)
            possessed = True
        elif key_id == 0:
            raise E.EINVAL("key ID 0 names no key")
        else:
            key = self._keys.get(key_id)
            if key is None or key.dead:
                raise E.ENOKEY(f"no key with serial {key_id}")
            possessed = None  # computed only if it can matter
        if not partial:
            err = key.state_error(self.clock())
            if err is not None:
                raise err
        if need:
            rights = self._rights(caller, key, False)
            if rights & need != need:
                if possessed is None:
                    possessed = self._is_possessed(caller, key)
                if not possessed or self._rights(caller, key, True) & need != need:
                    raise E.EACCES(f"permission denied on key {key.serial}")
        return key, bool(possessed)

    def _keyring(self, caller: Caller, ring_id: int, need: int, create: bool = True) -> Key:
        ring, _ = self._lookup(caller, ring_id, need, create=create)
        if ring.links is None:
            raise E.ENOTDIR(f"key {ring.serial} is not a keyring")
        return ring

    def resolve(self, caller: Caller, key_id: int, create: bool = False) -> int:
        """KEYCTL_GET_KEYRING_ID: what serial a special ID names."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, 0, create=create, partial=True)
            return key.serial

    # ------------------------------------------------------------- linking

    def _subtree_height(self, key: Key, depth: int = 1) -> int:
        if key.links is None:
            return 0
        if depth > MAX_NESTING + 1:
            return depth
        best = depth
        for child in key.links.values():
            if child.links is not None:
                best = max(best, self._subtree_height(child, depth + 1))
        return best

    def _reaches(self, start: Key, target: Key) -> bool:
        stack, seen = [start], set()
        while stack:
            k = stack.pop()
            if k is target:
                return True
            if k.links is None or k.serial in seen:
                continue
            seen.add(k.serial)
            stack.extend(c for c in k.links.values() if c.links is not None)
        return False

    def _check_link(self, ring: Key, key: Key) -> None:
        if ring.revoked_at:
            raise E.EKEYREVOKED(f"keyring {ring.serial} has been revoked")
        if key.links is not None:
            if key is ring or self._reaches(key, ring):
                raise E.EDEADLK("link would create a cycle")
            if self._subtree_height(key) >= MAX_NESTING:
                raise E.ELOOP("keyrings nested too deeply")
        if ring.restriction is not None:
            ring.restriction.check(self, ring, key)
        if key.index not in ring.links and len(ring.links) >= self.config.keyring_max_links:
            raise E.ENFILE(f"keyring {ring.serial} is full")

    # -------------------------------------------------------------- operations

    def add(self, caller: Caller, type_name: str, description: str, payload: bytes, keyring: int,
            secret: bytes | None = None, perm: int | None = None) -> int:
        """add_key(2): create, or update in place when the type allows, and link."""
        ktype = T.lookup(type_name)
        if len(description.encode()) > T.MAX_DESC_LEN:
            raise E.EINVAL("description too long")
        if ktype.is_keyring and payload:
            raise E.EINVAL("a keyring takes no data")
        ktype.check_description(description)
        with self.lock:  # fail fast on the keyring before parsing anything
            self._keyring(caller, keyring, P.WRITE)
        value, quota_len = ktype.preparse(payload, secret)  # may be slow (asymmetric): outside the lock
        try:
            with self.lock:
                ring, possessed = self._lookup(caller, keyring, P.WRITE, create=True)
                if ring.links is None:
                    raise E.ENOTDIR(f"key {ring.serial} is not a keyring")
                if not description:
                    description = ktype.default_description(value)
                existing = ring.links.get((ktype.name, description))
                if existing is not None and ktype.updatable and existing.state_error(self.clock()) is None:
                    possessed = possessed or self._is_possessed(caller, ring)
                    if not self._rights(caller, existing, possessed) & P.WRITE:
                        raise E.EACCES(f"permission denied updating key {existing.serial}")
                    self._replace_payload(existing, value, quota_len)
                    value = None
                    return existing.serial
                key = self._create(ktype, description, caller.cred, ktype.default_perm if perm is None else perm,
                                   value, quota_len)
                try:
                    self._check_link(ring, key)
                except BaseException:
                    self._destroy(key)
                    raise
                value = None
                self._link_raw(ring, key)
                return key.serial
        finally:
            if value is not None:
                ktype.destroy(value)

    def create_internal(self, caller: Caller, ktype: T.KeyType, description: str, value: Any, quota_len: int,
                        keyring: int, perm: int | None = None) -> int:
        """Add a key whose payload the daemon made itself (generated, derived): never an update."""
        with self.lock:
            ring = self._keyring(caller, keyring, P.WRITE)
            if not description:
                description = ktype.default_description(value)
            ktype.check_description(description)
            key = self._create(ktype, description, caller.cred, ktype.default_perm if perm is None else perm,
                               value, quota_len)
            try:
                self._check_link(ring, key)
            except BaseException:
                self._destroy(key)
                raise
            self._link_raw(ring, key)
            return key.serial

    def _replace_payload(self, key: Key, value: Any, quota_len: int) -> None:
        delta = quota_len - key.quota_len
        if key.charged and delta > 0:
            self._charge(key.uid, 0, delta)
        elif key.charged:
            self._quota_for(key.uid).bytes += delta
        old, key.payload, key.quota_len = key.payload, value, quota_len
        key.type.destroy(old)

    def update(self, caller: Caller, key_id: int, payload: bytes) -> None:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.WRITE)
            ktype = key.type
        if not ktype.updatable:
            raise E.EOPNOTSUPP(f"keys of type {ktype.name!r} cannot be updated")
        value, quota_len = ktype.preparse(payload)
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.WRITE)
            self._replace_payload(key, value, quota_len)

    def request(self, caller: Caller, type_name: str, description: str, dest: int = 0) -> int:
        """request_key(2) without an upcall: search the caller's keyrings; ENOKEY if absent."""
        ktype = T.lookup(type_name)
        with self.lock:
            key = self._search_process_keyrings(caller, ktype, description)
            if dest:
                self._link_checked(caller, key, dest)
            return key.serial

    def _search_process_keyrings(self, caller: Caller, ktype: T.KeyType, description: str) -> Key:
        errors: list[E.KeydenError] = []
        now = self.clock()
        for root in self._possession_roots(caller):
            found = self._search_tree(caller, root, self._matcher(ktype, description), errors, now)
            if found is not None:
                return found
        if errors:
            raise errors[0]
        raise E.ENOKEY(f"no {ktype.name} key {description!r} found")

    @staticmethod
    def _matcher(ktype: T.KeyType, description: str) -> Callable[[Key], bool]:
        return lambda k: k.type is ktype and ktype.matches(k.description, k.payload, description)

    def search(self, caller: Caller, keyring: int, type_name: str, description: str, dest: int = 0) -> int:
        ktype = T.lookup(type_name)
        with self.lock:
            ring, possessed = self._lookup(caller, keyring, P.SEARCH)
            possessed = possessed or self._is_possessed(caller, ring)
            if ring.links is None:
                raise E.ENOTDIR(f"key {ring.serial} is not a keyring")
            errors: list[E.KeydenError] = []
            found = self._search_tree(caller, ring, self._matcher(ktype, description), errors,
                                      possessed=possessed)
            if found is None:
                if errors:
                    raise errors[0]
                raise E.ENOKEY(f"no {ktype.name} key {description!r} found")
            if dest:
                self._link_checked(caller, found, dest)
            return found.serial

    def _link_checked(self, caller: Caller, key: Key, ring_id: int) -> None:
        ring = self._keyring(caller, ring_id, P.WRITE)
        if not self._rights(caller, key, self._is_possessed(caller, key)) & P.LINK:
            raise E.EACCES(f"key {key.serial} does not grant link")
        self._check_link(ring, key)
        self._link_raw(ring, key)

    def link(self, caller: Caller, key_id: int, keyring: int) -> None:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.LINK, create=True)
            ring = self._keyring(caller, keyring, P.WRITE)
            self._check_link(ring, key)
            self._link_raw(ring, key)

    def unlink(self, caller: Caller, key_id: int, keyring: int) -> None:
        with self.lock:
            ring = self._keyring(caller, keyring, P.WRITE, create=False)
            key, _ = self._lookup(caller, key_id, 0, partial=True)
            if ring.links.get(key.index) is not key:
                raise E.ENOENT(f"key {key.serial} is not linked into keyring {ring.serial}")
            self._unlink_raw(ring, key)

    def move(self, caller: Caller, key_id: int, from_ring: int, to_ring: int, exclusive: bool = True) -> None:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.LINK)
            src = self._keyring(caller, from_ring, P.WRITE)
            dst = self._keyring(caller, to_ring, P.WRITE)
            if src.links.get(key.index) is not key:
                raise E.ENOENT(f"key {key.serial} is not linked into keyring {src.serial}")
            if src is dst:
                return
            if exclusive and key.index in dst.links:
                raise E.EEXIST(f"keyring {dst.serial} already holds a {key.type.name} {key.description!r}")
            self._check_link(dst, key)
            key.pins += 1  # keep it alive between unlink and link
            try:
                self._unlink_raw(src, key)
                self._link_raw(dst, key)
            finally:
                key.pins -= 1

    def clear(self, caller: Caller, keyring: int) -> None:
        with self.lock:
            ring = self._keyring(caller, keyring, P.WRITE)
            children = list(ring.links.values())
            ring.links.clear()
            for child in children:
                self._drop_parent(child, ring)

    def revoke(self, caller: Caller, key_id: int) -> None:
        with self.lock:
            try:
                key, _ = self._lookup(caller, key_id, P.WRITE)
            except E.EACCES:
                key, _ = self._lookup(caller, key_id, P.SETATTR)
            key.revoked_at = self.clock()
            if key.links is not None:
                children = list(key.links.values())
                key.links.clear()
                for child in children:
                    self._drop_parent(child, key)
            elif key.type.readable or not key.type.derives_description:
                key.type.destroy(key.payload)

    def invalidate(self, caller: Caller, key_id: int) -> None:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SEARCH)
            key.invalidated = True
            key.pins += 1
            try:
                for parent in list(key.parents):
                    self._unlink_raw(parent, key)
            finally:
                key.pins -= 1
            self._release_roots(key)
            self._destroy(key)

    def _release_roots(self, key: Key) -> None:
        for table in (self._user_keyrings, self._user_session_keyrings, self._process_keyrings):
            for k, v in list(table.items()):
                if v is key:
                    del table[k]
        for token, session in list(self._sessions.items()):
            if session.keyring is key:
                del self._sessions[token]

    def read(self, caller: Caller, key_id: int) -> bytes | list[int]:
        """keyctl_read: payload bytes, or a keyring's serials."""
        with self.lock:
            key, possessed = self._lookup(caller, key_id, 0)
            if not self._rights(caller, key, possessed) & P.READ:
                if not (possessed or self._is_possessed(caller, key)):
                    raise E.EACCES(f"permission denied reading key {key.serial}")
            if key.links is not None:
                return [k.serial for k in key.links.values() if not k.dead]
            if not key.type.readable:
                raise E.EOPNOTSUPP(f"keys of type {key.type.name!r} cannot be read")
            return key.type.read(key.payload)

    def describe(self, caller: Caller, key_id: int) -> Description:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.VIEW)
            return Description(key.serial, key.type.name, key.uid, key.gid, key.perm, key.description)

    def chown(self, caller: Caller, key_id: int, uid: int, gid: int) -> None:
        """KEYCTL_CHOWN: -1 leaves a field alone; only root gives a key away."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR, partial=True)
            if uid != -1 and uid != key.uid and caller.uid != 0:
                raise E.EACCES("only root may change a key's owner")
            if gid != -1 and gid != key.gid and caller.uid != 0:
                if key.uid != caller.uid or not caller.cred.in_group(gid):
                    raise E.EACCES("you may only give your own keys to a group you are in")
            if uid != -1 and uid != key.uid:
                if key.charged:
                    size = len(key.description.encode()) + key.quota_len
                    self._charge(uid, 1, size)
                    old = self._quota_for(key.uid)
                    old.keys -= 1
                    old.bytes -= size
                key.uid = uid
            if gid != -1:
                key.gid = gid

    def setperm(self, caller: Caller, key_id: int, perm: int) -> None:
        if perm & ~P.VALID_MASK:
            raise E.EINVAL("permission bits outside 0x3f3f3f3f")
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR, partial=True)
            if key.uid != caller.uid:
                raise E.EACCES("only the owner may change a key's permissions")
            key.perm = perm

    def set_timeout(self, caller: Caller, key_id: int, timeout: int) -> None:
        if timeout < 0:
            raise E.EINVAL("timeout must not be negative")
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR)
            key.expiry = self.clock() + timeout if timeout else 0.0

    def restrict_keyring(self, caller: Caller, keyring: int, type_name: str = "", restriction: str = "") -> None:
        with self.lock:
            ring = self._keyring(caller, keyring, P.SETATTR)
            if ring.restriction is not None:
                raise E.EEXIST(f"keyring {ring.serial} is already restricted")
            if not type_name:
                if restriction:
                    raise E.EINVAL("a restriction needs a key type")
                ring.restriction = DenyAll()
                return
            T.lookup(type_name)
            factory = RESTRICTION_FACTORIES.get(type_name)
            if factory is None:
                raise E.EOPNOTSUPP(f"keys of type {type_name!r} offer no restrictions")
            ring.restriction = factory(self, caller, restriction)

    def join_session(self, caller: Caller, name: str | None = None) -> tuple[int, str]:
        """KEYCTL_JOIN_SESSION_KEYRING: a new (or the named) session keyring and a token for it.

        A named session is joined again by its owner, or by anyone its
        permissions grant search to; otherwise a new keyring is made.
        """
        with self.lock:
            ring = None
            if name:
                now = self.clock()
                for session in self._sessions.values():
                    k = session.keyring
                    if session.name == name and not k.dead and k.state_error(now) is None and (
                            k.uid == caller.uid or self._rights(caller, k, False) & P.SEARCH):
                        ring = k
                        break
            if ring is None:
                ring = self._create(T.KEYRING, name or "_ses", caller.cred, P.DEFAULT_SESSION_KEYRING, None, 0)
            ring.pins += 1
            token = secrets.token_urlsafe(32)
            self._sessions[token] = _Session(ring, caller.uid, name)
            return ring.serial, token

    def leave_session(self, caller: Caller, token: str) -> None:
        """Drop a session token; the keyring lives on only if something else holds it."""
        with self.lock:
            session = self._sessions.get(token)
            if session is None or session.uid != caller.uid:
                raise E.ENOKEY("no such session")
            del self._sessions[token]
            session.keyring.pins -= 1
            self._maybe_destroy(session.keyring)

    def session_valid(self, token: str, uid: int) -> bool:
        with self.lock:
            s = self._sessions.get(token)
            return s is not None and s.uid == uid and not s.keyring.dead

    def find(self, caller: Caller, type_name: str, description: str) -> int:
        """Find a key by type and description among those the caller may view (keyutils' /proc/keys scan)."""
        ktype = T.lookup(type_name)
        with self.lock:
            try:
                return self._search_process_keyrings(caller, ktype, description).serial
            except E.KeydenError:
                pass
            now = self.clock()
            for key in list(self._keys.values()):
                if key.type is ktype and ktype.matches(key.description, key.payload, description) \
                        and key.state_error(now) is None:
                    if self._rights(caller, key, False) & P.VIEW or (
                            self._is_possessed(caller, key) and self._rights(caller, key, True) & P.VIEW):
                        return key.serial
            raise E.ENOKEY(f"no {type_name} key {description!r} found")

    # ----------------------------------------------------- keys used by serial

    def use(self, caller: Caller, key_id: int, need: int = P.SEARCH) -> Key:
        """Look a key up for an in-daemon operation (pkey_*, ciphers): search permission suffices."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, need)
            return key

    def asymmetric(self, caller: Caller, key_id: int) -> Any:
        key = self.use(caller, key_id)
        if key.type.name != "asymmetric":
            raise E.EOPNOTSUPP(f"key {key.serial} is not an asymmetric key")
        return key.payload

    # ------------------------------------------------------------------ garbage

    def collect(self, process_alive: Callable[[int, int], bool] | None = None) -> int:
        """Reap dead process keyrings and keys revoked/expired longer than gc_delay ago."""
        destroyed = 0
        with self.lock:
            before = len(self._keys)
            if process_alive is not None:
                for ident, ring in list(self._process_keyrings.items()):
                    if not process_alive(*ident):
                        del self._process_keyrings[ident]
                        ring.pins -= 1
                        self._maybe_destroy(ring)
            now = self.clock()
            cutoff = now - self.config.gc_delay
            for key in list(self._keys.values()):
                if key.dead:
                    continue
                died = key.revoked_at or (key.expiry if key.expiry and key.expiry <= now else 0)
                if died and died <= cutoff:
                    self._release_roots(key)
                    key.pins = 0
                    for parent in list(key.parents):
                        self._unlink_raw(parent, key)
                    self._destroy(key)
            destroyed = before - len(self._keys)
        return destroyed

    def iter_keys(self) -> Iterable[Key]:
        return list(self._keys.values())
