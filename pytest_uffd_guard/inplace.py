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

This module holds the ``Watch`` object and its results; ``armed.py`` the
memory of a running watch (snapshot, tracker, spans, the no-overlap rule).
The module is not called ``watch``: importing a submodule of that name
would replace the package's ``watch`` function with the module.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from typing import Any

from .armed import COMPARED_NOTE, Armed, Coverage, Span
from .borrowed import Memory, memory_kind, writable_view
from .guard import KEEP_AT_CLOSE, PREVIEW_AT_CLOSE
from .guard_args import check_choice as _check_choice
from .guard_args import check_name as _check_name
from .guard_args import count as _checked_count
from .kernel.process import ForkSafeLock
from .kernel.records import Change, WriteRecord
from .names import ENGINES

_names = itertools.count(1)


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
        self._armed: Armed | None = None
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
            armed = Armed(self, writable_view(self.obj))
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

    def _take(self, armed: Armed) -> None:
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


__all__ = ["COMPARED_NOTE", "Coverage", "Span", "Watch", "watch"]
