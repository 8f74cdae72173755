"""What one guarded buffer saw in one test phase, as bounded plain data.

A :class:`Finding` holds ints, strings and tuples only, so it travels on
pytest's reports as ``to_dict()`` from a pytest-xdist worker to the
controller, and into the JSON report.  It is bounded (issue 9, item 11):
at most :data:`DETAIL` writes and changed runs in detail, at most
:data:`MAX_BLOCKS` coalesced blocks, and exact totals beside them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from . import frames as _frames
from .verdict import FORBIDDEN, REPORTED, Block, Range

#: Writes and changed runs of each finding kept in detail.
DETAIL = 100
#: Coalesced blocks of changed runs kept per finding.
MAX_BLOCKS = 100
#: Record kinds that are plain stores: nothing to add to the writer.
PLAIN_KINDS = ("", "write", "store", "fault")
#: Frames kept of each writer's stack (after pytest's are dropped).
MAX_FRAMES = 40


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
    #: The writer's Python stack without pytest's frames, innermost first.
    stack: tuple[tuple[str, int, str], ...] = ()
    #: The innermost frames that are neither the plugin's nor the stdlib's.
    user_stack: tuple[str, ...] = ()
    syscall: str | None = None
    has_python: bool | None = None
    stack_note: str | None = None
    thread_comm: str | None = None
    #: The short form of the stack (see frames.where).
    where: tuple[str, ...] = ()
    #: Frames of pytest's machinery dropped from ``stack``.
    runner_frames: int = 0
    #: What kind of event the record is when it is not a plain store (an
    #: engine's ``record.kind``, e.g. a madvise that discarded bytes), and
    #: the engine's note about it (``record.note``).
    kind: str | None = None
    note: str | None = None

    @classmethod
    def from_record(cls, record: Any, status: str, test_file: str | None = None) -> WriteInfo:
        """Plain data from a ``WriteRecord`` (its writer named where captured)."""
        from .stacks import describe_writer, user_frames

        stack, dropped = _frames.trim([(f.filename, f.lineno, f.function) for f in record.stack])
        return cls(
            offset=record.offset,
            exact=record.exact,
            thread_id=record.thread_id,
            thread_name=record.thread_name,
            status=status,
            description=describe_writer(record),
            stack=stack[:MAX_FRAMES],
            user_stack=tuple(str(f) for f in user_frames(record, 3)),
            syscall=record.syscall,
            has_python=record.has_python,
            stack_note=record.stack_note,
            thread_comm=record.thread_comm,
            where=_frames.where(stack, test_file),
            runner_frames=dropped + max(len(stack) - MAX_FRAMES, 0),
            kind=_text(getattr(record, "kind", None)),
            note=_text(getattr(record, "note", None)),
        )

    def writer(self) -> str:
        """The writer in one line: the thread, and where it wrote from if
        known; an event that is not a plain store says what it was first."""
        who = self.description or self.thread_label()
        if self.where and " at " in who:
            # The frame that wrote, as the short form names it.
            who = f"{who.rsplit(' at ', 1)[0]} at {self.where[0]}"
        event = self.note or self.kind
        return f"{event}: {who}" if event else who

    def thread_label(self) -> str:
        if self.thread_id is None:
            return "unknown thread"
        if self.thread_name is None:
            # The thread ended before the write was read, or is not Python's.
            return f"tid {self.thread_id} (name unknown)"
        return f"{self.thread_name} (tid {self.thread_id})"

    def to_dict(self) -> dict[str, Any]:
        data = {key: getattr(self, name) for key, name in _WRITE_KEYS}
        data["stack"] = [{"filename": f, "lineno": n, "function": fn} for f, n, fn in self.stack]
        data["user_stack"], data["where"] = list(self.user_stack), list(self.where)
        return data

    @classmethod
    def from_dict(cls, w: dict[str, Any]) -> WriteInfo:
        values: dict[str, Any] = {name: w[key] for key, name in _WRITE_KEYS if key in w}
        values["stack"] = tuple(
            (f["filename"], f["lineno"], f["function"]) for f in w.get("stack", ())
        )
        values["user_stack"] = tuple(w.get("user_stack", ()))
        values["where"] = tuple(w.get("where", ()))
        values["runner_frames"] = w.get("runner_frames", 0)
        return cls(**values)


#: A write's JSON keys, in order, and the WriteInfo field each holds.
_WRITE_KEYS = tuple(
    (key, {"writer": "description"}.get(key, key))
    for key in [
        "offset",
        "exact",
        "thread_id",
        "thread_name",
        "status",
        "writer",
        "syscall",
        "has_python",
        "thread_comm",
        "stack",
        "stack_note",
        "user_stack",
        "where",
        "runner_frames",
        "kind",
        "note",
    ]
)


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

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        status = data.pop("status")
        return {**data, "truncated": self.truncated, "status": status}

    @classmethod
    def from_dict(cls, c: dict[str, Any]) -> ChangeInfo:
        return cls(c["offset"], c["length"], c["before"], c["after"], c["status"])


def _block_dict(b: Block) -> dict[str, Any]:
    return {
        "offset": b.offset,
        "length": b.length,
        "runs": b.runs,
        "changed": b.changed,
        "status": b.status,
        "first_element": b.first_element,
        "last_element": b.last_element,
    }


@dataclass(frozen=True)
class Finding:
    """What one guarded buffer saw during one phase of one test.

    ``writes``/``changes`` are the first ones in detail; the ``*_total``
    counts and ``*_by_status`` are exact (None: as many as listed).
    ``element`` describes an array's layout (``"float64[1048576]"``) and
    ``item_size`` its element size, for element-aware blocks; ``coverage``
    what an in-place watch protected and what it compared.
    """

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
    writes_total: int | None = None
    writes_by_status: tuple[tuple[str, int], ...] | None = None
    changes_total: int | None = None
    changes_by_status: tuple[tuple[str, int], ...] | None = None
    changed_bytes: int | None = None
    blocks: tuple[Block, ...] = ()
    blocks_total: int = 0
    element: str | None = None
    item_size: int = 1
    #: For memory watched in place, ``Coverage.as_dict()``: which bytes were
    #: write-protected and which compared with a snapshot; None otherwise.
    coverage: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        # Totals default to what is listed, so a finding built from lists
        # equals its own round trip through to_dict/from_dict.
        fill = object.__setattr__
        if self.writes_total is None:
            fill(self, "writes_total", len(self.writes))
        if self.writes_by_status is None:
            fill(self, "writes_by_status", tuple(_count(w.status for w in self.writes).items()))
        if self.changes_total is None:
            fill(self, "changes_total", len(self.changes))
        if self.changes_by_status is None:
            fill(self, "changes_by_status", tuple(_count(c.status for c in self.changes).items()))
        if self.changed_bytes is None:
            fill(self, "changed_bytes", sum(c.length for c in self.changes))

    @property
    def n_writes(self) -> int:
        return len(self.writes) if self.writes_total is None else self.writes_total

    @property
    def n_changes(self) -> int:
        return len(self.changes) if self.changes_total is None else self.changes_total

    @property
    def n_changed_bytes(self) -> int:
        if self.changed_bytes is None:
            return sum(c.length for c in self.changes)
        return self.changed_bytes

    def write_counts(self) -> dict[str, int]:
        if self.writes_by_status is not None:
            return dict(self.writes_by_status)
        return _count(w.status for w in self.writes)

    def change_counts(self) -> dict[str, int]:
        if self.changes_by_status is not None:
            return dict(self.changes_by_status)
        return _count(c.status for c in self.changes)

    @property
    def failed(self) -> bool:
        return bool(self.write_counts().get(FORBIDDEN) or self.change_counts().get(FORBIDDEN))

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
            "element": self.element,
            "item_size": self.item_size,
            "writes_total": self.n_writes,
            "writes_by_status": self.write_counts(),
            "writes": [w.to_dict() for w in self.writes],
            "changes_total": self.n_changes,
            "changes_by_status": self.change_counts(),
            "changed_bytes": self.n_changed_bytes,
            "changes": [c.to_dict() for c in self.changes],
            "blocks_total": self.blocks_total,
            "blocks": [_block_dict(b) for b in self.blocks],
            "overflowed": self.overflowed,
            "stopped": self.stopped,
            "coverage": self.coverage,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        def counts(key: str) -> tuple[tuple[str, int], ...] | None:
            value = data.get(key)
            return None if value is None else tuple(value.items())

        return cls(
            nodeid=data["nodeid"],
            phase=data["phase"],
            buffer=data["buffer"],
            size=data["size"],
            origin=data["origin"],
            readonly=data["readonly"],
            allow=tuple((int(a), int(b)) for a, b in data.get("allow", ())),
            writes=tuple(WriteInfo.from_dict(w) for w in data["writes"]),
            changes=tuple(ChangeInfo.from_dict(c) for c in data["changes"]),
            overflowed=data.get("overflowed", 0),
            stopped=data.get("stopped"),
            writes_total=data.get("writes_total"),
            writes_by_status=counts("writes_by_status"),
            changes_total=data.get("changes_total"),
            changes_by_status=counts("changes_by_status"),
            changed_bytes=data.get("changed_bytes"),
            blocks=tuple(Block(**b) for b in data.get("blocks", ())),
            blocks_total=data.get("blocks_total", 0),
            element=data.get("element"),
            item_size=data.get("item_size", 1),
            coverage=data.get("coverage"),
        )


def _text(value: Any) -> str | None:
    """An engine's kind/note as a str (an enum's name, say), or None."""
    if value is None:
        return None
    text = str(getattr(value, "name", value))
    return None if text.lower() in PLAIN_KINDS else text


def _count(statuses: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in statuses:
        out[s] = out.get(s, 0) + 1
    return out


__all__ = ["DETAIL", "MAX_BLOCKS", "ChangeInfo", "Finding", "WriteInfo"]
