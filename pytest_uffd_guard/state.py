"""Per-run and per-test state of the plugin, under typed stash keys.

``config.stash[settings_key]`` holds the run's settings; each test's
guarded buffers and findings live in ``item.stash[item_state_key]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from .settings import REQUIRE_INI, REQUIRE_OPTION, Settings

if TYPE_CHECKING:
    from .findings import Finding
    from .guard import GuardedBuffer
    from .marker import MarkedArgument
    from .verdict import Range
    from .watchbook import WatchBook

FIXTURE = "guarded_buffer"
#: Start of the skip reason (and error) when userfaultfd cannot be used.
UNAVAILABLE_PREFIX = "uffd-guard unavailable"
#: Added to the message when --uffd-require turned the skip into an error.
REQUIRED_SUFFIX = f"(error because of {REQUIRE_OPTION} / {REQUIRE_INI})"


@dataclass(eq=False)
class Entry:
    """A buffer guarded for one test, and the rules that apply to it."""

    buffer: GuardedBuffer
    readonly: bool
    origin: str
    from_marker: bool = False
    allow: tuple[Range, ...] = ()
    done: bool = False
    stopped_seen: str | None = None
    #: numpy layout of the guarded data, for element-aware reports.
    element: tuple[str, int] | None = None


@dataclass(eq=False)
class ItemState:
    """Per-test state, in ``item.stash[item_state_key]``."""

    entries: list[Entry] = field(default_factory=list)
    #: Marker arguments swapped for guarded copies: argname -> original.
    swapped: dict[str, Any] = field(default_factory=dict)
    #: The guarded views handed to the test, dropped before closing.
    views: dict[str, Any] = field(default_factory=dict)
    #: Arguments named by readonly_buffer markers, validated at setup.
    marked: list[MarkedArgument] = field(default_factory=list)
    #: Findings of the phases reported so far.
    findings: list[Finding] = field(default_factory=list)
    counter: int = 0


settings_key = pytest.StashKey[Settings]()
item_state_key = pytest.StashKey[ItemState]()
#: The run's in-place watches (watchplugin.WatchManager); here so that
#: plugin.py need not import watchplugin, which pytest_plugins loads.
watch_manager_key: pytest.StashKey[WatchBook] = pytest.StashKey()


def item_state(item: pytest.Item) -> ItemState:
    state = item.stash.get(item_state_key, None)
    if state is None:
        state = item.stash[item_state_key] = ItemState()
    return state


def is_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker: the controller writes the reports."""
    return hasattr(config, "workerinput")
