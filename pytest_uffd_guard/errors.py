"""Exceptions of pytest-uffd-guard.

Every exception names the problem and, where there is one, the fix.  The
``cause`` and ``remedy`` attributes carry the two parts separately so that
the plugin and the doctor can show them in their own layout.
"""

from __future__ import annotations


class UffdGuardError(Exception):
    """Base class of every error raised by pytest-uffd-guard."""

    def __init__(self, cause: str, remedy: str | None = None) -> None:
        self.cause = cause
        self.remedy = remedy
        super().__init__(cause if remedy is None else f"{cause}\nFix: {remedy}")


class UffdUnavailableError(UffdGuardError):
    """userfaultfd write-protection cannot be used in this process.

    Raised when a guarded buffer is created on a machine that cannot guard
    it: not Linux, the C extension missing, ``userfaultfd(2)`` denied (seccomp,
    sysctl, permissions), or a kernel without write-protect support.
    """


class UnsupportedPlatformError(UffdUnavailableError):
    """The platform is not Linux; userfaultfd exists only there."""


class InvalidBufferError(UffdGuardError, ValueError):
    """The size or the data given for a guarded buffer cannot be used."""


class BufferAllocationError(UffdGuardError, MemoryError):
    """The kernel would not give a mapping of the requested size."""


class BufferClosedError(UffdGuardError, ValueError):
    """The guarded buffer was used after ``close()``."""


class TrackingStoppedError(UffdGuardError):
    """The fault handler gave up, so this buffer is no longer tracked."""


class ResourceLimitError(BufferAllocationError):
    """A process or system limit stopped a guarded buffer.

    Open files (``ulimit -n``, the system file table) or memory mappings
    (``vm.max_map_count``); the message names the limit and its value.  A
    subclass of :class:`BufferAllocationError`, so one ``except`` catches
    every "could not make the buffer".
    """
