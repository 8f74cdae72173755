"""pytest plugin: fail tests that write into buffers meant to be read-only.

Registered through the ``pytest11`` entry point.  It offers the
``guarded_buffer`` fixture, the ``readonly_buffer`` marker, the
``--uffd-report`` and ``--uffd-require`` options, a header line and the
``pytest_uffd_*`` hooks (see ``hookspecs.py``).

This module is glue: buffers come from ``guard.py`` (imported lazily, so
that loading the plugin opens no file descriptor, starts no thread and
imports neither ctypes nor numpy), tables and JSON from ``report.py``,
settings from ``settings.py``.

After each test phase (setup, call, teardown) the plugin harvests every
buffer the test guards: records and changed bytes become plain-data
findings attached to that phase's report, and the buffer is re-armed so the
next phase starts clean.  Only findings of the call phase can fail a test.
"""

from __future__ import annotations

import sys
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from . import harvest, report
from .fixture import GuardedBufferFactory, guarded_buffer, new_buffer
from .jsonfile import JSON_FAILED, JSON_WRITTEN, check_path, os_error_text, write_json
from .marker import (
    BAD_MARKER,
    MARKER,
    UNGUARDABLE,
    UNKNOWN_ARGUMENT,
    Unguardable,
    guarded_copy,
    marked_arguments,
    marker_help,
    release,
)
from .report import Finding
from .settings import (
    DOCTOR_HELP,
    DOCTOR_OPTION,
    ENGINE_HELP,
    ENGINE_INI,
    ENGINE_OPTION,
    NO_REQUIRE_HELP,
    NO_REQUIRE_OPTION,
    REPORT_HELP,
    REPORT_INI,
    REPORT_OPTION,
    REQUIRE_HELP,
    REQUIRE_INI,
    REQUIRE_OPTION,
    STACKS_HELP,
    STACKS_INI,
    STACKS_OPTION,
    Settings,
    SettingsError,
    resolve,
)
from .state import (
    FIXTURE,
    REQUIRED_SUFFIX,
    UNAVAILABLE_PREFIX,
    Entry,
    is_worker,
    item_state,
    item_state_key,
    settings_key,
)
from .verdict import Range

if TYPE_CHECKING:
    from .guard import GuardedBuffer
    from .records import WriteRecord
    from .tracking import EngineChoice

__all__ = [
    "BAD_MARKER",
    "UNGUARDABLE",
    "UNKNOWN_ARGUMENT",
    "GuardedBufferFactory",
    "guarded_buffer",
]

#: In-place watches (the marker's inplace=, uffd_readonly_fixtures, uffd_watch).
pytest_plugins = ["pytest_uffd_guard.watchplugin"]

#: Name of the manager object in pytest's plugin manager.
MANAGER_NAME = "uffd_guard_manager"

manager_key = pytest.StashKey["Manager"]()

#: Added to a test that failed with EFAULT while the uffd is user-mode only.
EFAULT_HINT = (
    "a system call failed with EFAULT (errno 14) on a guarded buffer: this userfaultfd "
    "handles user-mode faults only, so writes made by the kernel (readinto, recv_into, "
    "os.readv) into write-protected pages fail instead of being recorded"
)

#: Status letter and word of a test failed by writes.
STATUS_LETTER = "W"
STATUS_WORD = "WRITTEN"

#: Added to the skip reason when the default engine finds no userfaultfd.
DIFF_HINT = f"or run with {ENGINE_OPTION}=diff to compare bytes instead (weaker: see docs)"


def engine_request(config: pytest.Config) -> str:
    """The engine the plugin asks GuardedBuffer for (``--uffd-engine``).

    What it resolves to is ``tracking.choose_engine``'s answer, the same for
    the skip (``Manager._check_available``), the header and the JSON: where
    nothing can track, guarded tests are skipped; diffing runs only when
    asked for by name.
    """
    return config.stash[settings_key].engine


def engine_choice(config: pytest.Config) -> tuple[str, str]:
    """The session's engine and why, for the JSON header: the engine that
    runs, or "none" with the skip's own message when nothing can.

    A two-field view of ``tracking.choose_engine`` kept for the JSON writer;
    new code should read the ``EngineChoice`` (``choose_engine(...).as_dict()``).
    """
    from .tracking import choose_engine

    choice = choose_engine(engine_request(config))
    if choice.usable:
        return choice.engine, choice.reason
    fate = "errors" if config.stash[settings_key].require else "skipped"
    return choice.runs, f"guarded tests are {fate}: {unavailable_message(choice)}"


