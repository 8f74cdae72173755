"""The ``PAGEMAP_SCAN`` ioctl (Linux 6.7+) on ``/proc/self/pagemap``.

Pure Python over ``fcntl.ioctl``: one function per question, each filling a
``struct pm_scan_arg`` and reading back ``struct page_region`` entries.
Used by the async engine to list the pages written since they were
write-protected through a ``UFFD_FEATURE_WP_ASYNC`` userfaultfd.

Layouts (``include/uapi/linux/fs.h``)::

    struct pm_scan_arg { u64 size, flags, start, end, walk_end, vec, vec_len,
                         max_pages, category_inverted, category_mask,
                         category_anyof_mask, return_mask; }      // 96 bytes
    struct page_region { u64 start, end, categories; }           // 24 bytes

Thread safety: ``fcntl.ioctl`` releases the GIL, so scans from several
threads run at once.  Each scan fills a result vector of its own (a shared
one let concurrent scans read each other's regions, issue 9 item 1), and
every region the kernel returns is clipped to the range asked about, so a
caller never walks memory outside it.

The request number ``_IOWR('f', 16, struct pm_scan_arg)`` is ``0xC0606610``
with the generic ``_IOC`` encoding (x86, arm64, riscv); powerpc, mips, sparc
and alpha encode ioctls differently, so it is computed here.
"""

from __future__ import annotations

import ctypes
import fcntl  # at import, not per call: see kernel/process.py on fork and imports
import os
import platform
import struct
from collections.abc import Iterator

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1

#: Pagemap entry bit: the pte is uffd-wp protected (Linux 5.13+).
PM_UFFD_WP = 1 << 57
PM_PRESENT = 1 << 63

_ARG = struct.Struct("<12Q")
_REGION = struct.Struct("<3Q")
#: Regions fetched per ioctl; the scan resumes from walk_end until done.
VEC_LEN = 512


def _ioc_iowr(type_: int, nr: int, size: int) -> int:
    if platform.machine().startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        # 13-bit size, 3-bit direction; _IOC_READ=2, _IOC_WRITE=4
        return (6 << 29) | (size << 16) | (type_ << 8) | nr
    # 14-bit size, 2-bit direction; _IOC_READ=2, _IOC_WRITE=1
    return (3 << 30) | (size << 16) | (type_ << 8) | nr


PAGEMAP_SCAN = _ioc_iowr(ord("f"), 16, _ARG.size)


class Pagemap:
    """An open ``/proc/self/pagemap``.  Closes with ``close()`` or ``with``."""

    def __init__(self, path: str = "/proc/self/pagemap") -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pagemap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scan(
        self,
        start: int,
        end: int,
        *,
        category_mask: int,
        return_mask: int,
        flags: int = 0,
        category_inverted: int = 0,
        category_anyof_mask: int = 0,
    ) -> Iterator[tuple[int, int, int]]:
        """Yield ``(start, end, categories)`` regions of ``[start, end)``.

        Every region yielded lies within ``[start, end)`` and is not empty.
        Raises OSError with the kernel's errno (ENOTTY or EINVAL before 6.7).
        """
        # Per call, never shared: the ioctl runs without the GIL.
        vec = (ctypes.c_uint64 * (3 * VEC_LEN))()
        vec_address = ctypes.addressof(vec)
        while start < end:
            arg = bytearray(
                _ARG.pack(
                    _ARG.size,
                    flags,
                    start,
                    end,
                    0,
                    vec_address,
                    VEC_LEN,
                    0,
                    category_inverted,
                    category_mask,
                    category_anyof_mask,
                    return_mask,
                )
            )
            count = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg, True)
            walk_end = _ARG.unpack(arg)[4]
            count = max(0, min(count, VEC_LEN))
            raw = ctypes.string_at(vec_address, count * _REGION.size)
            for first, last, categories in _REGION.iter_unpack(raw):
                # Trust nothing outside what was asked: the callers diff
                # memory at these addresses.
                first, last = max(first, start), min(last, end)
                if first < last:
                    yield first, last, categories
            if walk_end <= start:  # no progress: never loop forever
                break
            start = walk_end

    def written(self, start: int, end: int, *, reset: bool = False) -> list[tuple[int, int]]:
        """Ranges of pages written since they were protected (async uffd-wp).

        With ``reset``, the pages found are write-protected again in the same
        pass (``PM_SCAN_WP_MATCHING``), so the next call reports only newer
        writes.
        """
        flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC if reset else 0
        return [
            (s, e)
            for s, e, _ in self.scan(
                start,
                end,
                flags=flags,
                category_mask=PAGE_IS_WRITTEN,
                return_mask=PAGE_IS_WRITTEN,
            )
        ]

    def entries(self, address: int, pages: int, page_size: int) -> list[int]:
        """Raw 64-bit pagemap entries of ``pages`` pages from ``address``."""
        data = os.pread(self.fd, 8 * pages, address // page_size * 8)
        return list(struct.unpack(f"<{len(data) // 8}Q", data))


def scan_supported() -> bool:
    """True if this kernel has PAGEMAP_SCAN (probed with an empty range)."""
    try:
        with Pagemap() as pm:
            list(pm.scan(0, 0, category_mask=0, return_mask=PAGE_IS_WRITTEN))
            # start == end returns at once without calling the ioctl: ask
            # about one page of our own stack-free mapping instead.
            buf = ctypes.create_string_buffer(1)
            page = ctypes.addressof(buf) & ~(os.sysconf("SC_PAGE_SIZE") - 1)
            list(
                pm.scan(
                    page,
                    page + os.sysconf("SC_PAGE_SIZE"),
                    category_mask=0,
                    return_mask=PAGE_IS_PRESENT,
                )
            )
    except OSError:
        return False
    return True
