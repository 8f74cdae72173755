"""Settings of the in-place watches: which fixtures (``uffd_readonly_fixtures``)
and which module-level buffers (``uffd_watch``) are watched, resolved once,
command line over ini, with the usage errors of a bad spec (issue 14 item 3).

No pytest here: ``watchplugin.py`` turns :class:`SettingsError` into a
usage error.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from .settings import SettingsError

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

_OFF = {"no", "none", "off"}


class WatchSettings(NamedTuple):
    """Which fixtures and module attributes are watched in place."""

    fixtures: tuple[str, ...] = ()
    fixtures_source: str = ""
    specs: tuple[str, ...] = ()
    specs_source: str = ""

    @property
    def watching(self) -> bool:
        """Whether anything is to be watched in place."""
        return bool(self.specs or self.fixtures)


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


__all__ = [
    "READONLY_FIXTURES_HELP",
    "READONLY_FIXTURES_INI",
    "READONLY_FIXTURE_OPTION",
    "WATCH_HELP",
    "WATCH_INI",
    "WATCH_OPTION",
    "WatchSettings",
    "parse_spec",
    "resolve_spec",
    "resolve_watch_settings",
]
