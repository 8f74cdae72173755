"""The ``async`` engine: ``UFFD_FEATURE_WP_ASYNC`` plus ``PAGEMAP_SCAN``.

A second, process-wide userfaultfd is opened with ``WP_ASYNC`` (which the
kernel makes imply ``WP_UNPOPULATED``) and no handler thread: a write into a
protected page never blocks and sends no message; the kernel clears the
page's uffd-wp bit and lets the write go on (about 1 us for the first write
to a page, against about 25 us for a synchronous fault).  When records are
asked for, ``PAGEMAP_SCAN`` with ``PAGE_IS_WRITTEN`` lists the written pages
and the byte diff against the snapshot places each record on the page's
first changed byte.

A page can read as written before its bytes change: the kernel clears the
page's uffd-wp bit in the fault, and the faulting store lands only when the
writer runs again (later, if it is preempted).  Records read from another
thread in that gap sit on the page start, as a store of the value already
there does; the page is right and reported once, and ``changes()`` always
shows the byte.  Holding such pages back instead would lose, until the
buffer is closed, a write undone before the next read.

What it cannot tell: the writer (thread, time, stack) and the order of the
writes; records are ``exact=False`` with no thread.  Linux 6.7+.

Threads: the engine and each tracker keep their state under a lock (not the
GIL: the ioctls release it, and free-threaded Python has none), so buffers
may be used from several threads at once and one buffer's records may be
read from several threads; each written page is reported once.
"""

from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING

from ..errors import UffdUnavailableError
from ..kernel import process
from ..kernel.asyncfd import ASYNC_FD
from ..kernel.process import ForkSafeLock
from .base import CLOSED, Drained, KernelTracked, Stop, live_anonymous
from .pagediff import PageLog, PageLogged

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .base import Region


class AsyncTracker(PageLogged, KernelTracked):
    """Tracks one range on the process's WP_ASYNC userfaultfd."""

    name = "async"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        from .. import _uffd

        self._core = _uffd
        self._fd, self._pagemap = ASYNC_FD.start()
        address, length = region.address, region.length
        self._address = address
        self._length = length
        self._snapshot = region.snapshot
        self._unit = region.unit
        self._anonymous = live_anonymous(region)
        self._made_in = process.generation()
        self._lock = ForkSafeLock()
        self._log = PageLog(max_records, length // region.unit)
        self._paused = True
        self._stopped: Stop | None = None
        try:
            ioctls = int(_uffd.register_wp(self._fd, address, length))
        except OSError as exc:
            raise UffdUnavailableError(
                f"UFFDIO_REGISTER (write-protect) on the async userfaultfd failed: {exc.strerror}",
                "use engine='diff' for this memory kind",
            ) from exc
        if not ioctls & (1 << int(_uffd.IOCTL_WRITEPROTECT_BIT)):
            _uffd.unregister(self._fd, address, length)
            raise UffdUnavailableError(
                f"UFFDIO_REGISTER did not grant UFFDIO_WRITEPROTECT (ioctls {ioctls:#x})",
                "use engine='diff' for this memory kind",
            )

    def _protect(self, protect: bool) -> None:
        self._core.writeprotect(self._fd, self._address, self._length, protect)

    def arm(self) -> None:
        with self._lock:
            self._check()
            # WP_ASYNC implies WP_UNPOPULATED: untouched pages get a marker, so
            # nothing needs to be faulted in first.
            self._protect(True)
            self._paused = False

    def pause(self) -> None:
        with self._lock:
            if self.stopped is None and not self._paused:
                # Collect first: un-protected pages all read as "written".
                self._collect()
                self._protect(False)
                self._paused = True

    def resume(self) -> None:
        with self._lock:
            if self.stopped is None and self._paused:
                self._protect(True)
                self._paused = False

    def close(self) -> Drained:
        with self._lock:
            if self.stopped is None:
                self._collect()
                with suppress(OSError):
                    self._core.unregister(self._fd, self._address, self._length)
            self._stopped = self._stopped or CLOSED
            self._paused = True
            return self._log.outbox.hand_over()

    def mark_reported(self, pages: Iterable[int]) -> None:
        """Treat ``pages`` (offsets) as reported already (hybrid: the pages
        its sync phase recorded)."""
        with self._lock:
            self._log.mark(pages, self._unit)

    def collect_changed(self) -> None:
        """Report every page that differs from the snapshot and was not
        reported yet (hybrid: the pages written while it moved between fds)."""
        with self._lock:
            self._collect_changed()

    def _collect(self) -> None:
        """Turn the pages PAGEMAP_SCAN reports written into records, each on
        its first changed byte (a page written with identical bytes keeps
        the page start); the caller holds the lock."""
        if self._paused or self.stopped is not None:
            return
        start, length, unit = self._address, self._length, self._unit
        ranges = []
        for first, last in self._pagemap.written(start, start + length):
            # Whole units inside the buffer only, whatever the kernel said.
            low = max(0, first - start)
            high = min(length, last - start)
            low -= low % unit
            high = min(length, -(-high // unit) * unit)
            if low < high:
                ranges.append((low, high))
        if ranges:
            self._log.collect(start, self._snapshot, ranges, unit, only_changed=False)
