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

This module holds the Python half: setting both up once per process, the
namer thread, turning a record's capture into frames, remembering thread
names, and the helpers the plugin uses.  Only the first few writes of each
buffer are named (``GuardedBuffer(..., stacks=N)``, default
:data:`DEFAULT_STACKS`).
"""

from __future__ import annotations

import _thread
import faulthandler
import functools
import os
import platform
import re
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, Union

from .records import Frame, RawFault, WriteRecord

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

#: How long the handler waits for the namer to claim a request (seconds),
#: and then for a claimed request to finish.  A write the namer cannot name
#: in that time is resolved unnamed; the first bound is what a writer that
#: holds the GIL inside a system call costs per named write.
NAMER_WAIT = (0.2, 1.0)

_NOT_RUN = (
    "not captured: no thread could take the GIL to name the writer in time "
    "(the writer held the GIL inside a system call, or another thread kept it)"
)

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

SYSCALL_USER = -1
SYSCALL_UNKNOWN = -2

#: System calls that write into user memory, by number, from the kernel's
#: syscall tables (x86_64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64
#: and other generic ones: include/uapi/asm-generic/unistd.h).  Others are
#: shown as "syscall N".
SYSCALL_NAMES: dict[str, dict[int, str]] = {
    "x86_64": {
        0: "read",
        5: "fstat",
        7: "poll",
        16: "ioctl",
        17: "pread64",
        19: "readv",
        22: "pipe",
        23: "select",
        43: "accept",
        45: "recvfrom",
        47: "recvmsg",
        55: "getsockopt",
        61: "wait4",
        63: "uname",
        70: "msgrcv",
        79: "getcwd",
        89: "readlink",
        99: "sysinfo",
        202: "futex",
        217: "getdents64",
        228: "clock_gettime",
        232: "epoll_wait",
        243: "mq_timedreceive",
        262: "newfstatat",
        267: "readlinkat",
        271: "ppoll",
        275: "splice",
        278: "vmsplice",
        281: "epoll_pwait",
        288: "accept4",
        293: "pipe2",
        295: "preadv",
        299: "recvmmsg",
        310: "process_vm_readv",
        318: "getrandom",
        327: "preadv2",
        332: "statx",
        426: "io_uring_enter",
    },
    "generic": {
        17: "getcwd",
        22: "epoll_pwait",
        29: "ioctl",
        59: "pipe2",
        61: "getdents64",
        63: "read",
        65: "readv",
        67: "pread64",
        69: "preadv",
        73: "ppoll",
        75: "vmsplice",
        76: "splice",
        78: "readlinkat",
        79: "newfstatat",
        80: "fstat",
        98: "futex",
        113: "clock_gettime",
        160: "uname",
        179: "sysinfo",
        183: "mq_timedreceive",
        188: "msgrcv",
        202: "accept",
        207: "recvfrom",
        209: "getsockopt",
        212: "recvmsg",
        242: "accept4",
        243: "recvmmsg",
        260: "wait4",
        270: "process_vm_readv",
        278: "getrandom",
        286: "preadv2",
        291: "statx",
        426: "io_uring_enter",
    },
}
_GENERIC_MACHINES = ("aarch64", "arm64", "riscv64", "loongarch64")

#: How long reading records waits for a dump the writer is still writing.
DUMP_WAIT = 0.5
#: A dump is at most 100 frames of at most ~1.5 KiB (faulthandler's limits).
_MAX_DUMP = 1 << 18
_MARKER = b"\n@@uffd-guard-end "
_HEADER = "Stack (most recent call first):"
_FRAME_RE = re.compile(r'^  File "(.*)", line (\d+|\?\?\?) in (.*)$')


def syscall_name(number: int) -> str:
    """The name of system call ``number`` on this machine, or ``"syscall N"``."""
    machine = platform.machine()
    key = "generic" if machine in _GENERIC_MACHINES else machine
    return SYSCALL_NAMES.get(key, {}).get(number, f"syscall {number}")


@dataclass
class _Capture:
    """This process's capture set-up (rebuilt in a forked child)."""

    pid: int = 0
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
    with _lock:
        if _state.pid == os.getpid():
            return _state.error
        signum = _state.signum
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
        _state.pid = os.getpid()
        _state.signum = signum
        _state.file = dump
        _state.error = None
        _state.consumed = 0
        # Without a namer, in-syscall writes say so (ATTR_NO_NAMER); the
        # rest of capture works.
        _start_namer(_uffd)
        return None


def _fail(reason: str) -> str:
    _state.pid = os.getpid()
    _state.error = reason
    return reason


