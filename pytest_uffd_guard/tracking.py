"""How a guarded buffer learns about writes: the Tracker seam.

A GuardedBuffer owns its mapping and snapshot; a Tracker owns everything
kernel-side about seeing writes into it.  Engines:

``sync``
    userfaultfd write-protect with the native handler thread
    (:mod:`pytest_uffd_guard.sync_tracker`): every first write into a page
    is recorded with its exact offset and thread.
``async``
    ``UFFD_FEATURE_WP_ASYNC`` + ``PAGEMAP_SCAN`` (Linux 6.7+,
    :mod:`pytest_uffd_guard.async_tracker`): writes never block; every
    written page is found, the writer is not known.
``hybrid``
    sync for the first writes of each buffer (named), then async for the
    rest (Linux 6.7+, :mod:`pytest_uffd_guard.hybrid_tracker`).
``diff``
    no userfaultfd (:mod:`pytest_uffd_guard.diff_tracker`): pages whose bytes
    differ from the snapshot; blind to same-value writes and to the writer.
``auto``
    ``sync`` wherever userfaultfd write-protect works (it is the engine that
    names the writer), else ``diff`` for the plugin's session choice
    (``choose_engine``), while a ``GuardedBuffer`` made directly raises;
    buffers of ``AUTO_HYBRID_BYTES`` or more run ``hybrid`` where the
    kernel has WP_ASYNC, so their first writers are still named.
    ``async`` is never picked silently: it gives up naming writers
    altogether, which is the user's call.

New engines implement the same protocol and are picked in ``make_tracker``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .errors import InvalidBufferError, TrackingStoppedError, UffdUnavailableError
from .memory import PAGE_SIZE
from .records import WriteRecord

if TYPE_CHECKING:
    from .probe import Capabilities

ENGINES = ("auto", "sync", "async", "hybrid", "diff")

#: auto runs buffers at least this big on the hybrid engine where it exists:
#: written in full under sync they would cost ~10 s per GiB in faults.
AUTO_HYBRID_BYTES = 256 << 20

#: Help text shared by the ``--uffd-engine`` option and the ``uffd_engine`` ini key.
ENGINE_HELP = (
    "How writes are tracked: auto (sync where userfaultfd write-protect works, "
    "else diff), sync (names the writer), async (Linux 6.7+, fast, no writer) "
    "or diff (no userfaultfd, compares bytes at the end)"
)


class Tracker(Protocol):
    """Kernel-side tracking of one mapping."""

    #: Engine name shown to users ("sync", ...).
    name: str
    #: Writes recorded since the last drain did not fit the log.
    overflow: int

    def arm(self) -> None:
        """Protect every page.  Called on a range that is not protected."""

    def pause(self) -> None:
        """Un-protect every page (waking blocked writers); record nothing."""

    def resume(self) -> None:
        """Protect every page again after ``pause``."""

    def drain(self) -> list[WriteRecord]:
        """Records that arrived since the last drain, oldest first."""

    def discard(self) -> None:
        """Drop records not drained yet (used when re-arming)."""

    def close(self) -> list[WriteRecord]:
        """Stop tracking for good, free any blocked writer, return the last records."""

    @property
    def stopped(self) -> str | None:
        """Why tracking stopped early (handler failure, fork), or None."""


class KernelTracked:
    """Stop state shared by the trackers that hold kernel registrations
    (sync, async): a copy inherited across fork() is never tracked."""

    _pid: int
    _stopped: str | None

    @property
    def stopped(self) -> str | None:
        if self._pid != os.getpid():
            return "this buffer was inherited across fork(); it is not tracked in the child"
        return self._stopped

    def _check(self) -> None:
        reason = self.stopped
        if reason is not None:
            raise TrackingStoppedError(
                f"the buffer is no longer tracked: {reason}", "create a new GuardedBuffer"
            )


def choose_engine(
    requested: str = "auto", size: int | None = None, *, fallback: bool = True
) -> tuple[str, str]:
    """The engine that ``requested`` resolves to on this machine, and why.

    Never raises for a known name: an engine that cannot run here is
    returned with the reason (starting "unavailable: "), and
    ``make_tracker`` raises it when used.  The plugin's header prints both
    parts.  With ``size``, the answer for a buffer of that many bytes (auto
    picks hybrid for very big ones).

    ``fallback`` lets ``auto`` fall back to ``diff`` where userfaultfd is
    unusable: that is the session-level choice the plugin makes once and
    shows in its header.  A ``GuardedBuffer(engine="auto")`` made directly
    resolves with ``fallback=False`` and raises instead, so library users
    never lose write-protection without asking for ``engine="diff"``.
    """
    import sys

    from .probe import capabilities

    if requested not in ENGINES:
        raise InvalidBufferError(
            f"unknown engine {requested!r}", f"use one of: {', '.join(ENGINES)}"
        )
    if requested == "diff":
        return "diff", "requested; " + _diff_limits()
    if not sys.platform.startswith("linux"):
        if requested == "auto" and fallback:
            return "diff", f"auto: no userfaultfd on {sys.platform}; " + _diff_limits()
        return (
            "sync" if requested == "auto" else requested,
            f"unavailable: userfaultfd exists only on Linux, not {sys.platform}",
        )
    caps = capabilities()
    if requested == "async":
        from .async_tracker import async_unavailable

        reason = async_unavailable(caps)
        if reason is not None:
            return "async", f"unavailable: {reason}"
        return "async", "requested; WP_ASYNC + PAGEMAP_SCAN: writes never block, writer unknown"
    if requested == "hybrid":
        from .async_tracker import async_unavailable
        from .hybrid_tracker import BUDGET

        reason = async_unavailable(caps)
        if reason is not None:
            return "hybrid", f"unavailable: {reason}"
        return "hybrid", (
            f"requested; the first {BUDGET} pages written per buffer are named (sync), "
            "then tracking goes on at async cost"
        )
    if caps.available:
        how = f"userfaultfd write-protect via {caps.open_method}"
        if caps.user_mode_only:
            how += " (user-mode only: writes made by the kernel are not seen)"
        if requested == "auto":
            if async_ok(caps):
                big = AUTO_HYBRID_BYTES >> 20
                if size is not None and size >= AUTO_HYBRID_BYTES:
                    return "hybrid", (
                        f"auto: {how}; a buffer of {big} MiB or more runs hybrid: "
                        "its first writers named, the rest at async cost"
                    )
                return "sync", (
                    f"auto: {how}; the sync engine names each writer "
                    f"(hybrid for buffers of {big} MiB or more)"
                )
            return "sync", f"auto: {how}; the sync engine names each writer"
        return "sync", f"requested; {how}"
    if requested == "auto" and fallback:
        return "diff", f"auto: userfaultfd unusable ({caps.reason}); " + _diff_limits()
    return "sync", f"unavailable: {caps.reason}"


def async_ok(caps: Capabilities) -> bool:
    from .async_tracker import async_unavailable

    return async_unavailable(caps) is None


def _diff_limits() -> str:
    from .diff_tracker import LIMITS

    return LIMITS


@dataclass(frozen=True)
class Region:
    """The memory a tracker watches."""

    #: Start of the mapping.
    address: int
    #: Mapped bytes: whole units.
    length: int
    #: Bytes in use (``len()`` of the buffer).
    size: int
    #: Address of the snapshot taken at arming (``length`` bytes).
    snapshot: int
    #: Page size of the mapping (a huge page for hugetlb).
    unit: int = PAGE_SIZE


def make_tracker(
    engine: str,
    region: Region,
    *,
    max_records: int | None,
    backing: str = "anonymous",
    stacks: int | None = None,
) -> Tracker:
    """Start tracking ``region``, which must hold its initial contents and
    not be protected yet; the tracker is armed on return.

    ``stacks`` bounds how many writers are named (None: the default; only
    the sync phase of the sync and hybrid engines names writers).
    """
    engine = _engine_for(engine, region, backing)
    if engine == "diff":
        from .diff_tracker import DiffTracker as factory
    elif engine == "async":
        from .async_tracker import AsyncTracker as factory  # type: ignore[assignment]
    elif engine == "hybrid":
        from .hybrid_tracker import HybridTracker as factory  # type: ignore[assignment]
    else:
        from .sync_tracker import SyncTracker as factory  # type: ignore[assignment]
    tracker: Tracker = factory(region, max_records=max_records, stacks=stacks)
    try:
        tracker.arm()
    except BaseException:
        tracker.close()
        raise
    return tracker


def _engine_for(requested: str, region: Region, backing: str) -> str:
    """The engine that tracks ``region``, or a clear error if none can."""
    from .probe import capabilities

    engine, _ = choose_engine(requested, region.length, fallback=False)
    if engine == "diff":
        return engine
    caps = capabilities()
    if backing != "anonymous" and caps.available and not caps.has("wp_hugetlbfs_shmem"):
        raise UffdUnavailableError(
            f"write-protecting {backing} memory needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM "
            "(Linux 5.19+), which this kernel does not offer",
            "use backing='anonymous', or engine='diff' for this buffer",
        )
    huge = region.unit != PAGE_SIZE
    if huge and requested == "auto" and engine in ("sync", "hybrid") and async_ok(caps):
        # The sync handler works in base pages: hugetlb needs async (6.7+).
        return "async"
    if engine == "hybrid":
        from .async_tracker import async_unavailable

        reason = async_unavailable(caps)
        if reason is not None:
            raise UffdUnavailableError(
                f"the hybrid engine needs the async engine: {reason}",
                "use engine='sync' (or auto) on this kernel",
            )
    if huge and engine in ("sync", "hybrid"):
        raise InvalidBufferError(
            f"the {engine} engine cannot track hugetlb buffers yet "
            "(its handler resolves faults in base pages)",
            "use engine='async' (Linux 6.7+) or engine='diff' for hugetlb buffers",
        )
    return engine
