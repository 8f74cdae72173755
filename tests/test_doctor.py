"""The doctor: tables, JSON, the end-to-end checks, and simulated failures.

Failures are simulated in child processes: an unprivileged user (setpriv to
nobody) and a seccomp filter that denies userfaultfd (a tiny C launcher
built here with gcc), as in a container's default profile.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_uffd_guard import doctor_checks
from pytest_uffd_guard.doctor import UNTOUCHED_TRAP, Check, Problem, Report, diagnose, render
from pytest_uffd_guard.kernel.capabilities import KERNEL_WRITES_REMEDY, capabilities
from pytest_uffd_guard.kernel.uffd import SECCOMP_REMEDY

from .conftest import bound, run_python

HERE = Path(__file__).resolve().parent
NOBODY = 65534
#: The doctor starts a child with sys.executable: it must work for nobody too.
CAN_SPAWN = (
    "import subprocess, sys; assert sys.version_info >= (3, 9); "
    "subprocess.run([sys.executable, '-c', ''], check=True)"
)


def run_doctor(
    *args: str,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
    python: str = sys.executable,
    timeout: float = 90,
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [*(prefix or []), python, "-m", "pytest_uffd_guard", "doctor", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=bound(timeout),
    )


def rows(report: dict[str, object], section: str) -> dict[str, dict[str, str]]:
    sections = report["sections"]
    assert isinstance(sections, dict)
    return {row["item"]: row for row in sections[section]}


# ------------------------------------------------------------ pure parts


def test_render_lists_sections_verdict_and_fixes() -> None:
    """render() is pure: tables, the verdict, each problem with its fix."""
    report = Report(
        sections={"system": [Check("kernel", "6.1.0", "info", "x")]},
        problems=[Problem("it is broken", "do this")],
        verdict="NOT AVAILABLE: because",
    )
    text = render(report)
    assert "== system" in text and "6.1.0" in text
    assert "Verdict: NOT AVAILABLE: because" in text
    assert "1. it is broken" in text and "Fix: do this" in text


def test_kernel_config_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Options set, unset (``# ... is not set``) and absent are told apart."""
    config = tmp_path / "config"
    config.write_text("CONFIG_USERFAULTFD=y\n# CONFIG_PTE_MARKER_UFFD_WP is not set\nCONFIG_X=m\n")
    real_open = open

    def fake_open(path: str, *a: object, **k: object) -> object:
        if str(path).startswith("/boot/config-"):
            return real_open(config, *a, **k)  # type: ignore[call-overload]
        raise OSError(2, "no")

    monkeypatch.setattr("builtins.open", fake_open)
    monkeypatch.setattr(doctor_checks.gzip, "open", fake_open)
    source, values = doctor_checks.kernel_config("9.9.9")
    assert source == "/boot/config-9.9.9"
    assert values == {
        "CONFIG_USERFAULTFD": "y",
        "CONFIG_HAVE_ARCH_USERFAULTFD_WP": None,
        "CONFIG_PTE_MARKER_UFFD_WP": "n",
    }


# ------------------------------------------------------- this machine


@pytest.mark.timeout(bound(120))
def auto_engine() -> str:
    """What auto runs here: sync, or on a user-mode-only userfaultfd async
    (WP_ASYNC, 6.7+) or diff."""
    caps = capabilities()
    if caps.kernel_writes_seen:
        return "sync"
    return "async" if caps.has("wp_async") else "diff"


def test_doctor_here(uffd: None) -> None:
    """On a capable machine: READY, every table, end-to-end as expected."""
    report = diagnose()
    assert report.ok and report.verdict.startswith("READY")
    assert report.engine == auto_engine()
    for section in ("system", "opening a userfaultfd", "features (UFFDIO_API)", "engines"):
        assert report.sections[section]
    kinds = {r.item: r for r in report.sections["write-protect per memory kind (UFFDIO_REGISTER)"]}
    assert kinds["register WP: anonymous"].status == "ok"
    assert "WRITEPROTECT" in kinds["register WP: anonymous"].value
    e2e = {r.item: r for r in report.sections["end-to-end"]}
    assert e2e["write into a touched protected page"].value == "caught"
    trap = e2e["write into an untouched protected page (fd without WP_UNPOPULATED)"]
    assert trap.value == "not caught" and trap.detail == UNTOUCHED_TRAP
    assert trap.status == "ok"  # expected, not a problem
    assert all(r.status != "FAIL" for rs in report.sections.values() for r in rs)


@pytest.mark.timeout(bound(120))
def test_doctor_cli_text_and_json(uffd: None) -> None:
    """``python -m pytest_uffd_guard doctor [--json]`` prints the same report."""
    text = run_doctor()
    assert text.returncode == 0, text.stderr
    assert "== end-to-end" in text.stdout and "Verdict: READY" in text.stdout
    as_json = run_doctor("--json", "--no-e2e")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["ok"] is True and data["engine"] == auto_engine()
    assert "end-to-end" not in data["sections"]
    features = rows(data, "features (UFFDIO_API)")
    assert features["UFFD_FEATURE_PAGEFAULT_FLAG_WP"]["value"] == "yes"
    assert "never listed here" in features["UFFDIO_API ioctls"]["detail"]


