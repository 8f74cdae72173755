"""The run's in-place watches and what they saw, phase by phase.

:class:`WatchBook` makes the watches (the session's, from ``uffd_watch``; a
test's own, from the marker's ``inplace=True`` and
``uffd_readonly_fixtures``), takes what each saw in a phase, judges it
(``harvest.judge``, with our hooks asked and told) and re-arms the
session's watches for the next phase.  ``watchplugin.py`` holds the hooks
that say when; ``watched.py`` one watched object and the text of its
findings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from .marker import BAD_MARKER, MARKER
from .state import REQUIRED_SUFFIX, UNAVAILABLE_PREFIX, item_state, manager_key, settings_key
from .watched import Seen, Watched, failure_sentence, problem_of, section_text, size_of
from .watchsettings import READONLY_FIXTURE_OPTION, READONLY_FIXTURES_INI, WatchSettings

if TYPE_CHECKING:
    from .findings import Finding
    from .kernel.records import Change, WriteRecord
    from .verdict import Range

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


class WatchBook:
    """The run's in-place watches and what they saw (the hooks are
    ``watchplugin.WatchManager``'s, a subclass)."""

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

    def outside_phase(self, phase: str) -> None:
        """Writes outside any test or collector: kept for the summary, and a
        failing exit code when they fail."""
        findings = self.harvest(self.session, phase, "", None, None)
        if not findings:
            return
        self._plugin_findings().extend(findings)
        if any(f.failed for f in findings):
            self.outside.append((failure_sentence(findings, phase), findings))

    def section(self, findings: Sequence[Finding]) -> str:
        return section_text(findings, self.config.get_verbosity() > 0, self.coverage)

    def _plugin_findings(self) -> list[Finding]:
        return self.config.stash[manager_key].findings

    def item_watches(self, item: pytest.Item) -> list[Watched]:
        funcargs: dict[str, Any] = getattr(item, "funcargs", {})
        state = item_state(item)
        out: list[Watched] = []
        # Once per object: the session's watch, or the first name that gave it.
        seen = {id(w.obj) for w in self.session}
        for arg in state.marked:
            if not arg.inplace or id(funcargs[arg.argname]) in seen:
                continue
            value = funcargs[arg.argname]
            watched = Watched(value, arg.argname, f"{MARKER}:{arg.argname} (in place)", strict=True)
            problem = make(watched, self.engine, item)
            if problem is not None:
                cause, remedy = problem
                pytest.fail(
                    UNWATCHABLE_ARGUMENT.format(
                        argname=arg.argname, test=item.nodeid, cause=cause, remedy=remedy
                    ),
                    pytrace=False,
                )
            from .verdict import normalize_range

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
            watched = Watched(value, name, f"{READONLY_FIXTURES_INI}:{name}")
            problem = make(watched, self.engine, item)
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

    def harvest(
        self,
        watches: list[Watched],
        phase: str,
        nodeid: str,
        test_file: str | None,
        item: pytest.Item | None,
    ) -> list[Finding]:
        """What each watch saw since it was (re)armed, judged; the session's
        watches are re-armed after a phase in which they saw something."""
        findings: list[Finding] = []
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
            from .harvest import PREVIEW_BYTES

            records = watch.writes
            changes = watch.changes(preview=PREVIEW_BYTES)
            findings.append(
                self._judge(
                    watched, records, changes, watch.overflowed, phase, nodeid, test_file, item
                )
            )
            self.coverage[watched.origin] = watched.coverage
            if session:
                # Watch again from a fresh snapshot: the next phase starts clean.
                problem = start(watched, self.engine, restart=True)
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
        from . import harvest

        enforced = watched.strict or not self.report_only
        rules = harvest.Rules(
            readonly=True, enforced=enforced, allow=watched.allow, element=watched.element
        )
        hook = self.config.hook
        ask = tell = None
        if item is not None:
            about = {"config": self.config, "item": item, "buffer": watched.watch, "phase": phase}

            def _ask(record: WriteRecord, page_changes: list[Range]) -> bool | None:
                answer = hook.pytest_uffd_write_allowed(
                    **about, record=record, changes=page_changes
                )
                if answer is None and watched.allow:
                    answer = harvest.allowed_by_ranges(record, page_changes, watched.allow)
                return answer  # type: ignore[no-any-return]

            def _tell(record: WriteRecord, status: str) -> None:
                hook.pytest_uffd_write(**about, record=record, status=status)

            own = self.config.pluginmanager.get_plugin("uffd_guard_manager")
            others = [
                i for i in hook.pytest_uffd_write_allowed.get_hookimpls() if i.plugin is not own
            ]
            ask = _ask if others or watched.allow else None
            tell = _tell if hook.pytest_uffd_write.get_hookimpls() else None
        finding = harvest.judge(
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
        # Which bytes were protected and which only compared (issue 10).
        coverage = watched.watch.coverage.as_dict() if watched.watch is not None else None
        return replace(finding, coverage=coverage)


# ------------------------------------------------------------ helpers
def make(watched: Watched, engine: str, item: pytest.Item) -> tuple[str, str | None] | None:
    """Make the watch (not started): None, or ``(cause, remedy)`` of why the
    object cannot be watched."""
    from .errors import UffdGuardError

    try:
        watched.make(engine)
    except (UffdGuardError, TypeError, ValueError, BufferError) as exc:
        return problem_of(exc)
    return None


def start_for_test(watched: Watched, item: pytest.Item) -> None:
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


def start(watched: Watched, engine: str, restart: bool = False) -> tuple[str, str] | None:
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
