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

import inspect
import mmap
import sys
from collections.abc import Generator, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from . import report
from .report import ALLOWED, FORBIDDEN, REPORTED, ChangeInfo, Finding, Range, WriteInfo
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

if TYPE_CHECKING:
    from .guard import GuardedBuffer
    from .records import WriteRecord
    from .tracking import EngineChoice

__all__ = ["GuardedBufferFactory", "guarded_buffer"]

MARKER = "readonly_buffer"
FIXTURE = "guarded_buffer"
#: Name of the manager object in pytest's plugin manager.
MANAGER_NAME = "uffd_guard_manager"

#: Start of the skip reason (and error) when userfaultfd cannot be used.
UNAVAILABLE_PREFIX = "uffd-guard unavailable"
#: Added to the message when --uffd-require turned the skip into an error.
REQUIRED_SUFFIX = f"(error because of {REQUIRE_OPTION} / {REQUIRE_INI})"
#: Setup error for a marker argument whose type cannot be guarded.
UNGUARDABLE = (
    "@pytest.mark.readonly_buffer cannot guard argument {argname!r} of type {type}: "
    "only numpy.ndarray and memoryview arguments can be swapped for a guarded copy"
)
#: Setup error when a memoryview's format or shape cannot be rebuilt.
UNCASTABLE = (
    "@pytest.mark.readonly_buffer cannot rebuild memoryview argument {argname!r} "
    "(format {format!r}, shape {shape}) over a guarded copy: {error}"
)
UNGUARDABLE_FIX = (
    "make the fixture or parameter a memoryview (memoryview(data)) or a numpy array, "
    "or build the buffer with the guarded_buffer fixture"
)
#: Setup error when the marker names an argument the test does not take.
UNKNOWN_ARGUMENT = (
    "@pytest.mark.readonly_buffer names {argname!r}, which is not an argument of {test}"
)
BAD_MARKER = "invalid @pytest.mark.readonly_buffer on {test}: {problem}"

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

PAGE_SIZE = mmap.PAGESIZE


def readonly_buffer(*argnames: str, allow: Sequence[Any] = ()) -> None:
    """Swap the named test arguments (numpy arrays, memoryviews) for guarded
    copies before the call and fail the test if it writes into them, even
    under --uffd-report; writes into the byte ranges of allow (slices or
    (start, stop) pairs) are reported but allowed."""


def _marker_help() -> str:
    """The marker's --markers line, built from readonly_buffer's signature."""
    parameters = inspect.signature(readonly_buffer).parameters.values()
    signature = ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters)
    doc = " ".join((readonly_buffer.__doc__ or "").split())
    return (
        f"{MARKER}({signature}): {doc} "
        "Example: @pytest.mark.readonly_buffer('frame', allow=[slice(0, 4)]). "
        "See docs/user-guide.md"
    )


# ------------------------------------------------------------ state


@dataclass
class Entry:
    """A buffer guarded for one test, and the rules that apply to it."""

    buffer: GuardedBuffer
    readonly: bool
    origin: str
    from_marker: bool = False
    allow: tuple[Range, ...] = ()
    done: bool = False
    stopped_seen: str | None = None


@dataclass
class ItemState:
    """Per-test state, in ``item.stash[item_state_key]``."""

    entries: list[Entry] = field(default_factory=list)
    #: Marker arguments swapped for guarded copies: argname -> original.
    swapped: dict[str, Any] = field(default_factory=dict)
    #: The guarded views handed to the test, dropped before closing.
    views: dict[str, Any] = field(default_factory=dict)
    #: Arguments named by readonly_buffer markers, validated at setup.
    marked: list[MarkedArgument] = field(default_factory=list)
    #: Findings of the phases reported so far.
    findings: list[Finding] = field(default_factory=list)
    counter: int = 0


settings_key = pytest.StashKey[Settings]()
manager_key = pytest.StashKey["Manager"]()
item_state_key = pytest.StashKey[ItemState]()


def item_state(item: pytest.Item) -> ItemState:
    state = item.stash.get(item_state_key, None)
    if state is None:
        state = item.stash[item_state_key] = ItemState()
    return state


def is_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker: the controller writes the reports."""
    return hasattr(config, "workerinput")


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
    config.addinivalue_line("markers", _marker_help())
    settings = get_settings(config)
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


# ------------------------------------------------------------ fixture


class GuardedBufferFactory(Protocol):
    """Type of the ``guarded_buffer`` fixture's value."""

    def __call__(
        self, source: Any, *, name: str | None = None, readonly: bool = True
    ) -> GuardedBuffer: ...


def _new_buffer(item: pytest.Item, source: Any, name: str) -> GuardedBuffer:
    """A GuardedBuffer, or the test skipped (or failed) if uffd is missing."""
    from .errors import UffdUnavailableError
    from .guard import GuardedBuffer

    settings = item.config.stash[settings_key]
    try:
        return GuardedBuffer(source, name=name, engine=settings.engine, stacks=settings.stacks)
    except UffdUnavailableError as exc:
        text = " ".join(f"{UNAVAILABLE_PREFIX}: {exc.cause}; fix: {exc.remedy}".split())
        if item.config.stash[settings_key].require:
            pytest.fail(f"{text} {REQUIRED_SUFFIX}", pytrace=False)
        pytest.skip(text)


