"""The contract between the C core and the Python package (issue 10, "contracts
checked, not commented").

Every constant the Python side repeats from ``pytest_uffd_guard/_uffd/uffd.h``
(the record layout, ``ATTR_*``, ``SYSCALL_*``, ``KIND_*``, the feature bits)
must equal the extension's own export; these tests fail when one side changes
alone.
"""

from __future__ import annotations

import struct
import types

import pytest

from pytest_uffd_guard.kernel import capabilities as probe
from pytest_uffd_guard.kernel import capture as attribution
from pytest_uffd_guard.kernel import records, syscalls
from tests.conftest import bound, run_python

_uffd = pytest.importorskip("pytest_uffd_guard._uffd")


def test_record_layout_matches_the_extension() -> None:
    """issue 10: records.RECORD_SIZE was kept equal to sizeof(struct
    fault_record) only by a comment."""
    assert _uffd.RECORD_SIZE == records.RECORD_SIZE == struct.calcsize(records.RECORD_FORMAT)
    assert (_uffd.KIND_WRITE, _uffd.KIND_DISCARD) == (records.KIND_WRITE, records.KIND_DISCARD)
    assert set(records.KIND_NAMES) == {_uffd.KIND_WRITE, _uffd.KIND_DISCARD}


def test_every_attr_value_is_exported_and_equal() -> None:
    """issue 10: attribution.ATTR_* mirrored enum ATTR_* by hand; the C core
    exported only the first seven (ATTR_NAMING .. ATTR_UNKNOWN were unchecked)."""
    ours = {n: getattr(attribution, n) for n in dir(attribution) if n.startswith("ATTR_")}
    theirs = {n: getattr(_uffd, n) for n in dir(_uffd) if n.startswith("ATTR_")}
    assert ours == theirs
    assert sorted(theirs.values()) == list(range(len(theirs)))  # append, never renumber


def test_syscall_markers_match() -> None:
    """issue 10: SYSCALL_USER / SYSCALL_UNKNOWN are the extension's."""
    assert (syscalls.SYSCALL_USER, syscalls.SYSCALL_UNKNOWN) == (
        _uffd.SYSCALL_USER,
        _uffd.SYSCALL_UNKNOWN,
    )
    assert records.RawFault(0, 0, 0, 0, 0).syscall == _uffd.SYSCALL_UNKNOWN


def test_every_feature_bit_is_exported_and_equal() -> None:
    """issue 10: probe.FEATURES lists every UFFD_FEATURE_* bit by hand; the
    extension exported only some of them."""
    theirs = {
        n.removeprefix("FEATURE_").lower(): getattr(_uffd, n)
        for n in dir(_uffd)
        if n.startswith("FEATURE_")
    }
    assert theirs == probe.FEATURES


def test_event_numbers_are_exported() -> None:
    """issue 10: the uffd_msg events the handler dispatches on are exported
    (EVENT_*), so handler_state's unexpected_event can be named in Python."""
    events = {n: getattr(_uffd, n) for n in dir(_uffd) if n.startswith("EVENT_")}
    assert events == {
        "EVENT_PAGEFAULT": 0x12,
        "EVENT_FORK": 0x13,
        "EVENT_REMAP": 0x14,
        "EVENT_REMOVE": 0x15,
        "EVENT_UNMAP": 0x16,
    }


def test_load_core_checks_the_contract() -> None:
    """issue 10: the record size is asserted where the extension is loaded;
    an unbuilt checkout (the C sources' folder imports as an empty namespace
    package) or another version's extension is named, not unpacked wrongly."""
    assert records.load_core() is _uffd
    unbuilt = types.ModuleType("pytest_uffd_guard._uffd")
    assert records.core_mismatch(unbuilt) == "the C extension pytest_uffd_guard._uffd is not built"
    old = types.SimpleNamespace(RECORD_SIZE=64, KIND_WRITE=0, KIND_DISCARD=1)
    reason = records.core_mismatch(old)
    assert reason is not None and "64-byte records" in reason


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("uffd")
def test_an_unexpected_fork_event_is_named_and_frees_the_child() -> None:
    """issue 10: an unexpected uffd event was counted and the handler gave up
    with only a hex number; a FORK event's new userfaultfd (the child's
    memory) stayed open in the parent, so the child's first write into a
    guarded page blocked forever.  Now the event is named in handler_state
    and the child's fd is closed, which unregisters the child's ranges."""
    result = run_python(
        f"""
        import ctypes, mmap, os, sys, time
        from pytest_uffd_guard import _uffd as core
        from pytest_uffd_guard.kernel.handler import HANDLER as ENGINE
        from pytest_uffd_guard.kernel.capabilities import capabilities
        from pytest_uffd_guard.kernel.uffd import open_uffd

        P = mmap.PAGESIZE
        caps = capabilities()
        fd = open_uffd(caps.open_method)
        features = ENGINE.features(caps) | core.FEATURE_EVENT_FORK
        try:
            core.api(fd, features)
        except OSError as exc:   # EPERM: EVENT_FORK needs CAP_SYS_PTRACE (5.16+)
            print("skip", exc.strerror)
            sys.exit(0)
        core.handler_start(fd, P, features)
        buf = mmap.mmap(-1, P)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        buf[0] = 1                                  # populated: protecting marks it
        gid, _ = core.guard_add(addr, P, P, 16)
        core.guard_protect(gid, True)
        pid = os.fork()
        if pid == 0:
            ctypes.memset(addr, 2, 1)               # blocked for good before the fix
            os._exit(0)
        deadline = time.monotonic() + {bound(10)}
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "hung"
        state = core.handler_state()
        print("child", status)
        print("failed", state["failed"], state["error"])
        print("event", state.get("unexpected_event") == core.EVENT_FORK,
              state.get("unexpected_event_name"))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.startswith("skip"):
        pytest.skip(f"UFFD_FEATURE_EVENT_FORK refused: {result.stdout.split(None, 1)[1]}")
    lines = result.stdout.splitlines()
    assert lines[0] == "child 0", result.stdout
    assert lines[1].startswith("failed True unexpected userfaultfd event FORK"), result.stdout
    assert lines[2] == "event True FORK", result.stdout


def test_handler_state_names_what_it_counts() -> None:
    """issue 10: unmatched faults and resolution errors were only counted;
    handler_state now also carries the last one as a sentence (``warning``)
    and the last unexpected event, so Python can show them."""
    state = _uffd.handler_state()
    assert {"warning", "unexpected_event", "unexpected_event_name"} <= set(state)
    assert isinstance(state["warning"], str) and state["unexpected_event"] >= 0
