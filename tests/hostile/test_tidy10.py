"""Issue 10 (tidy10): the hooks' ``buffer`` for in-place watches, coverage in
the JSON of in-place findings, and the handler's warning shown to users."""

from __future__ import annotations

import pytest

from tests.conftest import bound

INPLACE_TEST = """
import array
import pytest

@pytest.fixture
def table():
    return array.array("d", bytes(4 * 4096))

@pytest.mark.readonly_buffer("table", inplace=True)
def test_writes(table):
    table[1000] = 1.0
"""


@pytest.mark.timeout(bound(120))
def test_hooks_get_the_watch_for_memory_watched_in_place(pytester: pytest.Pytester) -> None:
    """issue 10 item 3: for inplace=True, both hooks' ``buffer`` is the
    Watch (name, writes, changes(), obj the test's own object), as
    hookspecs.py and docs/hooks.md now say."""
    pytester.makeconftest(
        """
        from pytest_uffd_guard import Watch

        def pytest_uffd_write_allowed(buffer, record):
            print("ASKED", type(buffer).__name__, buffer.name, type(buffer.obj).__name__)
            return True

        def pytest_uffd_write(buffer, record, status):
            assert isinstance(buffer, Watch)
            print("TOLD", buffer.name, len(buffer.writes), len(buffer.changes()), status)
        """
    )
    pytester.makepyfile(INPLACE_TEST)
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["*ASKED Watch table array*", "*TOLD table 1 1 allowed*"])
    assert result.ret == 0