def capture_signal() -> int | None:
    """The signal used to capture stacks in this process, once set up."""
    return _state.signum if _state.pid == os.getpid() and _state.error is None else None


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
    if dump is None or _state.pid != os.getpid():
        return "not captured: the capture file belongs to another process"
    try:
        return _read_dump_at(dump, raw, wait)
    finally:
        _dump_consumed()


def _dump_consumed() -> None:
    """Count one dump as read; once all are, the file may start afresh."""
    from .. import _uffd

    with _consumed_lock:
        _state.consumed += 1
        _uffd.attribution_consumed(_state.consumed)


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
        return _with_stack(fields, _take_named(raw.seq, wait if raw.attr == ATTR_NAMING else 0.0))
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


# --------------------------------------------------------------- namer

#: A namer's answer: (has_python, frames) or why the writer was not named.
_Named = Union[tuple[bool, tuple[Frame, ...]], str]

#: Answers by fault seq until the record is read; bounded (records of a
#: buffer dropped unread would otherwise stay forever).
_named: OrderedDict[int, _Named] = OrderedDict()
_named_lock = threading.Lock()
_MAX_NAMED = 4096
#: faulthandler's MAX_FRAME_DEPTH: dumps and namer stacks stop at the same depth.
_MAX_FRAMES = 100


def _start_namer(core: Any) -> bool:
    """Start this process's namer thread; False when it cannot run.

    Caller holds ``_lock``.  The thread is a bare ``_thread`` one, invisible
    to :func:`threading.enumerate` (it is ours, not the program's: thread-leak
    checks must not count it), and waits in C without the GIL.
    """
    try:
        core.namer_setup(*NAMER_WAIT)
        _thread.start_new_thread(_namer_main, (core,))
    except (OSError, RuntimeError, ValueError):
        with suppress(Exception):
            core.namer_stop()
        return False
    return True


def _namer_main(core: Any) -> None:
    """The namer: answer the handler's requests until stopped."""
    with suppress(ValueError, OSError):  # no signal handler may run here
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        while True:
            request = core.namer_wait()
            if request is None:
                return
            seq, tid = request
            # Claimed: the writer stays blocked until namer_done.
            answer = _frames_of(tid)
            with _named_lock:
                _named[seq] = answer
                while len(_named) > _MAX_NAMED:
                    _named.popitem(last=False)
            if not core.namer_done(seq):
                # Abandoned meanwhile: the writer may have moved on.
                with _named_lock:
                    _named.pop(seq, None)
    except BaseException:  # a namer must never take the process down
        with suppress(Exception):
            core.namer_stop()


def _frames_of(tid: int) -> _Named:
    """The Python stack of the thread with native id ``tid`` (blocked in a
    system call, not running Python), innermost first, as faulthandler would
    have printed it."""
    frames = sys._current_frames()
    thread = _thread_by_native_id(tid)
    if thread is None or thread.ident not in frames:
        known = {t.ident for t in _live_threads()} | {_thread.get_ident()}
        if all(ident in known for ident in frames):
            # Every thread running Python is someone else: this one has no
            # Python frame (a thread started by C code).
            return False, ()
        return (
            "not captured: the writing thread runs Python but is not a threading.Thread, "
            "so its native id is unknown to Python"
        )
    remember_thread(thread)
    stack: list[Frame] = []
    frame: FrameType | None = frames[thread.ident]
    while frame is not None and len(stack) < _MAX_FRAMES:
        code = frame.f_code
        stack.append(Frame(code.co_filename, frame.f_lineno or 0, code.co_name))
        frame = frame.f_back
    return True, tuple(stack)


def _take_named(seq: int, wait: float) -> _Named:
    """The namer's answer for fault ``seq``; waits up to ``wait`` seconds
    while the handler is still asking (a record read before the answer)."""
    from .. import _uffd

    deadline = time.monotonic() + wait
    while True:
        with _named_lock:
            answer = _named.pop(seq, None)
        if answer is not None:
            return answer
        if _uffd.namer_state()["request"] != seq or time.monotonic() >= deadline:
            # The answer is stored before the request is finished: look once more.
            with _named_lock:
                answer = _named.pop(seq, None)
            return _NOT_RUN if answer is None else answer
        time.sleep(0.001)


# ------------------------------------------------------------- threads

#: threading names by native id, kept when the thread is gone: set as each
#: thread starts (see watch_threads), when the namer names one and whenever
#: names are looked up.  Bounded; the oldest go first.
_known: OrderedDict[int, str] = OrderedDict()
_known_lock = threading.Lock()
_MAX_KNOWN = 4096
_watching = False
_original_start: Any = None


#: In a forked child, the forking thread and its new native id: before
#: Python 3.12, threading keeps the parent's id on that Thread object.
_forked: tuple[threading.Thread, int] | None = None


