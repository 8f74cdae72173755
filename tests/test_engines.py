"""One behavioural suite, run against every engine (sync, async, diff).

Where the engines differ the expectation says so: only ``sync`` names the
writing thread and the exact byte of the first write; ``async`` and ``diff``
place a record on each written page's first changed byte; ``diff`` cannot
see a write that stores the value already there.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import threading
import time

import pytest

from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError, capabilities
from pytest_uffd_guard.engines import ENGINES, choose_engine
from pytest_uffd_guard.kernel.asyncfd import async_unavailable

from .conftest import bound, exact_address, expected_offset, run_python

PAGE = mmap.PAGESIZE
ENGINE_NAMES = ("sync", "async", "hybrid", "diff")
#: Engines that name the writer and the exact byte (hybrid: while under budget).
NAMING = ("sync", "hybrid")


def _skip_reason(engine: str) -> str | None:
    caps = capabilities()
    if engine == "sync" and not caps.available:
        return f"userfaultfd write-protect unavailable: {caps.reason}"
    if engine in ("async", "hybrid"):
        reason = async_unavailable(caps)
        if reason is not None:
            return f"{engine} engine unavailable: {reason}"
    return None


@pytest.fixture(params=ENGINE_NAMES)
def engine(request: pytest.FixtureRequest) -> str:
    reason = _skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return str(request.param)


def address(buf: GuardedBuffer) -> int:
    return buf.address


def first_write(engine: str, offset: int) -> int:
    """Where the first write at ``offset`` is recorded: async and diff put it on
    the first changed byte; sync (and hybrid) at the faulting byte with
    EXACT_ADDRESS (Linux 5.18+), else at its page start."""
    return expected_offset(offset) if engine in NAMING else offset


def pages(buf: GuardedBuffer) -> list[int]:
    return sorted({w.page_offset for w in buf.writes})


@pytest.mark.timeout(bound(30))
def test_memoryview_write_is_reported(engine: str) -> None:
    """A one-byte store through a memoryview: one change, one page."""
    with GuardedBuffer(4 * PAGE, engine=engine) as buf:
        assert buf.engine == engine
        memoryview(buf)[PAGE + 5] = 1
        assert [(c.offset, c.length, c.after) for c in buf.changes()] == [(PAGE + 5, 1, b"\x01")]
        writes = buf.writes
        assert [w.offset for w in writes] == [first_write(engine, PAGE + 5)]
        assert all(w.exact == (engine in NAMING and exact_address()) for w in writes)


@pytest.mark.timeout(bound(30))
def test_numpy_writes_each_page(engine: str) -> None:
    """numpy stores into three pages: three pages reported, exact changes."""
    np = pytest.importorskip("numpy")
    with GuardedBuffer(8 * PAGE, engine=engine) as buf:
        arr = np.frombuffer(buf, dtype=np.uint8)
        arr[[10, 3 * PAGE + 1, 7 * PAGE + 100]] = 9
        del arr
        assert pages(buf) == [0, 3 * PAGE, 7 * PAGE]
        assert [c.offset for c in buf.changes()] == [10, 3 * PAGE + 1, 7 * PAGE + 100]


@pytest.mark.timeout(bound(30))
def test_ctypes_memset_run_across_pages(engine: str) -> None:
    """A memset across a page boundary: one run, both pages."""
    with GuardedBuffer(4 * PAGE, engine=engine) as buf:
        ctypes.memset(address(buf) + PAGE - 2, 0xAB, 4)
        assert [(c.offset, c.length) for c in buf.changes()] == [(PAGE - 2, 4)]
        assert pages(buf) == [0, PAGE]
        offsets = sorted(w.offset for w in buf.writes)
        assert offsets == [first_write(engine, PAGE - 2), PAGE]


@pytest.mark.timeout(bound(30))
def test_no_writes_nothing_reported(engine: str) -> None:
    """Reads only (including of never-touched pages): nothing is reported."""
    with GuardedBuffer(16 * PAGE, engine=engine) as buf:
        assert bytes(buf[:]) == bytes(16 * PAGE)
        assert buf.writes == []
        assert buf.changes() == []
    assert buf.writes == [] and buf.changes() == []


@pytest.mark.timeout(bound(30))
def test_copied_in_data_then_untouched_pages(engine: str) -> None:
    """Writes into pages never touched since the copy-in are caught."""
    data = bytes(range(256)) * (PAGE // 256) * 2 + bytes(4 * PAGE)
    with GuardedBuffer(data, engine=engine) as buf:
        buf[5 * PAGE + 7] = 1  # a zero page that was never written by the copy
        buf[3] = 0xFF
        assert pages(buf) == [0, 5 * PAGE]
        assert [c.offset for c in buf.changes()] == [3, 5 * PAGE + 7]


@pytest.mark.timeout(bound(30))
def test_protect_rearms(engine: str) -> None:
    """protect() takes a new snapshot and forgets earlier writes."""
    with GuardedBuffer(4 * PAGE, engine=engine) as buf:
        buf[0] = 1
        assert pages(buf) == [0]
        buf.protect()
        assert buf.writes == [] and buf.changes() == []
        buf[0] = 2  # the same page again: protected again
        buf[2 * PAGE] = 3
        assert pages(buf) == [0, 2 * PAGE]
        assert [(c.offset, c.before, c.after) for c in buf.changes()] == [
            (0, b"\x01", b"\x02"),
            (2 * PAGE, b"\x00", b"\x03"),
        ]


@pytest.mark.timeout(bound(30))
def test_unprotected_block(engine: str) -> None:
    """Writes inside unprotected() are neither recorded nor reported."""
    with GuardedBuffer(4 * PAGE, engine=engine) as buf:
        buf[1] = 1
        with buf.unprotected():
            buf[PAGE] = 7
            buf[3 * PAGE] = 7
        buf[2 * PAGE] = 2
        assert [c.offset for c in buf.changes()] == [1, 2 * PAGE]
        assert 0 in pages(buf) and 2 * PAGE in pages(buf)
        assert PAGE not in pages(buf)


@pytest.mark.timeout(bound(30))
def test_close_keeps_results(engine: str) -> None:
    """After close, writes and changes stay readable; close is idempotent."""
    buf = GuardedBuffer(2 * PAGE, engine=engine)
    buf[PAGE + 1] = 5
    buf.close()
    buf.close()
    assert buf.closed and not buf.tracking
    assert [w.page_offset for w in buf.writes] == [PAGE]
    assert [c.offset for c in buf.changes()] == [PAGE + 1]


@pytest.mark.timeout(bound(30))
def test_same_value_write(engine: str) -> None:
    """Storing the value already there: sync and async see it, diff cannot."""
    with GuardedBuffer(b"\x00" * PAGE + b"\x07" * PAGE, engine=engine) as buf:
        buf[PAGE + 3] = 7
        assert buf.changes() == []
        if engine == "diff":
            assert buf.writes == []
        else:
            assert pages(buf) == [PAGE]
            # async knows the page, not the byte: the record sits on the page start
            assert buf.writes[0].offset == (expected_offset(PAGE + 3) if engine in NAMING else PAGE)


@pytest.mark.timeout(bound(30))
def test_writer_thread(engine: str) -> None:
    """Only the sync engine (and hybrid, under budget) names the writing thread."""
    with GuardedBuffer(PAGE, engine=engine) as buf:
        tids: list[int] = []

        def write() -> None:
            tids.append(threading.get_native_id())
            buf[10] = 1

        t = threading.Thread(target=write, name="writer")
        t.start()
        t.join(10)
        (record,) = buf.writes
        if engine in NAMING:
            assert record.thread_id == tids[0]
        else:
            assert record.thread_id is None and record.thread_name is None


@pytest.mark.timeout(bound(30))
def test_max_records_overflow(engine: str) -> None:
    """Pages past max_records are counted, not kept."""
    with GuardedBuffer(8 * PAGE, engine=engine, max_records=3) as buf:
        for i in range(8):
            buf[i * PAGE] = 1
        assert len(buf.writes) == 3
        assert buf.overflowed == 5
        assert len(buf.changes()) == 8


@pytest.mark.timeout(bound(60))
def test_every_page_of_a_big_buffer(engine: str) -> None:
    """Every written page of a 16 MiB buffer is found."""
    size = 16 << 20
    with GuardedBuffer(size, engine=engine) as buf:
        ctypes.memset(address(buf), 1, size)
        assert len(buf.writes) == size // PAGE
        assert [(c.offset, c.length) for c in buf.changes()] == [(0, size)]


@pytest.mark.timeout(bound(60))
@pytest.mark.parametrize("backing", ["shmem"])
def test_shared_memory_backing(engine: str, backing: str) -> None:
    """Each engine tracks a memfd-backed buffer like an anonymous one."""
    if engine != "diff" and not capabilities().has("wp_hugetlbfs_shmem"):
        pytest.skip("no UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+)")
    with GuardedBuffer(3 * PAGE, engine=engine, backing=backing) as buf:
        buf[2 * PAGE + 1] = 4
        assert pages(buf) == [2 * PAGE]
        assert [c.offset for c in buf.changes()] == [2 * PAGE + 1]


# --------------------------------------------------- engine choice


def test_engines_listed() -> None:
    assert ENGINES == ("auto", "sync", "async", "hybrid", "diff")


@pytest.mark.timeout(bound(60))
def test_hybrid_names_first_writers_then_finds_every_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over budget, a hybrid buffer moves to async: first writes named, all pages found."""
    reason = _skip_reason("hybrid")
    if reason is not None:
        pytest.skip(reason)
    from pytest_uffd_guard.engines import hybrid

    monkeypatch.setattr(hybrid, "BUDGET", 16)
    npages = 4096
    with GuardedBuffer(npages * PAGE, engine="hybrid") as buf:
        tids: list[int] = []

        def write() -> None:
            tids.append(threading.get_native_id())
            for i in range(npages):
                ctypes.memset(address(buf) + i * PAGE + 1, 1, 1)

        t = threading.Thread(target=write)
        t.start()
        t.join(30)
        tracker = buf._tracker
        assert isinstance(tracker, hybrid.HybridTracker)
        # The watcher switches once it wakes on the spent budget: a fast
        # writer (3.13t, GIL off) can finish all its faults before that.
        deadline = time.monotonic() + bound(10)
        while tracker.switches == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert tracker.switches == 1 and tracker.phase == "async"
        writes = buf.writes
        assert sorted(w.page_offset for w in writes) == [i * PAGE for i in range(npages)]
        named = [w for w in writes if w.thread_id is not None]
        assert len(named) >= 16 and all(w.thread_id == tids[0] and w.exact for w in named)
        assert all(not w.exact for w in writes if w.thread_id is None)
        assert all(w.offset % PAGE == 1 for w in writes)
        # protect() goes back to sync with a fresh budget
        buf.protect()
        assert tracker.phase == "sync"
        buf[5] = 1
        (record,) = buf.writes
        assert record.exact and record.offset == 5


