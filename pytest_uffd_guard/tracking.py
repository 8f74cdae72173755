"""How a guarded buffer learns about writes: the Tracker seam.

A GuardedBuffer owns its mapping and snapshot; a Tracker owns everything
kernel-side about seeing writes into it.  Engines:

``sync``
    userfaultfd write-protect with the native handler thread
    (:mod:`pytest_uffd_guard.sync_tracker`): every first write into a page
    is recorded with its exact offset and thread.

New engines implement the same protocol and are picked in ``make_tracker``.
"""

from __future__ import annotations

from typing import Protocol

from .errors import InvalidBufferError
from .records import WriteRecord

ENGINES = ("auto", "sync")


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


def make_tracker(
    engine: str, *, address: int, length: int, size: int, max_records: int | None
) -> Tracker:
    """Start tracking ``length`` bytes at ``address`` (``size`` of them used).

    The range must be populated with its initial contents already and not be
    protected; the tracker is armed on return.
    """
    if engine not in ENGINES:
        raise InvalidBufferError(f"unknown engine {engine!r}", f"use one of: {', '.join(ENGINES)}")
    from .sync_tracker import SyncTracker

    tracker = SyncTracker(address=address, length=length, size=size, max_records=max_records)
    try:
        tracker.arm()
    except BaseException:
        tracker.close()
        raise
    return tracker
