"""A module with two bugs that only show up as other tests failing.

``RATES`` is a cached lookup table (currency -> rate, as doubles) shared by
every caller.  ``convert`` is right for the first call, but it "rounds" the
cached rate in place for the caller's precision, so every later call (and
every later test) sees the rounded table.  ``apply_fees`` is handed a
session-wide fee schedule and quietly zeroes an entry of it.
"""

from __future__ import annotations

import array

CURRENCIES = ("EUR", "USD", "GBP", "JPY", "CHF")

#: The cached table: 512 doubles per currency (one rate per hour of a
#: three-week window), so the table spans several memory pages.
RATES = array.array("d", [1.0 + 0.001 * i for i in range(512 * len(CURRENCIES))])


def convert(amount: float, currency: str, hour: int, digits: int = 2) -> float:
    index = CURRENCIES.index(currency) * 512 + hour
    RATES[index] = round(RATES[index], digits)  # BUG: rounds the cached table itself
    return amount * RATES[index]


def apply_fees(amounts: list[float], schedule: array.array) -> list[float]:  # type: ignore[type-arg]
    total = [a + schedule[i % len(schedule)] for i, a in enumerate(amounts)]
    schedule[len(schedule) // 2] = 0.0  # BUG: "consumes" a fee in the shared schedule
    return total
