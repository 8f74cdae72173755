"""The doctor: what this machine offers for guarded buffers, and why.

``diagnose()`` probes and returns a :class:`Report` (plain data: rows of
checks, problems with their exact remedy, a verdict); ``render()`` turns it
into text tables and ``Report.as_dict()`` into JSON.  Used by
``python -m pytest_uffd_guard doctor`` and by ``pytest --uffd-doctor``.

The end-to-end write checks run in a child process on fresh userfaultfds,
so a running engine is never disturbed and a kernel bug cannot hang the
caller.  They answer the two questions users ask most:

* "``UFFDIO_WRITEPROTECT`` looks unsupported in ``UFFDIO_API``": it is never
  listed there; ``UFFDIO_REGISTER`` grants it per range (see the
  register rows).
* "my handler never gets the fault": without ``UFFD_FEATURE_WP_UNPOPULATED``
  (Linux < 6.4) protecting a never-touched page does nothing (see the
  untouched-page row).
"""

from __future__ import annotations

import errno
import gzip
import json
import mmap
import os
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .engines import (
    KERNEL_WRITES_NAMED,
    USER_MODE_ONLY_WRITERS,
    EngineChoice,
    choose_engine,
)
from .kernel.capabilities import (
    FEATURE_NOTES,
    FEATURES,
    KERNEL_WRITES_REMEDY,
    SECCOMP_REMEDY,
    Capabilities,
    feature_since,
    probe,
)
from .names import ENGINES

PAGE = mmap.PAGESIZE

CONFIG_OPTIONS = (
    "CONFIG_USERFAULTFD",
    "CONFIG_HAVE_ARCH_USERFAULTFD_WP",
    "CONFIG_PTE_MARKER_UFFD_WP",
)

#: Range ioctl bits returned by UFFDIO_REGISTER (``_UFFDIO_*``).
RANGE_IOCTLS = {
    2: "WAKE",
    3: "COPY",
    4: "ZEROPAGE",
    5: "MOVE",
    6: "WRITEPROTECT",
    7: "CONTINUE",
    8: "POISON",
}

UNTOUCHED_TRAP = (
    "not caught - expected on kernels without WP_UNPOPULATED; "
    "pytest-uffd-guard pre-faults pages to avoid it"
)

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"


@dataclass(frozen=True)
class Check:
    """One row: what was looked at, what was found, whether that is fine."""

    item: str
    value: str
    status: str = INFO
    detail: str = ""


@dataclass(frozen=True)
class Problem:
    problem: str
    remedy: str


