# The C extension pytest_uffd_guard._uffd (sources in _uffd/, contract in
# _uffd/uffd.h).  Its functions and constants are untyped here, as they were
# while mypy could not see the module: this stub only keeps mypy from
# taking the _uffd/ source folder for a namespace package.
from typing import Any

def __getattr__(name: str) -> Any: ...

# The collect path (_uffd/collect_py.c), typed: the engines build on them.
def page_firsts(
    a: int,
    b: int,
    ranges: bytes,
    unit: int,
    reported: bytearray,
    only_changed: int,
    live_anonymous: int = 0,
    /,
) -> bytes: ...
def changed_runs(
    a: int, b: int, length: int, preview: int, whole_up_to: int, live_anonymous: int = 0, /
) -> tuple[bytes, bytes, bytes]: ...
