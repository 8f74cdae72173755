"""The report header (issue 3, point 6)."""

from __future__ import annotations

import os

import pytest

from pytest_uffd_guard import capabilities
from pytest_uffd_guard.engines import choose_engine
from pytest_uffd_guard.plugin import NOTHING_GUARDED

#: The engine line is said once the collection found a guarded test.
GUARDED = "def test_guarded(guarded_buffer):\n    guarded_buffer(16)\n"

#: Says, at the end of the inner run, whether the kernel was probed.
PROBED = """
import sys

def pytest_unconfigure(config):
    print("PROBED", "pytest_uffd_guard.kernel.capabilities" in sys.modules)
"""


def test_header_one_line(pytester: pytest.Pytester) -> None:
    """One line, after the collection: engine, kernel, what is missing."""
    pytester.makepyfile(GUARDED)
    result = pytester.runpytest_subprocess()
    caps = capabilities()
    if caps.available:
        # sync, or async/diff where the userfaultfd is user-mode only
        engine = choose_engine("auto").engine
        expected = f"uffd-guard: engine {engine} (auto), kernel {os.uname().release}, missing: *"
    else:
        expected = f"uffd-guard: engine auto, kernel {os.uname().release}, UNAVAILABLE*"
    result.stdout.fnmatch_lines([expected])
    assert len([line for line in result.stdout.lines if line.startswith("uffd-guard:")]) == 1


@pytest.mark.needs_uffd
def test_header_verbose_detail(pytester: pytest.Pytester) -> None:
    """-v adds how the fd was opened, the features and the mode."""
    pytester.makepyfile(GUARDED)
    result = pytester.runpytest_subprocess("-v", "--uffd-report")
    result.stdout.fnmatch_lines(
        [
            f"uffd-guard: engine {choose_engine('auto').engine} (auto)*",
            "uffd-guard: opened by *, kernel writes *, features: pagefault_flag_wp*",
            "uffd-guard: mode: report only, require: False",
        ]
    )


@pytest.mark.needs_uffd
def test_header_names_hidden_feature(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing feature is named with the kernel that brought it; -v says what it costs."""
    monkeypatch.setenv("PYTEST_UFFD_GUARD_HIDE_FEATURES", "exact_address")
    pytester.makepyfile(GUARDED)
    result = pytester.runpytest_subprocess("-v")
    result.stdout.fnmatch_lines(
        [
            # Other features may be missing too on an older kernel (6.1).
            "uffd-guard: * missing: *exact_address (Linux 5.18)*",
            "*",
            "uffd-guard: without exact_address: writes are reported at page granularity*",
        ]
    )


@pytest.mark.needs_uffd
def test_header_user_mode_only(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under UFFD_USER_MODE_ONLY auto avoids sync and says why; sync asked for by
    name warns that kernel writes fail with EFAULT or come back short."""
    monkeypatch.setenv("PYTEST_UFFD_GUARD_OPEN", "syscall-user-mode-only")
    pytester.makepyfile(GUARDED)
    result = pytester.runpytest_subprocess()
    if "UNAVAILABLE" in result.stdout.str():
        pytest.skip("this kernel has no UFFD_USER_MODE_ONLY")
    if capabilities().has("wp_async"):
        expected = (
            "uffd-guard: engine async (auto), *; user-mode-only userfaultfd: *writers not named"
        )
    else:
        expected = "uffd-guard: engine diff (auto), *; user-mode-only userfaultfd without WP_ASYNC*"
    result.stdout.fnmatch_lines([expected])
    result = pytester.runpytest_subprocess("--uffd-engine=sync")
    result.stdout.fnmatch_lines(
        [
            "uffd-guard: engine sync, *; user-mode only: kernel writes (readinto) fail with "
            "EFAULT or come back short"
        ]
    )


def test_engine_stacks_and_doctor_options(pytester: pytest.Pytester) -> None:
    """--uffd-engine and --uffd-stacks reach the buffers; ini keys work; CLI wins;
    bad values are usage errors naming their source; --uffd-doctor prints and exits."""
    pytester.makeini("[pytest]\nuffd_engine = diff\nuffd_stacks = 0\n")
    pytester.makepyfile(
        """
        def test_engine(guarded_buffer, request):
            buf = guarded_buffer(4096, readonly=False)
            buf[1] = 1
            print("ENGINE", buf.engine, "STACK", len(buf.writes[0].stack))
        """
    )
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["*ENGINE diff STACK 0*"])
    result = pytester.runpytest_subprocess("-s", "--uffd-engine=sync", "--uffd-stacks=4")
    result.stdout.fnmatch_lines(["*ENGINE sync STACK [1-9]*"])
    result = pytester.runpytest_subprocess("--uffd-engine=bogus")
    result.stderr.fnmatch_lines(["*invalid uffd engine 'bogus' from the command line*"])
    result = pytester.runpytest_subprocess("--uffd-stacks=-1")
    result.stderr.fnmatch_lines(["*invalid uffd stacks '-1' from the command line*"])
    result = pytester.runpytest_subprocess("--uffd-doctor")
    result.stdout.fnmatch_lines(["*kernel*"])
    assert "test_engine" not in result.stdout.str()


def test_nothing_guarded_nothing_probed(pytester: pytest.Pytester) -> None:
    """issue 11 target 4: a run whose tests guard nothing neither probes the
    kernel nor says an engine line (-v says why there is none); one guarded
    test among them brings both back; -q hides the line as it hides the
    header."""
    pytester.makeconftest(PROBED)
    pytester.makepyfile(test_plain="def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-s")
    assert result.ret == 0
    assert not [line for line in result.stdout.lines if line.startswith("uffd-guard:")]
    result.stdout.fnmatch_lines(["*PROBED False*"])
    result = pytester.runpytest_subprocess("-s", "-v")
    result.stdout.fnmatch_lines([NOTHING_GUARDED, "*PROBED False*"])
    pytester.makepyfile(test_guarded=GUARDED)
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["collected 2 items", "uffd-guard: engine *", "*PROBED True*"])
    result = pytester.runpytest_subprocess("-s", "-q")
    assert not [line for line in result.stdout.lines if line.startswith("uffd-guard: engine")]
