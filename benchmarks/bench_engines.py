"""Per-page cost of a first write under each engine, beside the C baselines.

For each size, every page of a fresh guarded buffer is written once with
``ctypes.memset``; the cost per page is (that memset - the same memset over
a touched, unguarded mapping) / pages, median over the repetitions.  The
``collect`` columns time what the async and diff engines do afterwards to
find the written pages (``len(buf.writes)``: PAGEMAP_SCAN + diff, or the
whole diff); the sync engine has already recorded them.

Baselines come from ``baselines/fault_cost.c`` through ``bench_faults.py``
(C userfaultfd sync handler, C mprotect + SIGSEGV, plain memset).

Usage::

    python benchmarks/bench_engines.py [--sizes 1M,64M,1G] [--repeat 3] [--quick]
                                       [--plot docs/img/engines.png | --no-plot]

Each engine runs in a child process; an engine this machine lacks prints
``n/a (<reason>)``.  The plot needs matplotlib (benchmarks/requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_faults as bf  # noqa: E402  (a sibling script, not a package)

ENGINES = ("sync", "async", "hybrid", "diff")
DEFAULT_PLOT = bf.REPO_ROOT / "docs" / "img" / "engines.png"

NOTE = """\
Columns: microseconds per page, each the median over the repetitions.
  C uffd-sync / C mprotect   the C baselines of bench_faults.py (write fault
                             resolved by a C handler thread / SIGSEGV handler)
  memset                     the unprotected memset itself, per 4 KiB page
  ENGINE (write + collect)   write: GuardedBuffer(size, engine=...) +
                             ctypes.memset, minus the same memset over a
                             touched mapping; the buffer is fresh, so every
                             engine also pays the first touch of anonymous
                             memory (most of diff's write cost).
                             collect: len(buf.writes) afterwards, i.e. finding
                             the written pages (PAGEMAP_SCAN + diff for async,
                             the diff for diff, draining the log for sync) and
                             one record per page"""


def measure(engine: str, size: int, repeat: int) -> dict[str, float]:
    """Worker: ns per page to write, and to collect the records."""
    pkg = bf.import_engine()
    pages = size // bf.PAGE
    write, collect = [], []
    for _ in range(repeat):
        base_ns = bf.unguarded_memset_ns(size)
        buf = pkg.GuardedBuffer(size, name="bench", engine=engine)
        try:
            total_ns = bf.timed_ctypes_memset(buf.address, size)
            t0 = time.perf_counter_ns()
            found = len(buf.writes)
            collect_ns = time.perf_counter_ns() - t0
        finally:
            buf.close()
        if found != pages:
            raise RuntimeError(f"{engine}: recorded {found} writes for {pages} pages")
        write.append((total_ns - base_ns) / pages)
        collect.append(collect_ns / pages)
    return {"write": statistics.median(write), "collect": statistics.median(collect)}


def in_worker(engine: str, size: int, repeat: int) -> dict[str, float] | str:
    timeout = 120 + repeat * (size // bf.PAGE) * 200e-6
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", engine, str(size), str(repeat)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"n/a (no result after {timeout:.0f} s)"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        detail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return f"n/a ({bf.short(detail)})"
    result = json.loads(lines[-1])
    if "error" in result:
        return f"n/a ({bf.short(result['error'])})"
    return {key: float(value) for key, value in result.items()}


def us(ns: float | str) -> str:
    return ns if isinstance(ns, str) else f"{ns / 1000:.2f}"


def run(sizes: list[int], repeat: int) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        binary = bf.compile_baseline(Path(tmp))
        results = []
        for size in sizes:
            row: dict[str, object] = {"size": size, "pages": size // bf.PAGE}
            row["c_uffd"] = bf.run_baseline(binary, "uffd-sync", size, repeat)["per_fault_ns"]
            row["c_mprotect"] = bf.run_baseline(binary, "mprotect-segv", size, repeat)[
                "per_fault_ns"
            ]
            row["memset"] = bf.run_baseline(binary, "none", size, repeat)["per_page_ns"]
            for engine in ENGINES:
                row[engine] = in_worker(engine, size, repeat)
            results.append(row)
            print(f"  measured {bf.format_size(size)}", file=sys.stderr, flush=True)
    return results


def table(results: list[dict[str, object]]) -> str:
    rows = []
    for r in results:
        cells = [bf.format_size(int(r["size"])), f"{r['pages']:,}"]  # type: ignore[call-overload]
        cells += [us(r["c_uffd"]), us(r["c_mprotect"]), us(r["memset"])]  # type: ignore[arg-type]
        for engine in ENGINES:
            value = r[engine]
            if isinstance(value, str):
                cells.append(value)
            else:
                write, collect = value["write"], value["collect"]  # type: ignore[index]
                cells.append(f"{us(write)} + {us(collect)}")
        rows.append(cells)
    headers = ["size", "pages", "C uffd-sync", "C mprotect", "memset"]
    headers += [f"{engine} (write + collect)" for engine in ENGINES]
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


COLOURS = {"sync": "#d62728", "async": "#1f77b4", "hybrid": "#9467bd", "diff": "#2ca02c"}


def plot(results: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [
        ("C uffd-sync", "c_uffd", "#999999"),
        ("C mprotect+SIGSEGV", "c_mprotect", "#cccccc"),
        ("memset (floor)", "memset", "#eeeeee"),
    ]
    nbars = len(baselines) + len(ENGINES)
    width = 0.8 / nbars
    fig, ax = plt.subplots(figsize=(9, 5.2))

    def x(j: int, i: int) -> float:
        return j + (i - nbars / 2 + 0.5) * width

    for i, (label, key, colour) in enumerate(baselines):
        xs = [x(j, i) for j in range(len(results))]
        ys = [float(r[key]) / 1000 for r in results]  # type: ignore[arg-type]
        ax.bar(xs, ys, width, label=label, color=colour, edgecolor="black", linewidth=0.4)
    for k, engine in enumerate(ENGINES):
        i = len(baselines) + k
        xs, writes, collects = [], [], []
        for j, r in enumerate(results):
            value = r[engine]
            if isinstance(value, dict):
                xs.append(x(j, i))
                writes.append(max(value["write"], 1.0) / 1000)
                collects.append(value["collect"] / 1000)
        colour = COLOURS[engine]
        ax.bar(
            xs,
            writes,
            width,
            label=f"{engine}: write",
            color=colour,
            edgecolor="black",
            linewidth=0.4,
        )
        ax.bar(
            xs,
            collects,
            width,
            bottom=writes,
            label=f"{engine}: + collect",
            color=colour,
            alpha=0.35,
            hatch="//",
            edgecolor="black",
            linewidth=0.4,
        )
    ax.set_yscale("log")
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([bf.format_size(int(r["size"])) for r in results])  # type: ignore[call-overload]
    ax.set_ylabel("µs per page, log scale")
    ax.set_title(
        "First write to every page of a fresh buffer: cost per page\n"
        f"Linux {os.uname().release}, {os.cpu_count()} CPUs; "
        "collect = finding the writes afterwards"
    )
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=bf.parse_sizes, help="default 1M,64M,1G (1M,64M with --quick)"
    )
    parser.add_argument("--repeat", type=int, help="repetitions, median reported (default 3)")
    parser.add_argument("--quick", action="store_true", help="skip 1 GiB")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG to write")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--from-json", type=Path, help="re-draw the table and plot from saved results"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        engine, size, repeat = args.worker
        try:
            result: dict[str, object] = dict(measure(engine, int(size), int(repeat)))
        except Exception as exc:  # an engine failure is a reportable result
            result = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result))
        return 0

    sizes = args.sizes or ([bf.MiB, 64 * bf.MiB] if args.quick else [bf.MiB, 64 * bf.MiB, bf.GiB])
    repeat = args.repeat or 3
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        try:
            results = run(sizes, repeat)
        except bf.BaselineError as exc:
            print(f"baseline failed: {exc}", file=sys.stderr)
            return 1
    print(bf.header())
    print()
    print(table(results))
    print()
    print(NOTE)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not args.no_plot:
        try:
            plot(results, args.plot)
        except ImportError:
            print("\n(no plot: pip install -r benchmarks/requirements.txt)", file=sys.stderr)
        else:
            print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
