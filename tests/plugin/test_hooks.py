"""The pytest_uffd_* hooks (issue 3, point 5)."""

from __future__ import annotations

import pytest

from tests.conftest import exact_address, expected_offset

pytestmark = pytest.mark.needs_uffd


def test_write_hook_called_for_every_write(pytester: pytest.Pytester) -> None:
    """pytest_uffd_write sees item, buffer, record, phase and status for each write."""
    pytester.makeconftest(
        """
        seen = []

        def pytest_uffd_write(item, buffer, record, phase, status):
            seen.append((item.name, buffer.name, record.offset, phase, status))

        def pytest_sessionfinish(session):
            for row in seen:
                print("SEEN", *row)
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def buf(guarded_buffer):
            b = guarded_buffer(3 * 4096, name="b")
            b[0] = 1
            return b

        def test_pages(buf):
            buf[4096] = 1
            buf[8192 + 7] = 1
        """
    )
    result = pytester.runpytest_subprocess("-s", "--uffd-report")
    result.stdout.fnmatch_lines(
        [
            "*SEEN test_pages b 0 setup reported",
            "SEEN test_pages b 4096 call reported",
            f"SEEN test_pages b {expected_offset(8199)} call reported",
        ]
    )


def test_allowed_hook_declares_writes_allowed(pytester: pytest.Pytester) -> None:
    """A firstresult pytest_uffd_write_allowed returning True lets a write pass."""
    pytester.makeconftest(
        """
        def pytest_uffd_write_allowed(buffer, record, changes):
            if buffer.name == "cache":
                return True
            return None
        """
    )
    pytester.makepyfile(
        """
        def test_cache(guarded_buffer):
            guarded_buffer(16, name="cache")[3] = 1

        def test_other(guarded_buffer):
            guarded_buffer(16, name="other")[3] = 1
        """
    )
    result = pytester.runpytest_subprocess("-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_cache PASSED*", "*test_other WRITTEN*"])


def test_allowed_hook_can_forbid_inside_allow_range(pytester: pytest.Pytester) -> None:
    """Returning False beats the marker's allow=: conftest hooks run before ours."""
    if not exact_address():
        pytest.skip(
            "the hook tells writes apart by byte: needs UFFD_FEATURE_EXACT_ADDRESS (Linux 5.18+)"
        )
    pytester.makeconftest(
        """
        def pytest_uffd_write_allowed(record, phase):
            assert phase == "call"
            return False if record.offset == 1 else None
        """
    )
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def data():
            return memoryview(bytearray(8))

        @pytest.mark.readonly_buffer("data", allow=slice(0, 4))
        def test_forbidden(data):
            data[1] = 1

        @pytest.mark.readonly_buffer("data", allow=slice(0, 4))
        def test_allowed(data):
            data[2] = 1
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["WRITTEN*test_forbidden*"])