def engine_name(config: pytest.Config) -> str:
    """The engine in use, as shown to users: "sync (auto)", "diff"."""
    from .tracking import choose_engine

    requested = engine_request(config)
    engine = choose_engine(requested).runs
    return engine if requested == engine else f"{engine} ({requested})"


def unavailable_message(choice: EngineChoice) -> str:
    """One line: why guarded buffers cannot be tracked and what to change
    (the skip reason, and the JSON's when nothing runs)."""
    text = f"{UNAVAILABLE_PREFIX}: {choice.reason}"
    if choice.remedy:
        text += f"; fix: {choice.remedy}"
    if not choice.misuse:
        text += f"; {DIFF_HINT}"
    return " ".join(text.split())


# ------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("uffd-guard", "Guarded buffers (userfaultfd write-protection)")
    group.addoption(
        REPORT_OPTION,
        dest="uffd_report",
        nargs="?",
        const="term",
        default=None,
        metavar="TARGETS",
        help=REPORT_HELP,
    )
    group.addoption(
        REQUIRE_OPTION,
        dest="uffd_require",
        action="store_const",
        const=True,
        default=None,
        help=REQUIRE_HELP,
    )
    group.addoption(
        NO_REQUIRE_OPTION,
        dest="uffd_require",
        action="store_const",
        const=False,
        help=NO_REQUIRE_HELP,
    )
    group.addoption(
        ENGINE_OPTION, dest="uffd_engine", default=None, metavar="ENGINE", help=ENGINE_HELP
    )
    group.addoption(STACKS_OPTION, dest="uffd_stacks", default=None, metavar="N", help=STACKS_HELP)
    group.addoption(DOCTOR_OPTION, dest="uffd_doctor", action="store_true", help=DOCTOR_HELP)
    parser.addini(REPORT_INI, REPORT_HELP, type="string", default="")
    parser.addini(REQUIRE_INI, REQUIRE_HELP, type="bool", default=False)
    parser.addini(ENGINE_INI, ENGINE_HELP, type="string", default="")
    parser.addini(STACKS_INI, STACKS_HELP, type="string", default="")


