"""Plain data describing what happened to a guarded buffer.

These classes hold ints, strings and bytes only, so they pickle, compare and
survive a trip through pytest-xdist unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType


def _short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    import os

    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


#: Layout of one record as the C core packs it (struct fault_record).
RECORD_FORMAT = "<QQQIIQiI16sIIQ"
RECORD_SIZE = struct.calcsize(RECORD_FORMAT)

#: What a record stands for (its ``kind``); the C core's KIND_* values.
KIND_WRITE = 0
KIND_DISCARD = 1
KIND_NAMES = {KIND_WRITE: "write", KIND_DISCARD: "discard"}


def core_mismatch(core: object) -> str | None:
    """Why the C extension ``core`` does not speak this module's record
    layout, or None when it does (checked when the engine starts, and by
    :func:`load_core`)."""
    theirs = getattr(core, "RECORD_SIZE", None)
    if theirs is None:
        # ``_uffd/`` (the C sources) imports as an empty namespace package
        # where the extension was never built.
        return "the C extension pytest_uffd_guard._uffd is not built"
    kinds = (getattr(core, "KIND_WRITE", None), getattr(core, "KIND_DISCARD", None))
    if theirs != RECORD_SIZE or kinds != (KIND_WRITE, KIND_DISCARD):
        return (
            f"the C extension pytest_uffd_guard._uffd packs {theirs}-byte records, "
            f"the Python package expects {RECORD_SIZE}: they come from different versions"
        )
    return None


def load_core() -> ModuleType:
    """Import the C extension and check that its record layout is
    this module's (the contract of ``_uffd/uffd.h``).

    Raises ImportError, naming the problem, when the extension is missing,
    unbuilt or from another version.  Not done when this module is
    imported: importing the package must load nothing (tests/test_core.py).
    """
    from .. import _uffd

    mismatch = core_mismatch(_uffd)
    if mismatch is not None:
        raise ImportError(mismatch)
    return _uffd


@dataclass(frozen=True)
class Frame:
    """One Python frame of a writer's stack, as faulthandler printed it.

    ``lineno`` is 0 when the line was not known.
    """

    filename: str
    lineno: int
    function: str

    def __str__(self) -> str:
        return f"{_short_path(self.filename)}:{self.lineno} in {self.function}"


@dataclass(frozen=True)
class WriteRecord:
    """One write fault: the first write into a protected page.

    ``offset`` is counted in bytes from the start of the buffer.  It is the
    exact byte when ``exact`` is true; otherwise the kernel reported only the
    page (no ``UFFD_FEATURE_EXACT_ADDRESS``, Linux < 5.18) and ``offset`` is
    the first byte of that page.  An offset at or past the buffer's length
    means a write into the slack after the end of the buffer, inside its
    last page: an overrun.

    The writer (see :mod:`pytest_uffd_guard.kernel.capture`), for the first
    few writes of each buffer: ``stack`` is the writing thread's Python
    stack at the write, innermost frame first; ``syscall`` names the system
    call when the kernel wrote on the thread's behalf (``"read"``), None for
    a write by the thread itself; ``has_python`` is False for a thread that
    has no Python state (a pthread started by C code), None when unknown.
    ``stack_captured`` says whether capture worked (a thread without Python
    has an empty stack and ``stack_captured`` true); otherwise
    ``stack_note`` says why not.  ``thread_comm`` is the kernel's name for
    the thread (``/proc/self/task/TID/comm``) at the time of the write.
    """

    offset: int
    exact: bool
    thread_id: int | None
    thread_name: str | None
    time: float
    seq: int
    stack: tuple[Frame, ...] = ()
    syscall: str | None = None
    has_python: bool | None = None
    stack_captured: bool = False
    stack_note: str | None = None
    thread_comm: str | None = None
    #: ``"write"``, or ``"discard"``: a ``madvise`` (``MADV_DONTNEED``,
    #: ``MADV_FREE`` or ``MADV_REMOVE``) discarded bytes ``offset`` to
    #: ``offset + length - 1`` (they read as zeros now; the kernel does not
    #: say which thread called it).  Tracking goes on.
    kind: str = "write"
    #: Bytes discarded (``kind == "discard"``); 0 for a write.
    length: int = 0

    @property
    def page_offset(self) -> int:
        """Offset of the page the write landed in (multiple of the page size)."""
        from mmap import PAGESIZE

        return self.offset - self.offset % PAGESIZE


@dataclass(frozen=True)
class Change:
    """A run of bytes that differs from the snapshot taken when the buffer
    was armed.

    ``before`` and ``after`` hold the run's old and new bytes.  They are
    shorter than ``length`` only when a preview was asked for (or the run was
    recorded at close time and is large); ``truncated`` says so.
    """

    offset: int
    length: int
    before: bytes
    after: bytes

    @property
    def truncated(self) -> bool:
        return len(self.after) < self.length


@dataclass(frozen=True)
class RawFault:
    """A record as the C core gives it, before it is tied to a buffer."""

    address: int
    time_ns: int
    seq: int
    tid: int
    flags: int
    #: Where this fault's stack dump starts in the capture file.
    dump_offset: int = 0
    #: System call number; -1 for a fault taken in user mode, -2 unknown.
    syscall: int = -2
    #: What became of the capture (attribution.ATTR_*).
    attr: int = 0
    comm: str = ""
    #: KIND_WRITE or KIND_DISCARD.
    kind: int = KIND_WRITE
    #: Bytes discarded (KIND_DISCARD).
    length: int = 0


def unpack_faults(blob: bytes) -> Iterator[RawFault]:
    """Unpack the C core's packed records."""
    for fields in struct.iter_unpack(RECORD_FORMAT, blob):
        # address .. attr, then comm, kind, (reserved), length
        head = dict(zip(_HEAD_FIELDS, fields))
        comm = fields[8].split(b"\0", 1)[0].decode("utf-8", "replace")
        yield RawFault(**head, comm=comm, kind=fields[9], length=fields[11])


#: The leading fields of a packed record, as RawFault names them.
_HEAD_FIELDS = ("address", "time_ns", "seq", "tid", "flags", "dump_offset", "syscall", "attr")
