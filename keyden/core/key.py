"""The key model the store keeps: a key, who asks for it, what a keyring admits, and the limits.

Plain data with the checks that belong to one key (its state, its cost); everything that relates keys
to each other, to keyrings and to callers is the store's (core/store.py).  Nothing here leaves the
daemon: a key or an exported copy refuses to be pickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from keyden import errors as E
from keyden.core import keytypes as T
from keyden.core.perm import Credentials

if TYPE_CHECKING:
    from keyden.core.store import KeyStore


@dataclass
class StoreConfig:
    """Limits, with the kernel's defaults (key.maxkeys and friends)."""

    maxkeys: int = 200
    maxbytes: int = 20000
    root_maxkeys: int = 1000000
    root_maxbytes: int = 25000000
    gc_delay: float = 300.0
    keyring_max_links: int = 65536
    #: /proc/sys/kernel/keys/persistent_keyring_expiry: a persistent keyring expires this long after
    #: its last get_persistent (0: never).  The kernel's default is 3 days; keyden's is never, because
    #: a custodian that silently drops keys nobody fetched for a while loses data.
    persistent_keyring_expiry: float = 0.0
    #: Shared-memory regions (SHM_ATTACH) a uid may have the daemon map at once, and all uids together.
    #: The daemon locks its memory, so these bound what clients can pin in it (docs/dataplane.md).
    shm_maxbytes: int = 1 << 30
    shm_total_maxbytes: int = 4 << 30


@dataclass(frozen=True)
class Caller:
    """One request's identity: credentials plus the process and session it runs in."""

    cred: Credentials
    process: tuple[int, int] | None = None  # (pid, start time): with the credentials, names its process keyring
    session_token: str | None = field(default=None, repr=False)  # a bearer capability: never in a repr or log

    @property
    def uid(self) -> int:
        return self.cred.uid


#: Key.in_user_keyrings: a persistent keyring linked into its uid's user keyring (_uid.N, @u) and user
#: session keyring (_uid_ses.N, @us).
USER_KEYRING, USER_SESSION_KEYRING = 0x1, 0x2


class Key:
    """A key as the store keeps it.  Never leaves the daemon."""

    __slots__ = (
        "serial", "type", "description", "uid", "gid", "perm", "expiry", "payload", "quota_len",
        "revoked_at", "invalidated", "dead", "links", "parents", "pins", "restriction", "charged", "ctime",
        "flags", "persisted", "keep", "held_back", "engines", "in_user_keyrings", "__weakref__",
    )

    def __init__(self, serial: int, ktype: T.KeyType, description: str, uid: int, gid: int, perm: int,
                 payload: Any, quota_len: int, charged: bool = True, ctime: float = 0.0):
        self.serial = serial
        self.type = ktype
        self.description = description
        self.uid = uid
        self.gid = gid
        self.perm = perm
        self.expiry = 0.0  # 0: never
        self.payload = payload
        self.quota_len = quota_len  # the kernel's datalen: payload bytes, or LINK_BYTES per link of a keyring
        self.revoked_at: float | None = None
        self.invalidated = False
        self.dead = False
        self.links: dict[tuple[str, str], Key] | None = {} if ktype.is_keyring else None
        self.parents: set[Key] = set()
        self.pins = 0  # references from outside any keyring: sessions, per-uid and process keyrings, restrictions
        self.restriction: Restriction | None = None
        self.charged = charged
        self.ctime = ctime
        self.flags = 0  # NO_EXPORT, and what the key is bound to (BINDING_FLAGS)
        self.persisted = False  # reachable from a persistent keyring: the journal keeps it
        self.keep = ktype.keep  # KEY_FLAG_KEEP: no revoke, invalidate, clear, timeout; kept-in-kept never unlinked
        # A stored keyring's members whose records were skipped at start (reserved serials): still written
        # in its member list, so that a record an operator accepts later finds its place again.
        self.held_back: tuple[int, ...] = ()
        # A persistent keyring's links from its uid's user keyrings (USER_KEYRING, USER_SESSION_KEYRING bits):
        # stored with it, and made again in the keyrings a restarted daemon makes (KeyStore._note_user_link).
        self.in_user_keyrings = 0
        # Objects made from the payload (cipher engines, keyed by algorithm): dropped with it, so no copy
        # of the key outlives an update, a revoke or the key (KeyStore.engine).
        self.engines: dict[str, Any] | None = None

    @property
    def index(self) -> tuple[str, str]:
        """What a keyring files a key under: one key per (type, description) in each keyring."""
        return (self.type.name, self.description)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def defunct(self) -> bool:
        """Revoked or invalidated: never updated by add_key, never entered by a search."""
        return self.revoked or self.invalidated

    @property
    def cost(self) -> int:
        """Bytes charged to the owner: description with its NUL, plus payload (key_alloc's quotalen)."""
        return len(self.description.encode()) + 1 + self.quota_len

    def expired(self, now: float) -> bool:
        return bool(self.expiry) and now >= self.expiry

    def state_error(self, now: float) -> E.KeydenError | None:
        """key_validate: why this key may not be used, if it may not."""
        if self.invalidated:
            return E.ENOKEY(f"key {self.serial} has been invalidated")
        if self.revoked:
            return E.EKEYREVOKED()
        if self.expired(now):
            return E.EKEYEXPIRED()
        return None

    def __reduce__(self):
        raise TypeError("keys cannot be pickled")

    def __repr__(self) -> str:
        return f"<Key {self.serial} {self.type.name}:{self.description!r}>"


class Restriction(ABC):
    """What a restricted keyring admits (the kernel's key_restriction).

    ``check`` sees what a link would bring in, type and payload, and raises to
    refuse it; it runs for links, moves and add_key (even when add_key only
    updates a key already there).  ``key`` is the key or keyring the
    restriction trusts, if any: restriction chains must not loop.  The
    restriction holds it (a pin, as the kernel's key_restriction holds a
    reference) until the restricted keyring dies: unlinked everywhere, an
    anchor still vouches for what it signed.
    """

    description = "unrestricted"
    key: Key | None = None

    @abstractmethod
    def check(self, store: "KeyStore", keyring: Key, ktype: T.KeyType, payload: Any) -> None:
        """Raise to refuse a key of ``ktype`` with ``payload`` into ``keyring``."""


class DenyAll(Restriction):
    """KEYCTL_RESTRICT_KEYRING with no type: nothing may be linked in any more."""

    description = "no links"

    def check(self, store, keyring, ktype, payload):
        raise E.EPERM(f"keyring {keyring.serial} is restricted against all links")


@dataclass
class Exported:
    """One key of an export: a copy of what is needed to make it again elsewhere."""

    type: str
    description: str
    perm: int
    payload: Any  # bytes (user, logon), the parsed key (asymmetric), None (keyring)
    flags: int = 0  # its BINDING_FLAGS bits, so a copy does only what the key does (NO_EXPORT never leaves)

    def __repr__(self) -> str:
        return f"<Exported {self.type}:{self.description!r}>"

    def __reduce__(self):
        raise TypeError("an exported key holds its payload: it cannot be pickled or copied")
