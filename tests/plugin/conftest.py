"""Shared setup of the plugin's tests.

Tests that need a working userfaultfd (the inner runs must really guard
memory) carry ``@pytest.mark.needs_uffd`` and are skipped elsewhere, with the
probe's reason.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs_uffd: the test needs userfaultfd write-protection")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_uffd") is None:
        return
    from pytest_uffd_guard import capabilities

    caps = capabilities()
    if not caps.available:
        pytest.skip(f"userfaultfd write-protection unavailable: {caps.reason}")
