"""watch(obj): memory the program allocated, guarded in place (issue 14 items 1 and 5).

Against the real kernel: the whole pages inside a buffer are write-protected
over the object's own address, the partial edge pages compared byte by byte;
the watch changes nothing in the memory and leaves no registration, fd or
mapping behind.  Scenarios that change process-wide state (fork, simulated
kernels, seccomp, another user) run in a fresh interpreter.
"""

from __future__ import annotations

import array
import ctypes
import gc
import hashlib
import mmap
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pytest_uffd_guard import (
    GuardedBuffer,
    InvalidBufferError,
    Watch,
    capabilities,
    watch,
)
from pytest_uffd_guard import _uffd as core
from pytest_uffd_guard.borrowed import memory_kind
from pytest_uffd_guard.inplace import COMPARED_NOTE

from .conftest import ROOT, bound, expected_write, run_python
from .hostile.test_unprivileged import Nobody, nobody  # noqa: F401  (a fixture)
from .test_doctor import seccomp_deny  # noqa: F401  (a fixture)

P = mmap.PAGESIZE

pytestmark = [pytest.mark.usefixtures("uffd"), pytest.mark.timeout(bound(60))]


def engine_named() -> str:
    """An engine that names writers here: where the userfaultfd is user-mode
    only, auto runs async or diff, so the writer tests ask for sync."""
    return "sync" if capabilities().user_mode_only else "auto"


