"""The wheel users install: built, installed without a compiler, used end to end.

Issue 12 item 5.  A wheel for the running interpreter (the ``cp39-abi3`` one
on a GIL build, ``cp313t`` on free-threaded 3.13) is built from a copy of
the tree, or taken from ``$PYTEST_UFFD_GUARD_WHEELS`` (a directory, e.g.
the ``dist/`` that ``tools/build-wheels`` fills; CI sets it), and installed
into a fresh venv whose ``PATH`` has no compiler (and ``CC=/bin/false``).
Its dependencies come from this environment, repacked as wheels, so the
install needs no network.  Then, from a directory without the source tree:
a Python write and a ctypes write are named with their file:line, and
``python -m pytest`` loads the plugin through its ``pytest11`` entry point
and fails a tiny test with the plugin's report.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest

from pytest_uffd_guard.kernel.capabilities import capabilities

from .conftest import ROOT, bound

pytestmark = pytest.mark.timeout(bound(900))

WHEELS_ENV = "PYTEST_UFFD_GUARD_WHEELS"
DIST = "pytest-uffd-guard"
#: What a build or install may take here (a free-threaded build took 107 s
#: on a loaded 2-core machine).
BUILD_TIMEOUT = 600
RUN_TIMEOUT = 120


def _tags() -> list[str]:
    from packaging.tags import sys_tags

    return [str(t) for t in sys_tags()]


def _compatible(wheel: Path) -> bool:
    from packaging.utils import parse_wheel_filename

    _name, _version, _build, tags = parse_wheel_filename(wheel.name)
    ours = set(_tags())
    return any(str(t) in ours for t in tags)


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would make a child see the source tree
    or this run's settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTEST_ADDOPTS", "PYTEST_PLUGINS")
        and not k.startswith("PIP_")
    }
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _run(cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=bound(timeout), **kw)


def _copy_tree(dest: Path) -> None:
    """The checkout's tracked and untracked, not ignored, files (or, outside
    git, the tree without build products)."""
    listed = subprocess.run(
        ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        timeout=60,
    )
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            src = Path(ROOT, name)
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
        return
    shutil.copytree(
        ROOT,
        dest,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".tox", "build", "dist", "*.so", "__pycache__", "*.egg-info"
        ),
    )


def _build_wheel(work: Path) -> Path:
    """Build this interpreter's wheel from a copy of the tree, offline."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    if int(version.split(".")[0]) < 77:
        pytest.skip(
            f"building the wheel offline (--no-build-isolation) needs setuptools >= 77 "
            f"in this environment, it has {version}: pip install 'setuptools>=77', "
            f"or point ${WHEELS_ENV} at a directory of built wheels (tools/build-wheels)"
        )
    tree = work / "tree"
    _copy_tree(tree)
    out = work / "built"
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(out),
            str(tree),
        ],
        BUILD_TIMEOUT,
        env=_clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _given_wheel(directory: str) -> Path:
    wheels = sorted(Path(directory).glob("pytest_uffd_guard-*.whl"))
    fitting = [w for w in wheels if _compatible(w)]
    assert fitting, (
        f"${WHEELS_ENV}={directory} has no wheel for this interpreter "
        f"({_tags()[0]}): {[w.name for w in wheels]}"
    )
    # A manylinux wheel (what users get) over a plain linux one.
    return sorted(fitting, key=lambda w: "manylinux" not in w.name)[0]


def _requirements(requires: list[str] | None) -> list[str]:
    """The names of the REQUIRES (Requires-Dist) that apply here, extras aside."""
    from packaging.requirements import Requirement

    names = []
    for text in requires or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _closure(names: list[str]) -> list[importlib.metadata.Distribution]:
    """The installed distributions NAMES need, their dependencies included."""
    from packaging.utils import canonicalize_name

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        dist = importlib.metadata.distribution(name)
        seen[name] = dist
        todo.extend(_requirements(dist.requires))
    return list(seen.values())


