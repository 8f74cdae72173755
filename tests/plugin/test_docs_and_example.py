"""The docs build and the example project catches its bug (issue 3, point 9)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_uffd_guard.settings import NO_REQUIRE_OPTION, REPORT_INI, REPORT_OPTION, REQUIRE_INI

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """mkdocs build --strict succeeds (the nav lists every page, links resolve)."""
    pytest.importorskip("mkdocs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_configuration_page_lists_every_setting() -> None:
    """The configuration reference names every option and ini key."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    for name in (REPORT_OPTION, NO_REQUIRE_OPTION, REPORT_INI, REQUIRE_INI):
        assert name in text


@pytest.mark.needs_uffd
def test_example_project_catches_the_bug(pytester: pytest.Pytester) -> None:
    """pytest examples/ shows the in-place parser as two WRITTEN failures."""
    for name in ("csvparse.py", "test_csvparse.py"):
        shutil.copy(ROOT / "examples" / name, pytester.path / name)
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["csv_bytes*call*8*1*0d → 0a*forbidden*"])
