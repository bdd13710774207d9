"""The pure key store against the kernel's keyctl semantics (security/keys/*.c, Linux 6.x).

No daemon: a KeyStore on a fake clock, called with hand-made Callers.  Each
test's users get their own session keyrings, as processes would.
"""

from __future__ import annotations

import itertools
import random
import secrets
import threading

import pytest

from keyden import errors as E
from keyden.core import perm as P
from keyden.core import keytypes as T
from keyden.core import store as store_module
from keyden.core.flags import NO_EXPORT
from keyden.core.perm import Credentials
from keyden.core.store import (
    GROUP, PROCESS, REQKEY_AUTH, REQUESTOR, SESSION, THREAD, USER, USER_SESSION, Caller, KeyStore, StoreConfig,
)
from keyden.core.views import KeyStatus

ALICE = Credentials(1000, 1000, frozenset({1000, 3000}))
BOB = Credentials(1001, 1001, frozenset({1001, 3000}))  # shares group 3000 with alice
CAROL = Credentials(1002, 1002, frozenset({1002}))
ROOT = Credentials(0, 0, frozenset({0}))
SHARED_GID = 3000
GC_DELAY = 300.0
_pids = itertools.count(100)


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(clock):
    return KeyStore(StoreConfig(gc_delay=GC_DELAY), clock=clock)


def session(store: KeyStore, cred: Credentials, name: str | None = None) -> Caller:
    """A new process of ``cred`` in a session of its own (as the KEYDEN_SESSION token gives it)."""
    _, token = store.join_session(Caller(cred), name)
    return Caller(cred, process=(next(_pids), 1), session_token=token)


def add_user(store, caller, desc="k", data=b"value", ring=SESSION, **kw) -> int:
    return store.add(caller, "user", desc, data, ring, **kw)


def newring(store, caller, name, parent=SESSION) -> int:
    return store.add(caller, "keyring", name, b"", parent)


def alive(store, caller, serial) -> bool:
    try:
        store.resolve(caller, serial)
        return True
    except E.ENOKEY:
        return False


@pytest.fixture
def alice(store):
    return session(store, ALICE)


@pytest.fixture
def bob(store):
    return session(store, BOB)


# --------------------------------------------------------------------- serials

def test_serials_are_random_positive_and_unique(store):
    root = session(store, ROOT)
    serials = [add_user(store, root, f"k{i}") for i in range(300)]
    assert len(set(serials)) == 300
    assert all(3 <= s <= 2**31 - 1 for s in serials)
    gaps = {b - a for a, b in zip(serials, serials[1:])}
    assert len(gaps) > 250  # not a counter: consecutive serials are unrelated


class ScriptedRandom:
    """Stands in for ``secrets`` in the store: randbelow gives the scripted serials first, then random ones."""

    def __init__(self, serials):
        self.serials = list(serials)
        self.token_urlsafe = secrets.token_urlsafe

    def randbelow(self, n: int) -> int:
        return self.serials.pop(0) - 3 if self.serials else secrets.randbelow(n)


def test_serials_of_records_that_were_not_restored_are_never_handed_out(store, monkeypatch):
    """A record the backing store could not open keeps its row: a new key with its serial would meet it."""
    unusable, fresh = 123456, 654321
    store.restore([], [], [], unusable=[unusable, 2**40, -5])  # out-of-range serials are ignored
    root = session(store, ROOT)
    monkeypatch.setattr(store_module, "secrets", ScriptedRandom([unusable] * 5 + [fresh]))
    assert add_user(store, root, "new") == fresh
    assert not alive(store, root, unusable)


# ------------------------------------------------------------ types and payloads

@pytest.mark.parametrize("type_name, desc, data, error", [
    ("user", "k", b"", E.EINVAL),
    ("user", "k", b"x" * 32768, E.EINVAL),
    ("user", "", b"x", E.EINVAL),
    ("user", "d" * 4096, b"x", E.EINVAL),
    ("user", "nul\0inside", b"x", E.EINVAL),
    ("logon", "noprefix", b"x", E.EINVAL),
    ("logon", ":x", b"x", E.EINVAL),
    ("keyring", "ring", b"data", E.EINVAL),
    ("keyring", ".dotted", b"", E.EPERM),
    ("", "k", b"x", E.EINVAL),
    ("t" * 32, "k", b"x", E.EINVAL),
    ("t" * 31, "k", b"x", E.ENODEV),
    (".internal", "k", b"x", E.EPERM),
    ("nosuchtype", "k", b"x", E.ENODEV),
], ids=lambda v: repr(v)[:20])
def test_add_rejects_what_the_kernel_rejects(store, alice, type_name, desc, data, error):
    with pytest.raises(error):
        store.add(alice, type_name, desc, data, SESSION)


@pytest.mark.parametrize("type_name, desc, data, perm", [
    ("user", "k", b"x", 0x3F010000),
    ("user", "k", b"x" * 32767, 0x3F010000),
    ("user", "d" * 4095, b"x", 0x3F010000),
    ("logon", "svc:name", b"x", 0x3D010000),
    ("keyring", "ring", b"", 0x3F010000),
], ids=lambda v: repr(v)[:20])
def test_add_accepts_the_limits_and_applies_default_perms(store, type_name, desc, data, perm):
    root = session(store, ROOT)  # 32767 bytes would not fit a user's 20000-byte quota
    key = store.add(root, type_name, desc, data, SESSION)
    d = store.describe(root, key)
    assert (d.type, d.uid, d.gid, d.perm, d.description) == (type_name, 0, 0, perm, desc)


def test_logon_keys_are_never_readable_user_keys_are(store, alice):
    logon = store.add(alice, "logon", "svc:pw", b"hunter2", SESSION)
    with pytest.raises(E.EOPNOTSUPP):
        store.read(alice, logon)
    assert store.read(alice, add_user(store, alice, data=b"visible")) == b"visible"


def test_update_rules(store, alice):
    key = add_user(store, alice)
    store.update(alice, key, b"new")
    assert store.read(alice, key) == b"new"
    with pytest.raises(E.EINVAL):
        store.update(alice, key, b"")
    with pytest.raises(E.EINVAL):  # keyctl_update takes at most a page
        store.update(alice, key, b"x" * 4097)
    store.update(alice, key, b"x" * 4096)
    with pytest.raises(E.EOPNOTSUPP):
        store.update(alice, newring(store, alice, "r"), b"x")


def test_search_and_request_call_an_unknown_type_enokey(store, alice):
    with pytest.raises(E.ENOKEY):
        store.search(alice, SESSION, "nosuchtype", "k")
    with pytest.raises(E.ENOKEY):
        store.request(alice, "nosuchtype", "k")
    with pytest.raises(E.EPERM):
        store.search(alice, SESSION, ".internal", "k")


# --------------------------------------------------------------- add or update

def test_add_updates_a_user_key_in_place_keeping_its_serial(store, alice):
    first = add_user(store, alice, "k", b"one")
    assert add_user(store, alice, "k", b"two") == first
    assert store.read(alice, first) == b"two"
    assert store.read(alice, SESSION) == [first]


def test_add_update_needs_write_on_the_existing_key(store, alice):
    key = add_user(store, alice, "k", b"one")
    store.setperm(alice, key, 0x3B010000)  # possessor all but write
    with pytest.raises(E.EACCES):
        add_user(store, alice, "k", b"two")
    assert store.read(alice, key) == b"one"


def test_add_keyring_with_an_existing_name_replaces_the_link(store, alice):
    old = newring(store, alice, "r")
    new = newring(store, alice, "r")
    assert new != old
    assert store.read(alice, SESSION) == [new]
    assert not alive(store, alice, old)  # nothing held it any more


def test_add_does_not_update_a_revoked_key_but_replaces_it(store, alice):
    old = add_user(store, alice, "k", b"one")
    store.revoke(alice, old)
    new = add_user(store, alice, "k", b"two")
    assert new != old and store.read(alice, SESSION) == [new]


def test_add_updates_an_expired_key_and_clears_its_timeout(store, alice, clock):
    key = add_user(store, alice, "k", b"one")
    store.set_timeout(alice, key, 5)
    clock.advance(5)
    with pytest.raises(E.EKEYEXPIRED):
        store.read(alice, key)
    assert add_user(store, alice, "k", b"two") == key
    clock.advance(1000)
    assert store.read(alice, key) == b"two"


# ------------------------------------------------------------------ linking

def test_linking_a_keyring_into_itself_or_its_descendants_is_edeadlk(store, alice):
    a = newring(store, alice, "a")
    b = newring(store, alice, "b", a)
    with pytest.raises(E.EDEADLK):
        store.link(alice, a, a)
    with pytest.raises(E.EDEADLK):
        store.link(alice, a, b)
    with pytest.raises(E.EDEADLK):
        store.link(alice, SESSION, b)


def test_a_loop_is_edeadlk_even_where_the_depth_walk_first_met_its_keyring_too_deep(store, alice):
    """k holds b1 > ... > b5 > a (a six deep) and, after b1, a itself; a > x > r.  The depth walk met a six
    deep first, stopped there, and skipped it when met again one deep: linking k into r was ELOOP, where
    the loop comes first (EDEADLK)."""
    k, a, x, r = (newring(store, alice, name) for name in ("k", "a", "x", "r"))
    chain = [newring(store, alice, f"b{i}") for i in range(1, 6)]
    for outer, inner in zip([k] + chain, chain + [a]):  # top-down: each link checks only below what it files
        store.link(alice, inner, outer)
    store.link(alice, a, k)
    store.link(alice, x, a)
    store.link(alice, r, x)
    with pytest.raises(E.EDEADLK):
        store.link(alice, k, r)


def test_a_chain_made_top_down_however_deep_dies_whole_when_let_go(store):
    """Each link checks only below what it files, so a chain has no depth limit; destroying one recursed
    four frames a level, and 250 levels raised RecursionError half-way, with the tree half destroyed."""
    root = session(store, ROOT)
    chain = [newring(store, root, "top")]
    for level in range(1, 1200):  # past six levels possession no longer reaches: the owner's bits
        ring = newring(store, root, f"level-{level}")
        store.setperm(root, ring, 0x3F3F0000)
        store.link(root, ring, chain[-1])
        store.unlink(root, ring, SESSION)
        chain.append(ring)
    add_user(store, root, "at-the-bottom", ring=chain[-1])
    before = len(store)
    store.unlink(root, chain[0], SESSION)
    assert len(store) == before - 1201
    assert not any(alive(store, root, serial) for serial in chain)


