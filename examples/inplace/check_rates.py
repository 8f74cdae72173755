"""watch() names the line that mutated shared memory (run: pytest examples/inplace).

Both bugs in ``rates.py`` pass their own test; they break *other* tests.
Watching the shared memory in place makes the offending test fail instead,
with the line that wrote.  ``watched`` is all it takes; issue 14's ini keys
(``uffd_watch``, ``uffd_readonly_fixtures``) do the same without editing tests.
"""

from __future__ import annotations

import array
from collections.abc import Iterator
from typing import Any

import pytest
from rates import RATES, apply_fees, convert

from pytest_uffd_guard import watch
from pytest_uffd_guard.stacks import describe_writer


def watched(obj: Any, name: str) -> Iterator[Any]:
    """Watch ``obj`` while the test runs; fail naming each writer."""
    with watch(obj, name=name) as w:
        yield obj
    if w.writes:
        lines = [f"offset {r.offset}: {describe_writer(r)}" for r in w.writes]
        pytest.fail(f"{name} was written in place:\n" + "\n".join(lines), pytrace=False)


@pytest.fixture
def rates() -> Iterator[array.array]:  # type: ignore[type-arg]
    yield from watched(RATES, "RATES")


@pytest.fixture(scope="session")
def fee_schedule() -> array.array:  # type: ignore[type-arg]
    return array.array("d", [0.5] * 2048)


@pytest.fixture
def fees(fee_schedule: array.array) -> Iterator[array.array]:  # type: ignore[type-arg]
    yield from watched(fee_schedule, "fee_schedule")


def test_convert(rates: array.array) -> None:  # type: ignore[type-arg]
    """Fails: convert rounds the cached table (rates.py, the line marked BUG)."""
    assert convert(100.0, "USD", 7) == pytest.approx(100.0 * 1.52)


def test_apply_fees(fees: array.array) -> None:  # type: ignore[type-arg]
    """Fails: apply_fees zeroes an entry of the session's fee schedule."""
    assert apply_fees([1.0, 2.0], fees) == [1.5, 2.5]
