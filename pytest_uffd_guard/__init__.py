"""pytest-uffd-guard: catch writes into memory that was meant to be read.

The Python API works without pytest::

    from pytest_uffd_guard import GuardedBuffer, capabilities

    with GuardedBuffer(b"payload", name="frame") as buf:
        parse(memoryview(buf))
        assert not buf.writes, buf.changes()

Names are imported lazily, so importing the package (as pytest does for the
plugin) opens no file descriptor, starts no thread and loads no ctypes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BufferAllocationError",
    "BufferClosedError",
    "Capabilities",
    "Change",
    "GuardedBuffer",
    "InvalidBufferError",
    "ResourceLimitError",
    "TrackingStoppedError",
    "UffdGuardError",
    "UffdUnavailableError",
    "UnsupportedPlatformError",
    "Watch",
    "WriteRecord",
    "capabilities",
    "watch",
]

_WHERE = {
    "GuardedBuffer": "guard",
    "Capabilities": "kernel.capabilities",
    "capabilities": "kernel.capabilities",
    "Change": "kernel.records",
    "WriteRecord": "kernel.records",
    "BufferAllocationError": "errors",
    "BufferClosedError": "errors",
    "InvalidBufferError": "errors",
    "ResourceLimitError": "errors",
    "TrackingStoppedError": "errors",
    "UffdGuardError": "errors",
    "UffdUnavailableError": "errors",
    "UnsupportedPlatformError": "errors",
    "Watch": "inplace",
    "watch": "inplace",
}

if TYPE_CHECKING:
    from .errors import (
        BufferAllocationError,
        BufferClosedError,
        InvalidBufferError,
        ResourceLimitError,
        TrackingStoppedError,
        UffdGuardError,
        UffdUnavailableError,
        UnsupportedPlatformError,
    )
    from .guard import GuardedBuffer
    from .inplace import Watch, watch
    from .kernel.capabilities import Capabilities, capabilities
    from .kernel.records import Change, WriteRecord


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_uffd_guard' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
