"""Lazy sequences of records and changes (issue 11): ``.writes`` and
``.changes()`` kept packed as the C core returns them, made into
``WriteRecord`` / ``Change`` objects only when looked at."""

from __future__ import annotations

import bisect
import operator
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, TypeVar, overload

from .records import _HEAD_FIELDS, RECORD_FORMAT, RECORD_SIZE, Change, RawFault, WriteRecord

# ---------------------------------------------------------------------------
# Lazy sequences (issue 11): ``.writes`` and ``.changes()`` of a big buffer
# hold hundreds of thousands of items, and a frozen dataclass costs about a
# microsecond to make.  They are kept packed as the C core returns them and
# made into WriteRecord / Change objects only when looked at (each once).


_T = TypeVar("_T")


class _Made(Generic[_T]):
    """Items made on first access (``_make``) and kept."""

    __slots__ = ("_made",)

    _made: list[_T | None] | None

    def _make(self, index: int) -> _T:
        raise NotImplementedError

    def _once(self, index: int, count: int) -> _T:
        made = self._made
        if made is None:
            made = self._made = [None] * count
        item = made[index]
        if item is None:
            item = made[index] = self._make(index)
        return item


class _Chunk(_Made[WriteRecord]):
    """Records of one drain, made on first access and kept."""

    __slots__ = ("count",)

    count: int

    def get(self, index: int) -> WriteRecord:
        return self._once(index, self.count)

    def offsets(self, n: int) -> list[int]:
        """The offsets of the first ``n`` records."""
        return [self.get(i).offset for i in range(n)]


class _ListChunk(_Chunk):
    """Records made already (appended one by one)."""

    __slots__ = ("items",)

    def __init__(self, items: list[WriteRecord]) -> None:
        self.items = items
        self._made = None
        self.count = len(items)

    def get(self, index: int) -> WriteRecord:
        return self.items[index]


class PageChunk(_Chunk):
    """Records found after the fact (async, diff): one per page, no thread,
    not exact; ``offsets`` packed as native uint64 (the C core's
    ``page_firsts``), sequence numbers ``first_seq`` on."""

    __slots__ = ("_first_seq", "_offsets", "_time")

    def __init__(self, offsets: bytes, first_seq: int, time: float) -> None:
        self._offsets = memoryview(offsets).cast("B").cast("Q")
        self._first_seq = first_seq
        self._time = time
        self._made = None
        self.count = len(self._offsets)

    def offset(self, index: int) -> int:
        return int(self._offsets[index])

    def offsets(self, n: int) -> list[int]:
        return list(self._offsets[:n].tolist())

    def _make(self, index: int) -> WriteRecord:
        return WriteRecord(
            offset=int(self._offsets[index]),
            exact=False,
            thread_id=None,
            thread_name=None,
            time=self._time,
            seq=self._first_seq + index,
        )


