"""The page-diff library: which bytes and pages differ from a snapshot.

Shared by the diff engine (its whole method), the async and hybrid engines
(each written page's record is placed on its first changed byte) and
``GuardedBuffer`` (``changes()``).  Uses the C core when it is there, and
pure Python (ctypes, numpy when installed) otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ..kernel.process import ForkSafeLock
from ..kernel.records import WriteRecord
from .base import Drained, Outbox

_seq_lock = ForkSafeLock()
_seq_next = 1


def _seqs(n: int) -> range:
    """``n`` fresh sequence numbers for records made in Python (async and
    diff engines); a lock, not the GIL, keeps them unique across threads."""
    global _seq_next
    with _seq_lock:
        first = _seq_next
        _seq_next += n
    return range(first, first + n)


def diff_runs(a: int, b: int, length: int) -> list[tuple[int, int]]:
    """Runs ``(offset, length)`` of differing bytes between two memories.

    Uses the C core when it is there, pure Python (via ctypes) otherwise, so
    the diff engine also works where the extension could not be built.
    """
    if length <= 0:
        return []
    try:
        from .. import _uffd
    except ImportError:
        return _diff_runs_py(a, b, length)
    runs, _ = _uffd.diff_runs(a, b, length, 1 << 62)
    return list(runs)


def _diff_runs_py(a: int, b: int, length: int) -> list[tuple[int, int]]:
    import ctypes

    left = ctypes.string_at(a, length)
    right = ctypes.string_at(b, length)
    runs: list[tuple[int, int]] = []
    step = 4096
    for base in range(0, length, step):
        if left[base : base + step] == right[base : base + step]:
            continue
        for i in range(base, min(base + step, length)):
            if left[i] != right[i]:
                if runs and runs[-1][0] + runs[-1][1] == i:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((i, 1))
    return runs


#: Bytes compared per numpy step (bounds the temporary arrays to 1/8 of it).
NUMPY_CHUNK = 16 << 20
#: Below this many bytes numpy's call overhead costs more than it saves.
NUMPY_MIN = 256 << 10


def first_changes(address: int, snapshot: int, start: int, end: int, unit: int) -> dict[int, int]:
    """``{page offset: offset of its first changed byte}`` for pages in
    ``[start, end)`` (offsets from ``address``, page-aligned) that differ.

    With numpy, pages are compared a word at a time and only up to their
    first difference matters (~1 GB/s per core faster than a full diff);
    without it, the C core's byte diff is used.
    """
    if unit % 8 == 0 and (end - start) % unit == 0 and end - start >= NUMPY_MIN:
        try:
            return _first_changes_numpy(address, snapshot, start, end, unit)
        except ImportError:
            pass
    found: dict[int, int] = {}
    for offset, length in diff_runs(address + start, snapshot + start, end - start):
        first = start + offset
        last = first + length - 1
        page = first - first % unit
        while page <= last:
            found.setdefault(page, max(first, page))
            page += unit
    return found


def _first_changes_numpy(
    address: int, snapshot: int, start: int, end: int, unit: int
) -> dict[int, int]:
    import ctypes

    import numpy as np

    words = unit // 8
    found: dict[int, int] = {}
    chunk = max(unit, NUMPY_CHUNK - NUMPY_CHUNK % unit)
    for base in range(start, end, chunk):
        n = min(chunk, end - base) // 8
        a = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(address + base))
        b = np.ctypeslib.as_array((ctypes.c_uint64 * n).from_address(snapshot + base))
        differs = (a != b).reshape(-1, words)
        pages = np.flatnonzero(differs.any(axis=1))
        if not pages.size:
            continue
        index = pages * words + differs[pages].argmax(axis=1)
        # One read of each changed word, compared byte by byte in memory
        # order: a writer may have set it back since the compare above (a
        # log2 of 0 gave offsets near -2**60, issue 9 item 6).
        bytes_ = a[index].view(np.uint8).reshape(-1, 8) != b[index].view(np.uint8).reshape(-1, 8)
        byte = np.where(bytes_.any(axis=1), bytes_.argmax(axis=1), 0)
        firsts = base + index * 8 + byte
        for page, first in zip((base + pages * unit).tolist(), firsts.tolist()):
            found[page] = first
    return found


def page_record(offset: int, now: float | None = None) -> WriteRecord:
    """A record for a write found after the fact: no thread, not exact.

    ``time`` is when it was found (CLOCK_MONOTONIC, like the sync engine's),
    not when it happened.
    """
    return WriteRecord(
        offset=offset,
        exact=False,
        thread_id=None,
        thread_name=None,
        time=time.monotonic() if now is None else now,
        seq=_seqs(1)[0],
    )


def page_records(offsets: list[int], now: float) -> list[WriteRecord]:
    """``page_record`` for many offsets at once.

    A big buffer written in full makes hundreds of thousands of records; the
    frozen dataclass's ``__init__`` costs several microseconds each, so
    records are filled from a template's ``__dict__`` (about 4x faster),
    falling back to the constructor if WriteRecord ever uses ``__slots__``.
    """
    template = page_record(0, now)
    if not hasattr(template, "__dict__"):
        return [page_record(offset, now) for offset in offsets]
    fields = dict(template.__dict__)
    new = object.__new__
    records = []
    for offset, seq in zip(offsets, _seqs(len(offsets))):
        record = new(WriteRecord)
        values = record.__dict__
        values.update(fields)
        values["offset"] = offset
        values["seq"] = seq
        records.append(record)
    return records


class PageLog:
    """Pages already reported and records waiting to be drained.

    Not locked itself: its tracker holds its lock around every use.
    """

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.reported: set[int] = set()
        self.outbox = Outbox()
        self.kept = 0

    def add(self, pages: Iterable[int], offsets: dict[int, int]) -> None:
        new = sorted(set(pages) - self.reported)
        self.reported.update(new)
        room = len(new) if self.capacity is None else max(0, self.capacity - self.kept)
        kept = new[:room]
        self.outbox.overflow += len(new) - len(kept)
        self.kept += len(kept)
        found = page_records([offsets.get(p, p) for p in kept], time.monotonic())
        self.outbox.records.extend(found)

    def reset(self) -> None:
        self.reported.clear()
        self.outbox = Outbox()
        self.kept = 0


class PageLogged:
    """``drain`` and ``discard`` of the trackers that find written pages
    after the fact (async, diff): ``_collect`` adds them to ``_log``."""

    _lock: ForkSafeLock
    _log: PageLog

    def _collect(self) -> None:
        raise NotImplementedError

    def drain(self) -> Drained:
        with self._lock:
            self._collect()
            return self._log.outbox.hand_over()

    def discard(self) -> None:
        with self._lock:
            self._log.reset()
