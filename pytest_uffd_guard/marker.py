"""The ``readonly_buffer`` marker: its help, its arguments, and the guarded
copies it swaps in for them.

``marked_arguments`` validates a test's markers at setup (a bad marker ends
in ``pytest.fail(..., pytrace=False)`` quoting it); ``guarded_copy`` makes
a guarded twin of a numpy array or memoryview argument.  Arguments marked
``inplace=True`` are watched in their own memory instead (``watchplugin.py``);
a bare marker makes the test's ``guarded_buffer`` buffers strict
(``strict_rules``, issue 14 item 2).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest

from .state import FIXTURE, MARKER

if TYPE_CHECKING:
    from .guard import GuardedBuffer
    from .verdict import Range

#: ``make(source, name)``: a new guarded buffer (or the test skipped).
Make = Callable[[Any, str], "GuardedBuffer"]

#: Setup error for a marker argument whose type cannot be guarded.
UNGUARDABLE = (
    "@pytest.mark.readonly_buffer cannot guard argument {argname!r} of type {type}: "
    "only numpy.ndarray and memoryview arguments can be swapped for a guarded copy"
)
#: Setup error when a memoryview's format or shape cannot be rebuilt.
UNCASTABLE = (
    "@pytest.mark.readonly_buffer cannot rebuild memoryview argument {argname!r} "
    "(format {format!r}, shape {shape}) over a guarded copy: {error}"
)
UNGUARDABLE_FIX = (
    "make the fixture or parameter a memoryview (memoryview(data)) or a numpy array, "
    "or build the buffer with the guarded_buffer fixture"
)
#: Setup error when the marker names an argument the test does not take.
UNKNOWN_ARGUMENT = (
    "@pytest.mark.readonly_buffer names {argname!r}, which is not an argument of {test}"
)
BAD_MARKER = "invalid @pytest.mark.readonly_buffer on {test}: {problem}"


def readonly_buffer(*argnames: str, allow: Sequence[Any] = (), inplace: bool = False) -> None:
    """Swap the named test arguments (numpy arrays, memoryviews) for guarded
    copies before the call and fail the test if it writes into them, even
    under --uffd-report; writes into the byte ranges of allow (slices or
    (start, stop) pairs) are reported but allowed. inplace=True watches the
    arguments' own memory during the call instead of copying them. Without
    argnames, every guarded_buffer of the test is held to the same rules."""


def marker_help() -> str:
    """The marker's --markers line, built from readonly_buffer's signature
    (``state.MARKER_HELP`` is this, written out)."""
    parameters = inspect.signature(readonly_buffer).parameters.values()
    signature = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters)
    doc = " ".join((readonly_buffer.__doc__ or "").split())
    return (
        f"{MARKER}({signature}): {doc} "
        "Example: @pytest.mark.readonly_buffer('frame', allow=[slice(0, 4)]). "
        "See docs/user-guide.md"
    )


class MarkedArgument(NamedTuple):
    argname: str
    allow: tuple[Any, ...]
    #: Watched in its own memory (``watchplugin.py``), not swapped for a copy.
    inplace: bool = False


def _allow_items(value: Any) -> tuple[Any, ...]:
    """``allow=`` as a tuple of range specs: one slice/pair, or many."""
    if isinstance(value, slice):
        return (value,)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) or v is None for v in value)
    ):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"allow={value!r} is neither a range nor a sequence of ranges") from None


def marked_arguments(item: pytest.Item) -> list[MarkedArgument]:
    """The arguments the item's readonly_buffer markers name, validated.

    A marker on the function must name arguments of the test; one on a
    class or module applies to the tests that take those arguments.  A
    bare marker names none: it applies to the ``guarded_buffer`` fixture's
    buffers (``strict_rules``), so on a function it needs that fixture.
    """
    fixturenames = set(getattr(item, "fixturenames", ()))
    result: dict[str, list[Any]] = {}
    inplace_names: set[str] = set()
    for node, mark in item.iter_markers_with_node(MARKER):
        unknown = set(mark.kwargs) - {"allow", "inplace"}
        if unknown:
            problem = (
                f"unknown keyword {', '.join(sorted(unknown))} (only allow= and inplace= "
                "are accepted)"
            )
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        inplace = mark.kwargs.get("inplace", False)
        if not isinstance(inplace, bool):
            problem = f"inplace= must be True or False, got {inplace!r}"
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        if not mark.args and (inplace or (node is item and FIXTURE not in fixturenames)):
            problem = (
                "name at least one argument, e.g. readonly_buffer('data')"
                + (", to watch in place" if inplace else "")
                + f"; a bare readonly_buffer applies to the {FIXTURE} fixture's buffers"
                + ("" if inplace else ", which this test does not use")
            )
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        for argname in mark.args:
            if not isinstance(argname, str):
                problem = f"argument names must be strings, got {argname!r}"
                pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        if len(set(mark.args)) != len(mark.args):
            problem = f"an argument is named twice in {mark.args!r}"
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        try:
            allow = _allow_items(mark.kwargs.get("allow", ()))
        except ValueError as exc:
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=exc), pytrace=False)
        for argname in mark.args:
            if argname not in fixturenames:
                if node is item:
                    pytest.fail(
                        UNKNOWN_ARGUMENT.format(argname=argname, test=item.nodeid), pytrace=False
                    )
                continue
            result.setdefault(argname, []).extend(allow)
            if inplace:
                inplace_names.add(argname)
    return [
        MarkedArgument(name, tuple(allow), name in inplace_names) for name, allow in result.items()
    ]


def strict_rules(item: pytest.Item, size: int, readonly: bool) -> tuple[bool, tuple[Range, ...]]:
    """``(strict, allow)`` for a ``guarded_buffer`` of ``size`` bytes: a bare
    readonly_buffer marker on the test (or its class or module) makes its
    read-only buffers fail the test even under --uffd-report, with the
    marker's ``allow=`` ranges (issue 14, item 2).  Validated at setup by
    ``marked_arguments``; a range that does not fit ``size`` fails here."""
    bare = [mark for mark in item.iter_markers(MARKER) if not mark.args]
    if not bare or not readonly:
        return False, ()
    from .verdict import normalize_range

    try:
        allow = tuple(
            normalize_range(spec, size)
            for mark in bare
            for spec in _allow_items(mark.kwargs.get("allow", ()))
        )
    except ValueError as exc:
        pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=exc), pytrace=False)
    return True, allow


class Unguardable(Exception):
    """A marker argument of a type that has no guarded twin."""


def guarded_copy(value: Any, argname: str, make: Make) -> tuple[GuardedBuffer, Any]:
    """A guarded buffer holding a copy of ``value`` and a view of it of the
    same type (numpy.ndarray: dtype, shape; memoryview: format, shape);
    ``make(source, name)`` creates the buffer."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        if type(value) is not numpy.ndarray or value.dtype.hasobject or value.nbytes == 0:
            what = (
                f"{type(value).__module__}.{type(value).__qualname__} "
                f"(dtype {value.dtype}, {value.nbytes} bytes)"
            )
            raise Unguardable(
                UNGUARDABLE.format(argname=argname, type=what)
                + "; pass a plain, non-empty numpy.ndarray without Python objects"
            )
        # Keep Fortran order: guard the transposed (C-ordered) array.
        fortran = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
        source = numpy.ascontiguousarray(value.T if fortran else value)
        buffer = make(source, argname)
        array = numpy.frombuffer(buffer, dtype=value.dtype).reshape(source.shape)
        return buffer, (array.T if fortran else array)
    if isinstance(value, memoryview):
        if value.nbytes == 0:
            raise Unguardable(
                UNGUARDABLE.format(argname=argname, type="memoryview (empty)")
                + "; there is nothing to guard in an empty buffer"
            )
        buffer = make(value.tobytes(), argname)
        try:
            view = memoryview(buffer)
            if value.format != "B" or value.ndim != 1:
                view = view.cast(value.format, list(value.shape or ()))  # type: ignore[call-overload]
        except (TypeError, ValueError) as exc:
            buffer.close()
            raise Unguardable(
                UNCASTABLE.format(
                    argname=argname, format=value.format, shape=value.shape, error=exc
                )
                + "; use a numpy array for this layout"
            ) from None
        return buffer, view
    raise Unguardable(
        UNGUARDABLE.format(argname=argname, type=type(value).__qualname__) + f"; {UNGUARDABLE_FIX}"
    )


def release(view: Any) -> None:
    if isinstance(view, memoryview):
        with suppress(BufferError):  # the test kept a view of it; close() copes
            view.release()


__all__ = [
    "BAD_MARKER",
    "MARKER",
    "UNGUARDABLE",
    "UNKNOWN_ARGUMENT",
    "MarkedArgument",
    "Unguardable",
    "guarded_copy",
    "marked_arguments",
    "marker_help",
    "readonly_buffer",
    "release",
    "strict_rules",
]
