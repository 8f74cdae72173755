# The C extension pytest_uffd_guard._uffd (sources in _uffd/, contract in
# _uffd/uffd.h).  Its functions and constants are untyped here, as they were
# while mypy could not see the module: this stub only keeps mypy from
# taking the _uffd/ source folder for a namespace package.
from typing import Any

def __getattr__(name: str) -> Any: ...
