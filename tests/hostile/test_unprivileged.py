"""Unprivileged users and kernel writes (issue 9 item 9).

An unprivileged user with ``vm.unprivileged_userfaultfd=0`` and no access
to /dev/userfaultfd gets a ``UFFD_USER_MODE_ONLY`` userfaultfd: under the
sync engine a ``readinto`` into a guarded buffer fails with EFAULT, or comes
back short across a written page.  ``auto`` must not change what the program
sees there: async where the kernel has WP_ASYNC (kernel writes recorded),
else diff; and the header, the JSON, the skip and the doctor must tell the
same story, the unusable case included.

The unprivileged runs really are unprivileged: ``setpriv`` to the user
nobody, with a copy of the package (and of pytest) that nobody can read.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_uffd_guard import capabilities

P = mmap.PAGESIZE
NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
HELPERS = Path(__file__).resolve().parent.parent / "helpers"
#: What the inner runs import besides the package: pytest and the doctor's table printer.
DEPENDENCIES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "tabulate", "py")

#: The inner test: a decoder fills a readonly=False buffer with read(2)
#: across a page it already wrote into a protected one, and with readv(2)
#: from a pipe into a protected page; every byte must arrive.
DECODER_TEST = f"""
    import os

    P = {P}

    def test_decoder(guarded_buffer, tmp_path):
        src = tmp_path / "src.bin"
        src.write_bytes(b"0123456789")
        buf = guarded_buffer(bytes(2 * P), name="decoded", readonly=False)
        buf[P - 5] = 1
        with open(src, "rb", buffering=0) as f:
            n = f.readinto(memoryview(buf)[P - 5 : P + 5])
        assert n == 10 and bytes(buf[P - 5 : P + 5]) == b"0123456789"
        r, w = os.pipe()
        os.write(w, b"abc")
        assert os.readv(r, [memoryview(buf)[P + 100 : P + 103]]) == 3
        assert bytes(buf[P + 100 : P + 103]) == b"abc"
