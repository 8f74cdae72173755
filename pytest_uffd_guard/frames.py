"""Which frames of a writer's stack a reader needs, as plain data.

A stack captured while a test runs is mostly pytest's and pluggy's own
machinery (~30 frames) around a few frames of the test, its code and the
libraries it calls.  Issue 9, item 19: reports drop the machinery, and the
short form always shows the frame that wrote, the innermost frame of the
user's own code and the test's line, folding the rest into a count.

Frames are ``(filename, lineno, function)`` tuples, innermost first.  No
pytest import: the test's file is passed in.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Sequence

FrameTuple = tuple[str, int, str]

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RUNNER_PARTS = tuple(f"{os.sep}{name}{os.sep}" for name in ("_pytest", "pytest", "pluggy"))
LIBRARY_PARTS = (f"{os.sep}site-packages{os.sep}", f"{os.sep}dist-packages{os.sep}")


def _stdlib_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    found = {paths.get("stdlib"), paths.get("platstdlib")}
    return tuple(os.path.join(p, "") for p in found if p)


STDLIB = _stdlib_prefixes()


def is_runner(filename: str) -> bool:
    """A frame of pytest's or pluggy's machinery (or the ``pytest`` script)."""
    path = os.path.abspath(filename) if not filename.startswith("<") else filename
    return any(part in path for part in _RUNNER_PARTS) or os.path.basename(path) in (
        "pytest",
        "py.test",
    )


def is_own(filename: str) -> bool:
    """A frame of this package (``GuardedBuffer.__setitem__`` and the like)."""
    return not filename.startswith("<") and os.path.abspath(filename).startswith(_HERE)


def is_library(filename: str) -> bool:
    """Installed code: the standard library, site-packages, frozen modules."""
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    return any(part in path for part in LIBRARY_PARTS) or path.startswith(STDLIB)


def short_path(filename: str) -> str:
    """``filename`` relative to the working directory when below it; for
    installed code, from the package directory on (``numpy/lib/x.py``)."""
    if filename.startswith("<"):
        return filename
    for part in LIBRARY_PARTS:
        if part in filename:
            return filename.split(part, 1)[1]
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


def frame_text(frame: FrameTuple) -> str:
    filename, lineno, function = frame
    return f"{short_path(filename)}:{lineno} in {function}"


def trim(stack: Sequence[FrameTuple]) -> tuple[tuple[FrameTuple, ...], int]:
    """The stack without pytest's machinery: cut at the first runner frame
    outside the writer's own frames; also returns how many were cut."""
    seen_other = False
    for i, (filename, _, _) in enumerate(stack):
        if is_runner(filename):
            if seen_other:
                return tuple(stack[:i]), len(stack) - i
        else:
            seen_other = True
    return tuple(stack), 0


def _same_file(a: str, b: str) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def where(stack: Sequence[FrameTuple], test_file: str | None) -> tuple[str, ...]:
    """The short form of a (trimmed) stack, innermost first: the frame that
    wrote, the innermost frame of the user's code, and the test's line
    (the outermost frame in the test's file), with ``... N library frames``
    for what lies between."""
    frames = [f for f in stack if not is_own(f[0])] or list(stack)
    if not frames:
        return ()
    keep = {0}
    user = next((i for i, f in enumerate(frames) if not is_library(f[0])), None)
    if user is not None:
        keep.add(user)
    if test_file:
        tests = [i for i, f in enumerate(frames) if _same_file(f[0], test_file)]
        if tests:
            keep.add(tests[-1])
    lines: list[str] = []
    previous = -1
    for i in sorted(keep):
        folded = frames[previous + 1 : i]
        if folded:
            lines.append(_fold(folded))
        lines.append(frame_text(frames[i]))
        previous = i
    return tuple(lines)


def _fold(frames: Sequence[FrameTuple]) -> str:
    libraries = sum(1 for f in frames if is_library(f[0]))
    if libraries == len(frames):
        what = "library frame" if libraries == 1 else "library frames"
    else:
        what = "frame" if len(frames) == 1 else "frames"
    return f"... {len(frames)} {what}"


__all__ = ["frame_text", "is_library", "is_own", "is_runner", "short_path", "trim", "where"]
