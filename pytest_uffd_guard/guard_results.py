"""What a guarded buffer saw: its records and its changed bytes.

The read side of :class:`~pytest_uffd_guard.guard.GuardedBuffer`, as its
base class: ``writes``, ``overflowed``, ``duplicates`` and ``changes()``
drain the tracker (``engines.base.Drained``) and diff the buffer against
its snapshot (``engines.pagediff``).  The lifecycle (arming, protect,
close) is ``guard.py``'s.
"""

from __future__ import annotations

import mmap
import sys

from .engines import pagediff
from .engines.base import Tracker
from .guard_args import count
from .guard_mapping import ClosableMapping
from .kernel.process import ForkSafeLock
from .kernel.recordseq import Changes, RecordLog, Records


class GuardResults(ClosableMapping):
    """Records and changes of a guarded buffer (see the module docstring)."""

    address: int
    backing: str
    _lock: ForkSafeLock
    _tracker: Tracker
    _records: RecordLog
    _overflow: int
    _final_changes: Changes | None
    _snapshot: mmap.mmap | None
    _snapshot_address: int

    def _live_snapshot(self) -> mmap.mmap:
        assert self._snapshot is not None
        return self._snapshot

    @property
    def writes(self) -> Records:
        """Recorded writes, oldest first: the first write into each page.

        An immutable list (see ``kernel.recordseq.Records``) whose records
        are made when looked at."""
        with self._lock:
            self._drain()
            return self._records.view()

    @property
    def overflowed(self) -> int:
        """Writes that happened but did not fit in the record log."""
        with self._lock:
            self._drain()
            return self._overflow

    @property
    def duplicates(self) -> int:
        """Extra faults on pages already recorded since the last arming.

        Threads that write the same page at the same moment each fault; the
        first is the record, the others are only counted here.
        """
        with self._lock:
            self._drain()
            return int(getattr(self._tracker, "duplicates", 0))

    def changes(self, preview: int | None = None) -> Changes:
        """Runs of bytes that differ from the snapshot taken at arming.

        With ``preview``, ``before``/``after`` hold at most that many bytes
        of each run.  After ``close()``, the changes as they were at close.
        An immutable list (``kernel.recordseq.Changes``) whose Change objects
        are made when looked at.
        """
        if preview is not None:
            preview = count(
                preview,
                "preview",
                "pass how many bytes of each run to keep, or None for all",
                maximum=sys.maxsize,
            )
        with self._lock:
            if self._final_changes is not None:
                return self._final_changes
            self._check_open()
            return self._changes(preview)

    def _changes(self, preview: int | None, whole_up_to: int | None = None) -> Changes:
        return pagediff.changes(
            self.address,
            self._snapshot_address,
            self._size,
            preview,
            whole_up_to,
            live_anonymous=self.backing == "anonymous",
        )

    def _runs(self) -> list[tuple[int, int]]:
        return pagediff.snapshot_runs(
            self.address,
            self._snapshot_address,
            self._size,
            live_anonymous=self.backing == "anonymous",
        )

    def _changed_runs(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of each changed run, nothing copied (harvest)."""
        with self._lock:
            self._check_open()
            return self._runs()

    def _run_bytes(self, offset: int, n: int) -> tuple[bytes, bytes]:
        """``n`` bytes at ``offset``: the snapshot's and the buffer's (harvest)."""
        with self._lock:
            self._check_open()
            before = self._live_snapshot()[offset : offset + n]
            return before, mmap.mmap.__getitem__(self, slice(offset, offset + n))

    def _quiet(self) -> bool:
        """True when nothing happened since the last arming: no record, no
        overflow, no changed byte, and tracking on (or closed cleanly).  One
        lock and one drain: the plugin asks this of every buffer after every
        test phase, and almost always the answer is yes."""
        with self._lock:
            if self._closed:
                final = self._final_changes
                return not (len(self._records) or self._overflow or final is None or len(final))
            self._drain()
            if len(self._records) or self._overflow or self._tracker.stopped is not None:
                return False
            return not self._runs()

    @property
    def tracking(self) -> bool:
        """True while writes are being recorded."""
        return not self._closed and self._tracker.stopped is None

    @property
    def stopped_reason(self) -> str | None:
        """Why tracking stopped early (handler error, fork), or None."""
        stop = None if self._closed else self._tracker.stopped
        return None if stop is None else str(stop)

    def _drain(self) -> None:
        if not self._closed:
            drained = self._tracker.drain()
            if drained.log:
                self._records.extend(drained.log)
            self._overflow += drained.overflow
