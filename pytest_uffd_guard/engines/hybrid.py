"""The ``hybrid`` engine: the first writes named (sync), every page found (async).

A range can be registered with only one userfaultfd at a time (EBUSY), and
``WP_ASYNC`` applies to every range of its fd, so one buffer cannot be sync
and async at once.  It is sync first, then async:

1. The buffer starts on the sync engine: each first write into a page
   faults, and the handler names the writer (thread, exact byte).
2. The handler counts the buffer's records against its budget (``BUDGET``
   pages) and, when it is spent, bumps an eventfd (``_uffd/budget.c``).
   A watcher thread, asleep on that eventfd, drains the buffer's records
   and, if the budget is really used (the count is an upper bound on new
   pages), moves it to the async engine: unregister from the sync fd (any
   writer blocked in a fault goes on), register on the WP_ASYNC fd,
   write-protect every page.  Otherwise it gives the buffer what is left.
3. Between the unregister and the new protection there is a window in
   which a write is seen by no fd.  Right after protecting, a byte diff
   against the snapshot reports every page that changed and was not yet
   recorded.  What the window can lose: a write that stores the value
   already there (the diff cannot see it) - the only blind spot, and only
   for pages first written during that window (microseconds).
4. From then on, writes never block; PAGEMAP_SCAN finds them
   (``exact=False``, no thread).  ``protect()`` goes back to step 1 with a
   fresh budget.

Pages written while the watcher wakes still fault (a few records past the
budget). Linux 6.7+. The watcher (one thread per process, started on demand,
in a forked child too) sleeps in ``read()`` until a budget is spent or a
buffer goes - idle hybrid buffers cost no CPU - and ends with the last one.
Asleep it holds no buffer (one dropped unclosed is freed and its sync
guard leaves the handler's table); switching one it holds the buffer
(``Region.owner``), so the memory stays mapped. A failure while switching
is that buffer's alone: kept in ``switch_error`` (and warned about), it
stays sync - every write still recorded and named - and the other buffers
go on.
"""

from __future__ import annotations

import itertools
import os
import threading
import warnings
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from ..kernel import process
from ..kernel.handler import HANDLER
from ..kernel.process import ForkSafeLock
from ..kernel.recordseq import RecordLog
from .async_ import AsyncTracker
from .base import Drained, Outbox, Stop, StopReason, live_anonymous
from .pagediff import first_changes, page_record
from .sync import SyncTracker

if TYPE_CHECKING:
    from .base import Region

#: Sync faults (pages) per buffer before it moves to the async engine.
BUDGET = 1024
#: Name of the watcher thread.
THREAD_NAME = "uffd-guard-hybrid"


class _Watcher:
    """The thread that moves hybrid buffers over their budget; see the
    module docstring for its lifecycle."""

    def __init__(self) -> None:
        self._reset()
        # A lock held by the parent's watcher at fork stays held in the
        # child, the thread itself does not exist there, and the child's
        # budget eventfd is a new one (budget.c).
        process.on_fork_child(self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, weakref.ref[HybridTracker]] = {}
        self._keys = itertools.count()
        #: The C core's budget eventfd, once a hybrid buffer exists.
        self._fd: int | None = None
        #: Changes at fork: a thread of an earlier generation ends.
        self._generation = object()
        self._thread: threading.Thread | None = None

    def add(self, tracker: HybridTracker) -> int | None:
        """Watch ``tracker`` (weakly); its key, or None if no thread could start."""
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = HANDLER.core.budget_fd()
                except OSError:  # no more file descriptors
                    return None
            key = next(self._keys)
            refs, fd = self._refs, self._fd

            def gone(_: object) -> None:  # the tracker was garbage-collected
                refs.pop(key, None)
                _bump(fd)  # a plain write(): safe inside a weakref callback

            refs[key] = weakref.ref(tracker, gone)
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, args=(self._generation, fd), name=THREAD_NAME, daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # no more threads (ulimit -u, memory)
                    del refs[key]
                    return None
                self._thread = thread
        return key

    def remove(self, key: int | None) -> None:
        with self._lock:
            if key is not None and self._refs.pop(key, None) is not None and self._fd is not None:
                _bump(self._fd)  # the thread may have nothing left to watch

    def _run(self, generation: object, fd: int) -> None:
        while True:
            with self._lock:
                if generation is not self._generation:
                    return
                if not self._refs:
                    self._thread = None
                    return
            os.eventfd_read(fd)  # without the GIL, until a budget or a buffer goes
            hits = set(HANDLER.core.budget_hits())
            if not hits:
                continue
            with self._lock:
                refs = list(self._refs.values())
            for ref in refs:
                tracker = ref()
                hit = tracker is not None and tracker.sync_guard in hits
                del tracker  # _poll holds the buffer before its tracker
                if hit:
                    _poll(ref)
            del refs


