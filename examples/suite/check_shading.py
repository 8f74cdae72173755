"""The cached-table bug: pytest.ini's ``uffd_watch = shading:GAMMA`` catches it."""

from __future__ import annotations

from shading import correct


def test_boosted_levels() -> None:
    """Fails (WRITTEN) with the line that wrote into the cached table; passes
    without the plugin, since the result is right."""
    assert correct([2048, 2048], boost=2.0) == [2 * (2048 / 4095) ** 2.2] * 2
