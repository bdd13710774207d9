"""What the key store tells a durable backing store: the changes to keys that persist.

The store stays pure: it only reports, through this interface, that a key
under a persistent keyring (``Key.persisted``) changed, or stopped
persisting.  It calls these with its lock held, so an implementation must
only note what changed and do its slow work (sealing, disk I/O) in
``sync``, which the server calls before it answers a request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from keyden.core.key import Key


class Journal(ABC):
    @abstractmethod
    def on_store(self, key: "Key") -> None:
        """``key`` persists and its state (metadata, payload, or a keyring's members) is new: record it."""

    @abstractmethod
    def on_forget(self, serial: int) -> None:
        """The key with this serial no longer persists (destroyed, or unreachable from any persistent keyring)."""

    def on_link(self, ring: "Key", key: "Key") -> None:
        """``key`` was filed in persistent keyring ``ring`` (``key`` itself was already reported)."""
        self.on_store(ring)

    def on_unlink(self, ring: "Key", key: "Key") -> None:
        """``key`` was taken out of persistent keyring ``ring``."""
        self.on_store(ring)

    def mark(self) -> int:
        """The last change this thread reported (0: none): a request's marks before and after tell
        whether it changed anything persistent, and what ``sync`` must reach."""
        return 0

    def pending(self) -> int:
        """The mark of the last change anyone reported, if it is not on disk yet; 0 if all are.  A reply
        that may show such a change (another client's key just added, updated or made) waits for it too:
        nobody acts on a value a crash would take back."""
        return 0

    def pending_for(self, serial: int) -> bool:
        """Is a change to this key noted and not on disk yet?  (Store lock held.)"""
        return False

    def synced(self, upto: int) -> bool:
        """Are the changes up to mark ``upto`` on disk?  (Cheap: asked after such requests.)"""
        return True

    def sync(self, upto: int) -> None:
        """Make the changes up to mark ``upto`` durable, before a reply goes out (may block on the disk)."""


class NullJournal(Journal):
    """No backing store: nothing persists beyond the process."""

    def on_store(self, key: "Key") -> None:
        pass

    def on_forget(self, serial: int) -> None:
        pass

    def on_link(self, ring: "Key", key: "Key") -> None:
        pass

    def on_unlink(self, ring: "Key", key: "Key") -> None:
        pass
