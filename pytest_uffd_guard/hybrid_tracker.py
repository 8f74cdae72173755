"""The ``hybrid`` engine: the first writes named (sync), every page found (async).

A range can be registered with only one userfaultfd at a time (EBUSY), and
``WP_ASYNC`` applies to every range of its fd, so one buffer cannot be sync
and async at once.  It is sync first, then async:

1. The buffer starts on the sync engine: each first write into a page
   faults, and the handler names the writer (thread, exact byte).
2. A watcher thread (one per process, waking every ``POLL_SECONDS``) drains
   the sync records of hybrid buffers.  When a buffer has used its fault
   budget (``BUDGET`` pages), it is moved to the async engine:
   unregister from the sync fd (any writer blocked in a fault goes on),
   register on the WP_ASYNC fd, write-protect every page.
3. Between the unregister and the new protection there is a window in
   which a write is seen by no fd.  Right after protecting, a byte diff
   against the snapshot reports every page that changed and was not yet
   recorded.  What the window can lose: a write that stores the value
   already there (the diff cannot see it) - the only blind spot, and only
   for pages first written during that window (microseconds).
4. From then on, writes never block; PAGEMAP_SCAN finds them
   (``exact=False``, no thread).  ``protect()`` goes back to step 1 with a
   fresh budget.

The budget is enforced by polling, so a buffer may record a few hundred
sync faults past it (one poll interval of faults).  Linux 6.7+ (WP_ASYNC).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from .async_tracker import AsyncTracker
from .diff_tracker import first_changes, page_record
from .errors import UffdGuardError
from .records import WriteRecord
from .sync_tracker import SyncTracker

if TYPE_CHECKING:
    from .tracking import Region

#: Sync faults (pages) per buffer before it moves to the async engine.
BUDGET = 1024
#: How often the watcher checks hybrid buffers.
POLL_SECONDS = 0.005


class _Watcher:
    """One daemon thread per process that moves buffers over their budget."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._trackers: weakref.WeakSet[HybridTracker] = weakref.WeakSet()
        self._pid = 0
        self._wake = threading.Event()

    def add(self, tracker: HybridTracker) -> None:
        with self._lock:
            if self._pid != os.getpid():
                self._trackers = weakref.WeakSet()
                self._pid = os.getpid()
                threading.Thread(target=self._run, name="uffd-guard-hybrid", daemon=True).start()
            self._trackers.add(tracker)

    def remove(self, tracker: HybridTracker) -> None:
        with self._lock:
            self._trackers.discard(tracker)

    def _run(self) -> None:
        pid = os.getpid()
        while self._pid == pid:
            time.sleep(POLL_SECONDS)
            with self._lock:
                trackers = list(self._trackers)
            for tracker in trackers:
                tracker.poll()


WATCHER = _Watcher()


class HybridTracker:
    """Sync until the budget is used, then async; see the module docstring."""

    name = "hybrid"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        self._region = region
        self._stacks = stacks
        self._address = region.address
        self._length = region.length
        self._max_records = max_records
        self._snapshot = region.snapshot
        self._unit = region.unit
        self._lock = threading.RLock()
        self._pending: list[WriteRecord] = []
        self._seen: set[int] = set()
        self._paused = True
        self._base_overflow = 0
        self._kept = 0
        self._sync: SyncTracker | None = self._new_sync()
        self._async: AsyncTracker | None = None
        #: How many times this buffer moved to async (for tests and reports).
        self.switches = 0
        #: Why the move to async failed, if it did (the buffer stayed sync).
        self.switch_error: str | None = None
        WATCHER.add(self)

    def _new_sync(self) -> SyncTracker:
        return SyncTracker(self._region, max_records=self._max_records, stacks=self._stacks)

    @property
    def phase(self) -> str:
        return "sync" if self._sync is not None else "async"

    @property
    def _current(self) -> SyncTracker | AsyncTracker:
        current = self._sync or self._async
        assert current is not None
        return current

    @property
    def overflow(self) -> int:
        return self._base_overflow + self._current.overflow

    @overflow.setter
    def overflow(self, value: int) -> None:
        self._base_overflow = value
        self._current.overflow = 0

    @property
    def stopped(self) -> str | None:
        return self._current.stopped

    def arm(self) -> None:
        with self._lock:
            if self._async is not None:
                # protect(): back to sync, with a fresh budget.
                self._async.close()
                self._async = None
                self._sync = self._new_sync()
            self._seen.clear()
            self._kept = 0
            self._current.arm()
            self._paused = False

    def pause(self) -> None:
        with self._lock:
            self._take()
            self._current.pause()
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._current.resume()
            self._paused = False

    def drain(self) -> list[WriteRecord]:
        with self._lock:
            self._take()
            records, self._pending = self._pending, []
            return records

    def discard(self) -> None:
        with self._lock:
            self._current.discard()
            self._pending = []
            self._kept = 0

    def close(self) -> list[WriteRecord]:
        WATCHER.remove(self)
        with self._lock:
            self._keep(self._current.close())
            self._paused = True
            records, self._pending = self._pending, []
            return records

    def poll(self) -> None:
        """Watcher: drain sync records; move to async when over budget."""
        with self._lock:
            sync = self._sync
            if sync is None or self._paused or sync.stopped is not None or self.switch_error:
                return
            self._take()
            if len(self._seen) >= BUDGET:
                self._switch()

    def _take(self) -> None:
        self._keep(self._current.drain())

    def _keep(self, records: list[WriteRecord]) -> None:
        """Queue records, counting those past max_records as overflow."""
        for record in records:
            self._seen.add(record.offset - record.offset % self._unit)
            if self._max_records is not None and self._kept >= self._max_records:
                self._base_overflow += 1
                continue
            self._kept += 1
            self._pending.append(record)

    def _switch(self) -> None:
        sync, self._sync = self._sync, None
        assert sync is not None
        # Unregister: a writer blocked in a fault goes on, unrecorded; the
        # diff below finds what it wrote.
        self._keep(sync.close())
        self._base_overflow += sync.overflow
        max_records = self._max_records
        try:
            tracker = AsyncTracker(
                self._region,
                max_records=None if max_records is None else max(0, max_records - self._kept),
            )
            tracker._log.reported |= self._seen
            tracker.arm()
        except (OSError, UffdGuardError) as exc:
            # Stay sync (budget lifted): the pages already written keep no
            # protection, the diff below still reports them.
            self.switch_error = str(exc)
            self._sync = sync = self._new_sync()
            sync.arm()
            self._report_window(set())
            return
        self._async = tracker
        self.switches += 1
        self._report_window(tracker._log.reported)

    def _report_window(self, already: set[int]) -> None:
        """Pages that changed while no fd protected them, as records."""
        changed = first_changes(self._address, self._snapshot, 0, self._length, self._unit)
        if self._async is not None:
            self._async._log.add(changed, changed)
            return
        self._keep([page_record(changed[page]) for page in sorted(set(changed) - self._seen)])
