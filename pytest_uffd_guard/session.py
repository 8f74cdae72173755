"""The session's engine as the plugin words it: the engine line of the
header, the skip reason, the JSON's engine fields.  Every answer is
``engines.choose_engine``'s.  And what the fault handler of this process
survived, for the summary.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import pytest

from .settings import ENGINE_OPTION
from .state import UNAVAILABLE_PREFIX, settings_key

if TYPE_CHECKING:
    from .engines import EngineChoice

#: Added to the skip reason when the default engine finds no userfaultfd.
DIFF_HINT = f"or run with {ENGINE_OPTION}=diff to compare bytes instead (weaker: see docs)"


def engine_request(config: pytest.Config) -> str:
    """The engine the plugin asks GuardedBuffer for (``--uffd-engine``).

    What it resolves to is ``engines.choose_engine``'s answer, the same for
    the skip (``manager.Manager._check_available``), the header and the JSON: where
    nothing can track, guarded tests are skipped; diffing runs only when
    asked for by name.
    """
    return config.stash[settings_key].engine


def engine_choice(config: pytest.Config) -> tuple[str, str]:
    """The session's engine and why, for the JSON header: the engine that
    runs, or "none" with the skip's own message when nothing can.

    A two-field view of ``engines.choose_engine`` kept for the JSON writer;
    new code should read the ``EngineChoice`` (``choose_engine(...).as_dict()``).
    """
    from .engines import choose_engine

    choice = choose_engine(engine_request(config))
    if choice.usable:
        return choice.engine, choice.reason
    fate = "errors" if config.stash[settings_key].require else "skipped"
    return choice.runs, f"guarded tests are {fate}: {unavailable_message(choice)}"


def unavailable_message(choice: EngineChoice) -> str:
    """One line: why guarded buffers cannot be tracked and what to change
    (the skip reason, and the JSON's when nothing runs)."""
    text = f"{UNAVAILABLE_PREFIX}: {choice.reason}"
    if choice.remedy:
        text += f"; fix: {choice.remedy}"
    if not choice.misuse:
        text += f"; {DIFF_HINT}"
    return " ".join(text.split())


def handler_summary() -> list[str]:
    """Lines for the end of the session: the fault handler's unexpected
    event and last warning in this process ([] when none, issue 10)."""
    if "pytest_uffd_guard.kernel.handler" not in sys.modules:
        return []  # no buffer was ever guarded here: nothing to ask
    from . import report
    from .doctor_checks import handler_state

    state = handler_state()
    return [] if state is None else report.handler_lines(state)


def engine_lines(config: pytest.Config) -> list[str]:
    """The engine line (and with -v the details): what runs, on which kernel,
    what is missing, all from ``engines.choose_engine``."""
    from .engines import choose_engine
    from .kernel.capabilities import capabilities

    caps = capabilities()
    settings = config.stash[settings_key]
    requested = engine_request(config)
    choice = choose_engine(requested, caps=caps)
    kernel = caps.kernel or caps.platform
    verbose = config.get_verbosity() > 0
    if not choice.usable:
        fate = "errors" if settings.require else "skipped"
        lines = [
            f"uffd-guard: engine {requested}, kernel {kernel}, UNAVAILABLE "
            f"(guarded tests are {fate}): {choice.reason}"
        ]
        if verbose and choice.remedy:
            lines.append(f"uffd-guard: fix: {choice.remedy}")
        return lines
    missing = ", ".join(f"{m.feature} (Linux {m.since})" for m in caps.missing) or "nothing"
    engine = choice.engine if requested == choice.engine else f"{choice.engine} ({requested})"
    line = f"uffd-guard: engine {engine}, kernel {kernel}, missing: {missing}; {choice.summary}"
    if settings.stacks is not None:
        line += f"; writer named for the first {settings.stacks} writes per buffer"
    lines = [line]
    if verbose:
        lines.append(f"uffd-guard: engine choice: {choice.reason}")
        lines.append(f"uffd-guard: kernel writes (readinto, recv_into): {choice.kernel_writes}")
        if choice.remedy:
            lines.append(f"uffd-guard: fix: {choice.remedy}")
        if caps.available:
            reach = "reach" if caps.kernel_writes_seen else "never reach (user-mode only)"
            lines.append(
                f"uffd-guard: opened by {caps.open_method}, kernel writes {reach} a "
                "write-protect handler, features: "
                + ", ".join(name for name, on in caps.features.items() if on)
            )
        for m in caps.missing:
            lines.append(f"uffd-guard: without {m.feature}: {m.consequence}")
        mode = "report only" if settings.report_only else "fail on writes"
        lines.append(f"uffd-guard: mode: {mode}, require: {settings.require}")
    return lines
