"""Shared test helpers: run Python in a fresh process, skip without userfaultfd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pytest_uffd_guard import capabilities

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(
    code: str,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    python: str = sys.executable,
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; never hangs past ``timeout``."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*(prefix or []), python, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def uffd() -> None:
    """Skip unless this machine can guard memory (and say why)."""
    caps = capabilities()
    if not caps.available:
        pytest.skip(f"userfaultfd write-protect unavailable: {caps.reason}")
