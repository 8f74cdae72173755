"""The collect path at memory speed (issue 11, target 1).

``.writes`` and ``.changes()`` are lazy, list-like sequences over the C
core's packed results (``kernel.recordseq.Records`` / ``Changes``); the C run
finder (``_uffd.changed_runs``) and page scan (``_uffd.page_firsts``) are
checked here against a byte-by-byte Python reference, at the edges (byte 0,
the last byte, runs spanning pages, the whole buffer, huge-page units), and
against memory that was never touched, which they take as zeros without
faulting it in.
"""

from __future__ import annotations

import mmap
import pickle
import random
import struct

import pytest

from pytest_uffd_guard import GuardedBuffer, _uffd
from pytest_uffd_guard.engines import pagediff
from pytest_uffd_guard.kernel.memory import address_of, anonymous_map
from pytest_uffd_guard.kernel.records import Change, WriteRecord
from pytest_uffd_guard.kernel.recordseq import Changes, PageChunk, RecordLog, Records

from .conftest import bound
from .test_memory_kinds import huge_pages  # noqa: F401  (a fixture)

P = mmap.PAGESIZE
ALL = pagediff.ALL


def reference_runs(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Maximal runs of differing bytes, one byte at a time."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(a)
    while i < n:
        if a[i] == b[i]:
            i += 1
            continue
        j = i
        while j < n and a[j] != b[j]:
            j += 1
        runs.append((i, j - i))
        i = j
    return runs


def unpack(packed: bytes, width: int) -> list[tuple[int, ...]]:
    return list(struct.iter_unpack(f"={width}Q", packed))


def present(address: int, pages: int) -> list[bool]:
    """Whether each page is present or swapped (``/proc/self/pagemap``)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // P * 8)
        data = f.read(8 * pages)
    return [e >> 62 != 0 for e in struct.unpack(f"={pages}Q", data)]


class Pair:
    """A live memory and its snapshot, both private anonymous mappings."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.live = anonymous_map(size)
        self.snap = anonymous_map(size)
        self.a, self.b = address_of(self.live), address_of(self.snap)

    def runs(
        self, preview: int = ALL, whole: int = ALL, anon: bool = True
    ) -> list[tuple[int, ...]]:
        packed, before, after = _uffd.changed_runs(
            self.a, self.b, self.size, preview, whole, int(anon)
        )
        runs = unpack(packed, 3)
        for k, (offset, _, at) in enumerate(runs):
            end = runs[k + 1][2] if k + 1 < len(runs) else len(after)
            assert before[at:end] == self.snap[offset : offset + end - at]
            assert after[at:end] == self.live[offset : offset + end - at]
        return runs

    def firsts(self, unit: int, only_changed: bool, anon: bool = True) -> list[int]:
        reported = bytearray(-(-self.size // unit))
        ranges = struct.pack("=QQ", 0, self.size)
        out = _uffd.page_firsts(
            self.a, self.b, ranges, unit, reported, int(only_changed), int(anon)
        )
        return [o for (o,) in unpack(out, 1)]

    def expected_firsts(self, unit: int) -> list[int]:
        found: dict[int, int] = {}
        for offset, length in reference_runs(bytes(self.live), bytes(self.snap)):
            page = offset - offset % unit
            while page < offset + length:
                found.setdefault(page, max(offset, page))
                page += unit
        return sorted(found.values())


# ------------------------------------------------------------ the run finder


EDGES = {
    "byte 0": [(0, 1)],
    "last byte": [(-1, 1)],
    "spanning pages": [(P - 3, 7), (3 * P - 1, P + 2)],
    "last byte of every page": [(p * P + P - 1, 1) for p in range(20)],
    "whole buffer": [(0, None)],
}


@pytest.mark.parametrize("anon", [True, False], ids=["anonymous", "read-all"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_changed_runs_edges(edge: str, anon: bool) -> None:
    """issue 11 target 1: the C run finder's runs and bytes are the byte
    reference's, at byte 0, the last byte, across pages and for the whole
    buffer (64 KiB and more: the pagemap path; with the live memory read
    or taken as zeros where untouched)."""
    pair = Pair(20 * P)
    for start, length in EDGES[edge]:
        start %= pair.size
        end = pair.size if length is None else start + length
        pair.live[start:end] = b"\x5a" * (end - start)
    expected = reference_runs(bytes(pair.live), bytes(pair.snap))
    assert [(o, n) for o, n, _ in pair.runs(anon=anon)] == expected
    if edge == "whole buffer":
        assert expected == [(0, pair.size)]


def test_changed_runs_preview_and_cap() -> None:
    """``preview`` bytes of each run only when the runs add up to more than
    ``whole_up_to`` (the close-time rule, KEEP_AT_CLOSE)."""
    pair = Pair(20 * P)
    pair.live[10:110] = b"\x01" * 100
    pair.live[5 * P : 5 * P + 50] = b"\x02" * 50
    whole = pair.runs(preview=8, whole=150)
    assert [(o, n, at) for o, n, at in whole] == [(10, 100, 0), (5 * P, 50, 100)]
    capped = pair.runs(preview=8, whole=149)
    assert [(o, n, at) for o, n, at in capped] == [(10, 100, 0), (5 * P, 50, 8)]
    lazy = Changes(*_uffd.changed_runs(pair.a, pair.b, pair.size, 8, 149))
    assert lazy[1] == Change(5 * P, 50, b"\0" * 8, b"\x02" * 8)
    assert lazy[1].truncated


def test_changed_runs_random_against_reference() -> None:
    """Random changes, sizes and snapshot contents agree with the reference
    (snapshot pages with data, untouched ones, and live pages set back)."""
    rng = random.Random(11)
    for _ in range(40):
        pair = Pair(rng.randint(1, 40) * P)
        for page in rng.sample(range(pair.size // P), k=pair.size // P // 2):
            pair.snap[page * P + rng.randrange(P)] = rng.randrange(1, 256)
            pair.live[page * P : page * P + P] = pair.snap[page * P : page * P + P]
        for _ in range(rng.randrange(30)):
            i = rng.randrange(pair.size)
            j = min(pair.size, i + rng.choice([1, 2, 9, P, 3 * P]))
            pair.live[i:j] = bytes(rng.randrange(256) for _ in range(j - i))
        expected = reference_runs(bytes(pair.live), bytes(pair.snap))
        assert [(o, n) for o, n, _ in pair.runs()] == expected
        assert pagediff.diff_runs(pair.a, pair.b, pair.size) == expected


def test_runs_where_the_live_page_was_discarded() -> None:
    """A snapshot page with data against a live page dropped by
    MADV_DONTNEED (absent: it reads as zeros) is a change, not skipped."""
    pair = Pair(32 * P)
    pair.snap[3 * P : 5 * P] = b"\x07" * (2 * P)
    pair.live[3 * P : 5 * P] = b"\x07" * (2 * P)
    assert pair.runs() == []
    pair.live.madvise(mmap.MADV_DONTNEED, 3 * P, 2 * P)
    assert [(o, n) for o, n, _ in pair.runs()] == [(3 * P, 2 * P)]
    pair.live[4 * P : 5 * P] = b"\x07" * P
    assert [(o, n) for o, n, _ in pair.runs()] == [(3 * P, P)]


def test_collect_does_not_fault_in_untouched_pages() -> None:
    """issue 11 target 1: ``.writes`` and ``.changes()`` of an anonymous
    buffer with one written page read neither its never-touched pages nor
    those of its snapshot (each read would fault in a page: ~3 us on the
    VMs measured, several times the compare)."""
    pages = 64
    with GuardedBuffer(pages * P, engine="diff", stacks=0) as buf:
        buf[5 * P + 9] = 1
        assert [w.offset for w in buf.writes] == [5 * P + 9]
        assert [(c.offset, c.length) for c in buf.changes()] == [(5 * P + 9, 1)]
        assert buf._changed_runs() == [(5 * P + 9, 1)]
        live = present(buf.address, pages)
        snap = present(buf._snapshot_address, pages)
    assert [k for k, p in enumerate(live) if p] == [5]
    assert not any(snap)


# ------------------------------------------------------------ the page scan


@pytest.mark.parametrize("unit_pages", [1, 4], ids=["4 KiB", "16 KiB units"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_page_firsts_edges(edge: str, unit_pages: int) -> None:
    """issue 11 target 1: the first changed byte of every changed unit, as
    the byte reference finds it, for base pages and bigger units."""
    unit = unit_pages * P
    pair = Pair(20 * P)
    for start, length in EDGES[edge]:
        start %= pair.size
        end = pair.size if length is None else start + length
        pair.live[start:end] = b"\x5a" * (end - start)
    assert pair.firsts(unit, only_changed=True) == pair.expected_firsts(unit)
    assert pair.firsts(unit, only_changed=True, anon=False) == pair.expected_firsts(unit)


def test_page_firsts_marks_and_unchanged_units() -> None:
    """Units already marked are skipped and new ones marked; a unit without
    a change gives its own offset unless only_changed."""
    pair = Pair(16 * P)
    pair.live[2 * P + 100] = 1
    pair.live[7 * P] = 1
    reported = bytearray(16)
    reported[7] = 1
    ranges = struct.pack("=4Q", 0, 4 * P, 6 * P, 9 * P)
    out = _uffd.page_firsts(pair.a, pair.b, ranges, P, reported, 0)
    assert [o for (o,) in unpack(out, 1)] == [0, P, 2 * P + 100, 3 * P, 6 * P, 8 * P]
    assert [k for k, r in enumerate(reported) if r] == [0, 1, 2, 3, 6, 7, 8]
    assert _uffd.page_firsts(pair.a, pair.b, ranges, P, reported, 0) == b""
    with pytest.raises(ValueError):
        _uffd.page_firsts(pair.a, pair.b, struct.pack("=2Q", 1, P), P, bytearray(16), 0)
    with pytest.raises(ValueError):
        _uffd.page_firsts(pair.a, pair.b, struct.pack("=2Q", 0, 17 * P), P, bytearray(16), 0)


def test_page_firsts_python_fallback_agrees() -> None:
    """The pure-Python path (no C core) gives the same packed offsets."""
    pair = Pair(24 * P)
    rng = random.Random(3)
    for _ in range(40):
        pair.live[rng.randrange(pair.size)] = rng.randrange(1, 256)
    ranges = [(0, 8 * P), (10 * P, 24 * P)]
    for only in (True, False):
        flat = [x for r in ranges for x in r]
        python = pagediff._page_firsts_py(pair.a, pair.b, flat, P, bytearray(24), only)
        c = pagediff.page_firsts(pair.a, pair.b, ranges, P, bytearray(24), only_changed=only)
        assert python == c


@pytest.mark.timeout(bound(60))
def test_hugetlb_units_collect(huge_pages: int) -> None:  # noqa: F811
    """issue 11 target 1, huge-page units: one record per changed huge
    page, on its first changed byte, and the exact runs."""
    hpage = huge_pages
    with GuardedBuffer(2 * hpage, backing="hugetlb", engine="diff", stacks=0) as buf:
        buf[hpage - 1] = 1
        buf[hpage] = 2
        buf[2 * hpage - 1] = 3
        assert [w.offset for w in buf.writes] == [hpage - 1, hpage]
        assert [(c.offset, c.length) for c in buf.changes()] == [(hpage - 1, 2), (2 * hpage - 1, 1)]


# ------------------------------------------------------- the lazy sequences


def _records(n: int) -> Records:
    log = RecordLog()
    log.add(PageChunk(struct.pack(f"={n}Q", *range(0, n * P, P)), 100, 1.5))
    log.append(WriteRecord(offset=7, exact=True, thread_id=1, thread_name="t", time=2.0, seq=9))
    return log.view()


def test_records_behave_like_a_list() -> None:
    """issue 11: ``.writes`` is an immutable list: index, slice (a list),
    iterate, len, ==, repr, pickle (as a list), + with lists."""
    records = _records(5)
    made = list(records)
    assert len(records) == 6
    assert records == made and made == records
    assert not (records != made)  # noqa: SIM202  (__ne__ too)
    assert records[0] == WriteRecord(
        offset=0, exact=False, thread_id=None, thread_name=None, time=1.5, seq=100
    )
    assert records[4].offset == 4 * P and records[4].seq == 104
    assert records[-1].offset == 7 and records[-6] == made[0]
    assert records[1:3] == made[1:3] and isinstance(records[1:3], list)
    assert records[::-2] == made[::-2]
    with pytest.raises(IndexError):
        records[6]
    with pytest.raises(IndexError):
        records[-7]
    assert records[2] is records[2]
    assert made[3] in records and records.index(made[3]) == 3
    assert repr(records) == repr(made)
    assert pickle.loads(pickle.dumps(records)) == made
    assert records + made == made + made == made + records
    assert records != made[:-1] and records != tuple(made)
    with pytest.raises(TypeError):
        hash(records)
    assert not hasattr(records, "append")
    assert records.head(2) == made[:2]
    assert list(records.offsets()) == [w.offset for w in made]


def test_writes_are_made_on_access() -> None:
    """``len(buf.writes)`` makes no WriteRecord; a later drain does not
    change a sequence already handed out."""
    with GuardedBuffer(64 * P, engine="diff", stacks=0) as buf:
        for page in range(0, 64, 2):
            buf[page * P + P - 1] = 1
        writes = buf.writes
        assert len(writes) == 32
        ((chunk, _),) = writes._parts
        assert chunk._made is None
        assert writes[31].offset == 62 * P + P - 1
        buf[P] = 1
        assert len(writes) == 32 and len(buf.writes) == 33
        assert [w.offset for w in writes] == [p * P + P - 1 for p in range(0, 64, 2)]


def test_changes_behave_like_a_list() -> None:
    """issue 11: ``.changes()`` is an immutable list of Change, made on
    access, equal to the Change objects the runs stand for."""
    with GuardedBuffer(20 * P, engine="diff", stacks=0) as buf:
        buf[0] = 1
        buf[P - 1 : P + 1] = b"\x02\x03"
        buf[20 * P - 1] = 4
        changes = buf.changes()
        expected = [
            Change(0, 1, b"\0", b"\x01"),
            Change(P - 1, 2, b"\0\0", b"\x02\x03"),
            Change(20 * P - 1, 1, b"\0", b"\x04"),
        ]
        assert isinstance(changes, Changes)
        assert changes == expected and expected == changes
        assert changes[1:] == expected[1:] and changes[-1] == expected[-1]
        assert repr(changes) == repr(expected)
        assert pickle.loads(pickle.dumps(changes)) == expected
        assert changes.runs() == [(0, 1), (P - 1, 2), (20 * P - 1, 1)]
        assert buf.changes(preview=1)[1] == Change(P - 1, 2, b"\0", b"\x02")
    assert buf.changes() == expected


@pytest.mark.parametrize("engine", ["sync", "async", "hybrid"])
def test_uffd_engines_collect_lazily(uffd: None, engine: str) -> None:
    """The uffd engines' records, kept packed, equal the records made one
    by one: offsets, kinds, seq order; the same after close."""
    from pytest_uffd_guard.kernel.asyncfd import async_unavailable
    from pytest_uffd_guard.kernel.capabilities import capabilities

    if engine != "sync" and async_unavailable(capabilities()):
        pytest.skip(f"{engine}: {async_unavailable(capabilities())}")
    buf = GuardedBuffer(32 * P, engine=engine, stacks=0)
    for page in (3, 1, 30):
        buf[page * P + 5] = 1
    writes = buf.writes
    assert sorted(w.offset - w.offset % P for w in writes) == [P, 3 * P, 30 * P]
    assert list(writes) == [writes[i] for i in range(len(writes))]
    assert len({w.seq for w in writes}) == 3
    buf.close()
    assert buf.writes == list(writes)
    assert [(c.offset, c.length) for c in buf.changes()] == [
        (P + 5, 1),
        (3 * P + 5, 1),
        (30 * P + 5, 1),
    ]


def test_pure_python_changes_agree() -> None:
    """Without the C core, changes() gives equal Change objects."""
    pair = Pair(8 * P)
    pair.live[3] = 1
    pair.live[5 * P - 2 : 5 * P + 2] = b"\x01\x02\x03\x04"
    c = pagediff.changes(pair.a, pair.b, pair.size, None)
    python = pagediff._changes_py(pair.a, pair.b, pair.size, ALL, ALL)
    assert c == list(python) and c.runs() == python.runs()


def test_sync_records_mix_captured_and_packed(uffd: None) -> None:
    """Sync records whose writer was captured (the first ``stacks``) are
    made at drain, the rest kept packed; the order, the offsets read from
    the packed form and the records agree."""
    with GuardedBuffer(16 * P, engine="sync", stacks=3) as buf:
        for page in (5, 2, 9, 1, 0):
            buf[page * P + 3] = 1
        writes = buf.writes
        offsets = [w.offset - w.offset % P for w in writes]
        assert offsets == [5 * P, 2 * P, 9 * P, P, 0]
        assert [o - o % P for o in writes.offsets()] == offsets
