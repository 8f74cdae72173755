"""In-place watches in pytest (issue 14, items 2, 3 and 5): the marker's
inplace=True, a bare marker, uffd_readonly_fixtures and uffd_watch.

The writer-naming checks ask for the sync engine by name: ``auto`` avoids it
where the userfaultfd is user-mode only (it still records user-mode writes).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_uffd_guard.marker import BAD_MARKER
from pytest_uffd_guard.report import FAILURE_PREFIX as COPY_FAILURE_PREFIX
from pytest_uffd_guard.watchplugin import (
    FAILURE_PREFIX,
    READONLY_FIXTURE_OPTION,
    READONLY_FIXTURES_INI,
    SECTION_TITLE,
    WATCH_INI,
    WATCH_OPTION,
)
from tests.conftest import bound, exact_address


def at(offset: int) -> str:
    """A write record's offset as the report shows it: the byte itself with
    UFFD_FEATURE_EXACT_ADDRESS (5.18+), else its page's start (which depends
    on the object's alignment: matched as any offset)."""
    return str(offset) if exact_address() else "*"


pytestmark = [pytest.mark.needs_uffd, pytest.mark.timeout(bound(120))]

ROOT = Path(__file__).resolve().parents[2]
SYNC = "--uffd-engine=sync"

#: A module-level lookup table of 4096 doubles (32 KiB: whole pages inside).
TABLES = """
import array

GAMMA = array.array("d", (i / 4095 for i in range(4096)))
SMALL = bytearray(16)
NAME = "not a buffer"
FROZEN = b"read-only"
"""


def test_marker_inplace_watches_the_argument_itself(pytester: pytest.Pytester) -> None:
    """inplace=True: the test gets the very object (no copy); a write fails it
    with what changed, the writer's line and the test's line (issue 14 item 2)."""
    pytester.makepyfile(
        """
        import array
        import pytest

        TABLE = array.array("d", bytes(8 * 4096))

        @pytest.fixture
        def table():
            return TABLE

        @pytest.mark.readonly_buffer("table", inplace=True)
        def test_same_object(table):
            assert table is TABLE

        @pytest.mark.readonly_buffer("table", inplace=True)
        def test_scale(table):
            table[1000] = 7.0
        """
    )
    result = pytester.runpytest_subprocess(SYNC)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"{FAILURE_PREFIX}: 'table' (1 write, 1 changed range); see the '{SECTION_TITLE}'*",
            f"*{SECTION_TITLE} (call)*",
            "table*call*8006*2*0000 → 1c40*forbidden*",
            f"table*call*{at(8000)}*thread 'MainThread'*:16 in test_scale*forbidden*",
            "written from:",
            f"table offset {at(8000)}, innermost first:",
            "    test_marker_inplace_watches_the_argument_itself.py:16 in test_scale",
            "watched in place*",
            "table: * bytes protected (sync), * compared",
        ]
    )


def test_marker_inplace_writer_in_a_helper(pytester: pytest.Pytester) -> None:
    """The writer's own line and the test's line are both shown."""
    pytester.makepyfile(
        helper="""
        def scale(t, k):
            for i in range(len(t)):
                t[i] *= k
        """,
        test_helper="""
        import array
        import pytest
        from helper import scale

        @pytest.fixture(scope="module")
        def table():
            return array.array("d", [1.0]) * 4096

        @pytest.mark.readonly_buffer("table", inplace=True)
        def test_scale(table):
            scale(table, 1.0)
            scale(table, 2.0)
        """,
    )
    result = pytester.runpytest_subprocess(SYNC)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"{FAILURE_PREFIX}: 'table'*",
            "written from:",
            "    helper.py:3 in scale",
            "    test_helper.py:11 in test_scale",
        ]
    )


