"""The process's userfaultfd and its fault-handler thread.

One handler per process: one userfaultfd, one native handler thread, any
number of guarded ranges (the sync engine's, and the hybrid engine's sync
phases).  It starts on the first guarded buffer (importing
the package opens nothing), restarts in a forked child that creates buffers
of its own, and stops at interpreter exit: every tracked buffer first takes
its last records (so an unclosed buffer's ``writes`` stay whole), then every
range is unregistered so that no writer can be left blocked.

Where the kernel offers ``UFFD_FEATURE_EVENT_REMOVE`` the handler asks for
it on top of the probe's features: ``madvise`` discarding guarded pages is
then recorded, and the pages protected again (see ``_uffd.c``).
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import TYPE_CHECKING, Protocol

from ..errors import UffdGuardError, UffdUnavailableError
from . import process
from .capabilities import FEATURES, Capabilities, capabilities, open_for
from .memory import PAGE_SIZE
from .process import ForkSafeLock
from .records import core_mismatch

if TYPE_CHECKING:
    from types import ModuleType


class Tracked(Protocol):
    """What the handler needs from a tracker it serves."""

    def _detach(self, reason: str) -> None: ...


#: After each fault the handler thread keeps reading for this many µs before
#: it sleeps, to spare the next fault a cross-CPU wake-up (issue 11).  Off
#: by default: on the project's 2-vCPU VM it did not measurably help
#: (benchmarks/README.md).  Read when the handler thread starts.
SPIN_VARIABLE = "PYTEST_UFFD_GUARD_SPIN_US"


def spin_window_us(most: int) -> int:
    """The handler's spin window from ``$PYTEST_UFFD_GUARD_SPIN_US`` (0: off)."""
    text = os.environ.get(SPIN_VARIABLE, "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) > most:
        raise UffdGuardError(
            f"{SPIN_VARIABLE}={text!r} is not a whole number of microseconds from 0 to {most}",
            f"set {SPIN_VARIABLE} to 0..{most} (0 or unset: no spinning)",
        )
    return int(text)


class Handler:
    """Owns this process's handler; see the module docstring."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()
        #: The handler runs in this process (False again in a forked child).
        self._running = False
        self._capabilities: Capabilities | None = None
        self._core: ModuleType | None = None
        self._tracked: weakref.WeakSet[Tracked] = weakref.WeakSet()
        self._atexit_registered = False
        process.on_fork_child(self._forget)

    def _forget(self) -> None:
        # A forked child: the C core already dropped the parent's fd and
        # table; the buffers inherited here are plain copies.
        self._running = False
        self._tracked = weakref.WeakSet()

    @property
    def core(self) -> ModuleType:
        core = self._core
        if core is None:
            from .. import _uffd

            core = self._core = _uffd
        return core

    def start(self) -> Capabilities:
        """Make sure the handler runs in this process; return what it offers.

        Raises UffdUnavailableError when the machine cannot guard memory.
        """
        caps = self._capabilities
        if self._running and caps is not None and self.core.handler_failure() is None:
            # Every buffer after the first (issue 11 target 4): no lock, no
            # handler_state() dict; a handler that gave up takes the slow path.
            return caps
        with self._lock:
            if self._running:
                state = self.core.handler_state()
                if state["running"]:
                    assert self._capabilities is not None
                    return self._capabilities
                # The handler gave up (it unregistered every range on the
                # way out).  Tell the buffers, then start afresh.
                self._detach_all(f"the fault handler stopped: {state['error']}")
                self.core.handler_stop()
                self._running = False
            elif self.core.handler_state()["running"]:
                # Started by an earlier import of this package in this
                # process: pytester's in-process runs put sys.modules back
                # when they end, so the next import makes a new Handler over
                # the same C core.  Share its handler, do not start another.
                return self._started(capabilities())
            caps = capabilities()
            if not caps.available:
                raise UffdUnavailableError(caps.reason or "userfaultfd is unavailable", caps.remedy)
            mismatch = core_mismatch(self.core)
            if mismatch is not None:
                raise UffdUnavailableError(
                    mismatch,
                    "rebuild the extension: `pip install --force-reinstall --no-binary "
                    "pytest-uffd-guard pytest-uffd-guard` (or, in a checkout, "
                    "`python setup.py build_ext --inplace`)",
                )
            features = self.features(caps)
            spin_us = spin_window_us(self.core.SPIN_US_MAX)
            fd = open_for(caps, "userfaultfd")
            try:
                self.core.api(fd, features)
                self.core.handler_start(fd, PAGE_SIZE, features, spin_us)
            except (OSError, RuntimeError) as exc:
                os.close(fd)
                raise UffdUnavailableError(f"starting the fault handler failed: {exc}") from exc
            return self._started(caps)

    def _started(self, caps: Capabilities) -> Capabilities:
        self._running = True
        self._capabilities = caps
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return caps

    @staticmethod
    def features(caps: Capabilities) -> int:
        """The UFFD_FEATURE_* bits the handler's fd asks for."""
        bits = caps.enabled_features
        if caps.has("event_remove"):
            bits |= FEATURES["event_remove"]
        return bits

    def failure(self) -> str | None:
        """Why this process's handler gave up, if it did (cheap)."""
        if not self._running:
            return None
        failure: str | None = self.core.handler_failure()
        return failure

    def track(self, buffer: Tracked) -> None:
        with self._lock:
            self._tracked.add(buffer)

    def untrack(self, buffer: Tracked) -> None:
        with self._lock:
            self._tracked.discard(buffer)

    def stop(self) -> None:
        """Stop tracking everything, free any blocked writer, stop the thread.

        Runs at interpreter exit (atexit): each buffer still tracked takes
        its last records first, so ``writes`` read later are whole.
        """
        with self._lock:
            if not self._running:
                return
            self._detach_all("the fault handler was stopped")
            self.core.handler_stop()
            self._running = False

    def _detach_all(self, reason: str) -> None:
        for buffer in list(self._tracked):
            buffer._detach(reason)
        self._tracked = weakref.WeakSet()


#: The fault handler of this process.
HANDLER = Handler()
