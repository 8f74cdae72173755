"""Small helpers for raw memory: addresses of buffers, copies, mappings."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any

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
