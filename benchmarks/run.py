"""One benchmark command for issue 11: every figure next to its baseline, in one run.

Usage::

    python benchmarks/run.py [--quick] [--json PATH] [--repeat N] [--no-plot]

Measures, each figure beside a baseline measured in the same run:

1. collect: ``.writes`` + ``.changes()`` per written page, each engine
   (sync, async, hybrid, diff; ``stacks=0``, one write per page), at 64 MiB
   and 1 GiB (64 MiB only with ``--quick``), against a C ``memcmp`` of every
   page with its snapshot.  Target <= 0.5 µs per page.
2. async/hybrid whole job (create + arm + write every page + ``.writes``)
   against the raw kernel job in C (mmap + WP_ASYNC register + write + one
   PAGEMAP_SCAN).  Target <= 1.3x.
3. sync faults, whole job per page (create + arm + one write per page,
   recorded), pinned to CPU 0 and unpinned, against a plain C uffd-wp handler
   (poll + read + UFFDIO_WRITEPROTECT per fault), pinned and unpinned.
   Targets: pinned <= 1.2x pinned C; unpinned <= 2x pinned C.
4. small buffers: create + arm + close of a 4 KiB ``GuardedBuffer`` against
   ``bytearray(4096)`` (target <= 25 µs); 500 generated tests using
   ``guarded_buffer(4096)`` against the same tests with ``bytearray(4096)``,
   each file run by ``python -m pytest -q -p no:cacheprovider`` (target <=
   1.3x), and as a reference the same tests through a plain fixture of their
   own (pytest's fixture cost alone); pytest start-up for one trivial test with the plugin against
   ``-p no:uffd_guard`` (target <= +10 ms).

Every figure is the median of N repetitions (N = 5, 3 with ``--quick``; the
500-test rows 2N-1 pairs, the start-up the median of 4N+1 paired
differences: both are the noisiest figures on a shared machine).  The
C baselines (``baselines/jobs.c``) are compiled with ``$CC`` (default gcc)
into a cache directory (``$XDG_CACHE_HOME/pytest-uffd-guard-bench``, keyed by
the source's hash).  Every engine measurement runs in a child process, so a
crash or hang there costs one row (``n/a (reason)``), not the table; what the
machine cannot do (no userfaultfd, no WP_ASYNC) is skipped with the reason.
Pinning uses ``os.sched_setaffinity`` before the first buffer is created, so
the engine's handler thread, started then, inherits it.

The table is printed, the JSON (figures, baselines, ratios, kernel, CPUs,
Python, load average, date) written to ``--json``, and ``docs/img/run.png``
redrawn when matplotlib is installed (benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
C_SOURCE = HERE / "baselines" / "jobs.c"
DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "run.png"
PAGE = 4096
WRITE_OFFSET = PAGE - 1  # the page's last byte, as in jobs.c
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
ENGINES = ("sync", "async", "hybrid", "diff")
PIN_CPU = 0

Result = dict[str, Any]


# --------------------------------------------------------------------------
# formatting


def fmt_size(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


def fmt_num(x: float) -> str:
    if abs(x) < 10:
        return f"{x:.2f}"
    if abs(x) < 100:
        return f"{x:.1f}"
    return f"{x:,.0f}"


def short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([line, sep, *body])


# --------------------------------------------------------------------------
# the C baselines


class BaselineError(Exception):
    """A C baseline could not be built."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-uffd-guard-bench"


