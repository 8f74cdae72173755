"""The doctor's end-to-end write checks, run in a child process.

``end_to_end()`` starts ``python -m pytest_uffd_guard _e2e``, whose
``run_e2e_cases()`` writes into protected pages on fresh userfaultfds: a
running handler is never disturbed and a kernel bug cannot hang the caller.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from typing import Any

from .kernel.capabilities import FEATURES, probe
from .kernel.memory import address_of
from .kernel.pagemap import Pagemap
from .kernel.uffd import fresh_fd

PAGE = mmap.PAGESIZE

UNTOUCHED_TRAP = (
    "not caught - expected on kernels without WP_UNPOPULATED; "
    "pytest-uffd-guard pre-faults pages to avoid it"
)


def end_to_end(timeout: float = 30) -> list[dict[str, Any]]:
    """Run the write checks in a child process; list of case dicts."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest_uffd_guard", "_e2e"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return [{"case": "end-to-end", "caught": None, "note": f"child hung for {timeout}s"}]
    except OSError as exc:
        note = f"not run: could not start {sys.executable}: {exc.strerror}"
        return [{"case": "end-to-end", "caught": None, "note": note}]
    try:
        cases: list[dict[str, Any]] = json.loads(result.stdout)
    except ValueError:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return [{"case": "end-to-end", "caught": None, "note": f"child failed: {tail[0]}"}]
    return cases


def _sync_case(method: str, features: int, touched: bool) -> bool:
    """Write into a protected page from a thread; True if a fault arrives.

    The fd is fresh (its own UFFDIO_API with ``features``); the page is
    resolved and the fd closed before returning, so no writer stays blocked.
    """
    import ctypes
    import select
    import threading

    from . import _uffd

    region = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = address_of(region)
    if touched:
        region[0] = 0
    writer: threading.Thread | None = None
    try:
        # Closing the fd unregisters: a writer still blocked goes on.
        with fresh_fd(method, features) as fd:
            _uffd.register_wp(fd, start, PAGE)
            _uffd.writeprotect(fd, start, PAGE, True)
            writer = threading.Thread(target=ctypes.memset, args=(start + 8, 1, 1), daemon=True)
            writer.start()
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                if poller.poll(50):
                    msg = os.read(fd, 32)
                    _uffd.writeprotect(fd, start, PAGE, False)
                    return len(msg) == 32 and msg[0] == 0x12
                if not writer.is_alive():
                    return False
            return False
    finally:
        if writer is not None:
            writer.join(5)
        region.close()


def _async_case(method: str) -> bool:
    """Write into a WP_ASYNC-protected page; True if PAGEMAP_SCAN lists it."""
    import ctypes

    from . import _uffd

    region = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = address_of(region)
    try:
        with fresh_fd(method, FEATURES["wp_async"] | FEATURES["wp_unpopulated"]) as fd:
            _uffd.register_wp(fd, start, 2 * PAGE)
            _uffd.writeprotect(fd, start, 2 * PAGE, True)
            ctypes.memset(start + PAGE + 1, 1, 1)
            with Pagemap() as pm:
                return pm.written(start, start + 2 * PAGE) == [(start + PAGE, start + 2 * PAGE)]
    finally:
        region.close()


def run_e2e_cases() -> list[dict[str, Any]]:
    """The child side of ``end_to_end`` (``python -m pytest_uffd_guard _e2e``)."""
    caps = probe()
    if caps.open_method is None or not caps.has("pagefault_flag_wp"):
        return [
            {
                "case": "end-to-end",
                "caught": None,
                "note": "not run: no usable userfaultfd (see 'opening a userfaultfd')",
            }
        ]
    method = caps.open_method
    base = FEATURES["pagefault_flag_wp"]
    cases: list[tuple[str, Any, str, bool]] = [
        ("write into a touched protected page", lambda: _sync_case(method, base, True), "", True),
        (
            "write into an untouched protected page (fd without WP_UNPOPULATED)",
            lambda: _sync_case(method, base, False),
            UNTOUCHED_TRAP,
            False,
        ),
    ]
    if caps.has("wp_unpopulated"):
        cases.append(
            (
                "write into an untouched protected page (fd with WP_UNPOPULATED)",
                lambda: _sync_case(method, base | FEATURES["wp_unpopulated"], False),
                "",
                True,
            )
        )
    if caps.has("wp_async"):
        cases.append(
            ("async: write seen by PAGEMAP_SCAN (WP_ASYNC)", lambda: _async_case(method), "", True)
        )
    out = []
    for name, run, note_if_missed, expected in cases:
        try:
            caught: bool | None = bool(run())
            note = note_if_missed if not caught else ""
        except OSError as exc:
            caught, note = None, f"error: {exc.strerror or exc}"
        out.append({"case": name, "caught": caught, "expected": expected, "note": note})
    return out
