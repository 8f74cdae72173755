"""Bad input of unusual types and exhausted resource limits (issue 9 item 18).

Each must end in a project error that names the problem and the fix: never
a bare OSError/MemoryError/TypeError from our code, never a wrong result.
"""

from __future__ import annotations

import mmap
from typing import Any

import pytest

from pytest_uffd_guard import GuardedBuffer, InvalidBufferError, capabilities
from tests.conftest import expected_offset, run_python

np = pytest.importorskip("numpy")
PAGE = mmap.PAGESIZE


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    "size", [np.int64(4096), np.uint16(100), np.int8(5), np.intp(2 * PAGE)], ids=repr
)
def test_numpy_integer_is_a_size(size: Any) -> None:
    """Issue 9 item 18: np.int64(4096) is a size (it was guarded as the
    scalar's 8 bytes of data)."""
    with GuardedBuffer(size, engine="diff") as buf:
        assert len(buf) == int(size)
        assert buf[:] == bytes(int(size))


def test_numpy_array_is_still_data() -> None:
    """A numpy array, even 0-d, is data to copy in, not a size."""
    with GuardedBuffer(np.array(7, dtype=np.int64), engine="diff") as buf:
        assert len(buf) == 8 and buf[0] == 7


BAD_SIZES: list[tuple[Any, str]] = [
    (np.float64(4096), "size must be an int, got float64"),
    (np.float32(1), "size must be an int, got float32"),
    (4096.0, "size must be an int, got float"),
    (3 + 0j, "size must be an int, got complex"),
    (True, "a bool is not a size"),
    (np.True_, "a bool is not a size"),
    (1 << 70, "larger than this platform can address"),
    (-1, "at least one byte, got size -1"),
    (np.int64(-5), "at least one byte, got size -5"),
    (0, "at least one byte, got size 0"),
    ("4096", "a str has no bytes to guard"),
    (None, "cannot guard a NoneType"),
    ([1, 2], "cannot guard a list"),
]


@pytest.mark.parametrize(("size", "message"), BAD_SIZES, ids=lambda v: repr(v)[:30])
def test_bad_size_is_a_clear_error(size: Any, message: str) -> None:
    """Issue 9 item 18: every unusable size is an InvalidBufferError saying so."""
    with pytest.raises(InvalidBufferError, match=message.replace("(", r"\(")) as info:
        GuardedBuffer(size, engine="diff")
    assert info.value.remedy


# ----------------------------------------------------- counts and names