@pytest.mark.timeout(bound(120))
def test_doctor_hidden_features(uffd: None) -> None:
    """A simulated 6.1 kernel: the missing features are problems with a remedy."""
    result = run_doctor(
        "--json", "--no-e2e", env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_unpopulated,wp_async"}
    )
    data = json.loads(result.stdout)
    features = rows(data, "features (UFFDIO_API)")
    # "hidden (env)" where the kernel has it, "no" on a kernel that lacks it.
    assert features["UFFD_FEATURE_WP_ASYNC"]["value"] in ("hidden (env)", "no")
    problems = {p["problem"]: p["remedy"] for p in data["problems"]}
    assert any("WP_UNPOPULATED is missing" in p for p in problems)
    assert any("run Linux 6.7 or newer" in r for r in problems.values())
    engines = rows(data, "engines")
    assert engines["async"]["value"] == "unavailable"


@pytest.mark.timeout(bound(60))
def test_e2e_child_reports_cases(uffd: None) -> None:
    """The child side prints one JSON case per check."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest_uffd_guard", "_e2e"],
        capture_output=True,
        text=True,
        timeout=bound(60),
    )
    cases = {c["case"]: c for c in json.loads(result.stdout)}
    assert cases["write into a touched protected page"]["caught"] is True
    assert (
        cases["write into an untouched protected page (fd without WP_UNPOPULATED)"]["caught"]
        is False
    )


# ------------------------------------------------- simulated failures


@pytest.fixture(scope="module")
def seccomp_deny(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seccomp launcher, built with gcc (skip without one)."""
    if sys.platform != "linux":
        pytest.skip("seccomp is Linux-only")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build tests/helpers/seccomp_deny.c")
    out = tmp_path_factory.mktemp("seccomp") / "seccomp_deny"
    build = subprocess.run(
        [cc, "-O2", "-o", str(out), str(HERE / "helpers" / "seccomp_deny.c")],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.skip(f"could not build seccomp_deny: {build.stderr.strip()[:200]}")
    return str(out)


@pytest.mark.timeout(bound(120))
def test_doctor_under_seccomp_filter(seccomp_deny: str) -> None:
    """userfaultfd denied by seccomp: NOT AVAILABLE, the filter named, its fix."""
    result = run_doctor("--json", prefix=[seccomp_deny])
    assert result.returncode == 1, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is False and data["engine"] == "none" and data["engine_usable"] is False
    assert data["verdict"].startswith("NOT AVAILABLE: userfaultfd is blocked")
    system = rows(data, "system")
    assert system["seccomp (/proc/self/status)"]["value"].startswith("filter")
    opening = rows(data, "opening a userfaultfd")
    assert all(r["status"] == "warn" for r in opening.values())
    assert any("seccomp filter is active" in r["detail"] for r in opening.values())
    assert data["problems"][0]["remedy"] == SECCOMP_REMEDY
    e2e = rows(data, "end-to-end")
    assert next(iter(e2e.values()))["value"] == "not run"


@pytest.mark.timeout(bound(120))
def test_guarded_buffer_under_seccomp_runs_diff(seccomp_deny: str) -> None:
    """Under the filter, auto cannot run (guarded tests skip); a diff buffer works."""
    result = run_python(
        """
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard.engines import choose_engine
        assert not choose_engine("auto").usable
        with GuardedBuffer(8192, engine="diff") as buf:
            buf[100] = 1
            print(buf.engine, [w.offset for w in buf.writes])
        """,
        prefix=[seccomp_deny],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["diff", "[100]"]


@pytest.fixture(scope="module")
def nobody_env() -> Iterator[tuple[str, dict[str, str]]]:
    """A python nobody can run, and a copy of the package nobody can read."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("simulating an unprivileged user needs root (setpriv)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv (util-linux)")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"]
    python = None
    for candidate in {os.path.realpath(c): None for c in candidates if c}:
        probe = subprocess.run(
            [*prefix, candidate, "-c", CAN_SPAWN],
            capture_output=True,
            timeout=bound(30),
        )
        if probe.returncode == 0:
            python = candidate
            break
    if python is None:
        pytest.skip("no Python interpreter is readable by the nobody user")
    import tabulate

    import pytest_uffd_guard

    root = tempfile.mkdtemp(prefix="uffd-nobody-")
    try:
        package = Path(pytest_uffd_guard.__file__).parent
        shutil.copytree(package, Path(root) / "pytest_uffd_guard")
        tab = Path(tabulate.__file__)
        if tab.name == "__init__.py":
            shutil.copytree(tab.parent, Path(root) / "tabulate")
        else:
            shutil.copy(tab, root)
        for dirpath, _, files in os.walk(root):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        yield python, {"PYTHONPATH": root, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/"}
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(bound(120))
def test_doctor_as_unprivileged_user(nobody_env: tuple[str, dict[str, str]]) -> None:
    """As nobody: the fd is user-mode only; kernel writes are the problem, with the fix."""
    python, env = nobody_env
    prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    result = run_doctor("--json", env=env, prefix=prefix, python=python)
    data = json.loads(result.stdout or "{}") if result.stdout.startswith("{") else {}
    assert data, result.stderr
    system = rows(data, "system")
    assert system["euid"]["value"] == str(NOBODY)
    opening = rows(data, "opening a userfaultfd")
    if data["ok"]:
        unpriv = system["vm.unprivileged_userfaultfd"]["value"]
        if unpriv == "1":
            pytest.skip("vm.unprivileged_userfaultfd=1: unprivileged users are not limited here")
        assert opening["open: dev"]["status"] == "warn"
        assert opening["kernel writes (readinto, recv_into)"]["value"] == "not seen"
        remedies = [p["remedy"] for p in data["problems"]]
        assert KERNEL_WRITES_REMEDY in remedies
        e2e = rows(data, "end-to-end")
        assert e2e["write into a touched protected page"]["value"] == "caught"
    else:  # a kernel < 5.11 has no user-mode-only fds: nothing opens
        assert data["verdict"].startswith("NOT AVAILABLE")
        version = tuple(int(x) for x in system["kernel"]["detail"].split("."))
        if version < (5, 11) and system["vm.unprivileged_userfaultfd"]["value"] == "0":
            # issue 13 item 2: the sysctl denies everything before 5.11
            assert "before Linux 5.11" in opening["open: syscall"]["detail"]
            assert "before Linux 5.11" in opening["open: syscall-user-mode-only"]["detail"]
            assert "no userfaultfd at all" in system["vm.unprivileged_userfaultfd"]["detail"]
            [first] = data["problems"][:1]
            assert "vm.unprivileged_userfaultfd=1" in first["remedy"]
            assert "grant" not in first["remedy"]
    text = run_doctor(env=env, prefix=prefix, python=python)
    assert "Verdict:" in text.stdout, text.stderr


def test_open_failure_wording_follows_the_kernel() -> None:
    """issue 13 item 2: before 5.11 vm.unprivileged_userfaultfd=0 denies every
    unprivileged open (no user-mode-only mode), /dev/userfaultfd exists only
    from 6.1, and a forced user-mode-only open on 5.10 needs 5.11, not the sysctl."""
    import errno

    from pytest_uffd_guard.kernel.uffd import (
        OpenAttempt,
        explain_open_failure,
        unprivileged_userfaultfd,
        why_no_fd,
    )

    old, new = (5, 10, 0), (6, 12, 0)
    for method in ("syscall", "syscall-user-mode-only"):
        text = explain_open_failure(method, errno.EPERM, 0, old)
        assert "before Linux 5.11" in text and "no user-mode-only" in text
    assert "user-mode faults only" in explain_open_failure("syscall", errno.EPERM, 0, new)
    assert "before Linux 6.1" in explain_open_failure("dev", errno.ENOENT, 0, old)
    assert "6.1" not in explain_open_failure("dev", errno.ENOENT, 0, new)
    # Under a seccomp filter, when the sysctl cannot be why (root, or it is
    # 1): the filter is named, not the sysctl (seen on 5.10 as nobody).
    if os.geteuid() == 0 or unprivileged_userfaultfd() == 1:
        for version in (old, new):
            assert "seccomp" in explain_open_failure("syscall", errno.EPERM, 2, version)

    denied = [
        OpenAttempt(m, False, errno.EPERM if m != "dev" else errno.ENOENT, "", "")
        for m in ("dev", "syscall", "syscall-user-mode-only")
    ]
    _, remedy = why_no_fd(denied, 0, old)
    assert "vm.unprivileged_userfaultfd=1" in remedy and "before Linux 5.11" in remedy
    assert "grant" not in remedy
    _, remedy = why_no_fd([OpenAttempt("syscall-user-mode-only", False, errno.EINVAL)], 0, old)
    assert "needs Linux 5.11+" in remedy and "sysctl" not in remedy
    _, remedy = why_no_fd(denied, 0, new)
    assert "/dev/userfaultfd" in remedy


def test_no_write_protect_reason_names_the_architecture() -> None:
    """issue 13 item 3: arm64 gained uffd-wp in Linux 6.10, not 5.7."""
    from pytest_uffd_guard.kernel.capabilities import _no_wp_reason, feature_since, wp_since

    assert wp_since("x86_64") == "5.7" and wp_since("aarch64") == "6.10"
    assert feature_since("pagefault_flag_wp", "aarch64") == "6.10"
    reason, remedy = _no_wp_reason("aarch64")
    assert "aarch64 it needs Linux 6.10+" in reason and "Linux 6.10 or newer" in remedy
    reason, remedy = _no_wp_reason("x86_64")
    assert "Linux 5.7+" in reason and remedy.startswith("run on Linux 5.7 or newer")
    assert "arm64 needs Linux 6.10+" in remedy