"""


@dataclass
class Nobody:
    """How to run Python as the user nobody, on a readable copy of the code."""

    python: str
    root: str
    env: dict[str, str]

    def run(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full = {**os.environ, **self.env, **(env or {})}
        return subprocess.run(
            [*SETPRIV, self.python, *args],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )


def _copy_module(name: str, dest: Path) -> None:
    try:
        module = __import__(name)
    except ImportError:
        return
    origin = Path(getattr(module, "__file__", "") or "")
    if origin.name == "__init__.py":
        shutil.copytree(origin.parent, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        site = origin.parent.parent
    elif origin.is_file():
        shutil.copy(origin, dest)
        site = origin.parent
    else:
        return
    # The metadata too: pluggy and pytest read their own version from it, and
    # the Python nobody runs may not see this venv's site-packages.
    for info in site.glob(f"{name}-*.dist-info"):
        shutil.copytree(info, dest / info.name)


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    """Skip unless this is a root on Linux that can become nobody."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("simulating an unprivileged user needs root (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("no setpriv (util-linux)")
    python = None
    for candidate in (sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3"):
        if not candidate:
            continue
        check = subprocess.run(
            [
                *SETPRIV,
                candidate,
                "-c",
                f"import sys; assert sys.version_info[:2] == {tuple(sys.version_info[:2])!r}",
            ],
            capture_output=True,
            timeout=30,
        )
        if check.returncode == 0:
            python = candidate
            break
    if python is None:
        pytest.skip("no Python of this version that the user nobody can run")
    import pytest_uffd_guard

    root = Path(tempfile.mkdtemp(prefix="uffd-unpriv-"))
    try:
        lib = root / "lib"
        shutil.copytree(
            Path(pytest_uffd_guard.__file__).parent,
            lib / "pytest_uffd_guard",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for name in DEPENDENCIES:
            _copy_module(name, lib)
        for dirpath, _, files in os.walk(root):
            os.chmod(dirpath, 0o777 if dirpath == str(root) else 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        env = {
            "PYTHONPATH": str(lib),
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": str(root),
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        }
        yield Nobody(python, str(root), env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _user_mode_only_for_nobody(nobody: Nobody) -> None:
    """Skip unless nobody really is limited to user-mode faults here."""
    probe = nobody.run(
        ["-c", "from pytest_uffd_guard import capabilities; print(capabilities().open_method)"]
    )
    assert probe.returncode == 0, probe.stderr
    if probe.stdout.strip() != "syscall-user-mode-only":
        pytest.skip(
            f"the user nobody opens userfaultfd by {probe.stdout.strip()} here, not user-mode "
            "only (Linux < 5.11 has none; vm.unprivileged_userfaultfd=1 or /dev/userfaultfd "
            "access gives full userfaultfd)"
        )
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
    except OSError:
        pytest.skip("no /proc/sys/vm/unprivileged_userfaultfd")
    if sysctl != "0":
        pytest.skip(
            "vm.unprivileged_userfaultfd=1: unprivileged users get full userfaultfd here "
            "(this test needs 0 and does not change it)"
        )
    try:
        st = os.stat("/dev/userfaultfd")
    except OSError:
        return
    if st.st_mode & stat.S_IWOTH and st.st_mode & stat.S_IROTH:
        pytest.skip("/dev/userfaultfd is open to every user: nobody is not limited here")


def _needs_wp_async() -> None:
    if not capabilities().has("wp_async"):
        pytest.skip("needs UFFD_FEATURE_WP_ASYNC (Linux 6.7+)")


def _run_pytest(
    nobody: Nobody, name: str, test: str, env: dict[str, str], *args: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """Run ``test`` under pytest as nobody; the result and its JSON report."""
    work = Path(nobody.root) / name
    work.mkdir(mode=0o777)
    os.chmod(work, 0o777)
    (work / f"test_{name}.py").write_text(textwrap.dedent(test))
    report = work / "report.json"
    result = nobody.run(
        [
            "-m",
            "pytest",
            "-p",
            "pytest_uffd_guard.plugin",
            "-p",
            "no:cacheprovider",
            "-rs",
            "--basetemp",
            str(work / "tmp"),
            f"--uffd-report=json:{report}",
            *args,
            str(work),
        ],
        env=env,
    )
    data = json.loads(report.read_text()) if report.exists() else {}
    return result, data


def _doctor(nobody: Nobody, env: dict[str, str]) -> dict[str, object]:
    result = nobody.run(["-m", "pytest_uffd_guard", "doctor", "--json"], env=env)
    assert result.stdout.startswith("{"), result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _header(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("uffd-guard: engine ")]
    assert len(lines) == 1, result.stdout
    return lines[0]


def _offsets(data: dict[str, object], buffer: str) -> list[int]:
    findings = data.get("findings")
    assert isinstance(findings, list), data
    return [w["offset"] for f in findings if f["buffer"] == buffer for w in f["writes"]]


@pytest.mark.timeout(240)
def test_nobody_with_wp_async_auto_records_kernel_writes(nobody: Nobody) -> None:
    """issue 9 item 9: as nobody (user-mode only) with WP_ASYNC, auto runs async:
    read(2) and readv(2) into a readonly=False guarded buffer get every byte,
    the writes are reported, and header, JSON and doctor say async."""
    _user_mode_only_for_nobody(nobody)
    _needs_wp_async()
    result, data = _run_pytest(nobody, "wpasync", DECODER_TEST, {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout, result.stdout
    header = _header(result)
    assert header.startswith("uffd-guard: engine async (auto), kernel "), header
    assert "writers not named" in header, header
    offsets = _offsets(data, "decoded")
    assert {P - 5, P} <= set(offsets), offsets  # one record per page: its first change
    assert data["engine"] == "async", data["engine"]
    assert "writers are not named: this user's userfaultfd is user-mode only" in str(
        data["engine_reason"]
    )
    doctor = _doctor(nobody, {})
    assert doctor["engine"] == "async" and doctor["engine_usable"] is True
    assert str(doctor["verdict"]).startswith("READY, WRITERS NOT NAMED: auto runs the async")
    assert "/dev/userfaultfd (Linux 6.1+)" in str(doctor["verdict"])


@pytest.mark.timeout(240)
def test_nobody_without_wp_async_auto_runs_diff(nobody: Nobody) -> None:
    """issue 9 item 9: as nobody without WP_ASYNC (as on 5.11-6.6), auto runs diff,
    for the plugin and for GuardedBuffer(engine="auto") alike: readinto across
    a written page into a protected one returns all 10 bytes (sync: 5) and the
    change is reported; header, JSON and doctor say diff."""
    _user_mode_only_for_nobody(nobody)
    env = {"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_async"}
    result, data = _run_pytest(nobody, "nowpasync", DECODER_TEST, env)
    assert result.returncode == 0, result.stdout + result.stderr
    header = _header(result)
    assert header.startswith("uffd-guard: engine diff (auto), kernel "), header
    assert "user-mode-only userfaultfd without WP_ASYNC" in header, header
    assert {P - 5, P} <= set(_offsets(data, "decoded"))
    assert data["engine"] == "diff"
    doctor = _doctor(nobody, env)
    assert doctor["engine"] == "diff" and doctor["engine_usable"] is True
    assert str(doctor["verdict"]).startswith("READY, BYTE COMPARISON: auto runs the diff")

    direct = nobody.run(
        [
            "-c",
            textwrap.dedent(
                f"""
                import json, os
                from pytest_uffd_guard import GuardedBuffer
                P = {P}
                path = os.path.join({nobody.root!r}, "nowpasync", "direct.bin")
                with open(path, "wb") as f:
                    f.write(b"0123456789")
                with GuardedBuffer(2 * P) as buf:
                    buf[P - 5] = 1
                    with open(path, "rb", buffering=0) as f:
                        n = f.readinto(memoryview(buf)[P - 5 : P + 5])
                    print(json.dumps({{"engine": buf.engine, "n": n,
                                       "changes": [[c.offset, c.length] for c in buf.changes()]}}))
                """
            ),
        ],
        env=env,
    )
    assert direct.returncode == 0, direct.stderr
    out = json.loads(direct.stdout)
    assert out == {"engine": "diff", "n": 10, "changes": [[P - 5, 10]]}, out


@pytest.mark.timeout(240)
def test_nobody_explicit_sync_is_warned_and_hinted(nobody: Nobody) -> None:
    """issue 9 item 9: --uffd-engine=sync still runs for a user-mode-only user, and
    says so: the header warns that kernel writes fail, the failing test gets
    the EFAULT hint naming what auto would do; the doctor agrees on auto."""
    _user_mode_only_for_nobody(nobody)
    test = """
        import os

        def test_pipe(guarded_buffer):
            buf = guarded_buffer(4096, readonly=False)
            r, w = os.pipe()
            os.write(w, b"abc")
            os.readv(r, [memoryview(buf)[0:3]])
    """
    result, data = _run_pytest(nobody, "explicitsync", test, {}, "--uffd-engine=sync")
    assert result.returncode == 1, result.stdout + result.stderr
    header = _header(result)
    assert header.startswith("uffd-guard: engine sync, kernel "), header
    assert header.endswith(
        "; user-mode only: kernel writes (readinto) fail with EFAULT or come back short"
    ), header
    assert "Errno 14" in result.stdout
    auto = "async" if capabilities().has("wp_async") else "diff"
    assert (
        f"The sync engine was asked for by name (--uffd-engine / uffd_engine); auto runs {auto}"
        in result.stdout
    )
    assert data["engine"] == "sync"
    assert "fail with EFAULT or come back short" in str(data["engine_reason"])
    assert _doctor(nobody, {})["engine"] == auto


@pytest.fixture(scope="module")
def seccomp_deny(tmp_path_factory: pytest.TempPathFactory) -> str:
    if sys.platform != "linux":
        pytest.skip("seccomp is Linux-only")
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler to build tests/helpers/seccomp_deny.c")
    out = tmp_path_factory.mktemp("seccomp") / "seccomp_deny"
    build = subprocess.run(
        [cc, "-O2", "-o", str(out), str(HELPERS / "seccomp_deny.c")],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.skip(f"could not build seccomp_deny: {build.stderr.strip()[:200]}")
    return str(out)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["no write-protect", "seccomp"])
def test_unusable_skip_header_json_doctor_agree(
    how: str, seccomp_deny: str, tmp_path: Path
) -> None:
    """issue 9 item 9 / issue 10: with userfaultfd unusable, guarded tests are skipped
    and the JSON and the doctor say the same (they said engine "diff")."""
    env = dict(os.environ)
    prefix: list[str] = []
    if how == "seccomp":
        prefix = [seccomp_deny]
    else:
        env["PYTEST_UFFD_GUARD_HIDE_FEATURES"] = "pagefault_flag_wp"
    (tmp_path / "test_it.py").write_text("def test_it(guarded_buffer):\n    guarded_buffer(8)\n")
    report = tmp_path / "report.json"
    run = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rs",
            f"--uffd-report=json:{report}",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 skipped" in run.stdout, run.stdout
    skip = next(line for line in run.stdout.splitlines() if line.startswith("SKIPPED"))
    reason = skip.split(": ", 1)[1]
    assert "UNAVAILABLE (guarded tests are skipped)" in _header(run)
    data = json.loads(report.read_text())
    assert data["engine"] == "none", data["engine"]
    doctor = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest_uffd_guard", "doctor", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = json.loads(doctor.stdout)
    assert out["engine"] == "none" and out["engine_usable"] is False
    assert out["verdict"].startswith("NOT AVAILABLE: ")
    assert "guarded tests are skipped" in out["verdict"]
    # One decision: the doctor's reason is the skip's and the JSON's.
    why = " ".join(str(out["engine_reason"]).split())
    assert why and why in reason and why in " ".join(str(data["engine_reason"]).split())
    assert why in _header(run)


def test_auto_decides_hugetlb_and_big_buffers_in_one_place() -> None:
    """issue 10 / item 9: the hugetlb rule is part of choose_engine (the header's
    session answer names it); a user-mode-only user gets async for every size."""
    from pytest_uffd_guard.engines import AUTO_HYBRID_BYTES, choose_engine

    caps = capabilities()
    if not caps.available:
        pytest.skip(f"userfaultfd write-protect unavailable: {caps.reason}")
    _needs_wp_async()
    huge = choose_engine("auto", 2 << 20, unit=2 << 20, backing="hugetlb")
    assert huge.usable and huge.engine == "async"
    if caps.user_mode_only:
        assert choose_engine("auto", AUTO_HYBRID_BYTES).engine == "async"
    else:
        assert choose_engine("auto", AUTO_HYBRID_BYTES).engine == "hybrid"
        assert "async for hugetlb" in choose_engine("auto").summary
    sync_huge = choose_engine("sync", 2 << 20, unit=2 << 20, backing="hugetlb")
    assert not sync_huge.usable and sync_huge.misuse
