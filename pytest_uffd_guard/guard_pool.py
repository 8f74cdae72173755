"""What GuardedBuffer's create path keeps per process, not per buffer.

Creating a small buffer is a handful of system calls; before this module
it also re-ran the engine decision (``engines.choose_engine``), mapped and
unmapped a snapshot of its own, and made an ``madvise`` that the kernel
can do as part of the ``mmap`` (issue 11 target 4).  So:

* :func:`engine_choice` caches ``choose_engine``'s answer per request
  (engine, whether the size reaches ``AUTO_HYBRID_BYTES``, unit, backing)
  for as long as the probe's answer is the same object: a forked child
  probes again, and so decides again;
* :func:`map_flags` says whether ``MAP_STACK`` marks a new mapping
  ``VM_NOHUGEPAGE`` (Linux 6.7+), which saves the ``MADV_NOHUGEPAGE`` call;
* :func:`take_snapshot` and :func:`give_back` keep a bounded pool of small
  snapshot mappings (at most ``POOL_PER_LENGTH`` of each length up to
  ``POOL_MAX_LENGTH``).  A mapping handed out is zeroed first, whatever it
  held; the pool is emptied at interpreter exit.

Only snapshots are pooled, never a buffer's own memory: a ``GuardedBuffer``
*is* its mapping (an ``mmap.mmap``), and a closed one keeps its range
mapped until it is garbage-collected (``kernel.memory.free_pages``), so
its pages cannot be handed to the next buffer.

The state is guarded by a ``ForkSafeLock`` (the free-threaded build runs
creators in parallel) and reset at fork through the package's one fork hook; a forked
child keeps its copies of the pooled mappings (private memory, zeroed
before reuse like any other).
"""

from __future__ import annotations

import atexit
import ctypes
import mmap
import sys
from contextlib import suppress
from typing import TYPE_CHECKING

from .kernel import process
from .kernel.memory import address_of, anonymous_map

if TYPE_CHECKING:
    from collections.abc import Callable

    from .engines import EngineChoice
    from .kernel.capabilities import Capabilities

#: ``MAP_STACK`` implies ``VM_NOHUGEPAGE`` from this kernel on (commit
#: "mm: mmap: map MAP_STACK to VM_NOHUGEPAGE").
MAP_STACK_NOHUGEPAGE_SINCE = (6, 7)
_MAP_STACK: int = getattr(mmap, "MAP_STACK", 0)

#: Snapshots of at most this many bytes come from the pool.
POOL_MAX_LENGTH = 64 << 10
#: Mappings kept per length (beyond it, a returned snapshot is unmapped).
POOL_PER_LENGTH = 16

_lock = process.ForkSafeLock()
#: The probe answer the cached choices were made with.
_caps: Capabilities | None = None
_choices: dict[tuple[str, bool, int, str], EngineChoice] = {}
#: ``(AUTO_HYBRID_BYTES, choose_engine, capabilities)``, imported on first use.
_probe: tuple[int, Callable[..., EngineChoice], Callable[..., Capabilities]] | None = None
#: Free snapshot mappings by length, with their addresses.
_free: dict[int, list[tuple[mmap.mmap, int]]] = {}


def engine_choice(requested: str, size: int, *, unit: int, backing: str) -> EngineChoice:
    """``choose_engine(requested, size, unit=unit, backing=backing)``, cached.

    Raises what ``choose_engine`` raises (a failed probe is never cached).
    """
    # Imported on first use, not at the top: importing guard must not load
    # the probe (tests/hostile/test_limits.py::test_open_files_limit).
    global _probe
    if _probe is None:
        from .engines import AUTO_HYBRID_BYTES, choose_engine
        from .kernel.capabilities import capabilities

        _probe = (AUTO_HYBRID_BYTES, choose_engine, capabilities)
    hybrid_bytes, choose_engine, capabilities = _probe
    if requested == "diff" or not sys.platform.startswith("linux"):
        # No probe involved (diff must not open a userfaultfd): cheap already.
        return choose_engine(requested, size, unit=unit, backing=backing)
    caps = capabilities()
    key = (requested, size >= hybrid_bytes, unit, backing)
    global _caps
    with _lock:
        if _caps is caps:
            choice = _choices.get(key)
            if choice is not None:
                return choice
        else:
            _caps = caps
            _choices.clear()
    choice = choose_engine(requested, size, unit=unit, backing=backing, caps=caps)
    with _lock:
        if _caps is caps:
            _choices[key] = choice
    return choice


def map_flags(flags: int) -> tuple[int, bool]:
    """``flags`` for a guarded buffer's anonymous ``mmap``, and whether the
    mapping still needs ``MADV_NOHUGEPAGE`` (False when ``MAP_STACK`` does it)."""
    caps = _caps
    if _MAP_STACK and caps is not None and caps.kernel_version >= MAP_STACK_NOHUGEPAGE_SINCE:
        return flags | _MAP_STACK, False
    return flags, True


def take_snapshot(length: int) -> tuple[mmap.mmap, int]:
    """A zero-filled private mapping of ``length`` bytes and its address.

    Raises OSError as ``mmap`` does when a new one cannot be mapped.
    """
    if length <= POOL_MAX_LENGTH:
        with _lock:
            free = _free.get(length)
            entry = free.pop() if free else None
        if entry is not None:
            ctypes.memset(entry[1], 0, length)
            return entry
    mapping = anonymous_map(length)
    return mapping, address_of(mapping)


def give_back(mapping: mmap.mmap, address: int) -> bool:
    """Keep ``mapping`` (from :func:`take_snapshot`) for the next buffer of
    its length; False when the pool does not want it (the caller unmaps it)."""
    length = len(mapping)
    if length > POOL_MAX_LENGTH:
        return False
    with _lock:
        free = _free.setdefault(length, [])
        if len(free) >= POOL_PER_LENGTH:
            return False
        free.append((mapping, address))
    return True


def pooled() -> int:
    """How many snapshot mappings the pool holds now."""
    with _lock:
        return sum(len(free) for free in _free.values())


def drain() -> None:
    """Unmap every pooled mapping (at interpreter exit; tests)."""
    with _lock:
        entries = [entry for free in _free.values() for entry in free]
        _free.clear()
    for mapping, _address in entries:
        with suppress(BufferError, OSError):
            mapping.close()


def _after_fork_in_child() -> None:
    # _lock is a ForkSafeLock: the package's fork hook has re-created it.
    global _caps
    _caps = None
    _choices.clear()


process.on_fork_child(_after_fork_in_child)
atexit.register(drain)
