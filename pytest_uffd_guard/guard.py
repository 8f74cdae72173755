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
import numbers
import operator
import os
import reprlib
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Union

from .engines import EngineChoice, choose_engine, make_tracker
from .engines.base import Region, Tracker
from .errors import (
    BufferAllocationError,
    BufferClosedError,
    InvalidBufferError,
    TrackingStoppedError,
    UffdGuardError,
)
from .kernel.backing import open_mapping, overlay
from .kernel.memory import PAGE_SIZE, address_of, anonymous_map, copy, resource_error, round_up
from .kernel.process import ForkSafeLock
from .kernel.records import Change, WriteRecord
from .names import ENGINES

Source = Union[int, bytes, bytearray, memoryview, Any]

#: At close, changed runs are kept whole up to this many bytes in all;
#: beyond it only a preview of each run is kept.
KEEP_AT_CLOSE = 1 << 20
PREVIEW_AT_CLOSE = 64
#: Largest ``max_records`` accepted (32 bytes a record: 128 GiB of log).
MAX_RECORDS = 1 << 32
#: ``stacks`` beyond this means "every write" (the C core counts in 64 bits).
MAX_STACKS = 1 << 32

_names = iter(range(1, sys.maxsize))
_show = reprlib.Repr()
_show.maxstring = _show.maxother = 60


def _diff_runs(a: int, b: int, length: int) -> list[tuple[int, int]]:
    """Runs of differing bytes between two raw memories of ``length`` bytes."""
    from .engines.pagediff import diff_runs

    return diff_runs(a, b, length)


def _is_numpy(obj: object, kind: str) -> bool:
    """isinstance(obj, numpy.<kind>) without importing numpy."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, getattr(numpy, kind, ()))


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or _is_numpy(value, "bool_")


def _count(value: object, what: str, remedy: str, *, maximum: int) -> int:
    """``value`` as an int in ``0..maximum`` (any integer-like), or a clear error."""
    if _is_bool(value):
        raise InvalidBufferError(f"{what} must be an int, got the bool {value!r}", remedy)
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidBufferError(
            f"{what} must be an int, got {type(value).__name__} {_show.repr(value)}", remedy
        ) from None
    if number < 0:
        raise InvalidBufferError(f"{what} must be >= 0, got {number}", remedy)
    if number > maximum:
        raise InvalidBufferError(f"{what} {number} is too large (at most {maximum})", remedy)
    return number


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


def _parse_source(source: Source) -> tuple[int, memoryview | None]:
    """The buffer's size, and the view to copy in (None for a size).

    A size is any integer-like (``int``, ``numpy.int64``: ``operator.index``);
    numpy scalars expose a buffer too, and must not be guarded as 8 bytes of
    data.  A numpy *array* is data, even a 0-d one.
    """
    if _is_numpy(source, "ndarray"):
        view = _source_view(source)
        return _check_size(view.nbytes), view
    if _is_bool(source):
        raise InvalidBufferError(
            "a bool is not a size", "pass the size in bytes as an int, e.g. GuardedBuffer(4096)"
        )
    if isinstance(source, numbers.Number) or hasattr(type(source), "__index__"):
        try:
            size = operator.index(source)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidBufferError(
                f"size must be an int, got {type(source).__name__} {_show.repr(source)}",
                "pass the size in bytes as an int, e.g. GuardedBuffer(int(n))",
            ) from None
        return _check_size(size), None
    view = _source_view(source)
    return _check_size(view.nbytes), view


def _check_size(size: int) -> int:
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


def _check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise InvalidBufferError(
            f"{what} must be a str, got {type(value).__name__} {_show.repr(value)}",
            f"use one of: {', '.join(choices)}",
        )
    if value not in choices:
        raise InvalidBufferError(f"unknown {what} {value!r}", f"use one of: {', '.join(choices)}")
    return value


def _check_name(name: object) -> str | None:
    if name is None or isinstance(name, str):
        return name
    hint = "decode it first, e.g. name=raw.decode()" if isinstance(name, bytes) else "pass a str"
    raise InvalidBufferError(
        f"name must be a str, got {type(name).__name__} {_show.repr(name)}", hint
    )


def _errno_of(exc: BaseException) -> int | None:
    """The errno of ``exc`` or of the OSError it was raised from."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__
    return None


