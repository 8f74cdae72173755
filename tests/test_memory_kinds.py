"""Memory kinds (anonymous, shmem, hugetlb) and transparent huge pages."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
from collections.abc import Iterator

import pytest

from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError, capabilities
from pytest_uffd_guard.kernel.asyncfd import async_unavailable
from pytest_uffd_guard.kernel.backing import huge_page_size, hugetlb_unavailable, meminfo

from .conftest import bound, run_python

PAGE = mmap.PAGESIZE
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def smaps_entry(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that contains ``address``."""
    entry: dict[str, str] = {}
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                if found:
                    break
                lo, hi = (int(x, 16) for x in head.split("-"))
                found = lo <= address < hi
                if found:
                    entry["range"] = head
                    entry["name"] = " ".join(line.split()[5:])
            elif found:
                key, _, value = line.partition(":")
                entry[key] = value.strip()
    return entry


def _needs(engine: str) -> None:
    caps = capabilities()
    if engine == "diff":
        return
    if not caps.available:
        pytest.skip(f"userfaultfd write-protect unavailable: {caps.reason}")
    if engine == "async" and async_unavailable(caps):
        pytest.skip(f"async engine unavailable: {async_unavailable(caps)}")


# ------------------------------------------------------------------ shmem


@pytest.mark.timeout(bound(30))
@pytest.mark.parametrize("engine", ["sync", "async", "diff"])
def test_shmem_buffer(engine: str) -> None:
    """backing='shmem' lives in a memfd mapped shared, and is tracked."""
    _needs(engine)
    if engine != "diff" and not capabilities().has("wp_hugetlbfs_shmem"):
        pytest.skip("no UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+)")
    with GuardedBuffer(b"abc" * 5000, backing="shmem", name="shm", engine=engine) as buf:
        assert buf.backing == "shmem" and buf.engine == engine
        assert smaps_entry(buf.address)["name"].startswith("/memfd:uffd-guard:shm")
        buf[2 * PAGE + 1] = 0
        assert [w.page_offset for w in buf.writes] == [2 * PAGE]
        (change,) = buf.changes()
        assert change.offset == 2 * PAGE + 1


