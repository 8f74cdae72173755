"""What the registry answers: :class:`EngineChoice`, and the wording of its
reasons and remedies (shared with the doctor and the plugin's messages).

Imports nothing of the engines; the registry (``engines/__init__.py``)
builds these answers and re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidBufferError, UffdUnavailableError, UnsupportedPlatformError

#: What happens to writes made by the kernel inside system calls (readinto,
#: recv_into) under an engine choice: the values of ``EngineChoice.kernel_writes``.
KERNEL_WRITES_NAMED = "recorded, writer named"
KERNEL_WRITES_UNNAMED = "recorded, writer not named"
KERNEL_WRITES_COMPARED = "compared at the end (seen when they change bytes)"
KERNEL_WRITES_BREAK = "fail with EFAULT or come back short, unrecorded"
KERNEL_WRITES_NONE = "nothing is tracked"

#: How an unprivileged user gets a userfaultfd that sees kernel faults (and names writers).
FULL_UFFD_FIX = "give access to /dev/userfaultfd (Linux 6.1+) or set vm.unprivileged_userfaultfd=1"
#: Why auto names no writer for an unprivileged user, and how to change it.
NAME_WRITERS_REMEDY = f"{FULL_UFFD_FIX} to name them"
USER_MODE_ONLY_WRITERS = (
    f"writers are not named: this user's userfaultfd is user-mode only; {NAME_WRITERS_REMEDY}"
)


@dataclass(frozen=True)
class EngineChoice:
    """The one answer to "which engine tracks this, and why" (``choose_engine``).

    The plugin's skip, its header and JSON, the doctor and every
    ``GuardedBuffer`` read this; none decides on its own.
    """

    #: What was asked for ("auto", "sync", ...).
    requested: str
    #: The engine that runs (when ``usable``) or would be needed (when not).
    engine: str
    #: Whether a buffer can be tracked this way here.
    usable: bool
    #: One sentence: why this engine, or why it cannot run.
    reason: str
    #: A few words for the plugin's one-line header.
    summary: str
    #: What to change for a better (or any) answer, if anything.
    remedy: str | None = None
    #: What happens to writes the kernel makes into a guarded buffer.
    kernel_writes: str = KERNEL_WRITES_NAMED
    #: Unusable because of the request itself (e.g. sync on hugetlb), not the machine.
    misuse: bool = False
    #: Unusable because this is not Linux (UnsupportedPlatformError).
    off_linux: bool = False

    @property
    def runs(self) -> str:
        """The engine that runs, or "none" when nothing can track here."""
        return self.engine if self.usable else "none"

    def as_dict(self) -> dict[str, object]:
        """The JSON fields: ``engine`` (what runs, or "none"), then
        ``engine_requested``, ``engine_usable``, ``engine_reason``,
        ``engine_remedy`` and ``kernel_writes``."""
        names = ("runs", "requested", "usable", "reason", "remedy", "kernel_writes")
        keys = ("engine", "engine_requested", "engine_usable", "engine_reason", "engine_remedy")
        return {key: getattr(self, name) for key, name in zip((*keys, "kernel_writes"), names)}

    def check(self) -> None:
        """Raise the project's error for an unusable choice."""
        if self.usable:
            return
        if self.misuse:
            raise InvalidBufferError(self.reason, self.remedy)
        if self.off_linux:
            raise UnsupportedPlatformError(self.reason, self.remedy)
        raise UffdUnavailableError(self.reason, self.remedy)
