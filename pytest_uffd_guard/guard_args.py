"""Checking what a GuardedBuffer is given, before anything is mapped.

Sizes and counts take any integer-like (``numpy.int64`` too); a bool, a
str or a non-contiguous array is refused with an ``InvalidBufferError``
that names the value and the fix.
"""

from __future__ import annotations

import numbers
import operator
import reprlib
import sys
from typing import Any, Union

from .errors import InvalidBufferError
from .kernel.memory import PAGE_SIZE

Source = Union[int, bytes, bytearray, memoryview, Any]


_show = reprlib.Repr()
_show.maxstring = _show.maxother = 60


def _is_numpy(obj: object, kind: str) -> bool:
    """isinstance(obj, numpy.<kind>) without importing numpy."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(obj, getattr(numpy, kind, ()))


def _is_bool(value: object) -> bool:
    return isinstance(value, bool) or _is_numpy(value, "bool_")


def count(value: object, what: str, remedy: str, *, maximum: int) -> int:
    """``value`` as an int in ``0..maximum`` (any integer-like), or a clear error."""
    if _is_bool(value):
        raise InvalidBufferError(f"{what} must be an int, got the bool {value!r}", remedy)
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidBufferError(
            f"{what} must be an int, got {type(value).__name__} {_show.repr(value)}", remedy
        ) from None
    if number < 0:
        raise InvalidBufferError(f"{what} must be >= 0, got {number}", remedy)
    if number > maximum:
        raise InvalidBufferError(f"{what} {number} is too large (at most {maximum})", remedy)
    return number


def _source_view(source: Source) -> memoryview:
    """A flat byte view of ``source``, or a clear error."""
    if isinstance(source, str):
        raise InvalidBufferError(
            "a str has no bytes to guard", "encode it first, e.g. GuardedBuffer(text.encode())"
        )
    try:
        view = memoryview(source)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidBufferError(
            f"cannot guard a {type(source).__name__}: it does not expose a buffer",
            "pass a size in bytes, or bytes, bytearray, memoryview, array.array or a numpy array",
        ) from None
    if not view.c_contiguous:
        raise InvalidBufferError(
            f"the {type(source).__name__} given is not C-contiguous",
            "pass a contiguous copy, e.g. numpy.ascontiguousarray(x) or bytes(view)",
        )
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def parse_source(source: Source) -> tuple[int, memoryview | None]:
    """The buffer's size, and the view to copy in (None for a size).

    A size is any integer-like (``int``, ``numpy.int64``: ``operator.index``);
    numpy scalars expose a buffer too, and must not be guarded as 8 bytes of
    data.  A numpy *array* is data, even a 0-d one.
    """
    if type(source) is int:  # the common case, before the slower checks
        return check_size(source), None
    if _is_numpy(source, "ndarray"):
        view = _source_view(source)
        return check_size(view.nbytes), view
    if _is_bool(source):
        raise InvalidBufferError(
            "a bool is not a size", "pass the size in bytes as an int, e.g. GuardedBuffer(4096)"
        )
    if isinstance(source, numbers.Number) or hasattr(type(source), "__index__"):
        try:
            size = operator.index(source)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidBufferError(
                f"size must be an int, got {type(source).__name__} {_show.repr(source)}",
                "pass the size in bytes as an int, e.g. GuardedBuffer(int(n))",
            ) from None
        return check_size(size), None
    view = _source_view(source)
    return check_size(view.nbytes), view


def check_size(size: int) -> int:
    if size <= 0:
        raise InvalidBufferError(
            f"a guarded buffer needs at least one byte, got size {size}",
            "pass a positive size in bytes, or non-empty data",
        )
    if size > sys.maxsize - PAGE_SIZE:
        raise InvalidBufferError(
            f"size {size} is larger than this platform can address",
            "guard a smaller buffer",
        )
    return size


def check_choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise InvalidBufferError(
            f"{what} must be a str, got {type(value).__name__} {_show.repr(value)}",
            f"use one of: {', '.join(choices)}",
        )
    if value not in choices:
        raise InvalidBufferError(f"unknown {what} {value!r}", f"use one of: {', '.join(choices)}")
    return value


def check_name(name: object) -> str | None:
    if name is None or isinstance(name, str):
        return name
    hint = "decode it first, e.g. name=raw.decode()" if isinstance(name, bytes) else "pass a str"
    raise InvalidBufferError(
        f"name must be a str, got {type(name).__name__} {_show.repr(name)}", hint
    )