@pytest.mark.timeout(bound(60))
def test_shmem_without_wp_feature(uffd: None) -> None:
    """As on Linux < 5.19: a clear error naming the feature; diff still works."""
    result = run_python(
        """
        import json
        from pytest_uffd_guard import GuardedBuffer, UffdUnavailableError, capabilities
        caps = capabilities()
        # user-mode only without WP_ASYNC (5.11-6.6 unprivileged): auto runs diff
        out = {"auto_is_diff": caps.user_mode_only and not caps.has("wp_async")}
        try:
            GuardedBuffer(4096, backing="shmem", engine="sync")
        except UffdUnavailableError as exc:
            out["sync"] = str(exc)
        try:
            GuardedBuffer(4096, backing="shmem")
        except UffdUnavailableError as exc:
            out["auto"] = exc.cause
        with GuardedBuffer(4096, backing="shmem", engine="diff") as buf:
            out["diff"] = buf.engine
        print(json.dumps(out))
        """,
        env={"PYTEST_UFFD_GUARD_HIDE_FEATURES": "wp_hugetlbfs_shmem"},
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert "UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+)" in out["sync"]
    assert "Fix: use backing='anonymous'" in out["sync"]
    if out["auto_is_diff"]:
        assert "auto" not in out  # the diff engine tracks shmem on any kernel
    else:
        assert "WP_HUGETLBFS_SHMEM" in out["auto"]
    assert out["diff"] == "diff"


def test_unknown_backing() -> None:
    with pytest.raises(ValueError, match="unknown backing 'gpu'"):
        GuardedBuffer(4096, backing="gpu")


# ---------------------------------------------------------------- hugetlb


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """Two free huge pages, reserved for the test when root (restored after)."""
    if not os.path.exists(NR_HUGEPAGES) or huge_page_size() is None:
        pytest.skip("no hugetlb support in this kernel")
    before = None
    if hugetlb_unavailable(2 * (huge_page_size() or 0)) is not None:
        if os.geteuid() != 0:
            pytest.skip(f"hugetlb: {hugetlb_unavailable(2 * (huge_page_size() or 0))}")
        with open(NR_HUGEPAGES) as f:
            before = f.read().strip()
        with open(NR_HUGEPAGES, "w") as f:
            f.write(str(int(before) + 8))
    try:
        reason = hugetlb_unavailable(2 * (huge_page_size() or 0))
        if reason is not None:
            pytest.skip(f"could not reserve huge pages: {reason}")
        yield huge_page_size() or 0
    finally:
        if before is not None:
            with open(NR_HUGEPAGES, "w") as f:
                f.write(before)


@pytest.mark.timeout(bound(60))
@pytest.mark.parametrize("engine", ["async", "diff"])
def test_hugetlb_buffer(engine: str, huge_pages: int) -> None:
    """backing='hugetlb': the unit is the huge page; changes stay exact."""
    _needs(engine)
    if engine == "async" and not capabilities().has("wp_hugetlbfs_shmem"):
        pytest.skip("no UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19+)")
    hpage = huge_pages
    with GuardedBuffer(hpage + 100, backing="hugetlb", engine=engine) as buf:
        assert len(buf) == hpage + 100
        assert smaps_entry(buf.address).get("KernelPageSize") == f"{hpage >> 10} kB"
        buf[hpage + 7] = 1
        buf[3] = 1
        assert [w.offset for w in buf.writes] == [3, hpage + 7]
        assert [c.offset for c in buf.changes()] == [3, hpage + 7]


@pytest.mark.timeout(bound(60))
def test_hugetlb_auto_and_sync(uffd: None, huge_pages: int) -> None:
    """auto tracks hugetlb with async (6.7+); sync says it cannot, and why."""
    if async_unavailable(capabilities()):
        pytest.skip(f"async engine unavailable: {async_unavailable(capabilities())}")
    with GuardedBuffer(huge_pages, backing="hugetlb") as buf:
        assert buf.engine == "async"
    with pytest.raises(ValueError, match="sync engine cannot track hugetlb"):
        GuardedBuffer(huge_pages, backing="hugetlb", engine="sync")


def test_hugetlb_unavailable_is_clear() -> None:
    """More huge pages than are free: a clear error naming the reservation."""
    unit = huge_page_size()
    if unit is None:
        pytest.skip("no hugetlb support in this kernel")
    free = meminfo().get("HugePages_Free", 0)
    with pytest.raises(UffdUnavailableError) as info:
        GuardedBuffer((free + 1) * unit, backing="hugetlb", engine="diff")
    assert "free huge page(s)" in info.value.cause
    assert "vm.nr_hugepages" in (info.value.remedy or "")


# -------------------------------------------------- transparent huge pages


@pytest.mark.timeout(bound(60))
@pytest.mark.parametrize("engine", ["sync", "async", "diff"])
def test_thp_neighbour_does_not_coarsen_tracking(engine: str) -> None:
    """A MADV_HUGEPAGE neighbour (THP "always"-like) leaves the guard on base pages.

    A one-byte write reports one 4 KiB page and one byte, never 2 MiB.
    """
    _needs(engine)
    size = 8 << 20
    neighbour = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        neighbour.madvise(mmap.MADV_HUGEPAGE)
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(neighbour)), 1, size)
        with GuardedBuffer(size, engine=engine) as buf:
            buf[(3 << 20) + 17] = 1
            writes = buf.writes
            assert [w.page_offset for w in writes] == [3 << 20]
            assert [(c.offset, c.length) for c in buf.changes()] == [((3 << 20) + 17, 1)]
            guarded = smaps_entry(buf.address)
            assert "nh" in guarded["VmFlags"].split()
            assert guarded["AnonHugePages"] == "0 kB"
    finally:
        neighbour.close()