def _full_uffd() -> None:
    if capabilities().user_mode_only:
        pytest.skip("user-mode-only userfaultfd: auto runs async or diff (tests/hostile)")


def test_choose_engine_auto_prefers_sync(uffd: None) -> None:
    """auto picks sync where userfaultfd sees kernel faults, and says why."""
    _full_uffd()
    choice = choose_engine("auto")
    assert choice.usable and choice.engine == "sync"
    assert choice.reason.startswith("auto: userfaultfd write-protect via")


def test_choose_engine_auto_big_buffers_run_hybrid(uffd: None) -> None:
    """auto runs buffers of AUTO_HYBRID_BYTES or more hybrid where WP_ASYNC exists."""
    from pytest_uffd_guard.engines import AUTO_HYBRID_BYTES

    _full_uffd()
    choice = choose_engine("auto", AUTO_HYBRID_BYTES)
    if async_unavailable(capabilities()):
        assert choice.engine == "sync"
    else:
        assert choice.engine == "hybrid" and "first writers named" in choice.reason
        assert choose_engine("auto", AUTO_HYBRID_BYTES - PAGE).engine == "sync"
        with GuardedBuffer(AUTO_HYBRID_BYTES) as buf:
            assert buf.engine == "hybrid"


def test_choose_engine_diff_says_its_limits() -> None:
    choice = choose_engine("diff")
    engine, reason = choice.engine, choice.reason
    assert engine == "diff" and choice.usable
    assert "value already there is not seen" in reason and "writer is unknown" in reason