def aligned(size: int, offset: int = 0) -> tuple[mmap.mmap, memoryview]:
    """``size`` bytes at ``offset`` bytes past a page boundary, in private
    anonymous memory the test owns."""
    region = mmap.mmap(-1, size + offset + P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, memoryview(region)[offset : offset + size]


def spans(w: Watch) -> list[tuple[int, int, str]]:
    return [(s.offset, s.length, s.how) for s in w.coverage.spans]


def guards() -> int:
    """The handler's live guards, once buffers an earlier test dropped are
    collected (their finalizers would otherwise move the count mid-test)."""
    gc.collect()
    return int(core.handler_state()["guards"])


def maps_of(buffer: mmap.mmap) -> tuple[int, list[str]]:
    """How many mappings this process has, and the /proc/self/maps lines of
    those that hold ``buffer`` (other mappings come and go with Python's
    allocator: only a leak makes the count grow by thousands).

    Adjacent lines that differ only in where one ends and the next starts
    are joined: after unregistering, the kernel merges the range's VMAs
    back when it can, but under load it sometimes leaves one split (same
    permissions, same memory: seen 1 in 8 runs at load 4)."""
    start = id_address(buffer)
    end = start + len(buffer)
    with open("/proc/self/maps") as f:
        lines = f.read().splitlines()
    spans: list[list[object]] = []
    for line in lines:
        bounds, rest = line.split(" ", 1)
        low, high = (int(x, 16) for x in bounds.split("-"))
        if low < end and start < high:
            if spans and spans[-1][1] == low and spans[-1][2] == rest:
                spans[-1][1] = high
            else:
                spans.append([low, high, rest])
    return len(lines), [f"{low:x}-{high:x} {rest}" for low, high, rest in spans]


def vm_flags(address: int) -> str:
    """The VmFlags of the mapping holding ``address`` (smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and line[0] in "0123456789abcdef":
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"{address:#x} is not mapped")


# ------------------------------------------------------------ coverage


def test_odd_offset_view_edges_compared_pages_protected() -> None:
    """Item 5: a view at an odd offset into a larger buffer (still contiguous):
    the whole pages inside are protected and name the writer, the partial
    first and last pages are compared; offsets count from the view."""
    _region, view = aligned(5 * P + 100, offset=3)
    with watch(view, name="view", engine=engine_named()) as w:
        assert spans(w) == [
            (0, P - 3, "compared"),
            (P - 3, 4 * P, "protected"),
            (5 * P - 3, 103, "compared"),
        ]
        view[P + 10] = 1  # protected: named
        view[1] = 2  # first partial page: compared
        view[-1] = 3  # last partial page: compared
    assert w.engine == "sync" and not w.running
    by_offset = {r.offset: r for r in w.writes}
    offset, exact = expected_write(P + 10 + 3)
    named = by_offset[offset - 3]
    assert named.exact is exact and named.thread_name == "MainThread"
    assert by_offset[1].thread_id is None and by_offset[1].stack_note == COMPARED_NOTE
    assert by_offset[5 * P + 99].exact is False
    assert [(c.offset, c.after) for c in w.changes()] == [
        (1, b"\x02"),
        (P + 10, b"\x01"),
        (5 * P + 99, b"\x03"),
    ]


def test_numpy_views_odd_offsets_and_strides() -> None:
    """Item 5: numpy views at odd byte offsets, 2-D row slices and dtype
    reinterpretations of one array; writes land at the view's offsets."""
    np = pytest.importorskip("numpy")
    base = np.zeros(64 * P + 7, dtype=np.uint8)
    views = [
        base[5 : 5 + 8 * P],
        base[1:].view(np.uint8)[P + 1 : 20 * P],
        base[: 48 * P].reshape(48, P)[3:9],  # rows of a 2-D array: contiguous
        base[8 : 8 + 16 * P].view(np.float64),
    ]
    for i, v in enumerate(views):
        assert v.flags.c_contiguous
        with watch(v, name=f"v{i}", engine=engine_named()) as w:
            flat = v.reshape(-1).view(np.uint8)
            flat[3 * P + 1] = 9
        assert [c.offset for c in w.changes()] == [3 * P + 1], (i, w.changes())
        # The byte, or (Linux < 5.18, no EXACT_ADDRESS) the start of its page.
        assert any(0 <= 3 * P + 1 - r.offset < P for r in w.writes), w.writes
        assert w.coverage.protected >= 4 * P and w.coverage.size == v.nbytes
        flat[3 * P + 1] = 0


def test_sub_page_array_is_compared() -> None:
    """Item 5: a buffer smaller than a page: all compared, changes exact."""
    np = pytest.importorskip("numpy")
    small = np.arange(100, dtype=np.uint8)
    with watch(small) as w:
        small[42] = 0
    assert w.engine == "diff" and spans(w) == [(0, 100, "compared")]
    assert [(c.offset, c.before, c.after) for c in w.changes()] == [(42, b"*", b"\x00")]
    [record] = w.writes
    assert record.offset == 42 and record.exact is False and record.thread_id is None


@pytest.mark.timeout(bound(120))
def test_64_mib_array_contents_unchanged() -> None:
    """Item 5: a 64 MiB array (partly never touched): a few writes recorded,
    every other byte as it was (a hash of the memory before and after)."""
    np = pytest.importorskip("numpy")
    big = np.zeros(64 << 20, dtype=np.uint8)
    big[: 32 << 20] = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8).repeat(32)
    before = hashlib.sha256(big).hexdigest()
    with watch(big, name="big", engine=engine_named()) as w:
        assert hashlib.sha256(big).hexdigest() == before  # start changed nothing
        untouched = (48 << 20) + 17  # in the half never written
        big[untouched] = 1
        big[5 << 20] ^= 0xFF
    assert w.coverage.protected >= (64 << 20) - 2 * P
    assert {untouched, 5 << 20} <= {c.offset for c in w.changes()}
    for offset in (untouched, 5 << 20):  # the byte, or its page's start (Linux < 5.18)
        assert any(0 <= offset - r.offset < P for r in w.writes), (offset, w.writes)
    big[untouched] = 0
    big[5 << 20] ^= 0xFF
    assert hashlib.sha256(big).hexdigest() == before


def test_untouched_pages_are_protected() -> None:
    """Before Linux 6.4 (no WP_UNPOPULATED) write-protecting a never-touched
    page does nothing: the watch must make the first write there seen, and
    leave the page reading zeros."""
    region, view = aligned(8 * P)
    with watch(view, engine=engine_named()) as w:
        assert bytes(view[5 * P : 5 * P + 8]) == bytes(8)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(region)) + 6 * P + 5, 1, 1)
    assert [r.offset for r in w.writes] == [expected_write(6 * P + 5)[0]]
    assert bytes(view[: 6 * P + 5]) == bytes(6 * P + 5)


