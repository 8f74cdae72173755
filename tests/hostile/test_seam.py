"""The tracker seam (issue 10: "GuardedBuffer resets tracker.overflow from
outside"): a tracker hands over its records and its overflow count together
(``Drained``), and re-arming drops both.

Before, the count of writes that did not fit the log lived on the tracker
and the buffer zeroed it after reading; ``protect()`` dropped the records
but not the count, so the writes lost *before* re-arming were reported as
lost *after* it.
"""

from __future__ import annotations

import mmap

import pytest

from pytest_uffd_guard import GuardedBuffer

PAGE = mmap.PAGESIZE


def _overflow_after_protect(engine: str) -> tuple[int, int, int]:
    with GuardedBuffer(8 * PAGE, engine=engine, max_records=2) as buf:
        for page in range(8):
            buf[page * PAGE] = 1
        buf.protect()  # drops the first arming's records and overflow unread
        buf[0] = 2
        return len(buf.writes), buf.overflowed, len(buf.changes())


@pytest.mark.timeout(60)
def test_protect_drops_the_overflow_of_the_diff_engine() -> None:
    """issue 10: after protect(), only the new arming's writes count."""
    assert _overflow_after_protect("diff") == (1, 0, 1)


@pytest.mark.timeout(60)
def test_protect_drops_the_overflow_of_the_sync_engine(uffd: None) -> None:
    """issue 10: the same for the C core's log (sync engine)."""
    assert _overflow_after_protect("sync") == (1, 0, 1)


@pytest.mark.timeout(60)
def test_overflow_is_counted_once() -> None:
    """Reading overflowed twice gives the same count (nothing reset from outside)."""
    with GuardedBuffer(8 * PAGE, engine="diff", max_records=2) as buf:
        for page in range(8):
            buf[page * PAGE] = 1
        assert (len(buf.writes), buf.overflowed, buf.overflowed) == (2, 6, 6)
    assert buf.overflowed == 6
