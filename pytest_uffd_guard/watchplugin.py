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

This module holds the hooks, as methods of :class:`WatchManager`, which
``plugin.activate`` registers (its options and settings are ``plugin.py``'s,
read when pytest starts); ``watchbook.py`` the bookkeeping of each phase
(making the watches, judging what they saw), ``watchsettings.py`` the
options and the specs, ``watched.py`` one watched object and the text of
its findings (neither imports pytest).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from .settings import SettingsError
from .watchbook import WatchBook, start, start_for_test
from .watched import FAILURE_PREFIX, SECTION_TITLE, Watched, failure_sentence
from .watchsettings import (
    READONLY_FIXTURE_OPTION,
    READONLY_FIXTURES_INI,
    WATCH_INI,
    WATCH_OPTION,
    resolve_spec,
)

#: Name of the watch manager in pytest's plugin manager.
WATCH_MANAGER_NAME = "uffd_guard_watch_manager"

#: Said in the terminal summary for writes outside every test and collector.
SESSION_ERROR = "uffd-guard: ERROR outside any test: {sentence}"

NOT_WATCHABLE = "uffd watch spec {spec!r} from {where} cannot be watched: {cause}; fix: {remedy}"


# ------------------------------------------------------------ the plugin


#: The item's own watches (marker inplace=, uffd_readonly_fixtures), made at setup.
item_watches_key = pytest.StashKey[list[Watched]]()


class WatchManager(WatchBook):
    """The run's in-place watches; its methods are hooks."""

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
            watched = Watched(obj, spec, f"{WATCH_INI}:{spec}")
            problem = start(watched, self.engine)
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
        findings = self.harvest(
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
        self.outside_phase("collection")

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        # tryfirst: before plugin.py writes the JSON report.
        self.outside_phase("session")
        self.stop_all()
        if self.outside and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lost:
            terminalreporter.write_line(f"uffd-guard: watch {line}", yellow=True)
        for sentence, findings in self.outside:
            terminalreporter.write_line(
                SESSION_ERROR.format(sentence=sentence), red=True, bold=True
            )
            terminalreporter.write_line(self.section(findings))

    # -- a test's own watches

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, None, None]:
        result = yield
        # After the fixtures: their values are what is watched.
        item.stash[item_watches_key] = self.item_watches(item)
        return result

    @pytest.hookimpl(wrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        # trylast: the innermost wrapper, so only the test itself is watched.
        watches = item.stash.get(item_watches_key, [])
        try:
            for watched in watches:
                start_for_test(watched, item)
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
        findings = self.harvest(self.session, when, item.nodeid, str(item.path), item)
        if when == "call":
            findings += self.harvest(
                item.stash.get(item_watches_key, []), when, item.nodeid, str(item.path), item
            )
        if findings:
            from .report import property_items

            item.user_properties.extend(property_items(findings))
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


__all__ = [
    "FAILURE_PREFIX",
    "READONLY_FIXTURES_INI",
    "READONLY_FIXTURE_OPTION",
    "SECTION_TITLE",
    "WATCH_INI",
    "WATCH_OPTION",
    "WatchManager",
]
