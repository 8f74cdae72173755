"""The engine registry: which engine tracks a buffer, and why.

An engine is a tracking strategy: a :class:`~.base.Tracker` that sees the
writes into one buffer's memory (the seam itself is ``engines/base.py``;
the engines import it, never this module, which imports them).  Engines:

``sync``
    userfaultfd write-protect with the native handler thread
    (:mod:`pytest_uffd_guard.engines.sync`): every first write into a page
    is recorded with its exact offset and thread.
``async``
    ``UFFD_FEATURE_WP_ASYNC`` + ``PAGEMAP_SCAN`` (Linux 6.7+,
    :mod:`pytest_uffd_guard.engines.async_`): writes never block; every
    written page is found, the writer is not known.
``hybrid``
    sync for the first writes of each buffer (named), then async for the
    rest (Linux 6.7+, :mod:`pytest_uffd_guard.engines.hybrid`).
``diff``
    no userfaultfd (:mod:`pytest_uffd_guard.engines.diff`): pages whose bytes
    differ from the snapshot; blind to same-value writes and to the writer.
``auto``
    decided by ``choose_engine`` (one place; the plugin's skip, header and
    JSON, the doctor and every ``GuardedBuffer`` ask it): ``sync`` wherever
    userfaultfd sees kernel faults (it names the writer), ``hybrid`` for
    buffers of ``AUTO_HYBRID_BYTES`` or more and ``async`` for hugetlb where
    the kernel has WP_ASYNC.  For a user-mode-only userfaultfd (unprivileged
    users by default) ``async`` where WP_ASYNC exists, else ``diff``: under
    sync, writes made by the kernel would fail with EFAULT.  Where
    userfaultfd is unusable nothing runs: the plugin skips guarded tests and
    a ``GuardedBuffer`` raises; ``diff`` must then be asked for by name.

New engines implement the same protocol and are picked in ``make_tracker``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidBufferError
from ..kernel.memory import PAGE_SIZE
from ..names import ENGINES
from .choice import (
    FULL_UFFD_FIX,
    KERNEL_WRITES_BREAK,
    KERNEL_WRITES_COMPARED,
    KERNEL_WRITES_NAMED,
    KERNEL_WRITES_NONE,
    KERNEL_WRITES_UNNAMED,
    NAME_WRITERS_REMEDY,
    USER_MODE_ONLY_WRITERS,
    EngineChoice,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..kernel.capabilities import Capabilities
    from .base import Region, Tracker


#: auto runs buffers at least this big on the hybrid engine where it exists:
#: written in full under sync they would cost ~10 s per GiB in faults.
AUTO_HYBRID_BYTES = 256 << 20


def choose_engine(
    requested: str = "auto",
    size: int | None = None,
    *,
    unit: int = PAGE_SIZE,
    backing: str = "anonymous",
    caps: Capabilities | None = None,
) -> EngineChoice:
    """The engine that ``requested`` resolves to on this machine, and why.

    The only place that decides: ``make_tracker``, the plugin (skip,
    header, JSON, EFAULT hint) and the doctor all ask here.  Never raises
    for a known name; an engine that cannot run comes back with
    ``usable=False`` and its reason and remedy (``EngineChoice.check``
    raises them).  Without ``size`` the answer is the session's: what an
    ordinary buffer gets.  ``unit`` is the mapping's page size (a huge page
    for hugetlb), ``backing`` its memory kind.  The rule for ``auto``:

    * a userfaultfd that sees kernel faults: sync (it names the writer);
      hybrid for buffers of ``AUTO_HYBRID_BYTES`` or more and async for
      hugetlb, where the kernel has WP_ASYNC;
    * user-mode only (an unprivileged user with vm.unprivileged_userfaultfd=0
      and no /dev/userfaultfd) with WP_ASYNC: async for every buffer, since
      the kernel resolves async faults itself, so kernel writes are recorded
      and nothing fails; writers are not named;
    * user-mode only without WP_ASYNC (5.11-6.6): diff, by choice: write
      protection would make kernel writes fail with EFAULT or come back
      short, a byte comparison changes nothing the program sees;
    * no usable userfaultfd: unusable (the plugin skips; ``engine="diff"``
      must be asked for by name).
    """
    from ..kernel.capabilities import capabilities, not_linux

    if requested not in ENGINES:
        raise InvalidBufferError(
            f"unknown engine {requested!r}", f"use one of: {', '.join(ENGINES)}"
        )
    if requested == "diff":
        return EngineChoice(
            requested,
            "diff",
            True,
            "requested; " + _diff_limits(),
            "requested: bytes compared at the end; same-value writes and writers not seen",
            kernel_writes=KERNEL_WRITES_COMPARED,
        )
    off_linux = not_linux()
    if off_linux is not None:
        return EngineChoice(
            requested,
            "sync" if requested == "auto" else requested,
            False,
            off_linux[0],
            "not Linux",
            off_linux[1],
            KERNEL_WRITES_NONE,
            off_linux=True,
        )
    if caps is None:
        caps = capabilities()
    if not caps.available:
        return EngineChoice(
            requested,
            "sync" if requested == "auto" else requested,
            False,
            caps.reason or "userfaultfd is unavailable",
            "userfaultfd unusable",
            caps.remedy,
            KERNEL_WRITES_NONE,
        )
    huge = unit != PAGE_SIZE
    async_reason = _async_unavailable(caps)
    how = f"userfaultfd write-protect via {caps.open_method}"
    if requested == "auto":
        choice = _auto(caps, how, size, huge, async_reason)
    elif requested == "async":
        choice = _requested_async(async_reason)
    else:
        choice = _requested_sync(requested, caps, how, async_reason)
    if not choice.usable or choice.engine == "diff":
        return choice
    if huge and choice.engine in ("sync", "hybrid"):
        return EngineChoice(
            requested,
            choice.engine,
            False,
            f"the {choice.engine} engine cannot track hugetlb buffers yet "
            "(its handler resolves faults in base pages)",
            "hugetlb needs the async engine",
            "use engine='async' (Linux 6.7+) or engine='diff' for hugetlb buffers",
            KERNEL_WRITES_NONE,
            misuse=requested != "auto",
        )
    if backing != "anonymous" and not caps.has("wp_hugetlbfs_shmem"):
        return EngineChoice(
            requested,
            choice.engine,
            False,
            f"write-protecting {backing} memory needs UFFD_FEATURE_WP_HUGETLBFS_SHMEM "
            "(Linux 5.19+), which this kernel does not offer",
            f"{backing} needs WP_HUGETLBFS_SHMEM",
            "use backing='anonymous', or engine='diff' for this buffer",
            KERNEL_WRITES_NONE,
        )
    return choice


def _auto(
    caps: Capabilities, how: str, size: int | None, huge: bool, async_reason: str | None
) -> EngineChoice:
    big = AUTO_HYBRID_BYTES >> 20
    if caps.user_mode_only:
        if async_reason is None:
            return EngineChoice(
                "auto",
                "async",
                True,
                f"auto: {how} is user-mode only (under sync, kernel writes would fail) and "
                "the kernel has WP_ASYNC: the async engine records every write, kernel "
                f"writes (readinto, recv_into) included; {USER_MODE_ONLY_WRITERS}",
                "user-mode-only userfaultfd: every write recorded, kernel writes too; "
                "writers not named",
                f"to name writers, {FULL_UFFD_FIX}",
                KERNEL_WRITES_UNNAMED,
            )
        return EngineChoice(
            "auto",
            "diff",
            True,
            f"auto: {how} is user-mode only and the kernel has no WP_ASYNC (Linux 6.7+): "
            "write-protection would make kernel writes (readinto, recv_into) fail with "
            "EFAULT or come back short, so the diff engine compares bytes instead: kernel "
            "writes work and are reported; same-value writes and writer names are not seen; "
            f"{FULL_UFFD_FIX} to have writes "
            "write-protected and writers named",
            "user-mode-only userfaultfd without WP_ASYNC: bytes compared at the end, kernel "
            "writes work; same-value writes and writers not seen",
            f"{FULL_UFFD_FIX}, or run Linux 6.7+ (WP_ASYNC: every write recorded)",
            KERNEL_WRITES_COMPARED,
        )
    how += ", kernel faults included"
    if async_reason is None:
        if huge:
            return EngineChoice(
                "auto",
                "async",
                True,
                f"auto: {how}; hugetlb buffers run async (the sync handler works in base "
                "pages): every write recorded, writers not named",
                "hugetlb: every write recorded, writers not named",
                kernel_writes=KERNEL_WRITES_UNNAMED,
            )
        if size is not None and size >= AUTO_HYBRID_BYTES:
            return EngineChoice(
                "auto",
                "hybrid",
                True,
                f"auto: {how}; a buffer of {big} MiB or more runs hybrid: its first "
                "writers named, the rest at async cost",
                f"a buffer of {big} MiB or more: first writers named, the rest at async cost",
            )
        return EngineChoice(
            "auto",
            "sync",
            True,
            f"auto: {how}; the sync engine names each writer, kernel writes too "
            f"(hybrid for buffers of {big} MiB or more, async for hugetlb)",
            f"writers named (hybrid for buffers of {big} MiB or more, async for hugetlb)",
        )
    return EngineChoice(
        "auto",
        "sync",
        True,
        f"auto: {how}; the sync engine names each writer, kernel writes too",
        "writers named",
    )


def _requested_async(async_reason: str | None) -> EngineChoice:
    from ..kernel.asyncfd import ASYNC_REMEDY

    if async_reason is not None:
        return EngineChoice(
            "async",
            "async",
            False,
            async_reason,
            "async needs Linux 6.7+",
            ASYNC_REMEDY,
            KERNEL_WRITES_NONE,
        )
    return EngineChoice(
        "async",
        "async",
        True,
        "requested; WP_ASYNC + PAGEMAP_SCAN: writes never block, writer unknown",
        "requested: every write recorded, writers not named",
        kernel_writes=KERNEL_WRITES_UNNAMED,
    )


def _requested_sync(
    requested: str, caps: Capabilities, how: str, async_reason: str | None
) -> EngineChoice:
    from ..kernel.capabilities import KERNEL_WRITES_REMEDY

    if requested == "hybrid":
        from .hybrid import BUDGET

        if async_reason is not None:
            return EngineChoice(
                "hybrid",
                "hybrid",
                False,
                f"the hybrid engine needs the async engine: {async_reason}",
                "hybrid needs Linux 6.7+",
                "use engine='sync' (or auto) on this kernel",
                KERNEL_WRITES_NONE,
            )
        why = (
            f"requested; the first {BUDGET} pages written per buffer are named (sync), "
            "then tracking goes on at async cost"
        )
        summary = "requested: first writers named, the rest at async cost"
    else:
        why = f"requested; {how}: the sync engine names each writer"
        summary = "requested: writers named"
    if caps.user_mode_only:
        better = "async" if async_reason is None else "diff"
        return EngineChoice(
            requested,
            requested,
            True,
            f"{why}; but this userfaultfd is user-mode only: writes made by the kernel into "
            "guarded buffers (readinto, recv_into) fail with EFAULT or come back short, "
            f"unrecorded (auto would run {better} here and change nothing)",
            "user-mode only: kernel writes (readinto) fail with EFAULT or come back short",
            KERNEL_WRITES_REMEDY,
            KERNEL_WRITES_BREAK,
        )
    return EngineChoice(requested, requested, True, why + ", kernel writes too", summary)


def async_ok(caps: Capabilities) -> bool:
    return _async_unavailable(caps) is None


def _async_unavailable(caps: Capabilities) -> str | None:
    from ..kernel.asyncfd import async_unavailable

    return async_unavailable(caps)


def _diff_limits() -> str:
    from .diff import LIMITS

    return LIMITS


def make_tracker(
    engine: str | EngineChoice,
    region: Region,
    *,
    max_records: int | None,
    backing: str = "anonymous",
    stacks: int | None = None,
) -> Tracker:
    """Start tracking ``region``, which must hold its initial contents and
    not be protected yet; the tracker is armed on return.

    ``engine`` is a request ("auto", ...) or the ``choose_engine`` answer
    the caller already has (GuardedBuffer asks before it maps anything).

    ``stacks`` bounds how many writers are named (None: the default; only
    the sync phase of the sync and hybrid engines names writers).
    """
    if isinstance(engine, str):
        engine = choose_engine(engine, region.length, unit=region.unit, backing=backing)
    engine.check()
    tracker: Tracker = _factory(engine.engine)(region, max_records=max_records, stacks=stacks)
    try:
        tracker.arm()
    except BaseException:
        tracker.close()
        raise
    return tracker


def _factory(name: str) -> Callable[..., Tracker]:
    """The tracker class of engine ``name``, imported on first use."""
    found = _FACTORIES.get(name)
    if found is not None:
        return found
    factory: Callable[..., Tracker]
    if name == "diff":
        from .diff import DiffTracker as factory
    elif name == "async":
        from .async_ import AsyncTracker as factory
    elif name == "hybrid":
        from .hybrid import HybridTracker as factory
    else:
        from .sync import SyncTracker as factory
    _FACTORIES[name] = factory
    return factory


#: Tracker classes by engine name (a dict insert of an immutable class:
#: safe without a lock, also on the free-threaded build).
_FACTORIES: dict[str, Callable[..., Tracker]] = {}


__all__ = [
    "AUTO_HYBRID_BYTES",
    "FULL_UFFD_FIX",
    "KERNEL_WRITES_BREAK",
    "KERNEL_WRITES_COMPARED",
    "KERNEL_WRITES_NAMED",
    "KERNEL_WRITES_NONE",
    "KERNEL_WRITES_UNNAMED",
    "NAME_WRITERS_REMEDY",
    "USER_MODE_ONLY_WRITERS",
    "EngineChoice",
    "async_ok",
    "choose_engine",
    "make_tracker",
]
