"""Cost of one recorded write fault: pytest-uffd-guard against plain-C baselines.

Compiles ``baselines/fault_cost.c``, runs each of its modes for each size and
prints two tables:

1. per-fault cost of a write-protected buffer whose every page is written once
   (C userfaultfd sync handler, C mprotect + SIGSEGV, pytest-uffd-guard), with
   plain memset as the floor;
2. the cost of creating and arming a buffer, against ``bytearray(size)``.

Usage::

    python benchmarks/bench_faults.py [--sizes 1M,64M] [--repeat 5] [--quick]
                                      [--cpus 0]

The pytest-uffd-guard columns are measured in a child process (a hang or crash
in the engine cannot take the table down) and print ``n/a (<reason>)`` when the
engine cannot be imported or fails. The exit status is nonzero only when a C
baseline fails.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import mmap
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

from tabulate import tabulate

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
C_SOURCE = HERE / "baselines" / "fault_cost.c"
PAGE = mmap.PAGESIZE

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
ARM_SIZES = (4 * KiB, MiB, 64 * MiB, GiB)
EXIT_UNSUPPORTED = 4  # fault_cost: the kernel lacks a feature the mode needs

FAULT_NOTE = """\
Columns: per-fault cost in microseconds, each the median over the repetitions
of (time of one memset over the protected buffer - time of the same memset
over a touched, unprotected buffer) / pages; every page faults exactly once.
  C uffd-sync        userfaultfd WP on touched pages; a C handler thread polls,
                     records (address, thread id, time), un-protects the page
  C uffd unpopulated the same on never-touched pages protected through
                     UFFD_FEATURE_WP_UNPOPULATED (6.4+): each fault also
                     allocates and zeroes its page
  C mprotect+SIGSEGV mprotect(PROT_READ), a SIGSEGV handler records si_addr
                     and mprotect()s the page writable again
  memset ns/page     the unprotected memset itself, ns per 4 KiB page
  pytest-uffd-guard  GuardedBuffer(engine="sync", stacks=0) + ctypes.memset,
                     same subtraction (against a ctypes.memset over an
                     unguarded, touched mmap); ratio to C uffd unpopulated
                     where the kernel has WP_UNPOPULATED (the engine then
                     protects untouched pages too), else to C uffd-sync
  … writers named    the same with the default stacks=8: the first 8 faults
                     of each buffer also capture the writer's Python stack"""

ARM_NOTE = """\
Columns: microseconds to create a zero-filled buffer of the given size, ready
to use (median); the ratio is to bytearray(size).
  bytearray          bytearray(size): malloc + memset, so every page is touched;
                     glibc's mmap threshold is pinned at 128 KiB so that each
                     large one is a fresh mmap (a reused heap block would cost
                     only the memset)
  C uffd arm         mmap + MADV_NOHUGEPAGE + touch every page + UFFDIO_REGISTER
                     + UFFDIO_WRITEPROTECT (per-buffer work)
  C uffd arm unpop.  the same without touching, relying on WP_UNPOPULATED
  C uffd full        C uffd arm + feature query, userfaultfd open, UFFDIO_API
                     and handler thread start (per-fd work a library may share)
  C mprotect arm     mmap + MADV_NOHUGEPAGE + touch + mprotect(PROT_READ)
  pytest-uffd-guard  GuardedBuffer(size, name="bench"); close() not timed"""


