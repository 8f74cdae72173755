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
"""

from __future__ import annotations

import importlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from . import harvest, report
from .marker import BAD_MARKER, MARKER
from .report import Finding
from .settings import SettingsError
from .state import REQUIRED_SUFFIX, UNAVAILABLE_PREFIX, item_state, settings_key
from .verdict import Range

if TYPE_CHECKING:
    from .inplace import Watch
    from .records import Change, WriteRecord

READONLY_FIXTURE_OPTION = "--uffd-readonly-fixture"
READONLY_FIXTURES_INI = "uffd_readonly_fixtures"
READONLY_FIXTURES_HELP = (
    "Watch the value of each named fixture in place during the call phase of every test "
    "that uses it; a write fails that test (the option can be repeated; the ini key takes "
    "names separated by spaces; 'no' for none)"
)
WATCH_OPTION = "--uffd-watch"
WATCH_INI = "uffd_watch"
WATCH_HELP = (
    "Watch a module-level buffer, package.module:ATTR, in place for the whole session; a "
    "write fails the test whose call, setup or teardown made it, or the collection (the "
    "option can be repeated; the ini key takes specs separated by spaces; 'no' for none)"
)

#: Name of the watch manager in pytest's plugin manager.
WATCH_MANAGER_NAME = "uffd_guard_watch_manager"

#: First words of the failure sentence of a test failed by an in-place watch.
FAILURE_PREFIX = "write into memory watched in place"
#: Title of the section added to a report (the phase follows in brackets).
SECTION_TITLE = "uffd-guard writes in place"
#: Said in the terminal summary for writes outside every test and collector.
SESSION_ERROR = "uffd-guard: ERROR outside any test: {sentence}"

#: Usage errors of a bad uffd_watch spec.
BAD_SPEC = (
    "invalid uffd watch spec {spec!r} from {where}: {problem}; "
    "expected package.module:ATTR, e.g. mypkg.tables:GAMMA"
)
NO_MODULE = (
    "uffd watch spec {spec!r} from {where}: cannot import module {module!r} ({error}); "
    "fix: correct the name, or make the module importable when pytest starts (an installed "
    "package, a rootdir conftest.py, or pytest's pythonpath ini key)"
)
NO_ATTRIBUTE = (
    "uffd watch spec {spec!r} from {where}: module {module!r} has no attribute {attr!r}; "
    "fix: name a module-level buffer of {module}{hint}"
)
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

_OFF = {"no", "none", "off"}


# ------------------------------------------------------------ settings


@dataclass(frozen=True)
class WatchSettings:
    """Which fixtures and module attributes are watched in place."""

    fixtures: tuple[str, ...] = ()
    fixtures_source: str = ""
    specs: tuple[str, ...] = ()
    specs_source: str = ""


def _names(
    cli: Sequence[str] | None, ini: Sequence[str], option: str, key: str
) -> tuple[tuple[str, ...], str]:
    """The command line's values if given (they replace the ini's), else
    the ini's; "no" drops every value before it."""
    if cli is not None:
        values: list[str] = [v for part in cli for v in part.replace(",", " ").split()]
        where = f"the command line ({option})"
    else:
        values = [v for part in ini for v in part.replace(",", " ").split()]
        where = f"the ini key {key}"
    out: list[str] = []
    for value in values:
        if value.lower() in _OFF:
            out.clear()
        elif value not in out:
            out.append(value)
    return tuple(out), where


def resolve_watch_settings(
    cli_fixtures: Sequence[str] | None,
    ini_fixtures: Sequence[str],
    cli_specs: Sequence[str] | None,
    ini_specs: Sequence[str],
) -> WatchSettings:
    """Command line over ini; raises SettingsError naming the value and its source."""
    fixtures, fixtures_where = _names(
        cli_fixtures, ini_fixtures, READONLY_FIXTURE_OPTION, READONLY_FIXTURES_INI
    )
    for name in fixtures:
        if not name.isidentifier():
            raise SettingsError(
                f"invalid fixture name {name!r} from {fixtures_where}: expected the names of "
                "fixtures separated by spaces, e.g. 'calibration lookup_table'"
            )
    specs, specs_where = _names(cli_specs, ini_specs, WATCH_OPTION, WATCH_INI)
    for spec in specs:
        parse_spec(spec, specs_where)
    return WatchSettings(fixtures, fixtures_where, specs, specs_where)


def parse_spec(spec: str, where: str) -> tuple[str, str]:
    """``"pkg.mod:ATTR"`` -> ``("pkg.mod", "ATTR")``; ATTR may be dotted."""
    module, sep, attr = spec.partition(":")
    if not sep:
        problem = "no ':' between the module and the attribute"
    elif not all(part.isidentifier() for part in module.split(".")):
        problem = f"{module!r} is not a dotted module name"
    elif not all(part.isidentifier() for part in attr.split(".")):
        problem = f"{attr!r} is not an attribute name"
    else:
        return module, attr
    raise SettingsError(BAD_SPEC.format(spec=spec, where=where, problem=problem))


def resolve_spec(spec: str, where: str) -> Any:
    """The object ``spec`` names, importing its module; SettingsError if none."""
    module_name, attr = parse_spec(spec, where)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise SettingsError(
            NO_MODULE.format(spec=spec, where=where, module=module_name, error=error)
        ) from None
    value: Any = module
    for part in attr.split("."):
        if not hasattr(value, part):
            buffers = sorted(
                n for n, v in vars(module).items() if not n.startswith("_") and _is_buffer(v)
            )
            hint = f" (it has: {', '.join(buffers[:8])})" if buffers else ""
            raise SettingsError(
                NO_ATTRIBUTE.format(
                    spec=spec, where=where, module=module_name, attr=attr, hint=hint
                )
            )
        value = getattr(value, part)
    return value


