"""The seam between a GuardedBuffer and the engine that tracks it.

A GuardedBuffer owns its mapping and snapshot; a :class:`Tracker` owns
everything kernel-side about seeing writes into it (a :class:`Region`).
Engines implement the protocol and import this module, never the registry
(``engines/__init__.py``), which imports them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import TrackingStoppedError
from ..kernel import process
from ..kernel.memory import PAGE_SIZE
from ..kernel.records import WriteRecord
from ..kernel.recordseq import RecordLog, Records


class StopReason(enum.Enum):
    """Why a tracker no longer tracks."""

    #: ``close()`` was called.
    CLOSED = "closed"
    #: The tracker was inherited across fork(): the child's copy is not tracked.
    INHERITED = "inherited"
    #: The fault handler gave up, or was stopped (interpreter exit).
    HANDLER = "handler"
    #: The hybrid engine could move the buffer neither to async nor back to sync.
    LOST = "lost"


@dataclass(frozen=True)
class Stop:
    """A reason to stop, and the sentence users see (``stopped_reason``)."""

    reason: StopReason
    detail: str

    def __str__(self) -> str:
        return self.detail


CLOSED = Stop(StopReason.CLOSED, "closed")
INHERITED = Stop(
    StopReason.INHERITED, "this buffer was inherited across fork(); it is not tracked in the child"
)


@dataclass(frozen=True)
class Drained:
    """What a tracker hands over at ``drain()`` or ``close()``: the records
    since the last drain, oldest first (``log``, made lazily), and how many
    more did not fit the log (the count is the caller's from then on)."""

    log: Records = field(default_factory=Records)
    overflow: int = 0

    @property
    def records(self) -> list[WriteRecord]:
        """The records, made (for callers that want a list)."""
        return list(self.log)


#: A drain that found nothing (frozen, so one is shared).
NOTHING = Drained()


class Outbox:
    """Records and an overflow count waiting for the next drain.

    Not locked itself: its tracker holds its lock around every use.
    """

    def __init__(self) -> None:
        self.records = RecordLog()
        self.overflow = 0

    def hand_over(self) -> Drained:
        """Everything waiting, which is the caller's from now on."""
        if not self.overflow and not len(self.records):
            return NOTHING  # the usual answer, without three new objects
        drained = Drained(self.records.view(), self.overflow)
        self.records, self.overflow = RecordLog(), 0
        return drained


class Tracker(Protocol):
    """Kernel-side tracking of one mapping."""

    #: Engine name shown to users ("sync", ...).
    name: str

    def arm(self) -> None:
        """Protect every page.  Called on a range that is not protected."""

    def pause(self) -> None:
        """Un-protect every page (waking blocked writers); record nothing."""

    def resume(self) -> None:
        """Protect every page again after ``pause``."""

    def drain(self) -> Drained:
        """Records that arrived since the last drain, and the overflow count."""

    def discard(self) -> None:
        """Drop records and overflow not drained yet (used when re-arming)."""

    def close(self) -> Drained:
        """Stop tracking for good, free any blocked writer, hand over the rest."""

    @property
    def stopped(self) -> Stop | None:
        """Why tracking stopped (closed, handler failure, fork), or None."""


class KernelTracked:
    """Stop state shared by the trackers that hold kernel registrations
    (sync, async): a copy inherited across fork() is never tracked."""

    #: The process generation the tracker was made in (``kernel.process``).
    _made_in: int
    _stopped: Stop | None

    @property
    def _inherited(self) -> bool:
        return process.inherited(self._made_in)

    @property
    def stopped(self) -> Stop | None:
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
    #: Address of the snapshot taken at arming (``length`` bytes): a private
    #: anonymous mapping, whose never-touched pages the collect path takes
    #: as zeros without reading them (``pagediff.changes``).
    snapshot: int
    #: Page size of the mapping (a huge page for hugetlb).
    unit: int = PAGE_SIZE
    #: A weak reference to the object that owns the memory: a background
    #: thread (the hybrid watcher) holds the owner while it works on the
    #: region, so the memory cannot be unmapped under it.
    owner: Callable[[], object | None] | None = field(default=None, compare=False, repr=False)


def live_anonymous(region: Region) -> bool:
    """Whether the region's memory is private anonymous (a GuardedBuffer's
    ``backing="anonymous"``), so that its never-touched pages read as
    zeros: the collect path then skips them instead of faulting them in.
    Asked of the owner; False (read everything) when unknown."""
    owner = region.owner() if region.owner is not None else None
    return getattr(owner, "backing", None) == "anonymous"