def nested_chain(store, caller, length) -> list[int]:
    """Keyrings r0 > r1 > ... each holding the next; all also in the session keyring, so all possessed."""
    chain = [newring(store, caller, f"r{i}") for i in range(length)]
    for outer, inner in reversed(list(zip(chain, chain[1:]))):  # bottom-up: each link adds one level
        store.link(caller, inner, outer)
    return chain


def test_linking_a_keyring_with_more_than_six_levels_below_it_is_eloop(store, alice):
    chain = nested_chain(store, alice, 8)
    target = newring(store, alice, "target")
    store.link(alice, chain[1], target)  # r1 holds six levels of keyrings: fine
    with pytest.raises(E.ELOOP):
        store.link(alice, chain[0], target)  # r0 holds seven


def test_search_goes_six_keyrings_deep_and_no_deeper(store, alice):
    chain = nested_chain(store, alice, 8)
    six = add_user(store, alice, "six", ring=chain[6])
    add_user(store, alice, "seven", ring=chain[7])
    assert store.search(alice, chain[0], "user", "six") == six
    with pytest.raises(E.ENOKEY):
        store.search(alice, chain[0], "user", "seven")


def test_link_errors(store, alice):
    key = add_user(store, alice)
    ring = newring(store, alice, "r")
    with pytest.raises(E.ENOTDIR):
        store.link(alice, ring, key)
    with pytest.raises(E.ENOKEY):
        store.link(alice, 0x7FFFFFF0, ring)
    with pytest.raises(E.ENOENT):
        store.unlink(alice, key, ring)
    with pytest.raises(E.ENOTDIR):
        store.unlink(alice, key, key)
    with pytest.raises(E.EINVAL):
        store.link(alice, key, 0)


def test_link_replaces_a_key_with_the_same_type_and_description(store, alice):
    ring = newring(store, alice, "r")
    first = add_user(store, alice, "same", b"1", ring=ring)
    second = add_user(store, alice, "same", b"2")  # in the session keyring
    store.link(alice, second, ring)
    assert store.read(alice, ring) == [second]
    assert not alive(store, alice, first)


def test_move_with_and_without_exclusive(store, alice):
    src, dst = newring(store, alice, "src"), newring(store, alice, "dst")
    key = add_user(store, alice, "k", b"moving", ring=src)
    occupant = add_user(store, alice, "k", b"there", ring=dst)
    with pytest.raises(E.EEXIST):
        store.move(alice, key, src, dst, exclusive=True)
    store.move(alice, key, src, dst, exclusive=False)
    assert (store.read(alice, src), store.read(alice, dst)) == ([], [key])
    assert not alive(store, alice, occupant)
    with pytest.raises(E.ENOENT):
        store.move(alice, key, src, dst)
    store.move(alice, key, dst, dst)  # same keyring: nothing to do


def test_a_move_checks_nesting_as_a_link_does_and_changes_nothing_when_refused(store, alice):
    """A keyring moved into its own child is a loop (EDEADLK); one with keyrings more than 6 deep below it
    (built top-down), ELOOP, as keyring_detect_cycle answers; either way it stays where it was."""
    outer = newring(store, alice, "outer")
    inner = newring(store, alice, "inner", outer)
    with pytest.raises(E.EDEADLK):
        store.move(alice, outer, SESSION, inner)
    ring = inner
    for depth in range(2, 9):  # its owner may use each keyring (possession ends 6 down)
        ring = store.add(alice, "keyring", f"level{depth}", b"", ring, perm=0x3f3f0000)
    elsewhere = newring(store, alice, "elsewhere")
    with pytest.raises(E.ELOOP):
        store.move(alice, outer, SESSION, elsewhere)
    assert outer in store.read(alice, SESSION) and store.read(alice, outer) == [inner]
    assert store.read(alice, elsewhere) == []


def test_clear_empties_a_keyring_and_destroys_what_only_it_held(store, alice):
    ring = newring(store, alice, "r")
    only_here = add_user(store, alice, "a", ring=ring)
    also_in_session = add_user(store, alice, "b")
    store.link(alice, also_in_session, ring)
    store.clear(alice, ring)
    assert store.read(alice, ring) == []
    assert not alive(store, alice, only_here) and alive(store, alice, also_in_session)
    with pytest.raises(E.ENOTDIR):
        store.clear(alice, also_in_session)


def test_search_finds_nested_keys_and_links_the_result_into_dest(store, alice):
    outer = newring(store, alice, "outer")
    inner = newring(store, alice, "inner", outer)
    key = add_user(store, alice, "deep", ring=inner)
    dest = newring(store, alice, "dest")
    assert store.search(alice, outer, "user", "deep", dest) == key
    assert store.read(alice, dest) == [key]
    with pytest.raises(E.ENOKEY):
        store.search(alice, outer, "user", "absent")
    with pytest.raises(E.ENOTDIR):
        store.search(alice, key, "user", "deep")


def test_search_skips_keyrings_without_search_and_refuses_keys_without_it(store, alice):
    outer = newring(store, alice, "outer")
    hidden = newring(store, alice, "hidden", outer)
    add_user(store, alice, "in-hidden", ring=hidden)
    store.setperm(alice, hidden, 0x37010000)  # everything but search
    with pytest.raises(E.ENOKEY):
        store.search(alice, outer, "user", "in-hidden")
    unsearchable = add_user(store, alice, "unsearchable", ring=outer)
    store.setperm(alice, unsearchable, 0x37010000)
    with pytest.raises(E.EACCES):  # the kernel reports why the only match was passed over
        store.search(alice, outer, "user", "unsearchable")


# --------------------------------------------------------- revoke, invalidate

def test_revoke_needs_write_or_setattr(store, alice):
    writable, settable, neither = (add_user(store, alice, d) for d in "wsn")
    store.setperm(alice, writable, 0x0D000000)  # possessor view+search+write (search: to be possessed)
    store.setperm(alice, settable, 0x29000000)  # possessor view+search+setattr
    store.setperm(alice, neither, 0x1B000000)  # possessor everything else
    store.revoke(alice, writable)
    store.revoke(alice, settable)
    with pytest.raises(E.EACCES):
        store.revoke(alice, neither)


def test_a_revoked_key_is_ekeyrevoked_on_use_but_can_be_unlinked(store, alice):
    key = add_user(store, alice, "k", b"secret")
    ring = newring(store, alice, "r")
    store.revoke(alice, key)
    for use in (lambda: store.read(alice, key), lambda: store.describe(alice, key),
                lambda: store.update(alice, key, b"x"), lambda: store.link(alice, key, ring),
                lambda: store.revoke(alice, key), lambda: store.set_timeout(alice, key, 5),
                lambda: store.search(alice, SESSION, "user", "k")):
        with pytest.raises(E.EKEYREVOKED):
            use()
    store.unlink(alice, key, SESSION)
    assert not alive(store, alice, key)


def test_revoking_a_keyring_empties_it(store, alice):
    ring = newring(store, alice, "r")
    key = add_user(store, alice, ring=ring)
    store.revoke(alice, ring)
    assert not alive(store, alice, key)
    with pytest.raises(E.EKEYREVOKED):
        store.read(alice, ring)
    with pytest.raises(E.EKEYREVOKED):
        add_user(store, alice, ring=ring)


def test_revoking_a_user_key_wipes_and_releases_its_payload(store, alice):
    key = add_user(store, alice, "k", b"p" * 100)
    kept = store._keys[key].payload
    before = store.quota_usage(1000)[1]
    store.revoke(alice, key)
    assert bytes(kept) == bytes(100)
    assert store.quota_usage(1000)[1] == before - 100


def test_invalidate_removes_a_key_from_every_keyring_at_once(store, alice):
    rings = [newring(store, alice, f"r{i}") for i in range(3)]
    key = add_user(store, alice)
    for ring in rings:
        store.link(alice, key, ring)
    keys_before = store.quota_usage(1000)[0]
    store.invalidate(alice, key)
    assert all(store.read(alice, ring) == [] for ring in rings)
    assert store.read(alice, SESSION) == rings
    with pytest.raises(E.ENOKEY):
        store.describe(alice, key)
    assert store.quota_usage(1000)[0] == keys_before - 1


# ------------------------------------------------------------------ timeouts

def test_timeouts_expire_keys_and_zero_clears_them(store, alice, clock):
    key = add_user(store, alice)
    store.set_timeout(alice, key, 10)
    clock.advance(9)
    assert store.read(alice, key) == b"value"
    store.set_timeout(alice, key, 0)
    clock.advance(100)
    assert store.read(alice, key) == b"value"
    store.set_timeout(alice, key, 10)
    clock.advance(10)
    with pytest.raises(E.EKEYEXPIRED):
        store.read(alice, key)
    with pytest.raises(E.EKEYEXPIRED):  # too late to lift it
        store.set_timeout(alice, key, 0)


def test_search_skips_expired_keys_and_says_so_if_nothing_else_matched(store, alice, clock):
    inner = newring(store, alice, "inner")
    expired = add_user(store, alice, "k", b"old")
    store.set_timeout(alice, expired, 1)
    clock.advance(1)
    with pytest.raises(E.EKEYEXPIRED):
        store.search(alice, SESSION, "user", "k")
    fresh = add_user(store, alice, "k", b"new", ring=inner)
    assert store.search(alice, SESSION, "user", "k") == fresh
    store.unlink(alice, fresh, inner)
    with pytest.raises(E.ENOKEY):  # request_key passes expired keys over silently
        store.request(alice, "user", "k")


# ------------------------------------------------------------------------ gc

