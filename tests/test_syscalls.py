"""The writer's system call names (kernel/syscalls.py) against the kernel's
own numbering (issue 13 item 2).

The tables were typed from the kernel's syscall tables; these tests read
the uapi headers installed on the machine (Debian's linux-libc-dev:
``asm/unistd_64.h`` for x86_64, ``asm-generic/unistd.h`` for aarch64 and
the other architectures that share it) and check every number we name.
A header that is not installed skips its test with the package to install.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import pytest

from pytest_uffd_guard.kernel import syscalls

INCLUDE = Path("/usr/include")


def header_numbers(path: Path) -> dict[str, int]:
    """``__NR_name`` -> number from a uapi unistd header, with the generic
    header's ``__NR3264_`` indirection (``__NR_newfstatat __NR3264_fstatat``)
    resolved."""
    text = path.read_text()
    numbers = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)\b", text)}
    wide = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR3264_(\w+)\s+(\d+)\b", text)}
    for m in re.finditer(r"#define __NR_(\w+)\s+__NR3264_(\w+)\b", text):
        if m[2] in wide:
            numbers.setdefault(m[1], wide[m[2]])
    return numbers


def find_header(table: str, *candidates: str) -> Path:
    for name in candidates:
        for path in INCLUDE.glob(name):
            return path
    where = "" if table == "generic" else f" (an {table} machine's linux-libc-dev has it)"
    pytest.skip(f"no {candidates[0]} under {INCLUDE}: install linux-libc-dev{where}")


@pytest.mark.parametrize(
    ("table", "headers"),
    [
        ("x86_64", ("x86_64-linux-gnu/asm/unistd_64.h", "asm/unistd_64.h")),
        ("generic", ("asm-generic/unistd.h",)),
    ],
)
def test_every_named_number_is_the_kernels(table: str, headers: tuple[str, ...]) -> None:
    numbers = header_numbers(find_header(table, *headers))
    assert len(numbers) > 250, "the header parsed to too few system calls"
    wrong = {
        number: (name, numbers.get(name))
        for number, name in syscalls.SYSCALL_NAMES[table].items()
        if numbers.get(name) != number
    }
    assert not wrong, f"{table}: our number -> (name, the kernel's number): {wrong}"


def test_the_generic_table_is_used_on_arm64() -> None:
    """aarch64 (and arm64 as some tools spell it) read the generic table:
    63 is read there, 0 on x86_64."""
    assert {"aarch64", "arm64"} <= set(syscalls.GENERIC_MACHINES)
    assert syscalls.SYSCALL_NAMES["generic"][63] == "read"
    assert syscalls.SYSCALL_NAMES["x86_64"][0] == "read"


def test_names_on_this_machine() -> None:
    """Known numbers get names; others say the number."""
    read = {"x86_64": 0, "aarch64": 63}.get(platform.machine())
    if read is not None:
        assert syscalls.syscall_name(read) == "read"
    assert syscalls.syscall_name(99999) == "syscall 99999"
