"""pytest plugin: fail tests that write into buffers meant to be read-only.

Registered through the ``pytest11`` entry point.  It offers the
``guarded_buffer`` fixture, the ``readonly_buffer`` marker, the
``--uffd-*`` options, the engine line and the ``pytest_uffd_*`` hooks (see
``hookspecs.py``).

This module is what every pytest run loads, so it is small: options,
settings (checked when pytest starts, so a bad value is a usage error), the
engine line, and :func:`activate`.  The run's real hooks are the methods of
``manager.Manager`` (guarded buffers: harvest, judge, report) and
``watchplugin.WatchManager`` (in-place watches).  They are imported and
registered only once something needs them: a collected test that uses the
fixture or the marker, a fixture asked for at run time, a report or an
in-place watch asked for, or pytest-xdist's controller.  A run that guards
nothing never imports them, opens no file descriptor, starts no thread and
probes no kernel (issue 11: start-up).

After each test phase (setup, call, teardown) the manager harvests every
buffer the test guards: records and changed bytes become plain-data
findings attached to that phase's report, and the buffer is re-armed so the
next phase starts clean.  Only findings of the call phase can fail a test.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from . import settings as cfg
from . import watchsettings as watch_cfg
from .state import (
    FIXTURE,
    MARKER,
    MARKER_HELP,
    REQUIRED_SUFFIX,
    UNAVAILABLE_PREFIX,
    is_worker,
    manager_key,
    settings_key,
    watch_manager_key,
    watch_settings_key,
)

if TYPE_CHECKING:
    from .fixture import GuardedBufferFactory

#: Names this module used to import eagerly, still importable from here
#: (tests and users' annotations) without paying for them at start-up.
_LAZY = {
    "GuardedBufferFactory": "fixture",
    "BAD_MARKER": "marker",
    "UNGUARDABLE": "marker",
    "UNKNOWN_ARGUMENT": "marker",
    "EFAULT_HINT": "manager",
    "STATUS_WORD": "manager",
    "JSON_WRITTEN": "jsonfile",
}


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__package__}.{where}"), name)


__all__ = [*_LAZY, "REQUIRED_SUFFIX", "UNAVAILABLE_PREFIX", "activate", "guarded_buffer"]


# ------------------------------------------------------------ options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("uffd-guard", "Guarded buffers (userfaultfd write-protection)")
    group.addoption(
        cfg.REPORT_OPTION,
        dest="uffd_report",
        nargs="?",
        const="term",
        default=None,
        metavar="TARGETS",
        help=cfg.REPORT_HELP,
    )
    group.addoption(
        cfg.REQUIRE_OPTION,
        dest="uffd_require",
        action="store_const",
        const=True,
        default=None,
        help=cfg.REQUIRE_HELP,
    )
    group.addoption(
        cfg.NO_REQUIRE_OPTION,
        dest="uffd_require",
        action="store_const",
        const=False,
        help=cfg.NO_REQUIRE_HELP,
    )
    group.addoption(
        cfg.ENGINE_OPTION, dest="uffd_engine", default=None, metavar="ENGINE", help=cfg.ENGINE_HELP
    )
    group.addoption(
        cfg.STACKS_OPTION, dest="uffd_stacks", default=None, metavar="N", help=cfg.STACKS_HELP
    )
    group.addoption(
        cfg.DOCTOR_OPTION, dest="uffd_doctor", action="store_true", help=cfg.DOCTOR_HELP
    )
    parser.addini(cfg.REPORT_INI, cfg.REPORT_HELP, type="string", default="")
    parser.addini(cfg.REQUIRE_INI, cfg.REQUIRE_HELP, type="bool", default=False)
    parser.addini(cfg.ENGINE_INI, cfg.ENGINE_HELP, type="string", default="")
    parser.addini(cfg.STACKS_INI, cfg.STACKS_HELP, type="string", default="")
    for option, dest, metavar, text in (
        (
            watch_cfg.READONLY_FIXTURE_OPTION,
            "uffd_readonly_fixtures",
            "NAME",
            watch_cfg.READONLY_FIXTURES_HELP,
        ),
        (watch_cfg.WATCH_OPTION, "uffd_watch", "SPEC", watch_cfg.WATCH_HELP),
    ):
        # Each may be given more than once; None when not given (ini then).
        group.addoption(
            option, dest=dest, action="append", default=None, metavar=metavar, help=text
        )
    parser.addini(
        watch_cfg.READONLY_FIXTURES_INI, watch_cfg.READONLY_FIXTURES_HELP, type="args", default=[]
    )
    parser.addini(watch_cfg.WATCH_INI, watch_cfg.WATCH_HELP, type="args", default=[])


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


def get_settings(config: pytest.Config) -> cfg.Settings:
    try:
        return cfg.resolve(
            cli_report=config.getoption("uffd_report"),
            ini_report=config.getini(cfg.REPORT_INI),
            cli_require=config.getoption("uffd_require"),
            ini_require=config.getini(cfg.REQUIRE_INI),
            invocation_dir=config.invocation_params.dir,
            ini_dir=config.inipath.parent if config.inipath else config.rootpath,
            cli_engine=config.getoption("uffd_engine"),
            ini_engine=config.getini(cfg.ENGINE_INI),
            cli_stacks=config.getoption("uffd_stacks"),
            ini_stacks=config.getini(cfg.STACKS_INI),
        )
    except cfg.SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    settings = get_settings(config)
    if settings.report_json is not None and not is_worker(config):
        from .jsonfile import check_path

        try:
            check_path(settings.report_json, settings.report_json_source)
        except cfg.SettingsError as exc:
            raise pytest.UsageError(str(exc)) from None
    try:
        watch = watch_cfg.resolve_watch_settings(
            config.getoption("uffd_readonly_fixtures"),
            config.getini(watch_cfg.READONLY_FIXTURES_INI),
            config.getoption("uffd_watch"),
            config.getini(watch_cfg.WATCH_INI),
        )
    except cfg.SettingsError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[settings_key] = settings
    config.stash[watch_settings_key] = watch
    # Asked for outright: a report (said even when nothing was guarded) or
    # in-place watches (the session's start from pytest_sessionstart on).
    if settings.report_only or watch.watching:
        activate(config)


def activate(config: pytest.Config) -> None:
    """Import and register the run's manager and in-place watches, once."""
    if manager_key in config.stash:
        return
    from .manager import MANAGER_NAME, Manager
    from .watchplugin import WATCH_MANAGER_NAME, WatchManager

    manager = config.stash[manager_key] = Manager(config, config.stash[settings_key])
    config.pluginmanager.register(manager, MANAGER_NAME)
    # Registered second, so its tryfirst hooks run before the manager's.
    watches = config.stash[watch_manager_key] = WatchManager(
        config, config.stash[watch_settings_key]
    )
    config.pluginmanager.register(watches, WATCH_MANAGER_NAME)