def test_marker_inplace_strict_under_report_and_allow(pytester: pytest.Pytester) -> None:
    """Like the copying marker: fails even under --uffd-report; allow= ranges pass."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def packet():
            return bytearray(64)

        @pytest.mark.readonly_buffer("packet", inplace=True, allow=[slice(0, 4)])
        def test_header(packet):
            packet[0:4] = b"abcd"

        @pytest.mark.readonly_buffer("packet", inplace=True, allow=[slice(0, 4)])
        def test_body(packet):
            packet[10] = 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*uffd-guard report*",
            "*test_header*call*packet*0+4*allowed*",
            "*test_body*call*packet*10+1*FAILED*",
        ]
    )


def test_marker_inplace_unwatchable_errors_at_setup(pytester: pytest.Pytester) -> None:
    """An argument that cannot be watched (bytes, a list) errors at setup with the fix."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("data", [b"abc", [1, 2]])
        @pytest.mark.readonly_buffer("data", inplace=True)
        def test_it(data):
            pass

        @pytest.mark.readonly_buffer(inplace=True)
        def test_bare_inplace(guarded_buffer):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*readonly_buffer(inplace=True) cannot watch argument 'data' of *test_it?abc?: "
            "*read-only*; fix: *",
            "*readonly_buffer(inplace=True) cannot watch argument 'data' of *test_it?data1?: "
            "cannot watch a list*; fix: *",
            "*" + BAD_MARKER.format(test="*test_bare_inplace", problem="name at least one*"),
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


def test_bare_marker_makes_guarded_buffers_strict(pytester: pytest.Pytester) -> None:
    """A bare marker: every read-only guarded_buffer fails the test even under
    --uffd-report, with the marker's allow=; readonly=False buffers stay reports."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.readonly_buffer
        def test_strict(guarded_buffer):
            guarded_buffer(16, name="a")[3] = 1

        @pytest.mark.readonly_buffer(allow=[(0, 4)])
        def test_allowed(guarded_buffer):
            guarded_buffer(16, name="b")[3] = 1

        @pytest.mark.readonly_buffer
        def test_output_map(guarded_buffer):
            guarded_buffer(16, name="c", readonly=False)[3] = 1

        def test_unmarked(guarded_buffer):
            guarded_buffer(16, name="d")[3] = 1

        @pytest.mark.readonly_buffer
        class TestClass:
            def test_in_class(self, guarded_buffer):
                guarded_buffer(16, name="e")[3] = 1

            def test_no_fixture(self):
                pass
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report", "-v")
    result.assert_outcomes(passed=4, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_strict WRITTEN*",
            "*::test_allowed PASSED*",
            "*::test_output_map PASSED*",
            "*::test_unmarked PASSED*",
            "*::test_in_class WRITTEN*",
            "*::test_no_fixture PASSED*",
            "*test_strict*call*a*3+1*FAILED*",
            "*test_allowed*call*b*3+1*allowed*",
            "*test_unmarked*call*d*3+1*reported*",
        ]
    )
    result.stdout.fnmatch_lines([f"{COPY_FAILURE_PREFIX}: 'a'*"])


POLLUTER = """
    import array
    import pytest

    @pytest.fixture(scope="session")
    def gains():
        return array.array("d", [1.0]) * 4096

    def normalise(samples, gains, first):
        for i, s in enumerate(samples, first):
            gains[i] /= s      # the bug: should build a new list
        return gains

    def test_normalise(gains):
        normalise([2.0, 4.0], gains, 2000)

    def test_gains_are_unity(gains):
        assert gains[2000] == 1.0
