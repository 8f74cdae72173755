"""Hooks of pytest-uffd-guard, for ``conftest.py`` files and other plugins.

Registered by the plugin in ``pytest_addhooks``.  Every hook is called with
keyword arguments; implement only the arguments you need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .guard import GuardedBuffer
    from .kernel.records import WriteRecord


@pytest.hookspec(firstresult=True)
def pytest_uffd_write_allowed(
    config: pytest.Config,
    item: pytest.Item,
    buffer: GuardedBuffer,
    record: WriteRecord,
    changes: list[tuple[int, int]],
    phase: str,
) -> bool | None:
    """Decide whether a write into a read-only guarded buffer is allowed.

    Called for every write recorded in a read-only buffer.  ``changes`` are
    the ``(start, stop)`` byte ranges that changed in the page of the write
    (empty when the same value was written back).  Return ``True`` to allow
    the write (it is still reported, with status ``allowed``), ``False`` to
    forbid it even if the marker's ``allow=`` covers it, or ``None`` to let
    the next implementation decide.  The plugin's own implementation runs
    last and allows writes inside the marker's ``allow=`` ranges.

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
    buffer: GuardedBuffer,
    record: WriteRecord,
    phase: str,
    status: str,
) -> None:
    """Called for every write detected in a guarded buffer, after the verdict.

    ``phase`` is ``"setup"``, ``"call"`` or ``"teardown"``; ``status`` is
    ``"forbidden"`` (fails the test), ``"allowed"`` or ``"reported"``.
    ``buffer`` may already be closed at teardown (its ``name``, ``writes``
    and ``changes()`` stay readable).

    Example ``conftest.py``: log every write to a file::

        def pytest_uffd_write(item, buffer, record, status):
            with open("writes.log", "a") as log:
                print(item.nodeid, buffer.name, record.offset, status, file=log)
    """
