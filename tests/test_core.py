"""The core engine against the real kernel: what is recorded, what is not,
and that nothing ever hangs.  Scenarios that change process-wide state
(fork, exit, simulated kernels) run in a fresh interpreter."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pytest_uffd_guard import (
    BufferAllocationError,
    BufferClosedError,
    GuardedBuffer,
    InvalidBufferError,
    TrackingStoppedError,
    UnsupportedPlatformError,
    capabilities,
)
from pytest_uffd_guard import _uffd as core
from pytest_uffd_guard.kernel.capabilities import wp_since

from .conftest import bound, expected_offset, expected_write, run_python, sync_buffers

# These are the sync engine's tests: where auto would run another engine (a
# user-mode-only userfaultfd), buffers ask for sync by name.
GuardedBuffer = sync_buffers(GuardedBuffer)

PAGE = mmap.PAGESIZE

# bound(): generous under emulation (tools/run-on-kernel scales it), never absent.
pytestmark = [pytest.mark.usefixtures("uffd"), pytest.mark.timeout(bound(60))]


def offsets(buf: GuardedBuffer) -> list[int]:
    return [w.offset for w in buf.writes]


def kernel_writes_seen() -> None:
    if not capabilities().kernel_writes_seen:
        pytest.skip("userfaultfd opened with UFFD_USER_MODE_ONLY: kernel writes give EFAULT")


# ---------------------------------------------------------------- recording


def test_python_write_recorded_with_exact_offset() -> None:
    with GuardedBuffer(4 * PAGE, name="frame") as buf:
        view = memoryview(buf)
        view[PAGE + 123] = 7
        del view
        [w] = buf.writes
        assert (w.offset, w.exact) == expected_write(PAGE + 123)
        assert w.thread_id == threading.get_native_id()
        assert w.thread_name == "MainThread"
        assert 0 < w.time <= time.monotonic()


def test_numpy_write_recorded() -> None:
    np = pytest.importorskip("numpy")
    with GuardedBuffer(np.arange(4096, dtype=np.int32)) as buf:
        arr = np.frombuffer(buf, dtype=np.int32)
        np.multiply(arr[1500:1502], 2, out=arr[1500:1502])
        del arr
        assert offsets(buf) == [expected_offset(1500 * 4)]
        # 1500 -> 3000 and 1501 -> 3002 change the two low bytes of each int32
        changes = buf.changes()
        assert [(c.offset, c.length) for c in changes] == [(6000, 2), (6004, 2)]
        assert buf[6000:6008] == np.array([3000, 3002], dtype=np.int32).tobytes()


def test_ctypes_memmove_recorded() -> None:
    with GuardedBuffer(2 * PAGE) as buf:
        ctypes.memmove(buf.address + PAGE + 9, b"abc", 3)
        # The offset is that of the first store that faulted: memmove may
        # store the tail of a short copy first.
        [offset] = offsets(buf)
        assert expected_offset(PAGE + 9) <= offset <= expected_offset(PAGE + 11)
        assert buf[PAGE + 9 : PAGE + 12] == b"abc"


def test_write_from_thread_names_the_thread() -> None:
    with GuardedBuffer(PAGE) as buf:
        box: list[int] = []

        def writer() -> None:
            box.append(threading.get_native_id())
            buf[100] = 1

        thread = threading.Thread(target=writer, name="decoder")
        thread.start()
        # Drain while the thread is alive is not required: names are kept.
        thread.join(10)
        [w] = buf.writes
        assert w.thread_id == box[0]


def test_readinto_from_kernel_recorded(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kernel_writes_seen()
    path = tmp_path / "data"
    path.write_bytes(b"K" * 100)
    with GuardedBuffer(2 * PAGE) as buf:
        with open(path, "rb", buffering=0) as f:
            view = memoryview(buf)
            assert f.readinto(view[PAGE + 50 : PAGE + 150]) == 100
            del view
        assert offsets(buf) == [expected_offset(PAGE + 50)]
        assert buf[PAGE + 50 : PAGE + 150] == b"K" * 100


def test_readv_and_recv_into_from_kernel_recorded() -> None:
    kernel_writes_seen()
    with GuardedBuffer(3 * PAGE) as buf:
        r, w = os.pipe()
        os.write(w, b"xyz")
        view = memoryview(buf)
        assert os.readv(r, [view[10:13]]) == 3
        os.close(r)
        os.close(w)
        a, b = socket.socketpair()
        a.sendall(b"hello")
        assert b.recv_into(view[2 * PAGE + 1 : 2 * PAGE + 6]) == 5
        a.close()
        b.close()
        del view
        assert offsets(buf) == [expected_offset(10), expected_offset(2 * PAGE + 1)]


def test_every_page_recorded_once_and_contents_exact() -> None:
    pages = 64
    with GuardedBuffer(pages * PAGE) as buf:
        expected = bytearray(pages * PAGE)
        for page in range(0, pages, 3):
            offset = page * PAGE + page  # a different byte in each page
            buf[offset] = page + 1
            buf[offset + 1] = page + 2  # same page: no second fault
            expected[offset : offset + 2] = bytes([page + 1, page + 2])
        assert offsets(buf) == [expected_offset(p * PAGE + p) for p in range(0, pages, 3)]
        assert buf[:] == bytes(expected)
        assert [(c.offset, c.length) for c in buf.changes()] == [
            (p * PAGE + p, 2) for p in range(0, pages, 3)
        ]


def test_busy_thread_pool_all_writes_seen() -> None:
    pages = 256
    with GuardedBuffer(pages * PAGE) as buf:

        def write(page: int) -> None:
            ctypes.memset(buf.address + page * PAGE + 7, 0xAB, 3)

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(write, range(pages)))
        seen = sorted({w.offset for w in buf.writes})
        assert seen == [expected_offset(p * PAGE + 7) for p in range(pages)]
        assert len(buf.changes()) == pages
        assert buf.overflowed == 0


def test_reads_never_fault_and_others_untouched() -> None:
    with GuardedBuffer(b"\x01" * (8 * PAGE)) as buf:
        neighbour = mmap.mmap(-1, 4 * PAGE)
        plain = bytearray(PAGE)
        before = core.handler_state()["faults"]
        assert sum(buf[:]) == 8 * PAGE
        assert bytes(memoryview(buf)[PAGE : PAGE + 4]) == b"\x01" * 4
        neighbour[:] = b"\x02" * (4 * PAGE)
        plain[:] = b"\x03" * PAGE
        assert core.handler_state()["faults"] == before
        assert buf.writes == [] and buf.changes() == []
        neighbour.close()


def test_same_value_write_recorded_but_not_a_change() -> None:
    with GuardedBuffer(b"\x05" * PAGE) as buf:
        buf[3] = 5
        assert offsets(buf) == [expected_offset(3)]
        assert buf.changes() == []


def test_overrun_into_page_slack_is_recorded() -> None:
    with GuardedBuffer(100) as buf:
        ctypes.memset(buf.address + 100, 1, 1)  # past len(), inside the page
        assert offsets(buf) == [expected_offset(100)]
        assert len(buf) == 100


def test_source_buffers_are_copied() -> None:
    data = bytearray(b"hello world")
    with GuardedBuffer(data, name="copy") as buf:
        data[0] = ord("j")
        assert buf[:] == b"hello world"
        assert len(buf) == 11 and buf.name == "copy"
    np = pytest.importorskip("numpy")
    array = np.arange(12, dtype=np.float64).reshape(3, 4)
    with GuardedBuffer(array) as buf:
        assert np.array_equal(np.frombuffer(buf, dtype=np.float64).reshape(3, 4), array)


# ------------------------------------------------------------ re-arming


def test_protect_rearms_with_new_snapshot() -> None:
    with GuardedBuffer(2 * PAGE) as buf:
        buf[1] = 1
        assert offsets(buf) == [expected_offset(1)]
        buf.protect()
        assert buf.writes == [] and buf.changes() == []
        buf[2] = 2  # same page again: protected again
        assert offsets(buf) == [expected_offset(2)]
        assert [(c.offset, c.after) for c in buf.changes()] == [(2, b"\x02")]


def test_unprotected_block_neither_records_nor_reports() -> None:
    with GuardedBuffer(4 * PAGE) as buf:
        buf[0] = 1
        with buf.unprotected():
            buf[PAGE] = 2
            buf[0] = 3
        assert offsets(buf) == [0]
        # Byte 0 was rewritten inside the block: its value there became the
        # baseline, as documented.
        assert buf.changes() == []
        buf[2 * PAGE] = 4
        assert offsets(buf) == [0, 2 * PAGE]
        assert [c.offset for c in buf.changes()] == [2 * PAGE]


# ------------------------------------------------------------ lifecycle


def test_close_keeps_results_and_rejects_use() -> None:
    buf = GuardedBuffer(PAGE, name="done")
    buf[5] = 9
    buf.close()
    buf.close()  # idempotent
    assert buf.closed and not buf.tracking
    assert offsets(buf) == [expected_offset(5)]
    assert [(c.offset, c.after) for c in buf.changes()] == [(5, b"\x09")]
    with pytest.raises(BufferClosedError, match="'done' is closed"):
        buf[0]
    with pytest.raises(BufferClosedError):
        buf[0] = 1
    with pytest.raises(BufferClosedError):
        buf.protect()


def test_close_with_live_view_defers_unmap() -> None:
    buf = GuardedBuffer(PAGE)
    view = memoryview(buf)
    buf.close()
    view[0] = 1  # the memory is still mapped: no crash, not tracked
    assert buf.writes == []
    del view


def test_close_frees_a_writer_blocked_in_the_handler() -> None:
    buf = GuardedBuffer(PAGE)
    core._debug(0, 1)  # hold faults unresolved
    try:
        done = threading.Event()

        def writer() -> None:
            ctypes.memset(buf.address + 1, 1, 1)
            done.set()

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        assert not done.wait(0.3), "the writer should be blocked in the fault"
        buf.close()
        assert done.wait(10), "closing the buffer must release the blocked writer"
        thread.join(10)
    finally:
        core._debug(0, 0)
    # The fault was recorded.  The store itself completes after close()
    # returned (it raced the close), so it may land after the final diff.
    assert offsets(buf) == [expected_offset(1)]


def test_handler_error_frees_writers_and_engine_recovers() -> None:
    buf = GuardedBuffer(2 * PAGE)
    core._debug(1, 0)  # the next fault is fatal for the handler
    done = threading.Event()

    def writer() -> None:
        buf[PAGE] = 1
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert done.wait(10), "a failing handler must not leave the writer blocked"
    thread.join(10)
    state = core.handler_state()
    assert state["failed"] and "injected" in state["error"]
    # A new buffer restarts the engine and tells the old one why it stopped.
    with GuardedBuffer(PAGE) as fresh:
        fresh[0] = 1
        assert offsets(fresh) == [0]
    assert not buf.tracking
    assert "injected" in (buf.stopped_reason or "")
    assert offsets(buf) == [PAGE]
    buf[0] = 2  # unregistered: plain memory now
    with pytest.raises(TrackingStoppedError, match="no longer tracked"):
        buf.protect()
    buf.close()


def test_thousands_of_buffers_leak_nothing() -> None:
    def census() -> tuple[int, int, int]:
        with open("/proc/self/maps") as f:
            maps = len(f.readlines())
        return len(os.listdir("/proc/self/fd")), maps, len(os.listdir("/proc/self/task"))

    def churn(n: int) -> GuardedBuffer:
        for i in range(n):
            with GuardedBuffer(3 * PAGE) as buf:
                buf[i % (3 * PAGE)] = 1
            assert len(buf.writes) == 1
        return buf

    # Warm up with the same work: the engine starts, and glibc gives the
    # handler and namer threads their malloc arenas (a 64 MiB reservation
    # each, made the first time a thread allocates under contention).
    churn(200)
    before = census()
    buf = churn(2000)
    del buf  # the address range goes back with the object, see close()
    after = census()
    assert after == before
    assert core.handler_state()["guards"] == 0


def test_garbage_collected_buffer_releases_its_guard() -> None:
    import gc

    guards = core.handler_state()["guards"]
    buf = GuardedBuffer(PAGE)
    assert core.handler_state()["guards"] == guards + 1
    del buf
    gc.collect()
    assert core.handler_state()["guards"] == guards


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_bad_sizes(size: int) -> None:
    with pytest.raises(InvalidBufferError, match="at least one byte"):
        GuardedBuffer(size)


def test_empty_data_and_wrong_types() -> None:
    with pytest.raises(InvalidBufferError, match="at least one byte"):
        GuardedBuffer(b"")
    with pytest.raises(InvalidBufferError, match="does not expose a buffer"):
        GuardedBuffer([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(InvalidBufferError, match="encode it first"):
        GuardedBuffer("text")
    with pytest.raises(InvalidBufferError, match="must be an int"):
        GuardedBuffer(4096.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidBufferError, match="bool"):
        GuardedBuffer(True)


def test_non_contiguous_data_rejected() -> None:
    np = pytest.importorskip("numpy")
    with pytest.raises(InvalidBufferError, match="not C-contiguous") as info:
        GuardedBuffer(np.zeros((8, 8))[:, ::2])
    assert "ascontiguousarray" in str(info.value)


def test_size_mmap_cannot_give() -> None:
    with pytest.raises((BufferAllocationError, InvalidBufferError), match=r"map|address"):
        GuardedBuffer(1 << 62)


def test_not_linux_raises_documented_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(UnsupportedPlatformError, match="exists only on Linux"):
        GuardedBuffer(PAGE)


def test_resize_and_pickle_refused() -> None:
    import pickle

    with GuardedBuffer(PAGE) as buf:
        with pytest.raises(InvalidBufferError, match="cannot be resized"):
            buf.resize(2 * PAGE)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(buf)


# ---------------------------------------- fresh processes: fork, exit, kernels


def test_fork_child_writes_freely_and_guards_its_own() -> None:
    result = run_python(
        """
        import os, mmap
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard import capabilities as _caps
        def at(offset):  # the page start without EXACT_ADDRESS (Linux < 5.18)
            return offset if _caps().has("exact_address") else offset - offset % mmap.PAGESIZE
        buf = GuardedBuffer(2 * mmap.PAGESIZE)
        pid = os.fork()
        if pid == 0:
            buf[0] = 1                       # inherited copy: not tracked, must not block
            assert not buf.tracking and "fork" in buf.stopped_reason
            own = GuardedBuffer(mmap.PAGESIZE)
            own[7] = 1
            assert [w.offset for w in own.writes] == [at(7)], own.writes
            own.close(); buf.close()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        buf[mmap.PAGESIZE + 3] = 2           # the parent still tracks
        assert [w.offset for w in buf.writes] == [at(mmap.PAGESIZE + 3)], buf.writes
        print("ok")
        """,
        sync_engine=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_interpreter_exit_with_open_buffers_and_busy_writer() -> None:
    result = run_python(
        """
        import threading, ctypes, mmap
        from pytest_uffd_guard import GuardedBuffer
        bufs = [GuardedBuffer(4 * mmap.PAGESIZE) for _ in range(3)]
        def spin():
            i = 0
            while True:
                b = bufs[i % 3]
                ctypes.memset(b.address + (i * 1031) % (4 * mmap.PAGESIZE), 1, 1)
                i += 1
        threading.Thread(target=spin, daemon=True).start()
        bufs[0][0] = 1
        print("exiting")
        """,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "exiting"


def test_without_wp_unpopulated_untouched_pages_still_caught() -> None:
    # Simulates Linux < 6.4: the engine must pre-fault pages before protecting.
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import GuardedBuffer, capabilities
        from pytest_uffd_guard import capabilities as _caps
        def at(offset):  # the page start without EXACT_ADDRESS (Linux < 5.18)
            return offset if _caps().has("exact_address") else offset - offset % mmap.PAGESIZE
        assert not capabilities().has("wp_unpopulated")
        buf = GuardedBuffer(16 * mmap.PAGESIZE)
        for page in range(16):
            buf[page * mmap.PAGESIZE + 1] = 1
        assert [w.offset for w in buf.writes] == [at(p * mmap.PAGESIZE + 1) for p in range(16)]
        print("ok")
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_unpopulated"},
    )
    assert result.returncode == 0, result.stderr


def test_without_exact_address_offsets_are_pages() -> None:
    result = run_python(
        """
        import mmap
        from pytest_uffd_guard import GuardedBuffer
        buf = GuardedBuffer(2 * mmap.PAGESIZE)
        buf[mmap.PAGESIZE + 77] = 1
        [w] = buf.writes
        assert (w.offset, w.exact) == (mmap.PAGESIZE, False), w
        assert buf.changes()[0].offset == mmap.PAGESIZE + 77
        print("ok")
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "exact_address"},
        sync_engine=True,
    )
    assert result.returncode == 0, result.stderr


