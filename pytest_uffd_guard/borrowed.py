"""Memory the package did not allocate: a buffer's bytes, and what backs them.

Used by :mod:`pytest_uffd_guard.inplace` (``watch()``):
``writable_view`` turns a user's object into a flat, writable byte view that
pins its memory, or raises the project's error naming the problem and the
fix; ``memory_kind`` reads ``/proc/self/maps`` to tell which engine (if
any) can write-protect that memory in place.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Any

from .errors import InvalidBufferError
from .guard import GuardedBuffer
from .kernel.memory import PAGE_SIZE


def _guarded(obj: Any) -> bool:
    """Whether ``obj`` is (a view of) a GuardedBuffer."""
    for _ in range(32):
        if isinstance(obj, GuardedBuffer):
            return True
        nxt = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if nxt is None or nxt is obj:
            return False
        obj = nxt
    return False


def writable_view(obj: Any) -> memoryview:
    """A flat, writable byte view of ``obj`` (an export: it pins the
    memory), or the project's error naming the problem and the fix."""
    what = type(obj).__name__
    if _guarded(obj):
        raise InvalidBufferError(
            f"cannot watch a GuardedBuffer ({what}): it is guarded already",
            "read the GuardedBuffer's own writes and changes() instead of watching it",
        )
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidBufferError(
            f"cannot watch a {what}: it does not expose a buffer",
            "watch a numpy array, bytearray, array.array, mmap, ctypes array or memoryview",
        ) from None
    except (ValueError, NotImplementedError, BufferError) as exc:
        numpy = sys.modules.get("numpy")
        if numpy is None or not isinstance(obj, numpy.ndarray):
            raise InvalidBufferError(
                f"cannot watch this {what}: its buffer is not available ({exc})",
                "watch an open, writable buffer (a closed mmap has none)",
            ) from None
        # dtypes the buffer protocol cannot describe (datetime64): their bytes.
        if not obj.flags.c_contiguous:
            raise _not_contiguous(what, bool(obj.flags.f_contiguous)) from None
        view = memoryview(obj.reshape(-1).view(numpy.uint8))
    if view.readonly:
        view.release()
        raise InvalidBufferError(
            f"cannot watch a read-only buffer ({what}): nothing can write it through this object",
            "watch the writable object it views (numpy: the writeable base array; "
            "bytes: a bytearray), or guard a copy with GuardedBuffer",
        )
    if not view.c_contiguous:
        fortran = view.f_contiguous
        view.release()
        raise _not_contiguous(what, fortran)
    if view.format != "B" or view.ndim != 1:
        flat = view.cast("B")
        view.release()
        view = flat
    return view


def _not_contiguous(what: str, fortran: bool) -> InvalidBufferError:
    return InvalidBufferError(
        f"cannot watch a buffer that is not C-contiguous ({what}): a watch covers one "
        "contiguous range of bytes",
        "watch arr.T (the same memory, C-contiguous)"
        if fortran
        else "watch the contiguous array it is a view of (its .base), or guard a "
        "contiguous copy with GuardedBuffer(numpy.ascontiguousarray(x))",
    )


def address_of_view(view: memoryview) -> int:
    if not view.nbytes:
        return 0
    probe = (ctypes.c_char * 1).from_buffer(view)
    try:
        return ctypes.addressof(probe)
    finally:
        del probe


@dataclass(frozen=True)
class Memory:
    """What backs a range of this process's memory (``memory_kind``)."""

    #: "anonymous" or "shmem" (a ``backing`` for ``choose_engine``), or
    #: "file" / "hugetlb" / "unknown" (not protected in place).
    backing: str
    #: A few words for messages ("a shared mapping of /data/x.bin").
    what: str
    #: Why it cannot be protected in place, or None.
    why_not: str | None = None


def memory_kind(start: int, end: int) -> Memory:
    """What backs ``[start, end)``, from ``/proc/self/maps`` (and ``smaps``
    for a mapping that is not private anonymous memory, to tell hugetlb
    apart).  A shared mapping that is not hugetlb is tried as "shmem": for
    a regular file the kernel refuses it at UFFDIO_REGISTER, and the watch
    then compares it.
    """
    found: list[Memory] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                span, _, rest = line.partition(" ")
                low, _, high = span.partition("-")
                lo, hi = int(low, 16), int(high, 16)
                if hi <= start or lo >= end:
                    continue
                found.append(_vma_kind(lo, rest.split(maxsplit=4)))
    except (OSError, ValueError) as exc:
        return Memory("unknown", "memory", f"/proc/self/maps could not be read ({exc})")
    for memory in found:
        if memory.why_not is not None:
            return memory
    for memory in found:
        if memory.backing == "shmem":
            return memory
    return found[0] if found else Memory("unknown", "memory", "it is not mapped")


def _vma_kind(start: int, fields: list[str]) -> Memory:
    """One ``/proc/self/maps`` line's kind (``fields``: perms, offset, dev,
    inode, path)."""
    perms, inode = fields[0], fields[3]
    path = fields[4].strip() if len(fields) > 4 else ""
    shared = perms[3] == "s"
    if inode == "0" and not shared:
        return Memory("anonymous", "anonymous memory")
    unit = _kernel_page_size(start)
    if unit is not None and unit != PAGE_SIZE:
        return Memory(
            "hugetlb",
            f"hugetlb memory ({path})",
            f"hugetlb memory ({path}) is compared: a watch protects base pages only",
        )
    if not shared:
        return Memory(
            "file",
            f"a private file mapping of {path}",
            f"a private file mapping of {path} (a C extension's data, numpy.memmap mode 'c'): "
            "userfaultfd write-protects only anonymous and shared memory",
        )
    return Memory("shmem", f"a shared mapping of {path or 'anonymous memory'}")


def _kernel_page_size(vma_start: int) -> int | None:
    """KernelPageSize of the mapping starting at ``vma_start``, or None."""
    head = f"{vma_start:x}-"
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    inside = line.startswith(head)
                elif inside and line.startswith("KernelPageSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
