"""In-place watches: guard memory you did not allocate, without copying it.

``watch(obj)`` (exported as ``pytest_uffd_guard.watch``) write-protects
the memory of an existing writable, C-contiguous buffer (a numpy array or a
view into one, a bytearray, an ``array.array``, an mmap, a ctypes array, a
memoryview of any of them) and reports like a GuardedBuffer: ``writes``
with the offset into ``obj`` and the writer, ``changes()`` exact against a
snapshot taken at ``start()``.

Coverage (``Watch.coverage``):

* the whole pages inside the buffer are registered with userfaultfd and
  write-protected by the engine ``choose_engine`` picks (sync: writer
  named), over the object's own address;
* the partial first and last pages, and a buffer smaller than a page, are
  compared byte by byte with the snapshot (changes exact, writer unknown);
  so is memory userfaultfd cannot protect (a private file mapping such as a
  C extension's data, hugetlb, a machine without userfaultfd), with the
  reason in ``coverage.notes``.  An engine asked for by name that cannot
  run raises instead.

Nothing of the memory changes: before Linux 6.4 (no WP_UNPOPULATED) the
engine faults never-touched pages in with ``MADV_POPULATE_WRITE`` (which
keeps their contents; Linux < 5.14 reads and writes back one byte a page),
the snapshot only reads, and ``stop()`` un-protects and unregisters the
range, never discards or unmaps it.  While watched, the object is kept
alive and its buffer exported (a bytearray cannot be resized meanwhile).
Two watches may not share bytes: the second is refused, naming the first.

The module is not called ``watch``: importing a submodule of that name
would replace the package's ``watch`` function with the module.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import sys
import weakref
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from .borrowed import Memory, address_of_view, memory_kind, writable_view
from .engines import choose_engine, make_tracker
from .engines.base import Drained, Region, Tracker
from .engines.pagediff import diff_runs, page_record
from .errors import InvalidBufferError, UffdGuardError, UffdUnavailableError
from .guard import KEEP_AT_CLOSE, PREVIEW_AT_CLOSE
from .guard_args import check_choice as _check_choice
from .guard_args import check_name as _check_name
from .guard_args import count as _checked_count
from .kernel.memory import PAGE_SIZE, address_of, anonymous_map, copy, resource_error, round_up
from .kernel.process import ForkSafeLock, generation
from .kernel.records import Change, WriteRecord
from .names import ENGINES

#: The ``stack_note`` of records found by comparing bytes.
COMPARED_NOTE = "found by comparing bytes: this part is not write-protected"
#: What each engine tells about the writer of a protected page.
WRITERS = {
    "sync": "writer named",
    "hybrid": "first writers named, the rest found without the writer",
    "async": "writer not named",
}
AUTO_OR_DIFF = "use engine='auto' (falls back to comparing bytes) or engine='diff'"

_names = itertools.count(1)


@dataclass(frozen=True)
class Span:
    """Bytes ``offset`` to ``offset + length - 1`` of the watched object and
    how writes there are seen: ``how`` is ``"protected"`` (write-protected
    through userfaultfd) or ``"compared"`` (byte by byte with the snapshot)."""

    offset: int
    length: int
    how: str
    why: str

    def __str__(self) -> str:
        return f"bytes {self.offset}-{self.offset + self.length - 1} {self.how}: {self.why}"


@dataclass(frozen=True)
class Coverage:
    """Which bytes of a watch are page-protected, which compared, and why.

    Plain data (ints and strings), so a report can carry it as is.
    """

    size: int
    #: The engine protecting the whole pages, "diff" when all is compared,
    #: "none" before the first start().
    engine: str
    spans: tuple[Span, ...] = ()
    #: Why memory that could have been protected is compared instead, and
    #: other caveats (pages populated before Linux 6.4).
    notes: tuple[str, ...] = ()

    @property
    def protected(self) -> int:
        """Bytes write-protected through userfaultfd."""
        return sum(s.length for s in self.spans if s.how == "protected")

    @property
    def compared(self) -> int:
        """Bytes compared with the snapshot."""
        return sum(s.length for s in self.spans if s.how == "compared")

    def summary(self) -> str:
        """One line for a repr or a report."""
        if not self.spans:
            return "nothing to watch (0 bytes)" if not self.size else "not started"
        return f"{self.protected} bytes protected ({self.engine}), {self.compared} compared"

    def __str__(self) -> str:
        return "\n".join([self.summary(), *map(str, self.spans), *self.notes])

    def as_dict(self) -> dict[str, object]:
        return {
            "size": self.size,
            "engine": self.engine,
            "protected": self.protected,
            "compared": self.compared,
            "spans": [vars(s) for s in self.spans],
            "notes": list(self.notes),
        }


def watch(obj: Any, *, name: str | None = None, engine: str = "auto") -> Watch:
    """Watch ``obj``'s memory in place; the watch is running on return.

    Use it as a context manager (``with watch(table) as w:``), or call
    ``stop()``; ``start()`` watches again with a fresh snapshot.  See
    :class:`Watch` and the module docstring.
    """
    return Watch(obj, name=name, engine=engine).start()


class Watch:
    """A watch over ``obj``'s own memory.  Made stopped; ``start()`` (or
    ``with``, or :func:`watch`) arms it.  ``start()`` and ``stop()`` are
    idempotent; ``writes``, ``changes()`` and ``overflowed`` stay readable
    after ``stop()``, until the next ``start()``.
    """

    def __init__(self, obj: Any, *, name: str | None = None, engine: str = "auto") -> None:
        self.requested = _check_choice(engine, "engine", ENGINES)
        checked = _check_name(name)
        self.name = checked if checked is not None else f"watch-{next(_names)}"
        view = writable_view(obj)  # refuse a bad object now, not at start()
        size = view.nbytes
        view.release()
        #: The watched object (kept alive by the watch).
        self.obj = obj
        self._lock = ForkSafeLock()
        self._armed: _Armed | None = None
        self._records: list[WriteRecord] = []
        self._overflow = 0
        self._final: list[Change] = []
        self._coverage = Coverage(size, "none")
        self._finalizer: weakref.finalize[[], Watch] | None = None
        # What backs the protected range, kept across start/stop cycles of
        # the same memory: reading /proc/self/maps costs about 1 ms.
        self._memory: tuple[int, int, Memory] | None = None

    # ----------------------------------------------------------- lifecycle

    def start(self) -> Watch:
        """Snapshot the memory and protect it; a no-op while running."""
        with self._lock:
            if self._armed is not None:
                return self
            armed = _Armed(self, writable_view(self.obj))
            self._records, self._overflow, self._final = [], 0, []
            self._coverage = armed.coverage
            self._armed = armed
            self._finalizer = weakref.finalize(self, armed.close)
            self._finalizer.atexit = False
        return self

    def stop(self) -> None:
        """Stop watching: take the last records and the final changes,
        un-protect and unregister the memory (its contents and mapping are
        left as they are) and release the object's buffer.  Idempotent."""
        with self._lock:
            armed, self._armed = self._armed, None
            if armed is None:
                return
            assert self._finalizer is not None
            self._finalizer.detach()
            try:
                self._take(armed)
                runs = armed.runs()
                whole = sum(length for _, length in runs) <= KEEP_AT_CLOSE
                self._final = armed.diff(runs, None if whole else PREVIEW_AT_CLOSE)
            finally:
                self._records.extend(armed.close())
                self._overflow += armed.overflow()

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- results

    @property
    def running(self) -> bool:
        return self._armed is not None

    @property
    def engine(self) -> str:
        """The engine protecting the whole pages ("diff": all compared;
        "none" before the first start())."""
        return self._coverage.engine

    @property
    def coverage(self) -> Coverage:
        """Which bytes are protected, which compared, and why (see Coverage)."""
        return self._coverage

    @property
    def writes(self) -> list[WriteRecord]:
        """Recorded writes, ``offset`` counted from the start of ``obj``.

        Protected pages give one record per first write into a page (with
        the writer where the engine names it); compared bytes give one
        record per changed page, at its first changed byte, found when
        ``writes`` is read or at ``stop()`` (``exact=False``, no thread,
        ``stack_note`` says why).
        """
        with self._lock:
            if self._armed is not None:
                self._take(self._armed)
            return list(self._records)

    @property
    def overflowed(self) -> int:
        """Writes that happened but did not fit in the record log."""
        with self._lock:
            if self._armed is not None:
                self._take(self._armed)
            return self._overflow

    def changes(self, preview: int | None = None) -> list[Change]:
        """Runs of bytes that differ from the snapshot taken at ``start()``.

        After ``stop()``, the changes as they were then (runs kept whole up
        to 1 MiB in all, a preview of each beyond).
        """
        if preview is not None:
            preview = _checked_count(
                preview,
                "preview",
                "pass how many bytes of each run to keep, or None for all",
                maximum=sys.maxsize,
            )
        with self._lock:
            if self._armed is None:
                return [c if preview is None else _cut(c, preview) for c in self._final]
            return self._armed.diff(self._armed.runs(), preview)

    def _memory_kind(self, start: int, end: int) -> Memory:
        if self._memory is None or self._memory[:2] != (start, end):
            self._memory = (start, end, memory_kind(start, end))
        return self._memory[2]

    def _take(self, armed: _Armed) -> None:
        self._records.extend(armed.drain())
        self._overflow += armed.overflow()

    def __repr__(self) -> str:
        state = "running" if self._armed is not None else "stopped"
        return (
            f"<Watch {self.name!r} {type(self.obj).__name__} size={self._coverage.size} "
            f"{state}: {self._coverage.summary()}; writes={len(self._records)}>"
        )


