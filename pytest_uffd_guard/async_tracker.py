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
"""

from __future__ import annotations

import os
import threading
from contextlib import suppress
from typing import TYPE_CHECKING

from .diff_tracker import PageLog, first_changes
from .errors import UffdUnavailableError
from .pagemap import Pagemap
from .probe import FEATURES, Capabilities, capabilities, open_for
from .records import WriteRecord
from .tracking import KernelTracked

if TYPE_CHECKING:
    from .tracking import Region

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
        self._lock = threading.Lock()
        self._pid = 0
        self.fd = -1
        self.features = 0
        self.pagemap: Pagemap | None = None

    def start(self) -> Capabilities:
        with self._lock:
            if self._pid == os.getpid():
                return capabilities()
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
                from . import _uffd

                _uffd.api(fd, features)
                pagemap = Pagemap()
            except OSError as exc:
                os.close(fd)
                raise UffdUnavailableError(
                    f"setting up the async engine failed: {exc.strerror or exc}", ASYNC_REMEDY
                ) from exc
            self.fd, self.features, self.pagemap, self._pid = fd, features, pagemap, os.getpid()
            return caps

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
        from . import _uffd

        self._core = _uffd
        ASYNC.start()
        self._fd = ASYNC.fd
        self._pagemap = ASYNC.pagemap
        address, length = region.address, region.length
        self._address = address
        self._length = length
        self._snapshot = region.snapshot
        self._unit = region.unit
        self._pid = os.getpid()
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
        return self._log.overflow

    @overflow.setter
    def overflow(self, value: int) -> None:
        self._log.overflow = value

    def _protect(self, protect: bool) -> None:
        self._core.writeprotect(self._fd, self._address, self._length, protect)

    def arm(self) -> None:
        self._check()
        # WP_ASYNC implies WP_UNPOPULATED: untouched pages get a marker, so
        # nothing needs to be faulted in first.
        self._protect(True)
        self._paused = False

    def pause(self) -> None:
        if self.stopped is None and not self._paused:
            # Collect first: un-protected pages all read as "written".
            self._collect()
            self._protect(False)
            self._paused = True

    def resume(self) -> None:
        if self.stopped is None and self._paused:
            self._protect(True)
            self._paused = False

    def drain(self) -> list[WriteRecord]:
        self._collect()
        return self._log.take()

    def discard(self) -> None:
        self._log.reset()

    def close(self) -> list[WriteRecord]:
        if self.stopped is None:
            self._collect()
            with suppress(OSError):
                self._core.unregister(self._fd, self._address, self._length)
        self._stopped = self._stopped or "closed"
        self._paused = True
        return self._log.take()

    def _collect(self) -> None:
        if self._paused or self.stopped is not None or self._pagemap is None:
            return
        start, end = self._address, self._address + self._length
        written: list[int] = []
        for first, last in self._pagemap.written(start, end):
            written.extend(range(first - start, last - start, self._unit))
        new = [page for page in written if page not in self._log.reported]
        if not new:
            return
        offsets: dict[int, int] = {}
        # One diff per run of new pages places each record on its page's
        # first changed byte; a page written with identical bytes keeps the
        # page start.
        run_start = prev = new[0]
        for page in [*new[1:], None]:
            if page is not None and page == prev + self._unit:
                prev = page
                continue
            offsets.update(
                first_changes(
                    self._address, self._snapshot, run_start, prev + self._unit, self._unit
                )
            )
            if page is not None:
                run_start = prev = page
        self._log.add(new, offsets)