def _native_id(thread: threading.Thread) -> int | None:
    forked = _forked
    if forked is not None and thread is forked[0]:
        return forked[1]
    return getattr(thread, "native_id", None)


def remember_thread(thread: threading.Thread) -> None:
    """Keep ``thread``'s name for its native id, beyond the thread's life."""
    native = _native_id(thread)
    if native is None:
        return
    with _known_lock:
        _known[native] = thread.name
        _known.move_to_end(native)
        while len(_known) > _MAX_KNOWN:
            _known.popitem(last=False)


def watch_threads() -> None:
    """From now on, remember the name of every thread as it starts.

    Wraps :meth:`threading.Thread.start` once per interpreter (a dictionary
    insert per thread start, nothing per call or per line) and remembers the
    threads alive now.  Thread pools and joined threads are then named after
    they ended.
    """
    global _watching, _original_start
    with _known_lock:
        if not _watching:
            original = threading.Thread.start

            @functools.wraps(original)
            def start(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
                original(self, *args, **kwargs)
                # start() returns once the thread has set its native id.
                remember_thread(self)

            _original_start = original
            threading.Thread.start = start  # type: ignore[method-assign]
            _watching = True
    for thread in _live_threads():
        remember_thread(thread)


def _live_threads() -> list[threading.Thread]:
    """Every thread threading knows, without taking threading's lock (the
    namer must not wait for a thread that may be blocked on a fault)."""
    active = getattr(threading, "_active", None)
    if isinstance(active, dict):
        for _ in range(3):
            with suppress(RuntimeError):  # changed size while we copied it
                return list(active.values())
    return list(threading.enumerate())


def _thread_by_native_id(tid: int) -> threading.Thread | None:
    for thread in _live_threads():
        if _native_id(thread) == tid:
            return thread
    return None


def thread_names() -> dict[int, str]:
    """``threading`` names by native id, for resolving a batch of records.

    Live threads first, then every ``Thread`` object still referenced
    (``threading._dangling`` keeps finished threads whose object someone
    still holds), then names remembered for threads that are gone (see
    :func:`watch_threads`).  Native ids are reused only after the kernel's
    pid space wraps.
    """
    threads = _live_threads()
    dangling = getattr(threading, "_dangling", None)
    if dangling is not None:
        with suppress(RuntimeError):  # the WeakSet changed while we copied it
            threads += [t for t in list(dangling) if not t.is_alive()]
    seen: dict[int, str] = {}
    for thread in threads:
        native = _native_id(thread)
        if native is not None and native not in seen:
            seen[native] = thread.name
    with _known_lock:
        _known.update(seen)
        while len(_known) > _MAX_KNOWN:
            _known.popitem(last=False)
        known = dict(_known)
    return {**known, **seen}


def thread_name(tid: int) -> str | None:
    """The ``threading`` name of the thread with native id ``tid``, if known."""
    return thread_names().get(tid)


def _after_fork_in_child() -> None:
    """A forked child: only the forking thread exists, and locks another
    thread held at fork() would stay held forever.  Start afresh."""
    global _lock, _consumed_lock, _named_lock, _known_lock, _forked
    _lock = threading.Lock()
    _consumed_lock = threading.Lock()
    _named_lock = threading.Lock()
    _known_lock = threading.Lock()
    _named.clear()
    _known.clear()
    # Registered after threading's own fork hook, so current_thread() is
    # already this thread's object.
    _forked = (threading.current_thread(), threading.get_native_id())


os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------- presentation


#: The package's own directory (this module lives in its kernel/ folder).
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _excluded_prefixes() -> tuple[str, ...]:
    here = _PACKAGE + os.sep
    paths = sysconfig.get_paths()
    stdlib = {paths.get("stdlib"), paths.get("platstdlib")}
    return (here, *(os.path.join(p, "") for p in stdlib if p))


def _is_own_or_stdlib(filename: str) -> bool:
    if filename.startswith("<"):
        return filename.startswith("<frozen ")
    path = os.path.abspath(filename)
    if "site-packages" in path or "dist-packages" in path:
        here = _PACKAGE
        # pytest's and pluggy's frames only say "a test ran": never the writer.
        runner = tuple(f"{os.sep}{name}{os.sep}" for name in ("_pytest", "pytest", "pluggy"))
        return path.startswith(here + os.sep) or any(part in path for part in runner)
    return path.startswith(_excluded_prefixes())


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


__all__ = [
    "DEFAULT_STACKS",
    "capture_signal",
    "describe_writer",
    "ensure_started",
    "parse_dump",
    "syscall_name",
    "remember_thread",
    "thread_name",
    "thread_names",
    "user_frames",
    "watch_threads",
]
