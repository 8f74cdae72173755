"""The plugin's settings, resolved once: command line over ini file.

Help strings are constants shared by each option and its ini key so the two
never drift; validators name the bad value and where it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from .names import ENGINES

REPORT_OPTION = "--uffd-report"
REPORT_INI = "uffd_report"
REPORT_HELP = (
    "Report writes into guarded buffers instead of failing on them (tests marked "
    "readonly_buffer still fail): 'term' for a terminal section, 'json:PATH' for a JSON "
    "file, both comma-separated, 'no' to turn it off"
)
REQUIRE_OPTION = "--uffd-require"
NO_REQUIRE_OPTION = "--uffd-no-require"
REQUIRE_INI = "uffd_require"
REQUIRE_HELP = (
    "Make guarded tests errors instead of skips when userfaultfd write-protection is unavailable"
)
NO_REQUIRE_HELP = f"Skip guarded tests when userfaultfd is unavailable (overrides {REQUIRE_INI})"
ENGINE_OPTION = "--uffd-engine"
ENGINE_INI = "uffd_engine"
ENGINE_HELP = (
    "How writes are tracked: auto (sync, which names each writer; for a user-mode-only "
    "userfaultfd async on Linux 6.7+, else diff; guarded tests are skipped where userfaultfd "
    "is unusable), sync, async (Linux 6.7+: fast, writer unknown), hybrid (first writers "
    "named, then async) or diff (no userfaultfd: compares bytes at the end; misses "
    "same-value writes)"
)
STACKS_OPTION = "--uffd-stacks"
STACKS_INI = "uffd_stacks"
STACKS_HELP = (
    "Name the writer (Python stack, system call, thread) of the first N writes of each "
    "guarded buffer; 0 turns it off (default 8)"
)
DOCTOR_OPTION = "--uffd-doctor"
DOCTOR_HELP = "Print what this machine offers for guarded buffers, and why, then exit"

_OFF = {"", "no", "off", "false", "0", "none"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A setting has a value the plugin cannot use."""


class Settings(NamedTuple):
    """What the plugin was asked to do in this run.

    A NamedTuple, like the plugin's other start-up records: creating one is
    ~5x cheaper than a frozen dataclass, and pytest start-up pays for it.
    """

    report_terminal: bool = False
    report_json: Path | None = None
    require: bool = False
    engine: str = "auto"
    stacks: int | None = None
    #: Where the JSON path came from, for messages about it.
    report_json_source: str = ""

    @property
    def report_only(self) -> bool:
        """Writes are reported, not held against tests (except the marker's)."""
        return self.report_terminal or self.report_json is not None


def parse_report(value: str, where: str, base: Path) -> tuple[bool, Path | None]:
    """``"term,json:out.json"`` -> ``(True, base / "out.json")``."""
    terminal = False
    json_path: Path | None = None
    for part in (p.strip() for p in value.split(",")):
        if part.lower() in _OFF:
            continue
        if part.lower() in ("term", "terminal"):
            terminal = True
        elif part.startswith("json:") and part[5:].strip():
            json_path = base / Path(part[5:].strip()).expanduser()
        else:
            raise SettingsError(
                f"invalid uffd report target {part!r} from {where}: "
                "expected 'term', 'json:PATH' or 'no'"
            )
    return terminal, json_path


def parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise SettingsError(f"invalid boolean {value!r} from {where}: expected true or false")


def parse_engine(value: str, where: str) -> str:
    engine = value.strip().lower()
    if engine not in ENGINES:
        raise SettingsError(
            f"invalid uffd engine {value!r} from {where}: expected one of {', '.join(ENGINES)}"
        )
    return engine


def parse_stacks(value: Any, where: str) -> int:
    try:
        count = int(str(value).strip())
    except ValueError:
        count = -1
    if count < 0:
        raise SettingsError(
            f"invalid uffd stacks {value!r} from {where}: expected a whole number >= 0 "
            "(0 turns writer naming off)"
        )
    return count


def resolve(
    cli_report: str | None,
    ini_report: str,
    cli_require: bool | None,
    ini_require: Any,
    invocation_dir: Path,
    ini_dir: Path,
    cli_engine: str | None = None,
    ini_engine: str = "",
    cli_stacks: str | None = None,
    ini_stacks: str = "",
) -> Settings:
    """CLI first, then the ini file.  Raises SettingsError naming the source.

    A relative JSON path is taken from the invocation directory on the
    command line and from the ini file's directory in the ini file.
    """
    if cli_report is not None:
        where = f"from the command line ({REPORT_OPTION})"
        terminal, json_path = parse_report(cli_report, where[5:], invocation_dir)
    else:
        where = f"from the ini key {REPORT_INI}"
        terminal, json_path = parse_report(ini_report or "", where[5:], ini_dir)
    if cli_require is not None:
        require = cli_require
    else:
        require = parse_bool(ini_require, f"the ini key {REQUIRE_INI}")
    if cli_engine is not None:
        engine = parse_engine(cli_engine, f"the command line ({ENGINE_OPTION})")
    elif ini_engine.strip():
        engine = parse_engine(ini_engine, f"the ini key {ENGINE_INI}")
    else:
        engine = "auto"
    stacks: int | None = None
    if cli_stacks is not None:
        stacks = parse_stacks(cli_stacks, f"the command line ({STACKS_OPTION})")
    elif str(ini_stacks).strip():
        stacks = parse_stacks(ini_stacks, f"the ini key {STACKS_INI}")
    return Settings(
        report_terminal=terminal,
        report_json=json_path,
        require=require,
        engine=engine,
        stacks=stacks,
        report_json_source=where,
    )