def test_collect_reaps_revoked_and_expired_keys_after_the_gc_delay(store, alice, clock):
    revoked, expiring = add_user(store, alice, "r"), add_user(store, alice, "e")
    store.revoke(alice, revoked)
    store.set_timeout(alice, expiring, 10)
    clock.advance(10)
    usage = store.quota_usage(1000)
    assert store.collect() == 0
    assert store.read(alice, SESSION) == [revoked, expiring]
    clock.advance(GC_DELAY)
    assert store.collect() == 2
    assert store.read(alice, SESSION) == []
    assert not alive(store, alice, revoked) and not alive(store, alice, expiring)
    revoked_cost = len("r") + 1 + 4  # revoking freed its payload already; description and link remain
    expiring_cost = len("e") + 1 + 5 + 4
    assert store.quota_usage(1000)[:2] == (usage[0] - 2, usage[1] - revoked_cost - expiring_cost)


def test_keys_lists_every_live_key_once_in_order_through_any_churn(clock, monkeypatch):
    """The serial order is kept across changes (merged, gone keys skipped), not sorted again each time:
    whatever is made, destroyed and made again under a serial used before, a listing shows each live key
    once, in order."""
    store = KeyStore(StoreConfig(maxkeys=10_000, maxbytes=10**8), clock=clock)
    alice = session(store, ALICE)
    rng = random.Random(7)
    reuse: list[int] = []
    plain_new = store._new_serial
    reused = []

    def new_serial() -> int:
        if reuse and reuse[-1] not in store._keys:
            reused.append(reuse.pop())
            return reused[-1]
        return plain_new()
    monkeypatch.setattr(store, "_new_serial", new_serial)
    live: list[int] = []

    def listing() -> list[int]:
        seen, after = [], 0
        while True:
            page, after = store.keys(alice, after, limit=7, scan=11)
            seen += [status.serial for status in page]
            if not after:
                return seen
    for step in range(400):
        if live and rng.random() < 0.4:
            gone = live.pop(rng.randrange(len(live)))
            store.invalidate(alice, gone)
            if rng.random() < 0.5:
                reuse.append(gone)  # the next key made takes this serial again
        else:
            live.append(add_user(store, alice, f"k{step}"))
        if step % 37 == 0:
            mine = [s for s in listing() if s in live]
            assert mine == sorted(live) and len(set(listing())) == len(listing())
    assert [s for s in listing() if s in live] == sorted(live) and len(reused) > 20


def test_collect_follows_timeouts_set_changed_and_cleared(store, alice, clock):
    """collect looks only at keys that may die: each way a key gets or loses its death time counts."""
    cleared, extended = add_user(store, alice, "c"), add_user(store, alice, "x")
    at_add = store.create_internal(alice, T.REGISTRY["logon"], "s:a", b"v", 1, SESSION, timeout=5)  # as derive
    store.set_timeout(alice, cleared, 5)
    store.set_timeout(alice, cleared, 0)
    store.set_timeout(alice, extended, 5)
    store.set_timeout(alice, extended, 1000)
    updated = add_user(store, alice, "u")
    store.set_timeout(alice, updated, 5)
    store.update(alice, updated, b"new")  # user_update clears the timeout
    clock.advance(5 + GC_DELAY)
    assert store.collect() == 1 and not alive(store, alice, at_add)
    assert all(alive(store, alice, k) for k in (cleared, extended, updated))
    clock.advance(1000)
    assert store.collect() == 1 and not alive(store, alice, extended)


def test_collect_asks_about_processes_without_holding_the_store(store, alice):
    """Whether a process lives is a /proc read each; under the store's lock a uid's thousands of process
    keyrings held every request up while it ran."""
    store.resolve(alice, PROCESS, create=True)
    free = []

    def alive_and_lock_free(pid, start):
        grab = threading.Thread(target=lambda: free.append(store.lock.acquire(timeout=5) and store.lock.release()))
        grab.start()
        grab.join()
        return True
    store.collect(process_alive=alive_and_lock_free)
    assert free == [None]  # acquired (and released) by another thread while collect asked


def test_a_reaped_process_keyring_linked_elsewhere_is_possessed_no_more(store, alice):
    process = store.resolve(alice, PROCESS, create=True)
    key = add_user(store, alice, "held", ring=PROCESS)
    store.setperm(alice, key, 0x3F000000)  # possessor only
    store.link(alice, process, USER)
    assert store.read(alice, key) == b"value"  # possessed through @p
    store.collect(process_alive=lambda pid, start: (pid, start) != alice.process)
    with pytest.raises(E.EACCES):  # @p is gone from the process: what it holds is possessed no more
        store.read(alice, key)


@pytest.mark.parametrize("lock", ["no search", "revoked", "expired"])
def test_user_keyrings_that_grant_no_search_or_are_dead_are_found_no_more(store, clock, lock):
    """As the kernel's look_up_user_keyrings, a search of its register with possession: strip search from
    @u (or revoke it, or let it expire) and neither @u nor @us is found again (ENOKEY), nor @s where @us
    stands in for a session: a lock its owner may set."""
    lone = Caller(ALICE)
    user = store.resolve(lone, USER)
    assert store.describe(lone, USER_SESSION).description == "_uid_ses.1000"
    if lock == "revoked":
        store.revoke(lone, USER)
    elif lock == "expired":
        store.set_timeout(lone, USER, 1)
        clock.advance(2)
    else:
        store.setperm(lone, USER, 0x37370000)  # all but search, for possessor and owner
    for special in (USER, USER_SESSION, SESSION):
        with pytest.raises(E.ENOKEY):
            store.describe(lone, special)
        with pytest.raises(E.ENOKEY):
            store.resolve(lone, special)
    if lock == "no search":
        store.setperm(lone, user, 0x3F3F0000)  # by its serial the owner still reaches it
        assert store.resolve(lone, USER) == user


def test_a_replaced_user_keyring_is_possessed_through_the_user_session_keyring(store):
    lone = Caller(ALICE)  # no session token: @s is @us, which links @u
    old = store.resolve(lone, USER)
    store.invalidate(lone, old)
    new = store.resolve(lone, USER)
    assert new != old and store.read(lone, USER_SESSION) == [new]
    key = add_user(store, lone, "k2", ring=USER)
    store.setperm(lone, key, 0x3F000000)
    assert store.read(lone, key) == b"value" and store.request(lone, "user", "k2") == key


def test_collect_reaps_keyrings_of_dead_processes(store, alice):
    ring = store.resolve(alice, PROCESS, create=True)
    key = add_user(store, alice, ring=PROCESS)
    assert store.collect(process_alive=lambda pid, start: True) == 0
    assert store.collect(process_alive=lambda pid, start: (pid, start) != alice.process) == 2
    assert not alive(store, alice, ring) and not alive(store, alice, key)
    with pytest.raises(E.ENOKEY):
        store.resolve(alice, PROCESS)


def test_collect_process_reaps_that_processs_keyrings_and_tells_of_each_made(store, alice, bob):
    """What the daemon calls when a watched process exits: the sweep's reaping, for that process alone, every
    keyring it had (one per uid and gid it ran as); keys linked elsewhere too stay."""
    made = []
    store.on_process_keyring = lambda process, uid: made.append(process)
    ring = store.resolve(alice, PROCESS, create=True)
    only = add_user(store, alice, "only-in-p", ring=PROCESS)
    shared = add_user(store, alice, "also-in-s", ring=THREAD)  # @t is @p
    store.link(alice, shared, SESSION)
    assert store.resolve(alice, THREAD, create=True) == ring  # no second one, and no second word of it
    setuid = Caller(CAROL, process=alice.process)  # the same process after it changed uid
    other_cred_ring = store.resolve(setuid, PROCESS, create=True)
    bobs = store.resolve(bob, PROCESS, create=True)
    assert made == [alice.process, alice.process, bob.process]
    assert store.collect_process(alice.process) == 3  # both of its keyrings, and what only they held
    assert not alive(store, alice, ring) and not alive(store, alice, only) and alive(store, alice, shared)
    assert not alive(store, setuid, other_cred_ring) and alive(store, bob, bobs)
    with pytest.raises(E.ENOKEY):
        store.resolve(alice, PROCESS)
    assert store.collect_process(alice.process) == 0


def test_unreferenced_keys_die_at_once_and_free_their_quota(store, alice):
    before = store.quota_usage(1000)
    key = add_user(store, alice, "kk", b"12345")
    assert store.quota_usage(1000)[:2] == (before[0] + 1, before[1] + len("kk") + 1 + 5 + 4)
    store.unlink(alice, key, SESSION)
    assert not alive(store, alice, key)
    assert store.quota_usage(1000) == before


# -------------------------------------------------------------------- quotas

def test_quota_counts_keys_with_kernel_defaults(store, alice):
    keys, _, maxkeys, maxbytes = store.quota_usage(1000)
    assert (keys, maxkeys, maxbytes) == (1, 200, 20000)  # the session keyring itself counts
    for i in range(199):
        add_user(store, alice, f"k{i}", b"x")
    with pytest.raises(E.EDQUOT):
        add_user(store, alice, "one-too-many", b"x")
    assert store.quota_usage(1000)[0] == 200


def test_quota_counts_bytes_as_description_nul_payload_and_links(store, alice):
    spare, small = newring(store, alice, "spare"), add_user(store, alice, "s", b"x")
    used = store.quota_usage(1000)[1]
    room = 20000 - used - 4  # the link in the session keyring costs its owner 4 bytes
    add_user(store, alice, "big", b"x" * (room - len("big") - 1))
    assert store.quota_usage(1000)[1] == 20000
    with pytest.raises(E.EDQUOT):
        add_user(store, alice, "b", b"x")
    with pytest.raises(E.EDQUOT):  # one more link is 4 more bytes
        store.link(alice, small, spare)


def test_quota_limits_are_configurable_and_root_has_its_own(clock):
    store = KeyStore(StoreConfig(maxkeys=3, maxbytes=1000, root_maxkeys=5), clock=clock)
    alice, root = session(store, ALICE), session(store, ROOT)
    add_user(store, alice, "a")
    add_user(store, alice, "b")
    with pytest.raises(E.EDQUOT):
        add_user(store, alice, "c")
    for name in "abcd":
        add_user(store, root, name)
    with pytest.raises(E.EDQUOT):
        add_user(store, root, "e")
    assert store.quota_usage(0)[2:] == (5, 25000000)


