"""The ``diff`` engine: no userfaultfd, a byte comparison with the snapshot.

It protects nothing and runs no thread, so it works everywhere (any kernel,
any seccomp profile, any platform with ``mmap``).  A page is reported when
its bytes differ from the snapshot taken at arming, with the offset of its
first changed byte.  Two things it cannot know, said plainly wherever it is
shown: a write that stores the value already there leaves no trace, and the
writer (thread, time, stack) is unknown.  Records are therefore
``exact=False`` with no thread.

The page walking is ``pagediff.py``'s, shared with the async and hybrid
engines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kernel.process import ForkSafeLock
from .base import CLOSED, Drained, Stop, live_anonymous
from .pagediff import PageLog, PageLogged

if TYPE_CHECKING:
    from .base import Region

#: Why the diff engine is weaker; shown by the header, the doctor and docs.
LIMITS = (
    "no write-protection: changes are found by comparing with the snapshot, so a write "
    "that stores the value already there is not seen and the writer is unknown"
)


class DiffTracker(PageLogged):
    """Finds changed pages by comparing the buffer with its snapshot."""

    name = "diff"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        self._address = region.address
        self._length = region.length
        self._snapshot = region.snapshot
        self._unit = region.unit
        self._anonymous = live_anonymous(region)
        self._lock = ForkSafeLock()
        self._log = PageLog(max_records, region.length // region.unit)
        self._paused = True
        self._closed = False

    @property
    def stopped(self) -> Stop | None:
        return CLOSED if self._closed else None

    def arm(self) -> None:
        with self._lock:
            self._paused = False

    def pause(self) -> None:
        with self._lock:
            self._collect()
            self._paused = True

    resume = arm

    def close(self) -> Drained:
        with self._lock:
            self._collect()
            self._closed = True
            return self._log.outbox.hand_over()

    def _collect(self) -> None:
        if self._paused or self._closed:
            return
        self._collect_changed()