def _cut(change: Change, preview: int) -> Change:
    return Change(change.offset, change.length, change.before[:preview], change.after[:preview])


class _Armed:
    """One running watch: the exported view, snapshot, tracker and spans.

    Separate from Watch so that a Watch dropped while running can still be
    stopped by its finalizer (which must not hold the Watch itself).
    """

    def __init__(self, owner: Watch, view: memoryview) -> None:
        self.view = view
        self.size = size = view.nbytes
        self.address = address = address_of_view(view)
        self.tracker: Tracker | None = None
        self._overflow = 0
        self.reported: set[int] = set()
        self._snapshot: mmap.mmap | None = None
        self.snapshot = 0
        #: Offset of the first protected byte in the object.
        self.delta = 0
        #: (offset, length) of the spans compared byte by byte.
        self.compared: list[tuple[int, int]] = []
        self.coverage = Coverage(size, "diff")
        try:
            _claim(owner, address, size)
        except BaseException:
            view.release()
            raise
        try:
            self._arm(owner)
        except BaseException:
            self.close()
            raise

    def _arm(self, owner: Watch) -> None:
        address, size, name = self.address, self.size, owner.name
        head = min(size, -address % PAGE_SIZE)
        body = (address + size) // PAGE_SIZE * PAGE_SIZE - (address + head)
        body = max(0, body)
        try:
            self._snapshot = anonymous_map(round_up(max(size, 1)))
        except OSError as exc:
            raise resource_error(
                exc, f"mapping the {size}-byte snapshot of watch {name!r}"
            ) from exc
        self.snapshot = address_of(self._snapshot)
        engine, why, notes = "diff", "", list[str]()
        if body:
            engine, why, notes = self._protect(owner, address + head, body)
        spans: list[Span] = []
        if engine == "diff":
            whole = "the whole buffer" if body else "smaller than a page, or no whole page inside"
            spans.append(Span(0, size, "compared", why or whole))
            self.compared = [(0, size)]
        else:
            if head:
                spans.append(Span(0, head, "compared", "partial first page; writer unknown"))
            spans.append(Span(head, body, "protected", f"{engine}: {WRITERS[engine]}"))
            tail = size - head - body
            if tail:
                spans.append(
                    Span(head + body, tail, "compared", "partial last page; writer unknown")
                )
            self.compared = [(s.offset, s.length) for s in spans if s.how == "compared"]
        self.delta = head
        self.coverage = Coverage(size, engine, tuple(s for s in spans if s.length), tuple(notes))
        # After protecting: a write racing start() is either in the snapshot
        # or recorded (reading protected pages never faults).
        copy(self.snapshot, address, size)

    def _protect(self, owner: Watch, start: int, length: int) -> tuple[str, str, list[str]]:
        """Protect ``[start, start + length)`` (whole pages): the engine that
        runs ("diff" when it cannot), why not, and notes."""
        requested = owner.requested
        if requested == "diff":
            return "diff", "engine='diff' was requested", []
        memory = owner._memory_kind(start, start + length)
        backing = memory.backing
        if memory.why_not is not None:
            if requested != "auto":
                raise InvalidBufferError(
                    f"watch {owner.name!r} cannot use engine={requested!r}: {memory.why_not}",
                    AUTO_OR_DIFF,
                )
            return "diff", memory.why_not, []
        choice = choose_engine(requested, length, backing=backing)
        if not choice.usable:
            if requested != "auto":
                choice.check()
            return "diff", f"not write-protected: {choice.reason}", []
        if choice.engine == "diff":
            return "diff", choice.reason, []
        region = Region(
            start, length, length, self.snapshot + (start - self.address), owner=weakref.ref(owner)
        )
        try:
            self.tracker = make_tracker(requested, region, max_records=None, backing=backing)
        except (OSError, UffdGuardError) as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise resource_error(exc, f"protecting watch {owner.name!r}") from exc
            reason = _reason(exc)
            if requested != "auto":
                if isinstance(exc, UffdGuardError):
                    raise
                raise UffdUnavailableError(
                    f"watch {owner.name!r}: engine={requested!r} cannot protect "
                    f"{memory.what}: {reason}",
                    AUTO_OR_DIFF,
                ) from exc
            return "diff", f"not write-protected: the kernel refused {memory.what}: {reason}", []
        notes: list[str] = []
        if self.tracker.name in ("sync", "hybrid"):
            from .kernel.capabilities import capabilities

            if not capabilities().has("wp_unpopulated"):
                notes.append(
                    "never-touched pages were faulted in first (MADV_POPULATE_WRITE, contents "
                    "kept) so that they can be protected: this kernel has no WP_UNPOPULATED "
                    "(Linux 6.4); their memory is now committed"
                )
        return self.tracker.name, "", notes

    def drain(self) -> list[WriteRecord]:
        records = []
        if self.tracker is not None:
            records = _shift(self._take(self.tracker.drain()), self.delta)
        return records + self._compared_records()

    def _take(self, drained: Drained) -> list[WriteRecord]:
        self._overflow += drained.overflow
        return drained.records

    def overflow(self) -> int:
        count, self._overflow = self._overflow, 0
        return count

    def _compared_records(self) -> list[WriteRecord]:
        """One record per changed page of the compared spans, not reported yet."""
        found: dict[int, int] = {}
        for start, length in self.compared:
            for offset, run in diff_runs(self.address + start, self.snapshot + start, length):
                first, end = start + offset, start + offset + run
                while first < end:
                    page = (self.address + first) // PAGE_SIZE
                    if page not in self.reported:
                        found.setdefault(page, first)
                    first = (page + 1) * PAGE_SIZE - self.address
        self.reported.update(found)
        return [replace(page_record(off), stack_note=COMPARED_NOTE) for off in found.values()]

    def runs(self) -> list[tuple[int, int]]:
        return diff_runs(self.address, self.snapshot, self.size)

    def diff(self, runs: list[tuple[int, int]], preview: int | None) -> list[Change]:
        result = []
        for offset, length in runs:
            n = length if preview is None else min(length, preview)
            before = ctypes.string_at(self.snapshot + offset, n)
            after = ctypes.string_at(self.address + offset, n)
            result.append(Change(offset, length, before, after))
        return result

    def close(self) -> list[WriteRecord]:
        """Undo everything start() did; the last records.  Idempotent."""
        records: list[WriteRecord] = []
        tracker, self.tracker = self.tracker, None
        try:
            if tracker is not None:
                try:
                    records = self._take(tracker.drain())
                    # Un-protect before unregistering: Linux before 6.0 left
                    # uffd-wp bits behind on unregister.
                    tracker.pause()
                finally:
                    records += self._take(tracker.close())
                records = _shift(records, self.delta)
        finally:
            if self._snapshot is not None:
                with suppress(BufferError):
                    self._snapshot.close()
                self._snapshot = None
            _release(self.address, self.size)
            with suppress(BufferError):
                self.view.release()
        return records


