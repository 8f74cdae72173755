"""The guarded_buffer fixture and the verdict on writes (issue 3, points 1 and 2)."""

from __future__ import annotations

import pytest

from pytest_uffd_guard.plugin import STATUS_WORD
from pytest_uffd_guard.report import FAILURE_PREFIX, SECTION_TITLE
from tests.conftest import expected_offset, sync_engine_args

pytestmark = pytest.mark.needs_uffd


def test_factory_forms(pytester: pytest.Pytester) -> None:
    """Sizes, bytes and any C-contiguous buffer are accepted; reads never fail."""
    pytester.makepyfile(
        """
        import array

        def test_forms(guarded_buffer):
            a = guarded_buffer(4096)
            assert len(a) == 4096 and a[:4] == bytes(4) and a.name == "buffer-1"
            b = guarded_buffer(b"hello", name="greeting")
            assert b[:] == b"hello" and b.name == "greeting"
            c = guarded_buffer(array.array("i", [1, 2, 3]))
            assert len(c) == 12
            assert all(buf.tracking for buf in (a, b, c))
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_buffers_closed_at_teardown(pytester: pytest.Pytester) -> None:
    """Every buffer the factory made is closed once the test is torn down."""
    pytester.makepyfile(
        """
        made = []

        def test_make(guarded_buffer):
            made.append(guarded_buffer(100))
            made.append(guarded_buffer(b"x", readonly=False))

        def test_check():
            assert made and all(buf.closed for buf in made)
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2)


def test_ctypes_memmove_fails_test(pytester: pytest.Pytester) -> None:
    """A C-level write (ctypes.memmove) into a read-only buffer fails the test with a table."""
    pytester.makepyfile(
        """
        import ctypes

        def test_c_write(guarded_buffer):
            buf = guarded_buffer(b"hello world" * 10, name="frame")
            raw = (ctypes.c_char * len(buf)).from_buffer(buf)
            ctypes.memmove(ctypes.addressof(raw) + 5, b"XYZ", 3)
            del raw
        """
    )
    result = pytester.runpytest_subprocess("-v", *sync_engine_args())
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"*test_c_write {STATUS_WORD}*",
            f"{FAILURE_PREFIX}: 'frame' (1 write, 1 changed range)*",
            f"*{SECTION_TITLE} (call)*",
            "changed bytes:",
            "*buffer*phase*offset*length*before → after*status*",
            "frame*call*5*3*20776f → 58595a*forbidden*",
            "writes (first write into each page):",
            "frame*call*'MainThread' (tid *)*forbidden*",
        ]
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_thread_write_fails_test(pytester: pytest.Pytester) -> None:
    """A write from a threading.Thread is caught and attributed to a thread id."""
    pytester.makepyfile(
        """
        import threading

        def test_thread(guarded_buffer):
            buf = guarded_buffer(4096, name="shared")
            started = threading.Event()

            def writer():
                view = memoryview(buf)
                view[10] = 1
                view.release()
                started.set()

            thread = threading.Thread(target=writer, name="writer")
            thread.start()
            thread.join(10)
            assert started.is_set()
            assert buf.writes[0].thread_id == thread.native_id
        """
    )
    result = pytester.runpytest_subprocess(*sync_engine_args())
    result.assert_outcomes(failed=1)
    where = "10" if expected_offset(10) == 10 else "0 (page)"  # no EXACT_ADDRESS before 5.18
    result.stdout.fnmatch_lines(
        ["shared*call*10*1*00 → 01*forbidden*", f"shared*call*{where}*tid *"]
    )


def test_output_map_is_reported_not_failed(pytester: pytest.Pytester) -> None:
    """readonly=False: the buffer is an output map; writes are recorded, never held against it."""
    pages = [expected_offset(100), expected_offset(5000)]  # page starts before 5.18
    pytester.makepyfile(
        f"""
        import numpy as np

        def decode(out):
            out[100:104] = 1
            out[5000] = 2

        def test_which_offsets(guarded_buffer):
            buf = guarded_buffer(8192, name="out", readonly=False)
            decode(np.frombuffer(buf, dtype=np.uint8))
            assert [c.offset for c in buf.changes()] == [100, 5000]
            assert sorted(w.offset for w in buf.writes) == {pages}
        """
    )
    result = pytester.runpytest_subprocess("--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    xml = (pytester.path / "out.xml").read_text()
    assert 'name="uffd_change" value="out call offset=100 length=4' in xml
    assert "status=reported" in xml


def test_setup_and_teardown_writes_do_not_fail(pytester: pytest.Pytester) -> None:
    """Writes in setup or teardown are reported, and only the call phase decides."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def frame(guarded_buffer):
            buf = guarded_buffer(64, name="frame")
            buf[0] = 1          # setup
            yield buf
            buf[1] = 2          # teardown

        def test_reads_only(frame):
            assert frame[0] == 1
        """
    )
    result = pytester.runpytest_subprocess("--uffd-report", *sync_engine_args())
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*uffd-guard report*",
            "*test_reads_only*setup*frame*0+1*MainThread*reported*",
            "*test_reads_only*teardown*frame*1+1*MainThread*reported*",
        ]
    )


def test_call_writes_after_setup_writes_are_seen(pytester: pytest.Pytester) -> None:
    """A page written in setup is re-armed, so a call-phase write to it still fails."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.fixture
        def frame(guarded_buffer):
            buf = guarded_buffer(64, name="frame")
            buf[0] = 1
            return buf

        def test_writes_again(frame):
            frame[2] = 3
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["frame*setup*0*1*00 → 01*reported*", "frame*call*2*1*00 → 03*forbidden*"]
    )


def test_unprotected_writes_are_ignored(pytester: pytest.Pytester) -> None:
    """Writes inside buf.unprotected() are the test filling its input, not a finding."""
    pytester.makepyfile(
        """
        def test_fill(guarded_buffer):
            buf = guarded_buffer(16)
            with buf.unprotected():
                buf[:4] = b"abcd"
            assert buf[:4] == b"abcd"
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_failing_test_keeps_its_own_error(pytester: pytest.Pytester) -> None:
    """When the test fails anyway, its traceback stays and the writes are added as a section."""
    pytester.makepyfile(
        """
        def test_both(guarded_buffer):
            buf = guarded_buffer(16, name="b")
            buf[0] = 9
            assert False, "own failure"
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: own failure*", f"*{SECTION_TITLE} (call)*"])
    result.stdout.no_fnmatch_line(f"*{FAILURE_PREFIX}*")


def test_user_mode_only_efault_gets_a_hint(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under UFFD_USER_MODE_ONLY with sync asked for by name, readinto into a guarded
    buffer fails with EFAULT: say why (auto would not run sync there)."""
    from pytest_uffd_guard.plugin import EFAULT_HINT

    monkeypatch.setenv("PYTEST_UFFD_GUARD_OPEN", "syscall-user-mode-only")
    pytester.path.joinpath("data.bin").write_bytes(b"x" * 64)
    pytester.makepyfile(
        """
        def test_readinto(guarded_buffer):
            buf = guarded_buffer(64)
            with open("data.bin", "rb", buffering=0) as f:
                f.readinto(buf)
        """
    )
    result = pytester.runpytest_subprocess("--uffd-engine=sync")
    if "UNAVAILABLE" in result.stdout.str():
        pytest.skip("no UFFD_USER_MODE_ONLY here")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*OSError: [[]Errno 14[]] Bad address*", f"{EFAULT_HINT[:60]}*"])