def test_untouched_pages_without_wp_unpopulated() -> None:
    """The same with WP_UNPOPULATED hidden (the 6.1 behaviour here):
    pages are faulted in without changing them, and coverage says so."""
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import watch, capabilities
        P = mmap.PAGESIZE
        m = mmap.mmap(-1, 16 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        engine = "sync" if capabilities().user_mode_only else "auto"
        with watch(m, engine=engine) as w:
            m[9 * P + 1] = 5
        assert [r.page_offset for r in w.writes] == [9 * P], w.writes
        assert m[: 9 * P + 1] == bytes(9 * P + 1) and m[9 * P + 2 :] == bytes(7 * P - 2)
        assert any("WP_UNPOPULATED" in note for note in w.coverage.notes), w.coverage
        print("ok")
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_unpopulated"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------- writers


def test_write_by_a_thread_names_it() -> None:
    """Item 5: a write by another thread is recorded with that thread."""
    _region, view = aligned(4 * P)
    with watch(view, engine=engine_named()) as w:
        t = threading.Thread(target=view.__setitem__, args=(2 * P + 9, 1), name="filler")
        t.start()
        t.join(bound(10))
    [record] = w.writes
    assert record.thread_name == "filler"
    assert record.offset == expected_write(2 * P + 9)[0]


def test_write_by_ctypes_memmove() -> None:
    """Item 5: ctypes.memmove into the watched memory."""
    region, view = aligned(4 * P)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    with watch(view, engine=engine_named()) as w:
        ctypes.memmove(address + P + 100, b"abc", 3)
    [record] = w.writes
    assert P <= record.offset < P + 103 and record.thread_name == "MainThread"
    assert [(c.offset, c.after) for c in w.changes()] == [(P + 100, b"abc")]


def test_write_by_readinto(tmp_path: Path) -> None:
    """Item 5: readinto (the kernel writes inside read(2)): recorded, every
    byte arrives; named as read(2) where the engine sees kernel faults."""
    src = tmp_path / "src.bin"
    src.write_bytes(b"0123456789")
    _region, view = aligned(3 * P)
    with watch(view) as w, open(src, "rb", buffering=0) as f:
        assert f.readinto(view[P + 5 : P + 15]) == 10
    assert bytes(view[P + 5 : P + 15]) == b"0123456789"
    assert [(c.offset, c.after) for c in w.changes()] == [(P + 5, b"0123456789")]
    [record] = w.writes
    if w.engine == "sync":
        assert record.syscall == "read" and record.offset == expected_write(P + 5)[0]


def test_write_by_numpy_ufunc_out() -> None:
    """Item 5: a numpy ufunc writing through out= into a watched view."""
    np = pytest.importorskip("numpy")
    base = np.zeros(6 * P // 8 + 3, dtype=np.float64)
    view = base[1:-2]
    with watch(view, engine=engine_named()) as w:
        np.add(view[P // 8 : P // 8 + 4], 1.5, out=view[P // 8 : P // 8 + 4])
    changed = [c.offset for c in w.changes()]  # 1.5 changes the top bytes of each double
    assert len(changed) == 4 and all(P <= offset < P + 32 for offset in changed), changed
    assert w.writes and all(r.thread_name in (None, "MainThread") for r in w.writes)
    assert view[P // 8] == 1.5


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: bytearray(5 * P), id="bytearray"),
        pytest.param(lambda: array.array("d", bytes(5 * P)), id="array"),
        pytest.param(lambda: mmap.mmap(-1, 5 * P), id="mmap-shared"),
        pytest.param(
            lambda: mmap.mmap(-1, 5 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
            id="mmap-private",
        ),
        pytest.param(lambda: (ctypes.c_uint8 * (5 * P))(), id="ctypes"),
        pytest.param(lambda: memoryview(bytearray(5 * P)), id="memoryview"),
        pytest.param(lambda: memoryview(bytearray(5 * P)).cast("I"), id="memoryview-cast"),
    ],
)
def test_buffer_kinds(make: object) -> None:
    """Item 1: every kind of writable buffer; writes inside whole pages are
    protected unless the kernel cannot (shared memory before 5.19)."""
    obj = make()  # type: ignore[operator]
    flat = memoryview(obj).cast("B")
    with watch(obj) as w:
        flat[3 * P + 1] = 1
    assert [c.offset for c in w.changes()] == [3 * P + 1]
    assert len(w.writes) == 1
    if w.engine == "diff":
        assert "WP_HUGETLBFS_SHMEM" in str(w.coverage), w.coverage
    else:
        assert w.coverage.protected >= 3 * P
    flat.release()


def test_mmap_is_shared_memory() -> None:
    """mmap.mmap(-1, n) is MAP_SHARED: shmem, which needs WP_HUGETLBFS_SHMEM."""
    m = mmap.mmap(-1, 2 * P)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    assert memory_kind(address, address + 2 * P).backing == "shmem"
    m.close()


def test_async_engine_in_place() -> None:
    """engine='async' (Linux 6.7+) protects the whole pages in place too:
    every written page found, the writer not named, nothing left registered."""
    if not capabilities().has("wp_async"):
        pytest.skip("needs UFFD_FEATURE_WP_ASYNC (Linux 6.7+)")
    region, view = aligned(6 * P, offset=11)
    with watch(view, engine="async") as w:
        assert w.engine == "async" and "writer not named" in str(w.coverage)
        view[2 * P] = 1
        view[4 * P + 7] = 2
    assert sorted(r.offset for r in w.writes) == [2 * P, 4 * P + 7]
    assert all(r.thread_id is None for r in w.writes)
    assert "uw" not in vm_flags(id_address(region) + P).split()


def test_private_file_mapping_is_compared(tmp_path: Path) -> None:
    """Item 1: a private file mapping (a C extension's data, numpy.memmap
    'c'): compared with a note; asking for sync raises with the reason."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(4 * P))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    with watch(m) as w:
        m[2 * P + 7] = 1
    assert w.engine == "diff" and spans(w) == [(0, 4 * P, "compared")]
    assert "private file mapping" in w.coverage.spans[0].why
    assert [r.offset for r in w.writes] == [2 * P + 7]
    with pytest.raises(InvalidBufferError, match="private file mapping") as info:
        watch(m, engine="sync")
    assert "engine='diff'" in str(info.value.remedy)
    m.close()


# ------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: bytes(P), "read-only"),
        (lambda: memoryview(bytearray(P)).toreadonly(), "read-only"),
        (lambda: memoryview(bytearray(4 * P))[::2], "not C-contiguous"),
        (lambda: [1, 2, 3], "does not expose a buffer"),
        (lambda: GuardedBuffer(P), "guarded already"),
    ],
    ids=["bytes", "readonly-view", "strided", "list", "guarded-buffer"],
)
def test_refused_clearly(make: object, match: str) -> None:
    """Item 1: what cannot be watched raises the project's error, with a fix."""
    with pytest.raises(InvalidBufferError, match=match) as info:
        watch(make())  # type: ignore[operator]
    assert info.value.remedy


def test_numpy_refusals_name_the_fix() -> None:
    """Item 1: read-only and non-contiguous numpy arrays, with numpy fixes."""
    np = pytest.importorskip("numpy")
    frozen = np.zeros(P)
    frozen.flags.writeable = False
    with pytest.raises(InvalidBufferError, match="read-only"):
        watch(frozen)
    with pytest.raises(InvalidBufferError, match="not C-contiguous") as info:
        watch(np.zeros((64, 64)).T)
    assert "arr.T" in str(info.value.remedy)
    with pytest.raises(InvalidBufferError, match="not C-contiguous"):
        watch(np.zeros(4 * P)[::3])
    stamps = np.zeros(P, dtype="datetime64[s]")  # no buffer-protocol format
    with watch(stamps) as w:
        stamps[P // 2] = np.datetime64(5, "s")
    assert [c.offset for c in w.changes()] == [P // 2 * 8]


def test_closed_object_refused() -> None:
    """An object whose buffer is gone (a closed mmap) is the project's error."""
    m = mmap.mmap(-1, P)
    w = Watch(m)
    m.close()
    with pytest.raises(InvalidBufferError, match="buffer is not available"):
        w.start()
    with pytest.raises(InvalidBufferError, match="buffer is not available"):
        watch(m)


def test_unknown_engine_and_bad_name() -> None:
    with pytest.raises(InvalidBufferError, match="unknown engine"):
        watch(bytearray(P), engine="fast")
    with pytest.raises(InvalidBufferError, match="name must be a str"):
        watch(bytearray(P), name=b"x")  # type: ignore[arg-type]


def test_requested_engine_that_cannot_run_raises() -> None:
    """Item 1: an engine asked for by name that cannot run raises the reason;
    auto falls back to comparing."""
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import watch, UffdUnavailableError
        m = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            watch(m, engine="async")
        except UffdUnavailableError as exc:
            assert "WP_ASYNC" in str(exc), exc
        else:
            raise AssertionError("async ran without WP_ASYNC")
        with watch(m, engine="auto") as w:
            m[5] = 1
        assert w.engine != "async" and w.changes()
        print("ok")
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_async"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.timeout(bound(120))
def test_without_userfaultfd_compares(seccomp_deny: str) -> None:  # noqa: F811
    """Item 1: userfaultfd blocked by seccomp: auto compares everything and
    says why; sync asked for by name raises UffdUnavailableError."""
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import watch, UffdUnavailableError
        m = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with watch(m) as w:
            m[mmap.PAGESIZE + 1] = 1
        assert w.engine == "diff" and w.coverage.compared == len(m), w.coverage
        assert "seccomp" in str(w.coverage), w.coverage
        assert [r.offset for r in w.writes] == [mmap.PAGESIZE + 1]
        try:
            watch(m, engine="sync")
        except UffdUnavailableError:
            print("ok")
        """,
        prefix=[seccomp_deny],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------ nesting, lifecycle


def test_overlapping_watches_refused_naming_the_other() -> None:
    """Item 5 (decided: refused): a second watch sharing bytes with a running
    one raises, naming it; disjoint neighbours are fine; after stop, allowed."""
    region, view = aligned(8 * P, offset=1)
    with watch(view, name="outer"):
        for other in (view, view[P : 2 * P], memoryview(region)[: 2 * P]):
            with pytest.raises(InvalidBufferError, match="'outer'") as info:
                watch(other, name="inner")
            assert "stop watch 'outer' first" in str(info.value.remedy)
    with watch(view[: 4 * P], name="left"), watch(view[4 * P :], name="right") as right:
        view[5 * P] = 1
    assert [c.offset for c in right.changes()] == [P]
    with watch(view[P:]) as again:
        pass
    assert not again.changes()


def test_exception_inside_the_block() -> None:
    """Item 5: an exception inside the block stops the watch cleanly and
    propagates; the memory is unregistered and writable as before."""
    region, view = aligned(4 * P)
    before = guards()
    with pytest.raises(KeyError, match="boom"), watch(view, engine=engine_named()) as w:
        view[P] = 1
        raise KeyError("boom")
    assert not w.running and guards() == before
    assert [c.offset for c in w.changes()] == [P] and len(w.writes) == 1
    view[2 * P] = 1  # after the watch: not recorded, not blocked
    assert len(w.writes) == 1 and "uw" not in vm_flags(id_address(region))


def id_address(buffer: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def test_stop_restores_mapping_and_registration() -> None:
    """Item 1: leaving restores everything: VmFlags without uffd-wp, the
    same /proc/self/maps lines, the handler's table, and other guards keep
    working throughout."""
    region, view = aligned(16 * P, offset=P)
    address = id_address(region) + P
    other = GuardedBuffer(
        P, name="other", engine="diff" if capabilities().user_mode_only else "auto"
    )
    count, mine = maps_of(region)
    flags = vm_flags(address)
    with watch(view, engine=engine_named()) as w:
        assert "uw" in vm_flags(address).split()
        other[1] = 1
        view[3] = 1
    other[2] = 2
    assert vm_flags(address) == flags
    after, mine_after = maps_of(region)
    assert mine_after == mine and abs(after - count) <= 8
    assert len(w.writes) == 1 and [r.offset for r in other.writes][:1] == [expected_write(1)[0]]
    other.close()


def test_object_kept_alive_and_pinned() -> None:
    """Item 1: the object stays alive while watched (even with no other
    reference) and cannot be resized under the watch; afterwards it can."""
    w = watch(bytearray(3 * P))
    gc.collect()
    assert isinstance(w.obj, bytearray) and len(w.obj) == 3 * P
    with pytest.raises(BufferError):
        w.obj.extend(b"x" * P)
    w.obj[P + 1] = 1
    w.stop()
    w.obj.extend(b"x")
    assert [c.offset for c in w.changes()] == [P + 1]


def test_dropped_watch_unregisters() -> None:
    """A running Watch that is garbage-collected unregisters its memory."""
    region, view = aligned(4 * P)
    before = guards()
    w = watch(view, engine=engine_named())
    assert guards() == before + (w.engine in ("sync", "hybrid"))
    del w
    gc.collect()
    assert guards() == before and "uw" not in vm_flags(id_address(region)).split()
    view[P] = 1  # never blocks


def test_restart_takes_a_new_snapshot() -> None:
    """start() after stop() watches again from the current contents."""
    _region, view = aligned(4 * P)
    w = Watch(view, name="again", engine=engine_named())
    assert not w.running and "not started" in repr(w)
    with w:
        view[P] = 1
    assert len(w.writes) == 1
    w.start()
    assert w.start() is w and not w.writes and not w.changes()
    view[P] = 2
    w.stop()
    w.stop()
    assert [(c.before, c.after) for c in w.changes()] == [(b"\x01", b"\x02")]
    assert "stopped" in repr(w) and "protected" in repr(w)


@pytest.mark.timeout(bound(240))
def test_ten_thousand_cycles_leak_nothing() -> None:
    """Item 5: 10 000 start/stop cycles: no fd, mapping or registration left."""
    region, view = aligned(3 * P + 10, offset=5)
    w = Watch(view, engine=engine_named())
    w.start()
    w.stop()
    fds = len(os.listdir("/proc/self/fd"))
    count, mine = maps_of(region)
    before = guards()
    for i in range(10_000):
        w.start()
        if i % 1000 == 0:
            view[P + i % 7] = 1
        w.stop()
    assert len(os.listdir("/proc/self/fd")) == fds
    after, mine_after = maps_of(region)
    assert mine_after == mine and abs(after - count) <= 16, (count, after)
    assert guards() == before


def test_fork_child_writes_freely_parent_keeps_watching() -> None:
    """Item 5: after fork() the child writes the watched memory without
    blocking (it is not watched there); the parent's watch keeps working."""
    result = run_python(
        """
        import os, mmap
        from pytest_uffd_guard import watch, capabilities
        P = mmap.PAGESIZE
        m = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        w = watch(m, engine="sync" if capabilities().user_mode_only else "auto")
        pid = os.fork()
        if pid == 0:
            m[P] = 1
            m[3 * P] = 1
            w.stop()
            os._exit(0 if m[P] == 1 else 3)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        assert not w.changes(), w.changes()  # private memory: the child's copy
        m[2 * P + 1] = 1
        assert [r.page_offset for r in w.writes] == [2 * P], w.writes
        w.stop()
        print("ok")
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_coverage_is_plain_data() -> None:
    """The report can carry coverage as it is: ints, strings and lists."""
    _region, view = aligned(3 * P, offset=9)
    with watch(view, name="cov") as w:
        data = w.coverage.as_dict()
    assert data["size"] == 3 * P and data["protected"] + data["compared"] == 3 * P
    assert [s["how"] for s in data["spans"]] == ["compared", "protected", "compared"]
    text = str(w.coverage)
    assert "partial first page" in text and "partial last page" in text


# -------------------------------------------------------- another user


@pytest.mark.timeout(bound(180))
def test_unprivileged_user(nobody: Nobody) -> None:  # noqa: F811
    """Item 5: as the user nobody (user-mode-only userfaultfd by default):
    the watch works, changes are exact and kernel writes still arrive."""
    result = nobody.run(
        [
            "-c",
            """
import mmap, os
from pytest_uffd_guard import watch
P = mmap.PAGESIZE
m = mmap.mmap(-1, 4 * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
r, wfd = os.pipe()
os.write(wfd, b"abc")
with watch(m) as w:
    m[P + 1] = 1
    assert os.readv(r, [memoryview(m)[2 * P : 2 * P + 3]]) == 3
assert [c.offset for c in w.changes()] == [P + 1, 2 * P], w.changes()
print(w.engine, w.coverage.summary())
""",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "protected" in result.stdout


@pytest.mark.timeout(bound(120))
def test_example_names_the_offending_lines() -> None:
    """Item 4: examples/inplace: a cached lookup table and a session
    fixture mutated in place, each caught with the line that wrote."""
    if capabilities().user_mode_only:
        pytest.skip("user-mode-only userfaultfd: auto does not name writers here")
    example = Path(ROOT) / "examples" / "inplace"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(example)],
        cwd=example,
        capture_output=True,
        text=True,
        timeout=bound(100),
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "RATES was written in place" in out and "fee_schedule was written in place" in out
    assert "rates.py:23 in convert" in out and "rates.py:29 in apply_fees" in out, out
