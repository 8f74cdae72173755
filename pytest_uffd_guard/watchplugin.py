"""In-place watches in pytest: memory the test did not allocate (issue 14).

Three ways to have an existing buffer watched where it lies, without a
copy (``inplace.py`` does the watching; this module decides when and reports):

* ``@pytest.mark.readonly_buffer("table", inplace=True)``: the argument's
  own memory, during the test's call phase;
* ``uffd_readonly_fixtures`` / ``--uffd-readonly-fixture NAME``: the value of
  each named fixture, during the call phase of every test that uses it
  (session- and module-scoped fixtures included);
* ``uffd_watch`` / ``--uffd-watch package.module:ATTR``: a module-level
  buffer, for the whole session.  A write is held against the phase it
  happened in: the call, setup or teardown of a test (that test fails or
  errors), the collection of a module (a collection error), or the session
  outside any test (an error line in the summary and a failing exit code).

Findings are the plugin's own (``harvest.judge``): they travel on the
reports as ``uffd_guard`` like a guarded buffer's, so the failure section,
the ``--uffd-report`` summary and the JSON show them; their ``origin`` says
how they were watched (``readonly_buffer:NAME (in place)``,
``uffd_readonly_fixtures:NAME``, ``uffd_watch:SPEC``).

This module holds the hooks; ``watchsettings.py`` the options and the specs,
``watched.py`` one watched object and the text of its findings (neither
imports pytest).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from . import harvest, report
from .marker import BAD_MARKER, MARKER
from .report import Finding
from .settings import SettingsError
from .state import REQUIRED_SUFFIX, UNAVAILABLE_PREFIX, item_state, settings_key
from .verdict import Range, normalize_range
from .watched import (
    FAILURE_PREFIX,
    SECTION_TITLE,
    Seen,
    Watched,
    failure_sentence,
    problem_of,
    section_text,
    size_of,
    typed,
)
from .watchsettings import (
    READONLY_FIXTURE_OPTION,
    READONLY_FIXTURES_HELP,
    READONLY_FIXTURES_INI,
    WATCH_HELP,
    WATCH_INI,
    WATCH_OPTION,
    WatchSettings,
    resolve_spec,
    resolve_watch_settings,
)

if TYPE_CHECKING:
    from .kernel.records import Change, WriteRecord

#: Name of the watch manager in pytest's plugin manager.
WATCH_MANAGER_NAME = "uffd_guard_watch_manager"

#: Said in the terminal summary for writes outside every test and collector.
SESSION_ERROR = "uffd-guard: ERROR outside any test: {sentence}"

NOT_WATCHABLE = "uffd watch spec {spec!r} from {where} cannot be watched: {cause}; fix: {remedy}"
#: Setup error of a fixture named in uffd_readonly_fixtures whose value cannot be watched.
UNWATCHABLE_FIXTURE = (
    "uffd-guard cannot watch fixture {name!r} (named by {where}) in place for {test}: "
    "{cause}; fix: {remedy}; or take {name!r} out of {key}"
)
UNWATCHABLE_FIXTURE_FIX = (
    "make the fixture return a writable C-contiguous buffer (a numpy array, bytearray, "
    "array.array, mmap or ctypes array)"
)
#: Setup error of a marker argument marked inplace=True that cannot be watched.
UNWATCHABLE_ARGUMENT = (
    "@pytest.mark.readonly_buffer(inplace=True) cannot watch argument {argname!r} of {test}: "
    "{cause}; fix: {remedy}"
)
UNWATCHABLE_ARGUMENT_FIX = (
    "pass a writable C-contiguous buffer (a numpy array, bytearray, array.array, mmap, "
    "ctypes array or a memoryview of one), or drop inplace=True to guard a copy"
)


# ------------------------------------------------------------ the plugin


watch_manager_key = pytest.StashKey["WatchManager"]()
#: The item's own watches (marker inplace=, uffd_readonly_fixtures), made at setup.
item_watches_key = pytest.StashKey[list[Watched]]()


@pytest.hookimpl(trylast=True)
def pytest_addoption(parser: pytest.Parser) -> None:
    # trylast: the group is the one plugin.py made, with its title.
    group = parser.getgroup("uffd-guard")
    group.addoption(
        READONLY_FIXTURE_OPTION,
        dest="uffd_readonly_fixtures",
        action="append",
        default=None,
        metavar="NAME",
        help=READONLY_FIXTURES_HELP,
    )
    group.addoption(
        WATCH_OPTION,
        dest="uffd_watch",
        action="append",
        default=None,
        metavar="SPEC",
        help=WATCH_HELP,
    )
    parser.addini(READONLY_FIXTURES_INI, READONLY_FIXTURES_HELP, type="args", default=[])
    parser.addini(WATCH_INI, WATCH_HELP, type="args", default=[])


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # trylast: after plugin.py's configure, which stashes the settings.
    if settings_key not in config.stash:
        return
    try:
        settings = resolve_watch_settings(
            config.getoption("uffd_readonly_fixtures"),
            config.getini(READONLY_FIXTURES_INI),
            config.getoption("uffd_watch"),
            config.getini(WATCH_INI),
        )
    except SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    manager = WatchManager(config, settings)
    config.stash[watch_manager_key] = manager
    config.pluginmanager.register(manager, WATCH_MANAGER_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    manager = config.stash.get(watch_manager_key, None)
    if manager is None:
        return
    manager.stop_all()
    config.pluginmanager.unregister(manager, WATCH_MANAGER_NAME)
    del config.stash[watch_manager_key]


def pytest_report_header(config: pytest.Config) -> list[str]:
    manager = config.stash.get(watch_manager_key, None)
    if manager is None:
        return []
    parts = []
    if manager.settings.specs:
        parts.append("for the session: " + ", ".join(manager.settings.specs))
    if manager.settings.fixtures:
        parts.append("fixtures: " + ", ".join(manager.settings.fixtures))
    return [f"uffd-guard: watched in place: {'; '.join(parts)}"] if parts else []


class WatchManager:
    """The run's in-place watches; its methods are hooks."""

    def __init__(self, config: pytest.Config, settings: WatchSettings) -> None:
        self.config = config
        self.settings = settings
        self.session: list[Watched] = []
        #: Failing findings outside every test and collector, for the summary.
        self.outside: list[tuple[str, list[Finding]]] = []
        #: Session watches that could not be restarted, and why.
        self.lost: list[str] = []
        #: How the watch behind each finding's origin covered its bytes.
        self.coverage: dict[str, str] = {}

    @property
    def engine(self) -> str:
        return self.config.stash[settings_key].engine

    @property
    def report_only(self) -> bool:
        return self.config.stash[settings_key].report_only

    def stop_all(self) -> None:
        for watched in self.session:
            watched.stop()
        self.session.clear()

    # -- the session's watches

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        # trylast: conftest files' own sessionstart may extend sys.path first.
        where = self.settings.specs_source
        for spec in self.settings.specs:
            try:
                obj = resolve_spec(spec, where)
            except SettingsError as exc:
                raise pytest.UsageError(str(exc)) from None
            watched = Watched(
                obj, spec, f"{WATCH_INI}:{spec}", element=harvest.element_of(typed(obj))
            )
            problem = _start(watched, self.engine)
            if problem is not None:
                cause, remedy = problem
                raise pytest.UsageError(
                    NOT_WATCHABLE.format(spec=spec, where=where, cause=cause, remedy=remedy)
                )
            self.session.append(watched)

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(
        self, collector: pytest.Collector
    ) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
        rep = yield
        if not self.session:
            return rep
        path = getattr(collector, "path", None)
        findings = self._harvest(
            self.session, "collection", collector.nodeid, str(path) if path else None, None
        )
        if findings:
            # Kept here: the summary and the JSON read the manager's findings.
            self._plugin_findings().extend(findings)
            if rep.passed and any(f.failed for f in findings):
                rep.outcome = "failed"
                rep.longrepr = (
                    failure_sentence(findings, f"collection of {collector.nodeid or '.'}")
                    + "\n"
                    + self.section(findings)
                )
        return rep

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # After every collector and pytest_collection_modifyitems: writes
        # made by hooks, outside any collector.
        self._outside(session, "collection")

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # tryfirst: before plugin.py writes the JSON report.
        self._outside(session, "session")
        self.stop_all()
        if self.outside and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def _outside(self, session: pytest.Session, phase: str) -> None:
        """Writes outside any test or collector: kept for the summary, and a
        failing exit code when they fail."""
        findings = self._harvest(self.session, phase, "", None, None)
        if not findings:
            return
        self._plugin_findings().extend(findings)
        if any(f.failed for f in findings):
            self.outside.append((failure_sentence(findings, phase), findings))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lost:
            terminalreporter.write_line(f"uffd-guard: watch {line}", yellow=True)
        for sentence, findings in self.outside:
            terminalreporter.write_line(
                SESSION_ERROR.format(sentence=sentence), red=True, bold=True
            )
            terminalreporter.write_line(self.section(findings))

    def section(self, findings: Sequence[Finding]) -> str:
        return section_text(findings, self.config.get_verbosity() > 0, self.coverage)

    def _plugin_findings(self) -> list[Finding]:
        from .manager import manager_key

        return self.config.stash[manager_key].findings

    # -- a test's own watches

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        result = yield
        # After the fixtures: their values are what is watched.
        item.stash[item_watches_key] = self._item_watches(item)
        return result

    def _item_watches(self, item: pytest.Item) -> list[Watched]:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        state = item_state(item)
        out: list[Watched] = []
        # Once per object: the session's watch, or the first name that gave it.
        seen = {id(w.obj) for w in self.session}
        for arg in state.marked:
            if not arg.inplace or id(funcargs[arg.argname]) in seen:
                continue
            value = funcargs[arg.argname]
            watched = Watched(
                value,
                arg.argname,
                f"{MARKER}:{arg.argname} (in place)",
                strict=True,
                element=harvest.element_of(typed(value)),
            )
            problem = _make(watched, self.engine, item)
            if problem is not None:
                cause, remedy = problem
                pytest.fail(
                    UNWATCHABLE_ARGUMENT.format(
                        argname=arg.argname, test=item.nodeid, cause=cause, remedy=remedy
                    ),
                    pytrace=False,
                )
            try:
                watched.allow = tuple(normalize_range(a, size_of(value)) for a in arg.allow)
            except ValueError as exc:
                pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=exc), pytrace=False)
            out.append(watched)
            seen.add(id(value))
        # Arguments the marker copies or watches already, and the session's buffers.
        marked = {arg.argname for arg in state.marked}
        fixturenames = getattr(item, "fixturenames", ())
        for name in self.settings.fixtures:
            if name not in fixturenames or name in marked or name not in funcargs:
                continue
            value = funcargs[name]
            if id(value) in seen:
                continue
            watched = Watched(
                value,
                name,
                f"{READONLY_FIXTURES_INI}:{name}",
                element=harvest.element_of(typed(value)),
            )
            problem = _make(watched, self.engine, item)
            if problem is not None:
                cause, remedy = problem
                key = f"{READONLY_FIXTURES_INI} / {READONLY_FIXTURE_OPTION}"
                pytest.fail(
                    UNWATCHABLE_FIXTURE.format(
                        name=name,
                        where=self.settings.fixtures_source,
                        test=item.nodeid,
                        cause=cause,
                        remedy=remedy or UNWATCHABLE_FIXTURE_FIX,
                        key=key,
                    ),
                    pytrace=False,
                )
            out.append(watched)
            seen.add(id(value))
        return out

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        # trylast: the innermost wrapper, so only the test itself is watched.
        watches = item.stash.get(item_watches_key, [])
        try:
            for watched in watches:
                _start_for_test(watched, item)
            return (yield)
        finally:
            for watched in watches:
                watched.stop()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        # tryfirst: the outer wrapper, so plugin.py's own findings are on the
        # report when ours are added to them.
        when = call.when
        findings = self._harvest(self.session, when, item.nodeid, str(item.path), item)
        if when == "call":
            findings += self._harvest(
                item.stash.get(item_watches_key, []), when, item.nodeid, str(item.path), item
            )
        item.user_properties.extend(report.property_items(findings))
        rep = yield
        if not findings:
            return rep
        data = getattr(rep, "uffd_guard", None) or []
        rep.uffd_guard = data + [f.to_dict() for f in findings]  # type: ignore[attr-defined]
        rep.sections.append((f"{SECTION_TITLE} ({when})", self.section(findings)))
        if any(f.failed for f in findings) and rep.passed:
            rep.outcome = "failed"
            during = None if when == "call" else f"{when} of {item.name}"
            rep.longrepr = failure_sentence(findings, during)
            if when == "call":
                rep.uffd_guard_failed = True  # type: ignore[attr-defined]
        return rep

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        # Items live for the session: do not keep their fixtures' values alive.
        item.stash[item_watches_key] = []

    # -- harvest

    def _harvest(
        self,
        watches: list[Watched],
        phase: str,
        nodeid: str,
        test_file: str | None,
        item: pytest.Item | None,
    ) -> list[Finding]:
        """What each watch saw since it was (re)armed, judged; the session's
        watches are re-armed after a phase in which they saw something."""
        findings = []
        for watched in list(watches):
            watch = watched.watch
            # Every change is a record (a protected page's first write, or a
            # compared page found by diffing the edges): no full diff needed
            # when there is none.
            if watch is None or not (watch.writes or watch.overflowed):
                continue
            session = watched in self.session
            if session:
                watch.stop()  # takes the last records and the final changes
            records = watch.writes
            changes = watch.changes(preview=harvest.PREVIEW_BYTES)
            findings.append(
                self._judge(
                    watched, records, changes, watch.overflowed, phase, nodeid, test_file, item
                )
            )
            self.coverage[watched.origin] = watched.coverage
            if session:
                # Watch again from a fresh snapshot: the next phase starts clean.
                problem = _start(watched, self.engine, restart=True)
                if problem is not None:
                    self.session.remove(watched)
                    self.lost.append(f"{watched.name}: stopped after {phase}: {problem[0]}")
        return findings

    def _judge(
        self,
        watched: Watched,
        records: list[WriteRecord],
        changes: list[Change],
        overflowed: int,
        phase: str,
        nodeid: str,
        test_file: str | None,
        item: pytest.Item | None,
    ) -> Finding:
        # The session's watches hold every phase against the test; a test's
        # own watches run during the call only.
        enforced = watched.strict or not self.report_only
        rules = harvest.Rules(
            readonly=True, enforced=enforced, allow=watched.allow, element=watched.element
        )
        hook = self.config.hook
        ask = tell = None
        if item is not None:
            buffer = watched.watch

            def _ask(record: WriteRecord, page_changes: list[Range]) -> bool | None:
                answer = hook.pytest_uffd_write_allowed(
                    config=self.config,
                    item=item,
                    buffer=buffer,
                    record=record,
                    changes=page_changes,
                    phase=phase,
                )
                if answer is None and watched.allow:
                    answer = harvest.allowed_by_ranges(record, page_changes, watched.allow)
                return answer  # type: ignore[no-any-return]

            def _tell(record: WriteRecord, status: str) -> None:
                hook.pytest_uffd_write(
                    config=self.config,
                    item=item,
                    buffer=buffer,
                    record=record,
                    phase=phase,
                    status=status,
                )

            own = self.config.pluginmanager.get_plugin("uffd_guard_manager")
            others = [
                i for i in hook.pytest_uffd_write_allowed.get_hookimpls() if i.plugin is not own
            ]
            ask = _ask if others or watched.allow else None
            tell = _tell if hook.pytest_uffd_write.get_hookimpls() else None
        return harvest.judge(
            Seen(watched, changes),
            records,
            rules,
            ask,
            tell,
            overflowed,
            None,
            nodeid=nodeid,
            phase=phase,
            origin=watched.origin,
            test_file=test_file,
        )