def test_an_add_whose_key_fits_the_quota_but_not_its_link_changes_nothing(clock):
    """The key's bytes are in quota, its link's 4 are not: EDQUOT, and neither the key nor a charge stays."""
    store = KeyStore(StoreConfig(maxbytes=10_000), clock=clock)
    alice = session(store, ALICE)
    keys, used = store.quota_usage(ALICE.uid)[:2]
    room = 10_000 - used - len("k") - 1  # the description, its NUL and the payload may take all that is left
    with pytest.raises(E.EDQUOT):
        add_user(store, alice, "k", b"x" * room)
    assert store.quota_usage(ALICE.uid)[:2] == (keys, used)
    assert all(k.description != "k" for k in store.iter_keys())
    add_user(store, alice, "k", b"x" * (room - 4))  # with its link's 4 bytes it fits


def test_an_update_past_the_byte_quota_fails_and_changes_nothing(clock):
    store = KeyStore(StoreConfig(maxbytes=100), clock=clock)
    alice = session(store, ALICE)
    key = add_user(store, alice, "k", b"small")
    with pytest.raises(E.EDQUOT):
        store.update(alice, key, b"x" * 100)
    with pytest.raises(E.EDQUOT):  # add over it, asking for no-export: refused, so not flagged either
        add_user(store, alice, "k", b"x" * 100, flags=NO_EXPORT)
    assert store.read(alice, key) == b"small"
    assert not next(k for k in store.iter_keys() if k.serial == key).flags


def test_move_into_a_full_keyring_is_refused(clock):
    store = KeyStore(StoreConfig(keyring_max_links=2), clock=clock)
    alice = session(store, ALICE)
    source, full = newring(store, alice, "src"), newring(store, alice, "full")
    for name in "ab":
        add_user(store, alice, name, ring=full)
    key = add_user(store, alice, "c", ring=source)
    with pytest.raises(E.ENFILE):
        store.link(alice, key, full)
    with pytest.raises(E.ENFILE):
        store.move(alice, key, source, full)
    assert store.read(alice, source) == [key] and len(store.read(alice, full)) == 2


def test_chown_moves_the_quota_burden_and_needs_room_at_the_new_owner(store, alice):
    root = session(store, ROOT)
    key = add_user(store, alice, "kk", b"12345")
    store.setperm(alice, key, 0x3F3F3F3F)
    alice_before, bob_before = store.quota_usage(1000)[:2], store.quota_usage(1001)[:2]
    store.chown(root, key, 1001, -1)
    cost = len("kk") + 1 + 5
    assert store.quota_usage(1000)[:2] == (alice_before[0] - 1, alice_before[1] - cost)
    assert store.quota_usage(1001)[:2] == (bob_before[0] + 1, bob_before[1] + cost)
    full = KeyStore(StoreConfig(maxkeys=1))
    a, r = session(full, ALICE), session(full, ROOT)
    with pytest.raises(E.EDQUOT):
        full.add(a, "user", "k", b"v", SESSION)
    k = full.add(r, "user", "k", b"v", SESSION)
    with pytest.raises(E.EDQUOT):  # alice's session keyring already fills her quota
        full.chown(r, k, 1000, -1)


# --------------------------------------------------------------- permissions

def test_owner_gets_only_the_user_byte(store, alice):
    key = add_user(store, alice)
    store.setperm(alice, key, 0x00003F3F)  # group and other everything; owner and possessor nothing
    for denied in (lambda: store.read(alice, key), lambda: store.describe(alice, key)):
        with pytest.raises(E.EACCES):
            denied()


def test_group_and_other_bytes_are_exclusive(store, alice, bob):
    key = add_user(store, alice)
    store.chown(alice, key, -1, SHARED_GID)
    store.setperm(alice, key, 0x3F000102)  # group view, other read
    carol = Caller(CAROL)
    assert store.read(carol, key) == b"value"
    with pytest.raises(E.EACCES):  # bob is in the group, so "other" does not apply to him
        store.read(bob, key)
    store.setperm(alice, key, 0x3F000200)
    assert store.read(bob, key) == b"value"
    with pytest.raises(E.EACCES):
        store.read(carol, key)
    store.setperm(alice, key, 0x3F000002)  # a group byte of zero does not count: bob is "other" again
    assert store.read(bob, key) == b"value"


def test_possessor_bits_count_only_when_possessed(store, alice):
    ring = newring(store, alice, "r")
    key = add_user(store, alice, "k", b"mine", ring=ring)
    store.setperm(alice, key, 0x3F000000)
    assert store.read(alice, key) == b"mine"
    elsewhere = session(store, ALICE)  # same user, another session: does not possess it
    with pytest.raises(E.EACCES):
        store.read(elsewhere, key)
    with pytest.raises(E.EACCES):
        store.read(elsewhere, ring)  # a keyring named by serial is not possessed either


def test_possession_alone_lets_a_key_be_read(store, alice):
    key = add_user(store, alice, "k", b"possessed")
    store.setperm(alice, key, 0x09000000)  # possessor view+search, no read anywhere
    assert store.read(alice, key) == b"possessed"  # keyctl_read: "searchable from this process's keyrings"


def test_root_has_no_bypass(store, alice):
    key = add_user(store, alice)
    store.setperm(alice, key, 0x01000000)
    root = session(store, ROOT)
    for denied in (lambda: store.read(root, key), lambda: store.describe(root, key),
                   lambda: store.setperm(root, key, 0x3F3F3F3F), lambda: store.revoke(root, key)):
        with pytest.raises(E.EACCES):
            denied()


def test_chown_and_chgrp_rules(store, alice, bob):
    key = add_user(store, alice)
    with pytest.raises(E.EACCES):
        store.chown(alice, key, 1001, -1)
    with pytest.raises(E.EACCES):
        store.chown(alice, key, -1, 1001)  # not a group alice is in
    store.chown(alice, key, -1, SHARED_GID)
    store.chown(alice, key, 1000, 1000)  # no change of owner
    store.chown(alice, key, -1, -1)
    store.setperm(alice, key, 0x3F010020)  # everyone else may setattr
    store.chown(bob, key, -1, 1001)  # setattr and membership suffice: no ownership needed
    assert store.describe(alice, key).gid == 1001
    root = session(store, ROOT)
    store.chown(root, key, 1002, 0xFFFFFFFF)  # the 32-bit -1 leaves the group alone
    d = store.describe(Caller(CAROL), key)
    assert (d.uid, d.gid) == (1002, 1001)
    with pytest.raises(E.EINVAL):
        store.chown(root, key, 2**32, -1)


def test_setperm_needs_setattr_and_ownership_unless_root(store, alice, bob):
    key = add_user(store, alice)
    with pytest.raises(E.EINVAL):
        store.setperm(alice, key, 0x40000000)
    store.setperm(alice, key, 0x3F010020)
    with pytest.raises(E.EACCES):
        store.setperm(bob, key, 0x3F3F3F3F)  # setattr, but not the owner
    store.setperm(session(store, ROOT), key, 0x3F010000)  # root only needs setattr
    with pytest.raises(E.EACCES):
        store.setperm(session(store, ROOT), key, 0x3F3F3F3F)


# ---------------------------------------------------------------- special IDs

def test_special_ids(store, alice):
    with pytest.raises(E.EINVAL):
        store.resolve(alice, GROUP)
    for missing in (PROCESS, THREAD, REQKEY_AUTH, REQUESTOR):
        with pytest.raises(E.ENOKEY):
            store.resolve(alice, missing)
    with pytest.raises(E.EINVAL):
        store.resolve(alice, -9)
    process = store.resolve(alice, PROCESS, create=True)
    assert store.resolve(alice, PROCESS) == store.resolve(alice, THREAD) == process
    assert store.describe(alice, PROCESS).description == "_pid"
    with pytest.raises(E.ENOKEY):  # read hides every lookup failure behind ENOKEY, as keyctl_read does
        store.read(alice, GROUP)


def test_without_a_session_s_is_the_user_session_keyring_which_links_the_user_keyring(store):
    lone = Caller(ALICE, process=(next(_pids), 1))
    session_ring, user_ring = store.resolve(lone, SESSION), store.resolve(lone, USER)
    assert store.resolve(lone, USER_SESSION) == session_ring
    assert store.read(lone, SESSION) == [user_ring]
    for ring, name in ((session_ring, "_uid_ses.1000"), (user_ring, "_uid.1000")):
        d = store.describe(lone, ring)
        assert (d.description, d.perm, d.uid, d.gid) == (name, 0x1F3F0000, 1000, P.NO_GID)
    key = add_user(store, lone, ring=USER)
    assert store.request(lone, "user", "k") == key  # found through the user keyring: possessed


# ------------------------------------------------------------------- sessions

def test_anonymous_sessions_are_new_keyrings(store):
    first, token1 = store.join_session(Caller(ALICE))
    second, token2 = store.join_session(Caller(ALICE))
    assert first != second and token1 != token2
    d = store.describe(Caller(ALICE, session_token=token1), SESSION)
    assert (d.serial, d.description, d.perm) == (first, "_ses", 0x3F030000)  # the kernel's: no user link
    named, token = store.join_session(Caller(ALICE), "work")
    assert store.describe(Caller(ALICE, session_token=token), SESSION).perm == 0x3F130000
    assert token not in repr(Caller(ALICE, session_token=token))  # a bearer capability: kept out of reprs


def test_sessions_count_in_the_quota_and_reserved_names_are_refused(clock):
    """A session outlives the connection that made it: joining again and again must hit the quota."""
    store = KeyStore(StoreConfig(maxkeys=5), clock=clock)
    made = 0
    with pytest.raises(E.EDQUOT):
        for _ in range(10):
            store.join_session(Caller(ALICE))
            made += 1
    assert made <= 5 and store.quota_usage(1000)[0] <= 5
    with pytest.raises(E.EPERM):
        store.join_session(Caller(BOB), ".builtin_trusted_keys")