def test_user_mode_only_kernel_write_fails_with_efault() -> None:
    if capabilities().kernel_version < (5, 11):
        pytest.skip("UFFD_USER_MODE_ONLY needs Linux 5.11+")
    result = run_python(
        """
        import os, mmap, errno
        from pytest_uffd_guard import GuardedBuffer, capabilities
        caps = capabilities()
        assert caps.open_method == "syscall-user-mode-only" and not caps.kernel_writes_seen
        buf = GuardedBuffer(mmap.PAGESIZE, engine="sync")  # auto would not run sync here
        r, w = os.pipe()
        os.write(w, b"abc")
        try:
            os.readv(r, [memoryview(buf)[0:3]])
        except OSError as exc:
            assert exc.errno == errno.EFAULT, exc
            print("efault")
        buf[5] = 1                    # user-mode writes are still recorded
        assert [x.offset for x in buf.writes] == [5]
        """,
        env={"PYTEST_UFFD_GUARD_OPEN": "syscall-user-mode-only"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "efault"
    assert errno.EFAULT == 14


def test_no_write_protect_gives_cause_and_fix() -> None:
    result = run_python(
        """
        from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError, capabilities
        assert not capabilities().available
        try:
            GuardedBuffer(4096)
        except UffdUnavailableError as exc:
            print(exc.cause); print(exc.remedy)
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "pagefault_flag_wp"},
    )
    assert result.returncode == 0, result.stderr
    assert "no userfaultfd write-protection" in result.stdout
    assert f"Linux {wp_since()}" in result.stdout  # 5.7; arm64 6.10


def test_import_opens_nothing() -> None:
    result = run_python(
        """
        import os, sys
        fds = set(os.listdir("/proc/self/fd")); tasks = len(os.listdir("/proc/self/task"))
        import pytest_uffd_guard, pytest_uffd_guard.plugin
        assert set(os.listdir("/proc/self/fd")) == fds
        assert len(os.listdir("/proc/self/task")) == tasks
        assert "ctypes" not in sys.modules and "pytest_uffd_guard._uffd" not in sys.modules
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr


def _python_for_nobody() -> str | None:
    """An interpreter the user nobody may run (the venv may live under /root)
    and that can load this package's compiled core (issue 12: a 3.11 cannot
    load the cpython-313t extension of a free-threaded run)."""
    import shutil
    import subprocess

    import pytest_uffd_guard

    package = os.path.dirname(pytest_uffd_guard.__file__)
    suffixes = sorted(
        n[len("_uffd") :]
        for n in os.listdir(package)
        if n.startswith("_uffd.") and n.endswith(".so")
    )

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run(
                [
                    setpriv,
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    candidate,
                    "-c",
                    "import importlib.machinery as m, sys; assert sys.version_info >= (3, 9)"
                    f" and any(s in m.EXTENSION_SUFFIXES for s in {suffixes!r})",
                ],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return candidate
    return None


def test_unprivileged_user_really_runs() -> None:
    """As nobody: the user-mode-only path works; auto records kernel writes, sync
    asked for by name makes them fail with EFAULT."""
    import shutil
    import stat
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the user nobody with setpriv")
    python = _python_for_nobody()
    if python is None:
        pytest.skip("setpriv missing, or no Python that the user nobody can run")
    import pytest_uffd_guard

    package = os.path.dirname(pytest_uffd_guard.__file__)
    root = tempfile.mkdtemp(prefix="uffd-nobody-")
    try:
        shutil.copytree(
            package,
            os.path.join(root, "pytest_uffd_guard"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for dirpath, _dirnames, filenames in os.walk(root):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644 | stat.S_IXUSR)
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
        result = run_python(
            """
            import errno, os, mmap, json
            from pytest_uffd_guard import GuardedBuffer, capabilities
            caps = capabilities()
            out = {"uid": os.getuid(), "available": caps.available, "method": caps.open_method,
                   "reason": caps.reason, "remedy": caps.remedy,
                   "attempts": [(a.method, a.errno) for a in caps.open_attempts]}
            if not caps.available:
                print(json.dumps(out))
                raise SystemExit(0)
            buf = GuardedBuffer(2 * mmap.PAGESIZE)
            buf[mmap.PAGESIZE + 5] = 1
            out["writes"] = [w.offset for w in buf.writes]
            r, w = os.pipe(); os.write(w, b"abc")
            try:
                os.readv(r, [memoryview(buf)[0:3]])
                seen = 0 in [x.offset for x in buf.writes]
                out["kernel_write"] = "recorded" if seen else "missed"
            except OSError as exc:
                out["kernel_write"] = errno.errorcode[exc.errno]
            sync = GuardedBuffer(mmap.PAGESIZE, engine="sync")
            os.write(w, b"abc")
            try:
                os.readv(r, [memoryview(sync)[0:3]])
                seen = 0 in [x.offset for x in sync.writes]
                out["sync_kernel_write"] = "recorded" if seen else "missed"
            except OSError as exc:
                out["sync_kernel_write"] = errno.errorcode[exc.errno]
            print(json.dumps(out))
            """,
            env={"PYTHONPATH": root, "HOME": root},
            python=python,
            prefix=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    import json

    out = json.loads(result.stdout)
    if sysctl == "0" and capabilities().kernel_version < (5, 11):
        # Before 5.11 the sysctl at 0 denies unprivileged users every userfaultfd.
        assert out["uid"] == 65534 and not out["available"], out
        assert dict(out["attempts"])["syscall"] == errno.EPERM
        assert "before Linux 5.11" in out["reason"] and "=1" in out["remedy"], out
        return
    assert out["uid"] == 65534 and out["available"], out
    assert out["writes"] == [expected_offset(mmap.PAGESIZE + 5)]
    if sysctl == "0":
        assert out["method"] == "syscall-user-mode-only", out
        assert dict(out["attempts"])["syscall"] == errno.EPERM
        assert out["kernel_write"] == "recorded"  # auto: async (6.7+) or diff
        assert out["sync_kernel_write"] == "EFAULT"
    else:
        assert out["method"] in ("syscall", "dev")
        assert out["kernel_write"] == out["sync_kernel_write"] == "recorded"
