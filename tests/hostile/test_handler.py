"""Hostile use of the C core and its handler thread (issue 9, items 3, 5, 7, 10, 17).

Everything that could hang runs in a subprocess with a timeout.
"""

from __future__ import annotations

import ctypes
import mmap
import subprocess
import threading

import pytest

from pytest_uffd_guard import GuardedBuffer, capabilities
from tests.conftest import expected_offset, run_python

PAGE = mmap.PAGESIZE

pytestmark = pytest.mark.usefixtures("uffd")

#: Waits (bounded) until the handler has seen `n` madvise discards and
#: protected their pages again; defined in every subprocess below.
SETTLE = """
import time
from pytest_uffd_guard import _uffd as core

def settle(n):
    if "discards" not in core.handler_state():
        time.sleep(0.5)  # a core without madvise events (the old tree)
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = core.handler_state()
        if state["discards"] >= n and not state["reprotect_pending"]:
            return
        time.sleep(0.001)
    raise SystemExit("the handler never re-protected the discarded pages")
"""


def run(
    code: str, env: dict[str, str] | None = None, timeout: float = 30, sync_engine: bool = False
) -> str:
    """Run ``code``; a hang is a failure (the defect), not a stuck suite.
    ``sync_engine``: see ``run_python``."""
    try:
        result = run_python(code, env=env, timeout=timeout, sync_engine=sync_engine)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child hung for {timeout} s (deadlock)")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ------------------------------------------------------------- item 3


@pytest.mark.timeout(120)
def test_gc_finalizer_inside_core_calls_does_not_deadlock() -> None:
    """issue 9 item 3: handler_state()/guard_drain built Python objects under
    H.lock; a GC run there finalized a buffer in a reference cycle, whose
    guard_remove took H.lock on the same thread: the process hung."""
    out = run(
        """
        import gc
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard import _uffd as core

        state = core.handler_state
        keep = GuardedBuffer(4096)
        gc.set_threshold(1)
        for i in range(50):
            gc.disable()         # let the allocation count pass the threshold
            b = GuardedBuffer(4096)
            b.cycle = b          # with a buffer only the GC can free
            del b
            dicts = [{} for _ in range(200)]   # empty the dict free list
            gc.enable()
            state()              # its dict is then a fresh GC allocation
            del dicts
            keep.writes          # guard_drain
        gc.collect()
        print("done", state()["guards"])
        """,
        timeout=30,
        sync_engine=True,  # the handler's guard count is the sync engine's
    )
    assert out.split() == ["done", "1"]


