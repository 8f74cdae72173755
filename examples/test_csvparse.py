"""Tests that catch csvparse writing into its input (run: pytest examples/)."""

from __future__ import annotations

import pytest
from csvparse import parse_rows, stamp_header

DATA = b"name,qty\r\napple,3\r\npear,5\r\n"


@pytest.fixture
def csv_bytes() -> memoryview:
    return memoryview(bytearray(DATA))


def test_parse_unguarded(csv_bytes: memoryview) -> None:
    """Passes: the result is right, and nobody looks at the input."""
    assert parse_rows(csv_bytes) == [["name", "qty"], ["apple", "3"], ["pear", "5"]]


@pytest.mark.readonly_buffer("csv_bytes")
def test_parse_leaves_input_alone(csv_bytes: memoryview) -> None:
    """Fails: the marker swaps csv_bytes for a guarded copy and sees the writes."""
    assert parse_rows(csv_bytes)[1] == ["apple", "3"]


def test_parse_with_fixture(guarded_buffer) -> None:  # type: ignore[no-untyped-def]
    """Fails: the same bug caught with a buffer made by the fixture."""
    frame = guarded_buffer(DATA, name="csv")
    parse_rows(memoryview(frame))


def test_header_slot_is_an_output_map(guarded_buffer) -> None:  # type: ignore[no-untyped-def]
    """Passes: readonly=False records which bytes the code writes."""
    out = guarded_buffer(64, name="out", readonly=False)
    stamp_header(memoryview(out))
    assert [(c.offset, c.length) for c in out.changes()] == [(0, 1)]


@pytest.fixture
def record() -> memoryview:
    return memoryview(bytearray(16))


@pytest.mark.readonly_buffer("record", allow=[slice(0, 4)])
def test_header_may_be_stamped(record: memoryview) -> None:
    """Passes: bytes 0-3 are allowed; the write is still reported."""
    stamp_header(record)
