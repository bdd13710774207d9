"""The key store: keys, keyrings, possession, quotas and garbage collection.

The public methods named after keyctl operations take keyctl's argument order
and make the kernel's checks, in the kernel's order (security/keys/keyctl.c),
for a ``Caller``; the others serve the daemon's own work on keys by serial
(``operand``, ``material``, ``engine``), export and import (``export_tree``,
``create_detached``, ``attach``) and start-up (``restore``).  Pure: no sockets,
no asyncio.  The server supplies who is
calling; this module decides what they may do.  Changes to keys under a
persistent keyring are reported to ``journal`` (core/journal.py), which the
server backs with the sealed database (keyden/persist).

Thread safety: one ``RLock`` guards all state, and every public method holds
it whenever it reads or changes that state.  The only work done outside it is
parsing a client's payload (``KeyType.preparse``, slow for asymmetric keys),
which touches nothing shared; the operation then looks everything up again
under the lock, so nothing checked before the parse is trusted after it.
"""

from __future__ import annotations

import bisect
import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core import perm as P
from keyden.core.budget import ByteBudget
from keyden.core.flags import (ASYMMETRIC_USE, ASYMMETRIC_USE_FLAGS, BINDING_FLAGS, FOR_USE, KEY_FLAGS, NO_EXPORT,
                               USE_FLAGS, check_flags, refuse_use, uses_of)
from keyden.core.journal import Journal, NullJournal
from keyden.core.key import (USER_KEYRING, USER_SESSION_KEYRING, Caller, DenyAll, Exported, Key, Restriction,
                             StoreConfig)
from keyden.core.perm import Credentials
from keyden.core.views import Description, KeyStatus

# Special key IDs (keyctl.h).
THREAD, PROCESS, SESSION, USER, USER_SESSION, GROUP, REQKEY_AUTH, REQUESTOR = -1, -2, -3, -4, -5, -6, -7, -8

#: KEYRING_SEARCH_MAX_DEPTH: how many keyrings deep below its start a search (or cycle check) goes.
MAX_NESTING = 6
MIN_SERIAL, MAX_SERIAL = 3, 2**31 - 1
#: KEYQUOTA_LINK_BYTES: what each link costs the owner of the keyring holding it.
LINK_BYTES = 4

#: The persistent keyring's mask: possessor all but setattr, owner view and read (persistent.c).
PERSISTENT_KEYRING_PERM = 0x1F030000
#: Where ``restore(adopt=True)`` files keys whose keyrings were skipped, in their owner's persistent keyring.
RECOVERED_KEYRING = "keyden:recovered"

#: What an asymmetric key is handed out for (KeyStore.asymmetric): a use, a function of the parsed key
#: giving one (or None), or None for public data.
AsymmetricUse = str | Callable[[Any], str | None] | None

# How a new key counts against its owner's quota (KEY_ALLOC_IN_QUOTA / _QUOTA_OVERRUN / _NOT_IN_QUOTA).
IN_QUOTA, QUOTA_OVERRUN, NOT_IN_QUOTA = "in", "overrun", "none"


#: restriction factories by key type (the type's lookup_restriction): (store, caller, restriction) -> Restriction.
#: The asymmetric type's come with keyden.core.trust, which registers them (and the blacklist's admission
#: check below) when imported, as the kernel's asymmetric key module does when loaded; until then a type
#: restriction is ENOENT, as for a type that has none.
RESTRICTION_FACTORIES: dict[str, Callable[["KeyStore", Caller, str], Restriction]] = {}

#: checks every link, move and add_key runs before the keyring's own restriction, with the same
#: arguments as Restriction.check (the blacklist: keyden.core.trust); each raises to refuse.
ADMISSION_CHECKS: list[Callable[["KeyStore", "Key", T.KeyType, Any], None]] = []


def _refuse_kept(key: "Key") -> None:
    if key.keep:
        raise E.EPERM(f"key {key.serial} is a system key and cannot be removed or changed")


@dataclass
class _Quota:
    keys: int = 0
    bytes: int = 0


@dataclass
class _Session:
    keyring: Key
    uid: int
    name: str | None = None


@dataclass(frozen=True)
class _Match:
    """What a keyring search looks for (keyring_search_context's index key and match data).

    A direct match looks up the one key filed under (type, description) in
    each keyring; otherwise every key of the type is offered to the type's
    matcher.  ``target`` makes it an identity match (possession checks).
    """

    ktype: T.KeyType
    description: str
    direct: bool = True
    target: Key | None = None

    @classmethod
    def search(cls, ktype: T.KeyType, description: str) -> "_Match":
        return cls(ktype, description, direct=not ktype.search_iterates(description))

    @classmethod
    def identity(cls, key: Key) -> "_Match":
        return cls(key.type, key.description, target=key)

    def files_under(self, key: Key) -> bool:
        return key.type is self.ktype and key.description == self.description

    def candidates(self, ring: Key) -> Iterable[Key]:
        if self.direct:
            key = ring.links.get((self.ktype.name, self.description))
            return () if key is None else (key,)
        return [k for k in ring.links.values() if k.type is self.ktype]

    def matches(self, key: Key) -> bool:
        if self.target is not None:
            return key is self.target
        return self.ktype.matches(key.description, key.payload, self.description)


def _require_keyring(key: Key) -> None:
    if key.links is None:
        raise E.ENOTDIR(f"key {key.serial} is not a keyring")


def _id_arg(value: int, what: str) -> int:
    """A uid/gid argument to chown: -1 (or its 32-bit form) leaves the field alone."""
    if value in (-1, 0xFFFFFFFF):
        return -1
    if not 0 <= value < 0xFFFFFFFF:
        raise E.EINVAL(f"{what} {value} is out of range")
    return value


def _check_new_key(ktype: T.KeyType, perm: int | None, flags: int, timeout: int) -> None:
    check_flags(ktype, flags)
    if perm is not None:
        P.check_mask(perm)
    if timeout < 0:
        raise E.EINVAL("timeout must not be negative")


def _holds(ring: Key, target: Key) -> bool:
    """Does keyring ``ring`` hold ``target``, however indirectly, whatever the states: linked anywhere below
    it, or trusted by the restriction of a keyring below it (a restriction holds its anchor)?  A loop of
    such holds would keep every key in it alive, unreachable, for good: links and restrictions refuse one."""
    todo, seen = [ring], {ring.serial}
    while todo:
        current = todo.pop()
        anchor = current.restriction.key if current.restriction is not None else None
        for member in itertools.chain(current.links.values(), (anchor,) if anchor is not None else ()):
            if member is target:
                return True
            if member.links is not None and member.serial not in seen:
                seen.add(member.serial)
                todo.append(member)
    return False


def _refuse_namesake(ring: Key, ktype: T.KeyType, description: str, now: float) -> None:
    """EEXIST rather than displace (and so destroy) a usable key of this type and description; a revoked,
    invalidated or expired one gives way, as add_key's (whose update passes them over) does."""
    namesake = ring.links.get((ktype.name, description))
    if namesake is not None and namesake.state_error(now) is None:
        raise E.EEXIST(f"keyring {ring.serial} already holds a key of type {ktype.name} and that description "
                       f"(unlink it first, or choose another description)")


def _unused_name(ring: Key, type_name: str, prefix: str) -> str:
    """``prefix`` and 8 random hex digits, not yet filed in ``ring`` under this type."""
    while True:  # 2**32 names: a clash is rare, and a keyring holds at most keyring_max_links
        name = f"{prefix}{secrets.token_hex(4)}"
        if (type_name, name) not in ring.links:
            return name


