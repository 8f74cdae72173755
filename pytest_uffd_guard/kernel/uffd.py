"""One userfaultfd: the ways of opening it, the API handshake, one registration.

Each way of opening is its own method (``OPEN_METHODS``), so a caller can
tell which worked; a failure is explained from its errno, the seccomp mode
and the kernel version (``explain_open_failure``, ``why_no_fd``).  The
probe, the engines and the doctor all open userfaultfds through here.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .memory import address_of

OPEN_METHODS = ("dev", "syscall", "syscall-user-mode-only")

SECCOMP_REMEDY = (
    "allow the userfaultfd system call in the container's seccomp profile "
    "(Docker: `--security-opt seccomp=<profile allowing userfaultfd>`, or "
    "`--security-opt seccomp=unconfined` to test; Kubernetes: a Localhost "
    "seccompProfile), or give the container /dev/userfaultfd (Linux 6.1+)"
)


@dataclass(frozen=True)
class OpenAttempt:
    """One way of opening a userfaultfd, and how it went."""

    method: str
    ok: bool
    errno: int | None = None
    error: str | None = None
    explanation: str | None = None


def _read_int(path: str, prefix: str | None = None) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if prefix is None:
                    return int(line.strip())
                if line.startswith(prefix):
                    return int(line[len(prefix) :].strip())
    except (OSError, ValueError):
        return None
    return None


def seccomp_mode() -> int | None:
    """0 none, 1 strict, 2 filter (from /proc/self/status), None if unknown."""
    return _read_int("/proc/self/status", "Seccomp:")


def unprivileged_userfaultfd() -> int | None:
    return _read_int("/proc/sys/vm/unprivileged_userfaultfd")


def seccomp_status() -> tuple[int | None, int | None]:
    """(Seccomp mode, number of filters) from /proc/self/status."""
    return seccomp_mode(), _read_int("/proc/self/status", "Seccomp_filters:")


def explain_open_failure(
    method: str, err: int, seccomp: int | None, version: tuple[int, ...] = ()
) -> str:
    """Why opening a userfaultfd by ``method`` failed with ``err`` on kernel ``version``."""
    before_5_11 = bool(version) and version < (5, 11)
    if method == "dev":
        if err == errno.ENOENT:
            if version and version < (6, 1):
                return "/dev/userfaultfd does not exist before Linux 6.1"
            return (
                "/dev/userfaultfd does not exist (not created, or not passed into this container)"
            )
        if err in (errno.EACCES, errno.EPERM):
            return "no read-write permission on /dev/userfaultfd (usually root-only, mode 0600)"
        if err == errno.EINVAL:
            return "USERFAULTFD_IOC_NEW rejected the flags"
        return f"/dev/userfaultfd failed: {os.strerror(err)}"
    if err == errno.ENOSYS:
        if seccomp == 2:
            return "userfaultfd(2) answered ENOSYS under a seccomp filter (blocked by the filter)"
        return "the kernel has no userfaultfd(2) (built without CONFIG_USERFAULTFD)"
    if err == errno.EPERM:
        if seccomp == 2 and (os.geteuid() == 0 or unprivileged_userfaultfd() == 1):
            # The sysctl cannot be why (it allows this user, or the user is
            # root): the filter is (seen on 5.10 as nobody with the sysctl at 1).
            return "denied by a seccomp filter (Seccomp: 2 in /proc/self/status)"
        if before_5_11:
            # Before 5.11 the sysctl is checked before the flags: 0 refuses
            # every unprivileged open, with UFFD_USER_MODE_ONLY or without.
            return (
                "not privileged: before Linux 5.11, vm.unprivileged_userfaultfd=0 denies "
                "unprivileged users any userfaultfd (there is no user-mode-only mode yet)"
            )
        if method == "syscall":
            return (
                "not privileged: vm.unprivileged_userfaultfd=0 lets unprivileged processes "
                "handle user-mode faults only"
            )
        if seccomp == 2:
            return "denied by a seccomp filter (Seccomp: 2 in /proc/self/status)"
        return "denied (a security module or a seccomp filter)"
    if err == errno.EINVAL and method == "syscall-user-mode-only":
        return "UFFD_USER_MODE_ONLY is unknown to this kernel (Linux < 5.11)"
    return os.strerror(err)


def open_flags(method: str) -> int:
    from .. import _uffd

    flags = int(_uffd.O_CLOEXEC | _uffd.O_NONBLOCK)
    if method == "syscall-user-mode-only":
        flags |= int(_uffd.USER_MODE_ONLY)
    return flags


def open_uffd(method: str) -> int:
    """Open a userfaultfd by ``method`` (one of ``OPEN_METHODS``)."""
    from .. import _uffd

    return int(_uffd.open("dev" if method == "dev" else "syscall", open_flags(method)))


class HandshakeError(OSError):
    """UFFDIO_API refused the features (the fd itself could be opened)."""


@contextmanager
def fresh_fd(method: str, features: int) -> Iterator[int]:
    """A new userfaultfd opened by ``method``, after UFFDIO_API with
    ``features``; closed on exit (which unregisters its ranges and lets any
    blocked writer go on).  Raises OSError when it cannot be opened (EMFILE
    is the caller's resource error), HandshakeError when UFFDIO_API fails."""
    from .. import _uffd

    fd = open_uffd(method)
    try:
        try:
            _uffd.api(fd, features)
        except OSError as exc:
            raise HandshakeError(exc.errno, exc.strerror) from exc
        yield fd
    finally:
        os.close(fd)


def register_once(fd: int, address: int, length: int) -> int:
    """Register a range in write-protect mode and unregister it again: the
    range ioctls the kernel grants there.  Raises OSError."""
    from .. import _uffd

    ioctls = int(_uffd.register_wp(fd, address, length))
    _uffd.unregister(fd, address, length)
    return ioctls


def grants_writeprotect(ioctls: int) -> bool:
    """Whether a range's ioctl mask includes UFFDIO_WRITEPROTECT (that mask,
    not UFFDIO_API, is where write-protect support shows)."""
    from .. import _uffd

    return bool(ioctls & (1 << int(_uffd.IOCTL_WRITEPROTECT_BIT)))


def why_no_fd(
    attempts: list[OpenAttempt], seccomp: int | None, version: tuple[int, ...] = ()
) -> tuple[str, str]:
    detail = "; ".join(f"{a.method}: {a.explanation}" for a in attempts)
    errnos = {a.errno for a in attempts}
    if seccomp == 2 and errnos <= {errno.EPERM, errno.ENOSYS, errno.ENOENT, errno.EACCES}:
        return f"userfaultfd is blocked ({detail})", SECCOMP_REMEDY
    if errno.ENOSYS in errnos:
        return (
            f"userfaultfd is not available ({detail})",
            "use a kernel built with CONFIG_USERFAULTFD=y (every major distribution's is)",
        )
    reason = f"userfaultfd could not be opened ({detail})"
    known = bool(version)
    if known and version < (5, 11):
        methods = {a.method for a in attempts}
        if methods == {"syscall-user-mode-only"} and errnos == {errno.EINVAL}:
            return reason, (
                "UFFD_USER_MODE_ONLY needs Linux 5.11+: run Linux 5.11 or newer, or let the "
                "plain syscall be tried (unset PYTEST_UFFD_GUARD_OPEN)"
            )
        if errno.EPERM in errnos:
            return reason, (
                "before Linux 5.11 unprivileged users get a userfaultfd only with "
                "`sysctl vm.unprivileged_userfaultfd=1` (no user-mode-only mode, and no "
                "/dev/userfaultfd before 6.1): set it, run as root or with CAP_SYS_PTRACE, "
                "or run Linux 5.11+ (user-mode-only userfaultfds with the sysctl at 0)"
            )
    if known and version < (6, 1):
        return reason, (
            "set `sysctl vm.unprivileged_userfaultfd=1` or run with CAP_SYS_PTRACE "
            "(/dev/userfaultfd exists only from Linux 6.1); in a container, also check "
            "its seccomp profile"
        )
    return reason, (
        "set `sysctl vm.unprivileged_userfaultfd=1`, run with CAP_SYS_PTRACE, or grant "
        "access to /dev/userfaultfd; in a container, also check its seccomp profile"
    )


def register_probe(method: str, features: int) -> tuple[int | None, str | None]:
    """Register one anonymous page in WP mode on a fresh fd.

    Returns the range ioctls and an error message (None when write-protect
    is granted).
    """
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with fresh_fd(method, features) as fd:
            try:
                ioctls = register_once(fd, address_of(page), mmap.PAGESIZE)
            except OSError as exc:
                return None, f"UFFDIO_REGISTER in write-protect mode failed: {exc.strerror}"
    except HandshakeError as exc:
        return None, f"UFFDIO_API with features {features:#x} failed: {exc.strerror}"
    finally:
        page.close()
    if not grants_writeprotect(ioctls):
        return ioctls, (
            f"UFFDIO_REGISTER did not grant UFFDIO_WRITEPROTECT (range ioctls {ioctls:#x}): "
            "this kernel cannot write-protect anonymous memory"
        )
    return ioctls, None