# ------------------------------------------------------------- item 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["sync", "hybrid"])
def test_threads_faulting_on_the_same_pages_give_one_record_per_page(engine: str) -> None:
    """issue 9 item 5: every thread blocked on one page got its own record;
    8 threads memset-ing 256 pages left most pages only as `overflowed`."""
    if engine == "hybrid" and not capabilities().has("wp_async"):
        pytest.skip("the hybrid engine needs UFFD_FEATURE_WP_ASYNC (Linux 6.7+)")
    pages, threads = 256, 8
    with GuardedBuffer(pages * PAGE, engine=engine) as buf:
        start = threading.Barrier(threads)

        def writer() -> None:
            start.wait()
            for page in range(pages):
                ctypes.memset(buf.address + page * PAGE, 1, PAGE)

        workers = [threading.Thread(target=writer) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        writes = buf.writes
        assert buf.overflowed == 0
        assert len(writes) == pages
        assert sorted(w.page_offset for w in writes) == [p * PAGE for p in range(pages)]


@pytest.mark.timeout(30)
def test_protect_makes_every_page_a_first_write_again() -> None:
    """issue 9 item 5: the one-record-per-page rule is per arming."""
    with GuardedBuffer(2 * PAGE, engine="sync") as buf:
        buf[0] = 1
        buf[1] = 2  # same page, not protected any more: no fault
        buf.protect()
        buf[2] = 3
        assert [w.offset for w in buf.writes] == [expected_offset(2)]
        with buf.unprotected():
            buf[PAGE] = 1
        buf[3] = 4  # page 0 was protected again by resume()
        assert [w.offset for w in buf.writes] == [expected_offset(2), expected_offset(3)]


# ------------------------------------------------------------- item 7


def _needs_event_remove() -> None:
    if not capabilities().has("event_remove"):
        pytest.skip("needs UFFD_FEATURE_EVENT_REMOVE (Linux 4.11+)")


MADVISE = (
    SETTLE
    + """
import ctypes, mmap
from pytest_uffd_guard import GuardedBuffer

P = mmap.PAGESIZE
b = GuardedBuffer(8 * P, engine="sync")
b[0] = 1
b[P] = 2
b.madvise(mmap.MADV_DONTNEED, 0, 4 * P)
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.madvise(b.address + 6 * P, P, 4) == 0, ctypes.get_errno()  # MADV_DONTNEED
settle(2)
assert b.tracking, b.stopped_reason
b[2] = 3            # discarded page that had been written
b[3 * P + 1] = 4    # discarded page never written
b[6 * P + 2] = 5    # the ctypes madvise
b[7 * P] = 6        # never discarded
for w in b.writes:
    print(getattr(w, "kind", "write"), w.offset, getattr(w, "length", 0))
b.close()
print("closed", [(getattr(w, "kind", "write"), w.offset) for w in b.writes][-1])
"""
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("hide", ["", "wp_unpopulated"], ids=["6.18", "no-wp-unpopulated"])
def test_madvise_dontneed_is_recorded_and_protection_survives(hide: str) -> None:
    """issue 9 item 7: madvise(MADV_DONTNEED) on a guarded range dropped its
    protection silently (the next write went unrecorded while `tracking`
    stayed True).  Now the discard is a record and the pages are protected
    again; close()'s own MADV_DONTNEED (after unregistering) adds nothing."""
    _needs_event_remove()
    out = run(MADVISE, env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": hide})
    lines = out.splitlines()
    assert lines[:-1] == [
        "write 0 0",
        f"write {PAGE} 0",
        f"discard 0 {4 * PAGE}",
        f"discard {6 * PAGE} {PAGE}",
        f"write {expected_offset(2)} 0",  # page starts without EXACT_ADDRESS (5.18)
        f"write {expected_offset(3 * PAGE + 1)} 0",
        f"write {expected_offset(6 * PAGE + 2)} 0",
        f"write {7 * PAGE} 0",
    ]
    assert lines[-1] == f"closed ('write', {7 * PAGE})"


# ------------------------------------------------------------- item 10


@pytest.mark.timeout(60)
def test_handler_failure_stops_tracking_at_once_and_keeps_records() -> None:
    """issue 9 item 10: after the handler gave up, `tracking` stayed True,
    later writes went unrecorded and protect() raised a raw RuntimeError."""
    out = run(
        """
        import mmap, threading
        from pytest_uffd_guard import GuardedBuffer, TrackingStoppedError
        from pytest_uffd_guard import _uffd as core

        P = mmap.PAGESIZE
        b = GuardedBuffer(4 * P, engine="sync")
        b[0] = 1
        core._debug(1, 0)          # the next fault is fatal for the handler
        t = threading.Thread(target=lambda: b.__setitem__(P, 2))
        t.start()
        t.join(20)
        assert not t.is_alive(), "the writer stayed blocked"
        print("tracking", b.tracking)
        print("reason", "injected" in (b.stopped_reason or ""))
        print("writes", [w.offset for w in b.writes])
        try:
            b.protect()
        except TrackingStoppedError as exc:
            print("protect", type(exc).__name__)
        b.close()
        """
    )
    assert out.splitlines() == [
        "tracking False",
        "reason True",
        f"writes [0, {PAGE}]",
        "protect TrackingStoppedError",
    ]


@pytest.mark.timeout(60)
def test_unclosed_buffer_keeps_its_records_at_exit() -> None:
    """issue 9 item 10: the finalizer's exit hook ran before the engine
    drained, so an unclosed buffer's records were gone at exit."""
    out = run(
        """
        import atexit, mmap
        from pytest_uffd_guard import GuardedBuffer

        P = mmap.PAGESIZE
        # Registered first, so it runs last: after the engine stopped.
        atexit.register(lambda: print("at exit", [w.offset for w in b.writes], b.tracking))
        b = GuardedBuffer(2 * P, engine="sync")
        b[5] = 1
        b[P + 6] = 2
        """
    )
    offsets = [expected_offset(5), expected_offset(PAGE + 6)]
    assert out.splitlines() == [f"at exit {offsets} False"]


# ------------------------------------------------------------- item 17


@pytest.mark.timeout(60)
def test_handler_stop_releases_a_held_fault() -> None:
    """issue 9 item 17: with the _debug(hold=1) test hook, handler_stop()
    hung: the held fault never let the thread back to its poll loop."""
    out = run(
        """
        import ctypes, mmap, threading
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard import _uffd as core

        b = GuardedBuffer(mmap.PAGESIZE, engine="sync")
        core._debug(0, 1)
        done = threading.Event()
        def writer():
            ctypes.memset(b.address, 1, 1)
            done.set()
        threading.Thread(target=writer, daemon=True).start()
        assert not done.wait(0.2)
        core.handler_stop()
        print("stopped", done.wait(20))
        """
    )
    assert out.split() == ["stopped", "True"]


def test_record_layout_is_checked_against_the_extension() -> None:
    """issue 9 item 17: the record size was never checked between C and Python."""
    from pytest_uffd_guard import _uffd
    from pytest_uffd_guard.kernel import records

    assert records.core_mismatch(_uffd) is None

    class Old:
        RECORD_SIZE = 64
        KIND_WRITE, KIND_DISCARD = 0, 1

    reason = records.core_mismatch(Old())
    assert reason is not None and "64-byte records" in reason


def test_shared_constants_come_from_the_extension() -> None:
    """issue 9 item 17: ATTR_*, SYSCALL_* and kinds are exported by the C core."""
    from pytest_uffd_guard import _uffd
    from pytest_uffd_guard.kernel import capture, records, syscalls

    for name in ("OFF", "BOUND", "SIGNALLED", "BUSY", "BLOCKED", "NO_TID", "FAILED"):
        assert getattr(_uffd, f"ATTR_{name}") == getattr(capture, f"ATTR_{name}")
    assert (_uffd.SYSCALL_USER, _uffd.SYSCALL_UNKNOWN) == (
        syscalls.SYSCALL_USER,
        syscalls.SYSCALL_UNKNOWN,
    )
    assert (_uffd.KIND_WRITE, _uffd.KIND_DISCARD) == (records.KIND_WRITE, records.KIND_DISCARD)
    assert _uffd.RECORD_SIZE == records.RECORD_SIZE


@pytest.mark.timeout(120)
def test_protect_while_the_handler_resolves_a_fault_keeps_the_page_guarded() -> None:
    """issue 9 item 6 (the handler's side): protect() re-arming a buffer
    while the handler still holds a fault of the old arming.  The handler
    then un-protected the page in the new arming with no record there, so a
    later write went unseen.  Held faults (the _debug(hold=1) hook) make the
    window as wide as the test needs; whether the first writer finishes
    during protect() or faults again after it is up to the scheduler, so
    each child runs several rounds."""
    out = run(
        """
        import ctypes, mmap, threading, time
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard import _uffd as core

        P = mmap.PAGESIZE
        for round in range(6):
            b = GuardedBuffer(4 * P, engine="sync", stacks=0)
            seen = core.handler_state()["faults"]
            core._debug(0, 1)                  # hold faults unresolved
            done = threading.Event()
            def writer():
                ctypes.memset(b.address + P, 1, 1)
                done.set()
            threading.Thread(target=writer, daemon=True).start()
            deadline = time.monotonic() + 10
            while core.handler_state()["faults"] <= seen and time.monotonic() < deadline:
                time.sleep(0.001)
            b.protect()        # un-protects (the writer may go on), re-arms
            core._debug(0, 0)  # the handler now finishes the old fault
            assert done.wait(10)
            time.sleep(0.05)
            ctypes.memset(b.address + P + 8, 2, 1)  # a write of the new arming
            pages = sorted({w.offset // P for w in b.writes})
            changed = sorted({c.offset // P for c in b.changes()})
            print(round, "pages", pages, "changed", changed)
            b.close()
        """,
        timeout=90,
    )
    rounds = out.strip().splitlines()
    assert len(rounds) == 6, out
    assert all(line.endswith("pages [1] changed [1]") for line in rounds), out