# ------------------------------------------------------------ helpers
def _make(watched: Watched, engine: str, item: pytest.Item) -> tuple[str, str | None] | None:
    """Make the watch (not started): None, or ``(cause, remedy)`` of why the
    object cannot be watched."""
    from .errors import UffdGuardError

    try:
        watched.make(engine)
    except (UffdGuardError, TypeError, ValueError, BufferError) as exc:
        return problem_of(exc)
    return None


def _start_for_test(watched: Watched, item: pytest.Item) -> None:
    """Start a test's own watch, or end its call: an engine asked for by
    name that cannot run skips the test (fails it under --uffd-require), as
    for a guarded buffer; any other refusal (a watch sharing its bytes)
    fails it with the reason."""
    from .errors import UffdGuardError, UffdUnavailableError

    text = None
    try:
        watched.start()
    except UffdUnavailableError as exc:
        text = " ".join(f"{UNAVAILABLE_PREFIX}: {exc.cause}; fix: {exc.remedy}".split())
        if not item.config.stash[settings_key].require:
            pytest.skip(text)
        text += f" {REQUIRED_SUFFIX}"
    except UffdGuardError as exc:
        cause, remedy = problem_of(exc)
        text = f"uffd-guard cannot watch {watched.name!r} in place for {item.nodeid}: {cause}"
        text += f"; fix: {remedy}" if remedy else ""
    if text is not None:  # outside the except: no chained traceback
        pytest.fail(text, pytrace=False)


def _start(watched: Watched, engine: str, restart: bool = False) -> tuple[str, str] | None:
    """Make and start (or restart) a session watch: None, or ``(cause, remedy)``."""
    from .errors import UffdGuardError

    try:
        if not restart:
            watched.make(engine)
        watched.start()
    except (UffdGuardError, TypeError, ValueError, BufferError) as exc:
        cause, remedy = problem_of(exc)
        return cause, remedy or "name a writable C-contiguous buffer"
    return None


__all__ = [
    "FAILURE_PREFIX",
    "READONLY_FIXTURES_INI",
    "READONLY_FIXTURE_OPTION",
    "SECTION_TITLE",
    "WATCH_INI",
    "WATCH_OPTION",
    "WatchManager",
    "WatchSettings",
    "resolve_watch_settings",
]
