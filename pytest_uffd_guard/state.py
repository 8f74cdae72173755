"""Per-run and per-test state of the plugin, under typed stash keys.

``config.stash[settings_key]`` holds the run's settings; each test's
guarded buffers and findings live in ``item.stash[item_state_key]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .settings import REQUIRE_INI, REQUIRE_OPTION, Settings

if TYPE_CHECKING:
    from .findings import Finding
    from .guard import GuardedBuffer
    from .manager import Manager
    from .marker import MarkedArgument
    from .verdict import Range
    from .watchbook import WatchBook
    from .watchsettings import WatchSettings

FIXTURE = "guarded_buffer"
MARKER = "readonly_buffer"
#: The marker's ``--markers`` line.  Written out, not built from
#: ``marker.readonly_buffer``'s signature, so that start-up need not import
#: ``marker.py`` and ``inspect`` it; ``tests/plugin/test_marker.py`` checks
#: that the two agree.
MARKER_HELP = (
    "readonly_buffer(*argnames, allow=(), inplace=False): Swap the named test arguments "
    "(numpy arrays, memoryviews) for guarded copies before the call and fail the test if it "
    "writes into them, even under --uffd-report; writes into the byte ranges of allow "
    "(slices or (start, stop) pairs) are reported but allowed. inplace=True watches the "
    "arguments' own memory during the call instead of copying them. Without argnames, every "
    "guarded_buffer of the test is held to the same rules. Example: "
    "@pytest.mark.readonly_buffer('frame', allow=[slice(0, 4)]). See docs/user-guide.md"
)
#: Start of the skip reason (and error) when userfaultfd cannot be used.
UNAVAILABLE_PREFIX = "uffd-guard unavailable"
#: Added to the message when --uffd-require turned the skip into an error.
REQUIRED_SUFFIX = f"(error because of {REQUIRE_OPTION} / {REQUIRE_INI})"


class Entry:
    """A buffer guarded for one test, and the rules that apply to it.

    A plain class, not a dataclass: this module is imported when pytest
    starts, and a dataclass costs a millisecond to create (issue 11).
    """

    __slots__ = (
        "allow",
        "buffer",
        "done",
        "element",
        "from_marker",
        "origin",
        "readonly",
        "stopped_seen",
    )

    def __init__(
        self,
        buffer: GuardedBuffer,
        readonly: bool,
        origin: str,
        from_marker: bool = False,
        allow: tuple[Range, ...] = (),
        element: tuple[str, int] | None = None,
    ) -> None:
        self.buffer = buffer
        self.readonly = readonly
        self.origin = origin
        self.from_marker = from_marker
        self.allow = allow
        self.done = False
        #: The reason tracking stopped, once said.
        self.stopped_seen: str | None = None
        #: numpy layout of the guarded data, for element-aware reports.
        self.element = element


class ItemState:
    """Per-test state, in ``item.stash[item_state_key]``."""

    __slots__ = ("counter", "entries", "findings", "marked", "swapped", "views")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        #: Marker arguments swapped for guarded copies: argname -> original.
        self.swapped: dict[str, Any] = {}
        #: The guarded views handed to the test, dropped before closing.
        self.views: dict[str, Any] = {}
        #: Arguments named by readonly_buffer markers, validated at setup.
        self.marked: list[MarkedArgument] = []
        #: Findings of the phases reported so far.
        self.findings: list[Finding] = []
        self.counter = 0


settings_key = pytest.StashKey[Settings]()
item_state_key = pytest.StashKey[ItemState]()
#: The run's in-place watch settings, resolved when pytest starts.
watch_settings_key: pytest.StashKey[WatchSettings] = pytest.StashKey()
#: The run's manager and in-place watches (``manager.Manager``,
#: ``watchplugin.WatchManager``): registered by ``plugin.activate`` only once
#: a test guards or watches something, so a run without one never imports them.
manager_key: pytest.StashKey[Manager] = pytest.StashKey()
watch_manager_key: pytest.StashKey[WatchBook] = pytest.StashKey()


def item_state(item: pytest.Item) -> ItemState:
    state = item.stash.get(item_state_key, None)
    if state is None:
        state = item.stash[item_state_key] = ItemState()
    return state


def is_worker(config: pytest.Config) -> bool:
    """True in a pytest-xdist worker: the controller writes the reports."""
    return hasattr(config, "workerinput")
