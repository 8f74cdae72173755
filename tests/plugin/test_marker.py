"""The readonly_buffer marker (issue 3, point 3)."""

from __future__ import annotations

import pytest

from pytest_uffd_guard.plugin import BAD_MARKER, UNGUARDABLE, UNKNOWN_ARGUMENT
from pytest_uffd_guard.report import FAILURE_PREFIX

pytestmark = pytest.mark.needs_uffd

np = pytest.importorskip("numpy")


def test_numpy_copy_same_dtype_shape_contents(pytester: pytest.Pytester) -> None:
    """A numpy argument becomes a guarded ndarray of the same dtype, shape and contents."""
    pytester.makepyfile(
        """
        import numpy as np
        import pytest

        @pytest.fixture
        def image():
            return np.arange(24, dtype=np.float32).reshape(2, 3, 4)

        @pytest.fixture
        def fortran():
            return np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))

        @pytest.mark.readonly_buffer("image", "fortran")
        def test_same(image, fortran):
            assert type(image) is np.ndarray
            assert image.dtype == np.float32 and image.shape == (2, 3, 4)
            assert (image == np.arange(24, dtype=np.float32).reshape(2, 3, 4)).all()
            assert fortran.flags.f_contiguous and fortran.dtype == np.int16
            assert (fortran == np.arange(6).reshape(2, 3)).all()
            assert image.sum() == 276   # reads are free
        """
    )
    result = pytester.runpytest_subprocess("--strict-markers")
    result.assert_outcomes(passed=1)


def test_numpy_write_fails(pytester: pytest.Pytester) -> None:
    """Writing into the swapped numpy array fails the test, naming the byte offset."""
    pytester.makepyfile(
        """
        import numpy as np
        import pytest

        def normalise(a):
            a -= a.min()           # the bug: in place
            return a

        @pytest.mark.parametrize("samples", [np.full(1024, 5, dtype=np.uint8)])
        @pytest.mark.readonly_buffer("samples")
        def test_normalise(samples):
            normalise(samples)
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"{FAILURE_PREFIX}: 'samples' (1 write, 1 changed range)*",
            "samples*call*0*1024*0505050505050505… (+1016 B) → 0000000000000000… (+1016 B)*",
        ]
    )


def test_memoryview_copy(pytester: pytest.Pytester) -> None:
    """A memoryview argument becomes a guarded memoryview with the same format and shape."""
    pytester.makepyfile(
        """
        import array
        import pytest

        @pytest.fixture
        def words():
            return memoryview(array.array("I", range(12))).cast("B").cast("I", [3, 4])

        @pytest.fixture
        def raw():
            return memoryview(b"abcdef")

        @pytest.mark.readonly_buffer("words", "raw")
        def test_view(words, raw):
            assert words.format == "I" and words.shape == (3, 4)
            assert words.tolist()[2] == [8, 9, 10, 11]
            assert bytes(raw) == b"abcdef" and not raw.readonly

        @pytest.mark.readonly_buffer("raw")
        def test_write(raw):
            raw[0] = ord("A")
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["raw*call*0*1*61 → 41*forbidden*"])


@pytest.mark.parametrize(
    ("value", "type_name"),
    [("b'abc'", "bytes"), ("bytearray(b'abc')", "bytearray"), ("[1, 2]", "list")],
)
def test_unguardable_type_errors_at_setup(
    pytester: pytest.Pytester, value: str, type_name: str
) -> None:
    """bytes, bytearray, list... error at setup with what to use instead."""
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.parametrize("data", [{value}])
        @pytest.mark.readonly_buffer("data")
        def test_it(data):
            pass
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    message = UNGUARDABLE.format(argname="data", type=type_name)
    result.stdout.fnmatch_lines([f"{message}*memoryview(data)*guarded_buffer fixture*"])
    result.stdout.no_fnmatch_line("*During handling*")


def test_allow_range(pytester: pytest.Pytester) -> None:
    """Writes inside allow= pass but are still reported; writes outside fail."""
    pytester.makepyfile(
        """
        import numpy as np
        import pytest

        @pytest.fixture
        def packet():
            return np.zeros(64, dtype=np.uint8)

        @pytest.mark.readonly_buffer("packet", allow=[slice(0, 4), (60, 64)])
        def test_header_only(packet):
            packet[0:4] = 7          # checksum field: allowed
            packet[62] = 1

        @pytest.mark.readonly_buffer("packet", allow=slice(0, 4))
        def test_body(packet):
            packet[10] = 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*uffd-guard report*",
            "*test_header_only*call*packet*0+4, 62+1*allowed*",
            "*test_body*call*packet*10+1*FAILED*",
        ]
    )


def test_class_and_module_markers(pytester: pytest.Pytester) -> None:
    """The marker works on a class and on a module (pytestmark), for tests that take the arg."""
    pytester.makepyfile(
        """
        import numpy as np
        import pytest

        pytestmark = pytest.mark.readonly_buffer("grid")

        @pytest.fixture
        def grid():
            return np.zeros((4, 4))

        def test_module_write(grid):
            grid[1, 1] = 1

        def test_without_the_arg():
            pass

        @pytest.mark.readonly_buffer("row")
        class TestRows:
            @pytest.fixture
            def row(self):
                return memoryview(bytearray(8))

            def test_class_write(self, row, grid):
                row[3] = 1

            def test_class_read(self, row, grid):
                assert grid.sum() == 0 and row[0] == 0
        """
    )
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*test_module_write WRITTEN*",
            "*test_without_the_arg PASSED*",
            "*test_class_write WRITTEN*",
            "*test_class_read PASSED*",
        ]
    )


def test_unknown_argument_and_bad_keywords(pytester: pytest.Pytester) -> None:
    """A function marker naming a missing argument, or a bad keyword, errors at setup."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.readonly_buffer("nope")
        def test_unknown():
            pass

        @pytest.mark.readonly_buffer("data", allowed=[1])
        def test_keyword(data=None):
            pass

        @pytest.mark.readonly_buffer()
        def test_empty():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-rE")
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*"
            + UNKNOWN_ARGUMENT.format(
                argname="nope", test="test_unknown_argument_and_bad_keywords.py::test_unknown"
            ),
            "*" + BAD_MARKER.format(test="*test_keyword", problem="unknown keyword allowed*"),
            "*" + BAD_MARKER.format(test="*test_empty", problem="name at least one argument*"),
        ]
    )


def test_marker_fails_even_in_report_mode(pytester: pytest.Pytester) -> None:
    """--uffd-report stops fixture buffers failing tests, but the marker still fails them."""
    pytester.makepyfile(
        """
        import numpy as np
        import pytest

        @pytest.fixture
        def data():
            return np.zeros(8)

        @pytest.mark.readonly_buffer("data")
        def test_marked(data):
            data[0] = 1

        def test_fixture_only(guarded_buffer):
            guarded_buffer(8)[0] = 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_marked*FAILED*", "*test_fixture_only*reported*"])


def test_marker_help_is_the_signature_written_out() -> None:
    """The --markers line start-up says is the one readonly_buffer's signature gives."""
    from pytest_uffd_guard.marker import marker_help
    from pytest_uffd_guard.state import MARKER_HELP

    assert marker_help() == MARKER_HELP


def test_marker_help_and_strict_markers(pytester: pytest.Pytester) -> None:
    """The marker is registered (--strict-markers passes) and documents itself in --markers."""
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        ["@pytest.mark.readonly_buffer(*argnames, allow=(), inplace=False): Swap the named*"]
    )
