"""The ``async`` engine: ``UFFD_FEATURE_WP_ASYNC`` plus ``PAGEMAP_SCAN``.

A second, process-wide userfaultfd is opened with ``WP_ASYNC`` (which the
kernel makes imply ``WP_UNPOPULATED``) and no handler thread: a write into a
protected page never blocks and sends no message; the kernel clears the
page's uffd-wp bit and lets the write go on (about 1 us for the first write
to a page, against about 25 us for a synchronous fault).  When records are
asked for, ``PAGEMAP_SCAN`` with ``PAGE_IS_WRITTEN`` lists the written pages
and the byte diff against the snapshot places each record on the page's
first changed byte.

What it cannot tell: the writer (thread, time, stack) and the order of the
writes; records are ``exact=False`` with no thread.  Linux 6.7+.

Threads: the engine and each tracker keep their state under a lock (not the
GIL: the ioctls release it, and free-threaded Python has none), so buffers
may be used from several threads at once and one buffer's records may be
read from several threads; each written page is reported once.
"""

from __future__ import annotations

import os
from contextlib import suppress
from typing import TYPE_CHECKING

from ..errors import UffdUnavailableError
from ..kernel import process
from ..kernel.capabilities import FEATURES, Capabilities, capabilities, open_for
from ..kernel.pagemap import Pagemap
from ..kernel.process import ForkSafeLock
from ..kernel.records import WriteRecord
from .base import KernelTracked
from .pagediff import PageLog, first_changes

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .base import Region

ASYNC_REMEDY = (
    "the async engine needs Linux 6.7+ (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN); "
    "use --uffd-engine=sync (or auto) on older kernels"
)


def async_unavailable(caps: Capabilities) -> str | None:
    """Why the async engine cannot run here, or None if it can."""
    if not caps.available:
        return caps.reason or "userfaultfd is unavailable"
    if not caps.has("wp_async"):
        return "this kernel has no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)"
    return None


class AsyncEngine:
    """This process's async userfaultfd and pagemap fds, opened on first use."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()
        self._pid = 0
        self.fd = -1
        self.features = 0
        self.pagemap: Pagemap | None = None

    def start(self) -> tuple[int, Pagemap]:
        """This process's async userfaultfd and pagemap, opened if needed.

        Raises UffdUnavailableError when the kernel cannot run the engine.
        """
        with self._lock:
            if self._pid == os.getpid() and self.pagemap is not None:
                return self.fd, self.pagemap
            if self._pid:
                # A forked child: the inherited fds speak for the parent's
                # memory; drop them without touching the parent's ranges.
                self._forget()
            caps = capabilities()
            reason = async_unavailable(caps)
            if reason is not None:
                raise UffdUnavailableError(reason, caps.remedy or ASYNC_REMEDY)
            features = FEATURES["wp_async"] | FEATURES["wp_unpopulated"]
            if caps.has("wp_hugetlbfs_shmem"):
                features |= FEATURES["wp_hugetlbfs_shmem"]
            fd = open_for(caps, "async userfaultfd")
            try:
                from .. import _uffd

                _uffd.api(fd, features)
                pagemap = Pagemap()
            except OSError as exc:
                os.close(fd)
                raise UffdUnavailableError(
                    f"setting up the async engine failed: {exc.strerror or exc}", ASYNC_REMEDY
                ) from exc
            self.fd, self.features, self.pagemap, self._pid = fd, features, pagemap, os.getpid()
            return fd, pagemap

    def _forget(self) -> None:
        with suppress(OSError):
            os.close(self.fd)
        if self.pagemap is not None:
            self.pagemap.close()
        self.fd, self.pagemap, self._pid = -1, None, 0


#: The async engine of this process.
ASYNC = AsyncEngine()


class AsyncTracker(KernelTracked):
    """Tracks one range on the process's WP_ASYNC userfaultfd."""

    name = "async"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        from .. import _uffd

        self._core = _uffd
        self._fd, self._pagemap = ASYNC.start()
        address, length = region.address, region.length
        self._address = address
        self._length = length
        self._snapshot = region.snapshot
        self._unit = region.unit
        self._made_in = process.generation()
        self._lock = ForkSafeLock()
        self._log = PageLog(max_records)
        self._paused = True
        self._stopped: str | None = None
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

    @property
    def overflow(self) -> int:
        with self._lock:
            return self._log.overflow

    @overflow.setter
    def overflow(self, value: int) -> None:
        with self._lock:
            self._log.overflow = value

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

    def drain(self) -> list[WriteRecord]:
        with self._lock:
            self._collect()
            return self._log.take()

    def discard(self) -> None:
        with self._lock:
            self._log.reset()

    def close(self) -> list[WriteRecord]:
        with self._lock:
            if self.stopped is None:
                self._collect()
                with suppress(OSError):
                    self._core.unregister(self._fd, self._address, self._length)
            self._stopped = self._stopped or "closed"
            self._paused = True
            return self._log.take()

    def mark_reported(self, pages: Iterable[int]) -> None:
        """Treat ``pages`` (offsets) as reported already (hybrid: the pages
        its sync phase recorded)."""
        with self._lock:
            self._log.reported.update(pages)

    def add_found(self, offsets: dict[int, int]) -> None:
        """Report pages found another way: ``{page: first changed byte}``
        (hybrid: the pages written while it moved between fds)."""
        with self._lock:
            self._log.add(offsets, offsets)

    def _collect(self) -> None:
        """Turn the pages PAGEMAP_SCAN reports written into records; the
        caller holds the lock."""
        if self._paused or self.stopped is not None:
            return
        start, length, unit = self._address, self._length, self._unit
        written: set[int] = set()
        for first, last in self._pagemap.written(start, start + length):
            # Whole units inside the buffer only, whatever the kernel said.
            low = max(0, first - start)
            high = min(length, last - start)
            written.update(range(low - low % unit, high, unit))
        new = sorted(written - self._log.reported)
        if not new:
            return
        offsets: dict[int, int] = {}
        # One diff per run of new pages places each record on its page's
        # first changed byte; a page written with identical bytes keeps the
        # page start.
        run_start = prev = new[0]
        for page in [*new[1:], None]:
            if page is not None and page == prev + unit:
                prev = page
                continue
            offsets.update(first_changes(start, self._snapshot, run_start, prev + unit, unit))
            if page is not None:
                run_start = prev = page
        self._log.add(new, offsets)
