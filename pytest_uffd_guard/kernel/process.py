"""Locks that a forked child gets back unlocked.

``fork()`` copies only the calling thread.  A ``threading`` lock held by
any other thread at that moment stays held in the child for ever, so the
child's next ``with lock:`` hangs (issue 9 item 4: a parent thread looping
``buf.protect()`` left 50 of 50 children stuck in ``close()``).

:class:`ForkSafeLock` is a re-entrant lock that is replaced by a fresh one
in the child, unless the forking thread itself held it (it then still owns
it and releases it as usual).  Use it for every lock of the package that a
forked child may take::

    self._lock = ForkSafeLock()
    with self._lock:
        ...

Only locks guarding state that is still meaningful in the child should be
reused there; what they guard is the owner's business (the engines already
treat state inherited across fork as stale).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

_live: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()
_registry_lock = threading.Lock()


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
    global _registry_lock
    _registry_lock = threading.Lock()
    for lock in list(_live):
        lock._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
