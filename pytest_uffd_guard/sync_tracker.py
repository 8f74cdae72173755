"""The ``sync`` engine: userfaultfd write-protect and the native handler.

The range is registered with this process's userfaultfd in write-protect
mode.  The first write into each protected page blocks the writer in the
kernel; the C handler thread records the fault and un-protects the page,
and the writer goes on.  See ``_uffd.c``.
"""

from __future__ import annotations

import os
import weakref
from contextlib import suppress
from typing import TYPE_CHECKING

from . import attribution
from .attribution import thread_names
from .engine import ENGINE
from .memory import PAGE_SIZE
from .records import WriteRecord, unpack_faults
from .tracking import KernelTracked

if TYPE_CHECKING:
    from .tracking import Region

#: Records kept per buffer beyond one per page (duplicates from threads
#: that fault on the same page at once, re-protection by unprotected()).
RECORD_SLACK = 64
#: Upper bound on the default per-buffer log (32 bytes a record).
MAX_DEFAULT_RECORDS = 1 << 20


def _release_guard(gid: int) -> None:
    """Finalizer: forget a guard whose tracker was garbage-collected."""
    with suppress(Exception):  # interpreter shutdown may have torn things down
        ENGINE.core.guard_remove(gid)


class SyncTracker(KernelTracked):
    """Tracks one range through the process's handler thread."""

    name = "sync"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        address, length = region.address, region.length
        self._address = address
        self._length = length
        self._pid = os.getpid()
        self._stopped: str | None = None
        self.overflow = 0
        pages = length // PAGE_SIZE
        capacity = (
            max_records
            if max_records is not None
            else min(pages + RECORD_SLACK, MAX_DEFAULT_RECORDS)
        )
        caps = ENGINE.start()
        self._stacks = attribution.DEFAULT_STACKS if stacks is None else stacks
        # Why writers cannot be named in this process, if they cannot.
        self._stack_note = attribution.ensure_started() if self._stacks else None
        budget = self._stacks if self._stack_note is None else 0
        self._gid: int = ENGINE.core.guard_add(address, length, PAGE_SIZE, capacity, budget)[0]
        self._finalizer = weakref.finalize(self, _release_guard, self._gid)
        self._wp_unpopulated = caps.has("wp_unpopulated")
        self._exact = caps.has("exact_address")
        self._pending: list[WriteRecord] = []
        ENGINE.track(self)

    def arm(self) -> None:
        self._check()
        core = ENGINE.core
        if not self._wp_unpopulated:
            # Before Linux 6.4 (no WP_UNPOPULATED) protecting a page that
            # was never touched silently does nothing: fault them all in.
            core.populate(self._address, self._length, PAGE_SIZE)
        if self._stack_note is None:
            # Each arming names the writers of its own first writes.
            core.guard_set_stacks(self._gid, self._stacks)
        core.guard_protect(self._gid, True)

    def pause(self) -> None:
        if self.stopped is None:
            ENGINE.core.guard_protect(self._gid, False)

    def resume(self) -> None:
        if self.stopped is None:
            ENGINE.core.guard_protect(self._gid, True)

    def drain(self) -> list[WriteRecord]:
        if self.stopped is None:
            self._take(*ENGINE.core.guard_drain(self._gid))
        records, self._pending = self._pending, []
        return records

    def discard(self) -> None:
        self.drain()

    def close(self) -> list[WriteRecord]:
        self._finalizer.detach()
        if self._pid == os.getpid():
            self._take(*ENGINE.core.guard_remove(self._gid))
            ENGINE.untrack(self)
        self._stopped = self._stopped or "closed"
        records, self._pending = self._pending, []
        return records

    def _detach(self, reason: str) -> None:
        """Called by the engine when the handler stops: keep what we have."""
        if self._stopped is None:
            self._take(*ENGINE.core.guard_drain(self._gid))
            self._stopped = reason

    def _take(self, blob: bytes, overflow: int) -> None:
        self.overflow += overflow
        names = thread_names() if blob else {}
        for raw in unpack_faults(blob):
            self._pending.append(
                WriteRecord(
                    offset=raw.address - self._address,
                    exact=self._exact,
                    thread_id=raw.tid or None,
                    thread_name=names.get(raw.tid) if raw.tid else None,
                    time=raw.time_ns / 1e9,
                    seq=raw.seq,
                    **attribution.describe(raw, self._stack_note),
                )
            )