class KeyStore:
    def __init__(self, config: StoreConfig | None = None, clock: Callable[[], float] = time.time):
        self.config = config or StoreConfig()
        self.clock = clock
        self.lock = threading.RLock()
        self._keys: dict[int, Key] = {}  # creation order: named sessions rely on it
        self._serial_order: list[int] | None = None  # serials sorted, made on first use (see _file)
        self._unsorted: set[int] = set()  # serials filed since: merged into it at its next use
        self._stale = 0  # serials in it whose keys are gone (skipped, dropped when half of it is)
        # (type, description) -> serials, in the order they were filed: find's fallback, a join by name
        self._by_name: dict[tuple[str, str], dict[int, None]] = {}
        self._mortal: set[int] = set()  # keys given an expiry or revoked: all that collect looks through
        self._quota: dict[int, _Quota] = {}
        self._user_keyrings: dict[int, Key] = {}
        self._user_session_keyrings: dict[int, Key] = {}
        self._process_keyrings: dict[tuple[tuple[int, int], int, int], Key] = {}  # (process, uid, gid) -> @p
        self._dying: list[Key] = []  # keys whose destruction is queued (_destroy) ...
        self._destroying = False  # ... while an outer _destroy works the queue off
        #: Told (process, uid) each time a process keyring is made, with the lock held: it must only take note
        #: (the server watches that process's exit, and then calls ``collect_process``).
        self.on_process_keyring: Callable[[tuple[int, int], int], None] | None = None
        self._sessions: dict[str, _Session] = {}
        # ... indexed by keyring serial and by uid, so destroying a key or listing a uid's sessions never
        # walks every token of every user (joining a named keyring mints one each time)
        self._tokens_of_ring: dict[int, set[str]] = {}
        self._tokens_of_uid: dict[int, set[str]] = {}
        self._persistent_keyrings: dict[int, Key] = {}  # uid -> _persistent.<uid> (the kernel's register)
        self._reserved: set[int] = set()  # serials of stored records that were not restored: never handed out
        self._detached: dict[int, Key] = {}  # tops of trees being built (create_detached), held by the daemon
        self.journal: Journal = NullJournal()
        self.shm_budget = ByteBudget(self.config.shm_maxbytes, self.config.shm_total_maxbytes, "shared memory")
        # Possession is a tree search; cache its answers until anything that could change one happens.
        self._generation = 0
        self._possession_memo: dict[tuple[Caller, int], tuple[int, bool]] = {}

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        with self.lock:
            return len(self._keys)

    def _new_serial(self) -> int:
        """key_alloc_serial: random, positive, at least 3, unique among live keys and reserved serials."""
        while True:
            serial = MIN_SERIAL + secrets.randbelow(MAX_SERIAL - MIN_SERIAL + 1)
            if serial not in self._keys and serial not in self._reserved:
                return serial

    # ------------------------------------------------------------------ quota

    def _quota_for(self, uid: int) -> _Quota:
        return self._quota.setdefault(uid, _Quota())

    def _limits(self, uid: int) -> tuple[int, int]:
        c = self.config
        return (c.root_maxkeys, c.root_maxbytes) if uid == 0 else (c.maxkeys, c.maxbytes)

    def _check_quota(self, uid: int, nkeys: int, nbytes: int) -> None:
        q = self._quota_for(uid)
        maxkeys, maxbytes = self._limits(uid)
        if (nkeys > 0 and q.keys + nkeys > maxkeys) or (nbytes > 0 and q.bytes + nbytes > maxbytes):
            raise E.EDQUOT(f"uid {uid} is over its key quota")

    def _charge(self, uid: int, nkeys: int, nbytes: int, check: bool = True) -> None:
        """Add to (or, negative, release from) a uid's usage; refuse growth past the limits if ``check``."""
        if check:
            self._check_quota(uid, nkeys, nbytes)
        q = self._quota_for(uid)
        q.keys += nkeys
        q.bytes += nbytes

    def _reserve(self, key: Key, datalen: int, check: bool = True) -> None:
        """key_payload_reserve: resize what a key's payload costs its owner."""
        delta = datalen - key.quota_len
        if key.charged and delta:
            self._charge(key.uid, 0, delta, check=check and delta > 0)
        key.quota_len = datalen

    def quota_usage(self, uid: int) -> tuple[int, int, int, int]:
        """(keys, bytes, maxkeys, maxbytes) as /proc/key-users shows them."""
        with self.lock:
            q = self._quota_for(uid)
            return (q.keys, q.bytes, *self._limits(uid))

    # --------------------------------------------------------- life and death

    def _create(self, ktype: T.KeyType, description: str, owner: Credentials, perm: int, payload: Any,
                quota_len: int, quota: str = IN_QUOTA) -> Key:
        """key_alloc: a new key owned by ``owner``, charged to its quota, linked nowhere yet."""
        key = Key(self._new_serial(), ktype, description, owner.uid, owner.gid, perm, payload, quota_len,
                  charged=quota != NOT_IN_QUOTA, ctime=self.clock())
        if key.charged:
            self._charge(key.uid, 1, key.cost, check=quota == IN_QUOTA)
        self._file(key)
        return key

    # The registry of every live key.  Finding one by name, and listing them in serial order, cost what
    # is found, not the number of keys in the daemon (any uid can ask, and root may hold a million).

    def _file(self, key: Key) -> None:
        self._keys[key.serial] = key
        order = self._serial_order
        if order is not None:  # a serial used again may still be there; the others wait to be merged
            at = bisect.bisect_left(order, key.serial)
            if at < len(order) and order[at] == key.serial:
                self._stale -= 1
            else:
                self._unsorted.add(key.serial)
        self._by_name.setdefault((key.type.name, key.description), {})[key.serial] = None
        if key.expiry or key.revoked_at is not None:  # (a restored key)
            self._mortal.add(key.serial)

    def _unfile(self, key: Key) -> None:
        if self._keys.pop(key.serial, None) is None:
            return
        if self._serial_order is not None:  # (a shift of the list each: a clear of many keys took seconds)
            if key.serial in self._unsorted:
                self._unsorted.discard(key.serial)
            else:
                self._stale += 1
        self._mortal.discard(key.serial)
        namesakes = self._by_name[key.type.name, key.description]
        namesakes.pop(key.serial, None)
        if not namesakes:
            del self._by_name[key.type.name, key.description]

    def _destroy(self, key: Key) -> None:
        """Drop a key nobody references any more: free its quota, wipe its payload.

        What dies with a keyring dies in a loop, not a recursion (a chain made top-down has no depth limit):
        a destruction begun during another is queued, and the outermost call works the queue off before it
        returns.
        """
        self._dying.append(key)
        if self._destroying:
            return
        self._destroying = True
        try:
            while self._dying:
                self._destroy_now(self._dying.pop())
        finally:
            self._destroying = False

    def _destroy_now(self, key: Key) -> None:
        if key.dead:
            return
        self._changed()
        key.dead = True
        self._unfile(key)
        if key.persisted:
            key.persisted = False
            self.journal.on_forget(key.serial)
        if key.links is not None:
            self._empty(key)
            anchor = key.restriction.key if key.restriction is not None else None
            if anchor is not None and not anchor.dead:  # the restriction lets go of what it trusted (its pin)
                anchor.pins -= 1
                self._maybe_destroy(anchor)
        if key.charged:
            self._charge(key.uid, -1, -key.cost, check=False)
        key.type.destroy(key.payload)
        key.payload, key.engines = None, None

    def _maybe_destroy(self, key: Key) -> None:
        if not key.parents and key.pins == 0:
            self._destroy(key)

    def _force_destroy(self, key: Key) -> None:
        """Destroy a key however it is held: unlinked everywhere, sessions and special roles dropped."""
        self._release_roots(key)
        key.pins = 0
        for parent in list(key.parents):
            self._unlink_raw(parent, key)
        self._destroy(key)

    def _release_roots(self, key: Key) -> None:
        persistent = self._persistent_keyrings.get(key.uid)
        bit = self._user_keyring_bit(key)
        if persistent is not None and persistent.in_user_keyrings & bit:
            persistent.in_user_keyrings &= ~bit  # a user keyring gone (invalidated, expired) takes its links
            self._journal(persistent)            # with it: its replacement starts empty, as the kernel's
        for table in (self._user_keyrings, self._user_session_keyrings, self._process_keyrings,
                      self._persistent_keyrings):
            for ident, ring in list(table.items()):
                if ring is key:
                    del table[ident]
        tokens = self._tokens_of_ring.get(key.serial)
        if tokens:
            self._changed()
            for token in list(tokens):
                self._forget_token(token)

    # ----------------------------------------------------------------- links

    def _link_raw(self, ring: Key, key: Key, check_quota: bool = True) -> None:
        """File ``key`` in ``ring``, displacing whatever had its type and description there."""
        old = ring.links.get(key.index)
        if old is key:
            return
        if old is None:
            self._reserve(ring, ring.quota_len + LINK_BYTES, check=check_quota)
        self._changed()
        ring.links[key.index] = key
        key.parents.add(ring)
        if ring.persisted:
            self._persist_tree(key)
            self.journal.on_link(ring, key)
        self._note_user_link(ring, key)
        if old is not None:
            self._drop_parent(old, ring)

    def _unlink_raw(self, ring: Key, key: Key) -> None:
        if ring.links.get(key.index) is key:
            self._changed()
            del ring.links[key.index]
            self._reserve(ring, ring.quota_len - LINK_BYTES)
            if ring.persisted:
                self.journal.on_unlink(ring, key)
            self._drop_parent(key, ring)

    def _empty(self, ring: Key) -> None:
        """keyring_clear: drop every link; keys left unreferenced die."""
        self._changed()
        children = list(ring.links.values())
        ring.links.clear()
        ring.held_back = ()
        self._reserve(ring, 0)
        if ring.persisted:
            self.journal.on_store(ring)
        for child in children:
            self._drop_parent(child, ring)

    def _drop_parent(self, child: Key, parent: Key) -> None:
        child.parents.discard(parent)
        self._note_user_link(parent, child)
        self._maybe_destroy(child)
        if child.persisted:
            self._recheck_persisted(child)

    def _note_user_link(self, ring: Key, key: Key) -> None:
        """A uid's persistent keyring linked into, or out of, one of its user keyrings (@u, @us: @s of a
        connection with no session): noted on it, and written, so that a restarted daemon links it there
        again as it makes them (``_install_user_keyrings``): its keys stay possessed, as they were."""
        if self._persistent_keyrings.get(key.uid) is not key or ring.uid != key.uid:
            return
        bit = self._user_keyring_bit(ring)
        held = key.in_user_keyrings | bit if ring in key.parents else key.in_user_keyrings & ~bit
        if held != key.in_user_keyrings:
            key.in_user_keyrings = held
            self._journal(key)

    def _user_keyring_bit(self, ring: Key) -> int:
        """USER_KEYRING or USER_SESSION_KEYRING if ``ring`` is its owner's user or user session keyring, else 0."""
        if ring is self._user_keyrings.get(ring.uid):
            return USER_KEYRING
        return USER_SESSION_KEYRING if ring is self._user_session_keyrings.get(ring.uid) else 0

    # ------------------------------------------------------------ persistence

    def _persist_tree(self, key: Key) -> None:
        """``key`` is now under a persistent keyring: it and everything below it persist.  (A loop, not a
        recursion: a chain made top-down has no depth limit.)"""
        todo = [key]
        while todo:
            key = todo.pop()
            if key.persisted:
                continue  # already persisting, and so is everything below it
            key.persisted = True
            self.journal.on_store(key)
            if key.links is not None:
                todo += key.links.values()

    def _recheck_persisted(self, key: Key) -> None:
        """A parent went away or stopped persisting: does ``key`` still hang under a persistent keyring?"""
        todo = [key]
        while todo:
            key = todo.pop()
            if self._persistent_keyrings.get(key.uid) is key or any(p.persisted for p in key.parents):
                continue
            key.persisted = False
            self.journal.on_forget(key.serial)
            if key.links is not None:
                todo += (child for child in key.links.values() if child.persisted)

    def _journal(self, key: Key) -> None:
        """A persistent key's metadata or payload changed."""
        if key.persisted:
            self.journal.on_store(key)

    def _detect_cycle(self, ring: Key, key: Key, any_depth: bool = False) -> None:
        """keyring_detect_cycle: would filing keyring ``key`` in ``ring`` make a loop, or nest too deep?

        Searches down from ``key`` for ``ring``, however deep, ignoring
        permissions and states, through links and the anchors of restrictions
        (``_holds``): EDEADLK if found (linking a keyring into itself
        included); else, unless ``any_depth``, ELOOP if ``key`` holds
        keyrings more than MAX_NESTING levels below it.  (The kernel reports
        whichever its walk meets first.)
        """
        if key is ring:
            raise E.EDEADLK("a keyring cannot be linked into itself")
        if _holds(key, ring):
            raise E.EDEADLK("link would create a cycle")
        if any_depth:
            return
        deepest: dict[int, int] = {}  # how deep is all that counts: a keyring reached again less deep is not
        too_deep = False

        def walk(current: Key, depth: int) -> None:
            nonlocal too_deep
            if current.defunct:
                return
            for sub in current.links.values():
                if sub.links is None:
                    continue
                if depth >= MAX_NESTING:
                    too_deep = True
                    return
                if deepest.get(sub.serial, -1) >= depth + 1:
                    continue
                deepest[sub.serial] = depth + 1
                walk(sub, depth + 1)

        walk(key, 0)
        if too_deep:
            raise E.ELOOP("keyrings nested too deeply")

    def _link_checked(self, ring: Key, key: Key, any_depth: bool = False) -> None:
        """key_link's checks, in its order, then the link.  A detached top (an import being built) is linked
        only where its import files it: elsewhere, a persistent keyring would keep it half built.
        ``any_depth``: a loop is still EDEADLK, but no depth is ELOOP."""
        if key.serial in self._detached:
            raise E.EBUSY(f"key {key.serial} is an import still being built")
        _require_keyring(ring)
        if ring.revoked:
            raise E.EKEYREVOKED(f"keyring {ring.serial} has been revoked")
        self._admit(ring, key.type, key.description, key.payload)
        self._check_nesting(ring, key, any_depth)
        self._link_raw(ring, key)

    def _check_nesting(self, ring: Key, key: Key, any_depth: bool = False) -> None:
        """Can ``key``, if a keyring, go under ``ring``?  No loop (EDEADLK), none nested too deep (ELOOP), and
        no restriction under a persistent keyring, which could not store it."""
        if key.links is None:
            return
        self._detect_cycle(ring, key, any_depth)
        if ring.persisted and self._holds_unstorable_restriction(key):
            raise E.EOPNOTSUPP("a keyring with a type restriction cannot go under a persistent keyring: "
                               "its restriction cannot be stored")

    @staticmethod
    def _holds_unstorable_restriction(key: Key) -> bool:
        """Does this keyring, or one below it, carry a restriction the journal cannot store (all but no-link)?"""
        stack, seen = [key], set()
        while stack:
            ring = stack.pop()
            if ring.serial in seen:
                continue
            seen.add(ring.serial)
            if ring.restriction is not None and not isinstance(ring.restriction, DenyAll):
                return True
            stack.extend(k for k in ring.links.values() if k.links is not None)
        return False

    def _admit(self, ring: Key, ktype: T.KeyType, description: str, payload: Any) -> None:
        """Could ``ring`` take a key like this?  Its owner's quota for a new link, its restriction, its size."""
        adds_link = ring.links.get((ktype.name, description)) is None
        if adds_link and ring.charged:
            self._check_quota(ring.uid, 0, LINK_BYTES)
        self._check_admission(ring, ktype, payload)
        if adds_link:
            self._check_room(ring)

    def _check_room(self, ring: Key) -> None:
        """keyring_max_links, which bounds the memory users' keyrings take; the daemon's own keyrings (the
        system keyrings: its CA bundle, its blacklist file) hold what root gives them."""
        if len(ring.links) >= self.config.keyring_max_links and not ring.keep:
            raise E.ENFILE(f"keyring {ring.serial} is full (keyring_max_links, {self.config.keyring_max_links})")

    def _check_admission(self, ring: Key, ktype: T.KeyType, payload: Any) -> None:
        """What every link runs (ADMISSION_CHECKS: the blacklist), then the keyring's own restriction."""
        for check in ADMISSION_CHECKS:
            check(self, ring, ktype, payload)
        if ring.restriction is not None:
            ring.restriction.check(self, ring, ktype, payload)

    # ------------------------------------------------------- special keyrings

    def _pinned_keyring(self, description: str, owner: Credentials, perm: int) -> Key:
        """A keyring the daemon holds itself: counted in its owner's quota but never refused for it."""
        ring = self._create(T.KEYRING, description, owner, perm, None, 0, quota=QUOTA_OVERRUN)
        ring.pins += 1
        return ring

    def _install_user_keyrings(self, uid: int) -> None:
        """look_up_user_keyrings: ``_uid.N`` and ``_uid_ses.N`` (which links it), made on first use."""
        owner = Credentials(uid, P.NO_GID)
        if uid not in self._user_keyrings:
            self._user_keyrings[uid] = self._pinned_keyring(f"_uid.{uid}", owner, P.DEFAULT_UID_KEYRING)
            session = self._user_session_keyrings.get(uid)
            if session is not None and not session.defunct:  # a replacement: possessed through @us as before
                self._link_raw(session, self._user_keyrings[uid], check_quota=False)
        if uid not in self._user_session_keyrings:
            ring = self._pinned_keyring(f"_uid_ses.{uid}", owner, P.DEFAULT_UID_KEYRING)
            self._link_raw(ring, self._user_keyrings[uid], check_quota=False)
            self._user_session_keyrings[uid] = ring
        persistent = self._persistent_keyrings.get(uid)
        if persistent is not None and persistent.in_user_keyrings and not persistent.defunct:
            # Where it was linked before a restart (_note_user_link): as the keyrings are made again.
            for bit, ring in ((USER_KEYRING, self._user_keyrings[uid]),
                              (USER_SESSION_KEYRING, self._user_session_keyrings[uid])):
                if persistent.in_user_keyrings & bit and ring not in persistent.parents:
                    self._link_raw(ring, persistent, check_quota=False)

    def _user_keyring(self, uid: int) -> Key:
        self._install_user_keyrings(uid)
        return self._user_keyrings[uid]

    def _user_session_keyring(self, uid: int, create: bool = True) -> Key | None:
        if create:
            self._install_user_keyrings(uid)
        return self._user_session_keyrings.get(uid)

    def _process_keyring(self, caller: Caller, create: bool) -> Key | None:
        """The process keyring of this process as these credentials: a process whose uid or gid changed
        (su, a service manager dropping privileges, a setuid program) gets a new one.  keyden cannot see
        the execve that usually comes with such a change, at which the kernel drops @p."""
        if caller.process is None:
            return None
        ident = (caller.process, caller.cred.uid, caller.cred.gid)
        ring = self._process_keyrings.get(ident)
        if ring is None and create:
            ring = self._pinned_keyring("_pid", caller.cred, P.DEFAULT_PROCESS_KEYRING)
            self._process_keyrings[ident] = ring
            notify = self.on_process_keyring  # read once: the server may unset it as it stops
            if notify is not None:
                notify(caller.process, caller.cred.uid)
        return ring

    def _session_keyring(self, caller: Caller, create: bool = True) -> Key | None:
        """The caller's session keyring: its token's, else (no token) the user session keyring.  None once
        the token's session has ended (the token given up, or the keyring invalidated): a connection keeps
        the session it was opened in, as a process keeps its credentials' session keyring, and is never
        quietly moved to one every session-less process of its uid possesses."""
        if not caller.session_token:
            return self._user_session_keyring(caller.uid, create)
        session = self._sessions.get(caller.session_token)
        if session is None or session.uid != caller.uid or session.keyring.dead:
            return None
        return session.keyring

    def _special(self, caller: Caller, key_id: int, create: bool) -> Key:
        """The keyring a special ID names.  ``create`` is for the process keyring alone: the user keyrings,
        and @us standing in for a missing session, are made on first use, as the kernel makes them."""
        if key_id in (THREAD, PROCESS):
            ring = self._process_keyring(caller, create)
            if ring is None:
                raise E.ENOKEY("this process has no process keyring")
            return ring
        if key_id == SESSION:
            ring = self._session_keyring(caller)
            if ring is None:
                raise E.ENOKEY("this connection's session has ended (its token was given up, or its keyring "
                               "invalidated): connect again without the token, or with another")
            if ring is self._user_session_keyrings.get(caller.uid):  # no session: @us stands in, found as @us is
                self._found_user_keyrings(caller)
            return ring
        if key_id in (USER, USER_SESSION):
            user, user_session = self._found_user_keyrings(caller)
            return user if key_id == USER else user_session
        if key_id in (REQKEY_AUTH, REQUESTOR):
            raise E.ENOKEY("no request-key authorisation key")
        raise E.EINVAL(f"unsupported special key id {key_id}")

    def _found_user_keyrings(self, caller: Caller) -> tuple[Key, Key]:
        """@u and @us as the kernel finds them (look_up_user_keyrings): by a search of its register, with
        possession.  A pair in which one is revoked, expired or grants no search is not found (ENOKEY): a
        lock its owner may set, and the way the kernel answered when tried."""
        now = self.clock()
        pair = self._user_keyring(caller.uid), self._user_session_keyring(caller.uid)
        for ring in pair:
            if ring.state_error(now) is not None or not self._rights(caller, ring, True) & P.SEARCH:
                raise E.ENOKEY(f"keyring {ring.serial} ({ring.description}) is revoked, expired or grants no "
                               "search: the user keyrings cannot be found")
        return pair

    def _possession_roots(self, caller: Caller) -> Iterator[Key]:
        """Where possession is searched from: the process keyring, then the session keyring (never created)."""
        for ring in (self._process_keyring(caller, create=False), self._session_keyring(caller, create=False)):
            if ring is not None:
                yield ring

    # ----------------------------------------------------- search & permission

    def _rights(self, caller: Caller, key: Key, possessed: bool) -> int:
        return P.effective(key.perm, key.uid, key.gid, caller.cred, possessed)

    def _search(self, caller: Caller, ring: Key, possessed: bool, match: _Match, *, check_state: bool = True,
                skip_expired: bool = False) -> tuple[Key | None, E.KeydenError | None]:
        """keyring_search_rcu: (found key, None), or (None, why the last candidate was passed over), or (None, None).

        The start keyring must grant search.  At each keyring its own keys
        are tried first, then the keyrings it holds that grant search, at most
        MAX_NESTING levels down; revoked keyrings are not entered.  A match
        must grant search itself.  ``possessed`` (the start keyring's) carries
        down the whole search.
        """
        if not self._rights(caller, ring, possessed) & P.SEARCH:
            return None, E.EACCES(f"keyring {ring.serial} does not grant search")
        now = self.clock()
        last_skip: list[E.KeydenError | None] = [None]

        def consider(key: Key) -> bool | None:
            """True: found; False: a candidate passed over (reason in last_skip); None: not a candidate."""
            if key.type is not match.ktype:
                return None
            if check_state:
                if key.defunct:
                    last_skip[0] = E.EKEYREVOKED()
                    return False
                if key.expired(now):
                    if not skip_expired:
                        last_skip[0] = E.EKEYEXPIRED()
                    return False
            if not match.matches(key):
                return None
            if not self._rights(caller, key, possessed) & P.SEARCH:
                last_skip[0] = E.EACCES(f"key {key.serial} does not grant search")
                return False
            return True

        if not match.direct or match.files_under(ring):
            verdict = consider(ring)
            if verdict is not None:
                return (ring, None) if verdict else (None, last_skip[0])

        for current in self._rings_searched(ring, lambda sub: self._rights(caller, sub, possessed) & P.SEARCH):
            for key in match.candidates(current):
                if consider(key):
                    return key, None
        return None, last_skip[0]

    def _rings_searched(self, ring: Key, enters: Callable[[Key], Any]) -> Iterator[Key]:
        """The keyrings a search from ``ring`` looks in, in order: each one's own keys are tried before the
        keyrings below it.  Revoked or invalidated keyrings are not entered, nor keyrings ``enters`` refuses
        (a search's: those that do not grant it search), nor any more than MAX_NESTING levels down; each is
        entered from its shallowest link."""
        seen: dict[int, int] = {}

        def walk(current: Key, depth: int) -> Iterator[Key]:
            if current.defunct:
                return
            yield current
            if depth >= MAX_NESTING:
                return
            for sub in list(current.links.values()):
                if sub.links is None or not enters(sub):
                    continue
                if seen.get(sub.serial, MAX_NESTING + 1) <= depth + 1:
                    continue  # already searched from at least this high up: nothing new below
                seen[sub.serial] = depth + 1
                yield from walk(sub, depth + 1)

        return walk(ring, 0)

    def _possessed_serials(self, caller: Caller, also: Key | None = None) -> set[int]:
        """Every key ``_is_possessed`` would find, from one walk of the caller's keyrings (a listing asks
        about every key: one search per key would cost the keys times the caller's keyrings); with ``also``
        (a key the caller possesses), what a search from it finds too."""
        found: set[int] = set()
        for root in (*self._possession_roots(caller), *((also,) if also is not None else ())):
            if not self._rights(caller, root, True) & P.SEARCH:
                continue
            found.add(root.serial)
            for ring in self._rings_searched(root, lambda sub: self._rights(caller, sub, True) & P.SEARCH):
                found.update(key.serial for key in ring.links.values() if self._rights(caller, key, True) & P.SEARCH)
        return found

    def _search_process_keyrings(self, caller: Caller, match: _Match, skip_expired: bool) -> Key:
        """search_cred_keyrings_rcu: ENOKEY if any keyring searched cleanly, else the last keyring's error."""
        searched_cleanly, error = False, None
        for root in self._possession_roots(caller):
            found, err = self._search(caller, root, True, match, skip_expired=skip_expired)
            if found is not None:
                return found
            if err is None:
                searched_cleanly = True
            else:
                error = err
        if searched_cleanly or error is None:
            raise E.ENOKEY(f"no {match.ktype.name} key {match.description!r} found")
        raise error

    def _changed(self) -> None:
        """Links, masks, owners or states changed: cached possession answers are stale."""
        self._generation += 1

    def _is_possessed(self, caller: Caller, key: Key) -> bool:
        """Reachable by search from the caller's process or session keyring, whatever its state."""
        memo_key = (caller, key.serial)
        hit = self._possession_memo.get(memo_key)
        if hit is not None and hit[0] == self._generation:
            return hit[1]
        match = _Match.identity(key)
        found = any(self._search(caller, root, True, match, check_state=False)[0] is not None
                    for root in self._possession_roots(caller))
        if len(self._possession_memo) >= 4096:
            self._possession_memo.clear()
        self._possession_memo[memo_key] = (self._generation, found)
        return found

    def _possessed(self, caller: Caller, key: Key, known: bool | None) -> bool:
        return known if known is not None else self._is_possessed(caller, key)

    def _permits(self, caller: Caller, key: Key, possessed: bool | None, need: int) -> bool:
        """key_task_permission; possession is only worked out if the other bits are not enough."""
        if self._rights(caller, key, False) & need == need:
            return True
        return self._possessed(caller, key, possessed) and self._rights(caller, key, True) & need == need

    def _require(self, caller: Caller, key: Key, possessed: bool | None, need: int) -> None:
        if not self._permits(caller, key, possessed, need):
            wanted = "/".join(name for bit, name in P.NAMES.items() if need & bit)
            raise E.EACCES(f"key {key.serial} does not grant {wanted}")

    def _lookup(self, caller: Caller, key_id: int, need: int = 0, *, create: bool = False,
                check_state: bool = True) -> tuple[Key, bool | None]:
        """lookup_user_key: resolve an ID, validate its state, check ``need``.

        Returns (key, possessed); possessed is True for special IDs, and None
        for serials whose possession did not need working out.
        """
        if not isinstance(key_id, int):
            raise E.EINVAL("key IDs are integers")
        if key_id < 0:
            key, possessed = self._special(caller, key_id, create), True
        elif key_id == 0:
            raise E.EINVAL("key ID 0 names no key")
        else:
            key, possessed = self._keys.get(key_id), None
            if key is None:
                raise E.ENOKEY(f"no key with serial {key_id}")
        if check_state:
            err = key.state_error(self.clock())
            if err is not None:
                raise err
        if need:
            self._require(caller, key, possessed, need)
        return key, possessed

    def slow_asymmetric(self, serial: int) -> bool:
        """Does this serial name a key whose operations are slow (ParsedKey.slow)?  A scheduling hint:
        no checks, no errors."""
        key = self._keys.get(serial)
        return key is not None and getattr(key.payload, "slow", False)

    def session_serial(self, caller: Caller) -> int:
        """The keyring @s names for this caller, without a permission check (WHOAMI tells the caller who it
        is, even with its session keyring's search bit cleared); 0 if it cannot be found (@us standing in
        for a missing session, when it or @u is revoked, expired or grants no search)."""
        with self.lock:
            try:
                return self._special(caller, SESSION, False).serial
            except E.KeydenError:
                return 0

    def resolve(self, caller: Caller, key_id: int, create: bool = False) -> int:
        """KEYCTL_GET_KEYRING_ID: what serial an ID names (search permission required)."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SEARCH, create=create)
            return key.serial

    # ------------------------------------------------------- adding & update

    def add(self, caller: Caller, type_name: str, description: str, payload: bytes, keyring: int,
            secret: bytes | None = None, perm: int | None = None, flags: int = 0) -> int:
        """add_key(2): create, or update in place when the type allows, and link.

        ``flags`` (NO_EXPORT; an asymmetric key's uses) are set on the key for good, on an update too.
        """
        if flags & ~KEY_FLAGS:
            raise E.EINVAL("unknown key flags")
        if len(payload) > T.MAX_ADD_PAYLOAD:
            raise E.EINVAL("payload too large")
        T.check_type_name(type_name)
        T.check_description_size(description)
        if type_name == "keyring" and description.startswith("."):
            raise E.EPERM("keyring names beginning with '.' are reserved")
        with self.lock:  # fail fast, before parsing anything
            ring, _ = self._lookup(caller, keyring, P.WRITE, create=True)
            ktype = T.lookup(type_name)  # as key_create_or_update: an unknown type before a non-keyring
            check_flags(ktype, flags)
            _require_keyring(ring)
        value, quota_len = ktype.preparse(payload, secret)  # may be slow (asymmetric): outside the lock
        try:
            with self.lock:
                ring, ring_possessed = self._target_keyring(caller, keyring)
                description = description or ktype.default_description(value)
                if not description:
                    raise E.EINVAL("a description is required")
                existing = ring.links.get((ktype.name, description))
                if existing is not None and existing.keep and ring.keep:
                    _refuse_kept(existing)  # kept in kept is never unlinked: EPERM, as blacklist_key_update answers
                self._admit(ring, ktype, description, value)
                if existing is not None and ktype.updatable and not existing.defunct:
                    # find_key_to_update: the key counts as possessed if the keyring is.
                    self._require(caller, existing, self._possessed(caller, ring, ring_possessed), P.WRITE)
                    self._replace_payload(existing, value, quota_len)
                    value = None
                    existing.flags |= flags  # after: a refused update (EDQUOT) changes nothing
                    return existing.serial
                key = self._add_new(caller, ktype, description, value, quota_len, ring, perm, flags)
                value = None
                return key.serial
        finally:
            if value is not None:
                ktype.destroy(value)

    def _add_new(self, caller: Caller, ktype: T.KeyType, description: str, value: Any, quota_len: int,
                 ring: Key, perm: int | None, flags: int = 0, timeout: int = 0) -> Key:
        """key_alloc and link, once ``_admit`` has passed: displaces any key with this type and description."""
        ktype.check_description(description)
        ktype.check_uses(value, uses_of(flags & ASYMMETRIC_USE_FLAGS))
        key = self._create(ktype, description, caller.cred, ktype.default_perm if perm is None else perm,
                           value, quota_len)
        key.flags = flags
        if timeout:
            self._expire_at(key, self.clock() + timeout)
        try:
            self._link_raw(ring, key)  # no cycle check: a new key holds no keyrings
        except BaseException:  # the link's bytes may not fit once the key itself is charged
            self._destroy(key)
            raise
        return key

    def _target_keyring(self, caller: Caller, keyring: int) -> tuple[Key, bool | None]:
        """The keyring a new key goes into: write permission, and it must be a keyring."""
        ring, possessed = self._lookup(caller, keyring, P.WRITE, create=True)
        _require_keyring(ring)
        return ring, possessed

    def create_internal(self, caller: Caller, ktype: T.KeyType, description: str, value: Any, quota_len: int,
                        keyring: int, perm: int | None = None, flags: int = 0, timeout: int = 0,
                        unique_prefix: str = "") -> int:
        """Add a key whose payload the daemon made itself (generated, derived, imported): never an update,
        and never in a namesake's place (EEXIST, checked under the same lock as the filing).

        Unlike add_key's payload, this one exists nowhere else: the key it would displace may be the only
        copy of a non-exportable key, destroyed for good.  Its permissions and timeout are the key's from
        the start (no setattr needed, no moment with others): a request that fails leaves nothing behind.
        With no description and a ``unique_prefix``, the key is named ``<prefix><8 hex>``, never a name the
        keyring already files.
        """
        try:
            _check_new_key(ktype, perm, flags, timeout)
            with self.lock:
                ring, _ = self._target_keyring(caller, keyring)
                if not description and unique_prefix:
                    description = _unused_name(ring, ktype.name, unique_prefix)
                description = description or ktype.default_description(value)
                T.check_description_size(description)
                _refuse_namesake(ring, ktype, description, self.clock())
                self._admit(ring, ktype, description, value)
                key = self._add_new(caller, ktype, description, value, quota_len, ring, perm, flags, timeout)
                value = None
                return key.serial
        finally:
            if value is not None:
                ktype.destroy(value)

    def create_detached(self, caller: Caller, ktype: T.KeyType, description: str, value: Any, quota_len: int,
                        keyring: int, perm: int, flags: int = 0, filed: bool = True) -> int:
        """The top of a tree the daemon builds (an import): made as ``create_internal`` would, filed nowhere.

        The daemon holds it until ``attach`` files it in ``keyring`` (or
        ``attach_members`` files its members there) or ``discard_detached``
        drops it.  Nothing below a detached key persists, so a crash while
        the tree is built leaves none of it on disk, and the tree reaches a
        persistent keyring whole, in one step.  ``keyring`` is checked now
        (write permission; if the top itself is to be ``filed`` there, a
        namesake and the keyring's restriction) so a refusal comes before
        the work; ``attach`` and ``attach_members`` check again.  A top not
        to be filed is charged to no quota: its members are.
        """
        try:
            _check_new_key(ktype, perm, flags, 0)
            description = description or ktype.default_description(value)  # as create_internal names it
            T.check_description_size(description)
            ktype.check_description(description)
            ktype.check_uses(value, uses_of(flags & ASYMMETRIC_USE_FLAGS))
            with self.lock:
                ring, _ = self._target_keyring(caller, keyring)
                if filed:
                    _refuse_namesake(ring, ktype, description, self.clock())
                    self._admit(ring, ktype, description, value)
                # A top never filed only carries its members for the request: charging it (and its links'
                # bytes) would refuse an import that ends exactly at the quota.
                key = self._create(ktype, description, caller.cred, perm, value, quota_len,
                                   IN_QUOTA if filed else NOT_IN_QUOTA)
                value = None
                key.flags = flags
                key.pins += 1
                self._detached[key.serial] = key
                return key.serial
        finally:
            if value is not None:
                ktype.destroy(value)

    def attach(self, caller: Caller, key_id: int, keyring: int, perm: int) -> None:
        """File a detached key (``create_detached``) in ``keyring`` with its final ``perm``: EEXIST rather
        than displace a namesake.  The link, and so the whole tree's first journal record, is one step."""
        P.check_mask(perm)
        with self.lock:
            key = self._detached.get(key_id)
            if key is None or key.uid != caller.uid or not key.charged:  # (uncharged: made to carry members)
                raise E.ENOKEY(f"no detached key with serial {key_id}")
            self._still_whole(key)
            ring, _ = self._target_keyring(caller, keyring)
            _refuse_namesake(ring, key.type, key.description, self.clock())
            key.perm = perm
            del self._detached[key_id]  # first: _link_checked links no detached key
            try:
                self._link_checked(ring, key)
            except BaseException:
                self._detached[key_id] = key
                raise
            key.pins -= 1

    def attach_members(self, caller: Caller, key_id: int, keyring: int) -> int:
        """File a detached keyring's members in ``keyring`` instead of the keyring itself (an import of a
        keyring's contents, as for a machine move), then discard it: all under the lock, so the journal
        records every link or none, and EEXIST rather than displace a namesake.  Returns ``keyring``'s
        serial."""
        with self.lock:
            top = self._detached.get(key_id)
            if top is None or top.uid != caller.uid or top.links is None:
                raise E.ENOKEY(f"no detached keyring with serial {key_id}")
            self._still_whole(top)
            ring, _ = self._target_keyring(caller, keyring)
            members = list(top.links.values())
            now = self.clock()
            for member in members:
                _refuse_namesake(ring, member.type, member.description, now)
            linked: list[Key] = []
            try:
                for member in members:
                    self._link_checked(ring, member)
                    linked.append(member)
            except BaseException:
                for member in linked:  # before the lock is let go: no journal record sees half of them
                    self._unlink_raw(ring, member)
                raise
            self.discard_detached(key_id)
            return ring.serial

    def _still_whole(self, top: Key) -> None:
        """A detached top that another request of its owner's (which may see it in a listing) revoked, let
        expire or destroyed while its tree was built is not filed: the import fails rather than report keys
        it did not bring."""
        if top.dead:
            raise E.ENOKEY(f"key {top.serial} was destroyed while the import was built")
        err = top.state_error(self.clock())
        if err is not None:
            raise err

    def discard_detached(self, key_id: int) -> None:
        """A detached key's tree was not finished: destroy it, and every key only it held."""
        with self.lock:
            key = self._detached.pop(key_id, None)
            if key is not None:
                self._changed()
                key.invalidated = True
                self._force_destroy(key)

    def add_system_key(self, ktype: T.KeyType, description: str, value: Any, quota_len: int, perm: int,
                       keyring: Key | None = None) -> Key:
        """A key the daemon owns itself: uid 0, outside every quota, KEY_FLAG_KEEP (the kernel's system keys).

        Without ``keyring`` it is pinned for the daemon's life (a system
        keyring); with one it is admitted as any link is (restriction and
        admission checks, no permissions) and filed there.
        """
        with self.lock:
            if keyring is not None:
                self._admit(keyring, ktype, description, value)
            key = self._create(ktype, description, Credentials(0, 0), perm, value, quota_len, quota=NOT_IN_QUOTA)
            key.keep = True
            if keyring is None:
                key.pins += 1
            else:
                self._link_raw(keyring, key)
            return key

    def link_system(self, keyring: Key, key: Key) -> None:
        """key_link as the daemon itself: every check of a link but the caller's permissions."""
        with self.lock:
            self._link_checked(keyring, key)

    def _replace_payload(self, key: Key, value: Any, quota_len: int) -> None:
        """The type's update: new payload, new quota, and (user_update) any timeout cleared."""
        self._reserve(key, quota_len)
        old, key.payload, key.engines = key.payload, value, None
        self._changed()
        key.expiry = 0.0
        key.type.destroy(old)
        self._journal(key)

    def update(self, caller: Caller, key_id: int, payload: bytes) -> None:
        """KEYCTL_UPDATE: replace an updatable key's payload (at most a page of it)."""
        if len(payload) > T.MAX_UPDATE_PAYLOAD:
            raise E.EINVAL(f"keyctl update takes at most {T.MAX_UPDATE_PAYLOAD} bytes")
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.WRITE)
        if not key.type.updatable:
            raise E.EOPNOTSUPP(f"keys of type {key.type.name!r} cannot be updated")
        value, quota_len = key.type.preparse(payload)
        try:
            with self.lock:
                again, _ = self._lookup(caller, key_id, P.WRITE)
                if again is not key:
                    raise E.ENOKEY(f"key {key_id} was destroyed during the update")
                self._replace_payload(key, value, quota_len)
                value = None
        finally:
            if value is not None:
                key.type.destroy(value)

    # ------------------------------------------------------ finding keys

    def request(self, caller: Caller, type_name: str, description: str, dest: int = 0) -> int:
        """request_key(2) without an upcall: search the caller's keyrings; ENOKEY if absent."""
        T.check_type_name(type_name)
        T.check_description_size(description)
        with self.lock:
            dest_ring = self._lookup(caller, dest, P.WRITE, create=True)[0] if dest else None
            ktype = T.lookup(type_name, missing=E.ENOKEY)
            key = self._search_process_keyrings(caller, _Match.search(ktype, description), skip_expired=True)
            if dest_ring is not None:
                self._require(caller, key, True, P.LINK)
                self._link_checked(dest_ring, key)
            return key.serial

    def search(self, caller: Caller, keyring: int, type_name: str, description: str, dest: int = 0) -> int:
        """KEYCTL_SEARCH: search one keyring tree; the result is possessed only if the start keyring is."""
        T.check_type_name(type_name)
        T.check_description_size(description)
        with self.lock:
            ring, possessed = self._lookup(caller, keyring, P.SEARCH)
            possessed = self._possessed(caller, ring, possessed)
            dest_ring = self._lookup(caller, dest, P.WRITE, create=True)[0] if dest else None
            ktype = T.lookup(type_name, missing=E.ENOKEY)
            match = _Match.search(ktype, description)
            _require_keyring(ring)
            found, err = self._search(caller, ring, possessed, match)
            if found is None:
                raise err or E.ENOKEY(f"no {ktype.name} key {description!r} found")
            if dest_ring is not None:
                self._require(caller, found, possessed, P.LINK)
                self._link_checked(dest_ring, found)
            return found.serial

    def searchable(self, caller: Caller, keyring: int, ktype: T.KeyType) -> list[Key]:
        """Every live key of ``ktype`` a KEYCTL_SEARCH from ``keyring`` could find, or the caller could use by
        serial, in search order (a search stops at the first, a trust keyring vouches with them all).  A
        possessed start keyring makes what is below it possessed."""
        with self.lock:
            ring, possessed = self._lookup(caller, keyring, P.SEARCH)
            possessed = self._possessed(caller, ring, possessed)
            _require_keyring(ring)

            def grants(key: Key) -> bool:  # search, in this search or by the caller's own possession
                return bool(self._rights(caller, key, possessed) & P.SEARCH) or self._permits(caller, key, None,
                                                                                               P.SEARCH)
            return self._live_below(ring, ktype, grants)

    def held(self, ring: Key, ktype: T.KeyType) -> list[Key]:
        """Every live key of ``ktype`` in a live ``ring`` and the live keyrings below it, whoever may search
        them (a restriction's check, as the kernel's restrict_link_by_signature); in search order."""
        with self.lock:
            return self._live_below(ring, ktype, lambda key: True)

    def _live_below(self, ring: Key, ktype: T.KeyType, takes: Callable[[Key], bool]) -> list[Key]:
        """The live keys of ``ktype`` a walk from a live ``ring`` finds (``_rings_searched``), entering and
        taking only live ones that ``takes``, each once."""
        now = self.clock()

        def live(key: Key) -> bool:
            return not key.dead and key.state_error(now) is None and takes(key)
        found: dict[int, Key] = {}
        if live(ring):
            for current in self._rings_searched(ring, live):
                for key in list(current.links.values()):
                    if key.type is ktype and live(key):
                        found.setdefault(key.serial, key)
        return list(found.values())

    def find(self, caller: Caller, type_name: str, description: str) -> int:
        """keyutils' find_key_by_type_and_desc: request_key, else the first key it may view (/proc/keys order)."""
        T.check_type_name(type_name)
        T.check_description_size(description)
        ktype = T.lookup(type_name, missing=E.ENOKEY)
        with self.lock:
            try:
                return self._search_process_keyrings(caller, _Match.search(ktype, description), True).serial
            except E.KeydenError as exc:
                error = exc
            now = self.clock()
            for serial in sorted(self._by_name.get((ktype.name, description), ())):  # /proc/keys order
                key = self._keys[serial]  # keyutils skips a key its describe fails on: revoked, expired
                if key.state_error(now) is None and self._permits(caller, key, None, P.VIEW):
                    return key.serial
            raise error

    def keys(self, caller: Caller, after: int = 0, limit: int = 1024, scan: int = 2048) -> tuple[list[KeyStatus], int]:
        """The /proc/keys view, a page at a time: the keys the caller may view (possession counts), revoked and
        expired ones too, in serial order from the first serial above ``after``.  At most ``limit`` keys, and
        at most ``scan`` serials looked at (the store is locked meanwhile: 8192 held the loop 4.5 ms, more than
        a uid's share of a round; a fairness hunt); with them, the serial to go on after, 0 once every key
        has been looked at."""
        if limit < 1 or scan < 1:
            raise E.EINVAL("a page holds at least one key")
        with self.lock:
            now = self.clock()
            possessed = self._possessed_serials(caller)
            serials = self._serials_in_order()
            start = bisect.bisect_right(serials, after)
            end = min(len(serials), start + scan)
            found: list[KeyStatus] = []
            for at in range(start, end):
                key = self._keys.get(serials[at])
                if key is not None and self._permits(caller, key, key.serial in possessed, P.VIEW):
                    found.append(self._status(key, now))
                    if len(found) == limit:
                        end = at + 1
                        break
            return found, serials[end - 1] if end < len(serials) else 0

    def _serials_in_order(self) -> list[int]:
        """Every live serial, in order, and some of keys gone (callers skip those): one merge of what was
        filed since the last use (sorting a sorted list and a few more is linear), not a sort of all."""
        order = self._serial_order
        if order is None or self._stale > len(order) // 2:
            order, self._stale = sorted(self._keys), 0
            self._unsorted.clear()
        elif self._unsorted:
            order = sorted(order + list(self._unsorted))
            self._unsorted.clear()
        self._serial_order = order
        return order

    def _status(self, key: Key, now: float) -> KeyStatus:
        if key.links is not None:  # keyring_describe
            summary = str(len(key.links)) if key.links else "empty"
        else:
            summary = key.type.summary(key.payload, key.quota_len)
            if key.flags & BINDING_FLAGS:  # keyden's: what a key is bound to, which nothing else shows
                summary = f"{summary} for {','.join(uses_of(key.flags))}"
        return KeyStatus(key.serial, key.type.name, key.uid, key.gid, key.perm, key.revoked, key.charged,
                         key.expired(now), bool(key.flags & NO_EXPORT), len(key.parents) + key.pins, key.expiry,
                         key.description, summary)

    # ------------------------------------------------------------- linking

    def link(self, caller: Caller, key_id: int, keyring: int) -> None:
        """KEYCTL_LINK: file a key in a keyring, displacing one with the same type and description."""
        with self.lock:
            ring, _ = self._lookup(caller, keyring, P.WRITE, create=True)
            key, _ = self._lookup(caller, key_id, P.LINK, create=True)
            self._link_checked(ring, key)

    def unlink(self, caller: Caller, key_id: int, keyring: int) -> None:
        """KEYCTL_UNLINK: needs write on the keyring only; works on revoked and expired keys too."""
        with self.lock:
            ring, _ = self._lookup(caller, keyring, P.WRITE)
            key, _ = self._lookup(caller, key_id, check_state=False)
            _require_keyring(ring)
            if ring.links.get(key.index) is not key:
                raise E.ENOENT(f"key {key.serial} is not linked into keyring {ring.serial}")
            if ring.keep:
                _refuse_kept(key)
            self._unlink_raw(ring, key)

    def move(self, caller: Caller, key_id: int, from_ring: int, to_ring: int, exclusive: bool = True) -> None:
        """KEYCTL_MOVE: unlink from one keyring and link into another in one step."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.LINK, create=True)
            src, _ = self._lookup(caller, from_ring, P.WRITE)
            dst, _ = self._lookup(caller, to_ring, P.WRITE, create=True)
            if src is dst:
                return
            if src.links is None or dst.links is None:
                raise E.ENOTDIR("both ends of a move must be keyrings")
            if src.links.get(key.index) is not key:
                raise E.ENOENT(f"key {key.serial} is not linked into keyring {src.serial}")
            if src.keep:
                _refuse_kept(key)
            if dst.revoked:
                raise E.EKEYREVOKED(f"keyring {dst.serial} has been revoked")
            displaces = key.index in dst.links
            if not displaces and dst.charged:
                self._check_quota(dst.uid, 0, LINK_BYTES)
            if displaces and exclusive:
                raise E.EEXIST(f"keyring {dst.serial} already holds a key of type {key.type.name} described "
                               f"{key.description!r}")
            if not displaces:
                self._check_room(dst)
            self._check_admission(dst, key.type, key.payload)
            self._check_nesting(dst, key)
            key.pins += 1  # keep it alive between unlink and link
            try:
                self._unlink_raw(src, key)
                self._link_raw(dst, key)
            finally:
                key.pins -= 1

    def clear(self, caller: Caller, keyring: int) -> None:
        with self.lock:
            ring, _ = self._target_keyring(caller, keyring)
            _refuse_kept(ring)
            self._empty(ring)

    # ------------------------------------------------------------ key state

    def revoke(self, caller: Caller, key_id: int) -> None:
        """KEYCTL_REVOKE: write or setattr; a keyring is emptied, a user key's payload freed at once."""
        with self.lock:
            try:
                key, _ = self._lookup(caller, key_id, P.WRITE)
            except E.EACCES:
                key, _ = self._lookup(caller, key_id, P.SETATTR)
            _refuse_kept(key)
            self._changed()
            key.revoked_at = self.clock()
            self._mortal.add(key.serial)
            if key.links is not None:
                self._empty(key)
            elif key.type.revoke_discards_payload:
                key.type.destroy(key.payload)
                key.payload, key.engines = None, None
                self._reserve(key, 0)
            self._journal(key)

    def invalidate(self, caller: Caller, key_id: int) -> None:
        """KEYCTL_INVALIDATE: search permission; the key is gone from every keyring at once."""
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SEARCH)
            _refuse_kept(key)
            self._changed()
            key.invalidated = True
            self._force_destroy(key)

    def set_timeout(self, caller: Caller, key_id: int, timeout: int) -> None:
        """KEYCTL_SET_TIMEOUT: expire ``timeout`` seconds from now; 0 clears the timeout."""
        if timeout < 0:
            raise E.EINVAL("timeout must not be negative")
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR, create=True)
            _refuse_kept(key)
            self._changed()
            self._expire_at(key, self.clock() + timeout if timeout else 0.0)
            self._journal(key)

    # ------------------------------------------------------------ attributes

    def read(self, caller: Caller, key_id: int) -> bytes | list[int]:
        """keyctl_read: payload bytes, or a keyring's serials.

        Possession alone suffices (the kernel's "searchable from this
        process's keyrings" rule); state is checked last, so a revoked key
        the caller may not read is EACCES, not EKEYREVOKED.
        """
        with self.lock:
            try:
                key, possessed = self._lookup(caller, key_id, check_state=False)
            except E.KeydenError as exc:
                raise E.ENOKEY(f"cannot look up key {key_id}: {exc.message}") from None
            if not self._permits(caller, key, possessed, P.READ) and not self._possessed(caller, key, possessed):
                raise E.EACCES(f"permission denied reading key {key.serial}")
            if key.links is None and not key.type.readable:
                raise E.EOPNOTSUPP(f"keys of type {key.type.name!r} cannot be read")
            err = key.state_error(self.clock())
            if err is not None:
                raise err
            if key.links is not None:
                return [k.serial for k in key.links.values()]
            return key.type.read(key.payload)

    def read_for_computation(self, caller: Caller, key_id: int) -> bytes:
        """A user key's bytes, for an operation that returns a value computed from them (keyctl_dh_compute).

        As the kernel's lookup_user_key(KEY_NEED_READ): read permission
        itself (possession adds the possessor bits, but is no substitute,
        unlike keyctl_read), and any failure to look it up so is ENOKEY
        (the message says why); a key of another type is EOPNOTSUPP.
        """
        with self.lock:
            try:
                key, _ = self._lookup(caller, key_id, P.READ)
            except E.KeydenError as exc:
                raise E.ENOKEY(f"cannot read key {key_id}: {exc.message}") from None
            if key.type.name != "user":
                raise E.EOPNOTSUPP(f"key {key.serial} is of type {key.type.name}, not a user key")
            return key.type.read(key.payload)

    def describe(self, caller: Caller, key_id: int) -> Description:
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.VIEW)
            return Description(key.serial, key.type.name, key.uid, key.gid, key.perm, key.description)

    def chown(self, caller: Caller, key_id: int, uid: int, gid: int) -> None:
        """KEYCTL_CHOWN: -1 leaves a field alone.

        Needs setattr.  Only root gives a key to another uid (the quota moves
        with it) or to a group the caller is not in.
        """
        uid, gid = _id_arg(uid, "uid"), _id_arg(gid, "gid")
        if uid == -1 and gid == -1:
            return
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR, create=True)
            gives_away = uid != -1 and uid != key.uid
            foreign_group = gid != -1 and gid != key.gid and not caller.cred.in_group(gid)
            if (gives_away or foreign_group) and caller.uid != 0:
                raise E.EACCES("only root may give a key to another user or to a group it is not in")
            self._changed()
            if gives_away:
                if key.charged:
                    self._charge(uid, 1, key.cost)
                    self._charge(key.uid, -1, -key.cost, check=False)
                key.uid = uid
            if gid != -1:
                key.gid = gid
            self._journal(key)

    def setperm(self, caller: Caller, key_id: int, perm: int) -> None:
        """KEYCTL_SETPERM: needs setattr, and ownership unless the caller is root."""
        P.check_mask(perm)
        with self.lock:
            key, _ = self._lookup(caller, key_id, P.SETATTR, create=True)
            if key.uid != caller.uid and caller.uid != 0:
                raise E.EACCES("only the owner may change a key's permissions")
            self._changed()
            key.perm = perm
            self._journal(key)

    def restrict_keyring(self, caller: Caller, keyring: int, type_name: str = "", restriction: str = "") -> None:
        """KEYCTL_RESTRICT_KEYRING: no type refuses all further links; a type names its own rule."""
        with self.lock:
            ring, _ = self._lookup(caller, keyring, P.SETATTR)
            if bool(type_name) != bool(restriction):
                raise E.EINVAL("a key type and a restriction go together")
            if type_name:
                T.check_type_name(type_name)
            _require_keyring(ring)
            if not type_name:
                rule: Restriction = DenyAll()
            else:
                T.lookup(type_name, missing=E.ENOKEY)
                factory = RESTRICTION_FACTORIES.get(type_name)
                if factory is None:
                    raise E.ENOENT(f"keys of type {type_name!r} offer no restrictions")
                rule = factory(self, caller, restriction)
            if ring.restriction is not None:
                raise E.EEXIST(f"keyring {ring.serial} is already restricted")
            anchor = rule.key
            if anchor is ring or anchor is not None and anchor.links is not None and _holds(anchor, ring):
                raise E.EDEADLK("the restriction would trust the keyring it restricts, or a keyring holding it "
                                "(a loop of holds that nothing could ever free)")
            if ring.persisted and not isinstance(rule, DenyAll):
                raise E.EOPNOTSUPP("a persistent keyring takes only the no-link restriction: "
                                   "type restrictions cannot be stored")
            ring.restriction = rule
            if anchor is not None:
                anchor.pins += 1  # held until the ring dies (_destroy_now), however it is unlinked
            self._journal(ring)

    # -------------------------------------------------------------- sessions

    def join_session(self, caller: Caller, name: str | None = None) -> tuple[int, str]:
        """KEYCTL_JOIN_SESSION_KEYRING: a new (or the named) session keyring and a token for it.

        Like the kernel's find_keyring_by_name, a name joins the oldest live
        keyring of that name that grants the caller search without
        possession (the default 0x3f130000 does not, not even to its owner);
        otherwise a new keyring of that name is made.  The token is how a
        process carries its session (KEYDEN_SESSION): only its uid may use it.
        """
        if name:
            T.check_description_size(name)  # strndup_user(name, KEY_MAX_DESC_SIZE), as the kernel
        if name and name.startswith("."):
            raise E.EPERM("keyring names starting with '.' are reserved")  # as the kernel (CVE-2016-9604)
        with self.lock:
            # A token outlives its connection, and joining a named keyring makes no key: without a bound of
            # its own, one uid could hold millions.  It may hold as many as it may hold keys.
            if len(self._tokens_of_uid.get(caller.uid, ())) >= self._limits(caller.uid)[0]:
                raise E.EDQUOT(f"uid {caller.uid} holds as many session tokens as it may hold keys; "
                               "leave or end sessions it no longer uses (keyden sessions)")
            ring = self._keyring_by_name(caller, name) if name else None
            if ring is None:
                # In quota, always: a session outlives the connection that made it (unlike a process's),
                # so the kernel's one over-quota session per process would be no bound here.
                ring = self._create(T.KEYRING, name or "_ses", caller.cred,
                                    P.DEFAULT_SESSION_KEYRING if name else P.DEFAULT_ANON_SESSION_KEYRING, None, 0)
            ring.pins += 1
            token = secrets.token_urlsafe(32)
            self._changed()
            self._sessions[token] = _Session(ring, caller.uid, name)
            self._tokens_of_ring.setdefault(ring.serial, set()).add(token)
            self._tokens_of_uid.setdefault(caller.uid, set()).add(token)
            return ring.serial, token

    def _forget_token(self, token: str) -> _Session:
        session = self._sessions.pop(token)
        for index, key in ((self._tokens_of_ring, session.keyring.serial), (self._tokens_of_uid, session.uid)):
            tokens = index[key]
            tokens.discard(token)
            if not tokens:
                del index[key]
        return session

    def _keyring_by_name(self, caller: Caller, name: str) -> Key | None:
        if name.startswith("."):
            return None  # never published by name
        # The oldest first (in the order they were filed), as the kernel's list of named keyrings; from the
        # name index, not every key of every uid (a join by name was a walk through the whole store, on the loop).
        for serial in self._by_name.get((T.KEYRING.name, name), ()):
            key = self._keys[serial]
            if not key.defunct and self._rights(caller, key, False) & P.SEARCH:
                return key
        return None

    def leave_session(self, caller: Caller, token: str) -> None:
        """Drop a session token; the keyring lives on only if something else holds it."""
        with self.lock:
            session = self._sessions.get(token)
            if session is None or session.uid != caller.uid:
                raise E.ENOKEY("no such session")
            self._drop_tokens([token])

    def sessions(self, caller: Caller) -> list[tuple[int, str]]:
        """(serial, name) of each session keyring the caller's uid holds a token for, lost tokens included:
        how a user finds sessions whose tokens went with a shell or a killed program (see end_session)."""
        with self.lock:
            mine = (self._sessions[token] for token in self._tokens_of_uid.get(caller.uid, ()))
            found = {s.keyring.serial: s.keyring.description for s in mine if not s.keyring.dead}
            return sorted(found.items())

    def end_session(self, caller: Caller, keyring: int) -> None:
        """leave_session for every token of the caller's uid naming this session keyring: frees a session
        whose token is lost (the uid is the token's bound already: its processes may read each other's
        environment).  ENOKEY if the uid holds none for it.  ``@s`` (and other special IDs) name what they
        name for the caller, as everywhere."""
        with self.lock:
            if keyring < 0:
                keyring = self._special(caller, keyring, False).serial
            tokens = list(self._tokens_of_uid.get(caller.uid, set()) & self._tokens_of_ring.get(keyring, set()))
            if not tokens:
                raise E.ENOKEY(f"no session of yours has keyring {keyring}")
            self._drop_tokens(tokens)

    def _drop_tokens(self, tokens: list[str]) -> None:
        """Forget these session tokens; each keyring lives on only if something else holds it."""
        self._changed()
        for token in tokens:
            ring = self._forget_token(token).keyring
            ring.pins -= 1
            self._maybe_destroy(ring)

    def session_valid(self, token: str, uid: int) -> bool:
        with self.lock:
            s = self._sessions.get(token)
            return s is not None and s.uid == uid and not s.keyring.dead

    # ------------------------------------------------------ persistent keyrings

    def get_persistent(self, caller: Caller, uid: int, dest: int) -> int:
        """KEYCTL_GET_PERSISTENT: link a uid's persistent keyring into ``dest``; uid -1 is the caller's own.

        Another uid's needs root (the kernel's CAP_SETUID check).  Made on
        first use, owned by the uid, outside its quota; each call sets it to
        expire persistent_keyring_expiry seconds later (persistent.c).
        Whatever hangs under it persists through the journal.
        """
        uid = _id_arg(uid, "uid")
        if uid == -1:
            uid = caller.uid
        elif uid != caller.uid and caller.uid != 0:
            raise E.EPERM("only root may get another user's persistent keyring")
        with self.lock:
            dest_ring, _ = self._lookup(caller, dest, P.WRITE, create=True)
            _require_keyring(dest_ring)
            ring = self._persistent_keyring(uid)
            self._require(caller, ring, True, P.LINK)  # the register's reference counts as possessed
            # However deep its tree grew (a link checks only below what it files, so a chain made top-down
            # has no limit): the kernel's ELOOP here would lock its owner out of it, across restarts too.
            self._link_checked(dest_ring, ring, any_depth=True)
            self._changed()
            # Not written: every start sets it afresh (restore), so a full disk never costs a user their keys.
            self._expire_at(ring, self._persistent_deadline())
            return ring.serial

    def _persistent_deadline(self) -> float:
        """When a persistent keyring used now expires (0: never): persistent_keyring_expiry from now."""
        expiry = self.config.persistent_keyring_expiry
        return self.clock() + expiry if expiry else 0.0

    def _persistent_keyring(self, uid: int) -> Key:
        """key_get_persistent's register lookup: a revoked one is passed over and replaced, an expired one revived."""
        ring = self._persistent_keyrings.get(uid)
        if ring is not None and ring.defunct:
            del self._persistent_keyrings[uid]
            ring.pins -= 1
            self._maybe_destroy(ring)
            if ring.persisted:
                self._recheck_persisted(ring)
                self._journal(ring)  # still stored under another keyring: rewritten without the register's flag
            ring = None
        if ring is None:
            ring = self._create(T.KEYRING, f"_persistent.{uid}", Credentials(uid, P.NO_GID), PERSISTENT_KEYRING_PERM,
                                None, 0, quota=NOT_IN_QUOTA)
            ring.pins += 1
            self._persistent_keyrings[uid] = ring
            self._persist_tree(ring)
        return ring

    def is_persistent_keyring(self, key: Key) -> bool:
        with self.lock:
            return self._persistent_keyrings.get(key.uid) is key

    def restore(self, keys: Iterable[Key], links: Iterable[tuple[int, int]], roots: Iterable[int],
                unusable: Iterable[int] = (), adopt: bool = False
                ) -> tuple[list[int], list[tuple[Key, Key]], list[tuple[Key, list[Key]]]]:
        """Start-up: take back keys a backing store kept, with their serials, links and persistent keyrings.

        Permissions and quotas are not checked again (these keys were admitted
        once); usage is charged again.  A link that would loop is left out; one
        that nests deep is not: a link checks only what hangs below the keyring
        it files (as the kernel's), so a chain made top-down may go deeper than
        MAX_NESTING, and the rows come in serial order, not the order made.
        Keys that end up under no persistent keyring are dropped; their
        serials are returned for the caller to report.  Call before serving
        and before attaching the journal.

        A uid with two live persistent keyrings (a row restored from a backup
        after get_persistent made a new one) keeps the older as its persistent
        keyring, and the newer is linked into it as a keyring of its own, so
        neither's keys are dropped (a third into the second: they share a name,
        and a keyring holds one key of a name).  The pairs (holder, linked) are
        returned too, for the caller to write both rows once it can.

        The serials of dropped keys and of ``unusable`` records (ones the
        store could not open) are reserved: their records stay in the backing
        store, and a new key given one would overwrite that record, or meet it
        again at the next start.

        With ``adopt`` (an operator's choice for one start: `serve --adopt-orphans`), keys under no persistent
        keyring are not dropped but adopted (``_adopt_orphans``); the (keyring, keys filed in it) pairs are
        returned third, for the caller to write and report.
        """
        with self.lock:
            self._reserved.update(s for s in unusable if MIN_SERIAL <= s <= MAX_SERIAL)
            restored = self._file_restored(keys)
            self._link_restored(links)
            merged = self._take_persistent_roots(roots)
            for ring in self._persistent_keyrings.values():
                self._persist_tree(ring)
                if ring.revoked_at is None and not ring.invalidated:
                    # A start counts as a get_persistent: the time the daemon was down is nobody's
                    # inactivity, and the keys must not go before their owners can reach them again.  (What
                    # the store holds is never used: get_persistent does not write the expiry it sets.)
                    self._expire_at(ring, self._persistent_deadline())
                    if ring.in_user_keyrings:  # made now, which links it where it was: possession needs them
                        self._install_user_keyrings(ring.uid)
            adopted = self._adopt_orphans([key for key in restored if not key.persisted]) if adopt else []
            orphans = [key.serial for key in restored if not key.persisted]
            self._reserved.update(orphans)
            for serial in orphans:
                key = self._keys.get(serial)
                if key is not None:
                    self._force_destroy(key)
            return orphans, merged, adopted

    def _file_restored(self, keys: Iterable[Key]) -> list[Key]:
        """(restore) The keys filed under their own serials, in the order they were made (rows come in serial
        order, and serials are random): a join by name takes the oldest keyring of that name
        (_keyring_by_name)."""
        restored = []
        for key in sorted(keys, key=lambda key: (key.ctime, key.serial)):
            if key.serial in self._keys or not MIN_SERIAL <= key.serial <= MAX_SERIAL:
                raise E.EEXIST(f"serial {key.serial} is taken or out of range")
            self._file(key)
            restored.append(key)
            if key.charged:
                self._charge(key.uid, 1, key.cost, check=False)
        return restored

    def _link_restored(self, links: Iterable[tuple[int, int]]) -> None:
        """(restore) The links back, but one that would loop; one to a key whose record was skipped keeps its
        place."""
        for ring_serial, key_serial in links:
            ring, key = self._keys.get(ring_serial), self._keys.get(key_serial)
            if key is None and ring is not None and ring.links is not None and key_serial in self._reserved:
                ring.held_back += (key_serial,)
                continue
            if ring is None or key is None or ring.links is None or key.index in ring.links:
                continue
            if key.links is not None:
                try:
                    self._detect_cycle(ring, key, any_depth=True)
                except E.EDEADLK:  # a loop: not linked
                    continue
            self._link_raw(ring, key, check_quota=False)

    def _take_persistent_roots(self, roots: Iterable[int]) -> list[tuple[Key, Key]]:
        """(restore) Each uid's oldest live persistent keyring becomes its persistent keyring again; a newer
        one is linked into the end of the chain of those before it.  Returns the (holder, linked) pairs."""
        rings = [self._keys[s] for s in roots if s in self._keys and self._keys[s].links is not None]
        merged: list[tuple[Key, Key]] = []
        for ring in sorted(rings, key=lambda r: (r.defunct, r.ctime)):  # live, then oldest, first
            holder = self._persistent_keyrings.get(ring.uid)
            if holder is None:
                ring.pins += 1
                self._persistent_keyrings[ring.uid] = ring
                continue
            if ring.defunct:  # a revoked one replaced before a crash may still carry the flag: its tree goes
                continue
            # Down the chain of those linked in before (at this start or an earlier one; the restored links
            # have no loops), to its end.
            while (there := holder.links.get(ring.index)) is not None and there is not ring:
                holder = there
            if there is None:
                try:
                    self._detect_cycle(holder, ring, any_depth=True)
                except E.EDEADLK:  # it holds the one before it: left out, its keys reported as skipped
                    continue
                self._link_raw(holder, ring, check_quota=False)
            ring.expiry = 0.0  # get_persistent's deadline, stored with it: an ordinary keyring's now
            merged.append((holder, ring))
        return merged

    def _adopt_orphans(self, orphans: list[Key]) -> list[tuple[Key, list[Key]]]:
        """Each live orphan that no other orphan holds (every keyring that held it was skipped: damaged,
        rolled back) is filed, with what hangs below it, in a keyring RECOVERED_KEYRING in its owner's
        persistent keyring, made for the uid if it has none; a second of a name goes into "<name>.2", and so
        on (a keyring holds one key of a name).  Only for an operator who asks: the top's owner comes to
        possess it and what hangs below it, where before whoever reached the skipped keyring did.  Left out:
        a key whose owner's persistent keyring is revoked (replacing it here would rewrite rows before the
        journal is attached), and a keyring that holds that persistent keyring (filing it there would make
        a loop).  Returns (keyring, keys filed in it) pairs."""
        tops: dict[int, list[Key]] = {}
        for key in orphans:
            if not key.parents and not key.defunct:  # (an orphan's holders are orphans: else it would persist)
                tops.setdefault(key.uid, []).append(key)
        filed: dict[int, tuple[Key, list[Key]]] = {}  # recovered keyring's serial -> it, and what went in
        for uid, keys in tops.items():
            home = self._persistent_keyrings.get(uid)
            if home is not None and home.defunct:
                continue
            if home is None:
                home = self._persistent_keyring(uid)
                self._expire_at(home, self._persistent_deadline())  # as restore's own
            for key in keys:
                if key.links is not None and _holds(key, home):
                    continue
                ring = self._recovered_keyring(home, key)
                self._link_raw(ring, key, check_quota=False)
                filed.setdefault(ring.serial, (ring, []))[1].append(key)
        return list(filed.values())

    def _recovered_keyring(self, home: Key, key: Key) -> Key:
        """The first RECOVERED_KEYRING[.n] in ``home`` that is one keyden made and left as made (its owner's,
        held by ``home`` alone, its mask, no expiry, no restriction: nothing that would collect, share or
        refuse what goes in) with room for ``key``'s name and no loop through ``key``; made if need be."""
        for n in itertools.count(1):
            name = RECOVERED_KEYRING if n == 1 else f"{RECOVERED_KEYRING}.{n}"
            ring = home.links.get((T.KEYRING.name, name))
            if ring is None:
                ring = self._create(T.KEYRING, name, Credentials(home.uid, P.NO_GID), PERSISTENT_KEYRING_PERM, None,
                                    0, quota=NOT_IN_QUOTA)
                self._link_raw(home, ring, check_quota=False)
                return ring
            as_made = (ring.uid == home.uid and ring.parents == {home} and ring.perm == PERSISTENT_KEYRING_PERM
                       and not ring.expiry and ring.restriction is None and not ring.defunct)
            if as_made and key.index not in ring.links and not (key.links is not None and _holds(key, ring)):
                return ring
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ export

    def export_tree(self, caller: Caller, key_id: int) -> tuple[list["Exported"], list[tuple[int, int]]]:
        """A key, or a keyring and everything under it, copied out for wrapping (never for a reply).

        Returns the keys (the one asked for first) and the links between
        them as (keyring index, member index).  Every key needs read
        permission by its mask (possession counts, as a search finds it:
        from the caller's keyrings, or from the exported key down); the type's readability does not matter, since a
        wrapped export is how unreadable keys move.  A key marked NO_EXPORT
        anywhere in the tree refuses the whole export (EPERM), as does a
        revoked or expired one; to a caller who may view the key, before
        EACCES for a missing read right.  Each key's uses (BINDING_FLAGS) go
        with it: a copy that did anything would undo the binding.  A restricted
        keyring refuses it too (EOPNOTSUPP): a blob cannot carry a restriction.
        """
        with self.lock:
            top, possessed = self._lookup(caller, key_id)
            return _TreeExport(self, caller, top, self._possessed(caller, top, possessed)).run()

    # ----------------------------------------------------- keys used by serial

    def operand(self, caller: Caller, key_id: int, need: int = P.SEARCH) -> Key:
        """Look a key up for an in-daemon operation (pkey_*, ciphers): search permission suffices.

        The key is live: a user or logon payload is wiped in place when the
        key is updated, revoked or destroyed, so never read its payload
        outside the lock; ``material`` copies it safely.
        """
        with self.lock:
            key, _ = self._lookup(caller, key_id, need)
            return key

    def shows_persisted(self, key_id: int) -> bool:
        """Could a request that used ``key_id`` have shown a change to a persistent keyring (one the disk may
        not have yet)?  Yes for a key in one, for a key a change of which is still to be written (an unlink
        from one, which clears ``persisted`` at once, or what came before it), for a key
        that is gone (its removal may be such a change) and for a special keyring's id; no for no key (0)
        and for a key in none, with nothing of its on its way to disk."""
        if key_id == 0:
            return False
        with self.lock:
            key = self._keys.get(key_id) if key_id > 0 else None
            return key is None or key.persisted or self.journal.pending_for(key_id)

    def material(self, caller: Caller, key_id: int, use: str | None) -> bytes:
        """The raw key bytes for an in-daemon ``use`` (FOR_USE's names; None: any key, as wrapping takes)
        keyed by serial; search permission suffices.

        The bytes are copied under the lock, so a concurrent update or revoke
        cannot wipe them halfway.
        """
        with self.lock:
            key = self._keying(caller, key_id, use)
            return key.type.symmetric_material(key.payload)

    def engine(self, caller: Caller, key_id: int, use: str, name: str, make: Callable[[bytes], Any]) -> Any:
        """``make(material)`` for a symmetric key serving ``use``, made once per payload and kept with it
        (search permission and the key's state are checked every call).  For cipher engines: made once for
        all connections, and dropped with the payload it copied when the key is updated, revoked or
        destroyed."""
        with self.lock:
            key = self._keying(caller, key_id, use)
            cache = key.engines
            if cache is not None:
                made = cache.get(name)
                if made is not None:
                    return made
            made = make(key.type.symmetric_material(key.payload))
            if cache is None:
                cache = key.engines = {}
            cache[name] = made
            return made

    def symmetric_use(self, caller: Caller, key_id: int) -> str:
        """The use genkey bound a symmetric key to (FOR_USE's name), or "" for none; ENOPROTOOPT for a key
        that keys no cipher (a keyring, an asymmetric key).  Search permission suffices, as for using the
        key, whose refusal for another algorithm names the binding anyway."""
        key = self.operand(caller, key_id)
        if not key.type.keys_ciphers:
            key.type.symmetric_material(key.payload)  # its refusal, in its words
        return ",".join(uses_of(key.flags & USE_FLAGS))  # (set at creation, for good)

    def _keying(self, caller: Caller, key_id: int, use: str | None) -> Key:
        key = self.operand(caller, key_id)
        made_for = key.flags & USE_FLAGS
        if made_for and use is not None and FOR_USE.get(use) != made_for:
            raise E.ENOPROTOOPT(f"key {key.serial} was generated for {','.join(uses_of(made_for))} only, not {use}")
        return key

    def asymmetric(self, caller: Caller, key_id: int, use: AsymmetricUse) -> Any:
        """The parsed payload of an asymmetric key, for crypto done outside the lock, to serve ``use``:
        one of ASYMMETRIC_USE's names (EOPNOTSUPP if the key is bound to others), a function of the parsed
        key giving one (an export's wrapping: RSA decrypts, EC and X25519 agree), or None for its public
        data alone (its public key and certificate), which no binding holds back."""
        with self.lock:
            return self._asymmetric(caller, key_id, use)[0]

    def asymmetric_uses(self, caller: Caller, key_id: int) -> tuple[Any, tuple[str, ...]]:
        """The parsed payload of an asymmetric key and the uses its binding allows (all of
        ASYMMETRIC_USE's when it has none), for pkey_query to report only those."""
        with self.lock:
            payload, key, _ = self._asymmetric(caller, key_id, None)
            bound = key.flags & ASYMMETRIC_USE_FLAGS
            return payload, uses_of(bound) if bound else tuple(ASYMMETRIC_USE)

    def asymmetric_source(self, caller: Caller, key_id: int, use: str) -> tuple[Any, int]:
        """The parsed payload of a private key a new key is made from to serve ``use`` (derive, key
        transport), and the flags that key must carry: NO_EXPORT unless this caller could export the source
        itself (read permission, possession counting, and no NO_EXPORT).  Using it needs only search, and
        what is made from it must not carry out of keyden what its owner keeps in."""
        with self.lock:
            payload, key, possessed = self._asymmetric(caller, key_id, use)
            exportable = not key.flags & NO_EXPORT and self._permits(caller, key, possessed, P.READ)
            return payload, 0 if exportable else NO_EXPORT

    def _asymmetric(self, caller: Caller, key_id: int, use: AsymmetricUse) -> tuple[Any, Key, bool | None]:
        key, possessed = self._lookup(caller, key_id, P.SEARCH)
        if key.type.name != "asymmetric":
            raise E.EOPNOTSUPP(f"key {key.serial} is not an asymmetric key")
        if callable(use):
            use = use(key.payload)
        if use is not None:
            refuse_use(key, use)
        return key.payload, key, possessed

    # ------------------------------------------------------------------ garbage

    def _expire_at(self, key: Key, when: float) -> None:
        """Set ``key``'s expiry (0: never); one that may expire is one ``collect`` looks at."""
        key.expiry = when
        if when:
            self._mortal.add(key.serial)

    def collect(self, process_alive: Callable[[int, int], bool] | None = None) -> int:
        """Reap dead processes' keyrings, and keys revoked or expired more than gc_delay ago.  What it
        costs follows the keys that may die, not the daemon's size: the store stays locked for as long."""
        if process_alive is not None:
            with self.lock:
                processes = {ident[0] for ident in self._process_keyrings}
            gone = {process for process in processes if not process_alive(*process)}  # /proc: not under the lock
        with self.lock:
            before = len(self._keys)
            if process_alive is not None:
                for ident in [ident for ident in self._process_keyrings if ident[0] in gone]:
                    self._reap_process_keyring(ident)  # ((pid, start time), uid, gid)
            cutoff = self.clock() - self.config.gc_delay
            for serial in list(self._mortal):
                key = self._keys.get(serial)
                if key is None or (not key.expiry and key.revoked_at is None):  # gone, or its timeout cleared
                    self._mortal.discard(serial)
                elif min(t for t in (key.revoked_at, key.expiry or None) if t is not None) <= cutoff:
                    self._force_destroy(key)
            return before - len(self._keys)

    def collect_process(self, process: tuple[int, int]) -> int:
        """``process`` (pid, start time) has exited: reap its process keyrings (one per uid and gid it had)
        and the keys only they held, as ``collect`` does for a process it finds gone.  Returns how many
        keys were destroyed."""
        with self.lock:
            before = len(self._keys)
            for ident in [ident for ident in self._process_keyrings if ident[0] == process]:
                self._reap_process_keyring(ident)
            return before - len(self._keys)

    def _reap_process_keyring(self, ident: tuple[tuple[int, int], int, int]) -> None:
        """exit_keys: the process lets go of its keyring; what nothing else holds dies."""
        ring = self._process_keyrings.pop(ident)
        self._changed()  # what it held is possessed by nobody now, wherever else it is linked
        ring.pins -= 1
        self._maybe_destroy(ring)

    def iter_keys(self) -> Iterable[Key]:
        """A snapshot of the live keys, for diagnostics: look, do not touch payloads."""
        with self.lock:
            return list(self._keys.values())


