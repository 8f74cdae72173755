"""What watch() costs: start and stop of an in-place watch (issue 14).

    .venv/bin/python benchmarks/bench_watch.py [--repeat N]

For 4 KiB, 1 MiB and 64 MiB of private anonymous memory (a page-aligned
mapping, so every byte is page-protected and nothing is compared), prints
the median time of the first ``start()`` of a new Watch (it reads
/proc/self/maps), of a restart of the same Watch, and of ``stop()`` with
nothing written, next to a plain ``bytes()`` copy of the same memory (the
snapshot is such a copy).  Each size runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, mmap, statistics, sys, time
from pytest_uffd_guard import Watch
size, repeat = int(sys.argv[1]), int(sys.argv[2])
m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m[::mmap.PAGESIZE] = b"\\1" * (size // mmap.PAGESIZE)  # resident
first, restart, stop, copy = [], [], [], []
for _ in range(repeat):
    w = Watch(m)
    t = time.perf_counter(); w.start(); first.append(time.perf_counter() - t)
    t = time.perf_counter(); w.stop(); stop.append(time.perf_counter() - t)
    t = time.perf_counter(); w.start(); restart.append(time.perf_counter() - t)
    w.stop()
    t = time.perf_counter(); bytes(m); copy.append(time.perf_counter() - t)
    del w
print(json.dumps({"engine": Watch(m).start().engine,
                  **{k: statistics.median(v) for k, v in
                     dict(first=first, restart=restart, stop=stop, copy=copy).items()}}))
"""

SIZES = ((4 << 10, "4 KiB"), (1 << 20, "1 MiB"), (64 << 20, "64 MiB"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    print(f"kernel {os.uname().release}, load {os.getloadavg()[0]:.2f}, median of {args.repeat}")
    print(f"{'size':>7} | engine | first start | restart | stop   | bytes() copy")
    for size, label in SIZES:
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(size), str(args.repeat)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        r = json.loads(out.stdout)
        ms = {k: f"{r[k] * 1e3:.2f} ms" for k in ("first", "restart", "stop", "copy")}
        print(
            f"{label:>7} | {r['engine']:<6} | {ms['first']:>11} | {ms['restart']:>7} | "
            f"{ms['stop']:>6} | {ms['copy']:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
