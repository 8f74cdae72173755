"""Build the C core.  Everything else is declared in pyproject.toml.

The extension is built only on Linux: elsewhere the package installs as
pure Python, imports, and reports userfaultfd as unavailable.

GIL builds get the limited API (one ``cp39-abi3`` wheel for 3.9 and
later); a free-threaded build (3.13t, ``Py_GIL_DISABLED``) has no limited
API, so it gets the full API and a wheel tagged for that interpreter
(``cp313t``), and so does a build with headers whose ``Py_RETURN_NONE``
breaks the limited API of older Pythons (3.12, see ``headers_break_abi3``).
"""

import os
import sys
import sysconfig

from setuptools import Extension, setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def headers_break_abi3() -> bool:
    """Whether this Python's headers make Py_RETURN_NONE (and _TRUE, _FALSE)
    skip the reference it owes even for the limited API of 3.11 and older.

    3.12's headers, and 3.13's and 3.14's before the fix of CPython
    gh-134989 (June 2025), treat None as immortal there too: a cp39-abi3
    extension built with them takes a reference to None from 3.9-3.11 on
    every such return, until 3.11 aborts with "none_dealloc: deallocating
    None" (seen with pyenv's 3.12.1).  Built with them, the extension gets
    the full API and a wheel for this version only."""
    if sys.version_info < (3, 12):
        return False
    try:
        with open(os.path.join(sysconfig.get_path("include"), "object.h")) as f:
            text = f.read()
    except OSError:
        return True
    fixed = "Py_LIMITED_API+0 < 0x030c0000\n#  define Py_RETURN_NONE return Py_NewRef(Py_None)"
    return fixed not in text


LIMITED_API = sys.platform.startswith("linux") and not FREE_THREADED and not headers_break_abi3()


class AbiThreeWheel(bdist_wheel):
    """Tag the wheel cp39-abi3 when the extension uses only the limited API."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if LIMITED_API:
            self.py_limited_api = "cp39"


def multiarch_include_dirs() -> list[str]:
    """Where Debian's multiarch pyconfig.h is, when the compiler would not
    look there by itself: Debian's ``python3.X/pyconfig.h`` only includes
    ``<MULTIARCH/python3.X/pyconfig.h>``, which is under ``/usr/include``
    on a Debian system but elsewhere in an unpacked Debian root (the 3.14
    of tools/prepare-pythons)."""
    include = sysconfig.get_path("include")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if not include or not multiarch:
        return []
    parent = os.path.dirname(include)
    wrapped = os.path.join(parent, multiarch, os.path.basename(include), "pyconfig.h")
    if parent == "/usr/include" or not os.path.exists(wrapped):
        return []
    return [parent]


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "pytest_uffd_guard._uffd",
            sources=[
                "pytest_uffd_guard/_uffd/module.c",
                "pytest_uffd_guard/_uffd/capture_py.c",
                "pytest_uffd_guard/_uffd/ioctl.c",
                "pytest_uffd_guard/_uffd/handler.c",
                "pytest_uffd_guard/_uffd/records.c",
                "pytest_uffd_guard/_uffd/budget.c",
                "pytest_uffd_guard/_uffd/budget_py.c",
                "pytest_uffd_guard/_uffd/remove.c",
                "pytest_uffd_guard/_uffd/table.c",
                "pytest_uffd_guard/_uffd/capture.c",
                "pytest_uffd_guard/_uffd/namer.c",
                "pytest_uffd_guard/_uffd/diff.c",
                "pytest_uffd_guard/_uffd/collect_py.c",
            ],
            depends=[
                "pytest_uffd_guard/_uffd/uffd.h",
                "pytest_uffd_guard/_uffd/uapi.h",
                "pytest_uffd_guard/_uffd/uffd_py.h",
                "pytest_uffd_guard/_uffd/doc.h",
                "pytest_uffd_guard/_uffd/collect.h",
                "pytest_uffd_guard/_uffd/collect_py.h",
                "pytest_uffd_guard/_uffd/budget_py.h",
            ],
            include_dirs=multiarch_include_dirs(),
            define_macros=[("Py_LIMITED_API", "0x03090000")] if LIMITED_API else [],
            py_limited_api=LIMITED_API,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"bdist_wheel": AbiThreeWheel})
