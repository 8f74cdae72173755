"""The memory of one running in-place watch: snapshot, tracker and spans.

:class:`Armed` is what ``Watch.start()`` sets up and ``Watch.stop()``
undoes (``inplace.py`` holds the :class:`~pytest_uffd_guard.inplace.Watch`
object and its results): it claims the bytes (two running watches may not
share any), maps the snapshot, protects the whole pages inside the buffer
through the engine ``choose_engine`` picks and compares the rest byte by
byte.  :class:`Coverage` and :class:`Span` say which bytes are which, as
plain data.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from .borrowed import address_of_view
from .engines import choose_engine, make_tracker
from .engines.base import Drained, Region, Tracker
from .engines.pagediff import diff_runs, page_record
from .errors import InvalidBufferError, UffdGuardError, UffdUnavailableError
from .kernel.memory import (
    PAGE_SIZE,
    address_of,
    anonymous_map,
    copy,
    limit_error,
    resource_error,
    round_up,
)
from .kernel.process import ForkSafeLock, generation
from .kernel.records import Change, WriteRecord

if TYPE_CHECKING:
    from .inplace import Watch

#: The ``stack_note`` of records found by comparing bytes.
COMPARED_NOTE = "found by comparing bytes: this part is not write-protected"
#: What each engine tells about the writer of a protected page.
WRITERS = {
    "sync": "writer named",
    "hybrid": "first writers named, the rest found without the writer",
    "async": "writer not named",
}
AUTO_OR_DIFF = "use engine='auto' (falls back to comparing bytes) or engine='diff'"


@dataclass(frozen=True)
class Span:
    """Bytes ``offset`` to ``offset + length - 1`` of the watched object and
    how writes there are seen: ``how`` is ``"protected"`` (write-protected
    through userfaultfd) or ``"compared"`` (byte by byte with the snapshot)."""

    offset: int
    length: int
    how: str
    why: str

    @property
    def end(self) -> int:
        """One past the span's last byte."""
        return self.offset + self.length

    def __str__(self) -> str:
        return f"bytes {self.offset}-{self.end - 1} {self.how}: {self.why}"


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
        """The fields (each span a dict) and the two byte counts: ints,
        strings and lists, for the JSON report."""
        data = asdict(self)
        data.update(spans=list(data["spans"]), notes=list(self.notes))
        return {**data, "protected": self.protected, "compared": self.compared}


class Armed:
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
            claim(owner, address, size)
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
            limit = limit_error(exc, f"protecting watch {owner.name!r}")
            if limit is not None:
                raise limit from exc
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
            release(self.address, self.size)
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


def claim(owner: Watch, address: int, size: int) -> None:
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


def release(address: int, size: int) -> None:
    with _active_lock:
        _active.pop((address, address + size), None)
