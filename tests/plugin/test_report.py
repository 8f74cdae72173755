"""--uffd-report, its JSON schema and the ini keys (issue 3, point 4)."""

from __future__ import annotations

import json

import pytest

from pytest_uffd_guard.report import JSON_SCHEMA, JSON_VERSION, NOTHING_WRITTEN, SUMMARY_TITLE
from tests.conftest import expected_write, sync_engine_args

pytestmark = pytest.mark.needs_uffd

WRITING_TEST = """
    def test_writes(guarded_buffer):
        buf = guarded_buffer(b"abcdef", name="frame")
        buf[2] = ord("Z")

    def test_clean(guarded_buffer):
        guarded_buffer(8)
"""


def test_report_mode_does_not_fail_and_lists_writes(pytester: pytest.Pytester) -> None:
    """--uffd-report: the writing test passes and the session section lists the write."""
    pytester.makepyfile(WRITING_TEST)
    result = pytester.runpytest_subprocess("--uffd-report", *sync_engine_args())
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            f"*= {SUMMARY_TITLE} =*",
            "test*writer*",
            "*test_writes*call*frame*2+1*'MainThread' (tid *)*reported*",
        ]
    )
    result.stdout.no_fnmatch_line("*test_clean*call*")


def test_no_section_without_option(pytester: pytest.Pytester) -> None:
    """Without --uffd-report there is no session section."""
    pytester.makepyfile(
        "def test_one(guarded_buffer):\n    guarded_buffer(8, readonly=False)[0] = 1\n"
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line(f"*{SUMMARY_TITLE}*")


def test_report_says_when_nothing_was_written(pytester: pytest.Pytester) -> None:
    """An empty report says so in one line."""
    pytester.makepyfile("def test_one(guarded_buffer):\n    guarded_buffer(8)\n")
    result = pytester.runpytest_subprocess("--uffd-report=term")
    result.stdout.fnmatch_lines([f"*{SUMMARY_TITLE}*", NOTHING_WRITTEN])


def test_json_report(pytester: pytest.Pytester) -> None:
    """--uffd-report=json:PATH writes the versioned JSON document."""
    pytester.makepyfile(WRITING_TEST)
    result = pytester.runpytest_subprocess(
        "--uffd-report=json:out/report.json", *sync_engine_args()
    )
    result.assert_outcomes(passed=2)
    result.stdout.no_fnmatch_line(f"*{SUMMARY_TITLE}*")
    data = json.loads((pytester.path / "out" / "report.json").read_text())
    assert data["schema"] == JSON_SCHEMA and data["version"] == JSON_VERSION
    assert data["engine"] == "sync" and data["available"] is True
    (finding,) = data["findings"]
    assert finding["nodeid"] == "test_json_report.py::test_writes"
    assert finding["phase"] == "call" and finding["buffer"] == "frame"
    assert finding["readonly"] is True and finding["failed"] is False
    assert finding["changes"] == [
        {
            "offset": 2,
            "length": 1,
            "before": "63",
            "after": "5a",
            "truncated": False,
            "status": "reported",
        }
    ]
    (write,) = finding["writes"]
    assert (write["offset"], write["exact"]) == expected_write(2)
    assert write["thread_name"] == "MainThread" and write["status"] == "reported"


def test_term_and_json_together(pytester: pytest.Pytester) -> None:
    """Targets combine with a comma."""
    pytester.makepyfile(WRITING_TEST)
    result = pytester.runpytest_subprocess("--uffd-report=term,json:r.json")
    result.stdout.fnmatch_lines(
        [f"*{SUMMARY_TITLE}*", "*test_writes*frame*", "uffd-guard: JSON report written to *r.json"]
    )
    assert (pytester.path / "r.json").exists()


def test_ini_key_and_cli_precedence(pytester: pytest.Pytester) -> None:
    """uffd_report in the ini file turns report mode on; the command line wins over it."""
    pytester.makeini("[pytest]\nuffd_report = json:from-ini.json\n")
    pytester.makepyfile(WRITING_TEST)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)
    assert (pytester.path / "from-ini.json").exists()
    result = pytester.runpytest_subprocess("--uffd-report=no")
    result.assert_outcomes(passed=1, failed=1)


def test_invalid_report_value_names_its_source(pytester: pytest.Pytester) -> None:
    """A bad target is a usage error that quotes the value and where it came from."""
    pytester.makeini("[pytest]\nuffd_report = xml:out.xml\n")
    result = pytester.runpytest()
    result.stderr.fnmatch_lines(
        ["*invalid uffd report target 'xml:out.xml' from the ini key uffd_report*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result = pytester.runpytest("--uffd-report=json:")
    result.stderr.fnmatch_lines(["*'json:' from the command line (--uffd-report)*"])


def test_verdict_failures_marked_in_summary(pytester: pytest.Pytester) -> None:
    """Marker failures show as FAILED in the report section, allowed writes as allowed."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def data():
            return memoryview(bytearray(16))

        @pytest.mark.readonly_buffer("data")
        def test_marked(data):
            data[0] = 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_marked*call*data*0+1*FAILED*"])