class BaselineError(Exception):
    """A C baseline could not be built or run."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


# --------------------------------------------------------------------------
# sizes and formatting


def parse_size(text: str) -> int:
    """Parse ``4096``, ``4K``, ``1M``, ``1MiB`` or ``1G`` (binary units)."""
    units = {"": 1, "K": KiB, "M": MiB, "G": GiB}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = s[-1:] if s[-1:] in units else ""
    number = s[: len(s) - len(suffix)]
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}")
    size = int(number) * units[suffix]
    if size % PAGE:
        raise argparse.ArgumentTypeError(
            f"size {text!r} is not a multiple of the page size ({PAGE})"
        )
    return size


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def parse_cpus(text: str) -> set[int]:
    try:
        return {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid CPU list {text!r}") from None


def format_size(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


def format_us(ns: float) -> str:
    us = ns / 1000
    if us < 10:
        return f"{us:.2f}"
    if us < 100:
        return f"{us:.1f}"
    return f"{us:,.0f}"


def with_ratio(ns: float | str, base_ns: float | None) -> str:
    """``ns`` in µs with its ratio to ``base_ns``, or ``ns`` as given if text."""
    if isinstance(ns, str):
        return ns
    if not base_ns:
        return format_us(ns)
    return f"{format_us(ns)} ({ns / base_ns:.2f}x)"


# --------------------------------------------------------------------------
# the C baselines


def compile_baseline(outdir: Path) -> Path:
    """Build fault_cost.c into ``outdir`` with ``$CC`` (default gcc)."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BaselineError(f"compiler {cc!r} not found")
    binary = outdir / "fault_cost"
    cmd = [cc, "-O2", "-pthread", "-Wall", "-Wextra", "-o", str(binary), str(C_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BaselineError(f"{' '.join(cmd)} failed:\n{proc.stderr.strip()}")
    return binary


def run_baseline(binary: Path, mode: str, size: int, repeat: int) -> dict[str, int]:
    """Run one mode; return its key=value output line as ints."""
    proc = subprocess.run(
        [str(binary), mode, str(size), str(repeat)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BaselineError(
            f"fault_cost {mode} {size} {repeat}: exit {proc.returncode}: {proc.stderr.strip()}",
            proc.returncode,
        )
    fields = dict(item.split("=", 1) for item in proc.stdout.split())
    return {key: int(value) for key, value in fields.items() if key != "mode"}


def run_optional_baseline(
    binary: Path, mode: str, size: int, repeat: int, field: str
) -> float | str:
    """``field`` of a mode that needs a newer kernel, or ``n/a (reason)``."""
    try:
        return run_baseline(binary, mode, size, repeat)[field]
    except BaselineError as exc:
        if exc.returncode == EXIT_UNSUPPORTED:
            return "n/a (kernel lacks UFFD_FEATURE_WP_UNPOPULATED)"
        raise


# --------------------------------------------------------------------------
# the engine (pytest-uffd-guard); these run in a worker process


def import_engine() -> ModuleType:
    """Import pytest_uffd_guard; if it is not installed, from the source tree.

    Only a missing package falls back to the tree next to this script; an
    installed one that fails to import is reported as it is.
    """
    try:
        import pytest_uffd_guard
    except ModuleNotFoundError as exc:
        if exc.name != "pytest_uffd_guard":
            raise
        sys.path.insert(0, str(REPO_ROOT))
        import pytest_uffd_guard
    if not hasattr(pytest_uffd_guard, "GuardedBuffer"):
        raise ImportError("pytest_uffd_guard has no GuardedBuffer (yet)")
    return pytest_uffd_guard


def touched_mapping(size: int) -> mmap.mmap:
    """An unguarded private anonymous mapping with every page present."""
    m = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    m[0:size:PAGE] = b"\0" * (size // PAGE)
    return m


def timed_ctypes_memset(address: int, size: int) -> int:
    t0 = time.perf_counter_ns()
    ctypes.memset(address, 1, size)
    return time.perf_counter_ns() - t0


def unguarded_memset_ns(size: int) -> int:
    m = touched_mapping(size)
    view = (ctypes.c_char * size).from_buffer(m)
    try:
        return timed_ctypes_memset(ctypes.addressof(view), size)
    finally:
        del view  # release the buffer export so the mmap can close
        m.close()


def measure_engine(size: int, repeat: int, stacks: int | None = 0) -> float:
    """Median ns per recorded fault for ``GuardedBuffer`` + ``ctypes.memset``
    on the sync engine; ``stacks`` writers named per buffer (None: the
    default, 8), 0 for the like-for-like comparison with the C program.

    Raises if the engine is missing, fails, or records the wrong number of
    writes.
    """
    engine = import_engine()
    pages = size // PAGE
    samples = []
    for _ in range(repeat):
        base_ns = unguarded_memset_ns(size)
        buf = engine.GuardedBuffer(size, name="bench", engine="sync", stacks=stacks)
        try:
            total_ns = timed_ctypes_memset(buf.address, size)
            writes = len(buf.writes)
        finally:
            buf.close()
        if writes != pages:
            raise RuntimeError(f"recorded {writes} writes for {pages} pages")
        samples.append((total_ns - base_ns) / pages)
    return statistics.median(samples)


def measure_engine_create(size: int, repeat: int) -> float:
    """Median ns for ``GuardedBuffer(size)``; close() is not timed."""
    engine = import_engine()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        buf = engine.GuardedBuffer(size, name="bench")
        samples.append(time.perf_counter_ns() - t0)
        buf.close()
    return statistics.median(samples)


def measure_bytearray_create(size: int, repeat: int) -> float:
    """Median ns for ``bytearray(size)``; run it under BYTEARRAY_ENV."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        b = bytearray(size)
        samples.append(time.perf_counter_ns() - t0)
        del b
    return statistics.median(samples)


def engine_path(size: int, repeat: int) -> str:
    """Where pytest_uffd_guard is imported from (arguments unused)."""
    return str(import_engine().__file__)


WORKERS: dict[str, Callable[[int, int], float | str]] = {
    "engine-fault": measure_engine,
    "engine-fault-named": lambda size, repeat: measure_engine(size, repeat, stacks=None),
    "engine-create": measure_engine_create,
    "engine-path": engine_path,
    "bytearray-create": measure_bytearray_create,
}

# glibc raises its mmap threshold after the first large block is freed, so a
# second bytearray(1 MiB) reuses resident heap memory and costs a memset only
# (~30 µs instead of ~800 here).  A fixed threshold keeps every sample a fresh,
# faulting allocation, like the other columns.
BYTEARRAY_ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}


def worker_main(kind: str, size: int, repeat: int) -> int:
    """Child-process entry: print one JSON object, ``value`` or ``error``."""
    try:
        result = {"value": WORKERS[kind](size, repeat)}
    except Exception as exc:  # any engine failure is a reportable result
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


def short(reason: str, width: int = 70) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= width else reason[: width - 1] + "…"


def call_worker(
    kind: str, size: int, repeat: int, env: dict[str, str] | None = None
) -> dict[str, float | str]:
    """Run a WORKERS function in a child process; ``{"value"|"error": ...}``."""
    # Generous: 200 µs per page per repetition on top of a fixed minute.
    timeout = 60 + repeat * (size // PAGE) * 200e-6
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, str(size), str(repeat)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **(env or {})},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"no result after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode < 0:
        return {"error": f"worker killed by {signal.Signals(-proc.returncode).name}"}
    if proc.returncode != 0 or not lines:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {"error": f"worker failed: {detail[0]}"}
    result: dict[str, float | str] = json.loads(lines[-1])
    return result


def run_in_worker(kind: str, size: int, repeat: int) -> float | str:
    """A measurement in ns from a worker, or ``n/a (reason)``."""
    result = call_worker(kind, size, repeat)
    if "error" in result:
        return f"n/a ({short(str(result['error']))})"
    return float(result["value"])


def engine_origin() -> str:
    """Where the engine is imported from, or why it is not, for the header."""
    result = call_worker("engine-path", 0, 0)
    if "error" in result:
        return f"not importable ({short(str(result['error']))})"
    return str(result["value"])


# --------------------------------------------------------------------------
# tables


def cpu_model() -> str:
    """First "model name" in /proc/cpuinfo, marked when under a hypervisor."""
    model, virtual = "", False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and "hypervisor" in value.split():
                    virtual = True
    except OSError:
        pass
    model = model or platform.processor() or "unknown CPU"
    return f"{model}{' (virtualized)' if virtual else ''}, {os.cpu_count()} CPUs"


def header() -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    return (
        f"kernel {os.uname().release} | CPU {cpu_model()} | {now} | "
        f"Python {platform.python_version()} | running on CPUs {cpus} | "
        f"load {os.getloadavg()[0]:.2f}"
    )


def fault_table(binary: Path, sizes: list[int], repeat: int) -> list[list[str]]:
    rows = []
    for size in sizes:
        uffd = run_baseline(binary, "uffd-sync", size, repeat)
        unpop = run_optional_baseline(binary, "uffd-sync-unpopulated", size, repeat, "per_fault_ns")
        segv = run_baseline(binary, "mprotect-segv", size, repeat)
        none = run_baseline(binary, "none", size, repeat)
        engine = run_in_worker("engine-fault", size, repeat)
        named = run_in_worker("engine-fault-named", size, repeat)
        # Compare like with like: the engine protects never-touched pages
        # where the kernel has WP_UNPOPULATED, so each of its faults also
        # allocates a page, as in the "unpopulated" C mode.
        base = unpop if isinstance(unpop, (int, float)) else uffd["per_fault_ns"]
        rows.append(
            [
                format_size(size),
                f"{size // PAGE:,}",
                format_us(uffd["per_fault_ns"]),
                with_ratio(unpop, None),
                format_us(segv["per_fault_ns"]),
                f"{none['per_page_ns']}",
                with_ratio(engine, base),
                with_ratio(named, base),
            ]
        )
    return rows


def arm_table(binary: Path, sizes: list[int], repeat: int) -> list[list[str]]:
    rows = []
    for size in sizes:
        result = call_worker("bytearray-create", size, repeat, BYTEARRAY_ENV)
        if "error" in result:
            raise BaselineError(f"bytearray({size}): {result['error']}")
        base = float(result["value"])
        arm = run_baseline(binary, "arm", size, repeat)
        unpop = run_optional_baseline(binary, "arm-unpopulated", size, repeat, "arm_ns")
        mprot = run_baseline(binary, "mprotect-arm", size, repeat)
        engine = run_in_worker("engine-create", size, repeat)
        rows.append(
            [
                format_size(size),
                format_us(base),
                with_ratio(arm["arm_ns"], base),
                with_ratio(unpop, base),
                with_ratio(arm["setup_ns"], base),
                with_ratio(mprot["arm_ns"], base),
                with_ratio(engine, base),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        help="comma-separated buffer sizes for the fault table (default 1M,64M; 1M with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        help="repetitions per measurement, median reported (default 5; 3 with --quick)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer sizes and repetitions, no 1 GiB"
    )
    parser.add_argument(
        "--cpus",
        type=parse_cpus,
        help="run everything on these CPUs (e.g. 0): with one CPU, the writer and "
        "the uffd handler thread share it, which removes cross-CPU wake-ups",
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        kind, size, repeat = args.worker
        return worker_main(kind, int(size), int(repeat))

    if args.cpus:
        try:
            os.sched_setaffinity(0, args.cpus)  # inherited by every child
        except OSError as exc:
            parser.error(f"--cpus: {exc}")
    sizes = args.sizes or ([MiB] if args.quick else [MiB, 64 * MiB])
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    arm_sizes = [s for s in ARM_SIZES if not (args.quick and s >= GiB)]

    print(header())
    print(f"pytest-uffd-guard: {engine_origin()}")
    print(f"repetitions: {repeat}, page size {PAGE}\n")
    try:
        with tempfile.TemporaryDirectory(prefix="fault_cost.") as tmp:
            binary = compile_baseline(Path(tmp))
            rows = fault_table(binary, sizes, repeat)
            print("Per-fault cost (µs)")
            print(
                tabulate(
                    rows,
                    headers=[
                        "size",
                        "pages",
                        "C uffd-sync",
                        "C uffd unpopulated",
                        "C mprotect+SIGSEGV",
                        "memset ns/page",
                        "pytest-uffd-guard (sync)",
                        "… first 8 writers named",
                    ],
                    tablefmt="github",
                    disable_numparse=True,
                )
            )
            print(FAULT_NOTE + "\n")
            rows = arm_table(binary, arm_sizes, repeat)
            print("Create and arm (µs)")
            print(
                tabulate(
                    rows,
                    headers=[
                        "size",
                        "bytearray",
                        "C uffd arm",
                        "C uffd arm unpop.",
                        "C uffd full",
                        "C mprotect arm",
                        "pytest-uffd-guard",
                    ],
                    tablefmt="github",
                    disable_numparse=True,
                )
            )
            print(ARM_NOTE)
    except BaselineError as exc:
        print(f"\nbaseline failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
