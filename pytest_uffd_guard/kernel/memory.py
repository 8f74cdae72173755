"""Small helpers for raw memory: addresses of buffers, copies, mappings."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource
from contextlib import suppress
from typing import TYPE_CHECKING, Any

# At module level: at the open-files limit a lazy import fails too.
from ..errors import BufferAllocationError, ResourceLimitError

if TYPE_CHECKING:
    from ..errors import UffdGuardError

PAGE_SIZE = mmap.PAGESIZE


def address_of(buffer: Any) -> int:
    """Start address of a writable buffer (an mmap, a bytearray...).

    The ctypes view is dropped at once, so no export is left behind: the
    caller must keep ``buffer`` alive and unresized while it uses the address.
    """
    view = (ctypes.c_char * 1).from_buffer(buffer)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def copy(dst: int, src: int, length: int) -> None:
    """memmove between two raw addresses (the GIL is released meanwhile)."""
    ctypes.memmove(dst, src, length)


def round_up(size: int, unit: int = PAGE_SIZE) -> int:
    return -(-size // unit) * unit


def anonymous_map(length: int) -> mmap.mmap:
    """A private anonymous read-write mapping, zero-filled and untouched."""
    return mmap.mmap(
        -1,
        length,
        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
    )


def release_mapping(mapping: mmap.mmap) -> None:
    """Unmap ``mapping``, or at least drop its pages when it cannot be closed.

    A transient export (a ctypes view taking an address) that a parent
    thread held at fork() never ends in the child: close() then refuses.
    """
    try:
        mapping.close()
    except BufferError:
        with suppress(OSError):
            mapping.madvise(mmap.MADV_DONTNEED)


def free_pages(mapping: mmap.mmap, *, shared: bool) -> None:
    """Give a mapping's memory back but keep its address range mapped.

    A writer that was blocked in a fault when its range was unregistered
    retries its store afterwards, through a raw address that holds no buffer
    export (``ctypes.memset(buf.address, ...)``), and must find memory there
    (a zero page), not a hole.  Live views (memoryview, numpy) are just as
    safe.  Shared memory needs MADV_REMOVE: MADV_DONTNEED only drops this
    process's page table entries, the pages stay in the file.

    Never raises: Linux before 5.18 refuses MADV_DONTNEED on hugetlb
    (EINVAL), and a private hugetlb mapping refuses MADV_REMOVE.  When every
    advice is refused the pages stay until the range is unmapped at garbage
    collection.
    """
    advices = [mmap.MADV_REMOVE, mmap.MADV_DONTNEED] if shared else [mmap.MADV_DONTNEED]
    for advice in advices:
        try:
            mmap.mmap.madvise(mapping, advice)
        except OSError:
            continue
        return


def map_count() -> tuple[int, int] | None:
    """(mappings this process has, ``vm.max_map_count``), or None if unknown."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps", "rb") as f:
            count = sum(1 for _ in f)
    except (OSError, ValueError, MemoryError):
        return None
    return count, limit


def _limit(name: str) -> str:
    soft, _hard = resource.getrlimit(getattr(resource, name))
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


#: errno values that mean a limit of the process or the machine (open
#: files, memory) stopped something, not that support is missing.
LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def limit_error(exc: BaseException, doing: str) -> UffdGuardError | None:
    """:func:`resource_error` for ``exc`` when a limit caused it, else None.

    The limit is found in the errno of ``exc`` or of an OSError it was
    raised from, or, for dlopen's ImportError (which has no errno), in its
    text.
    """
    seen: BaseException | None = exc
    while seen is not None:
        code = seen.errno if isinstance(seen, OSError) else None
        if code in LIMIT_ERRNOS:
            return resource_error(OSError(code, os.strerror(code)), doing)
        seen = seen.__cause__
    if isinstance(exc, ImportError):
        for code in LIMIT_ERRNOS:
            if os.strerror(code) in str(exc):
                return resource_error(OSError(code, os.strerror(code)), doing)
    return None


def resource_error(exc: OSError, doing: str) -> UffdGuardError:
    """The project error for an ``OSError`` raised while ``doing`` something.

    Tells apart the limits a process meets: open files (EMFILE/ENFILE),
    mappings (``vm.max_map_count``), address space (``ulimit -v``) and
    memory itself, each with its own remedy.  ``doing`` reads like
    "mapping 4096 bytes for a guarded buffer".
    """
    code = exc.errno
    reason = exc.strerror or str(exc)
    if code == errno.EMFILE:
        return ResourceLimitError(
            f"{doing} failed: this process has too many open files "
            f"(ulimit -n is {_limit('RLIMIT_NOFILE')})",
            "close files you no longer need, or raise the limit "
            "(`ulimit -n 4096` in the shell that starts Python, or "
            "resource.setrlimit(resource.RLIMIT_NOFILE, ...))",
        )
    if code == errno.ENFILE:
        return ResourceLimitError(
            f"{doing} failed: the system-wide table of open files is full",
            "close files in other processes, or raise fs.file-max (as root)",
        )
    if code == errno.ENOMEM:
        maps = map_count()
        if maps is not None and maps[0] >= maps[1] - 16:
            return ResourceLimitError(
                f"{doing} failed: this process has {maps[0]} memory mappings, "
                f"the kernel's limit (vm.max_map_count={maps[1]})",
                "close guarded buffers you no longer need (each uses two mappings while "
                "open, one after close() until it is garbage-collected), or raise the "
                "limit as root (`sysctl vm.max_map_count=262144`)",
            )
        address_space = _limit("RLIMIT_AS")
        if address_space != "unlimited":
            return BufferAllocationError(
                f"{doing} failed ({reason}): the address space of this process is "
                f"limited to {address_space} bytes (ulimit -v)",
                "guard a smaller buffer, or raise the limit (`ulimit -v unlimited`, "
                "resource.setrlimit(resource.RLIMIT_AS, ...))",
            )
        return BufferAllocationError(
            f"{doing} failed ({reason})",
            "guard a smaller buffer, or give the process more memory "
            "(vm.overcommit_memory, the container's memory limit)",
        )
    return BufferAllocationError(
        f"{doing} failed ({reason})",
        "guard a smaller buffer, or raise the process's memory limits "
        "(ulimit -v, vm.overcommit_memory, the container's memory limit)",
    )
