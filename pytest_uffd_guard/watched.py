"""One object watched in place for the plugin, and how its findings read.

A :class:`Watched` holds the object, the rules that apply to it and its
``inplace.Watch``; ``failure_sentence`` and ``section_text`` lay its
findings out (``report.py`` does the tables).  No pytest here: the plugin's
hooks live in ``watchplugin.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# harvest, report and verdict are imported where they are used: the plugin
# imports this module at start-up, and most runs watch nothing (issue 11).

if TYPE_CHECKING:
    from .findings import Finding
    from .inplace import Watch
    from .kernel.records import Change
    from .verdict import Range

#: First words of the failure sentence of a test failed by an in-place watch.
FAILURE_PREFIX = "write into memory watched in place"
#: Title of the section added to a report (the phase follows in brackets).
SECTION_TITLE = "uffd-guard writes in place"


class Watched:
    """One object watched in place, and the rules that apply to it.

    ``strict`` is the marker's rule (forbidden writes fail the test even
    under --uffd-report); ``allow`` holds the marker's byte ranges, set once
    they are checked against the object's size; ``element`` is the numpy
    layout, for element-aware reports (read from ``obj``).
    """

    def __init__(
        self,
        obj: Any,
        name: str,
        origin: str,
        *,
        strict: bool = False,
    ) -> None:
        self.obj, self.name, self.origin, self.strict = obj, name, origin, strict
        from .harvest import element_of

        self.element = element_of(typed(obj))
        self.allow: tuple[Range, ...] = ()
        self.watch: Watch | None = None
        #: How the running watch covers the bytes (``coverage_text``), for sections.
        self.coverage = ""

    def make(self, engine: str) -> Watch:
        """A new (not started) watch of the object; raises the watch's errors
        about the object (the engine's come at ``start()``)."""
        from .inplace import Watch

        self.watch = Watch(self.obj, name=self.name, engine=engine)
        return self.watch

    def start(self) -> None:
        """Start (or restart, from a fresh snapshot) the watch."""
        assert self.watch is not None
        self.watch.start()
        self.coverage = coverage_text(self.watch)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()


class Seen:
    """What ``harvest.judge`` reads of a buffer, over a watch's findings."""

    closed = True  # judge then reads changes() instead of two addresses

    def __init__(self, watched: Watched, changes: list[Change]) -> None:
        self.name = watched.name
        self._size = memoryview(watched.obj).nbytes
        self._changes = changes

    def __len__(self) -> int:
        return self._size

    def changes(self, preview: int | None = None) -> list[Change]:
        return self._changes


def coverage_text(watch: Watch) -> str:
    """``name: N bytes protected (sync), M compared`` and each span, indented."""
    coverage = watch.coverage
    lines = [f"{watch.name}: {coverage.summary()}"]
    lines += [f"    {span}" for span in coverage.spans]
    lines += [f"    {note}" for note in coverage.notes]
    return "\n".join(lines)


def typed(value: Any) -> Any:
    """The value as ``harvest.element_of`` reads it: numpy arrays as they
    are, other buffers as a memoryview (array.array keeps its format)."""
    if hasattr(value, "dtype"):
        return value
    try:
        return memoryview(value)
    except TypeError:
        return value


def size_of(value: Any) -> int:
    with memoryview(value) as view:
        return view.nbytes


def problem_of(exc: BaseException) -> tuple[str, str | None]:
    cause = getattr(exc, "cause", None) or str(exc) or type(exc).__name__
    return str(cause), getattr(exc, "remedy", None)


def failure_sentence(findings: Sequence[Finding], during: str | None = None) -> str:
    """The one-line ``longrepr`` of a phase failed by in-place watches."""
    from .verdict import FORBIDDEN

    failed = [f for f in findings if f.failed]
    names = ", ".join(sorted({repr(f.buffer) for f in failed}))
    writes = sum(f.write_counts().get(FORBIDDEN, 0) for f in failed)
    ranges = sum(f.change_counts().get(FORBIDDEN, 0) for f in failed)
    text = (
        f"{FAILURE_PREFIX}: {names} ({_plural(writes, 'write')}, "
        f"{_plural(ranges, 'changed range')})"
    )
    if during:
        text += f" during {during}"
    return f"{text}; see the {SECTION_TITLE!r} section"


def section_text(findings: Sequence[Finding], verbose: bool, coverage: dict[str, str]) -> str:
    """The findings' table (bounded unless ``verbose``: -v) and how each was
    watched (``coverage``: origin -> ``coverage_text``)."""
    from . import report

    text = report.finding_section(
        findings, None if verbose else report.ROW_LIMIT, full_stacks=verbose
    )
    origins = dict.fromkeys(f.origin for f in findings)
    covered = [coverage[o] for o in origins if coverage.get(o)]
    if covered:
        text += "\nwatched in place (writers are named in protected bytes only):\n"
        text += "\n".join(covered)
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


__all__ = [
    "FAILURE_PREFIX",
    "SECTION_TITLE",
    "Seen",
    "Watched",
    "coverage_text",
    "failure_sentence",
    "problem_of",
    "section_text",
    "size_of",
    "typed",
]
