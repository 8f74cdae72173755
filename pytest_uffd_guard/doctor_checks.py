"""The doctor's rows about the system: kernel config, sysctl, device, and
what UFFDIO_REGISTER grants per memory kind.

Plain data (:class:`Check`); the kernel is asked through ``kernel/`` (the
same code the probe and the engines use), never re-implemented here.
"""

from __future__ import annotations

import gzip
import mmap
import os
import stat
import sys
from dataclasses import dataclass
from typing import Any

from .kernel.backing import hugetlb_unavailable, open_mapping
from .kernel.capabilities import FEATURES, Capabilities
from .kernel.memory import address_of
from .kernel.uffd import fresh_fd, grants_writeprotect, register_once
from .names import BACKINGS

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


def sysctl_meaning(version: tuple[int, ...]) -> str:
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
    if caps.open_method is None:
        return [Check("register", "skipped", INFO, "no userfaultfd could be opened")]
    features = FEATURES["pagefault_flag_wp"]
    if caps.has("wp_hugetlbfs_shmem"):
        features |= FEATURES["wp_hugetlbfs_shmem"]
    return [_register_kind(caps.open_method, features, kind) for kind in BACKINGS]


def _register_kind(method: str, features: int, kind: str) -> Check:
    item = f"register WP: {kind}"
    reason = hugetlb_unavailable() if kind == "hugetlb" else None
    if reason is not None:
        return Check(item, "not tried", INFO, reason)
    try:
        mapping = open_mapping(kind, PAGE, "doctor")
    except Exception as exc:
        return Check(item, "not tried", INFO, str(exc))
    region = mmap.mmap(mapping.fd, mapping.length, flags=mapping.flags)
    if mapping.fd >= 0:
        os.close(mapping.fd)
    try:
        with fresh_fd(method, features) as fd:
            try:
                ioctls = register_once(fd, address_of(region), mapping.length)
            except OSError as exc:
                need = "" if kind == "anonymous" else "needs WP_HUGETLBFS_SHMEM, 5.19+"
                return Check(item, f"refused: {exc.strerror}", WARN, need)
    except OSError as exc:
        return Check(item, f"error: {exc.strerror}", WARN)
    finally:
        region.close()
    granted = grants_writeprotect(ioctls)
    return Check(
        item,
        _ioctl_names(ioctls),
        OK if granted else WARN,
        "UFFDIO_WRITEPROTECT granted" if granted else "UFFDIO_WRITEPROTECT not granted",
    )


def handler_state() -> dict[str, Any] | None:
    """This process's ``_uffd.handler_state()``, or None when the C core was
    never loaded (nothing was guarded: loading it just to ask would break
    the rule that importing the package loads nothing)."""
    core = sys.modules.get("pytest_uffd_guard._uffd")
    state = getattr(core, "handler_state", None)
    return None if state is None else dict(state())


def handler_checks(state: dict[str, Any] | None) -> list[Check]:
    """Rows about this process's fault handler (``_uffd.handler_state()``):
    the unexpected userfaultfd event it stopped on and the last anomaly it
    survived; [] when there is nothing to say (or it never ran)."""
    if not state:
        return []
    rows = []
    if state.get("unexpected_event_name"):
        code = state.get("unexpected_event", 0)
        rows.append(
            Check(
                "unexpected userfaultfd event",
                f"{state['unexpected_event_name']} ({code:#x})",
                FAIL,
                "the handler stopped: buffers guarded then were no longer tracked",
            )
        )
    if state.get("warning"):
        rows.append(
            Check(
                "last handler warning",
                state["warning"],
                WARN,
                f"the handler went on; {state.get('unmatched', 0)} unmatched faults, "
                f"{state.get('errors', 0)} resolution errors in all",
            )
        )
    return rows
