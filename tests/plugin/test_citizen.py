"""Living with pytest's stock plugins and options (issue 3, point 10)."""

from __future__ import annotations

import ast
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from pytest_uffd_guard.settings import REPORT_HELP
from tests.conftest import exact_address, sync_engine_args

WRITES = """
    def test_writes(guarded_buffer):
        guarded_buffer(b"abcd", name="frame")[0] = 0

    def test_after():
        pass
"""


def test_import_costs_nothing() -> None:
    """Importing the plugin opens no fd, starts no thread and loads neither ctypes nor numpy."""
    code = (
        "import os, sys, threading\n"
        "before = set(os.listdir('/proc/self/fd'))\n"
        "import pytest_uffd_guard.plugin\n"
        "after = set(os.listdir('/proc/self/fd'))\n"
        "heavy = ('ctypes', 'numpy', 'pytest_uffd_guard._uffd', 'pytest_uffd_guard.guard')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print(len(after - before), threading.active_count(), heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split(None, 2) == ["0", "1", "[]\n"]


@pytest.mark.needs_uffd
def test_no_engine_until_a_buffer_is_made(pytester: pytest.Pytester) -> None:
    """A session whose tests use no guarded buffer runs no handler thread and keeps no uffd."""
    pytester.makepyfile(
        """
        import os, threading

        def test_idle():
            links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                     if os.path.exists(f"/proc/self/fd/{fd}")]
            assert not [link for link in links if "userfaultfd" in link]
            assert threading.active_count() == 1
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:faulthandler")
    result.assert_outcomes(passed=1)


#: The modules a run that guards nothing may import: the plugin's front.
FRONT = [
    "pytest_uffd_guard",
    "pytest_uffd_guard.hookspecs",
    "pytest_uffd_guard.names",
    "pytest_uffd_guard.plugin",
    "pytest_uffd_guard.settings",
    "pytest_uffd_guard.state",
    "pytest_uffd_guard.watchsettings",
]

PRINT_MODULES = """
    import sys

    def test_{name}({args}):
        {body}
        loaded = sorted(m for m in sys.modules if m.startswith("pytest_uffd_guard"))
        print("LOADED", loaded)
"""


def loaded_modules(result: pytest.RunResult) -> list[str]:
    line = next(line for line in result.outlines if "LOADED [" in line)
    start = line.index("LOADED [") + len("LOADED ")
    return list(ast.literal_eval(line[start : line.index("]", start) + 1]))


def test_a_run_that_guards_nothing_loads_only_the_front(pytester: pytest.Pytester) -> None:
    """issue 11 (start-up): the manager, the watches, the engines and the
    kernel probe stay unimported until a test guards something."""
    pytester.makepyfile(PRINT_MODULES.format(name="idle", args="", body="pass"))
    result = pytester.runpytest_subprocess("-s", "-v")
    result.assert_outcomes(passed=1)
    assert loaded_modules(result) == FRONT
    result.stdout.fnmatch_lines(["uffd-guard: no guarded test collected*"])


@pytest.mark.parametrize(
    "option",
    [
        "--uffd-report",
        pytest.param("--uffd-watch=watched_data:BUF", marks=pytest.mark.needs_uffd),
    ],
)
def test_asking_for_a_report_or_a_watch_loads_the_manager(
    pytester: pytest.Pytester, option: str
) -> None:
    """A report is said, and a session watch starts, even when no test guards anything."""
    pytester.makepyfile(
        watched_data="BUF = bytearray(4096)\n",
        test_idle=PRINT_MODULES.format(name="idle", args="", body="pass"),
    )
    result = pytester.runpytest_subprocess("-s", option)
    result.assert_outcomes(passed=1)
    loaded = loaded_modules(result)
    assert "pytest_uffd_guard.manager" in loaded
    assert "pytest_uffd_guard.watchplugin" in loaded


@pytest.mark.needs_uffd
def test_fixture_asked_for_at_run_time_is_guarded(pytester: pytest.Pytester) -> None:
    """request.getfixturevalue("guarded_buffer"), invisible at collection,
    registers the manager itself: the write still fails the test."""
    pytester.makepyfile(
        PRINT_MODULES.format(
            name="late",
            args="request",
            body='request.getfixturevalue("guarded_buffer")(b"abcd", name="late")[1] = 0',
        )
    )
    result = pytester.runpytest_subprocess("-s", *sync_engine_args())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*write into a read-only guarded buffer: 'late'*"])


NESTED = """
    pytest_plugins = ["pytester"]

    def test_outer(pytester, request):
        inner = "def test_inner(guarded_buffer):\\n    guarded_buffer(b'ab', name='inner')\\n"
        pytester.makepyfile(test_inner=inner)
        pytester.runpytest_inprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
        request.getfixturevalue("guarded_buffer")(b"abcd", name="outer")[0] = 1
"""


@pytest.mark.needs_uffd
def test_fixture_finds_its_test_around_a_nested_session(pytester: pytest.Pytester) -> None:
    """The fixture belongs to the innermost running test: a whole session run
    inside a test (pytester, in process) leaves the outer test its own.

    The inner run imports the package first and pytester takes its modules
    out of sys.modules afterwards: the re-imported package shares the C
    core's running handler and capture signal (it used to skip with
    "handler already started", then name no writer)."""
    pytester.makepyfile(test_outer=NESTED)
    result = pytester.runpytest_subprocess(*sync_engine_args())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*write into a read-only guarded buffer: 'outer'*",
            "*outer*call*thread 'MainThread'*at *test_outer.py:7 in test_outer*forbidden*",
        ]
    )


@pytest.mark.needs_uffd
def test_junitxml_properties(pytester: pytest.Pytester) -> None:
    """junitxml records the writes as properties of the test case."""
    pytester.makepyfile(WRITES)
    result = pytester.runpytest_subprocess("--junitxml=junit.xml", *sync_engine_args())
    result.assert_outcomes(passed=1, failed=1)
    root = ET.parse(pytester.path / "junit.xml").getroot()
    case = next(c for c in root.iter("testcase") if c.get("name") == "test_writes")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    offset = "0" if exact_address() else "0(page)"  # no EXACT_ADDRESS before 5.18
    assert props["uffd_write"].startswith(f"frame call offset={offset} thread=MainThread")
    assert (
        props["uffd_change"] == "frame call offset=0 length=1 before=61 after=00 status=forbidden"
    )
    assert case.find("failure") is not None


@pytest.mark.needs_uffd
@pytest.mark.parametrize(
    "args",
    [
        ["-x"],
        ["-p", "no:cacheprovider"],
        ["-p", "no:faulthandler"],
        ["-o", "faulthandler_timeout=5"],
        ["--strict-markers"],
        ["--import-mode=importlib"],
        ["--assert=plain"],
    ],
    ids=lambda a: " ".join(a),
)
def test_stock_options(pytester: pytest.Pytester, args: list[str]) -> None:
    """The verdict holds with stock options; -x stops after the written test."""
    pytester.makepyfile(WRITES)
    result = pytester.runpytest_subprocess(*args)
    if args == ["-x"]:
        result.assert_outcomes(failed=1)
    else:
        result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*write into a read-only guarded buffer: 'frame'*"])


@pytest.mark.needs_uffd
def test_assertion_rewriting_still_works(pytester: pytest.Pytester) -> None:
    """Test modules keep assertion rewriting: a failed assert explains its values."""
    pytester.makepyfile(
        """
        def test_assert(guarded_buffer):
            buf = guarded_buffer(b"ab")
            assert buf[0] == 0
        """
    )
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["*assert 97 == 0*"])


def test_help_lists_options_and_ini_keys(pytester: pytest.Pytester) -> None:
    """--help shows the options and the ini keys with one shared help text."""
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*Guarded buffers (userfaultfd write-protection)*",
            "*--uffd-report=*",
            "*--uffd-require*",
            "*--uffd-no-require*",
        ]
    )
    text = " ".join(result.stdout.str().split())
    assert "uffd_report (string)" in text and "uffd_require (bool)" in text
    assert text.count(" ".join(REPORT_HELP.split())[:60]) == 2


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    """-p no:uffd_guard removes the header, the fixture and the options."""
    pytester.makepyfile("def test_one(guarded_buffer):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:uffd_guard")
    result.stdout.no_fnmatch_line("uffd-guard:*")
    result.stdout.fnmatch_lines(["*fixture 'guarded_buffer' not found*"])


def test_layers_below_the_plugin_do_not_import_pytest() -> None:
    """report.py and settings.py (and the API) work without pytest: nothing imports the plugin."""
    code = (
        "import sys\n"
        "import pytest_uffd_guard.report, pytest_uffd_guard.settings, pytest_uffd_guard.guard\n"
        "print(sorted(m for m in ('pytest', '_pytest', 'pytest_uffd_guard.plugin') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
