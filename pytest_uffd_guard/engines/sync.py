"""The ``sync`` engine: userfaultfd write-protect and the native handler.

The range is registered with this process's userfaultfd in write-protect
mode.  The first write into each protected page blocks the writer in the
kernel; the C handler thread records the fault and un-protects the page,
and the writer goes on.  See ``_uffd.c``.
"""

from __future__ import annotations

import struct
import weakref
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import UffdUnavailableError
from ..kernel import capture, process
from ..kernel.handler import HANDLER
from ..kernel.memory import PAGE_SIZE
from ..kernel.namer import thread_names, watch_threads
from ..kernel.records import (
    KIND_DISCARD,
    KIND_NAMES,
    RECORD_FORMAT,
    RECORD_SIZE,
    RawFault,
    WriteRecord,
)
from ..kernel.recordseq import RawChunk, raw_fault
from .base import CLOSED, Drained, KernelTracked, Outbox, Stop, StopReason

if TYPE_CHECKING:
    from .base import Region

#: Records kept per buffer beyond one per page: the C core logs each page
#: once per protection (later faults on it are counted as duplicates), so
#: the slack is for madvise discards and re-protection by unprotected().
RECORD_SLACK = 64
#: Upper bound on the default per-buffer log (80 bytes a record).
MAX_DEFAULT_RECORDS = 1 << 20

DISCARD_NOTE = "madvise discarded these bytes; the kernel does not say which thread called it"


def _release_guard(gid: int) -> None:
    """Finalizer: forget a guard whose tracker was garbage-collected.

    Its records are dropped unread: their dumps count as read, or the
    capture file could never start afresh (issue 9, dump bound)."""
    with suppress(Exception):  # interpreter shutdown may have torn things down
        blob = HANDLER.core.guard_remove(gid)[0]
        capture.dumps_dropped(blob)


