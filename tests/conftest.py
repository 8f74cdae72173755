"""Shared test helpers: run Python in a fresh process, skip without userfaultfd."""

from __future__ import annotations

import functools
import mmap
import os
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from pytest_uffd_guard import capabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Multiplies every test time bound (every timeout marker, the ini default
#: and ``run_python``'s subprocess timeout).  tools/run-on-kernel sets it in
#: its emulated (TCG) guests, where everything runs 5-50 times slower; a bound
#: always exists.
TIME_SCALE = max(1.0, float(os.environ.get("UFFD_GUARD_TEST_TIME_SCALE", "1") or 1))


class _Scaled(float):
    """A bound that ``bound()`` already scaled (never scaled twice)."""


def bound(seconds: float) -> float:
    """A time bound for a test, scaled by ``UFFD_GUARD_TEST_TIME_SCALE``."""
    return _Scaled(seconds * TIME_SCALE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under emulation, scale the timeout markers written as plain numbers and
    the ini default like ``bound()``: pytest-timeout's thread method ends the
    whole session at the first expiry (seen on 5.10 under TCG)."""
    if TIME_SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is None:
            if default > 0:
                item.add_marker(pytest.mark.timeout(bound(default)), append=False)
            continue
        seconds = marker.args[0] if marker.args else marker.kwargs.get("timeout")
        if isinstance(seconds, (int, float)) and seconds > 0 and not isinstance(seconds, _Scaled):
            kwargs = {k: v for k, v in marker.kwargs.items() if k != "timeout"}
            item.add_marker(
                pytest.mark.timeout(bound(seconds), *marker.args[1:], **kwargs), append=False
            )


def exact_address() -> bool:
    """Whether writes are reported at their exact byte (UFFD_FEATURE_EXACT_ADDRESS, 5.18+)."""
    return capabilities().has("exact_address")


def expected_offset(offset: int) -> int:
    """Where a write at ``offset`` is reported here: the byte itself with
    UFFD_FEATURE_EXACT_ADDRESS (Linux 5.18+), else the start of its page
    (with ``exact=False``), as documented."""
    return offset if exact_address() else offset - offset % mmap.PAGESIZE


def expected_write(offset: int) -> tuple[int, bool]:
    """``(offset, exact)`` of the record a write at ``offset`` gives here."""
    return expected_offset(offset), exact_address()


#: Put on the (empty) first line of a child's code by ``sync_engine_code``:
#: where the userfaultfd is user-mode only, ``auto`` runs async or diff, so
#: tests of the sync engine's own behaviour (exact offsets, writer names,
#: stacks) ask for it by name; it still records every user-mode write there.
SYNC_PREAMBLE = (
    "import functools as _ft, pytest_uffd_guard as _pug; "
    "_pug.GuardedBuffer = _ft.partial(_pug.GuardedBuffer, engine='sync') "
    "if _pug.capabilities().user_mode_only else _pug.GuardedBuffer"
)


def sync_engine_code(code: str) -> str:
    """``code`` (starting with a newline) with ``SYNC_PREAMBLE`` on its first
    line, so that its line numbers do not change."""
    code = textwrap.dedent(code)
    assert code.startswith("\n"), "the code must start with a newline"
    return SYNC_PREAMBLE + code


def sync_buffers(cls: Any) -> Any:
    """``GuardedBuffer`` for the tests of the sync engine: the class itself
    where ``auto`` runs sync, else a partial with ``engine='sync'`` (see
    ``SYNC_PREAMBLE``); an explicit ``engine=`` still wins."""
    if capabilities().user_mode_only:
        return functools.partial(cls, engine="sync")
    return cls


def sync_engine_args() -> tuple[str, ...]:
    """Arguments for an inner pytest run that checks what the sync engine
    shows (writer names, tids, stacks): ``--uffd-engine=sync`` where ``auto``
    would run async or diff (a user-mode-only userfaultfd), none elsewhere."""
    return ("--uffd-engine=sync",) if capabilities().user_mode_only else ()


def run_python(
    code: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    python: str = sys.executable,
    prefix: list[str] | None = None,
    sync_engine: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; never hangs past ``timeout``.

    ``sync_engine``: buffers made without ``engine=`` use the sync engine
    even where the userfaultfd is user-mode only (``sync_engine_code``).
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    source = sync_engine_code(code) if sync_engine else textwrap.dedent(code)
    return subprocess.run(
        [*(prefix or []), python, "-c", source],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=bound(timeout),
    )


@pytest.fixture(scope="session")
def uffd() -> None:
    """Skip unless this machine can guard memory (and say why)."""
    caps = capabilities()
    if not caps.available:
        pytest.skip(f"userfaultfd write-protect unavailable: {caps.reason}")
