"""Flat-field calibration of a 64 x 64 sensor."""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence

WIDTH = 64


def calibrate(
    frame: Sequence[float], gains: MutableSequence[float], hot_pixels: Sequence[tuple[int, int]]
) -> list[float]:
    """``frame`` times the per-pixel ``gains``, with the hot pixels zeroed.

    BUG: zeroes the hot pixels in ``gains`` (shared by the whole session)
    instead of in the result.  The fix: build the result first, then zero
    ``out[row * WIDTH + col]``.
    """
    for row, col in hot_pixels:
        gains[row * WIDTH + col] = 0.0  # writes into the caller's gains
    return [value * gain for value, gain in zip(frame, gains)]
