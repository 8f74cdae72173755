"""Naming the writer: the Python stack, system call and thread behind a write.

While a write fault is pending the writer is blocked in the kernel.  Two
ways name it, chosen by where the fault was taken
(``/proc/self/task/TID/syscall``):

- **In user mode** the writer usually holds the GIL, so no Python code can
  look at its stack.  The C handler thread sends it a real-time signal on
  which :func:`faulthandler.register` is installed with
  ``all_threads=False`` and ``chain=True``: the writer dumps its own stack
  (faulthandler needs no GIL for that) into an unlinked temporary file,
  then faulthandler chains to a C handler that appends an end marker naming
  the fault's sequence number.  The signal is sent before the fault is
  resolved, so the dump shows the frame of the write itself.  One capture
  is in flight at a time and each record keeps the file offset where its
  dump starts, so a dump is read back only between that offset and its own
  marker.
- **Inside a system call** a signal could cut the call short
  (``recv(..., MSG_WAITALL)`` returns early), so the writer is never
  signalled.  Such a writer released the GIL before the call, as blocking
  calls do: the handler keeps the fault unresolved and asks this module's
  *namer* thread, which waits in C without the GIL, to read the writer's
  frames with :func:`sys._current_frames`.  The namer claims the request
  while holding the GIL; a claimed request means the writer is still
  blocked, so the frames are exact.  The handler waits a bounded time
  (:data:`NAMER_WAIT`), then resolves the fault regardless: a writer that
  holds the GIL inside a system call is recorded as not named, never
  deadlocked.

This module holds the Python half of the signal capture: setting both ways
up once per process and turning a record's capture into frames.  The namer
thread and the thread names are ``kernel/namer.py``'s; how a writer is
shown (``user_frames``, ``describe_writer``) is ``stacks.py``'s.  Only the first few writes of each
buffer are named (``GuardedBuffer(..., stacks=N)``, default
:data:`DEFAULT_STACKS`).
"""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from . import process
from .namer import _NOT_RUN, start_namer, take_named, watch_threads
from .records import Frame, RawFault, unpack_faults
from .syscalls import syscall_name

#: Writes per buffer whose writer is named, unless the buffer says otherwise.
#: Each capture costs a signal and a stack dump in the writer (tens to
#: hundreds of microseconds); the rest cost nothing extra.
DEFAULT_STACKS = 8

# What became of a capture (the record's "attr"); mirrors enum ATTR_* in _uffd.c.
ATTR_OFF = 0
ATTR_BOUND = 1
ATTR_SIGNALLED = 2
ATTR_BUSY = 3
ATTR_BLOCKED = 4
ATTR_NO_TID = 5
ATTR_FAILED = 6
ATTR_NAMING = 7
ATTR_NAMED = 8
ATTR_GIL_HELD = 9
ATTR_NAMER_LATE = 10
ATTR_NO_NAMER = 11
ATTR_UNKNOWN = 12

_NOTES = {
    ATTR_OFF: "stack capture is off for this buffer",
    ATTR_BOUND: "not captured: the buffer's bound on captured stacks was reached",
    ATTR_BUSY: "not captured: another write's capture was still in flight",
    ATTR_BLOCKED: "not captured: the writing thread blocks the capture signal",
    ATTR_NO_TID: "not captured: the kernel did not report the writing thread "
    "(no UFFD_FEATURE_THREAD_ID)",
    ATTR_FAILED: "not captured: the writing thread could not be signalled",
    ATTR_GIL_HELD: _NOT_RUN,
    ATTR_NAMER_LATE: "not captured: the namer thread did not finish reading the writer's "
    "stack in time",
    ATTR_NO_NAMER: "not captured: the write was inside a system call and no namer "
    "thread runs in this process",
    ATTR_UNKNOWN: "not captured: where the writing thread was could not be read "
    "(/proc/self/task/TID/syscall), or it was no longer blocked on the write",
}

