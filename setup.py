"""Build the C core.  Everything else is declared in pyproject.toml.

The extension is built only on Linux: elsewhere the package installs as
pure Python, imports, and reports userfaultfd as unavailable.
"""

import sys

from setuptools import Extension, setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel


class AbiThreeWheel(bdist_wheel):
    """Tag the wheel cp39-abi3: the extension uses only the limited API."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if sys.platform.startswith("linux"):
            self.py_limited_api = "cp39"


ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "pytest_uffd_guard._uffd",
            sources=["pytest_uffd_guard/_uffd.c"],
            define_macros=[("Py_LIMITED_API", "0x03090000")],
            py_limited_api=True,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-pthread"],
        )
    )

setup(ext_modules=ext_modules, cmdclass={"bdist_wheel": AbiThreeWheel})
