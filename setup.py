"""Build the C core.  Everything else is declared in pyproject.toml.

The extension is built only on Linux: elsewhere the package installs as
pure Python, imports, and reports userfaultfd as unavailable.

GIL builds get the limited API (one ``cp39-abi3`` wheel for 3.9 and
later); a free-threaded build (3.13t, ``Py_GIL_DISABLED``) has no limited
API, so it gets the full API and a wheel tagged for that interpreter
(``cp313t``).
"""

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
                "pytest_uffd_guard/_uffd/remove.c",
                "pytest_uffd_guard/_uffd/table.c",
                "pytest_uffd_guard/_uffd/capture.c",
                "pytest_uffd_guard/_uffd/namer.c",
                "pytest_uffd_guard/_uffd/diff.c",
            ],
            define_macros=[("Py_LIMITED_API", "0x03090000")] if LIMITED_API else [],
            py_limited_api=LIMITED_API,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"bdist_wheel": AbiThreeWheel})
