"""Memory kinds a guarded buffer can live in.

``anonymous``
    private anonymous memory (the default; every engine, Linux 5.7+).
``shmem``
    a memfd (tmpfs) mapped shared: what shared-memory transports use.
    Write-protecting it needs ``UFFD_FEATURE_WP_HUGETLBFS_SHMEM`` (5.19+).
    The memfd is mapped over a placeholder mapping and closed at once, so a
    shmem buffer holds no file descriptor (``mmap.mmap(fd)`` would keep a
    duplicate open until garbage collection: issue 9 item 15).
``hugetlb``
    a memfd on hugetlbfs (``MFD_HUGETLB``): pages of ``Hugepagesize``
    (2 MiB on x86_64), which must be reserved (``vm.nr_hugepages``).  The
    unit of tracking is then the huge page.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from dataclasses import dataclass

from ..errors import BufferAllocationError, InvalidBufferError, UffdUnavailableError
from ..names import BACKINGS
from .memory import PAGE_SIZE, resource_error, round_up

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
    #: Map anonymous memory first, then ``overlay`` the fd over it (shmem).
    overlay: bool = False


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
    if not isinstance(backing, str):
        raise InvalidBufferError(
            f"backing must be a str, got {type(backing).__name__} {backing!r:.60}",
            f"use one of: {', '.join(BACKINGS)}",
        )
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
        fd = os.memfd_create(_memfd_name(name), flags)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise resource_error(exc, f"creating the memfd of a {backing} buffer") from exc
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
    # fails) and need an address aligned to one, which only the kernel's
    # own choice gives: they are mapped from the fd directly (and keep it).
    # shmem maps just the size, like anonymous memory, over a placeholder.
    if backing == "hugetlb":
        return Mapping(fd, length, mmap.MAP_SHARED, unit)
    return Mapping(fd, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, unit, overlay=True)


def _memfd_name(name: str) -> str:
    """memfd names are at most 249 bytes and cannot hold NUL."""
    raw = f"uffd-guard:{name}".replace("\0", "?").encode("utf-8", "replace")[:240]
    return raw.decode("utf-8", "ignore")


MAP_FIXED = 0x10  # the same value on every Linux architecture CPython runs on
_MAP_FAILED = ctypes.c_void_p(-1).value


def overlay(address: int, length: int, fd: int) -> None:
    """Map ``fd`` shared over ``[address, address + length)`` (MAP_FIXED).

    The placeholder there is replaced atomically; the caller owns the range
    and closes ``fd`` afterwards (the mapping keeps the file, not the fd).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    result = libc.mmap(address, length, prot, mmap.MAP_SHARED | MAP_FIXED, fd, 0)
    if result is None or result == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if result != address:  # pragma: no cover - MAP_FIXED either maps there or fails
        raise OSError(errno.EINVAL, "MAP_FIXED mapped elsewhere")