def test_choose_engine_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        choose_engine("fast")


@pytest.mark.timeout(bound(60))
def test_auto_without_userfaultfd_is_unusable() -> None:
    """With userfaultfd unusable, auto cannot run (the plugin skips, explained);
    buffers run diff when asked by name, and every other engine raises."""
    result = run_python(
        """
        import json
        from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError
        from pytest_uffd_guard.engines import choose_engine
        choice = choose_engine("auto")
        out = {"choice": [choice.runs, choice.usable, choice.reason]}
        with GuardedBuffer(8192, engine="diff") as buf:
            buf[5000] = 1
            out["engine"] = buf.engine
            out["offsets"] = [w.offset for w in buf.writes]
        for name in ("sync", "async", "auto"):
            try:
                GuardedBuffer(4096, engine=name)
            except UffdUnavailableError as exc:
                out[name] = exc.cause
        print(json.dumps(out))
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "pagefault_flag_wp"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # Where no userfaultfd opens at all (Linux < 5.11 as an unprivileged
    # user with vm.unprivileged_userfaultfd=0), that is the cause instead.
    caps = capabilities()
    causes = ["write-protection"] if caps.available else ["write-protection", str(caps.reason)]
    assert out["choice"][:2] == ["none", False]
    assert any(c in out["choice"][2] for c in causes), out
    assert out["engine"] == "diff" and out["offsets"] == [5000]
    for name in ("sync", "async", "auto"):
        assert any(c in out[name] for c in causes), out


@pytest.mark.timeout(bound(60))
def test_async_unavailable_before_6_7(uffd: None) -> None:
    """Without WP_ASYNC, engine='async' fails with the reason; auto still works."""
    result = run_python(
        """
        import json
        from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError
        from pytest_uffd_guard.engines import choose_engine
        choice = choose_engine("async")
        out = {"choice": [choice.engine, choice.usable, choice.reason]}
        try:
            GuardedBuffer(4096, engine="async")
        except UffdUnavailableError as exc:
            out["error"] = str(exc)
        out["auto"] = GuardedBuffer(4096).engine
        print(json.dumps(out))
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_async"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["choice"] == [
        "async",
        False,
        "this kernel has no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)",
    ]
    assert "WP_ASYNC" in out["error"] and "Fix:" in out["error"]
    # user-mode only and no WP_ASYNC: auto compares bytes (kernel writes work)
    assert out["auto"] == ("sync" if capabilities().kernel_writes_seen else "diff")


