"""GuardedBuffer: memory whose every write is seen.

A GuardedBuffer is a private anonymous mapping (a subclass of ``mmap.mmap``,
so it serves the buffer protocol to memoryview, numpy, ctypes and
``readinto``) that the kernel write-protects through userfaultfd.  The first
write into each protected page faults; the native handler thread records it
(address, thread, time) and un-protects that page, and the writer goes on.
A snapshot taken when the buffer is armed gives the exact bytes changed.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Union

from .backing import open_mapping
from .errors import (
    BufferAllocationError,
    BufferClosedError,
    InvalidBufferError,
    TrackingStoppedError,
    UnsupportedPlatformError,
)
from .memory import PAGE_SIZE, address_of, anonymous_map, copy, round_up
from .records import Change, WriteRecord
from .tracking import Region, Tracker, make_tracker

Source = Union[int, bytes, bytearray, memoryview, Any]

#: At close, changed runs are kept whole up to this many bytes in all;
#: beyond it only a preview of each run is kept.
KEEP_AT_CLOSE = 1 << 20
PREVIEW_AT_CLOSE = 64

_names = iter(range(1, sys.maxsize))


def _diff_runs(a: int, b: int, length: int) -> list[tuple[int, int]]:
    """Runs of differing bytes between two raw memories of ``length`` bytes."""
    from .diff_tracker import diff_runs

    return diff_runs(a, b, length)


def _source_view(source: Source) -> memoryview:
    """A flat byte view of ``source``, or a clear error."""
    if isinstance(source, str):
        raise InvalidBufferError(
            "a str has no bytes to guard", "encode it first, e.g. GuardedBuffer(text.encode())"
        )
    try:
        view = memoryview(source)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidBufferError(
            f"cannot guard a {type(source).__name__}: it does not expose a buffer",
            "pass a size in bytes, or bytes, bytearray, memoryview, array.array or a numpy array",
        ) from None
    if not view.c_contiguous:
        raise InvalidBufferError(
            f"the {type(source).__name__} given is not C-contiguous",
            "pass a contiguous copy, e.g. numpy.ascontiguousarray(x) or bytes(view)",
        )
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _check_size(size: int) -> int:
    if isinstance(size, bool):
        raise InvalidBufferError(
            "a bool is not a size", "pass the size in bytes as an int, e.g. GuardedBuffer(4096)"
        )
    if size <= 0:
        raise InvalidBufferError(
            f"a guarded buffer needs at least one byte, got size {size}",
            "pass a positive size in bytes, or non-empty data",
        )
    if size > sys.maxsize - PAGE_SIZE:
        raise InvalidBufferError(
            f"size {size} is larger than this platform can address",
            "guard a smaller buffer",
        )
    return size


class GuardedBuffer(mmap.mmap):
    """A zero-filled (or copied-in) buffer whose writes are recorded.

    ``GuardedBuffer(4096)`` gives 4096 zero bytes; ``GuardedBuffer(data)``
    a copy of any C-contiguous buffer.  The buffer is write-protected and
    tracking from the moment it is returned.  Reads never fault.
    ``stacks=N`` names the writer (Python stack, system call, thread) of the
    first N writes of each arming (default ``attribution.DEFAULT_STACKS``;
    0 turns it off).

    Raises :class:`~pytest_uffd_guard.errors.UffdUnavailableError` when the
    machine cannot guard memory, with the cause and the fix.

    ``engine`` is ``"auto"`` (sync, or hybrid for very big buffers),
    ``"sync"``, ``"async"``, ``"hybrid"`` or ``"diff"`` (no userfaultfd: a
    byte comparison, blind to same-value writes and to the writer; the only
    engine that runs where userfaultfd cannot) - see ``tracking.py``.
    ``backing`` is ``"anonymous"``, ``"shmem"`` or ``"hugetlb"`` (``backing.py``).
    """

    name: str
    address: int
    #: Memory kind: "anonymous", "shmem" or "hugetlb" (see backing.py).
    backing: str
    _size: int
    _unit: int

    def __new__(
        cls,
        source: Source,
        *,
        name: str | None = None,
        max_records: int | None = None,
        engine: str = "auto",
        backing: str = "anonymous",
        stacks: int | None = None,
    ) -> GuardedBuffer:
        # Only the diff engine, asked for by name, runs off Linux.
        if not sys.platform.startswith("linux") and engine != "diff":
            raise UnsupportedPlatformError(
                f"guarded buffers need Linux userfaultfd; this is {sys.platform}",
                "run on Linux; the pytest plugin skips guarded tests elsewhere",
            )
        if isinstance(source, int):
            size = _check_size(source)
        elif isinstance(source, float):
            raise InvalidBufferError(
                f"size must be an int, got float {source!r}", "pass the size in bytes as an int"
            )
        else:
            size = _check_size(_source_view(source).nbytes)
        kind = open_mapping(backing, size, name or "buffer")
        try:
            self = super().__new__(
                cls,
                kind.fd,
                kind.length,
                flags=kind.flags,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, OverflowError) as exc:
            raise BufferAllocationError(
                f"the kernel would not map {size} bytes for a guarded buffer ({exc})",
                "guard a smaller buffer, or raise the process's memory limits "
                "(ulimit -v, vm.overcommit_memory, the container's memory limit)",
            ) from exc
        finally:
            if kind.fd >= 0:
                os.close(kind.fd)
        self._size = size
        self._unit = kind.unit
        self.backing = backing
        return self

    def __init__(
        self,
        source: Source,
        *,
        name: str | None = None,
        max_records: int | None = None,
        engine: str = "auto",
        backing: str = "anonymous",
        stacks: int | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._length = round_up(self._size, self._unit)
        self.name = name if name is not None else f"buffer-{next(_names)}"
        self.address = address_of(self)
        self._records: list[WriteRecord] = []
        self._overflow = 0
        self._pauses = 0
        self._pause_copy: mmap.mmap | None = None
        self._final_changes: list[Change] | None = None
        if max_records is not None and max_records < 0:
            raise InvalidBufferError(
                f"max_records must be >= 0, got {max_records}", "pass a count of records"
            )
        if stacks is not None and (isinstance(stacks, bool) or stacks < 0):
            raise InvalidBufferError(
                f"stacks must be an int >= 0, got {stacks!r}",
                "pass how many writes should have their writer named; 0 turns it off",
            )

        # Keep the range on base pages: a transparent huge page would turn
        # a one-byte write into a 2 MiB fault unit.
        if backing != "hugetlb" and hasattr(mmap, "MADV_NOHUGEPAGE"):
            self.madvise(mmap.MADV_NOHUGEPAGE)
        self._snapshot = anonymous_map(self._length)
        self._snapshot_address = address_of(self._snapshot)
        if not isinstance(source, int):
            view = _source_view(source)
            mmap.mmap.__setitem__(self, slice(0, self._size), view)
            copy(self._snapshot_address, self.address, self._size)
        try:
            region = Region(
                self.address, self._length, self._size, self._snapshot_address, self._unit
            )
            self._tracker: Tracker = make_tracker(
                engine, region, max_records=max_records, backing=self.backing, stacks=stacks
            )
        except BaseException:
            self._abandon()
            raise

    @property
    def engine(self) -> str:
        """Name of the engine tracking this buffer."""
        return self._tracker.name

    def protect(self) -> None:
        """Re-arm: take a new snapshot, clear the records, protect every page."""
        with self._lock:
            self._check_tracking()
            self._tracker.pause()
            self._tracker.discard()
            self._records = []
            self._overflow = 0
            copy(self._snapshot_address, self.address, self._size)
            self._tracker.arm()

    @contextmanager
    def unprotected(self) -> Iterator[GuardedBuffer]:
        """Writes inside this block are neither blocked nor recorded.

        They also become part of the baseline: ``changes()`` will not report
        them.  Changes made before the block are still reported.
        """
        with self._lock:
            self._check_open()
            if self._pauses == 0:
                self._pause_copy = anonymous_map(self._length)
                copy(address_of(self._pause_copy), self.address, self._size)
                self._tracker.pause()
            self._pauses += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pauses -= 1
                if self._pauses == 0 and self._pause_copy is not None:
                    before, self._pause_copy = self._pause_copy, None
                    if not self._closed:
                        # Protect first, then absorb: a write racing the
                        # re-protection is recorded rather than lost.
                        self._tracker.resume()
                        self._absorb(before)
                    before.close()

    def _absorb(self, before: mmap.mmap) -> None:
        """Copy the bytes that changed since ``before`` into the snapshot."""
        for offset, length in _diff_runs(self.address, address_of(before), self._size):
            copy(self._snapshot_address + offset, self.address + offset, length)

    # ------------------------------------------------------------ results

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

    def changes(self, preview: int | None = None) -> list[Change]:
        """Runs of bytes that differ from the snapshot taken at arming.

        With ``preview``, ``before``/``after`` hold at most that many bytes
        of each run.  After ``close()``, the changes as they were at close.
        """
        with self._lock:
            if self._final_changes is not None:
                return list(self._final_changes)
            self._check_open()
            return self._diff(preview)

    def _diff(self, preview: int | None) -> list[Change]:
        result = []
        for offset, length in _diff_runs(self.address, self._snapshot_address, self._size):
            n = length if preview is None else min(length, preview)
            before = self._snapshot[offset : offset + n]
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
        return None if self._closed else self._tracker.stopped

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self._closed

    # --------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop tracking and release the memory.  Idempotent.

        Any writer blocked on this buffer is released.  ``writes`` and
        ``changes()`` stay readable.  The pages are freed at once; the
        address range itself is unmapped when the object is garbage-collected,
        so a late writer or a live view never touches unmapped memory.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._records.extend(self._tracker.close())
            self._overflow += self._tracker.overflow
            changes = self._diff(None)
            if sum(c.length for c in changes) > KEEP_AT_CLOSE:
                changes = self._diff(PREVIEW_AT_CLOSE)
            self._final_changes = changes
            self._snapshot.close()
            # Give the memory back but keep the address range mapped until
            # the object goes away: a writer that was blocked in a fault when
            # we unregistered retries its store after we return, and must
            # find memory there (a zero page), not a hole.  Live views
            # (memoryview, numpy) are just as safe.
            self.madvise(mmap.MADV_DONTNEED)

    def _abandon(self) -> None:
        self._closed = True
        self._final_changes = []
        self._snapshot.close()
        with suppress(BufferError):
            mmap.mmap.close(self)

    def __enter__(self) -> GuardedBuffer:
        return self

    def __exit__(
        self,
        exc_type: object,
        exc: object,
        tb: object,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ helpers

    def _check_open(self) -> None:
        if self._closed:
            raise BufferClosedError(
                f"guarded buffer {self.name!r} is closed",
                "read .writes or .changes() after close; create a new GuardedBuffer to guard again",
            )

    def _check_tracking(self) -> None:
        self._check_open()
        reason = self._tracker.stopped
        if reason is not None:
            raise TrackingStoppedError(
                f"guarded buffer {self.name!r} is no longer tracked: {reason}",
                "create a new GuardedBuffer",
            )

    def _drain(self) -> None:
        if not self._closed:
            self._records.extend(self._tracker.drain())
            self._overflow += self._tracker.overflow
            self._tracker.overflow = 0

    # ------------------------------------------------- mmap behaviour

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: Any) -> Any:
        self._check_open()
        return mmap.mmap.__getitem__(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check_open()
        mmap.mmap.__setitem__(self, index, value)

    def resize(self, newsize: int) -> None:
        raise InvalidBufferError(
            "a guarded buffer cannot be resized", "create a new GuardedBuffer of the new size"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a GuardedBuffer cannot be pickled; pickle bytes(buf) instead")

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("tracking" if self.tracking else "not tracking")
        return (
            f"<GuardedBuffer {self.name!r} size={self._size} address={self.address:#x} "
            f"{state} writes={len(self._records)}>"
        )