class RawChunk(_Chunk):
    """Records of the sync engine as the C core packed them
    (``RECORD_FORMAT``), made by ``build`` (the tracker's, pure: it reads
    nothing that may change later) from each RawFault."""

    __slots__ = ("_base", "_blob", "_build")

    def __init__(self, blob: bytes, build: Callable[[RawFault], WriteRecord], base: int) -> None:
        self._blob = blob
        self._build = build
        #: The buffer's address: a record's offset is its address - base.
        self._base = base
        self._made = None
        self.count = len(blob) // RECORD_SIZE

    def offsets(self, n: int) -> list[int]:
        base = self._base
        if sys.byteorder == "little":  # the address leads each record ("<Q")
            words = memoryview(self._blob).cast("B").cast("Q")
            return [a - base for a in words[0 : n * RECORD_SIZE // 8 : RECORD_SIZE // 8].tolist()]
        return [_ADDRESS.unpack_from(self._blob, i * RECORD_SIZE)[0] - base for i in range(n)]

    def _make(self, index: int) -> WriteRecord:
        return self._build(raw_fault(self._blob, index))


_ADDRESS = struct.Struct("<Q")
_RECORD = struct.Struct(RECORD_FORMAT)


def raw_fault(blob: bytes, index: int) -> RawFault:
    """Record ``index`` of the C core's packed records."""
    fields = _RECORD.unpack_from(blob, index * RECORD_SIZE)
    head = dict(zip(_HEAD_FIELDS, fields))
    comm = fields[8].split(b"\0", 1)[0].decode("utf-8", "replace")
    return RawFault(**head, comm=comm, kind=fields[9], length=fields[11])


_Part = tuple[_Chunk, int]


class _ListLike(Sequence[_T]):
    """An immutable list of items made on demand (``_item``): indexing,
    slicing (a slice is a ``list``), iterating, ``len()`` (O(1)), ``==``
    with a list or another such sequence, ``repr``, ``+`` with a list and
    pickling (as a ``list``) behave like the list of the same items."""

    __slots__ = ()

    _len: int

    def _item(self, i: int) -> _T:
        raise NotImplementedError

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> list[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | list[_T]:
        if isinstance(index, slice):
            return [self._item(i) for i in range(*index.indices(self._len))]
        i = operator.index(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("list index out of range")
        return self._item(i)

    def __iter__(self) -> Iterator[_T]:
        item = self._item
        for i in range(self._len):
            yield item(i)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (_ListLike, list)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # a list is not hashable

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self) -> tuple[type[list[_T]], tuple[list[_T]]]:
        return list, (list(self),)

    def __add__(self, other: object) -> list[_T]:
        if not isinstance(other, (_ListLike, list)):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: object) -> list[_T]:
        if not isinstance(other, list):
            return NotImplemented
        return [*other, *self]


class Records(_ListLike[WriteRecord]):
    """The records of a buffer, oldest first: an immutable list
    (``_ListLike``); each WriteRecord is made when first looked at, then
    kept."""

    __slots__ = ("_len", "_parts", "_starts")

    def __init__(self, parts: Iterable[_Part] = ()) -> None:
        self._parts = tuple(p for p in parts if p[1] > 0)
        starts, total = [], 0
        for _, n in self._parts:
            starts.append(total)
            total += n
        self._starts = starts
        self._len = total

    def _item(self, i: int) -> WriteRecord:
        k = bisect.bisect_right(self._starts, i) - 1
        return self._parts[k][0].get(i - self._starts[k])

    def __iter__(self) -> Iterator[WriteRecord]:
        for chunk, n in self._parts:
            get = chunk.get
            for i in range(n):
                yield get(i)

    def head(self, n: int) -> Records:
        """The first ``n`` records."""
        parts: list[_Part] = []
        for chunk, count in self._parts:
            if n <= 0:
                break
            parts.append((chunk, min(count, n)))
            n -= count
        return Records(parts)

    def offsets(self) -> Iterator[int]:
        """Each record's offset, read from the packed records (async,
        diff, sync) without making them."""
        for chunk, n in self._parts:
            yield from chunk.offsets(n)


class RecordLog:
    """Records being collected (an outbox, a buffer's log): chunks appended,
    :meth:`view` an immutable :class:`Records` of what is there now.

    Not locked itself: its owner holds its lock around every use.
    """

    __slots__ = ("_len", "_parts")

    def __init__(self) -> None:
        self._parts: list[_Part] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, record: WriteRecord) -> None:
        if self._parts:
            chunk, n = self._parts[-1]
            if isinstance(chunk, _ListChunk) and n == len(chunk.items):
                chunk.items.append(record)
                chunk.count += 1
                self._parts[-1] = (chunk, n + 1)
                self._len += 1
                return
        self.add(_ListChunk([record]))

    def add(self, chunk: _Chunk) -> None:
        if chunk.count:
            self._parts.append((chunk, chunk.count))
            self._len += chunk.count

    def extend(self, records: Records | Iterable[WriteRecord]) -> None:
        if isinstance(records, Records):
            self._parts.extend(records._parts)
            self._len += len(records)
            return
        for record in records:
            self.append(record)

    def view(self) -> Records:
        return Records(self._parts)


class Changes(_ListLike[Change], _Made[Change]):
    """The changed runs of a buffer, in offset order: an immutable list.

    Kept as the C core's ``changed_runs`` returns them (three native uint64
    per run: offset, length, where its bytes start in ``before`` and
    ``after``); each Change is made when first looked at and then kept.
    An immutable list (``_ListLike``).
    """

    __slots__ = ("_after", "_before", "_len", "_runs")

    def __init__(self, runs: bytes = b"", before: bytes = b"", after: bytes = b"") -> None:
        self._runs = memoryview(runs).cast("B").cast("Q")
        self._before = before
        self._after = after
        self._len = len(self._runs) // 3
        self._made = None

    @classmethod
    def of(cls, changes: Iterable[Change]) -> Changes:
        """Changes holding made Change objects (the pure-Python paths)."""
        made = list(changes)
        self = cls()
        self._len = len(made)
        self._made = list(made)
        return self

    def _make(self, i: int) -> Change:
        runs = self._runs
        offset, length, start = runs[3 * i], runs[3 * i + 1], runs[3 * i + 2]
        end = runs[3 * i + 5] if i + 1 < self._len else len(self._after)
        return Change(int(offset), int(length), self._before[start:end], self._after[start:end])

    def _item(self, i: int) -> Change:
        return self._once(i, self._len)

    def runs(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of each run, no bytes made."""
        runs = self._runs
        if self._made is not None and not len(runs):
            return [(c.offset, c.length) for c in self._made if c is not None]
        return [(int(runs[3 * i]), int(runs[3 * i + 1])) for i in range(self._len)]
