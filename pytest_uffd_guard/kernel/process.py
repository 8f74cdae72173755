"""The process the package runs in: one fork hook for every singleton.

``fork()`` copies only the calling thread.  Whatever the package keeps per
process (the fault handler, the async fds, the probe's answer, the capture
set-up, the hybrid watcher) is stale in a forked child, and a lock held by
any other thread at that moment stays held there for ever (issue 9 item 4:
a parent thread looping ``buf.protect()`` left 50 of 50 children stuck in
``close()``).  The C core has one ``atfork_child``; this module is its
Python twin:

* one ``os.register_at_fork`` hook, here, runs every reset registered with
  :func:`on_fork_child` in a forked child, in registration order, after the
  package's locks were re-created;
* :func:`generation` counts forks down this line of processes: an object
  made in one process keeps the number and, by comparing it (one integer,
  no system call), knows it was inherited (``inherited(number)``);
* :class:`ForkSafeLock` is a re-entrant lock that is replaced by a fresh one
  in the child, unless the forking thread itself held it (it then still
  owns it and releases it as usual).  Use it for every lock of the package
  that a forked child may take::

      self._lock = ForkSafeLock()
      with self._lock:
          ...

Imports are the one lock this module cannot re-create: CPython re-creates
its global import lock in a child, but not the lock of a module that
another thread was importing for the first time at the fork, so a child
that imports that module waits for ever (seen on 3.13t: ``import fcntl``
inside the async engine's page scan, 4 children of 40 stuck).  So the
modules whose code runs in threads and in children (kernel/, engines/)
import the standard library at module level, never inside a function.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from contextlib import suppress
from typing import Any

_live: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()
_registry_lock = threading.Lock()
_resets: list[Callable[[], None]] = []
_generation = 0


def generation() -> int:
    """How many forks separate this process from the one that imported us."""
    return _generation


def inherited(made_in: int) -> bool:
    """True when an object made at generation ``made_in`` came across fork()."""
    return made_in != _generation


def on_fork_child(reset: Callable[[], None]) -> None:
    """Call ``reset()`` in every forked child (after the locks are fresh).

    For module-level singletons; registered once, at import.  A reset must
    not raise: an exception is swallowed so that the others still run.
    """
    with _registry_lock:
        _resets.append(reset)


class ForkSafeLock:
    """A re-entrant lock (``threading.RLock``) re-created in a forked child."""

    __slots__ = ("__weakref__", "_lock")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        with _registry_lock:
            _live.add(self)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()

    def _after_fork_in_child(self) -> None:
        # The forking thread keeps its identity in the child: a lock it holds
        # is still legitimately held (it will release it); any other holder
        # is gone.
        if not self._lock._is_owned():  # type: ignore[attr-defined]
            self._lock = threading.RLock()


def _before_fork() -> None:
    _registry_lock.acquire()


def _after_fork_in_parent() -> None:
    _registry_lock.release()


def _after_fork_in_child() -> None:
    global _registry_lock, _generation
    _registry_lock = threading.Lock()
    _generation += 1
    for lock in list(_live):
        lock._after_fork_in_child()
    for reset in list(_resets):
        with suppress(Exception):
            reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
