"""Reading what a guarded buffer saw into a bounded :class:`Finding`.

The plugin's glue between a buffer and the report, without pytest: the
hooks are passed in as callables.  Issue 9, item 11: the work is linear
in writes plus changed runs, and only the runs kept in detail are copied
out of the buffer (``GuardedBuffer.changes()`` copies every run, ~3 s for
the million runs of an 8 MiB float array rewritten in place).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .findings import DETAIL, MAX_BLOCKS, ChangeInfo, Finding, WriteInfo
from .verdict import REPORTED, Range, Ranges, RunJudge, Runs, summarize_runs, write_in_ranges
from .verdict import write_status as _write_status

PAGE_SIZE = mmap.PAGESIZE
#: Bytes of each changed run kept in a finding (before and after).
PREVIEW_BYTES = 32

#: ``ask(record, changes_in_its_page) -> True/False/None``: the hook's answer.
Ask = Callable[[Any, list[Range]], "bool | None"]
#: ``tell(record, status)``: every write, after the verdict.
Tell = Callable[[Any, str], None]


@dataclass(frozen=True)
class Rules:
    """What applies to one buffer in one phase."""

    readonly: bool
    #: Whether forbidden writes fail the test (call phase, not report-only).
    enforced: bool
    allow: tuple[Range, ...] = ()
    #: numpy layout, for element-aware blocks: ("float64[1048576]", 8).
    element: tuple[str, int] | None = None


class ChangedRuns:
    """A buffer's changed runs, and their bytes read on demand.

    An open GuardedBuffer answers through ``_changed_runs()`` and
    ``_run_bytes()`` (no copy of every run, and no memory access here).
    """

    def __init__(self, buffer: Any) -> None:
        self.runs: Sequence[tuple[int, int]]
        self._buffer = buffer
        self._live = not buffer.closed and hasattr(buffer, "_changed_runs")
        if self._live:
            self.runs = buffer._changed_runs()
        else:
            # Closed (the changes kept at close) or a buffer of another make.
            self._kept = buffer.changes(preview=PREVIEW_BYTES)
            self.runs = [(c.offset, c.length) for c in self._kept]

    def preview(self, index: int) -> tuple[bytes, bytes]:
        """``(before, after)`` of run ``index``, at most PREVIEW_BYTES each."""
        if not self._live:
            change = self._kept[index]
            return change.before[:PREVIEW_BYTES], change.after[:PREVIEW_BYTES]
        offset, length = self.runs[index]
        before, after = self._buffer._run_bytes(offset, min(length, PREVIEW_BYTES))
        return bytes(before), bytes(after)


def element_of(value: Any) -> tuple[str, int] | None:
    """``("float64[1048576]", 8)`` for a numpy array or a typed memoryview,
    in the layout the guarded buffer holds (C order), None for bytes."""
    if isinstance(value, memoryview):
        if value.format == "B" or not value.itemsize:
            return None
        dims = ", ".join(str(n) for n in value.shape or ())
        return f"{value.format}[{dims}]", value.itemsize
    dtype = getattr(value, "dtype", None)
    flags = getattr(value, "flags", None)
    if dtype is None or flags is None or not hasattr(value, "shape"):
        return None
    if not flags.c_contiguous and flags.f_contiguous:
        value = value.T  # a Fortran array is guarded as its C-ordered transpose
    dims = ", ".join(str(n) for n in value.shape)
    return f"{dtype}[{dims}]", int(dtype.itemsize)


def judge(
    buffer: Any,
    records: Sequence[Any],
    rules: Rules,
    ask: Ask | None,
    tell: Tell | None,
    overflowed: int = 0,
    stopped: str | None = None,
    *,
    nodeid: str,
    phase: str,
    origin: str,
    test_file: str | None = None,
    changes: ChangedRuns | None = None,
) -> Finding:
    """Give each write and changed run its status, call the hooks, and keep
    a bounded finding (``ask``: None when no hook needs asking; ``changes``:
    the buffer's, when the caller has read them already)."""
    if changes is None:
        changes = ChangedRuns(buffer)
    unit = unit_of(buffer)
    allow = Ranges(rules.allow)
    if rules.readonly and ask is not None:
        runs = Runs(changes.runs)
        statuses = []
        for record in records:
            page = record.offset - record.offset % unit
            answer = ask(record, runs.in_span(page, page + unit))
            statuses.append(_write_status(rules.readonly, rules.enforced, answer))
    else:
        statuses = [_write_status(rules.readonly, rules.enforced, None)] * len(records)
    run_judge = RunJudge(
        [(r.offset, s) for r, s in zip(records, statuses)] if ask is not None else [],
        allow,
        unit,
        rules.readonly,
        rules.enforced,
    )
    name, item_size = rules.element or (None, 1)
    summary = summarize_runs(changes.runs, run_judge, item_size, DETAIL, MAX_BLOCKS)
    infos = []
    for index, (offset, length, status) in enumerate(summary.detail):
        before, after = changes.preview(index)
        infos.append(ChangeInfo(offset, length, before.hex(), after.hex(), status))
    writes = tuple(
        WriteInfo.from_record(record, status, test_file)
        for record, status in zip(records[:DETAIL], statuses)
    )
    if tell is not None:
        for record, status in zip(records, statuses):
            tell(record, status)
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return Finding(
        nodeid=nodeid,
        phase=phase,
        buffer=str(buffer.name),
        size=len(buffer),
        origin=origin,
        readonly=rules.readonly,
        writes=writes,
        changes=tuple(infos),
        overflowed=overflowed,
        stopped=stopped,
        allow=rules.allow,
        writes_total=len(records),
        writes_by_status=tuple(counts.items()),
        changes_total=summary.runs,
        changes_by_status=tuple(summary.by_status.items()),
        changed_bytes=summary.changed,
        blocks=tuple(summary.blocks),
        blocks_total=summary.blocks_total,
        element=name,
        item_size=item_size,
    )


def unit_of(buffer: Any) -> int:
    """The page size a buffer is tracked in (a huge page for hugetlb): the
    unit a write's "page" means in the verdict (issue 10: not mmap.PAGESIZE)."""
    unit = getattr(buffer, "_unit", None)
    return unit if isinstance(unit, int) and unit > 0 else PAGE_SIZE


def allowed_by_ranges(
    record: Any, changes: list[Range], allow: Sequence[Range], unit: int = PAGE_SIZE
) -> bool | None:
    """The plugin's own answer to ``pytest_uffd_write_allowed``: True for a
    write inside the marker's ``allow=`` ranges, else None.  ``unit`` is the
    buffer's page size (``unit_of``)."""
    if write_in_ranges(record.offset, record.exact, changes, unit, Ranges(allow)):
        return True
    return None


__all__ = ["REPORTED", "Rules", "allowed_by_ranges", "element_of", "judge", "unit_of"]
