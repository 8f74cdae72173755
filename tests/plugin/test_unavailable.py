"""Machines without userfaultfd write-protection (issue 3, point 8)."""

from __future__ import annotations

import pytest

from pytest_uffd_guard.plugin import REQUIRED_SUFFIX, UNAVAILABLE_PREFIX

GUARDED_TESTS = """
    import pytest

    def test_fixture(guarded_buffer):
        guarded_buffer(8)

    @pytest.fixture
    def data():
        return memoryview(bytearray(8))

    @pytest.mark.readonly_buffer("data")
    def test_marker(data):
        pass

    def test_plain():
        pass
"""


@pytest.fixture
def no_uffd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a kernel without write-protection in the inner run."""
    monkeypatch.setenv("PYTEST_UFFD_GUARD_HIDE_FEATURES", "pagefault_flag_wp")


@pytest.mark.usefixtures("no_uffd")
def test_guarded_tests_skipped_with_reason(pytester: pytest.Pytester) -> None:
    """Fixture and marker tests are skipped with a one-line reason and a fix; others run."""
    pytester.makepyfile(GUARDED_TESTS)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "uffd-guard: engine auto, kernel *, UNAVAILABLE (guarded tests are skipped)*",
            f"SKIPPED [[]2[]] *: {UNAVAILABLE_PREFIX}: this kernel has no userfaultfd "
            "write-protection*; fix: run on Linux 5.7 or newer*",
        ]
    )


@pytest.mark.usefixtures("no_uffd")
def test_require_option_makes_errors(pytester: pytest.Pytester) -> None:
    """--uffd-require turns the skips into errors, for CI that must enforce."""
    pytester.makepyfile(GUARDED_TESTS)
    result = pytester.runpytest_subprocess("--uffd-require")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([f"*{UNAVAILABLE_PREFIX}: *{REQUIRED_SUFFIX}*"])


@pytest.mark.usefixtures("no_uffd")
def test_require_ini_and_cli_override(pytester: pytest.Pytester) -> None:
    """uffd_require = true in the ini file errors; --uffd-no-require wins over it."""
    pytester.makeini("[pytest]\nuffd_require = true\n")
    pytester.makepyfile(GUARDED_TESTS)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, errors=2)
    result = pytester.runpytest_subprocess("--uffd-no-require")
    result.assert_outcomes(passed=1, skipped=2)


@pytest.mark.usefixtures("no_uffd")
def test_dynamic_fixture_request_is_skipped_too(pytester: pytest.Pytester) -> None:
    """A buffer asked for through request.getfixturevalue is skipped too, never passing."""
    pytester.makepyfile(
        """
        def test_dynamic(request):
            factory = request.getfixturevalue("guarded_buffer")
            factory(8)
            raise AssertionError("not reached")
        """
    )
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines([f"*{UNAVAILABLE_PREFIX}*"])