"""


def test_session_fixture_pollution_names_the_polluter(pytester: pytest.Pytester) -> None:
    """--uffd-readonly-fixture: the test that wrote the session fixture fails
    with the writer's line; without it, only the victim fails (issue 14 item 3)."""
    pytester.makepyfile(test_pollute=POLLUTER)
    alone = pytester.runpytest_subprocess("-k", "unity")
    alone.assert_outcomes(passed=1, deselected=1)
    plain = pytester.runpytest_subprocess()
    plain.assert_outcomes(passed=1, failed=1)
    plain.stdout.fnmatch_lines(["FAILED test_pollute.py::test_gains_are_unity - assert*"])
    result = pytester.runpytest_subprocess(SYNC, READONLY_FIXTURE_OPTION, "gains")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "uffd-guard: watched in place: fixtures: gains",
            "*",
            f"{FAILURE_PREFIX}: 'gains' (1 write, 2 changed ranges)*",
            "written from:",
            f"gains offset {at(16000)}, innermost first:",
            "    test_pollute.py:10 in normalise",
            "    test_pollute.py:14 in test_normalise",
            "*WRITTEN test_pollute.py::test_normalise*",
            "*FAILED test_pollute.py::test_gains_are_unity*",
        ]
    )


def test_readonly_fixtures_ini_and_scopes(pytester: pytest.Pytester) -> None:
    """The ini key names several fixtures; module- and function-scoped ones too;
    tests that do not use them are not watched; the option replaces the ini."""
    pytester.makeini(f"[pytest]\n{READONLY_FIXTURES_INI} = grid  row\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="module")
        def grid():
            return bytearray(8192)

        @pytest.fixture
        def row():
            return bytearray(8)

        @pytest.fixture
        def other():
            return bytearray(8)

        def test_grid(grid):
            grid[5000] = 1

        def test_row(row):
            row[2] = 1

        def test_other(other):
            other[2] = 1

        def test_reads(grid, row):
            assert grid[5000] == 1 and row[2] == 0
        """
    )
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_grid WRITTEN*",
            "*::test_row WRITTEN*",
            "*::test_other PASSED*",
            "*::test_reads PASSED*",
        ]
    )
    result = pytester.runpytest_subprocess(f"{READONLY_FIXTURE_OPTION}=row", "-v")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*::test_grid PASSED*", "*::test_row WRITTEN*"])
    result = pytester.runpytest_subprocess(f"{READONLY_FIXTURE_OPTION}=no")
    result.assert_outcomes(passed=4)


def test_readonly_fixture_report_mode(pytester: pytest.Pytester) -> None:
    """Under --uffd-report the fixture's writes are reported, not failed (like a
    guarded_buffer; the marker stays strict), in the summary and the JSON."""
    pytester.makepyfile(test_pollute=POLLUTER)
    result = pytester.runpytest_subprocess(
        SYNC, READONLY_FIXTURE_OPTION, "gains", "--uffd-report=term,json:out.json"
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*uffd-guard report*",
            "*test_normalise*call*gains*elements 2000..2001 of d?4096?*test_pollute.py:10 in "
            "normalise*reported*",
        ]
    )
    data = json.loads((pytester.path / "out.json").read_text())
    (finding,) = data["findings"]
    assert finding["origin"] == f"{READONLY_FIXTURES_INI}:gains"
    assert finding["nodeid"] == "test_pollute.py::test_normalise"
    assert finding["changes_total"] == 2 and not finding["failed"]
    assert finding["writes"][0]["where"][0] == "test_pollute.py:10 in normalise"


def test_readonly_fixture_unwatchable_is_a_setup_error(pytester: pytest.Pytester) -> None:
    """A listed fixture whose value cannot be watched errors the tests using it,
    naming the fixture, where it was listed and the fix."""
    pytester.makeini(f"[pytest]\n{READONLY_FIXTURES_INI} = config\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture(scope="session")
        def config():
            return {"a": 1}

        def test_uses(config):
            pass

        def test_does_not():
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*uffd-guard cannot watch fixture 'config' (named by the ini key "
            f"{READONLY_FIXTURES_INI}) in place for *test_uses: cannot watch a dict*; fix: *; "
            f"or take 'config' out of {READONLY_FIXTURES_INI} / {READONLY_FIXTURE_OPTION}"
        ]
    )
    result = pytester.runpytest_subprocess(f"{READONLY_FIXTURE_OPTION}=bad-name")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: invalid fixture name 'bad-name' from the command line "
            f"({READONLY_FIXTURE_OPTION})*"
        ]
    )


def test_uffd_watch_every_phase(pytester: pytest.Pytester) -> None:
    """uffd_watch: a write in a test's call fails that test naming the buffer,
    offset, writer and test; in setup or teardown it errors that phase; clean
    tests pass (issue 14 item 3)."""
    pytester.makepyfile(tables=TABLES)
    pytester.makeini(f"[pytest]\npythonpath = .\n{WATCH_INI} = tables:GAMMA\n")
    pytester.makepyfile(
        test_phases="""
        import pytest
        import tables

        @pytest.fixture
        def poke():
            tables.GAMMA[1500] = 3.0
            yield
            tables.GAMMA[2500] = 3.0

        def test_clean():
            assert tables.GAMMA[4095] == 1.0

        def test_call():
            tables.GAMMA[1000] = 2.0

        def test_fixture(poke):
            pass

        def test_after():
            pass
        """
    )
    result = pytester.runpytest_subprocess(SYNC, "-rA")
    result.assert_outcomes(passed=2, failed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "uffd-guard: watched in place: for the session: tables:GAMMA",
            "*ERROR at setup of test_fixture*",
            f"{FAILURE_PREFIX}: 'tables:GAMMA' (1 write, 1 changed range) during setup of "
            "test_fixture; see*",
            f"*{SECTION_TITLE} (setup)*",
            f"tables:GAMMA*setup*{at(12000)}*thread 'MainThread'*"
            "test_phases.py:6 in poke*forbidden*",
            "*ERROR at teardown of test_fixture*",
            "*during teardown of test_fixture*",
            f"tables:GAMMA*teardown*{at(20000)}*test_phases.py:8 in poke*",
            "*test_call*",
            f"{FAILURE_PREFIX}: 'tables:GAMMA' (1 write, 1 changed range); see*",
            "tables:GAMMA*call*8000*8*→*forbidden*",
            f"tables:GAMMA offset {at(8000)}, innermost first:",
            "    test_phases.py:14 in test_call",
            "watched in place*",
            "tables:GAMMA: * bytes protected (sync), * compared",
        ]
    )
    result.stdout.fnmatch_lines_random(
        [
            "PASSED test_phases.py::test_clean",
            "PASSED test_phases.py::test_after",
            f"ERROR test_phases.py::test_fixture - {FAILURE_PREFIX}*",
            "WRITTEN test_phases.py::test_call*",
        ]
    )


def test_uffd_watch_each_write_once(pytester: pytest.Pytester) -> None:
    """The session watch starts clean after each phase that saw writes: the
    next test is judged on its own writes only, also into the same page."""
    pytester.makepyfile(tables=TABLES)
    pytester.makepyfile(
        test_twice="""
        import tables

        def test_one():
            tables.GAMMA[1000] = 2.0

        def test_two():
            tables.GAMMA[1001] = 2.0

        def test_three():
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-o", "pythonpath=.", WATCH_OPTION, "tables:GAMMA", "-v"
    )
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*::test_one WRITTEN*",
            "*::test_two WRITTEN*",
            "*::test_three PASSED*",
            "tables:GAMMA*call*8000*8*",
            "tables:GAMMA*call*8008*8*",
        ]
    )


