"""Hostile use of the async and hybrid engines: threads (issue 9 item 1).

Everything that could crash or hang runs in a fresh interpreter with a
timeout; a crash shows up as a return code of -11 (SIGSEGV).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from pytest_uffd_guard import capabilities
from pytest_uffd_guard.async_tracker import async_unavailable

from ..conftest import run_python

PAGE = mmap.PAGESIZE


@pytest.fixture
def wp_async() -> None:
    """Skip unless the async engine (and so hybrid) runs here (Linux 6.7+)."""
    reason = async_unavailable(capabilities())
    if reason is not None:
        pytest.skip(f"async engine unavailable: {reason}")


def _last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, (
        f"rc {result.returncode} (-11: segfault)\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


# ------------------------------------------------------------------ item 1

THREADED_ASYNC = """
    import json, mmap, sys, threading
    from pytest_uffd_guard import GuardedBuffer
    P = mmap.PAGESIZE
    engine, threads, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    wrong = []
    def work(k):
        for i in range(rounds):
            with GuardedBuffer(4 * P, engine=engine) as b:
                memoryview(b)[P + k] = 1
                offsets = [w.offset for w in b.writes]
                if offsets != [P + k]:
                    wrong.append((k, i, offsets))
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool: t.start()
    for t in pool: t.join()
    print(json.dumps({"wrong": wrong[:5], "count": len(wrong)}))
"""


def _threaded_async(
    engine: str, prefix: list[str] | None = None, python: str = sys.executable, **kw: Any
) -> dict[str, Any]:
    import textwrap

    code = textwrap.dedent(THREADED_ASYNC)
    cmd = [*(prefix or []), python, "-c", code, engine, "4", "300"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    return _last_json(result)


@pytest.mark.timeout(300)
def test_async_records_read_from_threads_do_not_crash(wp_async: None) -> None:
    """Issue 9 item 1: 4 threads x 300 async buffers, each reading its records
    while the others scan: no segfault, each buffer finds exactly its write."""
    out = _threaded_async("async", env={**os.environ, "PYTHONPATH": _package_root()})
    assert out == {"wrong": [], "count": 0}


def _package_root() -> str:
    import pytest_uffd_guard

    return os.path.dirname(os.path.dirname(os.path.abspath(pytest_uffd_guard.__file__)))


@pytest.mark.timeout(300)
def test_async_records_read_from_threads_as_nobody(wp_async: None) -> None:
    """Issue 9 item 1, unprivileged: the same threads as the user nobody."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the user nobody with setpriv")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux) to run as nobody")
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    python = None
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run([*prefix, candidate, "-c", "pass"], timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            python = candidate
            break
    if python is None:
        pytest.skip("no Python interpreter is runnable by the user nobody")
    import pytest_uffd_guard

    root = tempfile.mkdtemp(prefix="uffd-nobody-")
    try:
        shutil.copytree(
            os.path.dirname(pytest_uffd_guard.__file__),
            os.path.join(root, "pytest_uffd_guard"),
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for dirpath, _dirs, files in os.walk(root):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644 | stat.S_IXUSR)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": root, "HOME": root}
        for key in ("PYTEST_UFFD_GUARD_HIDE_FEATURES",):
            if key in os.environ:
                env[key] = os.environ[key]
        out = _threaded_async("async", prefix=prefix, python=python, env=env, cwd=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert out == {"wrong": [], "count": 0}


@pytest.mark.timeout(300)
def test_hybrid_records_read_from_threads_after_switch(wp_async: None) -> None:
    """Issue 9 item 1, hybrid after its switch: threads keep writing new pages
    and reading records of their own switched buffers; nothing crashes and
    every page is reported once."""
    result = run_python(
        """
        import json, mmap, threading, time
        from pytest_uffd_guard import GuardedBuffer, hybrid_tracker
        hybrid_tracker.BUDGET = 4
        P = mmap.PAGESIZE
        wrong, unswitched = [], []
        def work(k):
            for i in range(40):
                with GuardedBuffer(64 * P, engine="hybrid") as b:
                    view = memoryview(b)
                    for p in range(8):
                        view[p * P + k] = 1
                    deadline = time.monotonic() + 10
                    while b._tracker.phase == "sync" and time.monotonic() < deadline:
                        time.sleep(0.001)
                    if b._tracker.phase != "async":
                        unswitched.append(i)
                    seen = [w.offset for w in b.writes]
                    for p in range(8, 64):
                        view[p * P + k] = 1
                        seen += [w.offset for w in b.writes[len(seen):]]
                    view.release()
                    if sorted(seen) != [p * P + k for p in range(64)]:
                        wrong.append((k, i, len(seen)))
        pool = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in pool: t.start()
        for t in pool: t.join()
        print(json.dumps({"wrong": wrong[:5], "unswitched": len(unswitched)}))
        """,
        timeout=240,
    )
    assert _last_json(result) == {"wrong": [], "unswitched": 0}


@pytest.mark.timeout(120)
def test_async_one_buffer_read_from_many_threads(wp_async: None) -> None:
    """Issue 9 item 1: threads writing pages of ONE async buffer and reading
    its records at once: no crash, each page reported exactly once."""
    result = run_python(
        """
        import json, mmap, threading
        from pytest_uffd_guard import GuardedBuffer
        P = mmap.PAGESIZE
        pages, threads = 512, 6
        b = GuardedBuffer(pages * P, engine="async")
        view = memoryview(b)
        def work(k):
            for p in range(k, pages, threads):
                view[p * P + 1] = 7
                b.writes
                b.overflowed
        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in pool: t.start()
        for t in pool: t.join()
        offsets = [w.offset for w in b.writes]
        view.release()
        b.close()
        offsets += [w.offset for w in b.writes[len(offsets):]]
        print(json.dumps({"n": len(offsets), "unique": len(set(offsets)),
                          "right": sorted(offsets) == [p * P + 1 for p in range(pages)]}))
        """,
        timeout=100,
    )
    assert _last_json(result) == {"n": 512, "unique": 512, "right": True}


def test_pagemap_scan_stays_inside_the_range(wp_async: None) -> None:
    """Issue 9 item 1: every region a scan yields lies within the range asked
    about, even where the written pages extend beyond it."""
    from pytest_uffd_guard import GuardedBuffer
    from pytest_uffd_guard.pagemap import PAGE_IS_WRITTEN, Pagemap

    with GuardedBuffer(8 * PAGE, engine="async") as buf:
        view = memoryview(buf)
        for page in range(8):
            view[page * PAGE] = 1
        view.release()
        start = buf.address
        with Pagemap() as pm:
            inner = list(
                pm.scan(
                    start + 2 * PAGE,
                    start + 5 * PAGE,
                    category_mask=PAGE_IS_WRITTEN,
                    return_mask=PAGE_IS_WRITTEN,
                )
            )
        assert [(s - start, e - start) for s, e, _ in inner] == [(2 * PAGE, 5 * PAGE)]
