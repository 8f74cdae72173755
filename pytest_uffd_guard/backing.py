"""Memory kinds a guarded buffer can live in.

``anonymous``
    private anonymous memory (the default; every engine, Linux 5.7+).
``shmem``
    a memfd (tmpfs) mapped shared: what shared-memory transports use.
    Write-protecting it needs ``UFFD_FEATURE_WP_HUGETLBFS_SHMEM`` (5.19+).
``hugetlb``
    a memfd on hugetlbfs (``MFD_HUGETLB``): pages of ``Hugepagesize``
    (2 MiB on x86_64), which must be reserved (``vm.nr_hugepages``).  The
    unit of tracking is then the huge page.
"""

from __future__ import annotations

import mmap
import os
import sys
from dataclasses import dataclass

from .errors import BufferAllocationError, InvalidBufferError, UffdUnavailableError
from .memory import PAGE_SIZE, round_up

BACKINGS = ("anonymous", "shmem", "hugetlb")

MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004

HUGETLB_REMEDY = (
    "reserve huge pages, e.g. `sysctl vm.nr_hugepages=16` (as root), or use "
    "backing='anonymous' or 'shmem'"
)


@dataclass(frozen=True)
class Mapping:
    """How to map a buffer of a given kind: mmap.mmap(fd, length, flags)."""

    fd: int
    length: int
    flags: int
    unit: int


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` as ``{key: number}`` (kB or page counts); {} if unreadable."""
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0])
    except OSError:
        pass
    return values


def huge_page_size() -> int | None:
    kb = meminfo().get("Hugepagesize")
    return kb * 1024 if kb else None


def hugetlb_unavailable(size: int = 1) -> str | None:
    """Why a hugetlb buffer of ``size`` bytes cannot be made now, or None."""
    if not sys.platform.startswith("linux"):
        return f"hugetlb exists only on Linux, not {sys.platform}"
    info = meminfo()
    unit = info.get("Hugepagesize", 0) * 1024
    if not unit:
        return "this kernel has no hugetlb pages (no Hugepagesize in /proc/meminfo)"
    needed = round_up(size, unit) // unit
    free = info.get("HugePages_Free", 0) - info.get("HugePages_Rsvd", 0)
    if free < needed:
        return (
            f"{needed} free huge page(s) of {unit >> 10} KiB needed, "
            f"{max(free, 0)} free (HugePages_Total {info.get('HugePages_Total', 0)} "
            "in /proc/meminfo)"
        )
    return None


def check_backing(backing: str) -> None:
    if backing not in BACKINGS:
        raise InvalidBufferError(
            f"unknown backing {backing!r}", f"use one of: {', '.join(BACKINGS)}"
        )


def open_mapping(backing: str, size: int, name: str) -> Mapping:
    """An fd (or -1) and flags to map ``size`` bytes of ``backing``.

    The caller maps it and closes ``fd`` afterwards (mmap keeps its own).
    """
    check_backing(backing)
    if backing == "anonymous":
        return Mapping(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, PAGE_SIZE)
    if not hasattr(os, "memfd_create"):
        raise UffdUnavailableError(
            f"backing={backing!r} needs memfd_create (Linux 3.17+)", "use backing='anonymous'"
        )
    unit = PAGE_SIZE
    flags = MFD_CLOEXEC
    if backing == "hugetlb":
        reason = hugetlb_unavailable(size)
        if reason is not None:
            raise UffdUnavailableError(f"cannot make a hugetlb buffer: {reason}", HUGETLB_REMEDY)
        unit = huge_page_size() or PAGE_SIZE
        flags |= MFD_HUGETLB
    length = round_up(size, unit)
    try:
        fd = os.memfd_create(f"uffd-guard:{name}", flags)
    except OSError as exc:
        raise UffdUnavailableError(
            f"memfd_create for backing={backing!r} failed: {exc.strerror}",
            HUGETLB_REMEDY if backing == "hugetlb" else "use backing='anonymous'",
        ) from exc
    try:
        os.ftruncate(fd, length)
    except OSError as exc:
        os.close(fd)
        raise BufferAllocationError(
            f"could not size a {backing} memfd to {length} bytes: {exc.strerror}",
            HUGETLB_REMEDY if backing == "hugetlb" else "guard a smaller buffer",
        ) from exc
    # hugetlb mappings must cover whole huge pages (munmap of a partial one
    # fails); shmem maps just the size, like anonymous memory.
    return Mapping(fd, length if backing == "hugetlb" else size, mmap.MAP_SHARED, unit)