def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--uffd-doctor``: print the machine's report and exit."""
    if not config.getoption("uffd_doctor"):
        return None
    from .doctor import diagnose, render

    report_ = diagnose()
    sys.stdout.write(render(report_))
    sys.stdout.flush()
    return 0 if report_.ok else 1


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def get_settings(config: pytest.Config) -> Settings:
    try:
        return resolve(
            cli_report=config.getoption("uffd_report"),
            ini_report=config.getini(REPORT_INI),
            cli_require=config.getoption("uffd_require"),
            ini_require=config.getini(REQUIRE_INI),
            invocation_dir=config.invocation_params.dir,
            ini_dir=config.inipath.parent if config.inipath else config.rootpath,
            cli_engine=config.getoption("uffd_engine"),
            ini_engine=config.getini(ENGINE_INI),
            cli_stacks=config.getoption("uffd_stacks"),
            ini_stacks=config.getini(STACKS_INI),
        )
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", marker_help())
    settings = get_settings(config)
    if settings.report_json is not None and not is_worker(config):
        try:
            check_path(settings.report_json, settings.report_json_source)
        except SettingsError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[settings_key] = settings
    manager = Manager(config, settings)
    config.stash[manager_key] = manager
    config.pluginmanager.register(manager, MANAGER_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    if manager_key in config.stash:
        config.pluginmanager.unregister(config.stash[manager_key], MANAGER_NAME)
        del config.stash[manager_key]
    if settings_key in config.stash:
        del config.stash[settings_key]


def pytest_report_header(config: pytest.Config) -> list[str]:
    from .probe import capabilities
    from .tracking import choose_engine

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    # After the fixtures: their values are what the marker swaps.
    state = item.stash.get(item_state_key, None)
    if state is not None and state.marked:
        item.config.stash[manager_key].swap(item)
    return result


# ------------------------------------------------------------ manager


class Manager:
    """Holds the run's findings; its methods are the plugin's hooks."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.findings: list[Finding] = []
        #: Where the JSON report was written, or why it could not be.
        self.json_written: Path | None = None
        self.json_error: str | None = None

    # -- setup: availability, marker swap

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        # A plain hook, not a wrapper: skipping or failing here must leave the
        # other plugins' setup wrappers (logging, capture) balanced.
        marked = marked_arguments(item) if item.get_closest_marker(MARKER) else []
        if marked or FIXTURE in getattr(item, "fixturenames", ()):
            self._check_available()
        if marked:
            item_state(item).marked = marked

    def _check_available(self) -> None:
        from .tracking import choose_engine

        choice = choose_engine(engine_request(self.config))
        if choice.usable:
            return
        message = unavailable_message(choice)
        if self.settings.require:
            pytest.fail(f"{message} {REQUIRED_SUFFIX}", pytrace=False)
        pytest.skip(message)

    def swap(self, item: pytest.Item) -> None:
        """Give the test guarded copies of the arguments its markers name."""
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        state = item_state(item)
        for arg in state.marked:
            if arg.inplace:  # watched in its own memory: watchplugin.py
                continue
            value = funcargs[arg.argname]
            problem: str | None = None
            try:
                buffer, view = guarded_copy(
                    value, arg.argname, lambda source, name: new_buffer(item, source, name)
                )
            except Unguardable as exc:
                problem = str(exc)
            if problem is not None:  # outside the except: no chained traceback
                pytest.fail(problem, pytrace=False)
            try:
                allow = tuple(report.normalize_range(a, len(buffer)) for a in arg.allow)
            except ValueError as exc:
                buffer.close()
                pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=exc), pytrace=False)
            state.entries.append(
                Entry(
                    buffer=buffer,
                    readonly=True,
                    origin=f"{MARKER}:{arg.argname}",
                    from_marker=True,
                    allow=allow,
                    element=harvest.element_of(view),
                )
            )
            state.swapped[arg.argname] = value
            state.views[arg.argname] = view
            funcargs[arg.argname] = view

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            self._restore(item)

    def _restore(self, item: pytest.Item) -> None:
        state = item.stash.get(item_state_key, None)
        if state is None:
            return
        funcargs: dict[str, Any] | None = getattr(item, "funcargs", None)
        for argname, original in state.swapped.items():
            if funcargs is not None:
                funcargs[argname] = original
        state.swapped.clear()
        for view in state.views.values():
            release(view)
        state.views.clear()
        for entry in state.entries:
            entry.buffer.close()

    # -- after each phase: harvest, judge, report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        findings = self.harvest(item, call.when)
        item.user_properties.extend(report.property_items(findings))
        rep = yield
        if rep.failed and call.excinfo is not None and self._user_mode_efault(item, call):
            rep.sections.append((f"{report.SECTION_TITLE}: hint", self._efault_hint()))
        if not findings:
            return rep
        rep.uffd_guard = [f.to_dict() for f in findings]  # type: ignore[attr-defined]
        # A failed call also shows what setup wrote: it is often the cause.
        shown = findings
        if call.when == "call":
            shown = [f for f in item_state(item).findings if f.phase == "setup"] + findings
        item_state(item).findings.extend(findings)
        verbose = self.config.get_verbosity() > 0
        rep.sections.append(
            (
                f"{report.SECTION_TITLE} ({call.when})",
                report.finding_section(
                    shown, None if verbose else report.ROW_LIMIT, full_stacks=verbose
                ),
            )
        )
        if call.when == "call" and any(f.failed for f in findings) and rep.passed:
            rep.outcome = "failed"
            rep.longrepr = report.failure_sentence(findings)
            rep.uffd_guard_failed = True  # type: ignore[attr-defined]
        return rep

    def _user_mode_efault(self, item: pytest.Item, call: pytest.CallInfo[None]) -> bool:
        """Did the test fail with EFAULT from a kernel write our engine broke?

        Only the sync phase (sync, hybrid) of a user-mode-only userfaultfd
        does that; auto never picks it there (``tracking.choose_engine``).
        """
        import errno

        state = item.stash.get(item_state_key, None)
        excinfo = call.excinfo
        if not state or not state.entries or excinfo is None:
            return False
        if not (isinstance(excinfo.value, OSError) and excinfo.value.errno == errno.EFAULT):
            return False
        from .probe import capabilities

        if not capabilities().user_mode_only:
            return False
        return any(
            getattr(entry.buffer, "engine", None) in ("sync", "hybrid") for entry in state.entries
        )

    def _efault_hint(self) -> str:
        from .probe import KERNEL_WRITES_REMEDY
        from .tracking import choose_engine

        auto = choose_engine("auto")
        return (
            f"{EFAULT_HINT}.\nThe {engine_request(self.config)} engine was asked for by name "
            f"({ENGINE_OPTION} / {ENGINE_INI}); auto runs {auto.runs} here "
            f"({auto.summary}).\nFix: {ENGINE_OPTION}=auto; or {KERNEL_WRITES_REMEDY}; "
            "or fill the buffer inside `with buf.unprotected():`"
        )

    def harvest(self, item: pytest.Item, phase: str) -> list[Finding]:
        """Collect what each guarded buffer saw since the last harvest, then
        re-arm it so the next phase starts from a clean baseline."""
        state = item.stash.get(item_state_key, None)
        if state is None:
            return []
        findings = []
        for entry in state.entries:
            if entry.done:
                continue
            buffer = entry.buffer
            closed = buffer.closed
            records = buffer.writes
            overflowed = buffer.overflowed
            stopped = buffer.stopped_reason
            if closed:
                entry.done = True
            new_stop = stopped if stopped != entry.stopped_seen else None
            entry.stopped_seen = stopped
            finding = self.judge(item, entry, phase, records, overflowed, new_stop)
            if finding is None:
                continue
            findings.append(finding)
            if not closed and buffer.tracking:
                buffer.protect()
        return findings

    def judge(
        self,
        item: pytest.Item,
        entry: Entry,
        phase: str,
        records: list[WriteRecord],
        overflowed: int,
        stopped: str | None,
    ) -> Finding | None:
        """Give each write and changed run its status (``harvest.judge``,
        linear in both) and call our hooks; None when nothing happened."""
        hook = self.config.hook
        rules = harvest.Rules(
            readonly=entry.readonly,
            enforced=entry.readonly
            and phase == "call"
            and (entry.from_marker or not self.settings.report_only),
            allow=entry.allow,
            element=entry.element,
        )
        buffer = entry.buffer

        def ask(record: WriteRecord, changes: list[Range]) -> bool | None:
            return hook.pytest_uffd_write_allowed(  # type: ignore[no-any-return]
                config=self.config,
                item=item,
                buffer=buffer,
                record=record,
                changes=changes,
                phase=phase,
            )

        def tell(record: WriteRecord, status: str) -> None:
            hook.pytest_uffd_write(
                config=self.config,
                item=item,
                buffer=buffer,
                record=record,
                phase=phase,
                status=status,
            )

        # Asking costs a hook call and the page's runs per write: skip it
        # when only our own implementation would answer, and it has no allow=.
        others = [i for i in hook.pytest_uffd_write_allowed.get_hookimpls() if i.plugin is not self]
        finding = harvest.judge(
            buffer,
            records,
            rules,
            ask if others or entry.allow else None,
            tell if hook.pytest_uffd_write.get_hookimpls() else None,
            overflowed,
            stopped,
            nodeid=item.nodeid,
            phase=phase,
            origin=entry.origin,
            test_file=str(item.path),
        )
        if not records and not finding.n_changes and not overflowed and stopped is None:
            return None
        return finding

    @pytest.hookimpl(trylast=True)
    def pytest_uffd_write_allowed(
        self, item: pytest.Item, buffer: GuardedBuffer, record: WriteRecord, changes: list[Range]
    ) -> bool | None:
        # trylast: a conftest's answer comes first and wins.
        state = item.stash.get(item_state_key, None)
        entry = next((e for e in state.entries if e.buffer is buffer), None) if state else None
        if entry is None or not entry.allow:
            return None
        return harvest.allowed_by_ranges(record, changes, entry.allow)

    # -- reports: status letter, collection, session summary

    def pytest_report_teststatus(
        self, report: pytest.TestReport
    ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        if report.when == "call" and getattr(report, "uffd_guard_failed", False):
            return "failed", STATUS_LETTER, (STATUS_WORD, {"red": True})
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        # On the xdist controller the worker's findings arrive here as plain
        # data on the report, so the session report sees every worker.
        for data in getattr(report, "uffd_guard", None) or ():
            self.findings.append(Finding.from_dict(data))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if is_worker(self.config):
            return
        if self.settings.report_terminal:
            limit = None if self.config.get_verbosity() > 0 else report.SUMMARY_ROWS
            terminalreporter.write_sep("=", report.SUMMARY_TITLE)
            for line in report.summary_lines(self.findings, limit):
                terminalreporter.write_line(line)
        if self.json_error is not None:
            terminalreporter.write_line(self.json_error, red=True, bold=True)
        elif self.json_written is not None:
            terminalreporter.write_line(JSON_WRITTEN.format(path=self.json_written))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.settings.report_json
        if path is None or is_worker(self.config):
            return
        from .probe import capabilities

        caps = capabilities()
        engine, why = engine_choice(self.config)
        header = {
            "engine": engine,
            "engine_reason": why,
            "kernel": caps.kernel,
            "available": caps.available,
            "capabilities": caps.as_dict(),
        }
        try:
            write_json(path, report.json_document(self.findings, header))
        except OSError as exc:
            # Issue 9, item 12: a clear line in the summary and a failing
            # exit code, not a traceback that hides the test results.
            self.json_error = JSON_FAILED.format(path=path, error=os_error_text(exc))
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        else:
            self.json_written = path
