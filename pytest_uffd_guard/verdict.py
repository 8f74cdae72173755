"""The verdict on what a guarded buffer saw: which writes and changed bytes
are forbidden, allowed or only reported, in time linear in what was seen.

Pure functions of plain data (offsets, byte runs, allowed ranges and the
answers of the ``pytest_uffd_write_allowed`` hook): no pytest, no kernel.
Issue 9, item 11: an 8 MiB float array rewritten in place gives 2048
writes and about a million changed runs (two bytes of every float), so
nothing here compares every write with every run.  Runs are sorted (they
come from a diff) and looked up by bisection; a summary keeps the exact
totals, the first few runs in detail and the runs coalesced into blocks.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Status of a write or of a changed run.
FORBIDDEN = "forbidden"  # fails the test
ALLOWED = "allowed"  # into a read-only buffer, but allowed (allow=, or a hook)
REPORTED = "reported"  # shown only: writable buffer, setup/teardown, report-only mode
STATUSES = (FORBIDDEN, ALLOWED, REPORTED)

#: Runs of a byte buffer this close to each other share a block.
RAW_GAP = 8

Range = tuple[int, int]


class Ranges:
    """Byte ranges, merged and sorted once, for lookups by bisection."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        merged: list[list[int]] = []
        for a, b in sorted(r for r in ranges if r[1] > r[0]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.stops = [b for _, b in merged]

    def __bool__(self) -> bool:
        return bool(self.starts)

    def covers(self, start: int, stop: int) -> bool:
        """True if every byte of ``[start, stop)`` lies in the ranges."""
        i = bisect_right(self.starts, start) - 1
        return i >= 0 and self.stops[i] >= stop

    def meets(self, start: int, stop: int) -> bool:
        """True if some byte of ``[start, stop)`` lies in the ranges."""
        i = bisect_left(self.stops, start + 1)
        return i < len(self.starts) and self.starts[i] < stop


def covered(start: int, stop: int, ranges: Iterable[Range]) -> bool:
    """True if every byte of ``[start, stop)`` lies in one of ``ranges``."""
    return stop <= start or Ranges(ranges).covers(start, stop)


def normalize_range(item: Any, size: int | None = None) -> Range:
    """``slice(a, b)`` or ``(a, b)`` -> ``(start, stop)``; raises ValueError.

    Negative bounds count from the end when ``size`` is known.
    """
    if isinstance(item, slice):
        if item.step not in (None, 1):
            raise ValueError(f"allow range {item!r} has a step; only contiguous ranges work")
        start, stop = item.start, item.stop
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        start, stop = item
    else:
        raise ValueError(f"allow range {item!r} is neither a slice nor a (start, stop) pair")
    start = 0 if start is None else start
    if stop is None:
        if size is None:
            raise ValueError(f"allow range {item!r} has no stop")
        stop = size
    if not isinstance(start, int) or not isinstance(stop, int):
        raise ValueError(f"allow range {item!r} needs int bounds")
    if size is not None:
        start = start + size if start < 0 else start
        stop = stop + size if stop < 0 else stop
    if start < 0 or stop < start:
        raise ValueError(f"allow range {item!r} is empty or reversed")
    return (start, stop)


class Runs:
    """Changed runs ``(offset, length)``, sorted and disjoint (as a diff gives them)."""

    def __init__(self, runs: Sequence[Range]) -> None:
        self.runs = runs
        self.starts = [offset for offset, _ in runs]

    def in_span(self, start: int, stop: int) -> list[Range]:
        """The parts of the runs inside ``[start, stop)``, as ``(start, stop)``."""
        i = max(bisect_right(self.starts, start) - 1, 0)
        out = []
        runs = self.runs
        while i < len(runs) and runs[i][0] < stop:
            a, n = runs[i]
            if a + n > start:
                out.append((max(a, start), min(a + n, stop)))
            i += 1
        return out


def write_in_ranges(
    offset: int,
    exact: bool,
    spans: Sequence[Range],
    page_size: int,
    allow: Ranges | Sequence[Range],
) -> bool:
    """Whether a write lies inside ``allow``: its offset (when exact) and
    every byte changed in its page (``spans``).  ``page_size`` is the
    buffer's unit (a huge page for hugetlb)."""
    if not isinstance(allow, Ranges):
        allow = Ranges(allow)
    if not allow:
        return False
    page = offset - offset % page_size
    if exact and not allow.covers(offset, offset + 1):
        return False
    if not exact and not spans:
        # Page granularity and nothing changed: the page meeting a range is
        # all that can be known.
        return allow.meets(page, page + page_size)
    return all(allow.covers(a, b) for a, b in spans)


def write_status(readonly: bool, enforced: bool, allowed: bool | None) -> str:
    """A write's status from the buffer's rules and the hooks' answer."""
    if not readonly:
        return REPORTED
    if allowed:
        return ALLOWED
    return FORBIDDEN if enforced else REPORTED


class RunJudge:
    """The status of a changed run: allowed when ``allow`` covers it, or when
    every write recorded in its pages was allowed; else forbidden (when the
    buffer's rules are enforced) or reported.

    ``writes`` are ``(offset, status)`` pairs.
    """

    def __init__(
        self,
        writes: Sequence[tuple[int, str]],
        allow: Ranges,
        page_size: int,
        readonly: bool,
        enforced: bool,
    ) -> None:
        self.allow = allow
        self.page_size = page_size
        self.default = FORBIDDEN if readonly and enforced else REPORTED
        any_allowed = readonly and any(status == ALLOWED for _, status in writes)
        #: The one status of every run, when it cannot depend on the run.
        self.uniform = None if readonly and (allow or any_allowed) else self.default
        self.pages: list[int] = []
        #: bad[i]: writes not allowed among the first i (sorted by page).
        self.bad = [0]
        if any_allowed:
            pages = sorted((o - o % page_size, s == ALLOWED) for o, s in writes)
            self.pages = [p for p, _ in pages]
            for _, ok in pages:
                self.bad.append(self.bad[-1] + (not ok))

    def __call__(self, start: int, stop: int) -> str:
        if self.uniform is not None:
            return self.uniform
        if self.allow.covers(start, stop):
            return ALLOWED
        lo = bisect_left(self.pages, start - start % self.page_size)
        hi = bisect_left(self.pages, stop)
        if hi > lo and self.bad[hi] == self.bad[lo]:
            return ALLOWED
        return self.default


@dataclass
class Block:
    """Neighbouring runs of one status, coalesced: ``[offset, offset+length)``
    holds ``runs`` runs and ``changed`` changed bytes; for an array, the
    elements ``first_element..last_element`` (inclusive)."""

    offset: int
    length: int
    runs: int
    changed: int
    status: str
    first_element: int | None = None
    last_element: int | None = None

    @property
    def stop(self) -> int:
        return self.offset + self.length


@dataclass
class RunSummary:
    """Changed runs in bounded detail, with exact totals."""

    detail: list[tuple[int, int, str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    runs: int = 0
    changed: int = 0
    blocks_total: int = 0
    by_status: dict[str, int] = field(default_factory=dict)


def summarize_runs(
    runs: Sequence[Range],
    judge: RunJudge,
    item_size: int = 1,
    detail: int = 100,
    max_blocks: int = 100,
) -> RunSummary:
    """The first ``detail`` runs with their status, the first ``max_blocks``
    blocks, and exact counts, in one pass over sorted ``(offset, length)``
    runs (about 0.2 s per million; the hot loops keep to local variables).

    Runs of an array (``item_size`` > 1) share a block when they touch the
    same or neighbouring elements; runs of bytes when fewer than
    :data:`RAW_GAP` unchanged bytes lie between them.
    """
    out = RunSummary(runs=len(runs))
    if not runs:
        return out
    uniform = judge.uniform
    if uniform is not None:
        out.by_status = {uniform: len(runs)}
        out.detail = [(o, n, uniform) for o, n in runs[:detail]]
        groups = [(0, len(runs), uniform)]
    else:
        statuses = [judge(o, o + n) for o, n in runs]
        counts = dict.fromkeys(STATUSES, 0)
        for status in statuses:
            counts[status] += 1
        out.by_status = {k: v for k, v in counts.items() if v}
        out.detail = [(o, n, st) for (o, n), st in zip(runs[:detail], statuses)]
        groups = []
        start = 0
        for i in range(1, len(runs) + 1):
            if i == len(runs) or statuses[i] != statuses[start]:
                groups.append((start, i, statuses[start]))
                start = i
    for lo, hi, status in groups:
        for block in _coalesce(runs, lo, hi, item_size):
            out.blocks_total += 1
            out.changed += block[3]
            if len(out.blocks) < max_blocks:
                out.blocks.append(_block(block, status, item_size))
    return out


def _coalesce(
    runs: Sequence[Range], lo: int, hi: int, item_size: int
) -> list[tuple[int, int, int, int]]:
    """Blocks ``(offset, stop, runs, changed)`` of ``runs[lo:hi]``."""
    blocks = []
    first, n = runs[lo]
    stop = first + n
    count, changed = 1, n
    if item_size > 1:
        last = (stop - 1) // item_size
        for i in range(lo + 1, hi):
            offset, n = runs[i]
            if offset // item_size <= last + 1:
                stop = offset + n
                last = (stop - 1) // item_size
                count += 1
                changed += n
            else:
                blocks.append((first, stop, count, changed))
                first, stop, count, changed = offset, offset + n, 1, n
                last = (stop - 1) // item_size
    else:
        for i in range(lo + 1, hi):
            offset, n = runs[i]
            if offset - stop <= RAW_GAP:
                stop = offset + n
                count += 1
                changed += n
            else:
                blocks.append((first, stop, count, changed))
                first, stop, count, changed = offset, offset + n, 1, n
    blocks.append((first, stop, count, changed))
    return blocks


def _block(block: tuple[int, int, int, int], status: str, item_size: int) -> Block:
    offset, stop, runs, changed = block
    if item_size > 1:
        return Block(
            offset, stop - offset, runs, changed, status, offset // item_size,
            (stop - 1) // item_size,
        )  # fmt: skip
    return Block(offset, stop - offset, runs, changed, status)


__all__ = [
    "ALLOWED",
    "FORBIDDEN",
    "REPORTED",
    "Block",
    "RunJudge",
    "RunSummary",
    "Ranges",
    "Runs",
    "covered",
    "summarize_runs",
    "write_in_ranges",
    "write_status",
]
