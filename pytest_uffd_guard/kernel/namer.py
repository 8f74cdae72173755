"""The namer thread and the names of threads.

A writer blocked inside a system call is never signalled (a signal could cut
the call short): the C handler keeps the fault unresolved and asks this
module's *namer* thread, which waits in C without the GIL, to read the
writer's frames with :func:`sys._current_frames` (see ``kernel/capture.py``
for the whole story).  Thread names are remembered by native id as threads
start, so a thread that is gone by the time its records are read is still
named.
"""

from __future__ import annotations

import _thread
import functools
import signal
import sys
import threading
import time
from collections import OrderedDict
from contextlib import suppress
from types import FrameType
from typing import Any, Union

from . import process
from .records import Frame

#: How long the handler waits for the namer to claim a request (seconds),
#: and then for a claimed request to finish.  A write the namer cannot name
#: in that time is resolved unnamed; the first bound is what a writer that
#: holds the GIL inside a system call costs per named write.
NAMER_WAIT = (0.2, 1.0)

_NOT_RUN = (
    "not captured: no thread could take the GIL to name the writer in time "
    "(the writer held the GIL inside a system call, or another thread kept it)"
)

#: A namer's answer: (has_python, frames) or why the writer was not named.
_Named = Union[tuple[bool, tuple[Frame, ...]], str]

#: Answers by fault seq until the record is read; bounded (records of a
#: buffer dropped unread would otherwise stay forever).
_named: OrderedDict[int, _Named] = OrderedDict()
_named_lock = threading.Lock()
_MAX_NAMED = 4096
#: Answers already taken, for a copy of the same record (the handler files
#: a record again when protect() re-armed its page meanwhile).
_taken: OrderedDict[int, _Named] = OrderedDict()
_MAX_TAKEN = 256
#: faulthandler's MAX_FRAME_DEPTH: dumps and namer stacks stop at the same depth.
_MAX_FRAMES = 100


def start_namer(core: Any) -> bool:
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


def take_named(seq: int, wait: float) -> _Named:
    """The namer's answer for fault ``seq``; waits up to ``wait`` seconds
    while the handler is still asking (a record read before the answer)."""
    from .. import _uffd

    deadline = time.monotonic() + wait
    while True:
        with _named_lock:
            answer = _named.pop(seq, None) or _taken.get(seq)
        if answer is not None:
            return _keep_taken(seq, answer)
        if _uffd.namer_state()["request"] != seq or time.monotonic() >= deadline:
            # The answer is stored before the request is finished: look once more.
            with _named_lock:
                answer = _named.pop(seq, None)
            return _NOT_RUN if answer is None else _keep_taken(seq, answer)
        time.sleep(0.001)


def _keep_taken(seq: int, answer: _Named) -> _Named:
    with _named_lock:
        _taken[seq] = answer
        while len(_taken) > _MAX_TAKEN:
            _taken.popitem(last=False)
    return answer


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
    if _watching:
        # Threads started since are remembered by the wrapper, and live
        # ones are named afresh by thread_names(): nothing to do per call.
        return
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
    global _named_lock, _known_lock, _forked
    _named_lock = threading.Lock()
    _known_lock = threading.Lock()
    _named.clear()
    _taken.clear()
    _known.clear()
    # kernel.process registers after threading's own fork hook, so
    # current_thread() is already this thread's object.
    _forked = (threading.current_thread(), threading.get_native_id())


process.on_fork_child(_after_fork_in_child)


__all__ = [
    "NAMER_WAIT",
    "remember_thread",
    "start_namer",
    "take_named",
    "thread_name",
    "thread_names",
    "watch_threads",
]
