"""Threads x fork x signals x engines, all at once (issue 9).

Each case runs in a child process with a hard timeout: writer threads store
into random pages of a guarded buffer while another thread forks children
(which write, read their records and close the buffer), a third sends
the process signals with a Python handler and a fourth re-arms the buffer
and reads its records.  Nothing may hang or crash, every
store must land (guarding never changes what the program observes), and
every changed page must have a record.
"""

from __future__ import annotations

import subprocess

import pytest

from pytest_uffd_guard import capabilities
from tests.conftest import run_python

CHILD = """
import mmap, os, random, signal, sys, threading, time
from pytest_uffd_guard import GuardedBuffer

engine = sys.argv[1] if len(sys.argv) > 1 else "{engine}"
P = mmap.PAGESIZE
PAGES = 64
signals = 0

def on_signal(signum, frame):
    global signals
    signals += 1

signal.signal(signal.SIGUSR1, on_signal)
for round_ in range(3):
    buf = GuardedBuffer(PAGES * P, engine=engine, stacks=2)
    expected = bytearray(PAGES * P)
    lock = threading.Lock()
    stop = threading.Event()

    def writer(seed):
        rng = random.Random(seed)
        view = memoryview(buf)
        for _ in range(300):
            off = rng.randrange(PAGES * P)
            value = rng.randrange(1, 256)
            with lock:               # the expected image follows the stores
                view[off] = value
                expected[off] = value
        view.release()

    def forker():
        while not stop.is_set():
            pid = os.fork()
            if pid == 0:
                try:
                    memoryview(buf)[0] = 7
                    buf.writes
                    buf.close()
                finally:
                    os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0, status
            time.sleep(0.005)

    def protector():             # re-arms and reads records meanwhile
        while not stop.is_set():
            buf.protect()
            buf.writes
            time.sleep(0.003)

    def signaller():
        while not stop.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.002)

    helpers = [threading.Thread(target=f) for f in (forker, signaller, protector)]
    writers = [threading.Thread(target=writer, args=(round_ * 10 + k,)) for k in range(4)]
    for t in helpers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in helpers:
        t.join()
    assert bytes(buf[:]) == bytes(expected), "a store was lost or changed"
    written = {{w.offset // P for w in buf.writes}}
    changed = {{c.offset // P for c in buf.changes()}}
    assert changed <= written, sorted(changed - written)
    buf.close()
print("ok", signals > 0)
"""


def _engines() -> list[str]:
    caps = capabilities()
    found = ["diff"]
    if caps.available:
        found.append("sync")
        if caps.has("wp_async"):
            found += ["async", "hybrid"]
    return found


@pytest.mark.timeout(240)
@pytest.mark.parametrize("engine", ["sync", "async", "hybrid", "diff"])
def test_threads_fork_and_signals_at_once(engine: str) -> None:
    if engine not in _engines():
        need = "WP_ASYNC (Linux 6.7+)" if engine in ("async", "hybrid") else "userfaultfd"
        pytest.skip(f"the {engine} engine needs {need} here")
    try:
        result = run_python(CHILD.format(engine=engine), timeout=180)
    except subprocess.TimeoutExpired:
        result = None
    if result is None:
        pytest.fail(f"{engine}: the child hung (threads x fork x signals)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "True"], result.stdout + result.stderr
