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

from pytest_uffd_guard import doctor
from pytest_uffd_guard.doctor import UNTOUCHED_TRAP, Check, Problem, Report, diagnose, render
from pytest_uffd_guard.probe import KERNEL_WRITES_REMEDY, SECCOMP_REMEDY

from .conftest import run_python

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
        timeout=timeout,
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
    monkeypatch.setattr(doctor.gzip, "open", fake_open)
    source, values = doctor.kernel_config("9.9.9")
    assert source == "/boot/config-9.9.9"
    assert values == {
        "CONFIG_USERFAULTFD": "y",
        "CONFIG_HAVE_ARCH_USERFAULTFD_WP": None,
        "CONFIG_PTE_MARKER_UFFD_WP": "n",
    }


# ------------------------------------------------------- this machine


@pytest.mark.timeout(120)
def test_doctor_here(uffd: None) -> None:
    """On a capable machine: READY, every table, end-to-end as expected."""
    report = diagnose()
    assert report.ok and report.verdict.startswith("READY")
    assert report.engine == "sync"
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


@pytest.mark.timeout(120)
def test_doctor_cli_text_and_json(uffd: None) -> None:
    """``python -m pytest_uffd_guard doctor [--json]`` prints the same report."""
    text = run_doctor()
    assert text.returncode == 0, text.stderr
    assert "== end-to-end" in text.stdout and "Verdict: READY" in text.stdout
    as_json = run_doctor("--json", "--no-e2e")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["ok"] is True and data["engine"] == "sync"
    assert "end-to-end" not in data["sections"]
    features = rows(data, "features (UFFDIO_API)")
    assert features["UFFD_FEATURE_PAGEFAULT_FLAG_WP"]["value"] == "yes"
    assert "never listed here" in features["UFFDIO_API ioctls"]["detail"]


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(60)
def test_e2e_child_reports_cases(uffd: None) -> None:
    """The child side prints one JSON case per check."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest_uffd_guard", "_e2e"],
        capture_output=True,
        text=True,
        timeout=60,
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


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
def test_guarded_buffer_under_seccomp_runs_diff(seccomp_deny: str) -> None:
    """Under the filter, auto cannot run (guarded tests skip); a diff buffer works."""
    result = run_python(
        """
        from pytest_uffd_guard import GuardedBuffer
        from pytest_uffd_guard.tracking import choose_engine
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
            timeout=30,
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


@pytest.mark.timeout(120)
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
    text = run_doctor(env=env, prefix=prefix, python=python)
    assert "Verdict:" in text.stdout, text.stderr
