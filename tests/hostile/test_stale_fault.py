"""A fault held past its guard's removal must not open a new guard's page
(found while splitting the C core, issue 10).

Everything that could hang runs in a subprocess with a timeout.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import bound, run_python

pytestmark = pytest.mark.usefixtures("uffd")


@pytest.mark.timeout(180)
def test_a_stale_fault_does_not_unprotect_the_next_guard_of_its_range() -> None:
    """issue 10 (C core): a write fault stayed unresolved (here: its writer
    was in a system call and the namer never claimed it) while its buffer
    was closed and a new guard registered and protected the same range.
    When the handler finally resolved the old fault it un-protected the
    page in the new guard, whose next write then went unseen.  Seen as an
    intermittent failure of test_core's handler-error test under load: the
    previous test's held fault opened the next buffer's page."""
    pending = bound(2)
    code = f"""
        import ctypes, mmap, os, signal, tempfile, threading, time
        from pytest_uffd_guard import _uffd as core
        from pytest_uffd_guard.kernel.handler import HANDLER as ENGINE
        from pytest_uffd_guard.kernel.capabilities import capabilities
        from pytest_uffd_guard.kernel.uffd import open_uffd

        P = mmap.PAGESIZE
        caps = capabilities()
        fd = open_uffd(caps.open_method)
        features = ENGINE.features(caps)
        core.api(fd, features)
        core.handler_start(fd, P, features)
        dump = tempfile.TemporaryFile()
        core.attribution_setup(signal.SIGRTMIN + 3, dump.fileno())
        core.attribution_enable(True)
        core.namer_setup({pending}, 0.0)   # a namer that never claims
        buf = mmap.mmap(-1, P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shmem WP needs 5.19
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf[0] = 1                               # populated
        old, _ = core.guard_add(addr, P, P, 16, 1)
        core.guard_protect(old, True)
        r, w = os.pipe()
        os.write(w, b"x" * 16)
        target = (ctypes.c_char * 16).from_address(addr + 64)
        reader = threading.Thread(target=os.readv, args=(r, [target]), daemon=True)
        reader.start()                           # faults inside readv(2)
        deadline = time.monotonic() + {bound(10)}
        while core.namer_state()["request"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert core.namer_state()["request"] != 0, "the fault never reached the namer"
        core.guard_remove(old)                   # wakes the reader; the fault stays held
        reader.join({bound(10)})
        new, _ = core.guard_add(addr, P, P, 16)  # the same range, a new guard
        core.guard_protect(new, True)
        while core.namer_state()["gil_timeouts"] == 0 and time.monotonic() < deadline + {pending}:
            time.sleep(0.01)                     # the handler gives up naming...
        time.sleep({bound(0.2)})                 # ...and resolves the old fault
        ctypes.memset(addr + 8, 2, 1)            # a write in the new guard
        blob, overflow, duplicates = core.guard_drain(new)
        print("records", len(blob) // core.RECORD_SIZE)
        core.handler_stop()
        """
    try:
        result = run_python(code, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the child hung")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["records", "1"], result.stdout