def pytest_unconfigure(config: pytest.Config) -> None:
    # A conftest may have unregistered either itself (-p no: cannot name them).
    pm = config.pluginmanager
    watches = config.stash.get(watch_manager_key, None)
    if watches is not None:
        watches.stop_all()
        if pm.is_registered(watches):
            pm.unregister(watches)
        del config.stash[watch_manager_key]
    manager = config.stash.get(manager_key, None)
    if manager is not None:
        if pm.is_registered(manager):
            pm.unregister(manager)
        del config.stash[manager_key]
    if settings_key in config.stash:
        del config.stash[settings_key]
    if watch_settings_key in config.stash:
        del config.stash[watch_settings_key]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # pytest-xdist's controller collects nothing: its workers' findings
    # arrive on their reports, for the manager to gather.
    if session.config.pluginmanager.has_plugin("dsession"):
        activate(session.config)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    # Before the first test runs, and before the watches' own
    # collection_finish (trylast).
    if any(guards_something(item) for item in session.items):
        activate(session.config)


#: The items whose run protocol is under way, innermost last: the fixture's
#: test.  The fixture does not take ``request`` for it: pytest builds a new
#: RequestFixtureDef, with an ``inspect.signature``, each time a fixture asks
#: for ``request`` (0.1 ms a test here, issue 11).  A stack, because pytester
#: runs whole sessions inside a test.
_RUNNING: list[pytest.Item] = []