BAD_KEYWORDS: list[tuple[dict[str, Any], str]] = [
    ({"max_records": 1 << 70}, "max_records 1180591620717411303424 is too large"),
    ({"max_records": -1}, "max_records must be >= 0, got -1"),
    ({"max_records": True}, "max_records must be an int, got the bool True"),
    ({"max_records": 2.0}, "max_records must be an int, got float 2.0"),
    ({"max_records": np.float64(2)}, "max_records must be an int, got float64"),
    ({"max_records": "5"}, "max_records must be an int, got str '5'"),
    ({"stacks": -2}, "stacks must be >= 0, got -2"),
    ({"stacks": False}, "stacks must be an int, got the bool False"),
    ({"stacks": 1.5}, "stacks must be an int, got float 1.5"),
    ({"stacks": 1 << 70}, "stacks 1180591620717411303424 is too large"),
    ({"name": b"x"}, "name must be a str, got bytes b'x'"),
    ({"name": 5}, "name must be a str, got int 5"),
    ({"engine": b"sync"}, "engine must be a str, got bytes b'sync'"),
    ({"engine": None}, "engine must be a str, got NoneType None"),
    ({"engine": "fast"}, "unknown engine 'fast'"),
    ({"backing": b"shmem"}, "backing must be a str, got bytes b'shmem'"),
    ({"backing": 1}, "backing must be a str, got int 1"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_KEYWORDS, ids=lambda v: repr(v)[:40])
def test_bad_keyword_is_a_clear_error(kwargs: dict[str, Any], message: str) -> None:
    """Issue 9 item 18: every bad count, name, engine or backing is an
    InvalidBufferError naming the argument (some were raw TypeErrors from
    comparisons, or crashed the JSON writer later: name=b"x")."""
    kwargs.setdefault("engine", "diff")
    with pytest.raises(InvalidBufferError, match=message.replace("(", r"\(")) as info:
        GuardedBuffer(PAGE, **kwargs)
    assert info.value.remedy


@pytest.mark.parametrize("engine", ["diff", "auto"])
def test_numpy_counts_are_accepted(engine: str) -> None:
    """Issue 9 item 18: integer-likes work as counts (operator.index)."""
    if engine == "auto" and not capabilities().available:
        pytest.skip(f"userfaultfd write-protect unavailable: {capabilities().reason}")
    with GuardedBuffer(PAGE, max_records=np.int64(3), stacks=np.int8(1), engine=engine) as buf:
        buf[1] = 1
        # diff compares bytes: exact everywhere; uffd offsets are pages before 5.18
        assert [w.offset for w in buf.writes] == [1 if buf.engine == "diff" else expected_offset(1)]
        (change,) = buf.changes(preview=np.int32(1))
        assert change.after == b"\x01"
    with pytest.raises(InvalidBufferError, match="preview must be an int, got float"):
        buf.changes(preview=1.0)


# ------------------------------------------------------- resource limits


def _limits(code: str, **kwargs: Any) -> list[str]:
    result = run_python(code, timeout=100, **kwargs)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout.splitlines()


SWEEP = """
import os, resource, mmap
from pytest_uffd_guard import GuardedBuffer
from pytest_uffd_guard.errors import UffdGuardError
ENGINE = {engine!r}

def attempt(size, count, **kw):
    bufs = []
    try:
        for _ in range(count):
            bufs.append(GuardedBuffer(size, engine=ENGINE, **kw))
        print("no error")
    except UffdGuardError as exc:
        print(type(exc).__name__, "|", str(exc).replace("\\n", " | "))
    except BaseException as exc:
        print("RAW", type(exc).__name__, exc)
    return bufs
"""


def _engines() -> list[str]:
    return ["diff", "auto"]


def _check_engine(engine: str) -> None:
    if engine == "auto" and not capabilities().available:
        pytest.skip(f"userfaultfd write-protect unavailable: {capabilities().reason}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", _engines())
def test_address_space_limit(engine: str) -> None:
    """Issue 9 item 18: under RLIMIT_AS (ulimit -v) a big buffer, and many
    small ones, fail with BufferAllocationError naming ulimit -v."""
    _check_engine(engine)
    lines = _limits(
        SWEEP.format(engine=engine)
        + """
GuardedBuffer(4096, engine=ENGINE).close()  # engine started, modules imported
with open("/proc/self/status") as f:
    vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize")][0]
resource.setrlimit(resource.RLIMIT_AS, (vm + (32 << 20), resource.RLIM_INFINITY))
attempt(256 << 20, 1)
attempt(4096, 100000)
"""
    )
    assert len(lines) == 2, lines
    for line in lines:
        assert line.startswith("BufferAllocationError | "), line
        assert "limited to" in line and "(ulimit -v)" in line
        assert "Fix: guard a smaller buffer, or raise the limit (`ulimit -v unlimited`" in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("engine", _engines())
def test_max_map_count_limit(engine: str) -> None:
    """Issue 9 item 18: at vm.max_map_count a buffer fails with a
    ResourceLimitError naming the sysctl (the machine's sysctl is untouched:
    the process fills its own mappings)."""
    _check_engine(engine)
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    if limit > 300_000:
        pytest.skip(f"vm.max_map_count is {limit}: too many mappings to fill in a test")
    lines = _limits(
        SWEEP.format(engine=engine)
        + """
GuardedBuffer(4096, engine=ENGINE).close()
keep = []
try:
    while True:  # alternate protections so that neighbours never merge
        keep.append(mmap.mmap(-1, 4096, prot=mmap.PROT_READ if len(keep) % 2 else 3))
except OSError:
    pass
del keep[-6:]
attempt(4096, 10)
"""
    )
    assert len(lines) == 1 and lines[0].startswith("ResourceLimitError | "), lines
    assert "memory mappings, the kernel's limit (vm.max_map_count=" in lines[0]
    assert "sysctl vm.max_map_count=" in lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("warm", [False, True], ids=["first-buffer", "engine-running"])
@pytest.mark.parametrize("engine", _engines())
def test_open_files_limit(engine: str, warm: bool) -> None:
    """Issue 9 item 18 (and 15): at `ulimit -n` the first buffer (whose engine
    opens a userfaultfd) and a shmem buffer (a memfd) fail with a
    ResourceLimitError naming ulimit -n, not a memory remedy."""
    _check_engine(engine)
    lines = _limits(
        SWEEP.format(engine=engine)
        + f"""
if {warm!r}:
    GuardedBuffer(4096, engine=ENGINE).close()
n = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
while True:
    try:
        os.open("/dev/null", os.O_RDONLY)
    except OSError:
        break
attempt(4096, 1)
attempt(4096, 1, backing="shmem")
"""
    )
    assert len(lines) == 2, lines
    anonymous, shmem = lines
    refused = anonymous.startswith("ResourceLimitError | setting up tracking")
    if warm:
        assert anonymous == "no error"
    elif engine == "diff":  # opens nothing, unless a lazy import does
        assert anonymous == "no error" or refused, anonymous
    else:  # the engine opens its userfaultfd
        assert refused, anonymous
    assert shmem.startswith("ResourceLimitError | creating the memfd of a shmem buffer"), shmem
    for line in [line for line in lines if line != "no error"]:
        assert "too many open files (ulimit -n is" in line, line
        assert "Fix: close files you no longer need, or raise the limit (`ulimit -n" in line
        assert "memory" not in line.split("Fix:")[1]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loaded", [False, True], ids=["extension-unloaded", "extension-loaded"])
def test_probe_at_open_files_limit_names_the_limit_and_is_not_kept(loaded: bool) -> None:
    """The capability probe run at `ulimit -n` (dlopen of the C extension,
    or opening the userfaultfd, fails with EMFILE) says so with the ulimit
    remedy, not "extension missing" or a sysctl remedy; and that answer is
    not kept: once files are closed, the next probe finds userfaultfd."""
    if not capabilities().available:
        pytest.skip(f"userfaultfd write-protect unavailable: {capabilities().reason}")
    lines = _limits(
        f"""
import os, resource
import pytest_uffd_guard
from pytest_uffd_guard import capabilities
if {loaded!r}:  # as after a first buffer: only the probe's fd is left to open
    import pytest_uffd_guard.kernel.records
    pytest_uffd_guard.kernel.records.load_core()
n = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (n + 8, n + 8))
fds = []
while True:
    try:
        fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        break
caps = capabilities()
print(caps.available, caps.limited, "|", caps.reason, "|", caps.remedy)
for fd in fds:
    os.close(fd)
caps = capabilities()
print(caps.available, caps.limited)
"""
    )
    assert len(lines) == 2, lines
    doing = "opening a userfaultfd" if loaded else "loading the C extension pytest_uffd_guard._uffd"
    assert lines[0].startswith(
        f"False True | {doing} failed: this process has too many open files (ulimit -n is"
    ), lines[0]
    assert "| close files you no longer need, or raise the limit (`ulimit -n" in lines[0]
    assert lines[1] == "True False", lines[1]
