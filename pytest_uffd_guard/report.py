"""Presentation: findings about guarded buffers as tables, sections and JSON.

Everything here is a pure function of plain data (ints, strings, lists): no
pytest, no kernel, no GuardedBuffer.  The plugin turns what a buffer saw in
one test phase into a :class:`~pytest_uffd_guard.findings.Finding` (see
``harvest.py``, with the verdict from ``verdict.py``); this module lays
findings out for a failed test, for the end-of-run terminal section, for
junitxml and for the JSON report.  Every table is bounded in rows and in
cell width, and says how much it left out (issue 9, items 11 and 19).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from .findings import ChangeInfo, Finding, WriteInfo
from .verdict import ALLOWED, FORBIDDEN, REPORTED, Block, covered

#: Version of the JSON report's layout; bumped on any incompatible change.
#: Version 2 (issue 9, item 11): writes and changes are bounded lists with
#: exact totals beside them, plus coalesced blocks.
JSON_SCHEMA = "pytest-uffd-guard/report"
JSON_VERSION = 2

#: Bytes of each changed run kept in a finding (before and after).
PREVIEW_BYTES = 32
#: Bytes of each side shown in a table cell before it is shortened.
CELL_BYTES = 8
#: Rows of each table shown in a failure or the terminal section without -v.
ROW_LIMIT = 10
#: Characters of a table cell before it is elided.
CELL_WIDTH = 100
#: Rows of the end-of-session terminal section without -v.
SUMMARY_ROWS = 50

#: Title of the section added to a test's report.
SECTION_TITLE = "uffd-guard writes"
#: First words of the failure sentence (tests match on it).
FAILURE_PREFIX = "write into a read-only guarded buffer"
#: Separator title of the end-of-session terminal section.
SUMMARY_TITLE = "uffd-guard report"
#: Said in the terminal section when nothing was written.
NOTHING_WRITTEN = "no writes into guarded buffers"
#: Said when the fault handler met a userfaultfd event it does not handle
#: (it gives up: guarded buffers stop being tracked), from handler_state().
HANDLER_UNEXPECTED = (
    "uffd-guard: the fault handler stopped on an unexpected userfaultfd event "
    "{name} ({code:#x}): buffers guarded then were no longer tracked; fix: report it "
    "with the output of `python -m pytest_uffd_guard doctor --json`"
)
#: Said when the fault handler survived an anomaly (the last one is kept).
HANDLER_WARNING = "uffd-guard: warning: the fault handler survived {warning}"

__all__ = [
    "ALLOWED",
    "FORBIDDEN",
    "REPORTED",
    "ChangeInfo",
    "Finding",
    "WriteInfo",
    "covered",
    "failure_sentence",
    "finding_section",
    "handler_lines",
    "json_document",
    "property_items",
    "summary_lines",
]

# ------------------------------------------------------------ formatting


def shorten_hex(hexdata: str, length: int, limit: int = CELL_BYTES) -> str:
    """Hex of a run, cut to ``limit`` bytes with the number of bytes left."""
    shown = hexdata[: 2 * limit]
    if length > len(shown) // 2:
        return f"{shown}… (+{length - len(shown) // 2} B)"
    return shown


def elide(text: str, width: int = CELL_WIDTH) -> str:
    """``text`` cut to ``width`` characters in the middle (the end of a
    path or a writer's location is the part that tells), marked with "…"."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def change_cell(change: ChangeInfo) -> str:
    before = shorten_hex(change.before, change.length)
    return f"{before} → {shorten_hex(change.after, change.length)}"


def block_where(block: Block, finding: Finding) -> str:
    """A block in words: elements of an array, or a byte range."""
    if block.first_element is not None and finding.element:
        if block.first_element == block.last_element:
            return f"element {block.first_element} of {finding.element}"
        return f"elements {block.first_element}..{block.last_element} of {finding.element}"
    return f"bytes {block.offset}..{block.stop - 1}"


def _table(rows: list[list[Any]], headers: Sequence[str]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=list(headers), tablefmt="simple", disable_numparse=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def failure_sentence(findings: Sequence[Finding]) -> str:
    """The one-line ``longrepr`` of a test failed by writes."""
    failed = [f for f in findings if f.failed]
    names = ", ".join(sorted({repr(f.buffer) for f in failed}))
    writes = sum(f.write_counts().get(FORBIDDEN, 0) for f in failed)
    ranges = sum(f.change_counts().get(FORBIDDEN, 0) for f in failed)
    return (
        f"{FAILURE_PREFIX}: {names} ({_plural(writes, 'write')}, "
        f"{_plural(ranges, 'changed range')}); see the {SECTION_TITLE!r} section"
    )


def _stack_groups(
    findings: Sequence[Finding], full: bool
) -> list[tuple[Finding, list[WriteInfo], tuple[str, ...]]]:
    """Writes of each buffer grouped by where they came from, in order."""
    groups: dict[tuple[Any, ...], tuple[Finding, list[WriteInfo], tuple[str, ...]]] = {}
    for f in findings:
        for w in f.writes:
            if full:
                lines = tuple(f"{name}:{line} in {func}" for name, line, func in w.stack)
                if w.runner_frames:
                    lines += (f"... {w.runner_frames} frames of pytest's machinery",)
            else:
                lines = w.where or w.user_stack
            if not lines:
                continue
            key = (f.buffer, f.phase, w.syscall, w.thread_name, lines)
            if key not in groups:
                groups[key] = (f, [], lines)
            groups[key][1].append(w)
    return list(groups.values())


def _stack_lines(findings: Sequence[Finding], full: bool, limit: int | None) -> list[str]:
    """Where the named writes came from, each distinct stack once with the
    writes it made (``full``: every frame but pytest's, innermost first)."""
    lines: list[str] = []
    groups = _stack_groups(findings, full)
    for shown, (f, writes, frames) in enumerate(groups):
        if limit is not None and shown >= limit:
            lines.append(f"...and {len(groups) - shown} more stacks (use -v to see all)")
            break
        offsets = ", ".join(str(w.offset) for w in writes[:8])
        if len(writes) > 8:
            offsets += f", … (+{len(writes) - 8})"
        what = f" during system call {writes[0].syscall}" if writes[0].syscall else ""
        count = f"{len(writes)} writes at offsets" if len(writes) > 1 else "offset"
        lines.append(f"{f.buffer} {count} {offsets}{what}, innermost first:")
        lines.extend(f"    {frame}" for frame in frames)
    return lines


def _change_parts(findings: Sequence[Finding], limit: int | None) -> list[str]:
    """The changed-bytes tables: the runs (bounded) and, when not all of
    them are shown, the runs coalesced into blocks with exact totals."""
    rows = [
        [f.buffer, f.phase, c.offset, c.length, change_cell(c), c.status]
        for f in findings
        for c in f.changes
    ]
    total = sum(f.n_changes for f in findings)
    if not total:
        return []
    shown = rows if limit is None else rows[:limit]
    parts: list[str] = []
    if total > len(shown):
        block_rows = [
            [f.buffer, f.phase, block_where(b, f), b.runs, b.changed, b.status]
            for f in findings
            for b in f.blocks
        ]
        shown_blocks = block_rows if limit is None else block_rows[:limit]
        parts.append("changed bytes, coalesced:")
        headers = ["buffer", "phase", "where", "runs", "bytes changed", "status"]
        parts.append(_table(shown_blocks, headers))
        hidden = sum(f.blocks_total for f in findings) - len(shown_blocks)
        if hidden > 0:
            parts.append(f"...and {hidden} more blocks")
        parts.extend(
            f"{f.buffer!r} {f.phase}: {_plural(f.n_changes, 'changed run')}, "
            f"{f.n_changed_bytes} bytes changed in all ({_counts(f.change_counts())})"
            for f in findings
            if f.n_changes
        )
    parts.append("changed bytes:" if len(shown) == total else "changed bytes, first runs:")
    parts.append(_table(shown, ["buffer", "phase", "offset", "length", "before → after", "status"]))
    if total > len(shown):
        more = f"...and {total - len(shown)} more changed ranges"
        if len(rows) > len(shown):
            more += f" (use -v to see {'all' if len(rows) == total else len(rows)})"
        parts.append(more)
    return parts


def finding_section(
    findings: Sequence[Finding], limit: int | None = ROW_LIMIT, full_stacks: bool = False
) -> str:
    """The titled section of a test's report: changed bytes, writes, and
    where the named writes came from (``full_stacks``: every frame)."""
    parts = _change_parts(findings, limit)
    write_rows = [
        [
            f.buffer,
            f.phase,
            w.offset if w.exact else f"{w.offset} (page)",
            w.writer() if full_stacks else elide(w.writer()),
            w.status,
        ]
        for f in findings
        for w in f.writes
    ]
    total_writes = sum(f.n_writes for f in findings)
    if total_writes:
        shown = write_rows if limit is None else write_rows[:limit]
        parts.append("writes (first write into each page):")
        if shown:
            parts.append(_table(shown, ["buffer", "phase", "offset", "writer", "status"]))
        if total_writes > len(shown):
            counts = "; ".join(
                f"{f.buffer!r} {f.phase}: {_counts(f.write_counts())}"
                for f in findings
                if f.n_writes
            )
            more = f"...and {total_writes - len(shown)} more writes ({counts})"
            if limit is not None and len(write_rows) > len(shown):
                more += " (use -v to see more)"
            parts.append(more)
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


def _summary_ranges(f: Finding) -> str:
    if f.n_changes > len(f.changes) or (f.blocks and len(f.blocks) < f.n_changes):
        shown = ", ".join(block_where(b, f) for b in f.blocks[:2])
        more = f" (+{f.blocks_total - 2} blocks)" if f.blocks_total > 2 else ""
        return f"{f.n_changes} runs, {f.n_changed_bytes} B: {shown}{more}"
    ranges = ", ".join(f"{c.offset}+{c.length}" for c in f.changes[:4])
    if f.n_changes > 4:
        ranges += f", …(+{f.n_changes - 4})"
    return ranges


def _summary_writers(f: Finding) -> str:
    """The first writer, and how many others (only writers with a known
    location count when there are any: the rest are the same threads past
    the bound on named writers)."""
    named = [w for w in f.writes if w.where] or list(f.writes)
    writers: list[str] = []
    for w in named:
        if w.writer() not in writers:
            writers.append(w.writer())
    if not writers:
        return "-"
    text = elide(writers[0])
    if len(writers) > 1:
        text += f" (+{_plural(len(writers) - 1, 'other writer')})"
    return text


def summary_lines(findings: Sequence[Finding], limit: int | None = None) -> list[str]:
    """Lines of the end-of-session terminal section (without its title)."""
    rows = []
    for f in findings:
        verdict = "FAILED" if f.failed else ("allowed" if _all_allowed(f) else "reported")
        rows.append(
            [
                elide(f.nodeid),
                f.phase,
                elide(f.buffer, 30),
                elide(_summary_ranges(f), 60) or "-",
                _summary_writers(f),
                verdict,
            ]
        )
    if not rows:
        return [NOTHING_WRITTEN]
    shown = rows if limit is None else rows[:limit]
    lines = _table(shown, ["test", "phase", "buffer", "changed (offset+length)", "writer", ""])
    out = lines.splitlines()
    if len(rows) > len(shown):
        out.append(f"...and {len(rows) - len(shown)} more buffers written (use -v to see all)")
    return out


def _all_allowed(finding: Finding) -> bool:
    statuses = set(finding.write_counts()) | set(finding.change_counts())
    return statuses == {ALLOWED}


def property_items(findings: Iterable[Finding]) -> list[tuple[str, str]]:
    """``(name, value)`` pairs for ``user_properties`` (junitxml shows them):
    the writes and runs kept in detail, and a count of the rest."""
    items = []
    for f in findings:
        for w in f.writes:
            items.append(
                (
                    "uffd_write",
                    f"{f.buffer} {f.phase} offset={w.offset}{'' if w.exact else '(page)'} "
                    f"thread={w.thread_label()} status={w.status}"
                    + (f" syscall={w.syscall}" if w.syscall else "")
                    + (f" kind={w.kind}" if w.kind else "")
                    + (f" from={w.where[-1]}" if w.where else "")
                    + (f" stack_note={w.stack_note}" if w.stack_note and not w.stack else ""),
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
        if f.n_writes > len(f.writes) or f.n_changes > len(f.changes):
            items.append(
                (
                    "uffd_totals",
                    f"{f.buffer} {f.phase} writes={f.n_writes} ({_counts(f.write_counts())}) "
                    f"changed_runs={f.n_changes} ({_counts(f.change_counts())}) "
                    f"changed_bytes={f.n_changed_bytes}",
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
    return json.dumps(document, indent=1, sort_keys=False) + "\n"


def handler_lines(state: dict[str, Any]) -> list[str]:
    """What the fault handler survived or stopped on, from a
    ``_uffd.handler_state()`` dict: its ``unexpected_event_name`` and its
    last ``warning``, one line each; [] when neither is set (issue 10)."""
    lines = []
    if state.get("unexpected_event_name"):
        lines.append(
            HANDLER_UNEXPECTED.format(
                name=state["unexpected_event_name"], code=state.get("unexpected_event", 0)
            )
        )
    if state.get("warning"):
        lines.append(HANDLER_WARNING.format(warning=state["warning"]))
    return lines
