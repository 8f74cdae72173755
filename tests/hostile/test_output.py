"""What a user sees: the JSON path, the fixture's keywords, stacks and tables
(issue 9, items 12, 16 and 19), through real pytest runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_uffd_guard import capabilities
from tests.conftest import sync_engine_args

ROOT = Path(__file__).resolve().parents[2]
#: Looked up, not imported: pytester's runs would unload and re-import it.
HAVE_NUMPY = importlib.util.find_spec("numpy") is not None

ONE_WRITE = """
    def test_writes(guarded_buffer):
        guarded_buffer(b"abcdef", name="frame")[2] = ord("Z")
"""


def _needs_uffd() -> None:
    from pytest_uffd_guard import capabilities

    caps = capabilities()
    if not caps.available:
        pytest.skip(f"userfaultfd write-protection unavailable: {caps.reason}")


# ------------------------------------------------------------ item 12


@pytest.mark.timeout(120)
def test_json_path_in_proc_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """Issue 9 item 12: --uffd-report=json:/proc/x.json stops at configure,
    naming the path and why, without a traceback."""
    pytester.makepyfile(ONE_WRITE)
    result = pytester.runpytest_subprocess("--uffd-report=json:/proc/x.json", timeout=100)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot write its JSON report to /proc/x.json*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.timeout(120)
def test_json_path_that_is_a_directory_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """Issue 9 item 12: a directory as the JSON path is refused at configure."""
    pytester.mkdir("reports")
    pytester.makepyfile(ONE_WRITE)
    result = pytester.runpytest_subprocess("--uffd-report=json:reports", timeout=100)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*JSON report to *reports, from the command line*directory*"])


@pytest.mark.timeout(120)
def test_json_write_failure_at_the_end_is_clear(pytester: pytest.Pytester) -> None:
    """Issue 9 item 12: /dev/full fails only when written: the summary is
    still shown, one clear error line names the path, the exit code is not 0."""
    _needs_uffd()
    pytester.makepyfile(ONE_WRITE)
    result = pytester.runpytest_subprocess("--uffd-report=json:/dev/full", timeout=100)
    out = result.stdout.str() + result.stderr.str()
    assert "Traceback" not in out and "INTERNALERROR" not in out
    result.stdout.fnmatch_lines(
        ["*uffd-guard: ERROR: the JSON report could not be written to /dev/full: *space*"]
    )
    result.stdout.fnmatch_lines(["*1 passed*"])
    assert result.ret != 0


@pytest.mark.timeout(120)
def test_json_written_line_names_the_path(pytester: pytest.Pytester) -> None:
    """Issue 9 item 12: the terminal says where the JSON went, even without 'term'."""
    from pytest_uffd_guard.plugin import JSON_WRITTEN

    _needs_uffd()
    pytester.makepyfile(ONE_WRITE)
    result = pytester.runpytest_subprocess("--uffd-report=json:out/r.json", timeout=100)
    result.assert_outcomes(passed=1)
    path = pytester.path / "out" / "r.json"
    result.stdout.fnmatch_lines([JSON_WRITTEN.format(path=path)])
    assert json.loads(path.read_text())["findings"]


@pytest.mark.timeout(120)
def test_json_missing_parent_as_nobody_is_a_usage_error() -> None:
    """Issue 9 item 12: as an unprivileged user, a JSON path whose directory
    cannot be made is a usage error at configure, not a traceback at the end."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as the user nobody")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Issue 12: an interpreter under a directory nobody cannot read (the
    # prepared 3.13t and 3.14 in /root/.cache) starts, but finds neither its
    # libraries nor its standard library.
    probe = subprocess.run(
        [*setpriv, sys.executable, "-c", "import pytest, pytest_uffd_guard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"the user nobody cannot run {sys.executable} with pytest and this package: "
            f"{(probe.stderr.strip().splitlines() or ['?'])[-1][-200:]}"
        )
    work = tempfile.mkdtemp(prefix="uffd-json-")
    try:
        os.chmod(work, 0o755)
        test = Path(work, "test_one.py")
        test.write_text("def test_one():\n    pass\n")
        os.chmod(test, 0o644)
        result = subprocess.run(
            [
                *setpriv,
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "--uffd-report=json:missing/sub/x.json",
                "test_one.py",
            ],
            cwd=work,
            env={**env, "HOME": work},
            capture_output=True,
            text=True,
            timeout=100,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "missing/sub/x.json" in result.stderr and "not writable" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(120)
def test_fixture_name_must_be_str(pytester: pytest.Pytester) -> None:
    """Issue 9 item 12: name=b"x" is refused by the fixture with a clear error
    (it used to crash the JSON writer at the end of the session)."""
    _needs_uffd()
    pytester.makepyfile(
        """
        import pytest
        from pytest_uffd_guard import InvalidBufferError

        def test_name(guarded_buffer):
            with pytest.raises(InvalidBufferError, match="must be a str, got bytes b'x'"):
                guarded_buffer(8, name=b"x")
            guarded_buffer(8, name="x")[0] = 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report=json:r.json", timeout=100)
    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "r.json").read_text())["findings"][0]["buffer"] == "x"


# ------------------------------------------------------------ item 16


@pytest.mark.timeout(120)
def test_fixture_takes_guardedbuffer_keywords(pytester: pytest.Pytester) -> None:
    """Issue 9 item 16: engine=, backing=, stacks= and max_records= reach
    GuardedBuffer, and win over --uffd-engine / --uffd-stacks."""
    _needs_uffd()
    if not capabilities().has("wp_hugetlbfs_shmem"):
        pytest.skip("shmem under sync needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+)")
    pytester.makepyfile(
        """
        import mmap

        P = mmap.PAGESIZE

        def test_keywords(guarded_buffer):
            shm = guarded_buffer(P, name="shm", backing="shmem", readonly=False)
            assert shm.backing == "shmem" and shm.engine == "sync"
            diff = guarded_buffer(P, engine="diff", readonly=False)
            assert diff.engine == "diff"
            few = guarded_buffer(3 * P, max_records=1, readonly=False)
            for page in range(3):
                few[page * P] = 1
            assert len(few.writes) == 1 and few.overflowed == 2
            named = guarded_buffer(P, stacks=4, readonly=False)
            named[0] = 1
            assert named.writes[0].stack
            default = guarded_buffer(P, readonly=False)
            default[0] = 1
            assert not default.writes[0].stack  # the session's --uffd-stacks=0
        """
    )
    result = pytester.runpytest_subprocess("--uffd-engine=sync", "--uffd-stacks=0", timeout=100)
    result.assert_outcomes(passed=1)


# ------------------------------------------------------------ item 19

DEEP = """
    import numpy as np
    import pytest

    @pytest.fixture
    def samples():
        return np.arange(4096, 0, -1, dtype=np.float64)

    @pytest.mark.readonly_buffer("samples")
    def test_median(samples):
        assert np.median(samples, overwrite_input=True) == 2048.5
"""


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if re.match(r"^[=_-]{3,} [A-Za-z].* [=_-]{3,}$", lines[i])
        ),
        len(lines),
    )
    return lines[start:end]


@pytest.mark.timeout(120)
def test_deep_library_write_shows_the_tests_line_once(pytester: pytest.Pytester) -> None:
    """Issue 9 item 19: a write deep in a library (np.median with
    overwrite_input) shows the frame that wrote, folds the library frames,
    shows the test's own line, and shows one stack once with its count."""
    _needs_uffd()
    if not HAVE_NUMPY:
        pytest.skip("numpy is not installed")
    pytester.makepyfile(DEEP)
    result = pytester.runpytest_subprocess(*sync_engine_args(), timeout=100)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "written from:",
            "samples 8 writes at offsets *, innermost first:",
            "    numpy/*.py:* in *",
            "    ... * library frames",
            "    test_deep_library_write_shows_the_tests_line_once.py:10 in test_median",
        ]
    )
    section = _section(result.stdout.str(), "uffd-guard writes (call)")
    assert sum("innermost first" in line for line in section) == 1
    assert "elements 0..4095 of float64[4096]" in result.stdout.str()


@pytest.mark.timeout(120)
def test_verbose_stacks_drop_pytest_machinery(pytester: pytest.Pytester) -> None:
    """Issue 9 item 19: -v shows the whole stack but not pytest's or pluggy's frames."""
    _needs_uffd()
    if not HAVE_NUMPY:
        pytest.skip("numpy is not installed")
    pytester.makepyfile(DEEP)
    result = pytester.runpytest_subprocess("-v", *sync_engine_args(), timeout=100)
    section = _section(result.stdout.str(), "writers' Python stacks:")
    assert any("in test_median" in line for line in section)
    assert not [line for line in section if "/_pytest/" in line or "/pluggy/" in line]
    assert any("frames of pytest's machinery" in line for line in section)
    assert len(section) < 15


@pytest.mark.timeout(120)
def test_junitxml_names_the_system_call(pytester: pytest.Pytester) -> None:
    """Issue 9 item 19: a kernel write's uffd_write property names the system call."""
    _needs_uffd()
    pytester.path.joinpath("data.bin").write_bytes(b"x" * 64)
    pytester.makepyfile(
        """
        import pytest

        def test_readinto(guarded_buffer):
            buf = guarded_buffer(64, name="out", readonly=False)
            try:
                with open("data.bin", "rb", buffering=0) as f:
                    f.readinto(buf)
            except OSError:
                pytest.skip("user-mode-only userfaultfd: the kernel cannot write here")
            if not any(w.syscall for w in buf.writes):
                pytest.skip("this engine does not name the system call")
        """
    )
    result = pytester.runpytest_subprocess("--junitxml=out.xml", timeout=100)
    if result.parseoutcomes().get("skipped"):
        pytest.skip("no kernel write with a named system call on this machine")
    xml = (pytester.path / "out.xml").read_text()
    assert re.search(
        r'name="uffd_write" value="out call offset=0(\(page\))? [^"]*syscall=read', xml
    ), xml


@pytest.mark.timeout(120)
def test_summary_writer_column_is_bounded(pytester: pytest.Pytester) -> None:
    """Issue 9 item 19: twenty writer threads no longer make a 400-character cell."""
    _needs_uffd()
    pytester.makepyfile(
        """
        import mmap
        import threading

        def test_threads(guarded_buffer):
            buf = guarded_buffer(20 * mmap.PAGESIZE, name="shared", readonly=False)
            view = memoryview(buf)

            def write(i):
                view[i * mmap.PAGESIZE] = 1

            threads = [
                threading.Thread(target=write, args=(i,), name=f"a-worker-with-a-long-name-{i}")
                for i in range(20)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            view.release()
        """
    )
    result = pytester.runpytest_subprocess(
        "--uffd-report", "--uffd-stacks=20", *sync_engine_args(), timeout=100
    )
    result.assert_outcomes(passed=1)
    section = _section(result.stdout.str(), "uffd-guard report")
    assert any("test_threads" in line for line in section)
    assert max(len(line) for line in section) < 300, max(section, key=len)
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        result.stdout.fnmatch_lines(["*(+19 other writers)*"])
    else:
        # Issue 12: with the GIL off (3.13t) the twenty writers fault at the
        # same time, and a write whose capture finds another one in flight
        # is recorded without its writer: fewer than twenty are named.
        result.stdout.fnmatch_lines(["*(+* other writers)*"])


def test_main_help_hides_the_internal_command() -> None:
    """Issue 9 item 19: python -m pytest_uffd_guard --help lists doctor, not _e2e."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest_uffd_guard", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    assert "doctor" in out and "_e2e" not in out and "SUPPRESS" not in out


@pytest.mark.timeout(120)
def test_example_project_needs_no_pytest_timeout() -> None:
    """Issue 9 item 19: `pytest examples/` from the repository root, without
    pytest-timeout, warns about no unknown option."""
    _needs_uffd()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:timeout", "-p", "no:cacheprovider", "examples/"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert "Unknown config option" not in result.stdout + result.stderr
    assert "2 failed, 3 passed" in result.stdout


def test_docs_samples_have_no_thread_column() -> None:
    """Issue 9 item 19: no sample table in the README or docs shows the old
    `thread` column of the writes table."""
    old = re.compile(r"^buffer\s+phase\s+offset\s+thread\s+status\s*$", re.M)
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    stale = [str(p.relative_to(ROOT)) for p in pages if old.search(p.read_text())]
    assert not stale
