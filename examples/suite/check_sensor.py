"""A polluting session fixture: passes alone, fails in the suite.

``test_gains_are_factory_values`` passes alone (``pytest examples/suite -k
factory``) and fails after ``test_calibrate``, which modifies the session's
``gains``.  ``pytest examples/suite --uffd-readonly-fixture gains`` fails
``test_calibrate`` too, with the line that wrote.
"""

from __future__ import annotations

from collections.abc import MutableSequence

from sensor import WIDTH, calibrate


def test_calibrate(gains: MutableSequence[float]) -> None:
    """Passes: the calibrated frame is right."""
    out = calibrate([10.0] * (WIDTH * WIDTH), gains, hot_pixels=[(40, 17)])
    assert out[40 * WIDTH + 17] == 0.0 and out[0] == 10.0


def test_gains_are_factory_values(gains: MutableSequence[float]) -> None:
    """Fails after test_calibrate: a gain is 0 now."""
    assert all(gain == 1.0 for gain in gains)
