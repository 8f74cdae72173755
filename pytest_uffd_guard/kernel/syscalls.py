"""The names of the system calls that write into user memory.

A writer blocked inside a system call is shown by the call's name (``read``
of a ``readinto``), read from ``/proc/self/task/TID/syscall`` as a number.
The numbers differ by architecture: x86_64 has its own table
(arch/x86/entry/syscalls/syscall_64.tbl), aarch64 and the other newer
architectures share include/uapi/asm-generic/unistd.h.
``tests/test_syscalls.py`` checks both tables against the kernel headers
installed on the machine (``asm/unistd_64.h``, ``asm-generic/unistd.h``).
"""

from __future__ import annotations

import platform

#: The syscall field of a record when the fault was taken in user mode
#: (/proc/.../syscall says -1), or when that could not be read; the
#: extension's SYSCALL_USER and SYSCALL_UNKNOWN (tests/test_contract.py).
SYSCALL_USER = -1
SYSCALL_UNKNOWN = -2

#: System calls that write into user memory, by number.  Others are shown
#: as "syscall N".
SYSCALL_NAMES: dict[str, dict[int, str]] = {
    "x86_64": {
        0: "read",
        5: "fstat",
        7: "poll",
        16: "ioctl",
        17: "pread64",
        19: "readv",
        22: "pipe",
        23: "select",
        43: "accept",
        45: "recvfrom",
        47: "recvmsg",
        55: "getsockopt",
        61: "wait4",
        63: "uname",
        70: "msgrcv",
        79: "getcwd",
        89: "readlink",
        99: "sysinfo",
        202: "futex",
        217: "getdents64",
        228: "clock_gettime",
        232: "epoll_wait",
        243: "mq_timedreceive",
        262: "newfstatat",
        267: "readlinkat",
        271: "ppoll",
        275: "splice",
        278: "vmsplice",
        281: "epoll_pwait",
        288: "accept4",
        293: "pipe2",
        295: "preadv",
        299: "recvmmsg",
        310: "process_vm_readv",
        318: "getrandom",
        327: "preadv2",
        332: "statx",
        426: "io_uring_enter",
    },
    "generic": {
        17: "getcwd",
        22: "epoll_pwait",
        29: "ioctl",
        59: "pipe2",
        61: "getdents64",
        63: "read",
        65: "readv",
        67: "pread64",
        69: "preadv",
        73: "ppoll",
        75: "vmsplice",
        76: "splice",
        78: "readlinkat",
        79: "newfstatat",
        80: "fstat",
        98: "futex",
        113: "clock_gettime",
        160: "uname",
        179: "sysinfo",
        183: "mq_timedreceive",
        188: "msgrcv",
        202: "accept",
        207: "recvfrom",
        209: "getsockopt",
        212: "recvmsg",
        242: "accept4",
        243: "recvmmsg",
        260: "wait4",
        270: "process_vm_readv",
        278: "getrandom",
        286: "preadv2",
        291: "statx",
        426: "io_uring_enter",
    },
}
GENERIC_MACHINES = ("aarch64", "arm64", "riscv64", "loongarch64")


def syscall_name(number: int) -> str:
    """The name of system call ``number`` on this machine, or ``"syscall N"``."""
    machine = platform.machine()
    key = "generic" if machine in GENERIC_MACHINES else machine
    return SYSCALL_NAMES.get(key, {}).get(number, f"syscall {number}")
