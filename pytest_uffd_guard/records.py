"""Plain data describing what happened to a guarded buffer.

These classes hold ints, strings and bytes only, so they pickle, compare and
survive a trip through pytest-xdist unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

#: Layout of one record as the C core packs it (struct fault_record).
RECORD_FORMAT = "<QQQII"
RECORD_SIZE = struct.calcsize(RECORD_FORMAT)


@dataclass(frozen=True)
class WriteRecord:
    """One write fault: the first write into a protected page.

    ``offset`` is counted in bytes from the start of the buffer.  It is the
    exact byte when ``exact`` is true; otherwise the kernel reported only the
    page (no ``UFFD_FEATURE_EXACT_ADDRESS``, Linux < 5.18) and ``offset`` is
    the first byte of that page.  An offset at or past the buffer's length
    means a write into the slack after the end of the buffer, inside its
    last page: an overrun.
    """

    offset: int
    exact: bool
    thread_id: int | None
    thread_name: str | None
    time: float
    seq: int

    @property
    def page_offset(self) -> int:
        """Offset of the page the write landed in (multiple of the page size)."""
        from mmap import PAGESIZE

        return self.offset - self.offset % PAGESIZE


@dataclass(frozen=True)
class Change:
    """A run of bytes that differs from the snapshot taken when the buffer
    was armed.

    ``before`` and ``after`` hold the run's old and new bytes.  They are
    shorter than ``length`` only when a preview was asked for (or the run was
    recorded at close time and is large); ``truncated`` says so.
    """

    offset: int
    length: int
    before: bytes
    after: bytes

    @property
    def truncated(self) -> bool:
        return len(self.after) < self.length


@dataclass(frozen=True)
class RawFault:
    """A record as the C core gives it, before it is tied to a buffer."""

    address: int
    time_ns: int
    seq: int
    tid: int
    flags: int


def unpack_faults(blob: bytes) -> Iterator[RawFault]:
    """Unpack the C core's packed records."""
    for address, time_ns, seq, tid, flags in struct.iter_unpack(RECORD_FORMAT, blob):
        yield RawFault(address, time_ns, seq, tid, flags)