#: How long reading records waits for a dump the writer is still writing.
DUMP_WAIT = 0.5
#: A dump is at most 100 frames of at most ~1.5 KiB (faulthandler's limits).
_MAX_DUMP = 1 << 18
_MARKER = b"\n@@uffd-guard-end "
_HEADER = "Stack (most recent call first):"
_FRAME_RE = re.compile(r'^  File "(.*)", line (\d+|\?\?\?) in (.*)$')


@dataclass
class _Capture:
    """This process's capture set-up (rebuilt in a forked child)."""

    #: Set up (or failed) in this process; False again in a forked child.
    ready: bool = False
    signum: int = 0
    file: IO[bytes] | None = None
    error: str | None = None
    #: Dumps read from ``file`` (the C core may then truncate it).
    consumed: int = 0


_state = _Capture()
_lock = threading.Lock()
_consumed_lock = threading.Lock()


def pick_signal(core: Any) -> int | None:
    """The highest real-time signal nobody in this process handles, or None."""
    for signum in range(core.SIGRTMAX, core.SIGRTMIN - 1, -1):
        try:
            python_default = signal.getsignal(signum) == signal.SIG_DFL
        except ValueError:
            continue
        if python_default and core.signal_is_default(signum):
            return signum
    return None


def ensure_started() -> str | None:
    """Set capture up in this process if needed.

    Returns None when writers can be named, else why not (the records then
    carry that as their ``stack_note``).
    """
    from .. import _uffd

    # Names are kept whether or not stacks can be captured.
    watch_threads()
    if _state.ready:
        # Set up already (the common case): no lock.  _fail() stores the
        # error before ``ready``, so a reader never sees ready without it.
        return _state.error
    with _lock:
        if _state.ready:
            return _state.error
        # An earlier import of the package in this process (see
        # attribution_installed_signal) may have installed ours already.
        signum = _state.signum or _uffd.attribution_installed_signal()
        if not signum:
            picked = pick_signal(_uffd)
            if picked is None:
                return _fail("not captured: every real-time signal is in use in this process")
            signum = picked
        if _state.file is not None:
            # A forked child: the inherited file shares its offset with the
            # parent's, so dumps would interleave.  Start a file of our own.
            _state.file.close()
            _state.file = None
        try:
            # Kept open for the life of the process: faulthandler writes to it.
            dump = tempfile.TemporaryFile(prefix="uffd-guard-stacks-", buffering=0)  # noqa: SIM115
        except OSError as exc:
            return _fail(f"not captured: no temporary file for stack dumps ({exc})")
        try:
            _uffd.attribution_setup(signum, dump.fileno())
            # After our C handler is installed: faulthandler saves it as the
            # handler to chain to, and dumps before it.
            faulthandler.register(signum, file=dump, all_threads=False, chain=True)
            _uffd.attribution_enable(True)
        except (OSError, RuntimeError, ValueError) as exc:
            dump.close()
            return _fail(f"not captured: setting up the capture signal failed ({exc})")
        _state.signum = signum
        _state.file = dump
        _state.error = None
        _state.consumed = 0
        # Without a namer, in-syscall writes say so (ATTR_NO_NAMER); the
        # rest of capture works.
        start_namer(_uffd)
        _state.ready = True  # last: the unlocked fast path reads it first
        return None


def _fail(reason: str) -> str:
    _state.error = reason
    _state.ready = True
    return reason


def capture_signal() -> int | None:
    """The signal used to capture stacks in this process, once set up."""
    return _state.signum if _state.ready and _state.error is None else None


def parse_dump(text: str) -> tuple[bool, tuple[Frame, ...]] | None:
    """Frames of one faulthandler dump (innermost first) and whether the
    thread had Python state; None when the text is not exactly one dump."""
    lines = [line for line in text.splitlines() if line]
    if not lines:
        return False, ()
    if lines[0] != _HEADER or lines.count(_HEADER) != 1:
        return None
    frames = []
    for line in lines[1:]:
        match = _FRAME_RE.match(line)
        if match:
            filename, lineno, function = match.groups()
            frames.append(Frame(filename, int(lineno) if lineno.isdigit() else 0, function))
        elif line.strip() not in ("...", "<no Python frame>"):
            return None
    return True, tuple(frames)


