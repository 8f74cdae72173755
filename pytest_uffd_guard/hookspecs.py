"""Hooks of pytest-uffd-guard, for ``conftest.py`` files and other plugins.

Registered by the plugin in ``pytest_addhooks``.  Every hook is called with
keyword arguments; implement only the arguments you need.

``buffer`` is what was written into: a ``GuardedBuffer`` (the
``guarded_buffer`` fixture, the ``readonly_buffer`` marker's copies), or a
``Watch`` for memory watched in place (the marker's ``inplace=True``,
``uffd_readonly_fixtures``, ``uffd_watch``), whose ``obj`` is the watched
object itself.  Both have ``name``, ``writes`` and ``changes()``, readable
when the hooks run (the watch or buffer may be stopped or closed by then);
offsets count from the start of the buffer or of the watched object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from typing import Union

    from .guard import GuardedBuffer
    from .inplace import Watch
    from .kernel.records import WriteRecord

    #: What a write was found in: a guarded copy, or memory watched in place.
    Buffer = Union[GuardedBuffer, Watch]


@pytest.hookspec(firstresult=True)
def pytest_uffd_write_allowed(
    config: pytest.Config,
    item: pytest.Item,
    buffer: Buffer,
    record: WriteRecord,
    changes: list[tuple[int, int]],
    phase: str,
) -> bool | None:
    """Decide whether a write into a read-only guarded buffer, or into
    memory watched in place, is allowed.

    Called for every write recorded in a read-only buffer or a watch
    (``buffer``: a ``GuardedBuffer`` or a ``Watch``, see the module).
    ``changes`` are the ``(start, stop)`` byte ranges that changed in the
    page of the write (empty when the same value was written back).  Return
    ``True`` to allow the write (it is still reported, with status
    ``allowed``), ``False`` to forbid it even if the marker's ``allow=``
    covers it, or ``None`` to let the next implementation decide.  The
    plugin's own implementation runs last and allows writes inside the
    marker's ``allow=`` ranges.

    Example ``conftest.py``: allow writes made by a known worker thread::

        def pytest_uffd_write_allowed(buffer, record):
            if record.thread_name == "cache-warmer":
                return True
            return None
    """


@pytest.hookspec
def pytest_uffd_write(
    config: pytest.Config,
    item: pytest.Item,
    buffer: Buffer,
    record: WriteRecord,
    phase: str,
    status: str,
) -> None:
    """Called for every write detected in a guarded buffer or a watch
    (``buffer``: a ``GuardedBuffer`` or a ``Watch``), after the verdict.

    ``phase`` is ``"setup"``, ``"call"`` or ``"teardown"``; ``status`` is
    ``"forbidden"`` (fails the test), ``"allowed"`` or ``"reported"``.
    ``buffer`` may already be closed at teardown, and a ``Watch`` is
    stopped (their ``name``, ``writes`` and ``changes()`` stay readable).

    Example ``conftest.py``: log every write to a file::

        def pytest_uffd_write(item, buffer, record, status):
            with open("writes.log", "a") as log:
                print(item.nodeid, buffer.name, record.offset, status, file=log)
    """