def test_session_names_and_find_descriptions_have_the_kernel_s_size_limit(store, alice):
    """The kernel copies each with strndup_user(.., KEY_MAX_DESC_SIZE): over 4095 bytes, EINVAL.  Without
    it a name could be a whole frame, and each error quoting a description grew with it."""
    with pytest.raises(E.EINVAL):
        store.join_session(Caller(ALICE), "n" * 4096)
    with pytest.raises(E.EINVAL):
        store.find(alice, "user", "\x01" * 4096)
    _ring, token = store.join_session(Caller(ALICE), "n" * 4095)
    assert store.describe(Caller(ALICE, session_token=token), SESSION).description == "n" * 4095
    with pytest.raises(E.ENOKEY):
        store.find(alice, "user", "d" * 4095)


def test_a_name_joins_the_oldest_keyring_of_that_name_the_caller_may_search(clock):
    """As the kernel's find_keyring_by_name: the oldest first, one that grants search without possession;
    a keyring of the name that does not is passed over, a key of another type never matches."""
    store = KeyStore(clock=clock)
    made = []
    for _ in range(3):  # the default mask grants search to no one: each join makes one
        made.append(store.join_session(Caller(BOB), "team"))
        clock.advance(1)
    (first, bobs), (second, _), (third, _) = made
    for _serial, token in made[1:]:
        store.setperm(Caller(BOB, session_token=token), SESSION, 0x3f3f3f3f)
    store.add(Caller(ALICE), "user", "team", b"not a keyring", USER)
    assert len({first, second, third}) == 3
    assert store.join_session(Caller(ALICE), "team")[0] == second  # the oldest alice may search
    store.setperm(Caller(BOB, session_token=bobs), SESSION, 0x3f3f3f3f)
    assert store.join_session(Caller(ALICE), "team")[0] == first
    store.invalidate(Caller(BOB, session_token=bobs), SESSION)
    assert store.join_session(Caller(ALICE), "team")[0] == second  # a dead one is passed over


def test_restored_keyrings_of_a_name_are_joined_oldest_first_whatever_their_serials(clock):
    """Rows come back in serial order, and serials are random: filed so, a join by name after a restart
    took the keyring with the lowest serial, not the oldest (found by review)."""
    from keyden.core.store import PERSISTENT_KEYRING_PERM, Key

    store = KeyStore(clock=clock)
    home = Key(3_000_001, T.KEYRING, "_persistent.0", 0, P.NO_GID, PERSISTENT_KEYRING_PERM, None, 0, charged=False)
    older = Key(3_000_900, T.KEYRING, "team", 0, 0, 0x3F3F3F3F, None, 0, ctime=100.0)
    newer = Key(3_000_100, T.KEYRING, "team", 0, 0, 0x3F3F3F3F, None, 0, ctime=200.0)
    sub = Key(3_000_002, T.KEYRING, "more", 0, 0, 0x3F3F0000, None, 0, ctime=150.0)
    store.restore([home, sub, newer, older], [(home.serial, older.serial), (home.serial, sub.serial),
                                              (sub.serial, newer.serial)], [home.serial])
    assert store.join_session(Caller(ALICE), "team")[0] == older.serial


def test_joining_a_named_keyring_again_and_again_is_bounded_too(clock):
    """A join of an existing keyring makes no key, only a token, and a token outlives its connection: a uid
    holds at most as many as it may hold keys.  The tokens are indexed, so destroying their keyring or
    ending the session drops exactly its own."""
    store = KeyStore(StoreConfig(maxkeys=5), clock=clock)
    ring, first = store.join_session(Caller(BOB), "shared")
    store.setperm(Caller(BOB, session_token=first), SESSION, 0x3f3f3f3f)  # anyone may search, so join it
    tokens = [store.join_session(Caller(ALICE), "shared") for _ in range(5)]
    assert {serial for serial, _ in tokens} == {ring} and store.quota_usage(1000)[0] == 0  # no keys: tokens
    with pytest.raises(E.EDQUOT, match="session tokens"):
        store.join_session(Caller(ALICE), "shared")
    store.leave_session(Caller(ALICE), tokens[0][1])
    tokens[0] = store.join_session(Caller(ALICE), "shared")  # room again
    assert store.sessions(Caller(ALICE)) == [(ring, "shared")] == store.sessions(Caller(BOB))
    store.end_session(Caller(ALICE), ring)  # all of alice's tokens for it; bob's stays
    assert store.sessions(Caller(ALICE)) == [] and store.session_valid(first, BOB.uid)
    again = [store.join_session(Caller(ALICE), "shared")[1] for _ in range(2)]
    store.invalidate(Caller(BOB, session_token=first), ring)
    assert not any(store.session_valid(token, uid) for token, uid in [(first, BOB.uid)] + [(t, ALICE.uid) for t in again])
    assert store.sessions(Caller(ALICE)) == [] == store.sessions(Caller(BOB))
    store.join_session(Caller(ALICE))  # the invalidated keyring's tokens no longer count


def test_lost_sessions_are_listed_and_ended_by_their_uid_only(clock):
    """A token lost with its shell still holds its keyring and quota: its uid can find it and end it."""
    store = KeyStore(StoreConfig(maxkeys=4), clock=clock)
    lost = [store.join_session(Caller(ALICE))[0] for _ in range(3)]
    named, _token = store.join_session(Caller(ALICE), "work")
    bob_ring, _ = store.join_session(Caller(BOB))
    assert store.sessions(Caller(ALICE)) == sorted([(s, "_ses") for s in lost] + [(named, "work")])
    with pytest.raises(E.EDQUOT):  # four sessions fill alice's four keys
        store.join_session(Caller(ALICE))
    with pytest.raises(E.ENOKEY):  # not hers to end
        store.end_session(Caller(ALICE), bob_ring)
    for serial in lost:
        store.end_session(Caller(ALICE), serial)
    assert store.sessions(Caller(ALICE)) == [(named, "work")]
    store.join_session(Caller(ALICE))  # the quota is back
    with pytest.raises(E.ENOKEY):
        store.end_session(Caller(ALICE), lost[0])
    assert store.sessions(Caller(BOB)) == [(bob_ring, "_ses")]


def test_named_sessions_are_joined_only_where_search_is_granted(store):
    ring, _ = store.join_session(Caller(ALICE), "work")
    again, _ = store.join_session(Caller(ALICE), "work")
    assert again != ring  # 0x3f130000 grants its owner no search without possession
    owner = Caller(ALICE, session_token=store.join_session(Caller(ALICE), "shared")[1])
    shared = store.resolve(owner, SESSION)
    store.setperm(owner, shared, 0x3F1B0000)  # owner may search
    assert store.join_session(Caller(ALICE), "shared")[0] == shared
    assert store.join_session(Caller(BOB), "shared")[0] != shared
    store.setperm(owner, shared, 0x3F1B0008)  # anyone may search
    assert store.join_session(Caller(BOB), "shared")[0] == shared


def test_a_session_token_works_only_for_its_uid(store):
    ring, token = store.join_session(Caller(ALICE))
    assert store.session_valid(token, 1000) and not store.session_valid(token, 1001)
    impostor = Caller(BOB, session_token=token)  # the daemon refuses it at HELLO; the store gives it no session
    with pytest.raises(E.ENOKEY, match="session has ended"):
        store.resolve(impostor, SESSION)
    with pytest.raises(E.ENOKEY):
        store.leave_session(impostor, token)
    assert store.resolve(Caller(ALICE, session_token=token), SESSION) == ring


@pytest.mark.parametrize("ending", ["leave", "end", "invalidate"])
def test_a_connection_whose_session_ended_has_no_session_not_the_user_session_keyring(store, ending):
    """Its @s is ENOKEY and it possesses nothing through a session: moved quietly to _uid_ses, its next
    add to @s would land where every session-less process of the uid possesses it."""
    alice = session(store, ALICE)
    ring, key = store.resolve(alice, SESSION), add_user(store, alice, "in-session")
    store.setperm(alice, key, 0x3F010000)  # the possessor may read it, the owner only view it
    assert store.read(alice, key) == b"value"
    store.link(alice, key, USER)  # something else holds the key once the session is gone
    ended = {"leave": lambda: store.leave_session(Caller(ALICE), alice.session_token),
             "end": lambda: store.end_session(Caller(ALICE), ring),
             "invalidate": lambda: store.invalidate(alice, ring)}
    ended[ending]()
    for use in (lambda: store.resolve(alice, SESSION), lambda: add_user(store, alice, "after")):
        with pytest.raises(E.ENOKEY, match="session has ended"):
            use()
    with pytest.raises(E.EACCES):  # no longer possessed through the session
        store.read(alice, key)
    with pytest.raises(E.ENOKEY):
        store.search(Caller(ALICE), USER_SESSION, "user", "after")


def test_leaving_a_session_drops_its_keyring_unless_something_holds_it(store):
    alice = session(store, ALICE)
    ring = store.resolve(alice, SESSION)
    key = add_user(store, alice)
    store.leave_session(alice, alice.session_token)
    assert not store.session_valid(alice.session_token, 1000)
    assert not alive(store, Caller(ALICE), ring) and not alive(store, Caller(ALICE), key)
    with pytest.raises(E.ENOKEY):
        store.leave_session(alice, alice.session_token)
    kept = session(store, ALICE)
    kept_ring = store.resolve(kept, SESSION)
    store.link(kept, kept_ring, USER)
    store.leave_session(kept, kept.session_token)
    assert store.read(Caller(ALICE), USER) == [kept_ring]


# ---------------------------------------------------------- restrict_keyring

def test_restrict_keyring_without_a_type_refuses_all_later_links(store, alice):
    ring = newring(store, alice, "locked")
    inside = add_user(store, alice, "inside", ring=ring)
    store.restrict_keyring(alice, ring)
    with pytest.raises(E.EPERM):
        store.link(alice, add_user(store, alice, "outside"), ring)
    with pytest.raises(E.EPERM):
        add_user(store, alice, "new", ring=ring)
    with pytest.raises(E.EPERM):  # even an in-place update goes through the restriction
        add_user(store, alice, "inside", b"changed", ring=ring)
    assert store.read(alice, ring) == [inside]
    store.unlink(alice, inside, ring)  # unlinking is not restricted
    with pytest.raises(E.EEXIST):
        store.restrict_keyring(alice, ring)


