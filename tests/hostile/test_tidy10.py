"""Issue 10 (tidy10): the hooks' ``buffer`` for in-place watches, coverage in
the JSON of in-place findings, and the handler's warning shown to users."""

from __future__ import annotations

import json

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


@pytest.mark.timeout(bound(120))
def test_json_says_which_bytes_were_compared(pytester: pytest.Pytester) -> None:
    """issue 10 item 4: an in-place finding carries ``coverage``
    (``Coverage.as_dict()``) in the JSON, so the report says which bytes
    were compared rather than protected; a guarded buffer's is null."""
    pytester.makepyfile(
        INPLACE_TEST
        + """
def test_copy(guarded_buffer):
    guarded_buffer(16, name="copy", readonly=False)[3] = 1
"""
    )
    result = pytester.runpytest_subprocess("--uffd-report=json:report.json")
    assert result.ret == 1
    findings = json.loads((pytester.path / "report.json").read_text())["findings"]
    by_name = {f["buffer"]: f for f in findings}
    assert by_name["copy"]["coverage"] is None
    coverage = by_name["table"]["coverage"]
    assert coverage["size"] == 4 * 4096
    assert coverage["protected"] + coverage["compared"] == 4 * 4096
    assert sum(s["length"] for s in coverage["spans"]) == 4 * 4096
    assert {s["how"] for s in coverage["spans"]} <= {"protected", "compared"}
    assert coverage["engine"] in ("sync", "async", "hybrid", "diff")
    assert isinstance(coverage["notes"], list)
