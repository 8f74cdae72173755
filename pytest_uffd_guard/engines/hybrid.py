"""The ``hybrid`` engine: the first writes named (sync), every page found (async).

A range can be registered with only one userfaultfd at a time (EBUSY), and
``WP_ASYNC`` applies to every range of its fd, so one buffer cannot be sync
and async at once.  It is sync first, then async:

1. The buffer starts on the sync engine: each first write into a page
   faults, and the handler names the writer (thread, exact byte).
2. A watcher thread drains the sync records of hybrid buffers every
   ``POLL_SECONDS``.  When a buffer has used its fault budget (``BUDGET``
   pages), it is moved to the async engine: unregister from the sync fd
   (any writer blocked in a fault goes on), register on the WP_ASYNC fd,
   write-protect every page.
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

The watcher (one thread per process, started on demand, in a forked child
too) polls only while some hybrid buffer is armed on the sync engine; with
none it sleeps without a timeout, and it ends when no hybrid buffer is
left.  Between polls it holds no reference to any buffer, so a buffer that
is dropped unclosed is freed like any other and its sync guard leaves the
handler's table.  During a poll it holds the buffer itself (``Region.owner``),
so the memory cannot be unmapped while it is switched.  A failure while
polling one buffer is that buffer's alone: it is kept in ``switch_error``
(and warned about), the buffer stays on the sync engine - every write still
recorded and named, at sync cost - and the other buffers go on.
"""

from __future__ import annotations

import itertools
import queue
import threading
import warnings
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from ..kernel import process
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
#: How often the watcher checks hybrid buffers that are armed on sync.
POLL_SECONDS = 0.005
#: Name of the watcher thread.
THREAD_NAME = "uffd-guard-hybrid"


class _Watcher:
    """The thread that moves hybrid buffers over their budget; see the
    module docstring for its lifecycle."""

    def __init__(self) -> None:
        self._reset()
        # A lock held by the parent's watcher at fork stays held in the
        # child, and the thread itself does not exist there.
        process.on_fork_child(self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, weakref.ref[HybridTracker]] = {}
        self._keys = itertools.count()
        #: Wake-ups.  SimpleQueue.put is safe from a weakref callback (no
        #: lock that the thread running the callback could already hold).
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def add(self, tracker: HybridTracker) -> int | None:
        """Watch ``tracker`` (weakly); its key, or None if no thread could start."""
        with self._lock:
            key = next(self._keys)
            refs, wake = self._refs, self._wake

            def gone(_: object) -> None:  # the tracker was garbage-collected
                refs.pop(key, None)
                wake.put(None)

            refs[key] = weakref.ref(tracker, gone)
            if self._thread is None:
                thread = threading.Thread(
                    target=self._run, args=(wake,), name=THREAD_NAME, daemon=True
                )
                try:
                    thread.start()
                except RuntimeError:  # no more threads (ulimit -u, memory)
                    del refs[key]
                    return None
                self._thread = thread
        wake.put(None)
        return key

    def remove(self, key: int | None) -> None:
        with self._lock:
            if key is not None and self._refs.pop(key, None) is not None:
                self._wake.put(None)

    def wake(self) -> None:
        """A buffer may need polling again (armed, resumed)."""
        self._wake.put(None)

    def _run(self, wake: queue.SimpleQueue[None]) -> None:
        while True:
            with self._lock:
                if wake is not self._wake:
                    return
                refs = list(self._refs.values())
                if not refs:
                    self._thread = None
                    return
            busy = False
            for ref in refs:
                busy = _poll(ref) or busy
            del refs
            with suppress(queue.Empty):
                wake.get(timeout=POLL_SECONDS if busy else None)
            with suppress(queue.Empty):
                while True:
                    wake.get_nowait()


def _poll(ref: weakref.ref[HybridTracker]) -> bool:
    """Poll one tracker; whether it still needs polling.  Never raises."""
    tracker = ref()
    if tracker is None:
        return False
    owner = None
    try:
        if tracker._owner is not None:
            owner = tracker._owner()
            if owner is None:  # the buffer is being freed
                return False
        return tracker.poll()
    except Exception as exc:
        with suppress(Exception):
            tracker.poll_failed(exc)
        return False
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
            self._current.arm()
            self._paused = False
        WATCHER.wake()

    def pause(self) -> None:
        with self._lock:
            self._take()
            self._current.pause()
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False
            self._current.resume()
        WATCHER.wake()

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

    def poll(self) -> bool:
        """Watcher: drain sync records; move to async when over budget.

        Returns whether the buffer still needs polling.  The caller keeps
        the buffer (the memory) alive meanwhile.
        """
        with self._lock:
            if not self._watched():
                return False
            self._take()
            if len(self._seen) >= BUDGET:
                self._switch()
            return self._watched()

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
