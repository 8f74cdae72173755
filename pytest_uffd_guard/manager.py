"""The plugin's manager: one object per run, registered as a plugin, that
holds the run's findings; its methods are the hooks that harvest, judge and
report each test's guarded buffers.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .jsonfile import JSON_FAILED, JSON_WRITTEN
from .marker import BAD_MARKER, MARKER, Unguardable, guarded_copy, marked_arguments, release
from .session import engine_choice, engine_request, handler_summary, unavailable_message
from .settings import ENGINE_INI, ENGINE_OPTION, Settings
from .state import FIXTURE, REQUIRED_SUFFIX, Entry, is_worker, item_state, item_state_key

# Judging and reporting (harvest, report, verdict, findings) are imported by
# the methods that need them, when a test guarded something: a run with no
# guarded test never loads them (issue 11: start-up within 10 ms of
# ``-p no:uffd_guard``).
if TYPE_CHECKING:
    from .findings import Finding
    from .guard import GuardedBuffer
    from .inplace import Watch
    from .kernel.records import WriteRecord
    from .verdict import Range

#: Name of the manager object in pytest's plugin manager.
MANAGER_NAME = "uffd_guard_manager"

#: Added to a test that failed with EFAULT while the uffd is user-mode only.
EFAULT_HINT = (
    "a system call failed with EFAULT (errno 14) on a guarded buffer: this userfaultfd "
    "handles user-mode faults only, so writes made by the kernel (readinto, recv_into, "
    "os.readv) into write-protected pages fail instead of being recorded"
)

#: Status letter and word of a test failed by writes.
STATUS_LETTER = "W"
STATUS_WORD = "WRITTEN"


class Manager:
    """Holds the run's findings; its methods are the plugin's hooks."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        #: The engine asked for was usable once: it stays so for the run
        #: (choose_engine is not re-run for every guarded test).
        self._usable = False
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
        if self._usable:
            return
        from .engines import choose_engine

        choice = choose_engine(engine_request(self.config))
        if choice.usable:
            self._usable = True
            return
        message = unavailable_message(choice)
        if self.settings.require:
            pytest.fail(f"{message} {REQUIRED_SUFFIX}", pytrace=False)
        pytest.skip(message)

    @pytest.hookimpl(wrapper=True, specname="pytest_runtest_setup")
    def pytest_runtest_setup_swap(self, item: pytest.Item) -> Generator[None, None, None]:
        # A second pytest_runtest_setup (pytest reads only names that start
        # with pytest_): a wrapper, so that it runs after the fixtures, whose
        # values are what the marker swaps.
        result = yield
        state = item.stash.get(item_state_key, None)
        if state is not None and state.marked:
            self.swap(item)
        return result

    def swap(self, item: pytest.Item) -> None:
        """Give the test guarded copies of the arguments its markers name."""
        from . import harvest
        from .fixture import new_buffer
        from .verdict import normalize_range

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
                allow = tuple(normalize_range(a, len(buffer)) for a in arg.allow)
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
        if findings:
            from . import report

            item.user_properties.extend(report.property_items(findings))
        rep = yield
        if rep.failed and call.excinfo is not None and self._user_mode_efault(item, call):
            from .report import SECTION_TITLE

            rep.sections.append((f"{SECTION_TITLE}: hint", self._efault_hint()))
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
        does that; auto never picks it there.  Which engine breaks kernel
        writes is ``engines.choose_engine``'s answer (``kernel_writes``).
        """
        import errno

        state = item.stash.get(item_state_key, None)
        excinfo = call.excinfo
        if not state or not state.entries or excinfo is None:
            return False
        if not (isinstance(excinfo.value, OSError) and excinfo.value.errno == errno.EFAULT):
            return False
        from .engines import KERNEL_WRITES_BREAK, choose_engine
        from .names import ENGINES

        running = {getattr(entry.buffer, "engine", None) for entry in state.entries}
        return any(
            name in ENGINES and choose_engine(name).kernel_writes == KERNEL_WRITES_BREAK
            for name in running
        )

    def _efault_hint(self) -> str:
        from .engines import choose_engine
        from .kernel.capabilities import KERNEL_WRITES_REMEDY

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
        if state is None or not state.entries:
            return []
        findings = []
        for entry in state.entries:
            if entry.done:
                continue
            buffer = entry.buffer
            if entry.stopped_seen is None and buffer._quiet():
                # Nothing happened: what judge() would say, at a fifth of the cost.
                entry.done = buffer.closed
                continue
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
        records: Sequence[WriteRecord],
        overflowed: int,
        stopped: str | None,
    ) -> Finding | None:
        """Give each write and changed run its status (``harvest.judge``,
        linear in both) and call our hooks; None when nothing happened."""
        from . import harvest

        changes = harvest.ChangedRuns(entry.buffer)
        if not records and not changes.runs and not overflowed and stopped is None:
            return None  # the common case: nothing happened, nothing to ask
        hook = self.config.hook
        about = {"config": self.config, "item": item, "buffer": entry.buffer, "phase": phase}
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
            answer = hook.pytest_uffd_write_allowed(**about, record=record, changes=changes)
            return answer  # type: ignore[no-any-return]

        def tell(record: WriteRecord, status: str) -> None:
            hook.pytest_uffd_write(**about, record=record, status=status)

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
            changes=changes,
        )
        return finding

    @pytest.hookimpl(trylast=True)
    def pytest_uffd_write_allowed(
        self,
        item: pytest.Item,
        buffer: GuardedBuffer | Watch,
        record: WriteRecord,
        changes: list[Range],
    ) -> bool | None:
        # trylast: a conftest's answer comes first and wins.
        state = item.stash.get(item_state_key, None)
        entry = next((e for e in state.entries if e.buffer is buffer), None) if state else None
        if entry is None or not entry.allow:
            return None
        from . import harvest

        return harvest.allowed_by_ranges(record, changes, entry.allow, harvest.unit_of(buffer))

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
        found = getattr(report, "uffd_guard", None)
        if not found:
            return
        from .findings import Finding

        self.findings.extend(Finding.from_dict(data) for data in found)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if is_worker(self.config):
            return
        if self.settings.report_terminal:
            from . import report

            limit = None if self.config.get_verbosity() > 0 else report.SUMMARY_ROWS
            terminalreporter.write_sep("=", report.SUMMARY_TITLE)
            for line in report.summary_lines(self.findings, limit):
                terminalreporter.write_line(line)
        for line in handler_summary():
            terminalreporter.write_line(line, yellow=True)
        if self.json_error is not None:
            terminalreporter.write_line(self.json_error, red=True, bold=True)
        elif self.json_written is not None:
            terminalreporter.write_line(JSON_WRITTEN.format(path=self.json_written))

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.settings.report_json
        if path is None or is_worker(self.config):
            return
        from . import report
        from .jsonfile import os_error_text, write_json
        from .kernel.capabilities import capabilities

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
