"""pytest-xdist: two workers, one report on the controller (issue 3, point 7)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")
pytestmark = pytest.mark.needs_uffd


def test_two_workers_report_every_write(pytester: pytest.Pytester) -> None:
    """With -n 2 the controller's section and JSON hold the writes of both workers."""
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.parametrize("i", range(6))
        def test_write(guarded_buffer, i):
            buf = guarded_buffer(4096, name=f"buf{i}")
            buf[i] = 1
            print(os.environ.get("PYTEST_XDIST_WORKER"))

        @pytest.fixture
        def data():
            return memoryview(bytearray(8))

        @pytest.mark.readonly_buffer("data")
        def test_marked(data):
            data[7] = 1
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "--uffd-report=term,json:r.json")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*uffd-guard report*"])
    result.stdout.fnmatch_lines(["*test_marked*call*data*7+1*FAILED*"])
    result.stdout.fnmatch_lines(["*WRITTEN*test_marked*"])
    for i in range(6):
        result.stdout.fnmatch_lines([f"*test_write?{i}?*call*buf{i}*{i}+1*reported*"])
    data = json.loads((pytester.path / "r.json").read_text())
    assert sorted(f["buffer"] for f in data["findings"]) == [
        "buf0",
        "buf1",
        "buf2",
        "buf3",
        "buf4",
        "buf5",
        "data",
    ]


def test_failure_table_from_worker(pytester: pytest.Pytester) -> None:
    """A worker's failure keeps its sentence and table on the controller."""
    pytester.makepyfile(
        """
        def test_w(guarded_buffer):
            guarded_buffer(b"abc", name="frame")[1] = 0
        """
    )
    result = pytester.runpytest_subprocess("-n", "2")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*write into a read-only guarded buffer: 'frame'*", "frame*call*1*1*62 → 00*forbidden*"]
    )
