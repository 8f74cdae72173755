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

from .engines.base import Tracker
from .engines.pagediff import diff_runs
from .guard_args import count
from .guard_mapping import ClosableMapping
from .kernel.process import ForkSafeLock
from .kernel.records import Change, WriteRecord


class GuardResults(ClosableMapping):
    """Records and changes of a guarded buffer (see the module docstring)."""

    address: int
    _lock: ForkSafeLock
    _tracker: Tracker
    _records: list[WriteRecord]
    _overflow: int
    _final_changes: list[Change] | None
    _snapshot: mmap.mmap | None
    _snapshot_address: int

    def _live_snapshot(self) -> mmap.mmap:
        assert self._snapshot is not None
        return self._snapshot

    @property
    def writes(self) -> list[WriteRecord]:
        """Recorded writes, oldest first: the first write into each page."""
        with self._lock:
            self._drain()
            return list(self._records)

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

    def changes(self, preview: int | None = None) -> list[Change]:
        """Runs of bytes that differ from the snapshot taken at arming.

        With ``preview``, ``before``/``after`` hold at most that many bytes
        of each run.  After ``close()``, the changes as they were at close.
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
                return list(self._final_changes)
            self._check_open()
            return self._diff(self._runs(), preview)

    def _runs(self) -> list[tuple[int, int]]:
        return diff_runs(self.address, self._snapshot_address, self._size)

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

    def _diff(self, runs: list[tuple[int, int]], preview: int | None) -> list[Change]:
        snapshot = self._live_snapshot()
        result = []
        for offset, length in runs:
            n = length if preview is None else min(length, preview)
            before = snapshot[offset : offset + n]
            after = mmap.mmap.__getitem__(self, slice(offset, offset + n))
            result.append(Change(offset, length, before, after))
        return result

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
            self._records.extend(drained.records)
            self._overflow += drained.overflow
