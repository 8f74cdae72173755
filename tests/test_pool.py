"""The small-buffer fast path keeps every guarantee (issue 11 target 4).

``guard_pool`` hands small snapshots out of a bounded pool and caches the
engine choice per process; ``MAP_STACK`` replaces ``MADV_NOHUGEPAGE`` on
Linux 6.7+.  Each test creates and closes many buffers, so that snapshots
(and, through the kernel's address reuse, buffer addresses) are reused, and
checks what a fresh buffer must always be: zeros, protected, with no record
or change from an earlier buffer; in a forked child and under many threads
too.
"""

from __future__ import annotations

import mmap
import threading

import pytest

from pytest_uffd_guard import GuardedBuffer, capabilities, guard_pool
from pytest_uffd_guard.engines import AUTO_HYBRID_BYTES, choose_engine
from tests.conftest import bound, expected_offset, run_python

PAGE = mmap.PAGESIZE
SIZES = (1, 100, PAGE, 3 * PAGE + 5, 16 * PAGE)


def _fresh_buffer_is_clean(buf: GuardedBuffer) -> None:
    assert bytes(buf) == bytes(len(buf))
    assert buf.writes == []
    assert buf.changes() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", SIZES)
def test_reused_snapshot_is_zeros(uffd: None, size: int) -> None:
    """issue 11 target 4: a pooled snapshot that held another buffer's bytes
    is zeroed before reuse, so a fresh buffer shows no change (a stale
    snapshot would report every byte the previous buffer held)."""
    for round_ in range(3 * guard_pool.POOL_PER_LENGTH):
        with GuardedBuffer(b"\xa5" * size, stacks=0) as dirty:
            assert bytes(dirty) == b"\xa5" * size
        # A source shorter than the mapping: the snapshot's tail must be zero too.
        with GuardedBuffer(b"\x5a" * max(1, size // 2), stacks=0) as short:
            assert short.changes() == []
        with GuardedBuffer(size, stacks=0) as fresh:
            _fresh_buffer_is_clean(fresh)
            fresh[size - 1] = round_ % 255 + 1
            assert [c.after for c in fresh.changes()] == [bytes([round_ % 255 + 1])]


@pytest.mark.timeout(120)
def test_every_reused_buffer_is_protected_and_starts_without_records(uffd: None) -> None:
    """issue 11 target 4: after many create/close cycles (the kernel hands the
    same addresses out again) every buffer records its own first write, and
    none inherits a record left undrained by a buffer closed before it."""
    for i in range(200):
        buf = GuardedBuffer(2 * PAGE, stacks=0)
        _fresh_buffer_is_clean(buf)
        offset = (i * 37) % (2 * PAGE)
        buf[offset] = 1
        if i % 2:
            buf.close()  # closed without reading .writes first
            assert [w.offset for w in buf.writes] == [expected_offset(offset)]
        else:
            assert [w.offset for w in buf.writes] == [expected_offset(offset)]
            buf.close()
        del buf


@pytest.mark.timeout(180)
def test_protected_before_linux_6_4(uffd: None) -> None:
    """issue 11 target 4: without WP_UNPOPULATED (Linux < 6.4, simulated) the
    pages of every reused buffer are populated before they are protected:
    each first write is still recorded."""
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import GuardedBuffer, capabilities
        assert not capabilities().has("wp_unpopulated")
        for i in range(100):
            with GuardedBuffer(3 * mmap.PAGESIZE, stacks=0) as b:
                assert b.writes == [] and b.changes() == []
                b[mmap.PAGESIZE + i] = 7
                assert len(b.writes) == 1, b.writes
        print("ok")
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_unpopulated"},
        timeout=120,
        sync_engine=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.timeout(60)
def test_pool_is_bounded_and_drains(uffd: None) -> None:
    """issue 11 target 4: the pool keeps at most POOL_PER_LENGTH snapshots of
    a length, never big ones, and drain() (run at exit) unmaps them all."""
    buffers = [GuardedBuffer(PAGE, stacks=0) for _ in range(3 * guard_pool.POOL_PER_LENGTH)]
    big = GuardedBuffer(guard_pool.POOL_MAX_LENGTH + PAGE, stacks=0)
    before = guard_pool.pooled()
    for buf in buffers:
        buf.close()
    big.close()
    assert guard_pool.pooled() <= before + guard_pool.POOL_PER_LENGTH
    assert guard_pool.pooled() >= guard_pool.POOL_PER_LENGTH
    guard_pool.drain()
    assert guard_pool.pooled() == 0
    with GuardedBuffer(PAGE, stacks=0) as after:  # still works, from a new mapping
        _fresh_buffer_is_clean(after)


@pytest.mark.timeout(180)
def test_forked_child_reuses_the_pool_safely(uffd: None) -> None:
    """issue 11 target 4: a child forked with snapshots in the pool (and a
    cached engine choice) makes buffers of its own that are zero, protected
    and record only its own writes; the parent's go on unaffected."""
    result = run_python(
        """
        import os, mmap
        from pytest_uffd_guard import GuardedBuffer, guard_pool
        P = mmap.PAGESIZE
        for _ in range(8):
            with GuardedBuffer(b"\\xff" * P, stacks=0):
                pass
        assert guard_pool.pooled() >= 1
        kept = GuardedBuffer(P, stacks=0)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for i in range(20):
                    with GuardedBuffer(P, stacks=0) as b:
                        assert bytes(b) == bytes(P) and b.changes() == [] and b.writes == []
                        b[i] = 1
                        assert len(b.writes) == 1 and len(b.changes()) == 1
            except BaseException as exc:
                print("child:", repr(exc), flush=True)
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        kept[5] = 2
        assert len(kept.writes) == 1 and kept.changes()[0].offset == 5
        kept.close()
        print("ok")
        """,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.timeout(240)
def test_many_threads_creating_and_closing(uffd: None) -> None:
    """issue 11 target 4: threads creating, writing and closing small buffers
    at once (the pool and the choice cache are shared; on the free-threaded
    build truly in parallel) each see exactly their own write and zeros."""
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(60):
                size = SIZES[(n + i) % len(SIZES)]
                with GuardedBuffer(size, stacks=0) as buf:
                    _fresh_buffer_is_clean(buf)
                    offset = (n * 13 + i) % size
                    buf[offset] = n + 1
                    assert [w.offset for w in buf.writes] == [expected_offset(offset)]
                    assert [(c.offset, c.after) for c in buf.changes()] == [
                        (offset, bytes([n + 1]))
                    ]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(bound(180))
    assert not any(thread.is_alive() for thread in threads), "a creator thread hung"
    assert errors == []


def test_engine_choice_is_cached_and_follows_the_probe(uffd: None) -> None:
    """issue 11 target 4: the cached choice is choose_engine's answer for the
    same request and size class, and a new probe answer (as in a forked
    child) is decided afresh."""
    caps = capabilities()
    for requested in ("auto", "sync"):
        for size in (PAGE, AUTO_HYBRID_BYTES):
            cached = guard_pool.engine_choice(requested, size, unit=PAGE, backing="anonymous")
            expected = choose_engine(requested, size, unit=PAGE, caps=caps)
            assert cached == expected
            again = guard_pool.engine_choice(requested, size, unit=PAGE, backing="anonymous")
            assert again is cached
    first = guard_pool.engine_choice("auto", PAGE, unit=PAGE, backing="anonymous")
    try:
        capabilities(refresh=True)
        fresh = guard_pool.engine_choice("auto", PAGE, unit=PAGE, backing="anonymous")
        assert fresh == first and fresh is not first
    finally:
        capabilities(refresh=True)


def _vm_flags(address: int) -> list[str]:
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    start = f"{address:x}-"
    for i, line in enumerate(lines):
        if line.startswith(start):
            for detail in lines[i + 1 :]:
                if detail.startswith("VmFlags:"):
                    return detail.split()[1:]
    raise AssertionError(f"no mapping at {address:#x} in /proc/self/smaps")


@pytest.mark.timeout(60)
def test_small_buffer_stays_on_base_pages(uffd: None) -> None:
    """issue 11 target 4: dropping the MADV_NOHUGEPAGE call where MAP_STACK
    does its job (Linux 6.7+) still leaves the buffer's mapping marked
    no-huge-pages ("nh"), on every kernel."""
    with GuardedBuffer(4 * PAGE, stacks=0) as buf:
        assert "nh" in _vm_flags(buf.address)