def _read_dump(raw: RawFault, wait: float) -> tuple[bool, tuple[Frame, ...]] | str:
    """The parsed dump of a signalled fault, or why there is none."""
    dump = _state.file
    if dump is None or not _state.ready:
        return "not captured: the capture file belongs to another process"
    try:
        return _read_dump_at(dump, raw, wait)
    finally:
        _dump_consumed()


def _dump_consumed() -> None:
    """Count one dump as read; once all are, the file may start afresh.

    One count per record read: a record the handler filed again after a
    re-arming (a copy, same seq) is one more dump due on the C side too,
    so the counts meet only when every dump was read (issue 9 item 8).
    """
    from .. import _uffd

    with _consumed_lock:
        _state.consumed += 1
        _uffd.attribution_consumed(_state.consumed)


def dumps_dropped(blob: bytes) -> None:
    """Count the dumps of records in ``blob`` that will never be read.

    A blob dropped unread (a tracker garbage-collected unclosed) holds
    signalled records whose dumps nobody reads: unless counted here, the
    C side waits for them for good and the file never starts afresh
    (issue 9, dump bound).
    """
    for raw in unpack_faults(blob):
        if raw.attr == ATTR_SIGNALLED:
            _dump_consumed()


def _read_dump_at(
    dump: IO[bytes], raw: RawFault, wait: float
) -> tuple[bool, tuple[Frame, ...]] | str:
    marker = _MARKER + b"%d\n" % raw.seq
    deadline = time.monotonic() + wait
    size = 1 << 14
    while True:
        data = os.pread(dump.fileno(), size, raw.dump_offset)
        end = data.find(marker)
        if end < 0 and len(data) == size and size < _MAX_DUMP:
            size *= 4
            continue
        if end >= 0:
            parsed = parse_dump(data[:end].decode("utf-8", "replace"))
            return "not captured: the stack dump was garbled" if parsed is None else parsed
        if time.monotonic() >= deadline:
            return "not captured: the writing thread had not dumped its stack in time"
        time.sleep(0.001)


def describe(raw: RawFault, note: str | None, wait: float = DUMP_WAIT) -> dict[str, Any]:
    """The writer fields of a WriteRecord for ``raw``.

    ``note`` is why capture is unavailable in this process, if it is.
    """
    fields: dict[str, Any] = {"thread_comm": raw.comm or None}
    if raw.syscall >= 0:
        fields["syscall"] = syscall_name(raw.syscall)
    if raw.attr in (ATTR_NAMING, ATTR_NAMED):
        return _with_stack(fields, take_named(raw.seq, wait if raw.attr == ATTR_NAMING else 0.0))
    if raw.attr != ATTR_SIGNALLED:
        fields["stack_note"] = (
            note if note is not None and raw.attr == ATTR_OFF else _NOTES.get(raw.attr)
        )
        return fields
    return _with_stack(fields, _read_dump(raw, wait))


def _with_stack(fields: dict[str, Any], result: Any) -> dict[str, Any]:
    """Add a capture's ``(has_python, frames)``, or why there is none."""
    if isinstance(result, str):
        fields["stack_note"] = result
    else:
        fields["has_python"], fields["stack"] = result
        fields["stack_captured"] = True
    return fields


def _after_fork_in_child() -> None:
    """A forked child: a lock another thread held at fork() would stay held
    forever, and the capture file is the parent's.  Start afresh."""
    global _lock, _consumed_lock
    _lock = threading.Lock()
    _consumed_lock = threading.Lock()
    _state.ready = False


process.on_fork_child(_after_fork_in_child)


__all__ = [
    "DEFAULT_STACKS",
    "capture_signal",
    "describe",
    "dumps_dropped",
    "ensure_started",
    "parse_dump",
    "syscall_name",
]
