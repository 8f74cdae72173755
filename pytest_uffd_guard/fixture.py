"""The ``guarded_buffer`` fixture's body: a factory of guarded buffers for one test.

Its buffers are entries of the test's state (``state.py``); the plugin's
manager harvests them after each phase and closes them at teardown.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .marker import strict_rules
from .state import (
    FIXTURE,
    REQUIRED_SUFFIX,
    UNAVAILABLE_PREFIX,
    Entry,
    item_state,
    settings_key,
)

if TYPE_CHECKING:
    from .guard import GuardedBuffer

#: Error of the fixture for a name that is not a str.
BAD_NAME = "guarded_buffer(name=...) must be a str, got {type} {value!r}"


def new_buffer(item: pytest.Item, source: Any, name: str, **options: Any) -> GuardedBuffer:
    """A GuardedBuffer, or the test skipped (or failed) if uffd is missing.

    ``options`` are GuardedBuffer's keywords; ``engine`` and ``stacks``
    default to the session's settings (issue 9, item 16).
    """
    from .errors import UffdUnavailableError
    from .guard import GuardedBuffer

    settings = item.config.stash[settings_key]
    kwargs: dict[str, Any] = {"engine": settings.engine, "stacks": settings.stacks}
    kwargs.update({k: v for k, v in options.items() if v is not None})
    try:
        return GuardedBuffer(source, name=name, **kwargs)
    except UffdUnavailableError as exc:
        text = " ".join(f"{UNAVAILABLE_PREFIX}: {exc.cause}; fix: {exc.remedy}".split())
        if item.config.stash[settings_key].require:
            pytest.fail(f"{text} {REQUIRED_SUFFIX}", pytrace=False)
        pytest.skip(text)


class GuardedBufferFactory:
    """The ``guarded_buffer`` fixture's value (and its type for annotations):
    call it to guard a buffer for the running test."""

    def __init__(self, item: pytest.Item) -> None:
        self._item = item
        self._state = item_state(item)

    def __call__(
        self,
        source: Any,
        *,
        name: str | None = None,
        readonly: bool = True,
        engine: str | None = None,
        backing: str | None = None,
        stacks: int | None = None,
        max_records: int | None = None,
    ) -> GuardedBuffer:
        __tracebackhide__ = True
        if name is not None and not isinstance(name, str):
            from .errors import InvalidBufferError

            raise InvalidBufferError(
                BAD_NAME.format(type=type(name).__name__, value=name),
                "pass a str, e.g. name='frame' (decode bytes first)",
            )
        state = self._state
        state.counter += 1
        buffer = new_buffer(
            self._item,
            source,
            name if name is not None else f"buffer-{state.counter}",
            engine=engine,
            backing=backing,
            stacks=stacks,
            max_records=max_records,
        )
        from . import harvest  # here, not at start-up: most runs guard nothing

        entry = Entry(
            buffer=buffer,
            readonly=bool(readonly),
            origin=FIXTURE,
            element=harvest.element_of(source),
        )
        state.entries.append(entry)
        # A bare readonly_buffer marker: strict, with its allow= (issue 14, item 2).
        entry.from_marker, entry.allow = strict_rules(self._item, len(buffer), entry.readonly)
        return buffer


def buffers(item: pytest.Item) -> Iterator[GuardedBufferFactory]:
    """The body of the ``guarded_buffer`` fixture (declared in ``plugin.py``,
    which imports this module only when a test asks for the fixture): the
    factory for the test, then every buffer it made closed."""
    yield GuardedBufferFactory(item)
    for entry in item_state(item).entries:
        if entry.origin == FIXTURE:
            entry.buffer.close()


__all__ = ["BAD_NAME", "GuardedBufferFactory", "buffers", "new_buffer"]