def build_baselines() -> tuple[Path, Path]:
    """Compile jobs.c (program and touch_pages library) once per source hash."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise BaselineError(f"compiler {cc!r} not found (set $CC)")
    source = C_SOURCE.read_bytes()
    out = cache_dir() / hashlib.sha256(source + cc.encode()).hexdigest()[:16]
    program, library = out / "jobs", out / "libjobs.so"
    if program.exists() and library.exists():
        return program, library
    out.mkdir(parents=True, exist_ok=True)
    for cmd in (
        [cc, "-O2", "-pthread", "-Wall", "-Wextra", "-o", str(program), str(C_SOURCE)],
        [cc, "-O2", "-shared", "-fPIC", "-DJOBS_LIB", "-o", str(library), str(C_SOURCE)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise BaselineError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return program, library


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run_c(program: Path, mode: str, size: int, repeat: int, cpu: int | None = None) -> Result:
    """``{"ns": per-page ns}`` or ``{"skip": reason}``."""
    try:
        proc = subprocess.run(
            [str(program), mode, str(size), str(repeat)],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            preexec_fn=pin_to(cpu),
        )
    except subprocess.TimeoutExpired:
        return {"skip": f"C {mode}: no result after 600 s"}
    fields = dict(
        kv.split("=", 1)
        for kv in (proc.stdout.strip().splitlines() or [""])[-1].split()
        if "=" in kv
    )
    if proc.returncode == 4:
        return {"skip": f"C {mode}: no {fields.get('unsupported', '?')} here"}
    if proc.returncode != 0 or "per_page_ns" not in fields:
        return {"skip": f"C {mode} failed: {short(proc.stderr or f'exit {proc.returncode}')}"}
    return {"ns": float(fields["per_page_ns"])}


# --------------------------------------------------------------------------
# workers (child processes)


def _import() -> Any:
    sys.path.insert(0, str(REPO_ROOT))
    import pytest_uffd_guard

    return pytest_uffd_guard


def _touch(library: str) -> Callable[[int, int], None]:
    lib = ctypes.CDLL(library)
    lib.touch_pages.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
    lib.touch_pages.restype = None

    def touch(address: int, size: int) -> None:
        lib.touch_pages(address, size, WRITE_OFFSET, 1)

    return touch


def _check(found: int, pages: int, what: str) -> None:
    if found != pages:
        raise RuntimeError(f"{what}: {found} for {pages} pages")


def work_collect(pkg: Any, touch: Any, engine: str, size: int, repeat: int) -> Result:
    """ns per page: .writes, .changes() after one write per page."""
    pages = size // PAGE
    writes, changes = [], []
    for _ in range(repeat):
        buf = pkg.GuardedBuffer(size, name="bench", engine=engine, stacks=0)
        try:
            touch(buf.address, size)
            t0 = time.perf_counter_ns()
            found = len(buf.writes)
            t1 = time.perf_counter_ns()
            changed = len(buf.changes())
            t2 = time.perf_counter_ns()
        finally:
            buf.close()
        _check(found, pages, f"{engine} .writes")
        _check(changed, pages, f"{engine} .changes()")
        writes.append((t1 - t0) / pages)
        changes.append((t2 - t1) / pages)
    w, c = statistics.median(writes), statistics.median(changes)
    return {"writes": w, "changes": c, "ns": w + c}


def work_job(pkg: Any, touch: Any, engine: str, size: int, repeat: int) -> Result:
    """ns per page of the whole job; async/hybrid include ``.writes``."""
    pages = size // PAGE
    collect = engine != "sync"
    totals = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        buf = pkg.GuardedBuffer(size, name="bench", engine=engine, stacks=0)
        touch(buf.address, size)
        found = len(buf.writes) if collect else -1
        t1 = time.perf_counter_ns()
        try:
            if not collect:
                found = len(buf.writes)
        finally:
            buf.close()
        _check(found, pages, f"{engine} .writes")
        totals.append((t1 - t0) / pages)
    return {"ns": statistics.median(totals)}


def work_small(pkg: Any, touch: Any, engine: str, size: int, repeat: int) -> Result:
    """µs per create + arm + close of a GuardedBuffer(size) (defaults), and
    per bytearray(size); each repetition averages over a batch."""
    batch = 200
    ours, base = [], []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            pkg.GuardedBuffer(size).close()
        t1 = time.perf_counter_ns()
        for _ in range(batch):
            bytearray(size)
        t2 = time.perf_counter_ns()
        ours.append((t1 - t0) / batch)
        base.append((t2 - t1) / batch)
    return {"ns": statistics.median(ours), "base_ns": statistics.median(base)}


WORKERS = {"collect": work_collect, "job": work_job, "small": work_small}


def worker_main(spec: str) -> int:
    args = json.loads(spec)
    try:
        if args.get("cpu") is not None:
            # Before the first buffer: the engine's handler thread, started
            # then, inherits this affinity.
            os.sched_setaffinity(0, {args["cpu"]})
        pkg = _import()
        touch = _touch(args["library"])
        engine = args["engine"]
        # Warm-up: open the engine's fd and start its thread outside the timing.
        # The first .writes/.changes() also import their helpers (numpy,
        # if installed): a once-per-process cost, kept out of the figures.
        warm = pkg.GuardedBuffer(2 * PAGE, engine=engine, stacks=0)
        touch(warm.address, 2 * PAGE)
        len(warm.writes), len(warm.changes())
        warm.close()
        result = WORKERS[args["kind"]](pkg, touch, engine, args["size"], args["repeat"])
    except Exception as exc:  # a failure is a result: the row says why
        first = (str(exc).strip().splitlines() or [""])[0]
        result = {"skip": f"{type(exc).__name__}: {first}"}
    print(json.dumps(result))
    return 0


def run_worker(
    kind: str, library: Path, engine: str, size: int, repeat: int, cpu: int | None = None
) -> Result:
    spec = {
        "kind": kind,
        "library": str(library),
        "engine": engine,
        "size": size,
        "repeat": repeat,
        "cpu": cpu,
    }
    timeout = 120 + repeat * (size // PAGE) * 300e-6
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=child_env(),
        )
    except subprocess.TimeoutExpired:
        return {"skip": f"no result after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"skip": short(detail)}
    result: Result = json.loads(lines[-1])
    return result


def child_env() -> dict[str, str]:
    """Children import the package from this checkout first, with bytecode
    caching on as an installed package has it: under PYTHONDONTWRITEBYTECODE
    (set on the project's machine) every pytest run would compile the
    plugin's modules and their assertion rewriting again, which is no
    user's start-up cost."""
    path = os.environ.get("PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(REPO_ROOT) + (os.pathsep + path if path else "")}


# --------------------------------------------------------------------------
# pytest runs


def pytest_seconds(directory: Path, test_file: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, test_file]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout.strip().splitlines() or [proc.stderr.strip()])[-1]
        raise RuntimeError(f"pytest {' '.join(extra)} {test_file}: exit {proc.returncode}: {tail}")
    return elapsed


def paired(
    runs: int, a: Callable[[], float], b: Callable[[], float]
) -> tuple[list[float], list[float]]:
    """Interleaved a/b runs (so drift in the machine's load hits both)."""
    xs, ys = [], []
    a(), b()  # warm the page cache and the bytecode caches
    for _ in range(runs):
        xs.append(a())
        ys.append(b())
    return xs, ys


def paired_result(runs: int, a: Callable[[], float], b: Callable[[], float]) -> Result:
    """``a`` against ``b``: each the median of its runs."""
    try:
        xs, ys = paired(runs, a, b)
    except Exception as exc:
        return {"skip": short(str(exc), 80)}
    return {"ns": statistics.median(xs) * 1e9, "base_ns": statistics.median(ys) * 1e9}


def paired_difference(runs: int, a: Callable[[], float], b: Callable[[], float]) -> Result:
    """``a`` as ``b``'s median plus the median of the pairs' differences: a
    difference of ~10 ms between two ~0.5 s runs is below this machine's
    run-to-run noise, and pairing cancels the drift the two share."""
    try:
        xs, ys = paired(runs, a, b)
    except Exception as exc:
        return {"skip": short(str(exc), 80)}
    base = statistics.median(ys)
    extra = statistics.median(x - y for x, y in zip(xs, ys, strict=True))
    return {"ns": (base + extra) * 1e9, "base_ns": base * 1e9}


GUARDED_TEST = (
    "def test_{i}(guarded_buffer):\n    buf = guarded_buffer(4096)\n    assert buf[0] == 0\n\n"
)
PLAIN_TEST = "def test_{i}():\n    buf = bytearray(4096)\n    assert buf[0] == 0\n\n"
#: The same tests through a fixture of their own that hands out bytearrays:
#: what pytest's fixture machinery alone costs (a reference row).
FIXTURE_HEAD = "import pytest\n\n\n@pytest.fixture\ndef plain_buffer():\n    yield bytearray\n\n\n"
FIXTURE_TEST = (
    "def test_{i}(plain_buffer):\n    buf = plain_buffer(4096)\n    assert buf[0] == 0\n\n"
)


def suite_figures(runs: int, tests: int = 500) -> tuple[Result, Result, Result]:
    with tempfile.TemporaryDirectory(prefix="uffd-bench-") as tmp:
        d = Path(tmp)
        (d / "test_guarded.py").write_text("".join(GUARDED_TEST.format(i=i) for i in range(tests)))
        (d / "test_plain.py").write_text("".join(PLAIN_TEST.format(i=i) for i in range(tests)))
        (d / "test_fixture.py").write_text(
            FIXTURE_HEAD + "".join(FIXTURE_TEST.format(i=i) for i in range(tests))
        )
        (d / "test_one.py").write_text("def test_one():\n    pass\n")
        guarded, with_fixture, plain, one = (
            partial(pytest_seconds, d, name, [])
            for name in ("test_guarded.py", "test_fixture.py", "test_plain.py", "test_one.py")
        )
        # The pytest runs are the noisiest rows (a plain fixture alone has
        # measured 0.85x to 1.15x here): 2N-1 pairs of them.
        suite = paired_result(2 * runs - 1, guarded, plain)
        fixture = paired_result(2 * runs - 1, with_fixture, plain)
        startup = paired_difference(
            4 * runs + 1, one, partial(pytest_seconds, d, "test_one.py", ["-p", "no:uffd_guard"])
        )
    return suite, fixture, startup


# --------------------------------------------------------------------------
# the run


def figure(
    group: str,
    what: str,
    ours: Result,
    base: Result | float | None,
    base_what: str,
    unit: str,
    target: str,
    check: Callable[[float, float | None], bool],
) -> Result:
    """One table row; ``base`` is a worker/C result or ns; values in ``unit``."""
    scale = {"µs/page": 1e3, "µs": 1e3, "ms": 1e6, "s": 1e9}[unit]
    row: Result = {"group": group, "what": what, "unit": unit, "target": target}
    row["baseline_what"] = base_what
    base_ns: float | None
    if isinstance(base, dict):
        if "skip" in base:
            row["baseline_skip"] = base["skip"]
            base_ns = None
        else:
            base_ns = float(base["ns"])
    else:
        base_ns = base
    row["baseline"] = None if base_ns is None else base_ns / scale
    if "skip" in ours:
        row["skip"] = ours["skip"]
        return row
    row["value"] = ours["ns"] / scale
    for extra in ("writes", "changes"):
        if extra in ours:
            row[extra] = ours[extra] / scale
    row["ratio"] = None if base_ns is None else ours["ns"] / base_ns
    row["met"] = check(ours["ns"], base_ns)
    return row


def measure(quick: bool, repeat: int) -> list[Result]:
    program, library = build_baselines()
    rows: list[Result] = []
    big = [64 * MiB] if quick else [64 * MiB, GiB]

    def log(text: str) -> None:
        print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # 1. collect
    for size in big:
        scan = run_c(program, "scan", size, repeat)
        log(f"collect baseline {fmt_size(size)}")
        for engine in ENGINES:
            ours = run_worker("collect", library, engine, size, repeat)
            rows.append(
                figure(
                    "1 collect",
                    f"{engine} .writes+.changes() {fmt_size(size)}",
                    ours,
                    scan,
                    "C memcmp per page",
                    "µs/page",
                    "<= 0.5 µs/page",
                    lambda v, b: v <= 500,
                )
            )
            log(f"collect {engine} {fmt_size(size)}")

    # 2. async / hybrid whole job; 3. sync faults.  Each round runs every
    # configuration once (one repetition each, fresh processes), so a change
    # in the machine's load hits ours and the baseline alike; the figure is
    # the median over the rounds.
    def rounds(configs: dict[str, Callable[[], Result]]) -> dict[str, Result]:
        got: dict[str, list[Result]] = {name: [] for name in configs}
        for _ in range(repeat):
            for name, run in configs.items():
                got[name].append(run())
        out: dict[str, Result] = {}
        for name, results in got.items():
            skips = [r["skip"] for r in results if "skip" in r]
            if skips:
                out[name] = {"skip": skips[0]}
            else:
                out[name] = {"ns": statistics.median(r["ns"] for r in results)}
        return out

    for size in big:
        got = rounds(
            {
                "raw": partial(run_c, program, "async-job", size, 1),
                "async": partial(run_worker, "job", library, "async", size, 1),
                "hybrid": partial(run_worker, "job", library, "hybrid", size, 1),
            }
        )
        for engine in ("async", "hybrid"):
            rows.append(
                figure(
                    "2 async job",
                    f"{engine} create+arm+write+.writes {fmt_size(size)}",
                    got[engine],
                    got["raw"],
                    "C WP_ASYNC+write+PAGEMAP_SCAN",
                    "µs/page",
                    "<= 1.3x",
                    lambda v, b: b is not None and v <= 1.3 * b,
                )
            )
        log(f"async/hybrid job {fmt_size(size)}")

    # 3. sync faults
    size = 64 * MiB
    got = rounds(
        {
            "c_pinned": lambda: run_c(program, "sync-job", size, 1, cpu=PIN_CPU),
            "ours_pinned": lambda: run_worker("job", library, "sync", size, 1, cpu=PIN_CPU),
            "c_unpinned": lambda: run_c(program, "sync-job", size, 1),
            "ours_unpinned": lambda: run_worker("job", library, "sync", size, 1),
        }
    )
    c_pinned, c_unpinned = got["c_pinned"], got["c_unpinned"]
    ours_pinned, ours_unpinned = got["ours_pinned"], got["ours_unpinned"]
    log("sync faults")
    rows.append(
        figure(
            "3 sync faults",
            f"C handler, unpinned {fmt_size(size)}",
            c_unpinned,
            c_pinned,
            "C handler, pinned",
            "µs/page",
            "(reference)",
            lambda v, b: True,
        )
    )
    rows.append(
        figure(
            "3 sync faults",
            f"sync job, pinned CPU {PIN_CPU} {fmt_size(size)}",
            ours_pinned,
            c_pinned,
            "C handler, pinned",
            "µs/page",
            "<= 1.2x",
            lambda v, b: b is not None and v <= 1.2 * b,
        )
    )
    rows.append(
        figure(
            "3 sync faults",
            f"sync job, unpinned {fmt_size(size)}",
            ours_unpinned,
            c_pinned,
            "C handler, pinned",
            "µs/page",
            "<= 2x",
            lambda v, b: b is not None and v <= 2 * b,
        )
    )
    rows.append(
        figure(
            "3 sync faults",
            f"sync job, unpinned {fmt_size(size)} (vs C unpinned)",
            ours_unpinned,
            c_unpinned,
            "C handler, unpinned",
            "µs/page",
            "(reference)",
            lambda v, b: True,
        )
    )

    # 4. small buffers
    small = run_worker("small", library, "auto", PAGE, repeat)
    base_small = {"ns": small["base_ns"]} if "base_ns" in small else None
    rows.append(
        figure(
            "4 small",
            "GuardedBuffer(4096) create+arm+close",
            small,
            base_small,
            "bytearray(4096)",
            "µs",
            "<= 25 µs",
            lambda v, b: v <= 25_000,
        )
    )
    log("small buffers")
    suite, fixture, startup = suite_figures(repeat)
    rows.append(
        figure(
            "4 small",
            "500 tests with guarded_buffer(4096)",
            suite,
            {"ns": suite["base_ns"]} if "base_ns" in suite else None,
            "500 tests with bytearray(4096)",
            "s",
            "<= 1.3x",
            lambda v, b: b is not None and v <= 1.3 * b,
        )
    )
    rows.append(
        figure(
            "4 small",
            "500 tests with a plain fixture (pytest alone)",
            fixture,
            {"ns": fixture["base_ns"]} if "base_ns" in fixture else None,
            "500 tests with bytearray(4096)",
            "s",
            "(reference)",
            lambda v, b: True,
        )
    )
    rows.append(
        figure(
            "4 small",
            "pytest start-up, 1 trivial test, plugin on",
            startup,
            {"ns": startup["base_ns"]} if "base_ns" in startup else None,
            "-p no:uffd_guard",
            "ms",
            "<= +10 ms",
            lambda v, b: b is not None and v - b <= 10e6,
        )
    )
    log("pytest runs")
    return rows


def table(rows: list[Result]) -> str:
    out = []
    for r in rows:
        base = "n/a" if r["baseline"] is None else fmt_num(r["baseline"])
        if r.get("baseline_skip"):
            base = f"n/a ({short(r['baseline_skip'], 40)})"
        if "skip" in r:
            value, ratio, met = f"skipped ({short(r['skip'], 50)})", "", ""
        else:
            value = fmt_num(r["value"])
            if "writes" in r:
                value += f" ({fmt_num(r['writes'])} + {fmt_num(r['changes'])})"
            if r["unit"] == "ms" and r["baseline"] is not None:
                value += f" ({r['value'] - r['baseline']:+.1f} ms)"
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            met = "" if r["target"] == "(reference)" else ("yes" if r["met"] else "**no**")
        out.append(
            [r["what"], r["unit"], value, f"{base} ({r['baseline_what']})", ratio, r["target"], met]
        )
    return markdown(["figure", "unit", "ours", "baseline", "ratio", "target", "met"], out)


def meta(
    quick: bool, repeat: int, load_before: tuple[float, float, float], seconds: float
) -> Result:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": os.uname().release,
        "machine": platform.machine(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "commit": commit,
        "quick": quick,
        "repeat": repeat,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "seconds": round(seconds, 1),
    }


def header(m: Result) -> str:
    lb, la = m["loadavg_before"], m["loadavg_after"]
    return (
        f"{m['date']} | Linux {m['kernel']} {m['machine']} | "
        f"{m['cpu_count']} CPUs ({m['cpu_model']}) | "
        f"Python {m['python']} | commit {m['commit']} | "
        f"{'--quick, ' if m['quick'] else ''}median of {m['repeat']} | {m['seconds']} s\n"
        f"load average (1/5/15 min): before {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}, "
        f"after {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}"
    )


def plot(rows: list[Result], m: Result, path: Path) -> None:
    import matplotlib  # type: ignore[import-not-found]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found]

    shown = [r for r in rows if "skip" not in r and r.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(shown) + 1.8))
    ys = range(len(shown))
    colours = [
        "#bbbbbb" if r["target"] == "(reference)" else "#2ca02c" if r["met"] else "#d62728"
        for r in shown
    ]
    ax.barh(list(ys), [r["ratio"] for r in shown], color=colours, edgecolor="black", linewidth=0.4)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([f"{r['what']}  vs {r['baseline_what']}" for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(
        "ratio to its baseline from the same run (log); green: met, red: missed, grey: reference"
    )
    ax.set_title(
        f"benchmarks/run.py, Linux {m['kernel']}, {m['cpu_count']} CPUs, {m['date']}, "
        f"load {m['loadavg_before'][0]:.2f} before / {m['loadavg_after'][0]:.2f} after",
        fontsize=9,
    )
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.subplots_adjust(left=0.4, right=0.98, top=0.92, bottom=0.14)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB only, 3 repetitions")
    parser.add_argument("--repeat", type=int, help="repetitions per figure (default 5, 3 quick)")
    parser.add_argument("--json", type=Path, help="write every figure and the machine here")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG to redraw")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--from-json", type=Path, help="re-print the table and redraw the plot from a saved run"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        m, rows = saved["meta"], saved["figures"]
    else:
        repeat = args.repeat or (3 if args.quick else 5)
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        try:
            rows = measure(args.quick, repeat)
        except BaselineError as exc:
            print(f"cannot build the C baselines: {exc}", file=sys.stderr)
            return 1
        m = meta(args.quick, repeat, load_before, time.perf_counter() - t0)
    print(header(m))
    print()
    print(table(rows))
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": m, "figures": rows}, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    if not args.no_plot:
        try:
            plot(rows, m, args.plot)
        except ImportError:
            print(
                "\nno plot: matplotlib is not installed"
                " (pip install -r benchmarks/requirements.txt)"
            )
        else:
            print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