@pytest.fixture
def guarded_buffer(request: pytest.FixtureRequest) -> Iterator[GuardedBufferFactory]:
    """Factory of guarded buffers: ``guarded_buffer(4096)``,
    ``guarded_buffer(b"data", name="frame", readonly=False)``.

    A read-only buffer (the default) fails the test when the test's call
    writes into it; a ``readonly=False`` buffer only reports writes.  The
    buffers are closed at teardown.
    """
    item = request.node
    assert isinstance(item, pytest.Item)
    state = item_state(item)

    def factory(source: Any, *, name: str | None = None, readonly: bool = True) -> GuardedBuffer:
        state.counter += 1
        buffer = _new_buffer(item, source, name if name is not None else f"buffer-{state.counter}")
        state.entries.append(Entry(buffer=buffer, readonly=bool(readonly), origin=FIXTURE))
        return buffer

    yield factory
    for entry in state.entries:
        if entry.origin == FIXTURE:
            entry.buffer.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    # After the fixtures: their values are what the marker swaps.
    state = item.stash.get(item_state_key, None)
    if state is not None and state.marked:
        item.config.stash[manager_key].swap(item)
    return result


# ------------------------------------------------------------ marker


@dataclass(frozen=True)
class MarkedArgument:
    argname: str
    allow: tuple[Any, ...]


def _allow_items(value: Any) -> tuple[Any, ...]:
    """``allow=`` as a tuple of range specs: one slice/pair, or many."""
    if isinstance(value, slice):
        return (value,)
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) or v is None for v in value)
    ):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise ValueError(f"allow={value!r} is neither a range nor a sequence of ranges") from None


def marked_arguments(item: pytest.Item) -> list[MarkedArgument]:
    """The arguments the item's readonly_buffer markers name, validated.

    A marker on the function must name arguments of the test; one on a
    class or module applies to the tests that take those arguments.
    """
    fixturenames = set(getattr(item, "fixturenames", ()))
    result: dict[str, list[Any]] = {}
    for node, mark in item.iter_markers_with_node(MARKER):
        unknown = set(mark.kwargs) - {"allow"}
        if unknown:
            problem = f"unknown keyword {', '.join(sorted(unknown))} (only allow= is accepted)"
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        if not mark.args:
            problem = "name at least one argument, e.g. readonly_buffer('data')"
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        for argname in mark.args:
            if not isinstance(argname, str):
                problem = f"argument names must be strings, got {argname!r}"
                pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        if len(set(mark.args)) != len(mark.args):
            problem = f"an argument is named twice in {mark.args!r}"
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=problem), pytrace=False)
        try:
            allow = _allow_items(mark.kwargs.get("allow", ()))
        except ValueError as exc:
            pytest.fail(BAD_MARKER.format(test=item.nodeid, problem=exc), pytrace=False)
        for argname in mark.args:
            if argname not in fixturenames:
                if node is item:
                    pytest.fail(
                        UNKNOWN_ARGUMENT.format(argname=argname, test=item.nodeid), pytrace=False
                    )
                continue
            result.setdefault(argname, []).extend(allow)
    return [MarkedArgument(name, tuple(allow)) for name, allow in result.items()]


class Unguardable(Exception):
    """A marker argument of a type that has no guarded twin."""


