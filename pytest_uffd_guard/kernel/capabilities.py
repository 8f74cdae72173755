"""What this machine offers: a probe of userfaultfd write-protection.

``capabilities()`` answers, as plain data, whether guarded buffers work here,
how the userfaultfd was opened, which kernel features exist, what is missing
and what to change.  It never raises: an unusable machine is a result, not
an error.  The probe runs once per process and costs a few system calls.

Two environment variables let tests (and curious users) simulate a lesser
machine on a better one; both are read at probe time:

``PYTEST_UFFD_GUARD_OPEN``
    comma-separated open methods to try, in order, from ``dev``,
    ``syscall`` and ``syscall-user-mode-only`` (default: all three).
``PYTEST_UFFD_GUARD_HIDE_FEATURES``
    comma-separated feature names (see ``FEATURES``) to treat as absent,
    e.g. ``wp_unpopulated`` to behave as on Linux < 6.4.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import process
from .memory import limit_error
from .uffd import (
    OPEN_METHODS,
    OpenAttempt,
    explain_open_failure,
    open_uffd,
    register_probe,
    seccomp_mode,
    unprivileged_userfaultfd,
    why_no_fd,
)

#: Every userfaultfd feature bit that matters here, by name.
FEATURES: dict[str, int] = {
    "pagefault_flag_wp": 1 << 0,
    "event_fork": 1 << 1,
    "event_remap": 1 << 2,
    "event_remove": 1 << 3,
    "missing_hugetlbfs": 1 << 4,
    "missing_shmem": 1 << 5,
    "event_unmap": 1 << 6,
    "sigbus": 1 << 7,
    "thread_id": 1 << 8,
    "minor_hugetlbfs": 1 << 9,
    "minor_shmem": 1 << 10,
    "exact_address": 1 << 11,
    "wp_hugetlbfs_shmem": 1 << 12,
    "wp_unpopulated": 1 << 13,
    "poison": 1 << 14,
    "wp_async": 1 << 15,
    "move": 1 << 16,
}

#: Features the engine turns on when the kernel has them.
WANTED = (
    "pagefault_flag_wp",
    "thread_id",
    "exact_address",
    "wp_unpopulated",
    "wp_hugetlbfs_shmem",
)

#: What each wanted feature buys, the kernel that brought it, and what
#: happens without it.  Shown by the doctor and the plugin's header.
FEATURE_NOTES: dict[str, tuple[str, str]] = {
    "pagefault_flag_wp": (
        "5.7",
        "no write-protection at all: guarded buffers cannot be armed",
    ),
    "thread_id": ("4.14", "the writing thread is not known"),
    "exact_address": (
        "5.18",
        "writes are reported at page granularity (offset of the page, exact=False); "
        "changes() still gives exact byte ranges",
    ),
    "wp_unpopulated": (
        "6.4",
        "write-protecting a never-touched page does nothing, so every page is "
        "pre-faulted before it is protected (costs time and memory on big buffers)",
    ),
    "wp_hugetlbfs_shmem": (
        "5.19",
        "shmem and hugetlb buffers cannot be write-protected (only engine='diff' tracks them)",
    ),
    "wp_async": ("6.7", "no asynchronous tracking (PAGEMAP_SCAN)"),
    "event_remove": (
        "4.11",
        "madvise() discarding guarded pages is not seen, and those pages lose "
        "their write-protection",
    ),
}

#: Architectures whose userfaultfd write-protect (CONFIG_HAVE_ARCH_USERFAULTFD_WP)
#: came later than Linux 5.7 (x86_64), with the release that brought it.
#: arm64: commit 5b32510af77b "arm64/mm: Add uffd write-protect support",
#: merged for 6.10 (Debian's 6.1 arm64 has no uffd-wp, its 6.12 has).
ARCH_WP_SINCE: dict[str, str] = {"aarch64": "6.10", "arm64": "6.10"}


def wp_since(machine: str | None = None) -> str:
    """The Linux release that brought uffd write-protect to this CPU architecture."""
    return ARCH_WP_SINCE.get(machine if machine is not None else platform.machine(), "5.7")


def feature_since(name: str, machine: str | None = None) -> str:
    """The Linux release that brought feature ``name`` (here, for write-protect)."""
    if name == "pagefault_flag_wp":
        return wp_since(machine)
    return FEATURE_NOTES[name][0] if name in FEATURE_NOTES else ""


def _no_wp_reason(machine: str | None = None) -> tuple[str, str]:
    machine = machine if machine is not None else platform.machine()
    since = wp_since(machine)
    if since != "5.7":
        return (
            "this kernel has no userfaultfd write-protection (UFFD_FEATURE_PAGEFAULT_FLAG_WP: "
            f"on {machine} it needs Linux {since}+, CONFIG_HAVE_ARCH_USERFAULTFD_WP)",
            f"run on Linux {since} or newer on {machine} (uffd-wp came to this architecture "
            f"in {since}); meanwhile --uffd-engine=diff works",
        )
    return (
        "this kernel has no userfaultfd write-protection "
        "(UFFD_FEATURE_PAGEFAULT_FLAG_WP: Linux 5.7+, and an architecture with uffd-wp)",
        "run on Linux 5.7 or newer on x86_64 (arm64 needs Linux 6.10+; other architectures "
        "a kernel with CONFIG_HAVE_ARCH_USERFAULTFD_WP); Linux 6.4+ is best",
    )


KERNEL_WRITES_REMEDY = (
    "to see writes made by the kernel inside system calls, give the process a "
    "userfaultfd that handles kernel faults: run as root (or with CAP_SYS_PTRACE), "
    "set `sysctl vm.unprivileged_userfaultfd=1`, or grant read-write access to "
    "/dev/userfaultfd (Linux 6.1+), e.g. `setfacl -m u:$USER:rw /dev/userfaultfd`"
)


@dataclass(frozen=True)
class Missing:
    """A feature this machine lacks: what, since when, and what it costs."""

    feature: str
    since: str
    consequence: str


@dataclass(frozen=True)
class Capabilities:
    """What guarded buffers can do in this process.  Plain data."""

    platform: str
    kernel: str
    kernel_version: tuple[int, ...]
    available: bool
    reason: str | None = None
    remedy: str | None = None
    open_method: str | None = None
    user_mode_only: bool = False
    open_attempts: tuple[OpenAttempt, ...] = ()
    supported_features: int = 0
    hidden_features: tuple[str, ...] = ()
    register_ioctls: int | None = None
    seccomp: int | None = None
    unprivileged_userfaultfd: int | None = None
    missing: tuple[Missing, ...] = field(default=())
    #: A limit of this process (open files, memory), not the machine's
    #: support, failed the probe: ``capabilities()`` does not keep it.
    limited: bool = False

    def has(self, feature: str) -> bool:
        """True if the kernel supports ``feature`` (and it is not hidden)."""
        return bool(self.supported_features & FEATURES[feature]) and (
            feature not in self.hidden_features
        )

    @property
    def features(self) -> dict[str, bool]:
        return {name: self.has(name) for name in FEATURES}

    @property
    def enabled_features(self) -> int:
        """The feature bits the engine asks for at UFFDIO_API."""
        bits = 0
        for name in WANTED:
            if self.has(name):
                bits |= FEATURES[name]
        return bits

    @property
    def kernel_writes_seen(self) -> bool:
        """Whether faults from writes made by the kernel (readinto, recv_into)
        reach a write-protect handler (the sync engine and hybrid's sync phase).

        With ``UFFD_USER_MODE_ONLY`` they do not: under those engines the
        system call fails with EFAULT or comes back short.  WP_ASYNC faults
        are resolved by the kernel itself, so the async engine records kernel
        writes either way; which engine runs is ``engines.choose_engine``'s
        call (``EngineChoice.kernel_writes`` says what happens to them).
        """
        return self.available and not self.user_mode_only

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["features"] = self.features
        data["kernel_writes_seen"] = self.kernel_writes_seen
        return data


def kernel_version(release: str) -> tuple[int, ...]:
    """``"6.1.0-18-amd64"`` -> ``(6, 1, 0)``."""
    numbers: list[int] = []
    for part in release.split("-")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def _env_names(
    variable: str, what: str, known: tuple[str, ...]
) -> tuple[list[str], tuple[str, str] | None]:
    """The comma-separated names in ``variable``, and the reason and remedy
    when some are not ``known``."""
    names = [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        return names, (
            f"{variable} names unknown {what}: {', '.join(unknown)}",
            f"use {what} from: {', '.join(known)}",
        )
    return names, None


def open_for(caps: Capabilities, what: str) -> int:
    """Open a userfaultfd the way the probe found to work, for an engine.

    ``what`` names it in the error ("userfaultfd", "async userfaultfd").
    Raises UffdUnavailableError with the probe's remedy.
    """
    from ..errors import UffdUnavailableError

    assert caps.open_method is not None
    try:
        return open_uffd(caps.open_method)
    except OSError as exc:
        raise UffdUnavailableError(
            f"opening the {what} ({caps.open_method}) failed: {exc.strerror}", caps.remedy
        ) from exc


def not_linux() -> tuple[str, str] | None:
    """Why this platform has no userfaultfd and what to do, or None on Linux."""
    if sys.platform.startswith("linux"):
        return None
    return (
        f"userfaultfd exists only on Linux, not on {sys.platform}",
        "run the tests on Linux; elsewhere guarded buffers are skipped "
        "(engine='diff' runs anywhere)",
    )


def _unavailable(base: dict[str, Any], reason: str, remedy: str | None) -> Capabilities:
    return Capabilities(available=False, reason=reason, remedy=remedy, **base)


def _limited(
    base: dict[str, Any], errors: Iterable[BaseException], doing: str
) -> Capabilities | None:
    """The answer when a limit (open files, memory) caused one of
    ``errors``, else None."""
    for exc in errors:
        err = limit_error(exc, doing)
        if err is not None:
            return Capabilities(
                available=False, reason=err.cause, remedy=err.remedy, limited=True, **base
            )
    return None


def probe() -> Capabilities:
    """Probe this process's userfaultfd support (uncached)."""
    release = os.uname().release if hasattr(os, "uname") else ""
    base: dict[str, Any] = {
        "platform": sys.platform,
        "kernel": release,
        "kernel_version": kernel_version(release),
    }
    off_linux = not_linux()
    if off_linux is not None:
        return _unavailable(base, *off_linux)
    try:
        from .records import load_core

        _uffd = load_core()
    except (ImportError, OSError) as exc:
        doing = "loading the C extension pytest_uffd_guard._uffd"
        limited = _limited(base, [exc], doing)
        if limited is not None:
            return limited
        return _unavailable(
            base,
            f"the C extension pytest_uffd_guard._uffd is missing or unusable ({exc})",
            "reinstall from source with a C compiler: `pip install --force-reinstall "
            "--no-binary pytest-uffd-guard pytest-uffd-guard`",
        )

    seccomp = seccomp_mode()
    base["seccomp"] = seccomp
    base["unprivileged_userfaultfd"] = unprivileged_userfaultfd()
    hidden, bad = _env_names("PYTEST_UFFD_GUARD_HIDE_FEATURES", "features", tuple(FEATURES))
    if bad is not None:
        return _unavailable(base, *bad)
    base["hidden_features"] = tuple(hidden)
    methods, bad = _env_names("PYTEST_UFFD_GUARD_OPEN", "methods", OPEN_METHODS)
    if bad is not None:
        return _unavailable(base, *bad)
    methods = methods or list(OPEN_METHODS)

    attempts: list[OpenAttempt] = []
    fd = -1
    method = None
    for candidate in methods:
        try:
            fd = open_uffd(candidate)
        except OSError as exc:
            err = exc.errno or 0
            attempts.append(
                OpenAttempt(
                    candidate,
                    False,
                    err,
                    os.strerror(err),
                    explain_open_failure(candidate, err, seccomp, base["kernel_version"]),
                )
            )
            continue
        attempts.append(OpenAttempt(candidate, True))
        method = candidate
        break
    base["open_attempts"] = tuple(attempts)
    if method is None:
        doing = "opening a userfaultfd"
        failed = [OSError(a.errno, a.error) for a in attempts if a.errno is not None]
        limited = _limited(base, failed, doing)
        return limited or _unavailable(base, *why_no_fd(attempts, seccomp, base["kernel_version"]))
    base["open_method"] = method
    base["user_mode_only"] = method == "syscall-user-mode-only"

    # UFFDIO_API succeeds once per fd, so features are read on a throw-away
    # fd and the real one is opened later with exactly the bits we want.
    try:
        supported, _ = _uffd.api(fd, 0)
    except OSError as exc:
        return _unavailable(
            base,
            f"UFFDIO_API failed: {exc.strerror}",
            "this kernel's userfaultfd is unusable; try a newer kernel",
        )
    finally:
        os.close(fd)
    base["supported_features"] = int(supported)
    probe_caps = Capabilities(available=False, **base)
    base["missing"] = tuple(
        Missing(name, feature_since(name), consequence)
        for name, (_, consequence) in FEATURE_NOTES.items()
        if not probe_caps.has(name)
    )
    if not probe_caps.has("pagefault_flag_wp"):
        return _unavailable(base, *_no_wp_reason())

    # Write-protect support is reported per registered range, by
    # UFFDIO_REGISTER, never by UFFDIO_API: register one page to find out.
    ioctls, error = register_probe(method, probe_caps.enabled_features)
    base["register_ioctls"] = ioctls
    if error is not None:
        return _unavailable(base, error, _no_wp_reason()[1])
    return Capabilities(available=True, **base)


_cached: Capabilities | None = None


def capabilities(refresh: bool = False) -> Capabilities:
    """What guarded buffers can do here (probed once per process)."""
    global _cached
    if refresh or _cached is None:
        caps = probe()
        if caps.limited:  # the next call, once files or memory are freed, probes again
            return caps
        _cached = caps
    return _cached


def _forget() -> None:
    # A forked child probes again: it may have other rights (setuid, seccomp).
    global _cached
    _cached = None


process.on_fork_child(_forget)