class GuardedBuffer(mmap.mmap):
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
        engine = _check_choice(engine, "engine", ENGINES)
        size, view = _parse_source(source)
        name = _check_name(name)
        if max_records is not None:
            max_records = _count(
                max_records,
                "max_records",
                "pass how many records to keep, e.g. max_records=1000",
                maximum=MAX_RECORDS,
            )
        if stacks is not None:
            stacks = min(
                _count(
                    stacks,
                    "stacks",
                    "pass how many writes should have their writer named; 0 turns it off",
                    maximum=sys.maxsize,
                ),
                MAX_STACKS,
            )
        kind = open_mapping(backing, size, name or "buffer")
        try:
            # The one decision (engines.choose_engine), before any mapping:
            # off Linux only the diff engine, asked for by name, runs.
            choice = choose_engine(
                engine, round_up(size, kind.unit), unit=kind.unit, backing=backing
            )
            choice.check()
            self = super().__new__(
                cls,
                kind.fd if not kind.overlay else -1,
                kind.length,
                flags=kind.flags,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            # Open from the start: on Python 3.12+ taking the address goes
            # through __buffer__, which checks it, before __init__ runs.
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
        self._size = size
        self._unit = kind.unit
        self._source = view
        self._max_records = max_records
        self._stacks = stacks
        self.backing = backing
        self.name = name if name is not None else f"buffer-{next(_names)}"
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
        # The arguments were checked and normalised by __new__.
        try:
            self._lock = ForkSafeLock()
        except RuntimeError as exc:  # "can't allocate lock": out of memory
            self._closed = True
            with suppress(BufferError):
                mmap.mmap.close(self)
            raise resource_error(
                OSError(errno.ENOMEM, os.strerror(errno.ENOMEM)),
                f"allocating the lock of guarded buffer {name!r}",
            ) from exc
        self._closed = False
        self._length = round_up(self._size, self._unit)
        self.address = address_of(self)
        self._records: list[WriteRecord] = []
        self._overflow = 0
        self._pauses = 0
        self._pause_copy: mmap.mmap | None = None
        self._final_changes: list[Change] | None = None
        self._snapshot: mmap.mmap | None = None
        try:
            # Keep the range on base pages: a transparent huge page would turn
            # a one-byte write into a 2 MiB fault unit.
            if backing != "hugetlb" and hasattr(mmap, "MADV_NOHUGEPAGE"):
                mmap.mmap.madvise(self, mmap.MADV_NOHUGEPAGE)
            try:
                self._snapshot = anonymous_map(self._length)
            except OSError as exc:
                raise resource_error(
                    exc, f"mapping the {self._size}-byte snapshot of guarded buffer {self.name!r}"
                ) from exc
            self._snapshot_address = address_of(self._snapshot)
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
                code = _errno_of(exc)
                if code in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                    raise resource_error(
                        OSError(code, os.strerror(code)),
                        f"setting up tracking for guarded buffer {self.name!r}",
                    ) from exc
                raise
        except BaseException:
            self._abandon()
            raise

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
                self._records, self._overflow = [], 0
                copy(self._snapshot_address, self.address, self._size)
                return
            self._tracker.pause()
            self._tracker.discard()
            self._records, self._overflow = [], 0
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
                try:
                    self._pause_copy = anonymous_map(self._length)
                except OSError as exc:
                    raise resource_error(
                        exc, f"copying guarded buffer {self.name!r} for unprotected()"
                    ) from exc
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

    def _live_snapshot(self) -> mmap.mmap:
        assert self._snapshot is not None
        return self._snapshot

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

    @property
    def duplicates(self) -> int:
        """Extra faults on pages already recorded since the last arming.

        Threads that write the same page at the same moment each fault; the
        first is the record, the others are only counted here.
        """
        with self._lock:
            self._drain()
            return int(getattr(self._tracker, "duplicates", 0))

    def changes(self, preview: int | None = None) -> list[Change]:
        """Runs of bytes that differ from the snapshot taken at arming.

        With ``preview``, ``before``/``after`` hold at most that many bytes
        of each run.  After ``close()``, the changes as they were at close.
        """
        if preview is not None:
            preview = _count(
                preview,
                "preview",
                "pass how many bytes of each run to keep, or None for all",
                maximum=sys.maxsize,
            )
        with self._lock:
            if self._final_changes is not None:
                return list(self._final_changes)
            self._check_open()
            return self._diff(self._runs(), preview)

    def _runs(self) -> list[tuple[int, int]]:
        return _diff_runs(self.address, self._snapshot_address, self._size)

    def _diff(self, runs: list[tuple[int, int]], preview: int | None) -> list[Change]:
        snapshot = self._live_snapshot()
        result = []
        for offset, length in runs:
            n = length if preview is None else min(length, preview)
            before = snapshot[offset : offset + n]
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
            self._records.extend(self._tracker.close())
            self._overflow += self._tracker.overflow
            # One pass over the runs, and at most KEEP_AT_CLOSE bytes (or a
            # preview of each run) copied out: never every changed byte.
            runs = self._runs()
            whole = sum(length for _, length in runs) <= KEEP_AT_CLOSE
            self._final_changes = self._diff(runs, None if whole else PREVIEW_AT_CLOSE)
            del runs
            self._release_snapshot()
            self._free_pages()

    def _release_snapshot(self) -> None:
        snapshot = self._live_snapshot()
        try:
            snapshot.close()
        except BufferError:
            # A transient export (a ctypes view taking an address) that a
            # parent thread held at fork() never ends in the child.
            with suppress(OSError):
                snapshot.madvise(mmap.MADV_DONTNEED)

    def _free_pages(self) -> None:
        """Give the memory back but keep the address range mapped.

        A writer that was blocked in a fault when we unregistered retries its
        store after we return, through a raw address that holds no buffer
        export (``ctypes.memset(buf.address, ...)``), and must find memory
        there (a zero page), not a hole.  Live views (memoryview, numpy) are
        just as safe.  Shared memory needs MADV_REMOVE: MADV_DONTNEED only
        drops this process's page table entries, the pages stay in the file.

        ``close()`` never raises for this: Linux before 5.18 refuses
        MADV_DONTNEED on hugetlb (EINVAL), and a private hugetlb mapping
        refuses MADV_REMOVE.  When every advice is refused the pages stay
        until the range is unmapped at garbage collection.
        """
        advices = [mmap.MADV_DONTNEED]
        if self.backing != "anonymous":
            advices.insert(0, mmap.MADV_REMOVE)
        for advice in advices:
            try:
                mmap.mmap.madvise(self, advice)
            except OSError:
                continue
            return

    def _abandon(self) -> None:
        self._closed = True
        self._final_changes = []
        if self._snapshot is not None:
            self._release_snapshot()
        with suppress(BufferError):
            mmap.mmap.close(self)

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
    # Every mmap method that reads, writes or positions raises
    # BufferClosedError after close(), as mmap itself raises ValueError: the
    # range stays mapped (see _free_pages) and would silently read zeros.

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: Any) -> Any:
        self._check_open()
        return mmap.mmap.__getitem__(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check_open()
        mmap.mmap.__setitem__(self, index, value)

    if sys.version_info >= (3, 12):  # pragma: no cover - PEP 688

        def __buffer__(self, flags: int) -> memoryview:
            # memoryview(buf), numpy, readinto after close(): refuse, as mmap
            # does (views taken before close stay valid: see _free_pages).
            self._check_open()
            return mmap.mmap.__buffer__(self, flags)

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


#: mmap methods that touch the contents or the position: after close() they
#: raise BufferClosedError, as mmap itself raises ValueError (the range stays
#: mapped until garbage collection and would silently read zeros).
_CHECKED_METHODS = (
    "read",
    "read_byte",
    "readline",
    "write",
    "write_byte",
    "move",
    "find",
    "rfind",
    "seek",
    "tell",
    "size",
    "flush",
    "madvise",
)


def _checked(name: str) -> Any:
    method = getattr(mmap.mmap, name)

    def checked(self: GuardedBuffer, *args: Any) -> Any:
        self._check_open()
        return method(self, *args)

    checked.__name__ = checked.__qualname__ = name
    checked.__doc__ = method.__doc__
    return checked


for _name in _CHECKED_METHODS:
    setattr(GuardedBuffer, _name, _checked(_name))
del _name