def _shift(records: list[WriteRecord], delta: int) -> list[WriteRecord]:
    return [replace(r, offset=r.offset + delta) for r in records] if delta else records


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UffdGuardError):
        return exc.cause
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} (errno {exc.errno})"
    return str(exc)


# ------------------------------------------------------ overlapping watches

_active_lock = ForkSafeLock()
#: (start, end) -> (fork generation, name) of each running watch in this process.
_active: dict[tuple[int, int], tuple[int, str]] = {}


def _claim(owner: Watch, address: int, size: int) -> None:
    """Refuse a watch that shares bytes with another running watch."""
    if not size:
        return
    pid = generation()  # a watch inherited across fork() is not running here
    with _active_lock:
        for (start, end), (theirs, name) in list(_active.items()):
            if theirs != pid:  # inherited across fork(): not running here
                del _active[start, end]
            elif start < address + size and address < end:
                low, high = max(start, address) - address, min(end, address + size) - address
                raise InvalidBufferError(
                    f"watch {owner.name!r} would share its bytes {low}-{high - 1} with watch "
                    f"{name!r}, which is running: nested or overlapping watches are not supported",
                    f"stop watch {name!r} first, or watch the union of both once",
                )
        _active[address, address + size] = (pid, owner.name)


def _release(address: int, size: int) -> None:
    with _active_lock:
        _active.pop((address, address + size), None)
