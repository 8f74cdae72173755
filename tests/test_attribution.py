"""Naming the writer: stack, system call and thread of each recorded write.

Every write below is made on a line found with ``lineno()`` just above it,
and the test checks that exact file and line come back as the innermost
user frame of the record.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import pytest_uffd_guard
from pytest_uffd_guard import GuardedBuffer
from pytest_uffd_guard.kernel import capture
from pytest_uffd_guard.kernel.capabilities import capabilities
from pytest_uffd_guard.kernel.capture import DEFAULT_STACKS, parse_dump
from pytest_uffd_guard.kernel.records import Frame, WriteRecord
from pytest_uffd_guard.stacks import describe_writer, user_frames

from .conftest import bound, sync_buffers, sync_engine_code

# What is tested here is the sync engine's: where auto would run another one
# (a user-mode-only userfaultfd), buffers ask for sync by name.
GuardedBuffer = sync_buffers(GuardedBuffer)

PAGE = mmap.PAGESIZE
HELPERS = Path(__file__).parent / "helpers"

pytestmark = [
    pytest.mark.timeout(bound(60)),
    pytest.mark.skipif(
        not capabilities().available, reason=f"userfaultfd unavailable: {capabilities().reason}"
    ),
]


def lineno() -> int:
    """The caller's current line number."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno


def here(line: int, function: str) -> Frame:
    return Frame(__file__, line, function)


def only(buf: GuardedBuffer) -> WriteRecord:
    writes = buf.writes
    assert len(writes) == 1, writes
    return writes[0]


def test_python_level_write() -> None:
    """A write through the mmap API names this line and the main thread."""
    with GuardedBuffer(PAGE) as buf:
        line = lineno() + 1
        buf[10] = 1
        rec = only(buf)
    assert rec.stack_captured and rec.has_python is True
    assert user_frames(rec)[0] == here(line, "test_python_level_write")
    assert rec.syscall is None
    assert rec.thread_name == "MainThread" and rec.thread_id == threading.main_thread().native_id
    # The whole stack is there, innermost first: guard.py's __setitem__, then us.
    assert rec.stack[0].function == "__setitem__"
    assert rec.stack[1] == here(line, "test_python_level_write")


def test_numpy_ufunc_out() -> None:
    """A ufunc writing through out= (C code, GIL released) names the calling line."""
    np = pytest.importorskip("numpy")
    with GuardedBuffer(4 * PAGE) as buf:
        arr = np.frombuffer(buf, dtype=np.float64)
        line = lineno() + 1
        np.add(arr, 1.0, out=arr)
        writes = buf.writes
        del arr
    assert writes
    first = writes[0]
    assert first.stack_captured
    assert user_frames(first)[0] == here(line, "test_numpy_ufunc_out")


def test_ctypes_memmove() -> None:
    """ctypes.memmove (libc, no Python frame of its own) names the calling line."""
    with GuardedBuffer(PAGE) as buf:
        line = lineno() + 1
        ctypes.memmove(buf.address + 100, b"abc", 3)
        rec = only(buf)
    assert user_frames(rec)[0] == here(line, "test_ctypes_memmove")
    assert rec.stack[0] == here(line, "test_ctypes_memmove")


def test_threading_thread_with_name() -> None:
    """A write from a threading.Thread names the thread and its line."""
    lines = []

    def writer(buf: GuardedBuffer) -> None:
        lines.append(lineno() + 1)
        buf[PAGE + 1] = 7

    with GuardedBuffer(2 * PAGE) as buf:
        thread = threading.Thread(target=writer, args=(buf,), name="the-writer")
        thread.start()
        thread.join()
        rec = only(buf)
    assert rec.thread_name == "the-writer" and rec.thread_id == thread.native_id
    assert user_frames(rec)[0] == here(lines[0], "writer")
    assert rec.has_python is True


def test_thread_name_after_thread_object_is_gone() -> None:
    """A finished thread is still named when its Thread object was dropped
    before the records were read, as long as it was seen once."""

    def writer(buf: GuardedBuffer) -> None:
        buf[0] = 1

    with GuardedBuffer(PAGE) as buf:
        thread = threading.Thread(target=writer, args=(buf,), name="short-lived")
        thread.start()
        thread.join()
        tid = thread.native_id
        rec = only(buf)
    del thread
    assert rec.thread_name == "short-lived" and rec.thread_id == tid


