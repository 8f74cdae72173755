"""The doctor: what this machine offers for guarded buffers, and why.

``diagnose()`` probes and returns a :class:`Report` (plain data: rows of
checks, problems with their exact remedy, a verdict); ``render()`` turns it
into text tables and ``Report.as_dict()`` into JSON.  The rows about the
system are ``doctor_checks.py``'s, the end-to-end checks ``doctor_e2e.py``'s;
the engine rows and the verdict are ``engines.choose_engine``'s answers.  Used by
``python -m pytest_uffd_guard doctor`` and by ``pytest --uffd-doctor``.

The end-to-end write checks run in a child process on fresh userfaultfds,
so a running handler is never disturbed and a kernel bug cannot hang the
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
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .doctor_checks import (
    FAIL,
    INFO,
    OK,
    WARN,
    Check,
    Problem,
    dev_userfaultfd,
    handler_checks,
    handler_state,
    kernel_config,
    register_kinds,
    sysctl_meaning,
)
from .doctor_e2e import UNTOUCHED_TRAP, end_to_end, run_e2e_cases
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
    Capabilities,
    feature_since,
    probe,
)
from .kernel.uffd import SECCOMP_REMEDY, seccomp_status
from .names import ENGINES

#: What to do about an unexpected userfaultfd event (a bug to report).
HANDLER_REMEDY = "report it, with this doctor's --json output and the kernel version"


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
            sysctl_meaning(caps.kernel_version),
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
    handler = handler_checks(handler_state())
    if handler:
        report.sections["fault handler (this process)"] = handler
        problems.extend(
            Problem(f"the fault handler stopped on {row.item} {row.value}", HANDLER_REMEDY)
            for row in handler
            if row.status == FAIL
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


__all__ = [
    "UNTOUCHED_TRAP",
    "Check",
    "Problem",
    "Report",
    "diagnose",
    "render",
    "run_e2e_cases",
]
