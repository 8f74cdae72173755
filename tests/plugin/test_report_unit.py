"""report.py and settings.py as plain functions: no pytest run, no kernel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_uffd_guard import report, verdict
from pytest_uffd_guard.report import ALLOWED, FORBIDDEN, ChangeInfo, Finding, WriteInfo
from pytest_uffd_guard.settings import Settings, SettingsError, parse_report, resolve


def finding(**kw: object) -> Finding:
    base: dict[str, object] = {
        "nodeid": "t.py::test",
        "phase": "call",
        "buffer": "frame",
        "size": 4096,
        "origin": "guarded_buffer",
        "readonly": True,
        "writes": (WriteInfo(5, True, 42, "MainThread", FORBIDDEN),),
        "changes": (ChangeInfo(5, 3, "20776f", "58595a", FORBIDDEN),),
    }
    base.update(kw)
    return Finding(**base)  # type: ignore[arg-type]


def test_round_trip_through_plain_data() -> None:
    """to_dict survives JSON (and so xdist) and from_dict gives the same finding."""
    original = finding(allow=((0, 4),), overflowed=2, stopped="why")
    assert Finding.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_shorten_hex() -> None:
    """Long runs are cut to a few bytes with the count of the rest."""
    assert report.shorten_hex("00" * 3, 3) == "000000"
    assert report.shorten_hex("ab" * 32, 100, limit=2) == "abab… (+98 B)"


def test_covered_and_ranges() -> None:
    """Coverage joins adjacent ranges; slices and pairs normalise alike."""
    assert report.covered(2, 6, [(0, 4), (4, 8)])
    assert not report.covered(2, 9, [(0, 4), (4, 8)])
    assert verdict.normalize_range(slice(None, 4)) == (0, 4)
    assert verdict.normalize_range((-4, None), size=16) == (12, 16)
    with pytest.raises(ValueError, match="step"):
        verdict.normalize_range(slice(0, 4, 2))


def test_write_in_ranges() -> None:
    """A write is allowed when its offset and the page's changed bytes are inside."""
    assert verdict.write_in_ranges(2, True, [(2, 4)], 4096, [(0, 4)])
    assert not verdict.write_in_ranges(2, True, [(2, 6)], 4096, [(0, 4)])
    assert verdict.write_in_ranges(4096, False, [], 4096, [(5000, 5001)])


def test_failure_sentence_and_section() -> None:
    """The failure is one sentence plus a table with both runs and writes."""
    f = finding()
    assert report.failure_sentence([f]).startswith(
        f"{report.FAILURE_PREFIX}: 'frame' (1 write, 1 changed range)"
    )
    section = report.finding_section([f])
    assert "20776f → 58595a" in section and "MainThread (tid 42)" in section


def test_section_rows_are_bounded() -> None:
    """Without -v a long table ends with how many rows were left out."""
    many = tuple(ChangeInfo(i * 2, 1, "00", "01", ALLOWED) for i in range(30))
    section = report.finding_section([finding(changes=many)], limit=10)
    assert "...and 20 more changed ranges (use -v to see all)" in section


def test_settings_precedence(tmp_path: Path) -> None:
    """The command line wins over the ini file; relative paths follow their source."""
    settings = resolve("term", "json:a.json", None, "true", tmp_path / "cli", tmp_path / "ini")
    assert settings == Settings(
        report_terminal=True,
        report_json=None,
        require=True,
        report_json_source="from the command line (--uffd-report)",
    )
    settings = resolve(None, "json:a.json", False, "true", tmp_path / "cli", tmp_path / "ini")
    assert settings.report_json == tmp_path / "ini" / "a.json" and not settings.require
    assert settings.report_only


def test_settings_errors_name_value_and_source(tmp_path: Path) -> None:
    """Validators quote the bad value and say where it came from."""
    with pytest.raises(SettingsError, match=r"'html' from somewhere"):
        parse_report("html", "somewhere", tmp_path)
    with pytest.raises(
        SettingsError, match=r"invalid boolean 'maybe' from the ini key uffd_require"
    ):
        resolve(None, "", None, "maybe", tmp_path, tmp_path)