def guarded_copy(value: Any, argname: str, item: pytest.Item) -> tuple[GuardedBuffer, Any]:
    """A guarded buffer holding a copy of ``value`` and a view of it of the
    same type (numpy.ndarray: dtype, shape; memoryview: format, shape)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.ndarray):
        if type(value) is not numpy.ndarray or value.dtype.hasobject or value.nbytes == 0:
            what = (
                f"{type(value).__module__}.{type(value).__qualname__} "
                f"(dtype {value.dtype}, {value.nbytes} bytes)"
            )
            raise Unguardable(
                UNGUARDABLE.format(argname=argname, type=what)
                + "; pass a plain, non-empty numpy.ndarray without Python objects"
            )
        # Keep Fortran order: guard the transposed (C-ordered) array.
        fortran = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
        source = numpy.ascontiguousarray(value.T if fortran else value)
        buffer = _new_buffer(item, source, argname)
        array = numpy.frombuffer(buffer, dtype=value.dtype).reshape(source.shape)
        return buffer, (array.T if fortran else array)
    if isinstance(value, memoryview):
        if value.nbytes == 0:
            raise Unguardable(
                UNGUARDABLE.format(argname=argname, type="memoryview (empty)")
                + "; there is nothing to guard in an empty buffer"
            )
        buffer = _new_buffer(item, value.tobytes(), argname)
        try:
            view = memoryview(buffer)
            if value.format != "B" or value.ndim != 1:
                view = view.cast(value.format, list(value.shape or ()))  # type: ignore[call-overload]
        except (TypeError, ValueError) as exc:
            buffer.close()
            raise Unguardable(
                UNCASTABLE.format(
                    argname=argname, format=value.format, shape=value.shape, error=exc
                )
                + "; use a numpy array for this layout"
            ) from None
        return buffer, view
    raise Unguardable(
        UNGUARDABLE.format(argname=argname, type=type(value).__qualname__) + f"; {UNGUARDABLE_FIX}"
    )


def _release(view: Any) -> None:
    if isinstance(view, memoryview):
        with suppress(BufferError):  # the test kept a view of it; close() copes
            view.release()


# ------------------------------------------------------------ manager


class Manager:
    """Holds the run's findings; its methods are the plugin's hooks."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.findings: list[Finding] = []

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
            value = funcargs[arg.argname]
            problem: str | None = None
            try:
                buffer, view = guarded_copy(value, arg.argname, item)
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
            _release(view)
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
            changes = buffer.changes(preview=report.PREVIEW_BYTES)
            stopped = buffer.stopped_reason
            if closed:
                entry.done = True
            new_stop = stopped if stopped != entry.stopped_seen else None
            entry.stopped_seen = stopped
            if not records and not changes and not overflowed and new_stop is None:
                continue
            findings.append(self.judge(item, entry, phase, records, changes, overflowed, new_stop))
            if not closed and buffer.tracking:
                buffer.protect()
        return findings

    def judge(
        self,
        item: pytest.Item,
        entry: Entry,
        phase: str,
        records: list[WriteRecord],
        changes: Sequence[Any],
        overflowed: int,
        stopped: str | None,
    ) -> Finding:
        """Give each write and changed range its status; call our hooks."""
        hook = self.config.hook
        enforced = (
            entry.readonly
            and phase == "call"
            and (entry.from_marker or not self.settings.report_only)
        )
        cut = report.PREVIEW_BYTES
        spans = [(c.offset, c.offset + c.length) for c in changes]
        writes: list[WriteInfo] = []
        for record in records:
            status = REPORTED
            if entry.readonly:
                page = record.offset - record.offset % PAGE_SIZE
                in_page = report.spans_in_page(spans, page, PAGE_SIZE)
                allowed = hook.pytest_uffd_write_allowed(
                    config=self.config,
                    item=item,
                    buffer=entry.buffer,
                    record=record,
                    changes=in_page,
                    phase=phase,
                )
                if allowed:
                    status = ALLOWED
                elif enforced:
                    status = FORBIDDEN
            writes.append(WriteInfo.from_record(record, status))
        infos = []
        for change, (start, stop) in zip(changes, spans):
            status = REPORTED
            if entry.readonly:
                mine = [
                    w
                    for w in writes
                    if w.offset - w.offset % PAGE_SIZE < stop
                    and w.offset - w.offset % PAGE_SIZE + PAGE_SIZE > start
                ]
                if report.covered(start, stop, entry.allow) or (
                    mine and all(w.status == ALLOWED for w in mine)
                ):
                    status = ALLOWED
                elif enforced:
                    status = FORBIDDEN
            infos.append(
                ChangeInfo(
                    change.offset,
                    change.length,
                    change.before[:cut].hex(),
                    change.after[:cut].hex(),
                    status,
                )
            )
        for record, info in zip(records, writes):
            hook.pytest_uffd_write(
                config=self.config,
                item=item,
                buffer=entry.buffer,
                record=record,
                phase=phase,
                status=info.status,
            )
        return Finding(
            nodeid=item.nodeid,
            phase=phase,
            buffer=entry.buffer.name,
            size=len(entry.buffer),
            origin=entry.origin,
            readonly=entry.readonly,
            writes=tuple(writes),
            changes=tuple(infos),
            overflowed=overflowed,
            stopped=stopped,
            allow=entry.allow,
        )

    @pytest.hookimpl(trylast=True)
    def pytest_uffd_write_allowed(
        self, item: pytest.Item, buffer: GuardedBuffer, record: WriteRecord, changes: list[Range]
    ) -> bool | None:
        # trylast: a conftest's answer comes first and wins.
        state = item.stash.get(item_state_key, None)
        entry = next((e for e in state.entries if e.buffer is buffer), None) if state else None
        if entry is None or not entry.allow:
            return None
        if report.write_in_ranges(record.offset, record.exact, changes, PAGE_SIZE, entry.allow):
            return True
        return None

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
        if not self.settings.report_terminal or is_worker(self.config):
            return
        limit = None if self.config.get_verbosity() > 0 else 50
        terminalreporter.write_sep("=", report.SUMMARY_TITLE)
        for line in report.summary_lines(self.findings, limit):
            terminalreporter.write_line(line)
        if self.settings.report_json is not None:
            terminalreporter.write_line(f"JSON report written to {self.settings.report_json}")

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
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report.json_document(self.findings, header), encoding="utf-8")
