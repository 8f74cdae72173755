"""The example project's fixtures (and, being at its root, what puts its
modules on sys.path before pytest starts: pytest.ini's uffd_watch imports
``shading`` then)."""

from __future__ import annotations

import array

import pytest


@pytest.fixture(scope="session")
def gains() -> array.array[float]:
    """Per-pixel gains of the 64 x 64 sensor, loaded once for the session."""
    return array.array("d", [1.0]) * (64 * 64)