@pytest.mark.timeout(bound(60))
def test_sync_prefault_path_without_wp_unpopulated(uffd: None) -> None:
    """As on Linux < 6.4: never-touched pages are pre-faulted, so writes are caught."""
    result = run_python(
        """
        import json
        from pytest_uffd_guard import GuardedBuffer
        with GuardedBuffer(64 * 4096, engine="sync") as buf:
            buf[40 * 4096 + 3] = 1
            buf[63 * 4096] = 1
            print(json.dumps([w.offset for w in buf.writes]))
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_unpopulated"},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [expected_offset(40 * 4096 + 3), 63 * 4096]


def test_unknown_engine_on_buffer() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        GuardedBuffer(4096, engine="nope")


def test_unavailable_error_type() -> None:
    assert issubclass(UffdUnavailableError, Exception)


@pytest.mark.timeout(bound(60))
def test_not_linux_runs_diff() -> None:
    """Off Linux (simulated), auto cannot run (the plugin skips); a buffer needs engine='diff'."""
    result = run_python(
        """
        import sys
        sys.platform = "darwin"
        from pytest_uffd_guard import GuardedBuffer, UnsupportedPlatformError
        from pytest_uffd_guard.engines import choose_engine
        choice = choose_engine("auto")
        print(choice.runs, choice.reason)
        with GuardedBuffer(8192, engine="diff") as buf:
            buf[4097] = 1
            print(buf.engine, [w.offset for w in buf.writes])
        try:
            GuardedBuffer(4096)
        except UnsupportedPlatformError as exc:
            print("refused:", exc.cause)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "none userfaultfd exists only on Linux, not on darwin"
    assert lines[1] == "diff [4097]"
    assert lines[2] == "refused: userfaultfd exists only on Linux, not on darwin"
