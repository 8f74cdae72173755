"""A mapping that refuses every use after ``close()``: GuardedBuffer's mmap side.

``close()`` frees a guarded buffer's pages but keeps its address range
mapped until garbage collection (see ``kernel.memory.free_pages``): a
late writer or a live view must find memory there.  Every mmap method that
reads, writes or positions therefore raises ``BufferClosedError`` after
close, as mmap itself raises ValueError, instead of silently reading zeros.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

from .errors import BufferClosedError, InvalidBufferError


class ClosableMapping(mmap.mmap):
    """An mmap whose contents are out of reach once ``_closed`` is set."""

    name: str
    _closed: bool
    _size: int

    @property
    def closed(self) -> bool:  # type: ignore[override]
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BufferClosedError(
                f"guarded buffer {self.name!r} is closed",
                "read .writes or .changes() after close; create a new GuardedBuffer to guard again",
            )

    # Every mmap method that reads, writes or positions raises
    # BufferClosedError after close(), as mmap itself raises ValueError: the
    # range stays mapped (see kernel.memory.free_pages) and would silently read zeros.

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: Any) -> Any:
        self._check_open()
        return mmap.mmap.__getitem__(self, index)

    def __setitem__(self, index: Any, value: Any) -> None:
        self._check_open()
        mmap.mmap.__setitem__(self, index, value)

    if sys.version_info >= (3, 12):  # pragma: no cover - PEP 688

        def __buffer__(self, flags: int) -> memoryview:
            # memoryview(buf), numpy, readinto after close(): refuse, as mmap
            # does (views taken before close stay valid: see kernel.memory.free_pages).
            self._check_open()
            return mmap.mmap.__buffer__(self, flags)

    def resize(self, newsize: int) -> None:
        raise InvalidBufferError(
            "a guarded buffer cannot be resized", "create a new GuardedBuffer of the new size"
        )

    def __reduce__(self) -> Any:
        raise TypeError("a GuardedBuffer cannot be pickled; pickle bytes(buf) instead")


#: mmap methods that touch the contents or the position: after close() they
#: raise BufferClosedError, as mmap itself raises ValueError (the range stays
#: mapped until garbage collection and would silently read zeros).
_CHECKED_METHODS = (
    "read",
    "read_byte",
    "readline",
    "write",
    "write_byte",
    "move",
    "find",
    "rfind",
    "seek",
    "tell",
    "size",
    "flush",
    "madvise",
)


def _checked(name: str) -> Any:
    method = getattr(mmap.mmap, name)

    def checked(self: ClosableMapping, *args: Any) -> Any:
        self._check_open()
        return method(self, *args)

    checked.__name__ = checked.__qualname__ = name
    checked.__doc__ = method.__doc__
    return checked


for _name in _CHECKED_METHODS:
    setattr(ClosableMapping, _name, _checked(_name))
del _name