@pytest.mark.parametrize("type_name, restriction, error", [
    ("user", "", E.EINVAL),
    ("", "builtin_trusted", E.EINVAL),
    ("nosuchtype", "x", E.ENOKEY),
    ("user", "x", E.ENOENT),
    (".internal", "x", E.EPERM),
])
def test_restrict_keyring_argument_errors(store, alice, type_name, restriction, error):
    with pytest.raises(error):
        store.restrict_keyring(alice, newring(store, alice, "r"), type_name, restriction)


def test_restrict_keyring_needs_setattr(store, alice):
    ring = newring(store, alice, "r")
    store.setperm(alice, ring, 0x1F010000)
    with pytest.raises(E.EACCES):
        store.restrict_keyring(alice, ring)


# ------------------------------------------------------------- request, find

def test_request_searches_the_callers_keyrings_and_links_into_dest(store, alice):
    ring = newring(store, alice, "r")
    key = add_user(store, alice, "wanted", ring=ring)
    dest = newring(store, alice, "dest")
    assert store.request(alice, "user", "wanted", dest) == key
    assert store.read(alice, dest) == [key]
    with pytest.raises(E.ENOKEY):
        store.request(alice, "user", "absent")
    with pytest.raises(E.ENOKEY):  # another session of alice's does not see it
        store.request(session(store, ALICE), "user", "wanted")


def test_find_falls_back_to_any_key_the_caller_may_view(store, alice):
    key = add_user(store, alice, "findme")
    elsewhere = session(store, ALICE)
    assert store.find(elsewhere, "user", "findme") == key  # alice may view her own keys
    with pytest.raises(E.ENOKEY):
        store.find(session(store, CAROL), "user", "findme")  # other: no view
    # The first namesake in serial order, whatever was made or destroyed since (the store indexes names)
    more = sorted([key] + [add_user(store, session(store, ALICE), "findme", perm=0x3F3F0000) for _ in range(3)])
    assert store.find(elsewhere, "user", "findme") == more[0]
    store.invalidate(alice, more[0])
    assert store.find(elsewhere, "user", "findme") == more[1]
    with pytest.raises(E.ENOKEY):
        store.find(elsewhere, "logon", "findme")  # another type's name


def test_find_passes_over_revoked_and_expired_keys(store, alice, clock):
    """keyutils skips a key its describe fails on; a revoked or expired key was found, so `describe
    %user:foo` said EKEYREVOKED and `unlink %user:foo` removed the dead key instead of "Can't find"."""
    revoked, expiring = add_user(store, alice, "gone"), add_user(store, alice, "later")
    store.revoke(alice, revoked)
    store.set_timeout(alice, expiring, 1)
    clock.advance(2)
    elsewhere = session(store, ALICE)
    for caller in (alice, elsewhere):
        with pytest.raises(E.EKEYREVOKED if caller is alice else E.ENOKEY):  # request_key's answer, if any
            store.find(caller, "user", "gone")
        with pytest.raises(E.ENOKEY):
            store.find(caller, "user", "later")
    fresh = add_user(store, elsewhere, "gone")  # a live namesake elsewhere is found
    assert store.find(alice, "user", "gone") == fresh


def mine(store, caller, **kw) -> dict[int, KeyStatus]:
    """The caller's /proc/keys view, by serial."""
    found, after = store.keys(caller, **kw)
    assert after == 0  # every key looked at
    return {k.serial: k for k in found}


def test_keys_lists_what_the_caller_may_view_in_serial_order_as_proc_keys(store, alice, bob, clock):
    """proc_keys_show: every key the caller may view (possession counts), with its state and time left."""
    plain = add_user(store, alice, "plain", b"12345")
    ring = newring(store, alice, "ring")
    timed = add_user(store, alice, "timed", ring=ring)
    store.set_timeout(alice, timed, 2 * 3600 + 5)
    revoked = add_user(store, alice, "revoked")
    store.revoke(alice, revoked)
    private = store.add(alice, "user", "pos-only", b"x", SESSION, perm=0x3F000000)
    shared = add_user(store, bob, "shared")
    store.setperm(bob, shared, 0x3F010001)  # others may view

    seen = mine(store, alice)
    found, _ = store.keys(alice)
    assert [k.serial for k in found] == sorted(seen)
    assert shared in seen and private in seen  # viewable by others' bit; possessed (possessor view only)
    assert not {k.serial for k in store.keys(bob)[0]} & {plain, timed, revoked, private}
    assert private not in mine(store, session(store, ALICE))  # alice's other session does not possess it

    now = clock()
    assert seen[plain].proc_line(now) == (
        f"{plain:08x} I--Q---     1 perm 3f010000  1000  1000 user      plain: 5")
    assert seen[ring].summary == "1" and seen[ring].type == "keyring"
    assert seen[timed].time_left(now) == "2h" and seen[timed].expiry == now + 2 * 3600 + 5
    assert seen[revoked].revoked and seen[revoked].proc_line(now).split()[1:4] == ["IR-Q---", "1", "expd"]  # as the kernel
    assert not any(k.expired or k.no_export for k in seen.values())
    for left, shown in ((2 * 3600 + 5, "2h"), (3600, "1h"), (3599, "59m"), (60, "1m"), (59, "59s"), (0.25, "1s"),
                        (0, "expd")):
        clock.now = seen[timed].expiry - left
        assert mine(store, alice)[timed].time_left(clock()) == shown
    assert mine(store, alice)[timed].expired  # listed (until collected), as the kernel does
    store.clear(alice, ring)
    assert mine(store, alice)[ring].summary == "empty"


@pytest.mark.parametrize("seed", range(8))
def test_keys_works_out_possession_in_one_walk_as_each_keys_own_search_would(store, seed):
    """The listing's possession set is what a search per key finds, over random trees: nested and shared
    keyrings, masks without search, revoked keyrings, keys deeper than the nesting limit."""
    import random

    rng = random.Random(seed)
    callers = [session(store, cred) for cred in (ALICE, ALICE, BOB, CAROL)]
    rings = {caller: [SESSION] for caller in callers}
    made: list[tuple[Caller, int]] = []
    for _ in range(60):
        caller = rng.choice(callers)
        parent = rng.choice(rings[caller])
        if rng.random() < 0.4:
            serial = newring(store, caller, f"r{len(made)}", parent)
            rings[caller].append(serial)
        else:
            serial = add_user(store, caller, f"k{len(made)}", ring=parent)
        made.append((caller, serial))
    changes = [*((lambda c, k: store.setperm(c, k, rng.choice([0x3F010000, 0x37010000, 0x3F3F3F3F, 0x3F000808,
                                                                 0x08000000])),) * 25),
               *((lambda c, k: store.link(c, k, rng.choice(rings[rng.choice(callers)])),) * 6),
               *((lambda c, k: store.revoke(c, k),) * 4),
               lambda c, k: store.setperm(c, SESSION, 0x37030000)]  # a session keyring possession cannot search
    for change in changes:
        try:
            change(*rng.choice(made))
        except E.KeydenError:
            pass  # not permitted (an earlier change took the right away), a loop...: the tree stays as it is
    for caller in callers:
        one_walk = store._possessed_serials(caller)
        assert one_walk == {serial for serial, key in store._keys.items() if store._is_possessed(caller, key)}


def test_keys_pages_in_serial_order_and_looks_at_a_bounded_number_of_keys_per_page(store, alice, bob):
    """Each page ends at ``limit`` keys or after ``scan`` serials (the store is locked meanwhile), and says
    where the next starts: a page may be empty (bob's keys are not alice's to view) and still go on."""
    made = sorted(add_user(store, alice, f"k{i}") for i in range(5))
    hidden = {add_user(store, bob, f"b{i}") for i in range(20)}
    for limit, scan in ((2, 8192), (1024, 3), (1, 1)):
        listed, after, pages = [], 0, 0
        while True:
            page, after_next = store.keys(alice, after=after, limit=limit, scan=scan)
            assert len(page) <= min(limit, scan) and (after_next == 0 or after_next > after)
            listed += [k.serial for k in page]
            pages += 1
            if not after_next:
                break
            after = after_next
        assert listed == sorted(listed) and set(made) <= set(listed) and not hidden & set(listed)
        assert listed == [k.serial for k in store.keys(alice)[0]]
    assert pages > len(listed)  # scan=1: a page per key, bob's included, most of them empty
    assert store.keys(alice, after=max(store._keys)) == ([], 0)
    store.invalidate(alice, made[0])  # gone between two pages: the next page goes on after it all the same
    assert made[0] not in {k.serial for k in store.keys(alice, after=0)[0]}


def test_a_page_of_keys_looks_at_2048_serials_at_most_by_default(clock):
    """8192 held the loop about 4.5 ms for a caller who may view none of them (a fairness hunt)."""
    store = KeyStore(StoreConfig(maxkeys=5000, maxbytes=10**6), clock=clock)
    bob = Caller(BOB)
    hidden = sorted(add_user(store, bob, f"b{i}") for i in range(3000))
    page, after = store.keys(Caller(ALICE))
    assert page == [] and hidden[0] <= after < hidden[-1]
    assert sum(s <= after for s in store._keys) <= 2048
    for bad in ({"limit": 0}, {"scan": 0}):
        with pytest.raises(E.EINVAL):
            store.keys(alice, **bad)


def test_a_non_exportable_key_is_eperm_only_to_whoever_may_view_it(store, alice):
    """EPERM (no mask would let it out) before EACCES for a missing read right, but only where the key's own
    mask lets the caller view it: possession inherited from the exported keyring does not count for that."""
    top = newring(store, alice, "top")
    inner = newring(store, alice, "inner", top)
    hidden = add_user(store, alice, "hidden", ring=inner, flags=NO_EXPORT)
    store.setperm(alice, hidden, 0x01000000)  # its possessor may view it; its owner nothing
    seen = add_user(store, alice, "seen", ring=top, flags=NO_EXPORT)
    store.setperm(alice, seen, 0x01010000)  # viewable by its owner too; readable by nobody
    with pytest.raises(E.EPERM):
        store.export_tree(alice, seen)
    store.unlink(alice, seen, top)
    store.setperm(alice, inner, 0x37370000)  # no search: a search does not reach "hidden", so it is not possessed
    assert hidden not in mine(store, alice)
    with pytest.raises(E.EACCES):  # as for any key it may not view: its flag is not told
        store.export_tree(alice, top)
    # A revoked member's state likewise: told to whoever may view it, not to others.
    shown = newring(store, alice, "shown")
    gone = store.add(alice, "user", "gone", b"x", shown, perm=0x29000000)  # possessor: view, search, setattr
    store.revoke(alice, gone)
    with pytest.raises(E.EKEYREVOKED):
        store.export_tree(alice, shown)
    store.setperm(alice, shown, 0x37370000)  # no search: "gone" is no longer possessed, so not viewable
    with pytest.raises(E.EACCES):
        store.export_tree(alice, shown)