@pytest.fixture(scope="module")
def pthread_writer(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the pthread helper")
    out = tmp_path_factory.mktemp("helpers") / "pthread_writer.so"
    subprocess.run(
        [
            gcc,
            "-shared",
            "-fPIC",
            "-O1",
            "-pthread",
            "-o",
            str(out),
            str(HELPERS / "pthread_writer.c"),
        ],
        check=True,
    )
    lib = ctypes.CDLL(str(out))
    lib.write_from_pthread.argtypes = [ctypes.c_size_t, ctypes.c_int]
    lib.write_from_pthread.restype = ctypes.c_long
    return lib


def test_pthread_without_python_state(pthread_writer: ctypes.CDLL) -> None:
    """A pthread started by C has no Python stack: say so, with its native id."""
    with GuardedBuffer(PAGE) as buf:
        tid = pthread_writer.write_from_pthread(buf.address + 5, 9)
        rec = only(buf)
    assert tid > 0 and rec.thread_id == tid
    assert rec.stack_captured and rec.has_python is False and rec.stack == ()
    assert rec.thread_name is None and rec.thread_comm
    assert "without Python state" in describe_writer(rec)
    assert buf.changes()[0].after == b"\x09"


def test_readinto_names_the_system_call(tmp_path: Path) -> None:
    """The kernel writing during read(2) names the call and the calling line."""
    if not capabilities().kernel_writes_seen:
        pytest.skip(
            "userfaultfd opened with UFFD_USER_MODE_ONLY: writes made by the kernel never "
            "reach a write-protect handler, so no system call is named"
        )
    data = os.urandom(3 * PAGE)
    path = tmp_path / "data"
    path.write_bytes(data)
    with GuardedBuffer(3 * PAGE) as buf, open(path, "rb", buffering=0) as f:
        line = lineno() + 1
        n = f.readinto(buf)
        writes = buf.writes
        assert n == len(data) and bytes(buf) == data
    assert [w.offset for w in writes] == [0, PAGE, 2 * PAGE]
    first = writes[0]
    assert first.syscall == "read"
    assert first.stack_captured
    assert user_frames(first)[0] == here(line, "test_readinto_names_the_system_call")
    # The rest of the same call: named, and honest about their stacks.
    assert all(w.syscall == "read" for w in writes)


def test_recv_into_and_readv() -> None:
    """recv_into and os.readv name recvfrom and readv."""
    if not capabilities().kernel_writes_seen:
        pytest.skip(
            "userfaultfd opened with UFFD_USER_MODE_ONLY: writes made by the kernel never "
            "reach a write-protect handler, so no system call is named"
        )
    import socket

    a, b = socket.socketpair()
    with a, b, GuardedBuffer(2 * PAGE) as buf:
        b.sendall(b"x" * 100)
        line = lineno() + 1
        assert a.recv_into(buf, 100) == 100
        r, w = os.pipe()
        os.write(w, b"y" * 10)
        os.readv(r, [memoryview(buf)[PAGE : PAGE + 10]])
        os.close(r)
        os.close(w)
        writes = buf.writes
    assert [w.syscall for w in writes] == ["recvfrom", "readv"]
    assert user_frames(writes[0])[0] == here(line, "test_recv_into_and_readv")
    assert user_frames(writes[1])[0] == here(line + 3, "test_recv_into_and_readv")


def test_bound_and_off() -> None:
    """stacks=N names the first N writes; stacks=0 none; re-arming resets."""
    with GuardedBuffer(5 * PAGE, stacks=2) as buf:
        for i in range(5):
            buf[i * PAGE] = 1
        writes = buf.writes
        assert [w.stack_captured for w in writes] == [True, True, False, False, False]
        assert "bound" in (writes[2].stack_note or "")
        buf.protect()
        buf[0] = 2
        assert buf.writes[0].stack_captured
    with GuardedBuffer(PAGE, stacks=0) as buf:
        buf[0] = 1
        rec = only(buf)
    assert not rec.stack_captured and rec.stack == () and "off" in (rec.stack_note or "")
    with pytest.raises(ValueError, match="stacks"):
        GuardedBuffer(PAGE, stacks=-1)


def test_default_bound() -> None:
    """Without stacks=, the first DEFAULT_STACKS writes are named."""
    with GuardedBuffer((DEFAULT_STACKS + 4) * PAGE) as buf:
        for i in range(DEFAULT_STACKS + 4):
            buf[i * PAGE] = 1
        captured = [w.stack_captured for w in buf.writes]
    assert captured == [True] * DEFAULT_STACKS + [False] * 4


def test_errno_is_preserved() -> None:
    """The capture signal does not change errno in the writing thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.memset.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t]
    with GuardedBuffer(PAGE) as buf:
        ctypes.set_errno(errno.ENOTTY)
        libc.memset(buf.address, 1, 16)
        assert ctypes.get_errno() == errno.ENOTTY
        assert only(buf).stack_captured


def test_thread_blocking_the_signal_is_not_signalled() -> None:
    """A thread that blocks the capture signal is recorded without a stack
    (a signal left pending would fire later, somewhere else)."""
    signum = capture.capture_signal()
    if signum is None:
        with GuardedBuffer(PAGE) as warm:
            warm[0] = 0
        signum = capture.capture_signal()
    assert signum is not None

    def writer(buf: GuardedBuffer) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
        buf[0] = 1
        assert signum not in signal.sigpending()

    with GuardedBuffer(2 * PAGE) as buf:
        thread = threading.Thread(target=writer, args=(buf,))
        thread.start()
        thread.join()
        rec = only(buf)
        buf[PAGE] = 1  # the next write is captured again
        assert buf.writes[-1].stack_captured
    assert not rec.stack_captured and "blocks the capture signal" in (rec.stack_note or "")


def test_writes_from_many_threads_never_misattributed() -> None:
    """Concurrent writers: every captured stack is its own thread's."""
    barrier = threading.Barrier(8)

    def writer(buf: GuardedBuffer, index: int) -> None:
        barrier.wait()
        buf[index * PAGE] = 1

    with GuardedBuffer(8 * PAGE, stacks=8) as buf:
        threads = [threading.Thread(target=writer, args=(buf, i), name=f"w{i}") for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writes = buf.writes
    assert len(writes) == 8
    captured = [w for w in writes if w.stack_captured]
    assert captured  # at least one; others may find a capture in flight
    for w in captured:
        assert user_frames(w)[0].function == "writer"
        assert w.thread_name == f"w{w.offset // PAGE}"
    for w in writes:
        if not w.stack_captured:
            assert w.stack == () and w.stack_note


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", sync_engine_code(code)],
        capture_output=True,
        text=True,
        timeout=bound(60),
    )


def test_forked_child_captures_into_its_own_file() -> None:
    """After fork, parent and child each name their own writers."""
    result = run_python(
        """
        import os
        from pytest_uffd_guard import GuardedBuffer
        a = GuardedBuffer(4096)
        a[0] = 1
        assert a.writes[0].stack_captured
        pid = os.fork()
        if pid == 0:
            b = GuardedBuffer(4096)
            b[1] = 1                                   # line 10
            w = b.writes[0]
            ok = w.stack_captured and w.stack[1].lineno == 10
            os._exit(0 if ok else 3)
        a.protect()
        a[2] = 1                                       # line 15
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        w = a.writes[0]
        assert w.stack_captured and w.stack[1].lineno == 15, w
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_signal_in_use_is_not_picked() -> None:
    """A real-time signal the program handles is left alone."""
    result = run_python(
        """
        import signal
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard.kernel import capture
        hits = []
        signal.signal(signal.SIGRTMAX, lambda *a: hits.append(1))
        b = GuardedBuffer(4096)
        b[0] = 1
        assert b.writes[0].stack_captured
        assert capture.capture_signal() == signal.SIGRTMAX - 1
        assert not hits
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_user_faulthandler_dump_elsewhere_is_not_attributed() -> None:
    """A dump nobody asked for (someone sends our signal) is never taken
    for a write's stack: dumps are read only between a record's offset and
    its own marker."""
    result = run_python(
        """
        import os, signal, threading
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard.kernel import capture
        b = GuardedBuffer(2 * 4096)
        b[0] = 1
        sig = capture.capture_signal()
        signal.pthread_kill(threading.main_thread().ident, sig)   # a stray one
        def inner():
            b[4096] = 1                                            # line 11
        inner()
        w = b.writes
        assert [x.stack_captured for x in w] == [True, True], w
        assert w[1].stack[1].function == "inner" and w[1].stack[1].lineno == 10, w[1]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ------------------------------------------------------------ pure units


def test_parse_dump() -> None:
    """faulthandler's format: frames innermost first; anything odd is refused."""
    text = (
        "Stack (most recent call first):\n"
        '  File "/a/b.py", line 3 in f\n'
        '  File "/a/c.py", line ??? in <module>\n'
    )
    assert parse_dump(text) == (True, (Frame("/a/b.py", 3, "f"), Frame("/a/c.py", 0, "<module>")))
    assert parse_dump("") == (False, ())
    assert parse_dump(text + text) is None
    assert parse_dump("garbage\n") is None


def test_user_frames_skip_package_and_stdlib() -> None:
    """user_frames drops this package's and the standard library's frames."""
    pkg = os.path.dirname(pytest_uffd_guard.__file__)
    stdlib = os.path.dirname(tempfile.__file__)
    stack = (
        Frame(os.path.join(pkg, "guard.py"), 1, "__setitem__"),
        Frame(os.path.join(stdlib, "threading.py"), 2, "run"),
        Frame("<frozen importlib._bootstrap>", 3, "_call"),
        Frame("/proj/mod.py", 4, "g"),
        Frame("/proj/test_x.py", 5, "test_x"),
    )
    rec = WriteRecord(0, True, 1, "t", 0.0, 1, stack=stack, stack_captured=True)
    assert user_frames(rec) == [stack[3], stack[4]]
    assert user_frames(rec, 1) == [stack[3]]
    assert "/proj/mod.py:4 in g" in describe_writer(rec)