def _repack(dist: importlib.metadata.Distribution, out: Path) -> Path:
    """A wheel of the installed, pure-Python distribution DIST."""
    wheel_info = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_info:
        pytest.fail(f"{dist.metadata['Name']} is not pure Python: cannot repack it offline")
    tag = next(
        (
            line.split(":", 1)[1].strip()
            for line in wheel_info.splitlines()
            if line.startswith("Tag:")
        ),
        "py3-none-any",
    )
    name = dist.metadata["Name"].replace("-", "_").replace(".", "_")
    path = out / f"{name}-{dist.version}-{tag}.whl"
    site = Path(str(dist.locate_file("")))
    records = []
    info_dir = None
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for file in dist.files or ():
            parts = file.parts
            if parts[0] == ".." or "__pycache__" in parts:
                continue
            if parts[0].endswith(".dist-info"):
                info_dir = parts[0]
                if parts[-1] in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json"):
                    continue
            data = (site / file).read_bytes()
            z.writestr(file.as_posix(), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{file.as_posix()},sha256={digest.decode()},{len(data)}")
        assert info_dir is not None, dist.metadata["Name"]
        records.append(f"{info_dir}/RECORD,,")
        z.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    return path


@dataclass
class Installed:
    """A fresh venv with the wheel installed."""

    wheel: Path
    #: Whether the test built it (else it came from $PYTEST_UFFD_GUARD_WHEELS).
    built: bool
    python: Path
    env: dict[str, str]
    #: A directory without the source tree, for the runs.
    work: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The wheel installed into a fresh venv, with no compiler on PATH."""
    base = tmp_path_factory.mktemp("wheel")
    given = os.environ.get(WHEELS_ENV)
    wheel = _given_wheel(given) if given else _build_wheel(base)
    house = base / "house"
    house.mkdir()
    for dep in _closure(_requirements(_wheel_requires(wheel))):
        _repack(dep, house)
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], RUN_TIMEOUT)
    if made.returncode != 0:
        pytest.skip(f"python -m venv cannot run here: {made.stderr.strip()[-300:]}")
    bindir = venv / "bin"
    # Nothing but the venv on PATH: no gcc, no cc, no make.
    env = _clean_env(PATH=str(bindir), CC="/bin/false", CXX="/bin/false")
    for tool in ("gcc", "cc", "c99", "clang", "make"):
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    python = bindir / "python"
    # pip runs from this environment, installing into the venv (--python):
    # the venv needs no pip of its own, and --isolated ignores pip's
    # configuration files and PIP_* (extra indexes, find-links).
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--isolated",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-index",
            "--no-cache-dir",
            "--no-compile",
            "--find-links",
            str(house),
            str(wheel),
        ],
        BUILD_TIMEOUT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    work = base / "work"
    work.mkdir()
    yield Installed(wheel, not given, python, env, work)


def _wheel_requires(wheel: Path) -> list[str]:
    """The Requires-Dist lines of WHEEL's metadata."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []


def _in_venv(
    inst: Installed, args: list[str], timeout: float = RUN_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return _run([str(inst.python), *args], timeout, env=inst.env, cwd=inst.work)


def test_the_wheel_installs_and_imports_without_a_compiler(installed: Installed) -> None:
    """Issue 12 item 5: the installed wheel, not the source tree, is what
    runs: its compiled core is in the venv's site-packages, and on a
    free-threaded build importing it leaves the GIL off."""
    result = _in_venv(
        installed,
        [
            "-c",
            "import sys, pytest_uffd_guard, pytest_uffd_guard._uffd as core\n"
            "print(core.__file__)\n"
            "print(getattr(sys, '_is_gil_enabled', lambda: True)())",
        ],
    )
    assert result.returncode == 0, result.stderr
    path, gil = result.stdout.split()
    purelib = _in_venv(installed, ["-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    assert Path(path).parent.parent == Path(purelib.stdout.strip()), path
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert gil == "False", "importing the wheel's extension re-enabled the GIL"
    if installed.built:
        # Built here: abi3 exactly where setup.py builds the limited API.  (A
        # given abi3 wheel, e.g. CI's from 3.11, is right on 3.12 too.)
        limited = not sysconfig.get_config_var("Py_GIL_DISABLED") and not _headers_break_abi3()
        assert ("abi3" in Path(path).name) == limited, path


WRITER = """\
import ctypes, mmap
from pytest_uffd_guard import GuardedBuffer, capabilities
from pytest_uffd_guard.stacks import user_frames

engine = "sync" if capabilities().user_mode_only else "auto"
P = mmap.PAGESIZE
with GuardedBuffer(2 * P, name="b", engine=engine) as buf:
    buf[10] = 1                                      # line 8
    ctypes.memmove(buf.address + P + 100, b"abc", 3) # line 9
    writes = buf.writes
for w in writes:
    f = user_frames(w)[0]
    print(w.offset // P, f.filename.rsplit("/", 1)[-1], f.lineno, f.function)
"""


def test_guarded_writes_name_their_lines_from_the_wheel(installed: Installed) -> None:
    """Issue 12 item 5: with the installed wheel, a Python write and a ctypes
    write are recorded with the writer's file:line."""
    if not capabilities().available:
        pytest.skip(f"userfaultfd unavailable: {capabilities().reason}")
    (installed.work / "writer.py").write_text(WRITER)
    result = _in_venv(installed, ["writer.py"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "0 writer.py 8 <module>",
        "1 writer.py 9 <module>",
    ], result.stdout + result.stderr


TINY_TEST = """\
import sys

import pytest_uffd_guard


def test_the_plugin_is_the_installed_one():
    assert pytest_uffd_guard.__file__.startswith(sys.prefix), pytest_uffd_guard.__file__


def test_writes_into_its_input(guarded_buffer):
    frame = guarded_buffer(b"x" * 64, name="frame")
    frame[3] = 0x41                                  # line 12
"""


def test_the_plugin_loads_from_the_wheel_and_fails_the_test(installed: Installed) -> None:
    """Issue 12 item 5: ``python -m pytest`` in the fresh venv loads the
    plugin through its entry point and fails a write with the report."""
    if not capabilities().available:
        pytest.skip(f"userfaultfd unavailable: {capabilities().reason}")
    (installed.work / "test_tiny.py").write_text(TINY_TEST)
    engine = ["--uffd-engine=sync"] if capabilities().user_mode_only else []
    result = _in_venv(
        installed, ["-m", "pytest", "-p", "no:cacheprovider", *engine, "test_tiny.py"]
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "plugins: uffd-guard-" in out, out
    assert "1 failed, 1 passed" in out, out
    assert "write into a read-only guarded buffer: 'frame'" in out, out
    assert "test_tiny.py:12 in test_writes_into_its_input" in out, out
    assert "Traceback" not in out and "INTERNALERROR" not in out, out


def test_repacked_dependencies_are_pure(installed: Installed) -> None:
    """The venv has the wheel and the dependencies it declares, nothing else
    from this environment (no pytest-xdist, no numpy)."""
    result = _in_venv(
        installed,
        [
            "-c",
            "import importlib.metadata as m; print(*sorted(d.metadata['Name'].lower() "
            "for d in m.distributions()))",
        ],
    )
    assert result.returncode == 0, result.stderr
    names = set(result.stdout.split())
    assert DIST in names and "pytest" in names and "tabulate" in names, names
    assert "numpy" not in names and "pytest-xdist" not in names, names


def _headers_break_abi3() -> bool:
    """Whether this interpreter's object.h has 3.12's Py_RETURN_NONE, which
    skips None's reference for the old limited API too (gh-134989)."""
    header = Path(sysconfig.get_path("include"), "object.h")
    text = header.read_text() if header.exists() else ""
    return sys.version_info >= (3, 12) and (
        "Py_LIMITED_API+0 < 0x030c0000\n#  define Py_RETURN_NONE return Py_NewRef(Py_None)"
        not in text
    )


SETUP_PROBE = """\
import runpy, setuptools
setuptools.setup = lambda **kw: None
g = runpy.run_path("setup.py")
print("limited" if g["LIMITED_API"] else "full")
"""


def test_no_abi3_build_with_headers_that_break_it() -> None:
    """Issue 12: 3.12's headers make Py_RETURN_NONE skip None's reference
    even for the limited API of 3.9-3.11 (CPython gh-134989): an abi3
    extension built with them aborts a 3.11 ("none_dealloc: deallocating
    None", seen with pyenv's 3.12.1).  setup.py builds the full API there."""
    broken = _headers_break_abi3()
    result = _run([sys.executable, "-c", SETUP_PROBE], RUN_TIMEOUT, cwd=ROOT, env=_clean_env())
    assert result.returncode == 0, result.stderr
    gil = not sysconfig.get_config_var("Py_GIL_DISABLED")
    expected = "limited" if gil and not broken else "full"
    assert result.stdout.strip() == expected, broken
