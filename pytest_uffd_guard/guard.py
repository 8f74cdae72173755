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
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Union

from .engine import ENGINE
from .errors import (
    BufferAllocationError,
    BufferClosedError,
    InvalidBufferError,
    TrackingStoppedError,
    UnsupportedPlatformError,
)
from .memory import PAGE_SIZE, address_of, anonymous_map, copy, round_up
from .records import Change, WriteRecord, unpack_faults

Source = Union[int, bytes, bytearray, memoryview, Any]

#: Records kept per buffer beyond one per page (duplicates from threads
#: that fault on the same page at once, re-protection by unprotected()).
RECORD_SLACK = 64
#: Upper bound on the default per-buffer log (32 bytes a record).
MAX_DEFAULT_RECORDS = 1 << 20
#: At close, changed runs are kept whole up to this many bytes in all;
#: beyond it only a preview of each run is kept.
KEEP_AT_CLOSE = 1 << 20
PREVIEW_AT_CLOSE = 64

_names = iter(range(1, sys.maxsize))
_thread_names: dict[int, str] = {}


def _thread_name(tid: int) -> str | None:
    """Name of the Python thread with this native id, if it is or was known."""
    if tid not in _thread_names:
        for thread in threading.enumerate():
            if thread.native_id is not None:
                _thread_names[thread.native_id] = thread.name
    return _thread_names.get(tid)


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


def _release_guard(gid: int) -> None:
    """Finalizer: forget a guard whose buffer was garbage-collected."""
    with suppress(Exception):  # interpreter shutdown may have torn things down
        ENGINE.core.guard_remove(gid)