#: The fixture was set up with no test running (a plugin of its own doing).
NO_RUNNING_TEST = (
    "guarded_buffer was set up outside pytest's run protocol "
    "(pytest_runtest_protocol), so it cannot tell which test it belongs to; "
    "fix: request it from a test or a function-scoped fixture"
)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    _RUNNING.append(item)
    try:
        return (yield)
    finally:
        _RUNNING.pop()


@pytest.fixture
def guarded_buffer() -> Iterator[GuardedBufferFactory]:
    """Factory of guarded buffers: ``guarded_buffer(4096)``,
    ``guarded_buffer(b"data", name="frame", readonly=False)``.

    A read-only buffer (the default) fails the test when the test's call
    writes into it; a ``readonly=False`` buffer only reports writes.
    ``engine=``, ``backing=``, ``stacks=`` and ``max_records=`` are passed
    to ``GuardedBuffer`` and win over ``--uffd-engine``/``--uffd-stacks``.
    The buffers are closed at teardown.
    """
    if not _RUNNING:
        raise pytest.UsageError(NO_RUNNING_TEST)
    item = _RUNNING[-1]
    activate(item.config)  # asked for at run time (request.getfixturevalue)
    from .fixture import buffers

    yield from buffers(item)


#: With -v, when no collected test guards anything (the kernel is not probed).
NOTHING_GUARDED = (
    "uffd-guard: no guarded test collected, the kernel was not probed "
    "(`pytest --uffd-doctor` tells what this machine offers)"
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    # The engine line needs the kernel probed and the engine modules loaded
    # (tens of ms): it waits for the collection, and is only said when a
    # test guards something (issue 11: start-up).  pytest-xdist's controller
    # collects nothing itself, so there it stays in the header.
    lines = watch_lines(config)
    if config.pluginmanager.has_plugin("dsession"):
        from .session import engine_lines

        lines[:0] = engine_lines(config)
    return lines


def watch_lines(config: pytest.Config) -> list[str]:
    """What is watched in place for the run, if anything."""
    watch = config.stash.get(watch_settings_key, None)
    parts = []
    if watch is not None and watch.specs:
        parts.append("for the session: " + ", ".join(watch.specs))
    if watch is not None and watch.fixtures:
        parts.append("fixtures: " + ", ".join(watch.fixtures))
    return [f"uffd-guard: watched in place: {'; '.join(parts)}"] if parts else []


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    if config.get_verbosity() < 0 or config.getoption("no_header", False):
        return []  # -q and --no-header hide the header, and so this line
    if config.pluginmanager.has_plugin("dsession"):
        return []
    if watches_in_place(config) or any(guards_something(item) for item in items):
        from .session import engine_lines

        return engine_lines(config)
    return [NOTHING_GUARDED] if config.get_verbosity() > 0 else []


def guards_something(item: pytest.Item) -> bool:
    """Whether the test uses the fixture or the marker."""
    return FIXTURE in getattr(item, "fixturenames", ()) or bool(item.get_closest_marker(MARKER))


def watches_in_place(config: pytest.Config) -> bool:
    """Whether ``--uffd-watch`` / ``--uffd-readonly-fixture`` (or their ini
    keys) name something to watch."""
    return config.stash[watch_settings_key].watching


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # The manager says the handler's warnings when it is registered; without
    # it a test may still have used GuardedBuffer itself.
    if (
        manager_key not in terminalreporter.config.stash
        and "pytest_uffd_guard.kernel.handler" in sys.modules
    ):
        from .session import handler_summary

        for line in handler_summary():
            terminalreporter.write_line(line, yellow=True)
