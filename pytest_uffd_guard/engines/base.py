"""The seam between a GuardedBuffer and the engine that tracks it.

A GuardedBuffer owns its mapping and snapshot; a :class:`Tracker` owns
everything kernel-side about seeing writes into it (a :class:`Region`).
Engines implement the protocol and import this module, never the registry
(``engines/__init__.py``), which imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import TrackingStoppedError
from ..kernel import process
from ..kernel.memory import PAGE_SIZE
from ..kernel.records import WriteRecord

#: Why a tracker that holds kernel registrations stopped in a forked child.
INHERITED = "this buffer was inherited across fork(); it is not tracked in the child"


class Tracker(Protocol):
    """Kernel-side tracking of one mapping."""

    #: Engine name shown to users ("sync", ...).
    name: str
    #: Writes recorded since the last drain did not fit the log.
    overflow: int

    def arm(self) -> None:
        """Protect every page.  Called on a range that is not protected."""

    def pause(self) -> None:
        """Un-protect every page (waking blocked writers); record nothing."""

    def resume(self) -> None:
        """Protect every page again after ``pause``."""

    def drain(self) -> list[WriteRecord]:
        """Records that arrived since the last drain, oldest first."""

    def discard(self) -> None:
        """Drop records not drained yet (used when re-arming)."""

    def close(self) -> list[WriteRecord]:
        """Stop tracking for good, free any blocked writer, return the last records."""

    @property
    def stopped(self) -> str | None:
        """Why tracking stopped early (handler failure, fork), or None."""


class KernelTracked:
    """Stop state shared by the trackers that hold kernel registrations
    (sync, async): a copy inherited across fork() is never tracked."""

    #: The process generation the tracker was made in (``kernel.process``).
    _made_in: int
    _stopped: str | None

    @property
    def _inherited(self) -> bool:
        return process.inherited(self._made_in)

    @property
    def stopped(self) -> str | None:
        if self._inherited:
            return INHERITED
        return self._stopped

    def _check(self) -> None:
        reason = self.stopped
        if reason is not None:
            raise TrackingStoppedError(
                f"the buffer is no longer tracked: {reason}", "create a new GuardedBuffer"
            )


@dataclass(frozen=True)
class Region:
    """The memory a tracker watches."""

    #: Start of the mapping.
    address: int
    #: Mapped bytes: whole units.
    length: int
    #: Bytes in use (``len()`` of the buffer).
    size: int
    #: Address of the snapshot taken at arming (``length`` bytes).
    snapshot: int
    #: Page size of the mapping (a huge page for hugetlb).
    unit: int = PAGE_SIZE
    #: A weak reference to the object that owns the memory: a background
    #: thread (the hybrid watcher) holds the owner while it works on the
    #: region, so the memory cannot be unmapped under it.
    owner: Callable[[], object | None] | None = field(default=None, compare=False, repr=False)