def test_uffd_watch_collection_and_session(pytester: pytest.Pytester) -> None:
    """A write while a module is collected is that module's collection error;
    one outside any test or collector (a hook) is a session error that makes
    the exit code non-zero."""
    pytester.makepyfile(tables=TABLES)
    pytester.makepyfile(
        test_import="""
        import tables

        tables.GAMMA[1000] = 5.0

        def test_x():
            pass
        """
    )
    args = ("-o", "pythonpath=.", SYNC, WATCH_OPTION, "tables:GAMMA")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*ERROR collecting test_import.py*",
            f"{FAILURE_PREFIX}: 'tables:GAMMA' (1 write, 1 changed range) during collection of "
            "test_import.py; see*",
            f"tables:GAMMA*collection*{at(8000)}*test_import.py:3 in <module>*forbidden*",
            "*Interrupted: 1 error during collection*",
        ]
    )
    (pytester.path / "test_import.py").unlink()
    pytester.makeconftest(
        """
        def pytest_collection_modifyitems(items):
            import tables
            tables.GAMMA[2000] = 1.0
        """
    )
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            f"uffd-guard: ERROR outside any test: {FAILURE_PREFIX}: 'tables:GAMMA' (1 write, "
            "1 changed range) during collection; see*",
            f"tables:GAMMA*collection*{at(16000)}*conftest.py:3 in pytest_collection_modifyitems*",
        ]
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tables", "invalid uffd watch spec 'tables' from *: no ':' between*; expected "
         "package.module:ATTR, e.g. mypkg.tables:GAMMA"),
        ("nosuch.mod:X", "uffd watch spec 'nosuch.mod:X' from *: cannot import module "
         "'nosuch.mod' (ModuleNotFoundError: No module named 'nosuch'); fix: *pythonpath*"),
        ("tables:NOPE", "uffd watch spec 'tables:NOPE' from *: module 'tables' has no "
         "attribute 'NOPE'; fix: name a module-level buffer of tables (it has: GAMMA, SMALL)"),
        ("tables:NAME", "uffd watch spec 'tables:NAME' from * cannot be watched: cannot watch "
         "a str*; fix: *"),
        ("tables:FROZEN", "uffd watch spec 'tables:FROZEN' from * cannot be watched: "
         "*read-only*; fix: *"),
    ],
)  # fmt: skip
def test_uffd_watch_bad_specs_are_usage_errors(
    pytester: pytest.Pytester, spec: str, message: str
) -> None:
    """A bad spec stops pytest (exit 4) naming the spec, where it came from and the fix."""
    pytester.makepyfile(tables=TABLES)
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    pytester.makeini(f"[pytest]\npythonpath = .\n{WATCH_INI} = {spec}\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])
    result.stderr.no_fnmatch_line("*Traceback*")


def test_help_and_markers(pytester: pytest.Pytester) -> None:
    """--help lists the options and ini keys; --markers documents inplace= and the bare form."""
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines_random(
        [
            f"*{READONLY_FIXTURE_OPTION}=NAME*",
            f"*{WATCH_OPTION}=SPEC*",
            f"*{READONLY_FIXTURES_INI} (args):*",
            f"*{WATCH_INI} (args):*",
        ]
    )
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.readonly_buffer(*argnames, allow=(), inplace=False): *inplace=True watches*"]
    )


def test_examples_catch_the_in_place_bugs(pytester: pytest.Pytester) -> None:
    """examples/suite: the cached lookup table (one ini line) and the polluting
    session fixture (one option) are each caught with the offending line
    (issue 14 item 4); `pytest examples/` still runs only the parser example."""
    for path in (ROOT / "examples" / "suite").iterdir():
        if path.is_file():
            shutil.copy(path, pytester.path / path.name)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", SYNC, "-rA")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines_random(
        [
            "WRITTEN check_shading.py::test_boosted_levels*",
            "PASSED check_sensor.py::test_calibrate",
            "FAILED check_sensor.py::test_gains_are_factory_values*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["    shading.py:22 in correct", "    check_shading.py:11 in test_boosted_levels"]
    )
    alone = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "factory")
    alone.assert_outcomes(passed=1, deselected=2)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", SYNC, "-rA", READONLY_FIXTURE_OPTION, "gains", "check_sensor.py"
    )
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "    sensor.py:20 in calibrate",
            "    check_sensor.py:18 in test_calibrate",
            "WRITTEN check_sensor.py::test_calibrate*",
        ]
    )
