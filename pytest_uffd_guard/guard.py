"""GuardedBuffer: memory whose every write is seen.

A GuardedBuffer is a private anonymous mapping (a subclass of ``mmap.mmap``,
so it serves the buffer protocol to memoryview, numpy, ctypes and
``readinto``) that the kernel write-protects through userfaultfd.  The first
write into each protected page faults; the native handler thread records it
(address, thread, time) and un-protects that page, and the writer goes on.
A snapshot taken when the buffer is armed gives the exact bytes changed.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from .engines import EngineChoice, make_tracker
from .engines.base import Region, Tracker
from .engines.pagediff import diff_runs
from .errors import (
    BufferAllocationError,
    TrackingStoppedError,
    UffdGuardError,
)
from .guard_args import Source, check_choice, check_name, count, parse_source
from .guard_pool import engine_choice, give_back, map_flags, take_snapshot
from .guard_results import GuardResults
from .kernel.backing import open_mapping, overlay
from .kernel.memory import (
    address_of,
    anonymous_map,
    copy,
    free_pages,
    limit_error,
    release_mapping,
    resource_error,
    round_up,
)
from .kernel.process import ForkSafeLock
from .kernel.recordseq import Changes, RecordLog
from .names import ENGINES

#: At close, changed runs are kept whole up to this many bytes in all;
#: beyond it only a preview of each run is kept.
KEEP_AT_CLOSE = 1 << 20
PREVIEW_AT_CLOSE = 64
#: Largest ``max_records`` accepted (32 bytes a record: 128 GiB of log).
MAX_RECORDS = 1 << 32
#: ``stacks`` beyond this means "every write" (the C core counts in 64 bits).
MAX_STACKS = 1 << 32

_names = iter(range(1, sys.maxsize))


class GuardedBuffer(GuardResults):
    """A zero-filled (or copied-in) buffer whose writes are recorded.

    ``GuardedBuffer(4096)`` gives 4096 zero bytes; ``GuardedBuffer(data)``
    a copy of any C-contiguous buffer.  The buffer is write-protected and
    tracking from the moment it is returned.  Reads never fault.
    ``stacks=N`` names the writer (Python stack, system call, thread) of the
    first N writes of each arming (default ``attribution.DEFAULT_STACKS``;
    0 turns it off).  Sizes and counts take any integer-like
    (``numpy.int64`` too); anything else is an ``InvalidBufferError``.

    Raises :class:`~pytest_uffd_guard.errors.UffdUnavailableError` when the
    machine cannot guard memory, with the cause and the fix, and
    :class:`~pytest_uffd_guard.errors.BufferAllocationError` (or its
    subclass ``ResourceLimitError``) when memory or a limit (``ulimit -v``,
    ``ulimit -n``, ``vm.max_map_count``) stops it.

    ``engine`` is ``"auto"`` (sync, or hybrid for very big buffers),
    ``"sync"``, ``"async"``, ``"hybrid"`` or ``"diff"`` (no userfaultfd: a
    byte comparison, blind to same-value writes and to the writer; the only
    engine that runs where userfaultfd cannot) - see ``engines/__init__.py``.
    ``backing`` is ``"anonymous"``, ``"shmem"`` or ``"hugetlb"`` (``backing.py``).
    """

    name: str
    address: int
    #: Memory kind: "anonymous", "shmem" or "hugetlb" (see backing.py).
    backing: str
    _size: int
    _unit: int
    _source: memoryview | None
    _max_records: int | None
    _stacks: int | None
    _choice: EngineChoice
    #: The mapping still needs MADV_NOHUGEPAGE (MAP_STACK did not do it).
    _nohuge: bool

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
        # Everything is checked before anything is mapped.
        engine = check_choice(engine, "engine", ENGINES)
        size, view = parse_source(source)
        name = check_name(name)
        if max_records is not None:
            max_records = count(
                max_records,
                "max_records",
                "pass how many records to keep, e.g. max_records=1000",
                maximum=MAX_RECORDS,
            )
        if stacks is not None:
            stacks = min(
                count(
                    stacks,
                    "stacks",
                    "pass how many writes should have their writer named; 0 turns it off",
                    maximum=sys.maxsize,
                ),
                MAX_STACKS,
            )
        kind = open_mapping(backing, size, name or "buffer")
        label = name if name is not None else f"buffer-{next(_names)}"
        try:
            # The one decision (engines.choose_engine, cached per process by
            # guard_cache), before any mapping: off Linux only the diff
            # engine, asked for by name, runs.
            try:
                choice = engine_choice(
                    engine, round_up(size, kind.unit), unit=kind.unit, backing=backing
                )
            except (OSError, UffdGuardError) as exc:
                limit = limit_error(exc, f"setting up tracking for guarded buffer {label!r}")
                if limit is None:
                    raise
                raise limit from exc
            choice.check()
            flags, nohuge = kind.flags, backing != "hugetlb"
            if backing == "anonymous" and not kind.overlay:
                # MAP_STACK says "no huge pages" on Linux 6.7+: no madvise then.
                flags, nohuge = map_flags(flags)
            self = super().__new__(
                cls,
                kind.fd if not kind.overlay else -1,
                kind.length,
                flags=flags,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            # Open from the start: on Python 3.12+ taking the address goes
            # through __buffer__, which checks it, before _setup runs.
            self._closed = False
            if kind.overlay:
                overlay(address_of(self), round_up(kind.length, kind.unit), kind.fd)
        except OverflowError as exc:
            raise BufferAllocationError(
                f"the kernel would not map {size} bytes for a guarded buffer ({exc})",
                "guard a smaller buffer",
            ) from exc
        except OSError as exc:
            raise resource_error(exc, f"mapping {size} bytes for a guarded buffer") from exc
        finally:
            if kind.fd >= 0:
                os.close(kind.fd)
        self._choice = choice
        self._nohuge = nohuge
        self._size = size
        self._unit = kind.unit
        self._source = view
        self._max_records = max_records
        self._stacks = stacks
        self.backing = backing
        self.name = label
        self._setup()
        return self

    def _setup(self) -> None:
        """Snapshot, tracker and state, once the mapping exists (from __new__:
        no __init__, so the signature is written once)."""
        try:
            self._lock = ForkSafeLock()
        except RuntimeError as exc:  # "can't allocate lock": out of memory
            self._closed = True
            with suppress(BufferError):
                mmap.mmap.close(self)
            raise resource_error(
                OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
                f"allocating the lock of guarded buffer {self.name!r}",
            ) from exc
        self._closed = False
        self._length = round_up(self._size, self._unit)
        self.address = address_of(self)
        self._records = RecordLog()
        self._overflow = 0
        self._pauses = 0
        self._pause_copy: mmap.mmap | None = None
        self._final_changes: Changes | None = None
        self._snapshot: mmap.mmap | None = None
        try:
            # Keep the range on base pages: a transparent huge page would turn
            # a one-byte write into a 2 MiB fault unit.
            if self._nohuge and hasattr(mmap, "MADV_NOHUGEPAGE"):
                mmap.mmap.madvise(self, mmap.MADV_NOHUGEPAGE)
            try:
                # Small snapshots come from guard_pool, zeroed.
                self._snapshot, self._snapshot_address = take_snapshot(self._length)
            except OSError as exc:
                raise resource_error(
                    exc, f"mapping the {self._size}-byte snapshot of guarded buffer {self.name!r}"
                ) from exc
            view, self._source = self._source, None
            if view is not None:
                mmap.mmap.__setitem__(self, slice(0, self._size), view)
                copy(self._snapshot_address, self.address, self._size)
                del view
            region = Region(
                self.address,
                self._length,
                self._size,
                self._snapshot_address,
                self._unit,
                owner=weakref.ref(self),
            )
            try:
                self._tracker: Tracker = make_tracker(
                    self._choice,
                    region,
                    max_records=self._max_records,
                    backing=self.backing,
                    stacks=self._stacks,
                )
            except MemoryError as exc:
                if isinstance(exc, UffdGuardError):
                    raise
                # The C core's log (RECORD_SIZE bytes a record) could not be
                # allocated: say which limit, as for the mappings themselves.
                raise resource_error(
                    OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
                    f"allocating the record log of guarded buffer {self.name!r} "
                    f"({self._max_records or 'one per page'} records)",
                ) from exc
            except (OSError, UffdGuardError) as exc:
                limit = limit_error(exc, f"setting up tracking for guarded buffer {self.name!r}")
                if limit is None:
                    raise
                raise limit from exc
        except BaseException:
            self._abandon()
            raise

    def _scratch(self, doing: str) -> mmap.mmap:
        """A private mapping of the buffer's length (snapshot, pause copy);
        a refusal is the resource error for ``doing``."""
        try:
            return anonymous_map(self._length)
        except OSError as exc:
            raise resource_error(exc, doing) from exc

    @property
    def engine(self) -> str:
        """Name of the engine tracking this buffer."""
        return self._tracker.name

    def protect(self) -> None:
        """Re-arm: clear the records, protect every page, take a new snapshot.

        The pages are protected *before* the snapshot is copied, so a write
        racing ``protect()`` is never lost: either it lands before the copy
        (it is then part of the new baseline) or it faults and is recorded.
        A racing write can therefore leave a record without a change, never
        a change without a record (issue 9 item 6).
        """
        with self._lock:
            self._check_tracking()
            if self._pauses:
                # Inside unprotected(): the block's end protects again and
                # absorbs what was written meanwhile; only re-baseline here.
                self._tracker.discard()
                self._records, self._overflow = RecordLog(), 0
                copy(self._snapshot_address, self.address, self._size)
                return
            self._tracker.pause()
            self._tracker.discard()
            self._records, self._overflow = RecordLog(), 0
            self._tracker.arm()
            # Reads only: copying protected pages never faults.
            copy(self._snapshot_address, self.address, self._size)

    @contextmanager
    def unprotected(self) -> Iterator[GuardedBuffer]:
        """Writes inside this block are neither blocked nor recorded.

        They also become part of the baseline: ``changes()`` will not report
        them.  Changes made before the block are still reported.
        """
        with self._lock:
            self._check_open()
            if self._pauses == 0:
                self._pause_copy = self._scratch(
                    f"copying guarded buffer {self.name!r} for unprotected()"
                )
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
        for offset, length in diff_runs(self.address, address_of(before), self._size):
            copy(self._snapshot_address + offset, self.address + offset, length)

    # --------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Stop tracking and release the memory.  Idempotent.

        Any writer blocked on this buffer is released.  ``writes`` and
        ``changes()`` stay readable; every other use raises
        ``BufferClosedError``.  The pages are freed at once; the address
        range itself (no memory, no file descriptor) is unmapped when the
        object is garbage-collected, so a late writer or a live view never
        touches unmapped memory.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            last = self._tracker.close()
            self._records.extend(last.log)
            self._overflow += last.overflow
            # One pass over the runs, and at most KEEP_AT_CLOSE bytes (or a
            # preview of each run) copied out: never every changed byte.
            self._final_changes = self._changes(PREVIEW_AT_CLOSE, KEEP_AT_CLOSE)
            self._release_snapshot()
            free_pages(self, shared=self.backing != "anonymous")

    def _abandon(self) -> None:
        self._closed = True
        self._final_changes = Changes()
        if self._snapshot is not None:
            self._release_snapshot()
        with suppress(BufferError):
            mmap.mmap.close(self)

    def _release_snapshot(self) -> None:
        # Dropped at once: a pooled snapshot is the next buffer's.
        snapshot, self._snapshot = self._live_snapshot(), None
        if not give_back(snapshot, self._snapshot_address):
            release_mapping(snapshot)

    # ------------------------------------------------------------ helpers

    def __enter__(self) -> GuardedBuffer:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: object,
        exc: object,
        tb: object,
    ) -> None:
        self.close()

    def _check_tracking(self) -> None:
        self._check_open()
        reason = self._tracker.stopped
        if reason is not None:
            raise TrackingStoppedError(
                f"guarded buffer {self.name!r} is no longer tracked: {reason}",
                "create a new GuardedBuffer",
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("tracking" if self.tracking else "not tracking")
        return (
            f"<GuardedBuffer {self.name!r} size={self._size} address={self.address:#x} "
            f"{state} writes={len(self._records)}>"
        )
