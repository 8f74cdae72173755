"""A tiny CSV parser with a bug: it normalises line endings in place."""

from __future__ import annotations


def parse_rows(buf: memoryview) -> list[list[str]]:
    """Split ``buf`` (bytes of CSV text) into rows of fields.

    BUG: turns every carriage return into a newline *in the caller's
    buffer*.  The fix is to work on a copy: ``data = bytes(buf).replace(...)``.
    """
    view = memoryview(buf).cast("B")
    for i, byte in enumerate(view):
        if byte == 0x0D:  # "\r"
            view[i] = 0x0A  # "\n" -- writes into the input
    text = bytes(view).decode()
    return [line.split(",") for line in text.split("\n") if line]


def stamp_header(buf: memoryview) -> None:
    """Write a 4-byte record count at the start of ``buf`` (a header slot)."""
    view = memoryview(buf).cast("B")
    view[0:4] = (1).to_bytes(4, "little")