class _TreeExport:
    """One ``KeyStore.export_tree``, under the store's lock: the tree checked as far as the caller may read
    it, then copied out top-down."""

    def __init__(self, store: KeyStore, caller: Caller, top: Key, possessed: bool):
        self.store, self.caller, self.top, self.top_possessed = store, caller, top, possessed
        self.now = store.clock()
        self.held: set[int] | None = None
        self.shallowest: dict[int, int] = {}  # serial -> the least depth below the top it is met at
        self.index: dict[int, int] = {}  # serial -> its place in out
        self.out: list[Exported] = []
        self.links: list[tuple[int, int]] = []

    def run(self) -> tuple[list[Exported], list[tuple[int, int]]]:
        self.survey()
        self.take(self.top)
        return self.out, self.links

    def possession(self, key: Key) -> bool:
        """Possessed, as a search finds keys: from the caller's keyrings, or from the top if it is possessed.
        (The top's possession once reached every key below it, ones a search passes over included.)"""
        if key is self.top:
            return self.top_possessed
        if self.held is None:
            self.held = self.store._possessed_serials(self.caller, self.top if self.top_possessed else None)
        return key.serial in self.held

    def refusal(self, key: Key) -> E.KeydenError | None:
        """What keeps a key in whatever its mask says (its state, NO_EXPORT): told first to whoever may view
        the key, as its listing shows both; to others, only after the mask's refusal."""
        err = key.state_error(self.now)
        if err is None and key.flags & NO_EXPORT:
            err = E.EPERM(f"key {key.serial} is marked non-exportable")
        if err is not None and self.store._permits(self.caller, key, self.possession(key), P.VIEW):
            raise err
        return err

    def survey(self) -> None:
        """First the whole tree, as far as the caller may read it, for a key that can never leave: an owner
        must not open every key with setperm only to learn that the export cannot happen.  (Into keyrings
        the caller may read and that may be used, each from the least depth it is met at.)"""
        shallowest, todo = self.shallowest, [(self.top, 0)]
        while todo:
            key, depth = todo.pop()
            if shallowest.get(key.serial, MAX_NESTING + 2) <= depth:
                continue
            shallowest[key.serial] = depth
            if self.refusal(key) is None and key.links is not None and depth <= MAX_NESTING \
                    and self.store._permits(self.caller, key, self.possession(key), P.READ):
                todo.extend((member, depth + 1) for member in key.links.values())

    def take(self, key: Key) -> int:
        """The key copied out (once), then what it links to; its place in ``out``."""
        if key.serial in self.index:
            return self.index[key.serial]
        err = self.refusal(key)
        self.store._require(self.caller, key, self.possession(key), P.READ)
        if err is not None:
            raise err
        if key.restriction is not None:  # the copy would take any link the original refuses
            raise E.EOPNOTSUPP(f"keyring {key.serial} is restricted, and an export cannot carry a "
                               "restriction: export what it holds")
        payload = bytes(key.payload) if isinstance(key.payload, (bytes, bytearray)) else key.payload
        place = self.index[key.serial] = len(self.out)
        self.out.append(Exported(key.type.name, key.description, key.perm, payload, key.flags & BINDING_FLAGS))
        if key.links is not None:
            if self.shallowest[key.serial] > MAX_NESTING:  # where a search from the top stops too
                raise E.ELOOP(f"keyring {key.serial} is more than {MAX_NESTING} levels below the exported "
                              "key, as deep as an export (and a search) goes: export it on its own")
            for member in list(key.links.values()):
                self.links.append((place, self.take(member)))
        return place
