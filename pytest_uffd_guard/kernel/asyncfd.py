"""This process's ``UFFD_FEATURE_WP_ASYNC`` userfaultfd and ``/proc/self/pagemap``.

The async engine's kernel side: one second userfaultfd per process, opened
with ``WP_ASYNC`` (which the kernel makes imply ``WP_UNPOPULATED``) and no
handler thread, plus the pagemap fd that ``PAGEMAP_SCAN`` runs on.  Opened
on first use, dropped in a forked child (``kernel.process``).  Linux 6.7+.
"""

from __future__ import annotations

import os
from contextlib import suppress

from ..errors import UffdUnavailableError
from . import process
from .capabilities import FEATURES, Capabilities, capabilities, open_for
from .pagemap import Pagemap
from .process import ForkSafeLock

ASYNC_REMEDY = (
    "the async engine needs Linux 6.7+ (UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN); "
    "use --uffd-engine=sync (or auto) on older kernels"
)


def async_unavailable(caps: Capabilities) -> str | None:
    """Why the async engine cannot run here, or None if it can."""
    if not caps.available:
        return caps.reason or "userfaultfd is unavailable"
    if not caps.has("wp_async"):
        return "this kernel has no UFFD_FEATURE_WP_ASYNC (Linux 6.7+)"
    return None


class AsyncFd:
    """This process's async userfaultfd and pagemap fds, opened on first use."""

    def __init__(self) -> None:
        self._lock = ForkSafeLock()
        self.fd = -1
        self.features = 0
        self.pagemap: Pagemap | None = None
        process.on_fork_child(self._forget)

    def start(self) -> tuple[int, Pagemap]:
        """This process's async userfaultfd and pagemap, opened if needed.

        Raises UffdUnavailableError when the kernel cannot run the engine.
        """
        with self._lock:
            if self.pagemap is not None:
                return self.fd, self.pagemap
            caps = capabilities()
            reason = async_unavailable(caps)
            if reason is not None:
                raise UffdUnavailableError(reason, caps.remedy or ASYNC_REMEDY)
            features = FEATURES["wp_async"] | FEATURES["wp_unpopulated"]
            if caps.has("wp_hugetlbfs_shmem"):
                features |= FEATURES["wp_hugetlbfs_shmem"]
            fd = open_for(caps, "async userfaultfd")
            try:
                from .. import _uffd

                _uffd.api(fd, features)
                pagemap = Pagemap()
            except OSError as exc:
                os.close(fd)
                raise UffdUnavailableError(
                    f"setting up the async engine failed: {exc.strerror or exc}", ASYNC_REMEDY
                ) from exc
            self.fd, self.features, self.pagemap = fd, features, pagemap
            return fd, pagemap

    def _forget(self) -> None:
        # A forked child: the inherited fds speak for the parent's memory;
        # drop them without touching the parent's ranges.
        if self.fd >= 0:
            with suppress(OSError):
                os.close(self.fd)
        if self.pagemap is not None:
            self.pagemap.close()
        self.fd, self.pagemap = -1, None


#: The WP_ASYNC fd holder of this process.
ASYNC_FD = AsyncFd()
