"""The verdict counts in the buffer's own unit (issue 10: "page arithmetic
on mmap.PAGESIZE, wrong for hugetlb units").

A hugetlb buffer is tracked in huge pages: a write record stands for its
whole huge page, so a changed run anywhere in that huge page belongs to
it.  These run the verdict on plain stand-ins (no kernel, no hugetlb
reservation needed), as the plugin's harvest does.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any

from pytest_uffd_guard import harvest
from pytest_uffd_guard.kernel.records import Change
from pytest_uffd_guard.verdict import ALLOWED, FORBIDDEN

HUGE = 2 << 20
PAGE = mmap.PAGESIZE


@dataclass
class Record:
    offset: int
    exact: bool = False
    thread_id: int | None = None
    thread_name: str | None = None
    stack: tuple[Any, ...] = ()
    syscall: str | None = None
    has_python: bool | None = None
    stack_note: str | None = None
    thread_comm: str | None = None
    kind: str = "write"


class HugeBuffer:
    """What harvest reads of a closed buffer tracked in 2 MiB units."""

    name = "huge"
    closed = True
    _unit = HUGE

    def __init__(self, changes: list[Change]) -> None:
        self._changes = changes

    def __len__(self) -> int:
        return HUGE

    def changes(self, preview: int | None = None) -> list[Change]:
        return self._changes


def _judge(buffer: Any, records: list[Record], ask: Any) -> Any:
    rules = harvest.Rules(readonly=True, enforced=True)
    return harvest.judge(buffer, records, rules, ask, None, nodeid="t", phase="call", origin="o")


def test_a_run_in_the_huge_page_of_an_allowed_write_is_allowed() -> None:
    """issue 10: a write allowed by a hook covers the runs of its huge page,
    not only those of its first base page."""
    run = Change(3 * PAGE, 1, b"\0", b"\1")  # same huge page, another base page
    finding = _judge(HugeBuffer([run]), [Record(0)], lambda record, changes: True)
    assert [c.status for c in finding.changes] == [ALLOWED]


def test_the_hook_sees_the_changes_of_the_whole_huge_page() -> None:
    """issue 10: pytest_uffd_write_allowed gets the runs of the write's huge page."""
    seen: list[list[tuple[int, int]]] = []
    run = Change(HUGE - 2, 2, b"\0\0", b"\1\1")
    _judge(HugeBuffer([run]), [Record(0)], lambda record, changes: seen.append(changes))
    assert seen == [[(HUGE - 2, HUGE)]]


def test_allow_ranges_meet_the_huge_page_of_an_inexact_write() -> None:
    """issue 10: allow= on a page-granular write of a hugetlb buffer looks at
    the huge page the write stands for."""
    allow = [(HUGE - 8, HUGE)]
    assert harvest.allowed_by_ranges(Record(0), [], allow, HUGE)
    assert harvest.allowed_by_ranges(Record(0), [], allow, PAGE) is None


def test_base_pages_are_unchanged() -> None:
    """The same run is not covered by a write of another base page."""

    class Buffer(HugeBuffer):
        _unit = PAGE

    run = Change(3 * PAGE, 1, b"\0", b"\1")
    finding = _judge(Buffer([run]), [Record(0)], lambda record, changes: True)
    assert [c.status for c in finding.changes] == [FORBIDDEN]
