/*
 * uapi.h -- the kernel's userfaultfd uapi bits that older headers lack.
 *
 * Debian 12 ships Linux 6.1 headers, so anything newer is defined here,
 * each value copied from include/uapi/linux/userfaultfd.h (or mman.h) and
 * guarded with #ifndef so a newer header wins.  Plain kernel facts, no
 * policy: the extension (uffd.h) and the C baselines of benchmarks/ both
 * include this file, so the two cannot drift apart.
 */
#ifndef PYTEST_UFFD_GUARD_UAPI_H
#define PYTEST_UFFD_GUARD_UAPI_H

#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

/* Write-protect and opening (5.11 .. 6.7). */
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_FEATURE_EXACT_ADDRESS
#define UFFD_FEATURE_EXACT_ADDRESS (1 << 11)
#endif
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef UFFD_FEATURE_EVENT_REMOVE
#define UFFD_FEATURE_EVENT_REMOVE (1 << 3)
#endif
#ifndef UFFD_EVENT_REMOVE
#define UFFD_EVENT_REMOVE 0x15
#endif
#ifndef UFFDIO_COPY_MODE_WP
#define UFFDIO_COPY_MODE_WP ((__u64)1 << 1)
#endif

/* Feature bits and event numbers that Python mirrors (probe.FEATURES) and
 * that older uapi headers lack.  Values from include/uapi/linux/userfaultfd.h;
 * module.c exports every one of them, so tests/test_contract.py can compare. */
#ifndef UFFD_FEATURE_EVENT_REMAP
#define UFFD_FEATURE_EVENT_REMAP (1 << 2)
#endif
#ifndef UFFD_FEATURE_MISSING_HUGETLBFS
#define UFFD_FEATURE_MISSING_HUGETLBFS (1 << 4)
#endif
#ifndef UFFD_FEATURE_MISSING_SHMEM
#define UFFD_FEATURE_MISSING_SHMEM (1 << 5)
#endif
#ifndef UFFD_FEATURE_EVENT_UNMAP
#define UFFD_FEATURE_EVENT_UNMAP (1 << 6)
#endif
#ifndef UFFD_FEATURE_MINOR_HUGETLBFS
#define UFFD_FEATURE_MINOR_HUGETLBFS (1 << 9)
#endif
#ifndef UFFD_FEATURE_MINOR_SHMEM
#define UFFD_FEATURE_MINOR_SHMEM (1 << 10)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif
#ifndef UFFD_EVENT_FORK
#define UFFD_EVENT_FORK 0x13
#endif
#ifndef UFFD_EVENT_REMAP
#define UFFD_EVENT_REMAP 0x14
#endif
#ifndef UFFD_EVENT_UNMAP
#define UFFD_EVENT_UNMAP 0x16
#endif

#endif /* PYTEST_UFFD_GUARD_UAPI_H */
