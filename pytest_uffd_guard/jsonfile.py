"""Writing the JSON report, and checking at start-up that it can be written
(issue 9, item 12): a bad path is a usage error naming it, and a write that
fails at the end is one clear line, never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from .settings import SettingsError

#: Terminal line saying where the JSON report went (tests match on it).
JSON_WRITTEN = "uffd-guard: JSON report written to {path}"
#: Terminal line when the JSON report could not be written.
JSON_FAILED = "uffd-guard: ERROR: the JSON report could not be written to {path}: {error}"
#: Usage error when the JSON report's path cannot be written at all.
JSON_UNWRITABLE = (
    "uffd-guard cannot write its JSON report to {path}, {where}: {error}; "
    "give a path in a writable directory"
)


def os_error_text(exc: OSError) -> str:
    return exc.strerror or str(exc) if exc.errno else str(exc)


def write_json(path: Path, text: str) -> None:
    """Write the report, creating its directory; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        out.write(text)


def check_path(path: Path, where: str) -> None:
    """Usage error now if the JSON report could never be written to ``path``
    (issue 9, item 12): a directory, a file that cannot be opened for
    writing, or a missing directory that cannot be made.  Creates nothing
    that is not there at the end; a full disk still fails at the end, and is
    reported then."""
    problem: str | None = None
    try:
        parent = path.parent
        if path.is_dir():
            problem = "it is a directory"
        elif parent.is_dir():
            existed = path.exists()
            # Append: an existing report is left as it is until the end.
            with open(path, "a", encoding="utf-8"):
                pass
            if not existed:
                os.unlink(path)
        else:
            ancestor = parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                problem = f"{ancestor} is not a directory"
            elif not os.access(ancestor, os.W_OK | os.X_OK):
                problem = f"directory {parent} is missing and {ancestor} is not writable"
    except OSError as exc:
        problem = os_error_text(exc)
    if problem is not None:
        raise SettingsError(JSON_UNWRITABLE.format(path=path, where=where, error=problem))


__all__ = ["JSON_FAILED", "JSON_UNWRITABLE", "JSON_WRITTEN", "check_path", "write_json"]