def test_an_export_reads_each_key_by_its_own_possession(store, alice):
    """The exported keyring's possession was lent to every key below it: a key granting its possessor no
    search, or under a keyring granting none, each EACCES alone, left inside an export of the keyring, to a
    wrapping key the caller holds (with another uid's key linked in: its bytes; found by a hunt)."""
    top = newring(store, alice, "top")
    no_search = add_user(store, alice, "no search", ring=top)
    store.setperm(alice, no_search, 0x37000000)  # possessor: all but search (never possessed by a search)
    closed = newring(store, alice, "closed", top)
    below = add_user(store, alice, "below", ring=closed)
    store.setperm(alice, below, 0x3F000000)
    store.setperm(alice, closed, 0x37230000)  # possessor: all but search; owner: view, read, setattr
    for key in (no_search, below):
        with pytest.raises(E.EACCES):
            store.export_tree(alice, key)
    with pytest.raises(E.EACCES):
        store.export_tree(alice, top)
    store.unlink(alice, no_search, top)
    with pytest.raises(E.EACCES):  # "below" still: "closed" is read by its owner bits, "below" is not possessed
        store.export_tree(alice, top)
    store.setperm(alice, closed, 0x3F010000)
    assert {e.description for e in store.export_tree(alice, top)[0]} == {"top", "closed", "below"}
    # A possessed top lends possession as a search from it would: @u, which the session does not link, and
    # keys deeper than a search from @s reaches but within its reach from the top (exports that must work)
    add_user(store, alice, "in @u", ring=USER)
    assert len(store.export_tree(alice, USER)[0]) == 2
    ring = persistent = store.get_persistent(alice, -1, SESSION)
    for depth in range(6):
        ring = newring(store, alice, f"d{depth}", ring)
    add_user(store, alice, "deep", ring=ring)
    assert len(store.export_tree(alice, persistent)[0]) == 8


def test_a_non_exportable_key_is_found_first_however_the_tree_reaches_it(store, alice, clock):
    """EPERM comes first for a non-exportable key anywhere the caller may read, even where the walk first
    meets its keyring at the depth limit (it is looked into from the least depth it is met at), and never
    from inside a keyring that may not be used (an expired one's members stay untold)."""
    top = newring(store, alice, "top")
    near = newring(store, alice, "near", top)  # filed first, walked last
    far = newring(store, alice, "far", top)
    shared = newring(store, alice, "shared", near)
    store.add(alice, "logon", "svc:unreadable", b"x" * 32, shared)  # met before the sealed key: EACCES
    add_user(store, alice, "sealed", ring=shared, flags=NO_EXPORT)
    ring = far
    for depth in range(2, 7):  # top 0, far 1, chain 2..6: shared is met 7 deep on this side
        ring = newring(store, alice, f"chain{depth}", ring)
    store.link(alice, shared, ring)
    with pytest.raises(E.EPERM):
        store.export_tree(alice, top)

    expired = newring(store, alice, "expired")
    inner = newring(store, alice, "inner", expired)
    add_user(store, alice, "sealed", ring=inner, flags=NO_EXPORT)
    outer = newring(store, alice, "outer")
    store.link(alice, expired, outer)
    store.set_timeout(alice, expired, 10)
    store.setperm(alice, expired, 0x0A000000)  # its possessor may read and search it, not view it
    clock.advance(11)
    with pytest.raises(E.EKEYEXPIRED):  # the expired keyring's own state, told after the read check
        store.export_tree(alice, outer)


def test_an_export_reaches_as_deep_as_a_search_and_says_what_to_export_instead(store, alice):
    """A chain linked top-down may go deeper than 6 (no link checks what hangs above); its export failed with
    a bare 'nested too deeply'.  It names the keyring to export on its own, and that export works."""
    top = ring = newring(store, alice, "top")
    chain = []
    for depth in range(1, 9):  # its owner may use each keyring (possession ends 6 down)
        ring = store.add(alice, "keyring", f"level{depth}", b"", ring, perm=0x3f3f0000)
        chain.append(ring)
    with pytest.raises(E.ELOOP, match=f"keyring {chain[6]} is more than 6 levels below .* export it on its own"):
        store.export_tree(alice, top)
    keys, links = store.export_tree(alice, chain[6])
    assert [k.description for k in keys] == ["level7", "level8"] and links == [(0, 1)]


def test_an_export_counts_a_keyring_from_its_shallowest_link(store, alice):
    """A keyring linked 7 down (below a chain of six) and then one down: the export took it at 7 (the
    first link it met) and refused the tree, ELOOP, where linking it the other way round exported it."""
    top = ring = newring(store, alice, "top")
    for depth in range(1, 7):
        ring = store.add(alice, "keyring", f"level{depth}", b"", ring, perm=0x3f3f0000)
    shared = store.add(alice, "keyring", "shared", b"", ring, perm=0x3f3f0000)
    store.add(alice, "user", "inside", b"x", shared, perm=0x3f3f0000)
    store.link(alice, shared, top)
    keys, links = store.export_tree(alice, top)
    assert sorted(k.description for k in keys) == sorted(
        ["top", "shared", "inside", *(f"level{d}" for d in range(1, 7))])
    assert len(links) == 9  # the chain's 6, "shared" in level6 and in top, "inside" in "shared"


def test_an_empty_asymmetric_key_id_matches_nothing_it_is_einval(store, alice):
    """asymmetric_key_hex_to_key_id refuses an empty id; "id:" matched every key (a suffix of any id)."""
    for wanted in ("id:", "ex:"):
        with pytest.raises(E.EINVAL):
            store.search(alice, SESSION, "asymmetric", wanted)


# ------------------------------------------------------------ thread safety

def test_material_is_a_copy_that_a_later_update_or_revoke_cannot_wipe(store, alice):
    key = add_user(store, alice, "k", b"first key bytes")
    material = store.material(alice, key, "gcm(aes)")
    store.update(alice, key, b"second")
    assert material == b"first key bytes"
    material2 = store.material(alice, key, "gcm(aes)")
    assert material2 == b"second"
    store.revoke(alice, key)
    assert material2 == b"second"
    with pytest.raises(E.EKEYREVOKED):
        store.material(alice, key, "gcm(aes)")
    with pytest.raises(E.ENOPROTOOPT):
        store.material(alice, newring(store, alice, "r"), "gcm(aes)")


def test_a_generated_key_keys_only_its_use(store, alice):
    """FOR_USE: set at creation, checked for material and cached engines alike; None (wrapping) takes any
    key, and keys made without a use key anything."""
    from keyden.core.flags import FOR_USE
    assert len(set(FOR_USE.values())) == len(FOR_USE) and not sum(FOR_USE.values()) & (NO_EXPORT | ~0xff)
    logon = T.REGISTRY["logon"]
    made = store.create_internal(alice, logon, "app:gcm", logon.preparse(b"k" * 32)[0], 32, SESSION,
                                 flags=FOR_USE["gcm(aes)"] | NO_EXPORT)
    plain = add_user(store, alice, "plain", b"k" * 32)
    assert store.material(alice, made, "gcm(aes)") == store.material(alice, made, None) == b"k" * 32
    for use in ("ctr(aes)", "gcm-siv(aes)", "hmac", "rfc7539(chacha20,poly1305)"):
        with pytest.raises(E.ENOPROTOOPT, match=r"generated for gcm\(aes\) only"):
            store.material(alice, made, use)
        with pytest.raises(E.ENOPROTOOPT):
            store.engine(alice, made, use, "alg", lambda m: object())
        assert store.material(alice, plain, use) == b"k" * 32
    shown = {k.serial: k for k in store.keys(alice)[0]}
    assert shown[made].summary == "32 for gcm(aes)" and shown[plain].summary == "32"  # in keyden keys


def test_objects_made_from_a_key_go_with_its_payload(store, alice, bob):
    """Cipher engines hold the key loaded in OpenSSL: they are made once per payload, shared, and dropped
    when the key is updated, revoked or destroyed (a per-connection cache kept them until it closed)."""
    key = add_user(store, alice, "k", b"first key bytes")
    made = []

    def make(material):
        made.append(material)
        return object()

    engine = store.engine(alice, key, "gcm(aes)", "alg", make)
    assert store.engine(alice, key, "gcm(aes)", "alg", make) is engine and made == [b"first key bytes"]
    assert store.engine(alice, key, "gcm(aes)", "other", make) is not engine  # one per algorithm
    with pytest.raises(E.EACCES):  # permission is checked on every call, cached or not
        store.engine(bob, key, "gcm(aes)", "alg", make)
    store.update(alice, key, b"second")
    assert store.engine(alice, key, "gcm(aes)", "alg", make) is not engine and made[-1] == b"second"
    held = store.iter_keys()
    live = next(k for k in held if k.serial == key)
    store.revoke(alice, key)
    assert live.engines is None
    with pytest.raises(E.EKEYREVOKED):
        store.engine(alice, key, "gcm(aes)", "alg", make)
    other = add_user(store, alice, "k2", b"x")
    store.engine(alice, other, "gcm(aes)", "alg", make)
    live = next(k for k in store.iter_keys() if k.serial == other)
    store.unlink(alice, other, SESSION)
    assert live.dead and live.engines is None


