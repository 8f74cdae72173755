"""Build the C core.  Everything else is declared in pyproject.toml.

The extension is built only on Linux: elsewhere the package installs as
pure Python, imports, and reports userfaultfd as unavailable.

GIL builds get the limited API (one ``cp39-abi3`` wheel for 3.9 and
later); a free-threaded build (3.13t, ``Py_GIL_DISABLED``) has no limited
API, so it gets the full API and a wheel tagged for that interpreter
(``cp313t``).
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
LIMITED_API = sys.platform.startswith("linux") and not FREE_THREADED


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
            sources=["pytest_uffd_guard/_uffd.c"],
            include_dirs=multiarch_include_dirs(),
            define_macros=[("Py_LIMITED_API", "0x03090000")] if LIMITED_API else [],
            py_limited_api=LIMITED_API,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"bdist_wheel": AbiThreeWheel})