class SyncTracker(KernelTracked):
    """Tracks one range through the process's handler thread."""

    name = "sync"

    def __init__(
        self, region: Region, *, max_records: int | None, stacks: int | None = None
    ) -> None:
        address, length = region.address, region.length
        self._address = address
        self._length = length
        self._made_in = process.generation()
        self._stopped: Stop | None = None
        #: Faults on pages already recorded since they were protected
        #: (threads blocked on one page at once): counted, not recorded.
        self.duplicates = 0
        pages = length // PAGE_SIZE
        capacity = (
            max_records
            if max_records is not None
            else min(pages + RECORD_SLACK, MAX_DEFAULT_RECORDS)
        )
        caps = HANDLER.start()
        self._stacks = capture.DEFAULT_STACKS if stacks is None else stacks
        # Why writers cannot be named in this process, if they cannot.
        if self._stacks:
            # ensure_started() also watches the threads.
            self._stack_note = capture.ensure_started()
        else:
            self._stack_note = None
            # Thread names are kept even when stacks are off (cheap: one dict
            # insert per thread start).
            watch_threads()
        budget = self._stacks if self._stack_note is None else 0
        core = HANDLER.core
        self._gid, ioctls = core.guard_add(address, length, PAGE_SIZE, capacity, budget)
        # The register mask, not UFFDIO_API, says whether this range can be
        # write-protected (the probe checked anonymous memory only).
        if not ioctls & (1 << int(core.IOCTL_WRITEPROTECT_BIT)):
            core.guard_remove(self._gid)
            raise UffdUnavailableError(
                f"UFFDIO_REGISTER did not grant UFFDIO_WRITEPROTECT for this buffer's memory "
                f"(range ioctls {ioctls:#x}): this kernel cannot write-protect it",
                "use backing='anonymous' (or a newer kernel for shmem/hugetlb), "
                "or engine='diff' for this buffer",
            )
        # atexit=False: at exit the handler detaches (drains) every tracker
        # before it stops; an exit-time finalizer would drop the records.
        self._finalizer = weakref.finalize(self, _release_guard, self._gid)
        self._finalizer.atexit = False
        self._wp_unpopulated = caps.has("wp_unpopulated")
        self._exact = caps.has("exact_address")
        self._outbox = Outbox()
        HANDLER.track(self)

    @property
    def stopped(self) -> Stop | None:
        reason = super().stopped
        if reason is None:
            failure = HANDLER.failure()
            if failure is not None:
                # The handler gave up (and unregistered every range): keep
                # what was recorded, stop tracking, say why.
                self._detach(f"the fault handler stopped: {failure}")
                reason = self._stopped
        return reason

    def _call(self, name: str, *args: Any) -> Any:
        """A core call on this guard; a handler that gave up meanwhile
        becomes TrackingStoppedError, not the core's RuntimeError."""
        try:
            return getattr(HANDLER.core, name)(self._gid, *args)
        except RuntimeError:
            self._check()  # raises TrackingStoppedError if the handler gave up
            raise

    @property
    def guard_id(self) -> int:
        """The handler's id of this range (budget_hits answers with it)."""
        return int(self._gid)

    def set_budget(self, records: int) -> None:
        """Flag this guard to the budget eventfd after ``records`` more
        records (the hybrid engine's switch, ``_uffd/budget.c``)."""
        if self.stopped is None:
            self._call("guard_set_budget", records)

    def arm(self) -> None:
        self._check()
        core = HANDLER.core
        if not self._wp_unpopulated:
            # Before Linux 6.4 (no WP_UNPOPULATED) protecting a page that
            # was never touched silently does nothing: fault them all in.
            core.populate(self._address, self._length, PAGE_SIZE)
        if self._stack_note is None:
            # Each arming names the writers of its own first writes.
            self._call("guard_set_stacks", self._stacks)
        self._call("guard_protect", True)

    def pause(self) -> None:
        if self.stopped is None:
            self._call("guard_protect", False)

    def resume(self) -> None:
        if self.stopped is None:
            # Take the records first: re-protecting makes every page a
            # first write again, and the log must have room for them.
            self._take(*self._call("guard_drain"))
            self._call("guard_protect", True)

    def drain(self) -> Drained:
        if self.stopped is None:
            self._take(*self._call("guard_drain"))
        return self._outbox.hand_over()

    def discard(self) -> None:
        self.drain()
        self.duplicates = 0

    def close(self) -> Drained:
        self._finalizer.detach()
        if not self._inherited:
            self._take(*HANDLER.core.guard_remove(self._gid))
            HANDLER.untrack(self)
        self._stopped = self._stopped or CLOSED
        return self._outbox.hand_over()

    def _detach(self, reason: str) -> None:
        """Called by the handler when it stops: keep what we have."""
        if self._stopped is None:
            self._stopped = Stop(StopReason.HANDLER, reason)
            self._take(*HANDLER.core.guard_drain(self._gid))

    def _take(self, blob: bytes, overflow: int, duplicates: int = 0) -> None:
        self._outbox.overflow += overflow
        self.duplicates += duplicates
        if not blob:
            return
        build = partial(
            _record,
            self._address,
            self._exact,
            thread_names(),
            self._stack_note,
        )
        # Records whose writer was captured are made now: their stack is
        # read from the capture file, which moves on.  The others are kept
        # packed and made when looked at (issue 11).
        attrs = blob[_ATTR_AT::RECORD_SIZE]
        if _CAPTURED.isdisjoint(attrs):
            self._outbox.records.add(RawChunk(blob, build, self._address))
            return
        lazy, base = 0, self._address
        for index, attr in enumerate(attrs):
            if attr in _CAPTURED:
                if index > lazy:
                    self._outbox.records.add(
                        RawChunk(
                            blob[lazy * RECORD_SIZE : index * RECORD_SIZE], build, self._address
                        )
                    )
                self._outbox.records.append(build(raw_fault(blob, index)))
                lazy = index + 1
        if lazy < len(attrs):
            self._outbox.records.add(RawChunk(blob[lazy * RECORD_SIZE :], build, base))


#: Where a record's ``attr`` lies in its packed form (its low byte: every
#: ATTR_* value is below 256), and the values whose stack is read at drain.
_ATTR_AT = struct.calcsize(RECORD_FORMAT[:8])
_CAPTURED = frozenset({capture.ATTR_SIGNALLED, capture.ATTR_NAMING, capture.ATTR_NAMED})


def _record(
    address: int, exact: bool, names: dict[int, str], note: str | None, raw: RawFault
) -> WriteRecord:
    """The WriteRecord of one of the C core's records."""
    if raw.kind == KIND_DISCARD:
        return WriteRecord(
            offset=raw.address - address,
            exact=True,
            thread_id=None,
            thread_name=None,
            time=raw.time_ns / 1e9,
            seq=raw.seq,
            stack_note=DISCARD_NOTE,
            kind=KIND_NAMES[raw.kind],
            length=raw.length,
        )
    return WriteRecord(
        offset=raw.address - address,
        exact=exact,
        thread_id=raw.tid or None,
        thread_name=names.get(raw.tid) if raw.tid else None,
        time=raw.time_ns / 1e9,
        seq=raw.seq,
        **capture.describe(raw, note),
    )