@pytest.mark.parametrize("call", [
    lambda s, c, k: s.read(c, k), lambda s, c, k: s.describe(c, k), lambda s, c, k: s.update(c, k, b"x"),
    lambda s, c, k: s.add(c, "user", "t", b"x", SESSION), lambda s, c, k: s.quota_usage(1000),
    lambda s, c, k: s.iter_keys(), lambda s, c, k: len(s), lambda s, c, k: s.collect(),
    lambda s, c, k: s.session_valid(c.session_token, 1000), lambda s, c, k: s.asymmetric(c, k, "sign"),
    lambda s, c, k: s.material(c, k, "gcm(aes)"),
], ids=["read", "describe", "update", "add", "quota_usage", "iter_keys", "len", "collect", "session_valid",
        "asymmetric", "material"])
def test_public_methods_wait_for_the_store_lock(store, alice, call):
    key = add_user(store, alice)
    done = threading.Event()

    def run():
        try:
            call(store, alice, key)
        except E.KeydenError:
            pass
        done.set()

    with store.lock:
        worker = threading.Thread(target=run)
        worker.start()
        assert not done.wait(0.05)
    assert done.wait(5)
    worker.join()


def test_concurrent_adds_and_unlinks_keep_the_books_straight(store):
    root = session(store, ROOT)
    before = store.quota_usage(0)

    def churn(n):
        for i in range(50):
            key = add_user(store, root, f"t{n}-{i}", b"x" * 10)
            if i % 2:
                store.unlink(root, key, SESSION)

    threads = [threading.Thread(target=churn, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = 8 * 25
    assert len(store.read(root, SESSION)) == kept
    expected_bytes = before[1] + sum(len(f"t{n}-{i}") + 1 + 10 + 4 for n in range(8) for i in range(0, 50, 2))
    assert store.quota_usage(0)[:2] == (before[0] + kept, expected_bytes)


def test_possession_is_recomputed_after_the_tree_changes(store):
    """Possession answers are cached; every change to links, masks or sessions must invalidate them."""
    alice = session(store, ALICE)
    ring = store.add(alice, "keyring", "r", b"", SESSION)
    key = add_user(store, alice, ring=ring)
    store.setperm(alice, key, 0x3F000000)  # possessor only
    store.setperm(alice, ring, 0x3F3F0000)  # alice may re-link the keyring without possessing it
    assert store.read(alice, key) == b"value"
    store.link(alice, ring, USER)  # keeps the keyring alive, but alice's session does not reach @u
    store.unlink(alice, ring, SESSION)
    with pytest.raises(E.EACCES):
        store.read(alice, key)
    store.link(alice, ring, SESSION)
    assert store.read(alice, key) == b"value"
    store.setperm(alice, ring, 0x37370000)  # the keyring no longer grants search: not entered
    with pytest.raises(E.EACCES):
        store.read(alice, key)
    store.setperm(alice, ring, 0x3F3F0000)
    assert store.read(alice, key) == b"value"


def test_an_unnamed_key_made_inside_never_takes_a_name_its_keyring_files(store, monkeypatch):
    """Derived and generated keys without a description get '<prefix><8 hex>'; a clash of the random part
    (birthday odds grow with the keyring) must pick another name, not displace and destroy the older key."""
    alice = session(store, Credentials(1000, 1000))
    names = iter(["00c0ffee", "00c0ffee", "00c0ffee", "0badf00d"])
    monkeypatch.setattr(store_module.secrets, "token_hex", lambda n: next(names))
    logon = T.REGISTRY["logon"]
    first = store.create_internal(alice, logon, "", logon.preparse(b"k" * 32)[0], 32, SESSION,
                                  unique_prefix="keyden:session-")
    second = store.create_internal(alice, logon, "", logon.preparse(b"q" * 32)[0], 32, SESSION,
                                   unique_prefix="keyden:session-")
    assert alive(store, alice, first) and alive(store, alice, second)
    assert store.describe(alice, first).description == "keyden:session-00c0ffee"
    assert store.describe(alice, second).description == "keyden:session-0badf00d"


def test_an_internal_key_never_displaces_a_namesake(store):
    """A key the daemon made (generated, derived, imported) may be the only copy of one it would displace:
    the check and the filing are one step under the lock, so a key another client filed under the same
    name meanwhile is refused, not displaced and destroyed."""
    alice = session(store, Credentials(1000, 1000))
    logon = T.REGISTRY["logon"]
    there = store.add(alice, "logon", "app:k", b"first", SESSION)
    usage = store.quota_usage(1000)
    with pytest.raises(E.EEXIST):
        store.create_internal(alice, logon, "app:k", logon.preparse(b"second")[0], 6, SESSION)
    assert alive(store, alice, there) and store.search(alice, SESSION, "logon", "app:k") == there
    assert store.quota_usage(1000) == usage  # nothing made, nothing left charged


# ------------------------------------------------------- orphans at restore

def test_adopted_orphans_go_under_their_owners_persistent_keyring_one_of_a_name_per_keyring(store):
    """restore(adopt=True), for an operator's one start: keys whose keyrings were skipped (damaged, rolled
    back) are filed, with what hangs below them, in 'keyden:recovered' in their owner's persistent keyring
    (made for a uid that has none); a second key of a name goes into 'keyden:recovered.2'."""
    from keyden.core.store import PERSISTENT_KEYRING_PERM, Key

    def user_key(serial, uid, desc):
        value, quota_len = T.lookup("user").preparse(f"payload {serial}".encode(), None)
        return Key(serial, T.lookup("user"), desc, uid, uid, 0x3F3F0000, value, quota_len)

    home = Key(1_000_001, T.KEYRING, "_persistent.0", 0, P.NO_GID, PERSISTENT_KEYRING_PERM, None, 0, charged=False)
    sub = Key(1_000_002, T.KEYRING, "sub", 0, 0, 0x3F3F0000, None, 0)
    first, second, below, theirs = (user_key(1_000_003, 0, "k"), user_key(1_000_004, 0, "k"),
                                    user_key(1_000_005, 0, "below"), user_key(1_000_006, 1000, "k"))
    keys = [home, sub, first, second, below, theirs]
    skipped = [1_000_007, 1_000_008]  # the keyrings that held them, whose rows did not open
    orphans, _merged, adopted = store.restore(keys, [(sub.serial, below.serial)], [home.serial], skipped, adopt=True)

    assert orphans == []
    assert all(key.persisted for key in keys)
    assert sorted((ring.uid, ring.description) for ring, _filed in adopted) == [
        (0, "keyden:recovered"), (0, "keyden:recovered.2"), (1000, "keyden:recovered")]
    mine = home.links[("keyring", "keyden:recovered")]
    again = home.links[("keyring", "keyden:recovered.2")]
    assert {k.serial for k in mine.links.values()} == {first.serial, sub.serial}
    assert [k.serial for k in again.links.values()] == [second.serial]
    assert sub.links == {below.index: below}  # what hung below an orphan stays below it
    root = session(store, ROOT)
    assert store.search(root, store.get_persistent(root, 1000, SESSION), "user", "k") == theirs.serial


def test_orphans_not_adopted_are_dropped_and_their_serials_reserved(store, monkeypatch):
    from keyden.core.store import PERSISTENT_KEYRING_PERM, Key

    home = Key(1_000_001, T.KEYRING, "_persistent.0", 0, P.NO_GID, PERSISTENT_KEYRING_PERM, None, 0, charged=False)
    value, quota_len = T.lookup("user").preparse(b"x", None)
    lost = Key(1_000_002, T.lookup("user"), "k", 0, 0, 0x3F3F0000, value, quota_len)
    orphans, _merged, adopted = store.restore([home, lost], [], [home.serial], [1_000_003])
    assert orphans == [lost.serial] and adopted == []
    root = session(store, ROOT)
    assert not alive(store, root, lost.serial) and home.links == {}
    monkeypatch.setattr(store_module, "secrets", ScriptedRandom([lost.serial] * 5 + [1_234_567]))
    assert add_user(store, root, "new") == 1_234_567  # its row stays on disk: the serial is never handed out


def test_adoption_passes_over_a_recovered_keyring_that_is_not_as_made_and_never_makes_a_loop(store):
    """Found by review: an earlier 'keyden:recovered' given a timeout took the adopted keys and, expiring,
    had them collected (their rows deleted); one linked into another uid's keyring, or restricted, would have
    shared or refused them; and an orphan keyring holding the recovered keyring, or the persistent keyring
    itself, made a loop nothing could reach or collect."""
    from keyden.core.store import PERSISTENT_KEYRING_PERM, RECOVERED_KEYRING, Key

    def ring_key(serial, desc, uid=0, perm=0x3F3F0000):
        return Key(serial, T.KEYRING, desc, uid, 0, perm, None, 0)

    home = Key(2_000_001, T.KEYRING, "_persistent.0", 0, P.NO_GID, PERSISTENT_KEYRING_PERM, None, 0, charged=False)
    timed = ring_key(2_000_002, RECOVERED_KEYRING, perm=PERSISTENT_KEYRING_PERM)
    timed.expiry = 2_000_000.0  # its owner set a timeout on it
    holds_home, other = ring_key(2_000_003, "holds-home"), ring_key(2_000_004, "other")
    value, quota_len = T.lookup("user").preparse(b"x", None)
    plain = Key(2_000_005, T.lookup("user"), "k", 0, 0, 0x3F3F0000, value, quota_len)
    links = [(home.serial, timed.serial), (holds_home.serial, home.serial)]
    orphans, _merged, adopted = store.restore([home, timed, holds_home, other, plain], links, [home.serial],
                                              [2_000_009], adopt=True)
    assert orphans == [holds_home.serial]  # filing it under the keyring it holds would make a loop
    assert {ring.description for ring, _filed in adopted} == {f"{RECOVERED_KEYRING}.2"}  # not the timed one
    second = home.links[("keyring", f"{RECOVERED_KEYRING}.2")]
    assert {k.serial for k in second.links.values()} == {other.serial, plain.serial} and not timed.links
    assert not any(_reaches(k, k) for k in (home, second, other))


def _reaches(start, target) -> bool:
    todo, seen = list(start.links.values()), set()
    while todo:
        key = todo.pop()
        if key is target:
            return True
        if key.links is not None and key.serial not in seen:
            seen.add(key.serial)
            todo += key.links.values()
    return False
