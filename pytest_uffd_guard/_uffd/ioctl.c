/*
 * ioctl.c -- opening a userfaultfd and one small function per ioctl.
 *
 * Each function fills one uffdio_* struct, issues one ioctl and returns 0
 * (or the new fd) or -errno, after the kernel's uffd selftests.  None of
 * them touches shared state or takes a lock: callers decide which lock
 * may be held (see struct handler in uffd.h).
 */
#include "uffd.h"

/* userfaultfd(2).  Fails with EPERM when unprivileged users may only
 * handle user-mode faults (vm.unprivileged_userfaultfd=0) and flags lack
 * UFFD_USER_MODE_ONLY. */
int
uffd_open_syscall(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

/* /dev/userfaultfd (5.11+) and USERFAULTFD_IOC_NEW: access is the device
 * node's mode, not vm.unprivileged_userfaultfd. */
int
uffd_open_dev(int flags)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
    int err = errno;
    close(dev);
    return fd < 0 ? -err : fd;
}

/* UFFDIO_API.  On success *features is every feature the kernel supports
 * (not the requested subset) and *ioctls the fd-level ioctls only: the
 * kernel never reports _UFFDIO_WRITEPROTECT here, see uffd_register_wp. */
int
uffd_api(int fd, uint64_t *features, uint64_t *ioctls)
{
    struct uffdio_api api = {.api = UFFD_API, .features = *features};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    *features = api.features;
    *ioctls = api.ioctls;
    return 0;
}

/* UFFDIO_REGISTER in write-protect mode.  *ioctls receives the range
 * ioctls "guaranteed to succeed on this range": write-protect support shows
 * as bit _UFFDIO_WRITEPROTECT here, and only here. */
int
uffd_register_wp(int fd, uint64_t start, uint64_t len, uint64_t *ioctls)
{
    struct uffdio_register reg = {
        .range = {.start = start, .len = len},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
        return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

/* Unregister a range and wake every writer blocked in it.  The kernel's
 * UFFDIO_UNREGISTER wakes pending faults only for MISSING-mode ranges
 * (fs/userfaultfd.c: "if (userfaultfd_missing(vma)) wake_userfault()"): a
 * writer blocked on a WP-only range would sleep on, so wake it ourselves.
 * UFFDIO_WAKE checks only that the range is valid, not that it is still
 * registered, and the woken writer retries its store on plain memory. */
int
uffd_unregister(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    int rc = ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
    struct uffdio_range wake = {.start = start, .len = len};
    ioctl(fd, UFFDIO_WAKE, &wake);
    return rc;
}

/* Protect or un-protect [start, start+len).  Un-protecting also wakes the
 * threads blocked on write faults in the range.  EAGAIN means the mm was
 * changing under us (mremap, fork in progress): retrying is the documented
 * answer, so retry a bounded number of times. */
int
uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (int attempt = 0; attempt < 10000; attempt++) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
        sched_yield();
    }
    return -EAGAIN;
}

/* Map a write-protected zero page at the none pte `start` (UFFDIO_COPY
 * with UFFDIO_COPY_MODE_WP): how the handler re-protects a page that
 * madvise zapped on kernels without WP_UNPOPULATED, where protecting a
 * none pte does nothing.  -EEXIST: the page is present (use
 * uffd_writeprotect).  -EAGAIN: an event is queued and unread; the caller
 * (the handler) reads it and retries.  Unlike touching the page, this can
 * never fault into our own handler. */
int
uffd_copy_zero_wp(int fd, uint64_t start, uint64_t len, const void *zero)
{
    struct uffdio_copy copy = {
        .dst = start,
        .src = (uint64_t)(uintptr_t)zero,
        .len = len,
        .mode = UFFDIO_COPY_MODE_WP,
    };
    for (;;) {
        if (ioctl(fd, UFFDIO_COPY, &copy) == 0)
            return 0;
        if (errno != EINTR)
            return -errno;
    }
}

/* UFFDIO_WAKE: wake the writers blocked on [start, start+len). */
int
uffd_wake(int fd, uint64_t start, uint64_t len)
{
    struct uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

/* Make every page of [start, start+len) present and writable, so that a
 * later UFFDIO_WRITEPROTECT finds a pte to mark.  Kernels without
 * UFFD_FEATURE_WP_UNPOPULATED (before 6.4) silently skip none ptes in
 * anonymous memory, and the first write there would go unreported.
 * MADV_POPULATE_WRITE (5.14) does it in one call; before that, touch. */
int
populate_write(uint64_t start, uint64_t len, uint64_t page)
{
    if (madvise((void *)(uintptr_t)start, len, MADV_POPULATE_WRITE) == 0)
        return 0;
    if (errno != EINVAL)
        return -errno;
    for (uint64_t off = 0; off < len; off += page) {
        volatile char *p = (volatile char *)(uintptr_t)(start + off);
        *p = *p;
    }
    return 0;
}