@dataclass
class Report:
    """Everything the doctor found.  Plain data."""

    sections: dict[str, list[Check]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    verdict: str = ""
    #: What ``--uffd-engine=auto`` does here (``engines.choose_engine``).
    engine: str = ""
    engine_reason: str = ""
    engine_usable: bool = False
    kernel_writes: str = ""
    ok: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


# ------------------------------------------------------------------ probes


def kernel_config(release: str | None = None) -> tuple[str | None, dict[str, str | None]]:
    """Where the kernel config was read and the value of each CONFIG_OPTIONS."""
    release = release or os.uname().release
    candidates = ["/proc/config.gz", f"/boot/config-{release}"]
    for path in candidates:
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt") as f:
                    text = f.read()
            else:
                with open(path) as f:
                    text = f.read()
        except OSError:
            continue
        values: dict[str, str | None] = dict.fromkeys(CONFIG_OPTIONS)
        for line in text.splitlines():
            for option in CONFIG_OPTIONS:
                if line.startswith(option + "="):
                    values[option] = line.split("=", 1)[1]
                elif line == f"# {option} is not set":
                    values[option] = "n"
        return path, values
    return None, dict.fromkeys(CONFIG_OPTIONS)


def seccomp_status() -> tuple[int | None, int | None]:
    """(Seccomp mode, number of filters) from /proc/self/status."""
    mode = filters = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    mode = int(line.split()[1])
                elif line.startswith("Seccomp_filters:"):
                    filters = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return mode, filters


def _sysctl_meaning(version: tuple[int, ...]) -> str:
    """What vm.unprivileged_userfaultfd means on kernel ``version``."""
    if version and version < (5, 11):
        return (
            "1: any user may handle kernel faults; 0 (before Linux 5.11): unprivileged "
            "users get no userfaultfd at all (user-mode-only came in 5.11)"
        )
    return (
        "1: any user may handle kernel faults; 0: unprivileged users get "
        "user-mode-only userfaultfds"
    )


def dev_userfaultfd(path: str = "/dev/userfaultfd", version: tuple[int, ...] = ()) -> Check:
    try:
        st = os.stat(path)
    except OSError:
        if version and version < (6, 1):
            return Check(path, "absent", INFO, "it came in Linux 6.1")
        return Check(path, "absent", INFO, "Linux < 6.1, or not passed into this container")
    mode = stat.filemode(st.st_mode)
    access = os.access(path, os.R_OK | os.W_OK)
    return Check(
        path,
        f"{mode} uid={st.st_uid} gid={st.st_gid}",
        OK if access else INFO,
        "read-write access: kernel faults can be handled"
        if access
        else "no read-write access for this user",
    )


def _ioctl_names(mask: int) -> str:
    names = [name for bit, name in RANGE_IOCTLS.items() if mask & (1 << bit)]
    return f"{mask:#x} ({', '.join(names) or 'none'})"


def register_kinds(caps: Capabilities) -> list[Check]:
    """Register one page (or huge page) of each memory kind in WP mode."""
    from .kernel.backing import hugetlb_unavailable, open_mapping

    rows = []
    if caps.open_method is None:
        return [Check("register", "skipped", INFO, "no userfaultfd could be opened")]
    from . import _uffd
    from .kernel.capabilities import open_uffd
    from .kernel.memory import address_of

    features = FEATURES["pagefault_flag_wp"]
    if caps.has("wp_hugetlbfs_shmem"):
        features |= FEATURES["wp_hugetlbfs_shmem"]
    for kind in ("anonymous", "shmem", "hugetlb"):
        if kind == "hugetlb":
            reason = hugetlb_unavailable()
            if reason is not None:
                rows.append(Check(f"register WP: {kind}", "not tried", INFO, reason))
                continue
        try:
            mapping = open_mapping(kind, PAGE, "doctor")
        except Exception as exc:
            rows.append(Check(f"register WP: {kind}", "not tried", INFO, str(exc)))
            continue
        region = mmap.mmap(mapping.fd, mapping.length, flags=mapping.flags)
        if mapping.fd >= 0:
            os.close(mapping.fd)
        fd = open_uffd(caps.open_method)
        try:
            _uffd.api(fd, features)
            start = address_of(region)
            try:
                ioctls = int(_uffd.register_wp(fd, start, mapping.length))
            except OSError as exc:
                need = "" if kind == "anonymous" else " (needs WP_HUGETLBFS_SHMEM, 5.19+)"
                rows.append(
                    Check(f"register WP: {kind}", f"refused: {exc.strerror}", WARN, need.strip())
                )
                continue
            _uffd.unregister(fd, start, mapping.length)
            granted = bool(ioctls & (1 << int(_uffd.IOCTL_WRITEPROTECT_BIT)))
            rows.append(
                Check(
                    f"register WP: {kind}",
                    _ioctl_names(ioctls),
                    OK if granted else WARN,
                    "UFFDIO_WRITEPROTECT granted" if granted else "UFFDIO_WRITEPROTECT not granted",
                )
            )
        except OSError as exc:
            rows.append(Check(f"register WP: {kind}", f"error: {exc.strerror}", WARN))
        finally:
            os.close(fd)
            region.close()
    return rows


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
    from .kernel.capabilities import open_uffd
    from .kernel.memory import address_of

    region = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = address_of(region)
    if touched:
        region[0] = 0
    fd = open_uffd(method)
    writer: threading.Thread | None = None
    try:
        _uffd.api(fd, features)
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
        os.close(fd)  # unregisters: a writer still blocked goes on
        if writer is not None:
            writer.join(5)
        region.close()


def _async_case(method: str) -> bool:
    import ctypes

    from . import _uffd
    from .kernel.capabilities import open_uffd
    from .kernel.memory import address_of
    from .kernel.pagemap import Pagemap

    region = mmap.mmap(-1, 2 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = address_of(region)
    fd = open_uffd(method)
    try:
        _uffd.api(fd, FEATURES["wp_async"] | FEATURES["wp_unpopulated"])
        _uffd.register_wp(fd, start, 2 * PAGE)
        _uffd.writeprotect(fd, start, 2 * PAGE, True)
        ctypes.memset(start + PAGE + 1, 1, 1)
        with Pagemap() as pm:
            return pm.written(start, start + 2 * PAGE) == [(start + PAGE, start + 2 * PAGE)]
    finally:
        os.close(fd)
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


# --------------------------------------------------------------- diagnose


def diagnose(e2e: bool = True) -> Report:
    """Probe this machine and explain what guarded buffers can do here."""
    caps = probe()
    report = Report()
    problems = report.problems

    release = caps.kernel or "?"
    system = [
        Check("platform", caps.platform, OK if caps.platform.startswith("linux") else FAIL),
        Check("kernel", release, INFO, ".".join(map(str, caps.kernel_version))),
    ]
    source, config = kernel_config(release) if caps.platform.startswith("linux") else (None, {})
    for option, value in config.items():
        if source is None:
            system.append(Check(option, "unknown", INFO, "no /proc/config.gz or /boot/config-*"))
            continue
        good = value in ("y", "m")
        if not good and option == "CONFIG_PTE_MARKER_UFFD_WP" and caps.kernel_version < (5, 19):
            # The option came with shmem/hugetlb write-protect: not a defect here.
            detail = f"from {source}; the option exists from Linux 5.19 (shmem/hugetlb uffd-wp)"
            system.append(Check(option, value or "absent", INFO, detail))
            continue
        system.append(Check(option, value or "absent", OK if good else WARN, f"from {source}"))
        if not good and option != "CONFIG_PTE_MARKER_UFFD_WP":
            problems.append(
                Problem(
                    f"{option} is {value or 'absent'} in {source}",
                    f"use a kernel built with {option}=y",
                )
            )
    unpriv = caps.unprivileged_userfaultfd
    system.append(
        Check(
            "vm.unprivileged_userfaultfd",
            "unknown" if unpriv is None else str(unpriv),
            INFO,
            _sysctl_meaning(caps.kernel_version),
        )
    )
    system.append(Check("euid", str(os.geteuid()) if hasattr(os, "geteuid") else "?", INFO))
    system.append(dev_userfaultfd(version=caps.kernel_version))
    mode, filters = seccomp_status()
    seccomp_text = {0: "none", 1: "strict", 2: "filter"}.get(mode or 0, str(mode))
    system.append(
        Check(
            "seccomp (/proc/self/status)",
            seccomp_text if filters is None else f"{seccomp_text}, {filters} filter(s)",
            WARN if mode == 2 else OK,
            "a filter may deny userfaultfd(2)" if mode == 2 else "",
        )
    )
    report.sections["system"] = system

    opening = [
        Check(
            f"open: {a.method}",
            "ok" if a.ok else f"{a.error} (errno {a.errno})",
            OK if a.ok else WARN,
            (a.explanation or "")
            + (
                " [a seccomp filter is active: EPERM most likely comes from it]"
                if mode == 2 and a.errno == errno.EPERM
                else ""
            ),
        )
        for a in caps.open_attempts
    ]
    if caps.open_method is not None:
        opening.append(
            Check(
                "kernel writes (readinto, recv_into)",
                "seen" if caps.kernel_writes_seen else "not seen",
                OK if caps.kernel_writes_seen else WARN,
                "user-mode-only fd: under write-protect they fail with EFAULT or come back "
                "short; the async engine records them (WP_ASYNC)"
                if caps.user_mode_only
                else "",
            )
        )
    report.sections["opening a userfaultfd"] = opening

    features = []
    for name, bit in FEATURES.items():
        supported = bool(caps.supported_features & bit)
        hidden = name in caps.hidden_features
        _, consequence = FEATURE_NOTES.get(name, ("", ""))
        since = feature_since(name)
        value = "hidden (env)" if supported and hidden else ("yes" if supported else "no")
        status = INFO
        if name in FEATURE_NOTES:
            status = OK if caps.has(name) else WARN
        features.append(
            Check(
                f"UFFD_FEATURE_{name.upper()}",
                value,
                status,
                (f"Linux {since}+" + ("" if caps.has(name) else f"; without it: {consequence}"))
                if since
                else "",
            )
        )
    if caps.open_method is not None:
        features.append(
            Check(
                "UFFDIO_API ioctls",
                "API, REGISTER, UNREGISTER",
                INFO,
                "UFFDIO_WRITEPROTECT is never listed here, on any kernel: UFFDIO_REGISTER "
                "grants it per range (next table)",
            )
        )
        report.sections["features (UFFDIO_API)"] = features
        report.sections["write-protect per memory kind (UFFDIO_REGISTER)"] = register_kinds(caps)

    if e2e and caps.platform.startswith("linux"):
        rows = []
        for case in end_to_end():
            caught = case.get("caught")
            expected = case.get("expected", True)
            value = {True: "caught", False: "not caught", None: "not run"}[caught]
            status = INFO if caught is None else (OK if caught == expected else FAIL)
            rows.append(Check(case["case"], value, status, case.get("note", "")))
            if caught is not None and caught != expected:
                problems.append(
                    Problem(
                        f"end-to-end: {case['case']}: {value}",
                        "the kernel granted write-protect but did not deliver the fault; "
                        "run the kernel's uffd selftests (tools/testing/selftests/mm) and "
                        "report it with this doctor's --json output",
                    )
                )
        report.sections["end-to-end"] = rows

    def brief(text: str) -> str:
        # The long open-failure story is told once, in its own table.
        return text.replace(caps.reason, "see 'opening a userfaultfd'") if caps.reason else text

    auto = choose_engine("auto", caps=caps)
    report.engine, report.engine_reason = auto.runs, auto.reason
    report.engine_usable, report.kernel_writes = auto.usable, auto.kernel_writes
    full = auto.usable and auto.kernel_writes == KERNEL_WRITES_NAMED
    engines = [
        Check("auto picks", auto.runs, OK if full else WARN, brief(auto.reason)),
        Check("kernel writes under auto", auto.kernel_writes, OK if full else WARN),
    ]
    for name in ENGINES:
        if name == "auto":
            continue
        choice = choose_engine(name, caps=caps)
        engines.append(
            Check(
                name,
                "available" if choice.usable else "unavailable",
                OK if choice.usable else WARN,
                brief(choice.reason).removeprefix("requested; "),
            )
        )
    report.sections["engines"] = engines

    if not caps.available:
        seccomp_blocked = mode == 2 and caps.remedy == SECCOMP_REMEDY
        problems.insert(0, Problem(caps.reason or "userfaultfd is unavailable", caps.remedy or ""))
        if mode == 2 and not seccomp_blocked and caps.open_method is None:
            problems.append(
                Problem("a seccomp filter is active and may deny userfaultfd", SECCOMP_REMEDY)
            )
    else:
        if caps.user_mode_only:
            problems.append(Problem(_user_mode_only_problem(auto), KERNEL_WRITES_REMEDY))
        for missing in caps.missing:
            problems.append(
                Problem(
                    f"UFFD_FEATURE_{missing.feature.upper()} is missing: {missing.consequence}",
                    f"run Linux {missing.since} or newer"
                    + (
                        " (hidden by PYTEST_UFFD_GUARD_HIDE_FEATURES: unset it)"
                        if missing.feature in caps.hidden_features
                        else ""
                    ),
                )
            )
    report.ok = auto.usable
    report.verdict = _verdict(caps, auto)
    return report


def _user_mode_only_problem(auto: EngineChoice) -> str:
    text = (
        "the userfaultfd is user-mode only: writes made by the kernel inside system calls "
        "(readinto, recv_into) never reach a write-protect handler"
    )
    if auto.engine == "async":
        return (
            f"{text}; auto runs the async engine, which records them but names no writer; "
            "--uffd-engine=sync or hybrid would make them fail with EFAULT or come back short"
        )
    return (
        f"{text}, and the kernel has no WP_ASYNC (Linux 6.7+); auto runs the diff engine "
        "(same-value writes and writers not seen); --uffd-engine=sync or hybrid would make "
        "them fail with EFAULT or come back short"
    )


def _verdict(caps: Capabilities, auto: EngineChoice) -> str:
    """Which case of the engine rule applies here, in one paragraph."""
    if not auto.usable:
        short_reason = (auto.reason or "userfaultfd is unavailable").split(" (")[0]
        return (
            f"NOT AVAILABLE: {short_reason}. With --uffd-engine=auto guarded tests are "
            "skipped (errors with --uffd-require); --uffd-engine=diff runs them on a byte "
            "comparison at the end of the test (same-value writes and the writer are not seen)"
        )
    opened = f"{caps.open_method}{', user-mode only' if caps.user_mode_only else ''}"
    if auto.kernel_writes == KERNEL_WRITES_NAMED:
        return (
            f"READY: guarded buffers work here; auto runs the {auto.engine} engine ({opened}): "
            "every write recorded with its writer, kernel writes (readinto) included"
        )
    if auto.engine == "async":
        return (
            f"READY, WRITERS NOT NAMED: auto runs the async engine ({opened}): every write is "
            f"recorded, kernel writes (readinto) included, and none fails; {USER_MODE_ONLY_WRITERS}"
        )
    return (
        f"READY, BYTE COMPARISON: auto runs the diff engine ({opened}, no WP_ASYNC): kernel "
        "writes (readinto) work and are reported, same-value writes and writers are not seen; "
        f"{auto.remedy}"
    )


# ----------------------------------------------------------------- render


def render(report: Report) -> str:
    """The report as text: one table per section, the verdict, the problems."""
    from tabulate import tabulate

    out = ["pytest-uffd-guard doctor", ""]
    for title, rows in report.sections.items():
        out.append(f"== {title}")
        out.append(
            tabulate(
                [(r.status, r.item, r.value, r.detail) for r in rows],
                headers=("", "check", "found", "why / detail"),
                tablefmt="simple",
                maxcolwidths=[None, 34, 30, 60],
            )
        )
        out.append("")
    out.append(f"Verdict: {report.verdict}")
    if report.problems:
        out.append("")
        out.append(f"Problems ({len(report.problems)}):")
        for n, problem in enumerate(report.problems, 1):
            out.append(f"  {n}. {problem.problem}")
            if problem.remedy:
                out.append(f"     Fix: {problem.remedy}")
    else:
        out.append("No problems found.")
    return "\n".join(out) + "\n"
