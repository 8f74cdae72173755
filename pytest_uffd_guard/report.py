"""Presentation: findings about guarded buffers as plain data, tables and JSON.

Everything here is a pure function of plain data (ints, strings, lists): no
pytest, no kernel, no GuardedBuffer.  The plugin turns what a buffer saw in
one test phase into a :class:`Finding`; this module decides what is allowed
by byte ranges, and lays findings out for a failed test, for the end-of-run
terminal section and for the JSON report.

A finding travels on pytest's reports as ``Finding.to_dict()`` so that it
survives the trip from a pytest-xdist worker to the controller.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Version of the JSON report's layout; bumped on any incompatible change.
JSON_SCHEMA = "pytest-uffd-guard/report"
JSON_VERSION = 1

#: Status of a write or of a changed range.
FORBIDDEN = "forbidden"  # fails the test
ALLOWED = "allowed"  # into a read-only buffer, but allowed (allow=, or a hook)
REPORTED = "reported"  # shown only: writable buffer, setup/teardown, report-only mode

#: Bytes of each changed run kept in a finding (before and after).
PREVIEW_BYTES = 32
#: Bytes of each side shown in a table cell before it is shortened.
CELL_BYTES = 8
#: Rows of each table shown in a failure or the terminal section without -v.
ROW_LIMIT = 10

#: Title of the section added to a test's report.
SECTION_TITLE = "uffd-guard writes"
#: First words of the failure sentence (tests match on it).
FAILURE_PREFIX = "write into a read-only guarded buffer"
#: Separator title of the end-of-session terminal section.
SUMMARY_TITLE = "uffd-guard report"
#: Said in the terminal section when nothing was written.
NOTHING_WRITTEN = "no writes into guarded buffers"

Range = tuple[int, int]


@dataclass(frozen=True)
class WriteInfo:
    """One recorded write (the first into its page), as plain data."""

    offset: int
    exact: bool
    thread_id: int | None
    thread_name: str | None
    status: str = REPORTED
    #: One line naming the writer (thread, system call, innermost user frame).
    description: str | None = None
    #: The writer's Python stack, innermost first: (filename, lineno, function).
    stack: tuple[tuple[str, int, str], ...] = ()
    #: The innermost frames that are neither the plugin's nor the stdlib's.
    user_stack: tuple[str, ...] = ()
    syscall: str | None = None
    has_python: bool | None = None
    stack_note: str | None = None
    thread_comm: str | None = None

    @classmethod
    def from_record(cls, record: Any, status: str) -> WriteInfo:
        """Plain data from a ``WriteRecord`` (its writer named where captured)."""
        from .attribution import describe_writer, user_frames

        return cls(
            offset=record.offset,
            exact=record.exact,
            thread_id=record.thread_id,
            thread_name=record.thread_name,
            status=status,
            description=describe_writer(record),
            stack=tuple((f.filename, f.lineno, f.function) for f in record.stack),
            user_stack=tuple(str(f) for f in user_frames(record, 3)),
            syscall=record.syscall,
            has_python=record.has_python,
            stack_note=record.stack_note,
            thread_comm=record.thread_comm,
        )

    def writer(self) -> str:
        """The writer in one line: the thread, and where it wrote from if known."""
        return self.description or self.thread_label()

    def thread_label(self) -> str:
        if self.thread_id is None:
            return "unknown thread"
        if self.thread_name is None:
            # The thread ended before the write was read, or is not Python's.
            return f"tid {self.thread_id} (name unknown)"
        return f"{self.thread_name} (tid {self.thread_id})"


@dataclass(frozen=True)
class ChangeInfo:
    """One run of changed bytes; ``before``/``after`` hex, maybe a preview."""

    offset: int
    length: int
    before: str
    after: str
    status: str = REPORTED

    @property
    def truncated(self) -> bool:
        return len(self.after) // 2 < self.length

    @property
    def stop(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Finding:
    """What one guarded buffer saw during one phase of one test."""

    nodeid: str
    phase: str
    buffer: str
    size: int
    origin: str
    readonly: bool
    writes: tuple[WriteInfo, ...] = ()
    changes: tuple[ChangeInfo, ...] = ()
    overflowed: int = 0
    stopped: str | None = None
    allow: tuple[Range, ...] = field(default=())

    @property
    def failed(self) -> bool:
        return any(w.status == FORBIDDEN for w in self.writes) or any(
            c.status == FORBIDDEN for c in self.changes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "phase": self.phase,
            "buffer": self.buffer,
            "size": self.size,
            "origin": self.origin,
            "readonly": self.readonly,
            "failed": self.failed,
            "allow": [list(r) for r in self.allow],
            "writes": [
                {
                    "offset": w.offset,
                    "exact": w.exact,
                    "thread_id": w.thread_id,
                    "thread_name": w.thread_name,
                    "status": w.status,
                    "writer": w.description,
                    "syscall": w.syscall,
                    "has_python": w.has_python,
                    "thread_comm": w.thread_comm,
                    "stack": [{"filename": f, "lineno": n, "function": fn} for f, n, fn in w.stack],
                    "stack_note": w.stack_note,
                    "user_stack": list(w.user_stack),
                }
                for w in self.writes
            ],
            "changes": [
                {
                    "offset": c.offset,
                    "length": c.length,
                    "before": c.before,
                    "after": c.after,
                    "truncated": c.truncated,
                    "status": c.status,
                }
                for c in self.changes
            ],
            "overflowed": self.overflowed,
            "stopped": self.stopped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            nodeid=data["nodeid"],
            phase=data["phase"],
            buffer=data["buffer"],
            size=data["size"],
            origin=data["origin"],
            readonly=data["readonly"],
            allow=tuple((int(a), int(b)) for a, b in data.get("allow", ())),
            writes=tuple(
                WriteInfo(
                    w["offset"],
                    w["exact"],
                    w["thread_id"],
                    w["thread_name"],
                    w["status"],
                    description=w.get("writer"),
                    stack=tuple(
                        (f["filename"], f["lineno"], f["function"]) for f in w.get("stack", ())
                    ),
                    user_stack=tuple(w.get("user_stack", ())),
                    syscall=w.get("syscall"),
                    has_python=w.get("has_python"),
                    stack_note=w.get("stack_note"),
                    thread_comm=w.get("thread_comm"),
                )
                for w in data["writes"]
            ),
            changes=tuple(
                ChangeInfo(c["offset"], c["length"], c["before"], c["after"], c["status"])
                for c in data["changes"]
            ),
            overflowed=data.get("overflowed", 0),
            stopped=data.get("stopped"),
        )


# ------------------------------------------------------------ byte ranges


def normalize_range(item: Any, size: int | None = None) -> Range:
    """``slice(a, b)`` or ``(a, b)`` -> ``(start, stop)``; raises ValueError.

    Negative bounds count from the end when ``size`` is known.
    """
    if isinstance(item, slice):
        if item.step not in (None, 1):
            raise ValueError(f"allow range {item!r} has a step; only contiguous ranges work")
        start, stop = item.start, item.stop
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        start, stop = item
    else:
        raise ValueError(f"allow range {item!r} is neither a slice nor a (start, stop) pair")
    start = 0 if start is None else start
    if stop is None:
        if size is None:
            raise ValueError(f"allow range {item!r} has no stop")
        stop = size
    if not isinstance(start, int) or not isinstance(stop, int):
        raise ValueError(f"allow range {item!r} needs int bounds")
    if size is not None:
        start = start + size if start < 0 else start
        stop = stop + size if stop < 0 else stop
    if start < 0 or stop < start:
        raise ValueError(f"allow range {item!r} is empty or reversed")
    return (start, stop)


def covered(start: int, stop: int, ranges: Iterable[Range]) -> bool:
    """True if every byte of ``[start, stop)`` lies in one of ``ranges``."""
    position = start
    for a, b in sorted(ranges):
        if a > position:
            break
        position = max(position, b)
        if position >= stop:
            return True
    return position >= stop


def spans_in_page(spans: Sequence[Range], page_start: int, page_size: int) -> list[Range]:
    """The parts of ``spans`` that fall inside one page."""
    page_stop = page_start + page_size
    return [
        (max(a, page_start), min(b, page_stop))
        for a, b in spans
        if a < page_stop and b > page_start
    ]


def write_in_ranges(
    offset: int, exact: bool, spans: Sequence[Range], page_size: int, ranges: Sequence[Range]
) -> bool:
    """Whether a write lies inside ``ranges``: its offset (when exact) and
    every byte changed in its page (``spans``)."""
    if not ranges:
        return False
    page = offset - offset % page_size
    spans = list(spans)
    if exact:
        spans.append((offset, offset + 1))
    elif not spans:
        # Page granularity and nothing changed: the page meeting a range is
        # all that can be known.
        return any(a < page + page_size and b > page for a, b in ranges)
    return all(covered(a, b, ranges) for a, b in spans)


# ------------------------------------------------------------ formatting


def shorten_hex(hexdata: str, length: int, limit: int = CELL_BYTES) -> str:
    """Hex of a run, cut to ``limit`` bytes with the number of bytes left."""
    shown = hexdata[: 2 * limit]
    if length > len(shown) // 2:
        return f"{shown}… (+{length - len(shown) // 2} B)"
    return shown


def change_cell(change: ChangeInfo) -> str:
    before = shorten_hex(change.before, change.length)
    return f"{before} → {shorten_hex(change.after, change.length)}"


def _limited(rows: list[list[Any]], limit: int | None) -> tuple[list[list[Any]], int]:
    if limit is None or len(rows) <= limit:
        return rows, 0
    return rows[:limit], len(rows) - limit


def _table(rows: list[list[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=list(headers), tablefmt="simple", disable_numparse=True)


def failure_sentence(findings: Sequence[Finding]) -> str:
    """The one-line ``longrepr`` of a test failed by writes."""
    failed = [f for f in findings if f.failed]
    names = ", ".join(sorted({repr(f.buffer) for f in failed}))
    writes = sum(1 for f in failed for w in f.writes if w.status == FORBIDDEN)
    ranges = sum(1 for f in failed for c in f.changes if c.status == FORBIDDEN)
    return (
        f"{FAILURE_PREFIX}: {names} ({_plural(writes, 'write')}, "
        f"{_plural(ranges, 'changed range')}); see the {SECTION_TITLE!r} section"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _stack_lines(findings: Sequence[Finding], full: bool, limit: int | None) -> list[str]:
    """Where each named write came from: the innermost user frames, or with
    ``full`` the whole stack, innermost first."""
    lines: list[str] = []
    shown = 0
    for f in findings:
        for w in f.writes:
            frames = (
                [f"{name}:{line} in {func}" for name, line, func in w.stack]
                if full
                else list(w.user_stack)
            )
            if not frames:
                continue
            if limit is not None and shown >= limit:
                return [*lines, "...more stacks (use -v to see all)"]
            shown += 1
            what = f" during system call {w.syscall}" if w.syscall else ""
            lines.append(f"{f.buffer} offset {w.offset}{what}, innermost first:")
            lines.extend(f"    {frame}" for frame in frames)
    return lines


def finding_section(
    findings: Sequence[Finding], limit: int | None = ROW_LIMIT, full_stacks: bool = False
) -> str:
    """The titled section of a test's report: changed bytes, writes, and
    where the named writes came from (``full_stacks``: every frame)."""
    change_rows = [
        [f.buffer, f.phase, c.offset, c.length, change_cell(c), c.status]
        for f in findings
        for c in f.changes
    ]
    write_rows = [
        [
            f.buffer,
            f.phase,
            w.offset if w.exact else f"{w.offset} (page)",
            w.writer(),
            w.status,
        ]
        for f in findings
        for w in f.writes
    ]
    parts: list[str] = []
    change_rows, hidden_changes = _limited(change_rows, limit)
    write_rows, hidden_writes = _limited(write_rows, limit)
    if change_rows:
        parts.append("changed bytes:")
        parts.append(
            _table(change_rows, ["buffer", "phase", "offset", "length", "before → after", "status"])
        )
        if hidden_changes:
            parts.append(f"...and {hidden_changes} more changed ranges (use -v to see all)")
    if write_rows:
        parts.append("writes (first write into each page):")
        parts.append(_table(write_rows, ["buffer", "phase", "offset", "writer", "status"]))
        if hidden_writes:
            parts.append(f"...and {hidden_writes} more writes (use -v to see all)")
        stacks = _stack_lines(findings, full_stacks, limit)
        if stacks:
            parts.append("writers' Python stacks:" if full_stacks else "written from:")
            parts.extend(stacks)
    for f in findings:
        if f.overflowed:
            parts.append(f"{f.buffer!r}: {f.overflowed} more writes did not fit the record log")
        if f.stopped:
            parts.append(f"{f.buffer!r}: tracking stopped: {f.stopped}")
    return "\n".join(parts)


def summary_lines(findings: Sequence[Finding], limit: int | None = None) -> list[str]:
    """Lines of the end-of-session terminal section (without its title)."""
    rows = []
    for f in findings:
        ranges = ", ".join(f"{c.offset}+{c.length}" for c in f.changes[:4])
        if len(f.changes) > 4:
            ranges += f", …(+{len(f.changes) - 4})"
        writers = sorted({w.writer() for w in f.writes})
        verdict = "FAILED" if f.failed else ("allowed" if _all_allowed(f) else "reported")
        rows.append(
            [f.nodeid, f.phase, f.buffer, ranges or "-", ", ".join(writers) or "-", verdict]
        )
    if not rows:
        return [NOTHING_WRITTEN]
    shown, hidden = _limited(rows, limit)
    lines = _table(shown, ["test", "phase", "buffer", "changed (offset+length)", "writer", ""])
    out = lines.splitlines()
    if hidden:
        out.append(f"...and {hidden} more buffers written (use -v to see all)")
    return out


def _all_allowed(finding: Finding) -> bool:
    statuses = {w.status for w in finding.writes} | {c.status for c in finding.changes}
    return statuses == {ALLOWED}


def property_items(findings: Iterable[Finding]) -> list[tuple[str, str]]:
    """``(name, value)`` pairs for ``user_properties`` (junitxml shows them)."""
    items = []
    for f in findings:
        for w in f.writes:
            items.append(
                (
                    "uffd_write",
                    f"{f.buffer} {f.phase} offset={w.offset}{'' if w.exact else '(page)'} "
                    f"thread={w.thread_label()} status={w.status}"
                    + (f" from={w.user_stack[0]}" if w.user_stack else ""),
                )
            )
        for c in f.changes:
            items.append(
                (
                    "uffd_change",
                    f"{f.buffer} {f.phase} offset={c.offset} length={c.length} "
                    f"before={c.before} after={c.after} status={c.status}",
                )
            )
    return items


def json_document(findings: Sequence[Finding], header: dict[str, Any]) -> str:
    """The JSON report: see docs/configuration.md for the schema."""
    document = {
        "schema": JSON_SCHEMA,
        "version": JSON_VERSION,
        **header,
        "findings": [f.to_dict() for f in findings],
    }
    return json.dumps(document, indent=2, sort_keys=False) + "\n"
