"""pytest plugin: fail tests that write into buffers meant to be read-only.

Registered through the ``pytest11`` entry point.  It offers the
``guarded_buffer`` fixture, the ``readonly_buffer`` marker, the
``--uffd-report`` and ``--uffd-require`` options, the engine line and the
``pytest_uffd_*`` hooks (see ``hookspecs.py``).

This module is glue: options, configuration and the engine line (said
after the collection, only when a test guards something).  The run's
hooks are the methods of ``manager.Manager``; buffers come from
``guard.py`` (imported lazily, so that loading the plugin opens no file
descriptor, starts no thread and imports neither ctypes nor numpy), tables
and JSON from ``report.py``, settings from ``settings.py``, the engine from
``engines.choose_engine``.

After each test phase (setup, call, teardown) the plugin harvests every
buffer the test guards: records and changed bytes become plain-data
findings attached to that phase's report, and the buffer is re-armed so the
next phase starts clean.  Only findings of the call phase can fail a test.
"""

from __future__ import annotations

import sys
from collections.abc import Generator

import pytest

from .fixture import GuardedBufferFactory, guarded_buffer
from .jsonfile import JSON_WRITTEN, check_path
from .manager import EFAULT_HINT, MANAGER_NAME, STATUS_WORD, Manager, manager_key
from .marker import BAD_MARKER, MARKER, UNGUARDABLE, UNKNOWN_ARGUMENT, marker_help
from .session import engine_request
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
    is_worker,
    item_state_key,
    settings_key,
    watch_manager_key,
)

#: In-place watches (the marker's inplace=, uffd_readonly_fixtures, uffd_watch).
pytest_plugins = ["pytest_uffd_guard.watchplugin"]

__all__ = [
    "BAD_MARKER",
    "EFAULT_HINT",
    "JSON_WRITTEN",
    "REQUIRED_SUFFIX",
    "STATUS_WORD",
    "UNAVAILABLE_PREFIX",
    "UNGUARDABLE",
    "UNKNOWN_ARGUMENT",
    "GuardedBufferFactory",
    "guarded_buffer",
]


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
    if not config.pluginmanager.has_plugin("dsession"):
        return []
    return engine_lines(config)


def pytest_report_collectionfinish(config: pytest.Config, items: list[pytest.Item]) -> list[str]:
    if config.get_verbosity() < 0 or config.getoption("no_header", False):
        return []  # -q and --no-header hide the header, and so this line
    if config.pluginmanager.has_plugin("dsession"):
        return []
    if any(guards_something(item) for item in items) or watches_in_place(config):
        return engine_lines(config)
    return [NOTHING_GUARDED] if config.get_verbosity() > 0 else []


def guards_something(item: pytest.Item) -> bool:
    """Whether the test uses the fixture or the marker."""
    return FIXTURE in getattr(item, "fixturenames", ()) or bool(item.get_closest_marker(MARKER))


def watches_in_place(config: pytest.Config) -> bool:
    """Whether ``--uffd-watch`` / ``--uffd-readonly-fixture`` (or their ini
    keys) name something to watch."""
    manager = config.stash.get(watch_manager_key, None)
    return manager is not None and bool(manager.settings.specs or manager.settings.fixtures)


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    # After the fixtures: their values are what the marker swaps.
    state = item.stash.get(item_state_key, None)
    if state is not None and state.marked:
        item.config.stash[manager_key].swap(item)
    return result