def _is_buffer(value: Any) -> bool:
    if isinstance(value, (bytes, str, type)):
        return False
    try:
        memoryview(value).release()
    except TypeError:
        return False
    return True


# ------------------------------------------------------------ one watched object

#: How the last watch of each origin covers its bytes, for the sections.
COVERAGE: dict[str, str] = {}


@dataclass(eq=False)
class Watched:
    """One object watched in place, and the rules that apply to it."""

    obj: Any
    name: str
    origin: str
    #: Fails the test even under --uffd-report (the marker's rule).
    strict: bool = False
    allow: tuple[Range, ...] = ()
    element: tuple[str, int] | None = None
    watch: Watch | None = None

    def make(self, engine: str) -> Watch:
        """A new (not started) watch of the object; raises the watch's errors
        about the object (the engine's come at ``start()``)."""
        from .inplace import Watch

        self.watch = Watch(self.obj, name=self.name, engine=engine)
        return self.watch

    def start(self) -> None:
        """Start (or restart, from a fresh snapshot) the watch."""
        assert self.watch is not None
        self.watch.start()
        COVERAGE[self.origin] = _coverage(self.watch)

    def stop(self) -> None:
        if self.watch is not None:
            self.watch.stop()


class _Seen:
    """What ``harvest.judge`` reads of a buffer, over a watch's findings."""

    closed = True  # judge then reads changes() instead of two addresses

    def __init__(self, watched: Watched, changes: list[Change]) -> None:
        self.name = watched.name
        self._size = memoryview(watched.obj).nbytes
        self._changes = changes

    def __len__(self) -> int:
        return self._size

    def changes(self, preview: int | None = None) -> list[Change]:
        return self._changes


def _coverage(watch: Watch) -> str:
    """``name: N bytes protected (sync), M compared`` and each span, indented."""
    coverage = watch.coverage
    lines = [f"{watch.name}: {coverage.summary()}"]
    lines += [f"    {span}" for span in coverage.spans]
    lines += [f"    {note}" for note in coverage.notes]
    return "\n".join(lines)


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
                obj, spec, f"{WATCH_INI}:{spec}", element=harvest.element_of(_typed(obj))
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
                    + section_text(findings, self.config)
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
            terminalreporter.write_line(section_text(findings, self.config))

    def _plugin_findings(self) -> list[Finding]:
        from .plugin import manager_key

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
                element=harvest.element_of(_typed(value)),
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
                watched.allow = tuple(report.normalize_range(a, _size(value)) for a in arg.allow)
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
                element=harvest.element_of(_typed(value)),
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
        rep.sections.append((f"{SECTION_TITLE} ({when})", section_text(findings, self.config)))
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
            _Seen(watched, changes),
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


def _typed(value: Any) -> Any:
    """The value as ``harvest.element_of`` reads it: numpy arrays as they
    are, other buffers as a memoryview (array.array keeps its format)."""
    if hasattr(value, "dtype"):
        return value
    try:
        return memoryview(value)
    except TypeError:
        return value


def _size(value: Any) -> int:
    with memoryview(value) as view:
        return view.nbytes


def _problem(exc: BaseException) -> tuple[str, str | None]:
    cause = getattr(exc, "cause", None) or str(exc) or type(exc).__name__
    return str(cause), getattr(exc, "remedy", None)


def _make(watched: Watched, engine: str, item: pytest.Item) -> tuple[str, str | None] | None:
    """Make the watch (not started): None, or ``(cause, remedy)`` of why the
    object cannot be watched."""
    from .errors import UffdGuardError

    try:
        watched.make(engine)
    except (UffdGuardError, TypeError, ValueError, BufferError) as exc:
        return _problem(exc)
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
        cause, remedy = _problem(exc)
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
        cause, remedy = _problem(exc)
        return cause, remedy or "name a writable C-contiguous buffer"
    return None


def failure_sentence(findings: Sequence[Finding], during: str | None = None) -> str:
    """The one-line ``longrepr`` of a phase failed by in-place watches."""
    failed = [f for f in findings if f.failed]
    names = ", ".join(sorted({repr(f.buffer) for f in failed}))
    writes = sum(f.write_counts().get(report.FORBIDDEN, 0) for f in failed)
    ranges = sum(f.change_counts().get(report.FORBIDDEN, 0) for f in failed)
    text = (
        f"{FAILURE_PREFIX}: {names} ({_plural(writes, 'write')}, "
        f"{_plural(ranges, 'changed range')})"
    )
    if during:
        text += f" during {during}"
    return f"{text}; see the {SECTION_TITLE!r} section"


def section_text(findings: Sequence[Finding], config: pytest.Config) -> str:
    """The findings' table (bounded without -v) and how each was watched."""
    verbose = config.get_verbosity() > 0
    text = report.finding_section(
        findings, None if verbose else report.ROW_LIMIT, full_stacks=verbose
    )
    origins = dict.fromkeys(f.origin for f in findings)
    covered = [COVERAGE[o] for o in origins if COVERAGE.get(o)]
    if covered:
        text += "\nwatched in place (writers are named in protected bytes only):\n"
        text += "\n".join(covered)
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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
