"""The page-diff library: which bytes and pages differ from a snapshot.

Shared by the diff engine (its whole method), the async and hybrid engines
(each written page's record is placed on its first changed byte) and
``GuardedBuffer`` (``changes()``).  Uses the C core when it is there, and
pure Python (ctypes) otherwise.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

from ..kernel.process import ForkSafeLock
from ..kernel.records import Change, WriteRecord
from ..kernel.recordseq import Changes, PageChunk
from .base import Drained, Outbox

try:
    from .. import _uffd as _core
except ImportError:  # no C core built: the ctypes fallbacks below
    _core = None  # type: ignore[assignment]

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
    if _core is None:
        return _diff_runs_py(a, b, length)
    runs, _ = _core.diff_runs(a, b, length, 1 << 62)
    return list(runs)


#: ``whole_up_to`` for "every byte of every run".
ALL = (1 << 64) - 1


def changes(
    address: int,
    snapshot: int,
    length: int,
    preview: int | None,
    whole_up_to: int | None = None,
    *,
    live_anonymous: bool = False,
) -> Changes:
    """The changed runs of ``address`` against ``snapshot`` with their bytes:
    all of them if they add up to at most ``whole_up_to`` bytes, else the
    first ``preview`` bytes of each (all of them for None; ``whole_up_to``
    None: the preview always applies).

    One C call (issue 11); pure Python where the C core is missing.
    ``snapshot`` must be a private anonymous mapping (``anonymous_map``),
    and so must ``address`` when ``live_anonymous``: their pages that were
    never touched are taken as zeros without being read (faulting them in
    would cost several times the compare).
    """
    cap = ALL if preview is None else min(preview, ALL)
    whole = (0 if preview is not None else ALL) if whole_up_to is None else min(whole_up_to, ALL)
    if length <= 0:
        return Changes()
    if _core is None:
        return _changes_py(address, snapshot, length, cap, whole)
    return Changes(*_core.changed_runs(address, snapshot, length, cap, whole, int(live_anonymous)))


def snapshot_runs(
    address: int, snapshot: int, length: int, *, live_anonymous: bool = False
) -> list[tuple[int, int]]:
    """``diff_runs`` against a snapshot, with :func:`changes`' rules (no
    bytes copied)."""
    if length <= 0:
        return []
    return changes(address, snapshot, length, 0, 0, live_anonymous=live_anonymous).runs()


def _changes_py(address: int, snapshot: int, length: int, cap: int, whole: int) -> Changes:
    import ctypes

    runs = _diff_runs_py(address, snapshot, length)
    if sum(n for _, n in runs) <= whole:
        cap = ALL
    return Changes.of(
        Change(
            offset,
            n,
            ctypes.string_at(snapshot + offset, min(n, cap)),
            ctypes.string_at(address + offset, min(n, cap)),
        )
        for offset, n in runs
    )


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


def first_changes(
    address: int,
    snapshot: int,
    start: int,
    end: int,
    unit: int,
    *,
    live_anonymous: bool = False,
) -> dict[int, int]:
    """``{page offset: offset of its first changed byte}`` for pages in
    ``[start, end)`` (offsets from ``address``, page-aligned) that differ."""
    reported = bytearray(-(-end // unit))
    found = page_firsts(
        address,
        snapshot,
        [(start, end)],
        unit,
        reported,
        only_changed=True,
        live_anonymous=live_anonymous,
    )
    return {offset - offset % unit: offset for offset in _unpack_offsets(found)}


def page_firsts(
    address: int,
    snapshot: int,
    ranges: Iterable[tuple[int, int]],
    unit: int,
    reported: bytearray,
    *,
    only_changed: bool,
    live_anonymous: bool = False,
) -> bytes:
    """The first changed byte of each unit of ``ranges`` (``(start, end)``
    offsets, unit-aligned starts, ascending) not marked in ``reported`` (a
    byte per unit), which it marks; a unit with no changed byte gives its
    own offset, or is skipped with ``only_changed``.  Native uint64 offsets,
    packed (``kernel.recordseq.PageChunk``): one C call, no Python object per
    page (issue 11); pure Python where the C core is missing.  The rules of
    :func:`changes` apply to ``snapshot`` and ``live_anonymous``.
    """
    flat = [x for pair in ranges for x in pair]
    if _core is None:
        return _page_firsts_py(address, snapshot, flat, unit, reported, only_changed)
    packed = struct.pack(f"={len(flat)}Q", *flat)
    return bytes(
        _core.page_firsts(
            address, snapshot, packed, unit, reported, int(only_changed), int(live_anonymous)
        )
    )


def _page_firsts_py(
    address: int, snapshot: int, flat: list[int], unit: int, reported: bytearray, only: bool
) -> bytes:
    found = []
    for lo, hi in zip(flat[::2], flat[1::2]):
        for page in range(lo, hi, unit):
            k = page // unit
            if reported[k]:
                continue
            n = min(unit, hi - page)
            runs = diff_runs(address + page, snapshot + page, n)
            if not runs and only:
                continue
            reported[k] = 1
            found.append(page + (runs[0][0] if runs else 0))
    return struct.pack(f"={len(found)}Q", *found)


def _unpack_offsets(packed: bytes) -> list[int]:
    return list(memoryview(packed).cast("B").cast("Q")) if packed else []


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


class PageLog:
    """Pages already reported (a byte per unit) and records waiting to be
    drained.

    Not locked itself: its tracker holds its lock around every use.
    """

    def __init__(self, capacity: int | None, units: int) -> None:
        self.capacity = capacity
        self.reported = bytearray(units)
        self.outbox = Outbox()
        self.kept = 0

    def collect(
        self,
        address: int,
        snapshot: int,
        ranges: Iterable[tuple[int, int]],
        unit: int,
        *,
        only_changed: bool,
        live_anonymous: bool = False,
    ) -> None:
        """Records for the units of ``ranges`` not reported yet (see
        :func:`page_firsts`)."""
        self.add_found(
            page_firsts(
                address,
                snapshot,
                ranges,
                unit,
                self.reported,
                only_changed=only_changed,
                live_anonymous=live_anonymous,
            )
        )

    def add_found(self, offsets: bytes) -> None:
        """Records at ``offsets`` (packed, marked reported already), as far
        as the capacity goes; the rest are counted as overflow."""
        found = len(offsets) // 8
        room = found if self.capacity is None else max(0, min(found, self.capacity - self.kept))
        self.outbox.overflow += found - room
        if not room:
            return
        self.kept += room
        self.outbox.records.add(PageChunk(offsets[: 8 * room], _seqs(room)[0], time.monotonic()))

    def mark(self, pages: Iterable[int], unit: int) -> None:
        """Treat the units at offsets ``pages`` as reported."""
        for page in pages:
            self.reported[page // unit] = 1

    def reset(self) -> None:
        self.reported = bytearray(len(self.reported))
        self.outbox = Outbox()
        self.kept = 0


class PageLogged:
    """``drain`` and ``discard`` of the trackers that find written pages
    after the fact (async, diff): ``_collect`` adds them to ``_log``."""

    _lock: ForkSafeLock
    _log: PageLog
    _address: int
    _length: int
    _snapshot: int
    _unit: int
    #: Whether the memory is private anonymous (``base.live_anonymous``).
    _anonymous: bool

    def _collect(self) -> None:
        raise NotImplementedError

    def _collect_changed(self) -> None:
        """Records for every page that differs from the snapshot and was
        not reported yet; the caller holds the lock."""
        self._log.collect(
            self._address,
            self._snapshot,
            [(0, self._length)],
            self._unit,
            only_changed=True,
            live_anonymous=self._anonymous,
        )

    def drain(self) -> Drained:
        with self._lock:
            self._collect()
            return self._log.outbox.hand_over()

    def discard(self) -> None:
        with self._lock:
            self._log.reset()
