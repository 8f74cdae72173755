"""Naming the writer for a reader: the frames that matter and one line.

Pure functions of a :class:`~pytest_uffd_guard.kernel.records.WriteRecord`
(plain data): the capture itself is ``kernel/capture.py``'s.  Which frames
are the package's, the standard library's or pytest's is ``frames.py``'s.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import frames

if TYPE_CHECKING:
    from .kernel.records import Frame, WriteRecord


def _is_own_or_stdlib(filename: str) -> bool:
    """Not where a write came from: this package, the standard library, and
    pytest's or pluggy's machinery when installed."""
    if filename.startswith("<"):
        return filename.startswith("<frozen ")
    if frames.is_own(filename):
        return True
    path = os.path.abspath(filename)
    if any(part in path for part in frames.LIBRARY_PARTS):
        # pytest's and pluggy's frames only say "a test ran": never the writer.
        return frames.is_runner(filename)
    return path.startswith(frames.STDLIB)


def user_frames(record: WriteRecord, n: int = 3) -> list[Frame]:
    """The innermost ``n`` frames of the writer's stack that are neither
    this package's nor the standard library's: where the write came from,
    for a one-line failure message.  Empty when no stack was captured."""
    return [frame for frame in record.stack if not _is_own_or_stdlib(frame.filename)][:n]


def describe_writer(record: WriteRecord) -> str:
    """One line naming the writer: thread, system call, innermost user frame."""
    if record.thread_name:
        who = f"thread {record.thread_name!r} (tid {record.thread_id})"
    elif record.thread_id:
        who = f"thread tid {record.thread_id}"
    else:
        who = "an unknown thread"
    if record.has_python is False:
        comm = f", {record.thread_comm!r}" if record.thread_comm else ""
        who += f" without Python state{comm}"
    if record.syscall:
        who += f" in system call {record.syscall}"
    frames = user_frames(record, 1) or list(record.stack[:1])
    if frames:
        return f"{who} at {frames[0]}"
    if record.stack_note and record.has_python is not False:
        return f"{who} ({record.stack_note})"
    return who


__all__ = ["describe_writer", "user_frames"]