class GuardedBuffer(mmap.mmap):
    """A zero-filled (or copied-in) buffer whose writes are recorded.

    ``GuardedBuffer(4096)`` gives 4096 zero bytes; ``GuardedBuffer(data)``
    a copy of any C-contiguous buffer.  The buffer is write-protected and
    tracking from the moment it is returned.  Reads never fault.

    Raises :class:`~pytest_uffd_guard.errors.UffdUnavailableError` when the
    machine cannot guard memory, with the cause and the fix.
    """

    name: str
    address: int

    def __new__(
        cls,
        source: Source,
        *,
        name: str | None = None,
        max_records: int | None = None,
    ) -> GuardedBuffer:
        if not sys.platform.startswith("linux"):
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
        try:
            self = super().__new__(
                cls,
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, OverflowError) as exc:
            raise BufferAllocationError(
                f"the kernel would not map {size} bytes for a guarded buffer ({exc})",
                "guard a smaller buffer, or raise the process's memory limits "
                "(ulimit -v, vm.overcommit_memory, the container's memory limit)",
            ) from exc
        return self

    def __init__(
        self,
        source: Source,
        *,
        name: str | None = None,
        max_records: int | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._closed = False
        self._size = mmap.mmap.__len__(self)
        self._length = round_up(self._size)
        self.name = name if name is not None else f"buffer-{next(_names)}"
        self.address = address_of(self)
        self._pid = os.getpid()
        self._gid: int | None = None
        self._stopped: str | None = None
        self._records: list[WriteRecord] = []
        self._overflow = 0
        self._pauses = 0
        self._pause_copy: mmap.mmap | None = None
        self._final_changes: list[Change] | None = None
        if max_records is not None and max_records < 0:
            raise InvalidBufferError(
                f"max_records must be >= 0, got {max_records}", "pass a count of records"
            )
        pages = self._length // PAGE_SIZE
        capacity = (
            max_records
            if max_records is not None
            else min(pages + RECORD_SLACK, MAX_DEFAULT_RECORDS)
        )

        # Keep the range on base pages: a transparent huge page would turn
        # a one-byte write into a 2 MiB fault unit.
        self.madvise(mmap.MADV_NOHUGEPAGE)
        self._snapshot = anonymous_map(self._length)
        self._snapshot_address = address_of(self._snapshot)
        if not isinstance(source, int):
            view = _source_view(source)
            mmap.mmap.__setitem__(self, slice(0, self._size), view)
            copy(self._snapshot_address, self.address, self._size)

        try:
            caps = ENGINE.start()
            core = ENGINE.core
            gid, _ = core.guard_add(self.address, self._length, PAGE_SIZE, capacity)
        except BaseException:
            self._abandon()
            raise
        self._gid = gid
        self._finalizer = weakref.finalize(self, _release_guard, gid)
        self._wp_unpopulated = caps.has("wp_unpopulated")
        self._exact = caps.has("exact_address")
        ENGINE.track(self)
        try:
            self._arm()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ arming

    def _arm(self) -> None:
        """Populate if the kernel needs it, then protect every page.

        Called with the range registered and not protected.
        """
        core = ENGINE.core
        if not self._wp_unpopulated:
            # Before Linux 6.4 (no WP_UNPOPULATED) protecting a page that
            # was never touched silently does nothing: fault them all in.
            core.populate(self.address, self._length, PAGE_SIZE)
        core.guard_protect(self._gid, True)

    def protect(self) -> None:
        """Re-arm: take a new snapshot, clear the records, protect every page."""
        with self._lock:
            self._check_tracking()
            core = ENGINE.core
            core.guard_protect(self._gid, False)
            core.guard_drain(self._gid)
            self._records = []
            self._overflow = 0
            copy(self._snapshot_address, self.address, self._size)
            self._arm()

    @contextmanager
    def unprotected(self) -> Iterator[GuardedBuffer]:
        """Writes inside this block are neither blocked nor recorded.

        They also become part of the baseline: ``changes()`` will not report
        them.  Changes made before the block are still reported.
        """
        with self._lock:
            self._check_open()
            tracking = self._gid is not None and self._stopped is None and self._mine()
            if tracking and self._pauses == 0:
                self._pause_copy = anonymous_map(self._length)
                copy(address_of(self._pause_copy), self.address, self._size)
                ENGINE.core.guard_protect(self._gid, False)
            self._pauses += 1
        try:
            yield self
        finally:
            with self._lock:
                self._pauses -= 1
                if self._pauses == 0 and self._pause_copy is not None:
                    before = self._pause_copy
                    self._pause_copy = None
                    if self._stopped is None and not self._closed:
                        ENGINE.core.guard_protect(self._gid, True)
                        self._absorb(before)
                    before.close()

    def _absorb(self, before: mmap.mmap) -> None:
        """Copy the bytes that changed since ``before`` into the snapshot."""
        runs, _ = ENGINE.core.diff_runs(self.address, address_of(before), self._size, 1 << 62)
        for offset, length in runs:
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
        runs, _ = ENGINE.core.diff_runs(self.address, self._snapshot_address, self._size, 1 << 62)
        result = []
        for offset, length in runs:
            n = length if preview is None else min(length, preview)
            before = self._snapshot[offset : offset + n]
            after = mmap.mmap.__getitem__(self, slice(offset, offset + n))
            result.append(Change(offset, length, before, after))
        return result

    @property
    def tracking(self) -> bool:
        """True while writes are being recorded."""
        return not self._closed and self._gid is not None and self._stopped is None and self._mine()

    @property
    def stopped_reason(self) -> str | None:
        """Why tracking stopped early (handler error, fork), or None."""
        if not self._mine():
            return "this buffer was inherited across fork(); it is not tracked in the child"
        return self._stopped

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self._closed

    # --------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop tracking and release the memory.  Idempotent.

        Any writer blocked on this buffer is released.  ``writes`` and
        ``changes()`` stay readable.  If views of the buffer (memoryview,
        numpy arrays) are still alive, the mapping itself is released when
        the last of them is.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._gid is not None:
                self._finalizer.detach()
                if self._mine():
                    blob, overflow = ENGINE.core.guard_remove(self._gid)
                    self._add_records(blob, overflow)
                ENGINE.untrack(self)
            changes = self._diff(None)
            if sum(c.length for c in changes) > KEEP_AT_CLOSE:
                changes = self._diff(PREVIEW_AT_CLOSE)
            self._final_changes = changes
            self._snapshot.close()
            # If views are still exported, unmapping now would pull the memory
            # from under them: the mmap frees it when the last view goes away.
            with suppress(BufferError):
                mmap.mmap.close(self)

    def _abandon(self) -> None:
        self._closed = True
        self._final_changes = []
        self._snapshot.close()
        with suppress(BufferError):
            mmap.mmap.close(self)

    def _detach(self, reason: str) -> None:
        """Called by the engine when the handler stops: keep what we have."""
        with self._lock:
            if self._gid is None or self._stopped is not None:
                return
            self._drain()
            self._stopped = reason

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

    def _mine(self) -> bool:
        return self._pid == os.getpid()

    def _check_open(self) -> None:
        if self._closed:
            raise BufferClosedError(
                f"guarded buffer {self.name!r} is closed",
                "read .writes or .changes() after close; create a new GuardedBuffer to guard again",
            )

    def _check_tracking(self) -> None:
        self._check_open()
        if not self._mine():
            raise TrackingStoppedError(
                f"guarded buffer {self.name!r} was created in process {self._pid} and inherited "
                "across fork(); the child's copy is not tracked",
                "create new GuardedBuffers in the child",
            )
        if self._stopped is not None:
            raise TrackingStoppedError(
                f"guarded buffer {self.name!r} is no longer tracked: {self._stopped}",
                "create a new GuardedBuffer",
            )

    def _drain(self) -> None:
        if self._gid is None or self._closed or self._stopped is not None or not self._mine():
            return
        blob, overflow = ENGINE.core.guard_drain(self._gid)
        self._add_records(blob, overflow)

    def _add_records(self, blob: bytes, overflow: int) -> None:
        self._overflow += overflow
        for raw in unpack_faults(blob):
            offset = raw.address - self.address
            self._records.append(
                WriteRecord(
                    offset=offset,
                    exact=self._exact,
                    thread_id=raw.tid or None,
                    thread_name=_thread_name(raw.tid) if raw.tid else None,
                    time=raw.time_ns / 1e9,
                    seq=raw.seq,
                )
            )

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
