"""Cost of naming the writer: attributed against unattributed write faults.

Prints two tables:

1. microseconds per write fault when the writer is named (``stacks`` covers
   every page) and when it is not (``stacks=0``), for a shallow Python stack
   and a deep one (the dump walks every frame), plus the time to read the
   records back (parsing the dumps), for writes in user mode (``memset``:
   named by the capture signal) and inside a system call (``readinto`` from
   a file: named by the namer thread);
2. the time to rewrite a 1 GiB guarded buffer once with the default bound
   (``DEFAULT_STACKS`` named writes) and with capture off, against the same
   memset over an unguarded mapping.

Usage::

    python benchmarks/bench_attribution.py [--pages 256] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from tabulate import tabulate

from pytest_uffd_guard import GuardedBuffer
from pytest_uffd_guard.kernel.capture import DEFAULT_STACKS

PAGE = mmap.PAGESIZE
GiB = 1 << 30


def memset_time(address: int, length: int) -> float:
    start = time.perf_counter()
    ctypes.memset(address, 1, length)
    return time.perf_counter() - start


def at_depth(depth: int, fn: Callable[[], float]) -> float:
    """Call fn with ``depth`` extra Python frames on the stack."""
    if depth == 0:
        return fn()
    return at_depth(depth - 1, fn)


def plain_memset(length: int) -> float:
    m = mmap.mmap(-1, length)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    ctypes.memset(address, 0, length)  # touch every page first
    t = memset_time(address, length)
    m.close()
    return t


def readinto_time(source: int, view: memoryview) -> float:
    os.lseek(source, 0, os.SEEK_SET)
    start = time.perf_counter()
    n = os.readv(source, [view])
    elapsed = time.perf_counter() - start
    assert n == len(view), n
    return elapsed


def plain_readinto(source: int, length: int) -> float:
    m = mmap.mmap(-1, length)
    readinto_time(source, memoryview(m))  # touch every page first
    t = readinto_time(source, memoryview(m))
    m.close()
    return t


def fault_cost(pages: int, stacks: int, depth: int, source: int | None) -> tuple[float, float]:
    """(µs per fault above an unguarded write, µs per record to read back);
    a memset when source is None, else a readv(2) from file ``source``."""
    length = pages * PAGE
    buf = GuardedBuffer(length, stacks=stacks)
    if source is None:
        t = at_depth(depth, lambda: memset_time(buf.address, length))
        plain = plain_memset(length)
    else:
        view = memoryview(buf)
        t = at_depth(depth, lambda: readinto_time(source, view))
        view.release()
        plain = plain_readinto(source, length)
    start = time.perf_counter()
    writes = buf.writes
    read_back = time.perf_counter() - start
    captured = sum(w.stack_captured for w in writes)
    buf.close()
    expected = min(stacks, pages)
    if captured != expected:
        print(f"warning: {captured} of {expected} writers named", file=sys.stderr)
    return (t - plain) / pages * 1e6, read_back / pages * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=256, help="pages written per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs, median reported")
    parser.add_argument("--quick", action="store_true", help="skip the 1 GiB rewrite")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryFile() as f:
        f.write(os.urandom(args.pages * PAGE))
        f.flush()
        for where, source in (("user mode (signal)", None), ("system call (namer)", f.fileno())):
            for depth in (0, 60):
                for label, stacks in (("named", args.pages), ("not named", 0)):
                    runs = [
                        fault_cost(args.pages, stacks, depth, source) for _ in range(args.repeat)
                    ]
                    rows.append(
                        [
                            where,
                            label,
                            depth,
                            f"{statistics.median(r[0] for r in runs):.1f}",
                            f"{statistics.median(r[1] for r in runs):.1f}",
                        ]
                    )
    print(f"Per write fault, {args.pages} pages, median of {args.repeat}:")
    print(
        tabulate(
            rows,
            headers=["write", "writer", "extra frames", "µs per fault", "µs per record read"],
            colalign=("left", "left", "right", "right", "right"),
        )
    )
    if args.quick:
        return 0

    print()
    rows = []
    plain = statistics.median(plain_memset(GiB) for _ in range(3))
    rows.append(["no guard (touched mmap)", "-", f"{plain:.3f}"])
    for stacks in (DEFAULT_STACKS, 0):
        times = []
        for _ in range(3):
            buf = GuardedBuffer(GiB, stacks=stacks)
            start = time.perf_counter()
            ctypes.memset(buf.address, 1, GiB)
            _ = buf.writes
            times.append(time.perf_counter() - start)
            buf.close()
            del buf
        rows.append(
            [f"GuardedBuffer(1 GiB, stacks={stacks})", stacks, f"{statistics.median(times):.3f}"]
        )
    print("Rewrite 1 GiB once (memset + reading the records), median of 3:")
    print(
        tabulate(
            rows, headers=["buffer", "named writes", "seconds"], colalign=("left", "right", "right")
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