def _bump(fd: int) -> None:
    """Wake the watcher."""
    with suppress(OSError):
        os.eventfd_write(fd, 1)


def _poll(ref: weakref.ref[HybridTracker]) -> None:
    """Let one tracker that spent its budget switch.  Never raises."""
    tracker = ref()
    if tracker is None:
        return
    owner = None
    try:
        if tracker._owner is not None:
            owner = tracker._owner()
            if owner is None:  # the buffer is being freed
                return
        tracker.poll()
    except Exception as exc:
        with suppress(Exception):
            tracker.poll_failed(exc)
    finally:
        # The tracker first: if the buffer dies with our reference, it
        # must free its tracker (and the sync guard) before its memory.
        del tracker
        del owner


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
        #: A weak reference to the buffer that owns the memory, if given.
        self._owner: Callable[[], object | None] | None = region.owner
        self._lock = ForkSafeLock()
        self._outbox = Outbox()
        self._seen: set[int] = set()
        self._paused = True
        self._closed = False
        self._base_duplicates = 0
        self._kept = 0
        self._lost: Stop | None = None
        self._sync: SyncTracker | None = self._new_sync()
        self._async: AsyncTracker | None = None
        #: How many times this buffer moved to async (for tests and reports).
        self.switches = 0
        #: Why the buffer cannot move to async, if it cannot (it stays sync).
        self.switch_error: str | None = None
        self._key = WATCHER.add(self)
        if self._key is None:
            self._fail("the hybrid watcher thread could not start")

    def _new_sync(self) -> SyncTracker:
        return SyncTracker(self._region, max_records=self._max_records, stacks=self._stacks)

    @property
    def phase(self) -> str:
        with self._lock:
            return "sync" if self._sync is not None else "async"

    @property
    def sync_guard(self) -> int | None:
        """The handler's id of the sync guard, while on the sync engine."""
        sync = self._sync
        return sync.guard_id if sync is not None else None

    @property
    def _current(self) -> SyncTracker | AsyncTracker:
        current = self._sync or self._async
        assert current is not None
        return current

    @property
    def duplicates(self) -> int:
        """Extra faults on already recorded pages (sync phases only)."""
        with self._lock:
            sync = self._sync.duplicates if self._sync is not None else 0
            return self._base_duplicates + sync

    @property
    def stopped(self) -> Stop | None:
        with self._lock:
            return self._lost or self._current.stopped

    def arm(self) -> None:
        with self._lock:
            if self._async is not None:
                # protect(): back to sync, with a fresh budget.
                self._async.close()
                self._async = None
                self._sync = self._new_sync()
            self._seen.clear()
            self._kept = 0
            self._give_budget()
            self._current.arm()
            self._paused = False

    def pause(self) -> None:
        with self._lock:
            self._take()
            self._current.pause()
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            if self._sync is not None:
                self._take()  # the pages so far count against the budget
                self._give_budget()
            self._current.resume()

    def drain(self) -> Drained:
        with self._lock:
            self._take()
            return self._outbox.hand_over()

    def discard(self) -> None:
        with self._lock:
            self._current.discard()
            self._outbox = Outbox()
            self._kept = 0
            self._base_duplicates = 0

    def close(self) -> Drained:
        WATCHER.remove(self._key)
        with self._lock:
            self._closed = True
            self._keep(self._current.close())
            self._paused = True
            return self._outbox.hand_over()

    def poll(self) -> None:
        """Watcher, after the handler said the budget was spent: drain the
        sync records; move to async when over budget, else give it what is
        left.  The caller keeps the buffer (the memory) alive meanwhile."""
        with self._lock:
            if not self._watched():
                return
            self._take()
            if len(self._seen) >= BUDGET:
                self._switch()
            else:  # some records were of pages already seen
                self._give_budget()

    def poll_failed(self, exc: BaseException) -> None:
        """Watcher: polling this buffer raised; keep it sync from now on."""
        with self._lock:
            self._fail(f"the hybrid watcher failed on it ({type(exc).__name__}: {exc})")

    def _watched(self) -> bool:
        sync = self._sync
        return (
            sync is not None
            and not self._paused
            and not self._closed
            and self.switch_error is None
            and sync.stopped is None
        )

    def _fail(self, why: str) -> None:
        """Keep the first reason the buffer cannot move to async, and say it."""
        if self.switch_error is not None:
            return
        self.switch_error = (
            f"{why}; the buffer stays on the sync engine "
            "(every write still recorded and named, at sync cost)"
        )
        # Never let -W error turn this into a failure of the watcher.
        with suppress(Exception):
            warnings.warn(
                f"pytest-uffd-guard: hybrid buffer at {self._address:#x}: {self.switch_error}",
                RuntimeWarning,
                stacklevel=2,
            )

    def _take(self) -> None:
        self._keep(self._current.drain())

    def _give_budget(self) -> None:
        """Have the handler tell the watcher when the sync phase may have
        used its budget: after as many records as pages are left (at least
        one, so a buffer already over it switches on its next write)."""
        sync = self._sync
        if sync is not None and self.switch_error is None:
            sync.set_budget(max(1, BUDGET - len(self._seen)))

    def _keep(self, drained: Drained) -> None:
        """Queue a phase's records, counting those past max_records (and the
        phase's own overflow) as overflow."""
        self._outbox.overflow += drained.overflow
        log = drained.log
        if self._async is None:
            # Sync phases only: their pages count against the budget (an
            # async phase's pages, packed, are never made into records here).
            unit = self._unit
            self._seen.update(offset - offset % unit for offset in log.offsets())
        if self._max_records is not None:
            room = max(0, self._max_records - self._kept)
            if len(log) > room:
                self._outbox.overflow += len(log) - room
                log = log.head(room)
        self._kept += len(log)
        self._outbox.records.extend(log)

    def _switch(self) -> None:
        """Move to the async fd.  The caller holds the lock and the buffer."""
        sync = self._sync
        assert sync is not None
        # Unregister: a writer blocked in a fault goes on, unrecorded; the
        # diff below finds what it wrote.
        self._keep(sync.close())
        self._base_duplicates += sync.duplicates
        max_records = self._max_records
        tracker: AsyncTracker | None = None
        try:
            tracker = AsyncTracker(
                self._region,
                max_records=None if max_records is None else max(0, max_records - self._kept),
            )
            tracker.mark_reported(self._seen)
            tracker.arm()
        except Exception as exc:
            if tracker is not None:
                tracker.close()
            self._stay_sync(f"moving it to the async engine failed ({exc})")
            return
        self._sync, self._async = None, tracker
        self.switches += 1
        self._report_window()

    def _stay_sync(self, why: str) -> None:
        """Back on a fresh sync guard after a failed switch (budget lifted):
        the pages already written keep no protection, the diff still
        reports them."""
        self._fail(why)
        try:
            self._sync = self._new_sync()
            self._sync.arm()
        except Exception as exc:
            self._lost = Stop(
                StopReason.LOST,
                f"the hybrid engine could not move it to async nor back to sync ({exc})",
            )
            return
        self._take()
        self._report_window()

    def _report_window(self) -> None:
        """Pages that changed while no fd protected them, as records."""
        if self._async is not None:
            self._async.collect_changed()
            return
        changed = first_changes(
            self._address,
            self._snapshot,
            0,
            self._length,
            self._unit,
            live_anonymous=live_anonymous(self._region),
        )
        found = RecordLog()
        found.extend(page_record(changed[page]) for page in sorted(set(changed) - self._seen))
        self._keep(Drained(found.view()))
