/*
 * _uffd.c -- the kernel-facing core of pytest-uffd-guard.
 *
 * This module talks to Linux userfaultfd and nothing else: it opens the fd,
 * performs the UFFDIO_* ioctls, and runs the one fault-handler thread of the
 * process.  It holds no policy (which features to ask for, what to do with a
 * write): that lives in the Python layer.
 *
 * Why C at all: a thread that writes into a write-protected page is blocked
 * inside the kernel until someone un-protects the page.  That writer usually
 * holds the GIL, so the thread that resolves the fault must never need the
 * GIL.  The handler thread below is a plain pthread that never touches a
 * Python object.
 *
 * Conventions (after the kernel's uffd selftests and CPython's
 * faulthandler.c):
 *   - one small function per ioctl, returning 0 or -errno;
 *   - a Python wrapper (suffix _py) checks arguments and raises; internal
 *     functions never raise;
 *   - functions that run on the handler thread say so, and call no Python
 *     API and no allocator.
 *
 * GIL builds compile it against the limited API (setup.py defines
 * Py_LIMITED_API), so one abi3 binary serves Python 3.9+.  A free-threaded
 * build has no limited API and gets the full one; the module declares that
 * it does not need the GIL (PyInit), which holds because no wrapper relies
 * on the GIL to serialise its callers: shared C state is read and written
 * under H.lock / H.reg_lock, through atomics, or under life_lock below.
 */
#define PY_SSIZE_T_CLEAN
#if defined(Py_LIMITED_API) && defined(Py_GIL_DISABLED)
#error "Py_LIMITED_API cannot be used for a free-threaded build (setup.py omits it there)"
#endif
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

/* Serialises the wrappers that change the process-wide setup, which the
 * GIL used to serialise for us: handler_start/handler_stop (two stops
 * must not join the thread twice), attribution_setup (the signal and its
 * sigaction) and namer_setup/namer_stop (the namer's eventfds).  Taken
 * only without the GIL (inside Py_BEGIN_ALLOW_THREADS) and never while
 * calling the Python API; order: life_lock, then H.reg_lock, then H.lock.
 * Held across fork() (pthread_atfork in PyInit) so a child never inherits
 * it locked. */
static pthread_mutex_t life_lock = PTHREAD_MUTEX_INITIALIZER;

static void life_atfork_prepare(void) { pthread_mutex_lock(&life_lock); }
static void life_atfork_parent(void) { pthread_mutex_unlock(&life_lock); }
static void life_atfork_child(void) { pthread_mutex_init(&life_lock, NULL); }

/* Newer uapi bits, defined here so the module builds against old headers
 * (Debian 12 ships 6.1 headers).  Values from include/uapi/linux/userfaultfd.h. */
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

/* /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst). */
#define PM_PRESENT (1ULL << 63)
#define PM_SWAP (1ULL << 62)
#define PM_UFFD_WP (1ULL << 57)

/* What became of the attempt to name the writer of one fault (the "attr"
 * field of a record).  Exported to Python (PyInit); append, never renumber. */
enum {
    ATTR_OFF = 0,        /* capture is off for this buffer or process */
    ATTR_BOUND = 1,      /* the buffer's budget of captures was used up */
    ATTR_SIGNALLED = 2,  /* the writer was signalled: its dump is in the file */
    ATTR_BUSY = 3,       /* another capture was still in flight */
    ATTR_BLOCKED = 4,    /* the writing thread blocks the capture signal */
    ATTR_NO_TID = 5,     /* the kernel did not say which thread wrote */
    ATTR_FAILED = 6,     /* tgkill failed */
    ATTR_NAMING = 7,     /* in a system call: being named by the namer thread */
    ATTR_NAMED = 8,      /* the namer named it: its frames are in Python */
    ATTR_GIL_HELD = 9,   /* the namer never got the GIL in time */
    ATTR_NAMER_LATE = 10, /* the namer claimed it but did not finish in time */
    ATTR_NO_NAMER = 11,  /* in a system call, and no namer thread runs */
    ATTR_UNKNOWN = 12,   /* where the writer was (/proc .../syscall) unknown */
};

/* Syscall field of a record when the fault was not taken in a system call
 * (-1, as /proc/PID/task/TID/syscall says) or when that could not be read. */
#define SYSCALL_USER (-1)
#define SYSCALL_UNKNOWN (-2)

/* What a record stands for (its "kind" field).  Exported to Python. */
enum {
    KIND_WRITE = 0,     /* a write fault: the first write into a page */
    KIND_DISCARD = 1,   /* madvise (DONTNEED, FREE, REMOVE) discarded
                         * [address, address+length): UFFD_EVENT_REMOVE */
};

/* One recorded write fault or discard.  The layout is part of the contract
 * with the Python layer, which unpacks it as RECORD_FORMAT
 * "<QQQIIQiI16sIIQ" (80 bytes) and checks RECORD_SIZE when the engine
 * starts. */
struct fault_record {
    uint64_t address;   /* faulting address (exact with EXACT_ADDRESS) */
    uint64_t time_ns;   /* CLOCK_MONOTONIC, same clock as time.monotonic() */
    uint64_t seq;       /* process-wide fault sequence number */
    uint32_t tid;       /* faulting thread (THREAD_ID), 0 if unknown */
    uint32_t flags;     /* uffd_msg.pagefault.flags */
    uint64_t dump_offset;  /* where this fault's stack dump starts in the file */
    int32_t syscall;    /* syscall number, SYSCALL_USER or SYSCALL_UNKNOWN */
    uint32_t attr;      /* ATTR_* */
    char comm[16];      /* /proc/self/task/TID/comm at fault time, or "" */
    uint32_t kind;      /* KIND_* */
    uint32_t reserved;
    uint64_t length;    /* KIND_DISCARD: bytes discarded; 0 for a write */
};

/* A guarded range as the handler sees it: where it is, and its bounded log.
 * The log never grows on the handler thread; what does not fit is counted. */
struct guard {
    uint64_t id;
    uint64_t start;
    uint64_t end;       /* exclusive */
    uint64_t unit;      /* size of one protection unit (base or huge page) */
    struct fault_record *log;
    size_t capacity;
    size_t count;
    uint64_t overflow;
    uint64_t stacks;       /* captures per arming (0: capture off) */
    uint64_t stacks_left;  /* captures this guard may still ask for */
    /* One bit per unit: a record was made for it since it was last
     * protected.  Later faults on it (threads blocked on the same page at
     * once) are counted in `duplicates`, never logged, so they can never
     * push a first write out of the log.  NULL: log every fault. */
    uint64_t *bits;       /* allocation holding `recorded` and `pending` */
    uint64_t *recorded;
    uint64_t duplicates;
    /* One bit per unit: discarded by madvise, to re-protect once the
     * kernel has zapped it (see reprotect_pending).  Handler thread only. */
    uint64_t *pending;
    size_t npending;
    int armed;          /* protected by the last guard_protect call */
    uint64_t armings;   /* guard_protect(protect=1) calls so far */
    uint64_t reprotect_deadline;   /* CLOCK_MONOTONIC ns: stop waiting */
};

/* Naming the writer ("attribution").  While a write fault is pending, the
 * writer is blocked in the kernel and usually holds the GIL, so nothing can
 * read its Python stack on its behalf.  Instead the handler thread sends it
 * a signal on which Python's faulthandler is registered (all_threads=False,
 * chain=True): the writer dumps its own stack into `fd`, then faulthandler
 * chains to attr_signal_handler below, which appends an end marker naming
 * the fault's seq.  Exactly one capture is in flight at a time (`token`),
 * so dumps never interleave; a record stores where its dump starts, and
 * the Python side pairs dump and marker strictly by seq.
 *
 * `token` and `tid` are written by the handler thread and read by the
 * signal handler; `done` the other way round.  Lock-free atomics, so both
 * sides are async-signal-safe. */
static struct attribution {
    int enabled;            /* set up in this process (attribution_setup) */
    int sig;                /* the capture signal */
    int fd;                 /* dump file (not owned: Python holds it) */
    int installed;          /* our sigaction is in place (survives fork) */
    _Atomic uint64_t token; /* seq of the capture in flight, 0 when none */
    _Atomic int32_t tid;    /* thread signalled for `token` */
    _Atomic uint64_t done;  /* last token whose marker was written */
    uint64_t page;          /* page of the capture in flight (duplicates) */
    int32_t syscall;        /* system call of the capture in flight */
    uint64_t captures;      /* signals sent */
    uint64_t busy;          /* captures skipped: another was in flight */

    /* The namer: a Python thread that names writers blocked inside a
     * system call, where a signal could cut the call short.  The handler
     * posts a request in `nslot` (seq << 3 | NAMER_*) and wakes the namer
     * through `namer_fd`; the namer claims it (PENDING -> CLAIMED) while
     * holding the GIL, reads the writer's frames, and marks it DONE
     * (waking the handler through `ack_fd`).  The handler keeps the fault
     * unresolved meanwhile, so a CLAIMED writer is still blocked where it
     * wrote; on timeout it abandons the request (PENDING or CLAIMED ->
     * ABANDONED) and resolves the fault anyway.  Every transition is one
     * compare-and-swap on `nslot`, and seqs are unique, so a late namer
     * can never claim or finish a request it did not see. */
    int namer_fd;             /* eventfd: requests (and stop) for the namer */
    int ack_fd;               /* eventfd: the namer finished a request */
    _Atomic pid_t namer_pid;  /* process whose namer reads namer_fd, 0: none */
    _Atomic int namer_stop;   /* namer_stop() was called */
    _Atomic uint64_t nslot;   /* the request in flight, see NAMER_* */
    _Atomic int32_t ntid;     /* its writer */
    int naming;               /* the handler is inside attribution_name */
    uint64_t pending_ns;      /* how long a request may wait for a claim */
    uint64_t claimed_ns;      /* and then for DONE once claimed */
    uint64_t named;           /* requests the namer finished */
    uint64_t gil_timeouts;    /* abandoned while PENDING */
    uint64_t late;            /* abandoned while CLAIMED */

    /* Bounding the dump file: once Python has read every dump in it
     * (`consumed`, set by attribution_consumed, equals `captures`) and no
     * capture is in flight, the next capture starts it afresh. */
    _Atomic uint64_t consumed;
    uint64_t copies;          /* signalled records filed again (each read twice) */
    uint64_t rewound_at;      /* `captures + copies` at the last rewind */
} A = {.fd = -1, .namer_fd = -1, .ack_fd = -1};

enum { NAMER_IDLE = 0, NAMER_PENDING = 1, NAMER_CLAIMED = 2, NAMER_DONE = 3,
       NAMER_ABANDONED = 4 };
#define NAMER_SLOT(seq, state) ((uint64_t)(seq) << 3 | (uint64_t)(state))
#define NAMER_STATE(slot) ((int)((slot) & 7))
#define NAMER_SEQ(slot) ((slot) >> 3)

/* The one handler of this process.
 *
 * `lock` protects `guards` and the counters.  It is only ever held for a
 * table lookup or a copy: never across an ioctl or other call that can
 * block, and never while calling the Python API.  The last rule is what
 * keeps a Python caller from deadlocking on itself: any allocation can run
 * the garbage collector, whose finalizers call guard_remove, which takes
 * `lock` on the same thread.  So wrappers copy out under the lock and
 * build Python objects after unlocking.
 *
 * `reg_lock` serialises the changes to the table's shape (guard_add,
 * guard_remove) with the register/unregister ioctls that go with them, and
 * with the handler's give-up and re-protect passes, which walk the table.
 * It may be held across those ioctls; it is only taken without the GIL
 * (or on the handler thread) and never with `lock` held: order is always
 * reg_lock, then lock.  Nothing that waits for the handler holds it: the
 * kernel drops mmap_lock before a faulting thread sleeps, so the
 * UFFDIO_(UN)REGISTER done under it waits for mmap_lock at worst, never
 * for a blocked writer. */
static struct handler {
    pthread_mutex_t lock;
    pthread_mutex_t reg_lock;
    int uffd;           /* owned: closed by stop and in a forked child */
    int stopfd;         /* eventfd that wakes the poll loop to stop */
    pid_t pid;          /* process that started the handler */
    int running;        /* thread started and not yet joined */
    int failed;         /* thread gave up; every range was unregistered */
    int stopping;       /* handler_stop is under way: release held faults */
    pthread_t thread;
    uint64_t page;      /* base page size */
    uint64_t features;  /* UFFD_FEATURE_* enabled on uffd */
    int pagemap;        /* /proc/self/pagemap, or -1 */
    void *zero_page;    /* H.page zero bytes, source of UFFDIO_COPY */

    struct guard *guards;   /* sorted by start, non-overlapping */
    size_t nguards;
    size_t guards_cap;
    uint64_t next_id;

    uint64_t faults;        /* write faults seen */
    uint64_t unmatched;     /* faults outside every known guard */
    uint64_t errors;        /* resolution errors survived */
    uint64_t discards;      /* UFFD_EVENT_REMOVE messages seen */
    uint64_t other_events;  /* unexpected messages (fatal) */
    int debug_fail_after;   /* >0: the Nth next fault is treated as fatal */
    int debug_hold;         /* 1: hold faults unresolved (tests of close) */
    char error[256];        /* why the thread gave up */
} H = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .reg_lock = PTHREAD_MUTEX_INITIALIZER,
    .uffd = -1,
    .stopfd = -1,
    .pagemap = -1,
};

/* ---------------------------------------------------------------- ioctls */

static int
uffd_open_syscall(int flags)
{
    long fd = syscall(__NR_userfaultfd, flags);
    return fd < 0 ? -errno : (int)fd;
}

static int
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
static int
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
static int
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
static int
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
static int
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
static int
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

static int
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
static int
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

/* ------------------------------------------------------- handler thread */

static uint64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Index of the guard containing addr, or -1.  Caller holds H.lock. */
static long
find_guard(uint64_t addr)
{
    size_t lo = 0, hi = H.nguards;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (addr < H.guards[mid].start)
            hi = mid;
        else if (addr >= H.guards[mid].end)
            lo = mid + 1;
        else
            return (long)mid;
    }
    return -1;
}

/* Give up: remember why, then unregister every guarded range so that no
 * writer can ever block again (unregistering wakes the ones blocked now).
 * `failed` is set first, so no caller starts new work on the fd.  The
 * ioctls run without H.lock; the table cannot change shape meanwhile
 * because the caller holds H.reg_lock.  err 0: `what` says it all.
 * Runs on the handler thread.  Caller holds H.reg_lock, not H.lock. */
static void
fail_reg_held(const char *what, int err)
{
    pthread_mutex_lock(&H.lock);
    if (err)
        snprintf(H.error, sizeof H.error, "%s: %s", what, strerror(err));
    else
        snprintf(H.error, sizeof H.error, "%s", what);
    H.failed = 1;
    pthread_mutex_unlock(&H.lock);
    for (size_t i = 0; i < H.nguards; i++) {
        struct guard *g = &H.guards[i];
        uffd_unregister(H.uffd, g->start, g->end - g->start);
    }
}

/* fail_reg_held for a caller that holds neither lock. */
static void
fail(const char *what, int err)
{
    pthread_mutex_lock(&H.reg_lock);
    fail_reg_held(what, err);
    pthread_mutex_unlock(&H.reg_lock);
}

/* Bitmap helpers (one bit per protection unit of a guard). */
static inline int
bit_test(const uint64_t *map, size_t k)
{
    return (int)((map[k / 64] >> (k % 64)) & 1);
}

static inline void
bit_set(uint64_t *map, size_t k)
{
    map[k / 64] |= 1ULL << (k % 64);
}

static inline void
bit_clear(uint64_t *map, size_t k)
{
    map[k / 64] &= ~(1ULL << (k % 64));
}

/* Forget which units of [start, end) of g were recorded: the next fault on
 * each is a first write again.  Caller holds H.lock. */
static void
clear_recorded_locked(struct guard *g, uint64_t start, uint64_t end)
{
    if (!g->recorded)
        return;
    if (start < g->start)
        start = g->start;
    if (end > g->end)
        end = g->end;
    for (uint64_t a = start & ~(g->unit - 1); a < end; a += g->unit)
        bit_clear(g->recorded, (size_t)((a - g->start) / g->unit));
}

/* Read a small /proc file of thread tid into buf (NUL-terminated).
 * Returns the length or -1.  Runs on the handler thread: no allocation. */
static ssize_t
read_task_file(uint32_t tid, const char *name, char *buf, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%u/%s", tid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, size - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = '\0';
    return n;
}

/* Is the system call the blocked thread tid is in, SYSCALL_USER when the
 * fault came from user mode, SYSCALL_UNKNOWN when unreadable.  The thread
 * is blocked on our fault, so the answer is stable.  The first field of
 * /proc/.../syscall is the number, or -1 when the thread is blocked but
 * not in a system call; "running" cannot happen for a blocked writer. */
static int32_t
task_syscall(uint32_t tid)
{
    char buf[256];
    if (read_task_file(tid, "syscall", buf, sizeof buf) <= 0)
        return SYSCALL_UNKNOWN;
    char *endp;
    long nr = strtol(buf, &endp, 10);
    if (endp == buf)
        return SYSCALL_UNKNOWN;
    return nr < 0 ? SYSCALL_USER : (int32_t)nr;
}

/* 1 when thread tid blocks signal sig (SigBlk in its status), 0 when not,
 * -1 when unknown.  A blocked signal would stay pending past the write and
 * be delivered wherever the thread unblocks it: never send it then. */
static int
task_blocks(uint32_t tid, int sig)
{
    char buf[2048];
    if (read_task_file(tid, "status", buf, sizeof buf) <= 0)
        return -1;
    char *p = strstr(buf, "\nSigBlk:");
    if (!p)
        return -1;
    unsigned long long mask = strtoull(p + 8, NULL, 16);
    return (mask >> (sig - 1)) & 1;
}

/* Dump files are started afresh past this size (a dump is a few KiB). */
#define DUMP_REWIND (64 * 1024)

/* Truncate the dump file when every dump in it was read.  Caller checked
 * that no capture is in flight: the handler is then the only one that
 * starts dumps, so nothing is written or left unread.
 * Runs on the handler thread. */
static void
attribution_rewind(void)
{
    /* Dumps to be read: one per signal, one more per copy of a signalled
     * record (record_again_if_rearmed), which Python reads again. */
    uint64_t due = A.captures + A.copies;
    if (atomic_load(&A.consumed) != due || due == A.rewound_at)
        return;
    struct stat st;
    if (fstat(A.fd, &st) < 0 || st.st_size < DUMP_REWIND)
        return;
    if (ftruncate(A.fd, 0) == 0)
        lseek(A.fd, 0, SEEK_SET);
    A.rewound_at = due;
}

/* Decide whether this fault can be captured now; fill r's syscall, comm
 * and attr fields.  Returns 1 when the writer is to be signalled.
 * Runs on the handler thread, without H.lock: only /proc reads. */
static int
attribution_prepare(struct fault_record *r)
{
    r->syscall = task_syscall(r->tid);
    if (read_task_file(r->tid, "comm", r->comm, sizeof r->comm) > 0) {
        char *nl = strchr(r->comm, '\n');
        if (nl)
            *nl = '\0';
    }
    if (r->syscall == SYSCALL_UNKNOWN) {
        /* No /proc, or the thread reads as "running": it is no longer
         * blocked on this fault (another thread's fault on the same page
         * woke it), so neither way could name the write. */
        r->attr = ATTR_UNKNOWN;
        return 0;
    }
    if (r->syscall != SYSCALL_USER) {
        /* Inside a system call: never signal, a signal can cut the call
         * short (recv with MSG_WAITALL returns early).  The namer names it
         * while the fault stays unresolved; one at a time. */
        if (A.naming) {
            A.busy++;
            r->attr = ATTR_BUSY;
            return 0;
        }
        if (atomic_load(&A.namer_pid) != H.pid || atomic_load(&A.namer_stop)) {
            r->attr = ATTR_NO_NAMER;
            return 0;
        }
        r->attr = ATTR_NAMING;
        return 1;
    }
    uint64_t token = atomic_load(&A.token);
    if (token != 0 && atomic_load(&A.done) != token) {
        /* A capture is in flight.  If its thread is gone, so is the
         * signal pending on it: nothing can arrive late, free the slot. */
        char path[64];
        snprintf(path, sizeof path, "/proc/self/task/%d",
                 (int)atomic_load(&A.tid));
        if (access(path, F_OK) == 0) {
            A.busy++;
            r->attr = ATTR_BUSY;
            return 0;
        }
    }
    if (task_blocks(r->tid, A.sig) == 1) {
        r->attr = ATTR_BLOCKED;
        return 0;
    }
    /* Nobody else writes the file while no capture is in flight (the
     * signal is ours), so the end is where this dump will start. */
    attribution_rewind();
    off_t off = lseek(A.fd, 0, SEEK_END);
    if (off < 0) {
        r->attr = ATTR_FAILED;
        return 0;
    }
    r->dump_offset = (uint64_t)off;
    r->attr = ATTR_SIGNALLED;
    return 1;
}

/* Send the capture signal to the writer of record r and mark the capture
 * in flight.  Returns 0 or -errno.  Runs on the handler thread. */
static int
attribution_signal(const struct fault_record *r, uint64_t page)
{
    A.page = page;
    A.syscall = r->syscall;
    atomic_store(&A.tid, (int32_t)r->tid);
    atomic_store(&A.token, r->seq);
    if (syscall(SYS_tgkill, (pid_t)H.pid, (pid_t)r->tid, A.sig) < 0) {
        int err = errno;
        atomic_store(&A.token, 0);
        return -err;
    }
    A.captures++;
    return 0;
}

static int handle_message(const struct uffd_msg *msg);
static void set_record_attr_locked(uint64_t addr, uint64_t seq, uint32_t attr);

/* Messages read while a writer is being named, kept for afterwards because
 * resolving them would wake that writer (they are on its page). */
#define NAMER_DEFER 16

/* Abandon the request for seq if it is still in `from`; 1 when done. */
static int
namer_abandon(uint64_t seq, int from)
{
    uint64_t expect = NAMER_SLOT(seq, from);
    return atomic_compare_exchange_strong(&A.nslot, &expect,
                                          NAMER_SLOT(seq, NAMER_ABANDONED));
}

/* Name the writer of record r, blocked inside a system call on the
 * unresolved fault [start, start+unit), through the namer thread; return
 * the record's final attr.  While waiting (at most pending_ns, plus
 * claimed_ns once the namer claimed the request) it goes on handling the
 * other messages of the userfaultfd, so that a thread holding the GIL and
 * blocked on another fault cannot keep the namer from running; messages
 * on this same unit are deferred into `deferred` (resolving them would
 * wake the writer before its frames are read), *ndeferred says how many.
 * *stop is set when a message made the handler give up.
 * Runs on the handler thread: no Python API, no allocation. */
static uint32_t
attribution_name(const struct fault_record *r, uint64_t start, uint64_t unit,
                 struct uffd_msg *deferred, size_t *ndeferred, int *stop)
{
    uint64_t seq = r->seq;
    atomic_store(&A.ntid, (int32_t)r->tid);
    atomic_store(&A.nslot, NAMER_SLOT(seq, NAMER_PENDING));
    uint64_t one = 1;
    if (write(A.namer_fd, &one, sizeof one) != (ssize_t)sizeof one) {
        namer_abandon(seq, NAMER_PENDING);
        return ATTR_NO_NAMER;
    }
    uint64_t t0 = monotonic_ns();
    uint64_t limit = A.pending_ns;
    int watch_uffd = 1, give_up = 0;
    for (;;) {
        if (atomic_load(&A.nslot) == NAMER_SLOT(seq, NAMER_DONE)) {
            A.named++;
            return ATTR_NAMED;
        }
        uint64_t now = monotonic_ns();
        if (give_up || *stop || now - t0 >= limit) {
            if (namer_abandon(seq, NAMER_PENDING)) {
                A.gil_timeouts++;
                return ATTR_GIL_HELD;
            }
            if (!give_up && !*stop && limit == A.pending_ns) {
                /* Claimed: the namer holds the GIL and reads the frames;
                 * that is worth a little longer. */
                limit += A.claimed_ns;
                continue;
            }
            if (namer_abandon(seq, NAMER_CLAIMED)) {
                A.late++;
                return ATTR_NAMER_LATE;
            }
            continue;  /* it became DONE meanwhile */
        }
        struct pollfd fds[3] = {
            {.fd = A.ack_fd, .events = POLLIN},
            {.fd = H.stopfd, .events = POLLIN},
            {.fd = H.uffd, .events = POLLIN},
        };
        nfds_t nfds = watch_uffd && *ndeferred < NAMER_DEFER ? 3 : 2;
        int timeout_ms = (int)((t0 + limit - now + 999999) / 1000000);
        if (poll(fds, nfds, timeout_ms) < 0) {
            if (errno != EINTR)
                give_up = 1;
            continue;
        }
        if (fds[0].revents & POLLIN) {
            uint64_t acks;
            ssize_t got = read(A.ack_fd, &acks, sizeof acks);
            (void)got;
        }
        if (fds[1].revents) {
            /* handler_stop: every range is unregistered already (the
             * writer is awake); leave the event for handler_main. */
            give_up = 1;
            continue;
        }
        if (nfds == 3 && (fds[2].revents & (POLLERR | POLLHUP | POLLNVAL)))
            watch_uffd = 0;  /* handler_main deals with it */
        if (nfds == 3 && (fds[2].revents & POLLIN)) {
            struct uffd_msg msgs[NAMER_DEFER];
            size_t room = NAMER_DEFER - *ndeferred;
            ssize_t n = read(H.uffd, msgs, room * sizeof msgs[0]);
            if (n < 0 || n % (ssize_t)sizeof msgs[0] != 0) {
                watch_uffd = 0;  /* handler_main reads and reports it */
                continue;
            }
            for (ssize_t k = 0; k < n / (ssize_t)sizeof msgs[0]; k++) {
                uint64_t a = msgs[k].arg.pagefault.address;
                if (msgs[k].event == UFFD_EVENT_PAGEFAULT && a >= start && a < start + unit)
                    deferred[(*ndeferred)++] = msgs[k];
                else if (handle_message(&msgs[k]) < 0)
                    *stop = 1;
            }
        }
    }
}

/* The in-system-call half of handle_message: name the writer of record r
 * (already stored with ATTR_NAMING) before its fault [start, start+unit)
 * is resolved, then handle the messages deferred meanwhile.  Returns 0, or
 * -1 when the handler must stop.  Runs on the handler thread. */
static int
attribution_name_in_syscall(const struct fault_record *r, uint64_t start, uint64_t unit)
{
    struct uffd_msg deferred[NAMER_DEFER];
    size_t ndeferred = 0;
    int stop = 0;
    A.naming = 1;
    uint32_t attr = attribution_name(r, start, unit, deferred, &ndeferred, &stop);
    pthread_mutex_lock(&H.lock);
    set_record_attr_locked(r->address, r->seq, attr);
    pthread_mutex_unlock(&H.lock);
    /* Still "naming" for these: they are not named themselves (their
     * writers are on the same page, being woken now), so nothing nests. */
    for (size_t k = 0; k < ndeferred; k++)
        if (!stop && handle_message(&deferred[k]) < 0)
            stop = 1;
    A.naming = 0;
    return stop ? -1 : 0;
}

/* Store record r in the guard that contains r->address, if that guard is
 * still there.  Caller holds H.lock. */
static void
store_record_locked(const struct fault_record *r)
{
    long i = find_guard(r->address);
    if (i < 0)
        return;
    struct guard *g = &H.guards[i];
    if (g->count < g->capacity)
        g->log[g->count++] = *r;
    else
        g->overflow++;
}

/* protect() may re-arm a guard while the handler is resolving one of its
 * faults: after the record was stored (it then went with the old arming,
 * which protect() drains and drops) and before the page is un-protected.
 * Un-protecting would leave the page writable in the new arming with no
 * record there, and the writer's store, or any later one, unseen.  So:
 *   - re-armed before the un-protect: only wake the writer; the page is
 *     protected again, so its store faults anew and is recorded (exactly)
 *     in the new arming;
 *   - re-armed after the check: file the record again in the new arming
 *     unless that page already has one there, or is protected again (the
 *     re-arming came after the un-protect: typically the writer itself,
 *     woken by it, called protect(); its next store faults and is
 *     recorded as itself, issue 9 item 8).  At worst the copy stands for
 *     a store that landed before the new snapshot: a record without a
 *     change, never a change without a record.
 * rearmed() answers for the guard that holds r; caller holds H.lock. */
static struct guard *
rearmed_locked(uint64_t addr, uint64_t id, uint64_t arming)
{
    long i = find_guard(addr);
    if (i < 0 || H.guards[i].id != id || H.guards[i].armings == arming)
        return NULL;
    return &H.guards[i];
}

static int
rearmed(uint64_t addr, uint64_t id, uint64_t arming)
{
    pthread_mutex_lock(&H.lock);
    int yes = rearmed_locked(addr, id, arming) != NULL;
    pthread_mutex_unlock(&H.lock);
    return yes;
}

static int pagemap_read(uint64_t start, uint64_t *out, size_t n);

/* Runs on the handler thread, after the un-protect. */
static void
record_again_if_rearmed(const struct fault_record *r, uint64_t id, uint64_t arming)
{
    if (!rearmed(r->address, id, arming))
        return;
    /* Protected since our un-protect (pagemap's uffd-wp bit, Linux 5.13+;
     * read without H.lock): no copy.  Unknown: copy, as before. */
    uint64_t e;
    if (pagemap_read(r->address & ~(H.page - 1), &e, 1) == 0 && (e & PM_UFFD_WP))
        return;
    pthread_mutex_lock(&H.lock);
    struct guard *g = rearmed_locked(r->address, id, arming);
    if (g != NULL) {
        size_t k = (size_t)(((r->address & ~(g->unit - 1)) - g->start) / g->unit);
        if (!g->recorded || !bit_test(g->recorded, k)) {
            if (g->recorded)
                bit_set(g->recorded, k);
            size_t before = g->count;
            store_record_locked(r);
            if (g->count > before && r->attr == ATTR_SIGNALLED)
                A.copies++;
        }
    }
    pthread_mutex_unlock(&H.lock);
}

/* Change the attr of the record with this seq, if it is still in a log.
 * Caller holds H.lock. */
static void
set_record_attr_locked(uint64_t addr, uint64_t seq, uint32_t attr)
{
    long i = find_guard(addr);
    if (i < 0)
        return;
    struct guard *g = &H.guards[i];
    for (size_t k = g->count; k-- > 0;)
        if (g->log[k].seq == seq) {
            g->log[k].attr = attr;
            return;
        }
}

/* How long a discarded range waits for the kernel's zap before it is
 * re-protected anyway (MADV_FREE never zaps; see reprotect_pending). */
#define REPROTECT_WAIT_NS 1000000000ULL

/* Messages read while the handler was resolving a fault (see pump), to be
 * handled after the current batch.  Handler thread only. */
static struct {
    struct uffd_msg msgs[1024];
    size_t head, tail;
    int reprotect;      /* some guard has units pending re-protection */
} B;

/* B.reprotect as other threads may read it (handler_state). */
static _Atomic int reprotect_waiting;

/* madvise(MADV_DONTNEED / MADV_FREE / MADV_REMOVE) on a guarded range:
 * the kernel sends UFFD_EVENT_REMOVE and makes the caller wait until we
 * read it, then zaps the pages, which drops their write-protection.  Log
 * a KIND_DISCARD record in every armed guard the range overlaps (the
 * discarded bytes changed as surely as written ones), forget which of its
 * units were recorded, and mark them for re-protection once zapped.
 * Runs on the handler thread: H.lock only, no ioctl. */
static void
handle_remove(const struct uffd_msg *msg)
{
    uint64_t start = msg->arg.remove.start, end = msg->arg.remove.end;
    uint64_t now = monotonic_ns();
    pthread_mutex_lock(&H.lock);
    H.discards++;
    atomic_store(&reprotect_waiting, 1);
    for (size_t i = 0; i < H.nguards; i++) {
        struct guard *g = &H.guards[i];
        if (g->end <= start || g->start >= end || !g->armed)
            continue;
        uint64_t s = start > g->start ? start : g->start;
        uint64_t e = end < g->end ? end : g->end;
        struct fault_record r = {
            .address = s,
            .time_ns = now,
            .seq = ++H.faults,
            .syscall = SYSCALL_UNKNOWN,
            .attr = ATTR_OFF,
            .kind = KIND_DISCARD,
            .length = e - s,
        };
        if (g->count < g->capacity)
            g->log[g->count++] = r;
        else
            g->overflow++;
        clear_recorded_locked(g, s, e);
        for (uint64_t a = s & ~(g->unit - 1); a < e; a += g->unit) {
            size_t k = (size_t)((a - g->start) / g->unit);
            if (!bit_test(g->pending, k)) {
                bit_set(g->pending, k);
                g->npending++;
            }
        }
        g->reprotect_deadline = now + REPROTECT_WAIT_NS;
        B.reprotect = 1;
    }
    pthread_mutex_unlock(&H.lock);
}

/* Read what the fd holds now without blocking (it is O_NONBLOCK) into the
 * backlog.  Needed while resolving: the kernel refuses UFFDIO_WRITEPROTECT
 * and UFFDIO_COPY with EAGAIN while an event is queued and unread
 * (ctx->mmap_changing), and only this thread reads.  Events are handled
 * at once (that completes them); faults wait in the backlog.
 * Runs on the handler thread. */
static void
pump(void)
{
    size_t room = sizeof B.msgs / sizeof B.msgs[0] - B.tail;
    if (room == 0)
        return;
    ssize_t n = read(H.uffd, &B.msgs[B.tail], room * sizeof B.msgs[0]);
    if (n <= 0)
        return;
    size_t base = B.tail, got = (size_t)n / sizeof B.msgs[0];
    for (size_t k = 0; k < got; k++) {
        /* Compacts in place: B.tail <= base + k. */
        const struct uffd_msg m = B.msgs[base + k];
        if (m.event == UFFD_EVENT_REMOVE)
            handle_remove(&m);
        else
            B.msgs[B.tail++] = m;
    }
}

/* uffd_writeprotect / uffd_copy_zero_wp for the handler thread: on EAGAIN,
 * read pending events first (see pump). */
static int
handler_writeprotect(uint64_t start, uint64_t len, int protect)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (int attempt = 0; attempt < 10000; attempt++) {
        if (ioctl(H.uffd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN && errno != EINTR)
            return -errno;
        pump();
        sched_yield();
    }
    return -EAGAIN;
}

/* One pagemap entry per base page for [start, start + n pages), into out.
 * Returns 0, or -1 when pagemap cannot be read (then nothing is known). */
static int
pagemap_read(uint64_t start, uint64_t *out, size_t n)
{
    if (H.pagemap < 0)
        return -1;
    off_t off = (off_t)(start / H.page * sizeof(uint64_t));
    ssize_t got = pread(H.pagemap, out, n * sizeof *out, off);
    return got == (ssize_t)(n * sizeof *out) ? 0 : -1;
}

/* Re-protect the units madvise discarded (handle_remove).  The event
 * arrives BEFORE the zap (the caller waits only until we read it), so
 * protecting at once could be undone by the zap.  A unit is re-protected
 * once /proc/self/pagemap shows it not present: the zap has passed it (a
 * zapped anonymous pte is none; a never-populated unit keeps its uffd-wp
 * marker through the zap), or once the guard's deadline has passed
 * (MADV_FREE keeps the pages).  Without WP_UNPOPULATED protecting a none
 * pte does nothing, so a write-protected zero page is put there instead
 * (UFFDIO_COPY_MODE_WP).  Then the unit counts as never recorded.
 * Leaves B.reprotect set while units still wait.  Runs on the handler thread; takes
 * H.reg_lock only if free (a Python caller holding it may be waiting for
 * us to read an event: try again next tick). */
static void
reprotect_pending(void)
{
    if (pthread_mutex_trylock(&H.reg_lock) != 0)
        return;
    /* handle_remove (called from pump during this pass) sets it again. */
    B.reprotect = 0;
    int more = 0;
    uint64_t now = monotonic_ns();
    for (size_t i = 0; i < H.nguards; i++) {
        struct guard *g = &H.guards[i];
        if (!g->npending)
            continue;
        /* guard_protect holds reg_lock: `armed` is stable here. */
        pthread_mutex_lock(&H.lock);
        int armed = g->armed;
        pthread_mutex_unlock(&H.lock);
        int late = now >= g->reprotect_deadline;
        size_t units = (size_t)((g->end - g->start) / g->unit);
        uint64_t entries[512];
        for (size_t k0 = 0; k0 < units && g->npending; k0 += 512) {
            size_t n = units - k0 < 512 ? units - k0 : 512;
            int any = 0;
            for (size_t k = k0; k < k0 + n && !any; k++)
                any = bit_test(g->pending, k);
            if (!any)
                continue;
            int known = armed && pagemap_read(g->start + k0 * g->unit, entries, n) == 0;
            for (size_t k = k0; k < k0 + n; k++) {
                if (!bit_test(g->pending, k))
                    continue;
                uint64_t a = g->start + k * g->unit;
                uint64_t e = known ? entries[k - k0] : PM_PRESENT;
                if (armed) {
                    /* Present, or a uffd-wp marker (a swap-type pte): not
                     * zapped yet.  A zapped anonymous pte is none. */
                    if ((e & (PM_PRESENT | PM_SWAP)) && !late) {
                        more = 1;
                        continue;
                    }
                    int rc = -EEXIST;
                    if (!(e & PM_PRESENT) && !(H.features & UFFD_FEATURE_WP_UNPOPULATED)) {
                        for (int attempt = 0; attempt < 10000; attempt++) {
                            rc = uffd_copy_zero_wp(H.uffd, a, g->unit, H.zero_page);
                            if (rc != -EAGAIN)
                                break;
                            pump();
                            sched_yield();
                        }
                    }
                    if (rc == -EEXIST)
                        rc = handler_writeprotect(a, g->unit, 1);
                    pthread_mutex_lock(&H.lock);
                    if (rc < 0 && rc != -ENOENT)
                        H.errors++;
                    clear_recorded_locked(g, a, a + g->unit);
                    pthread_mutex_unlock(&H.lock);
                }
                bit_clear(g->pending, k);
                g->npending--;
            }
        }
    }
    pthread_mutex_unlock(&H.reg_lock);
    if (more)
        B.reprotect = 1;
}

/* Handle one message.  Returns 0 to go on, -1 when the thread must stop.
 * Runs on the handler thread: no Python API, no allocation. */
static int
handle_message(const struct uffd_msg *msg)
{
    if (msg->event == UFFD_EVENT_REMOVE) {
        handle_remove(msg);
        return 0;
    }
    if (msg->event != UFFD_EVENT_PAGEFAULT) {
        /* We enable no other event: a message we do not understand means
         * we do not understand the kernel.  Free every writer, say why. */
        char what[96];
        pthread_mutex_lock(&H.lock);
        H.other_events++;
        pthread_mutex_unlock(&H.lock);
        snprintf(what, sizeof what, "unexpected userfaultfd event %#x", (unsigned)msg->event);
        fail(what, 0);
        return -1;
    }
    uint64_t addr = msg->arg.pagefault.address;
    uint64_t unit = H.page;
    struct fault_record r = {
        .address = addr,
        .tid = msg->arg.pagefault.feat.ptid,
        .flags = (uint32_t)msg->arg.pagefault.flags,
        .syscall = SYSCALL_UNKNOWN,
        .attr = ATTR_OFF,
    };
    int capture = 0;

    pthread_mutex_lock(&H.lock);
    r.seq = ++H.faults;
    r.time_ns = monotonic_ns();
    long i = find_guard(addr);
    int record = i >= 0;
    if (i >= 0) {
        struct guard *g = &H.guards[i];
        unit = g->unit;
        uint64_t page = addr & ~(unit - 1);
        size_t unit_index = (size_t)((page - g->start) / unit);
        uint64_t token = atomic_load(&A.token);
        if (token != 0 && atomic_load(&A.done) != token
                && (uint32_t)atomic_load(&A.tid) == r.tid && A.page == page) {
            /* The thread we signalled faulted again on the same page:
             * the signal woke it before the page was resolved (or, in a
             * system call, the kernel retried).  One write, one record. */
            record = 0;
        } else if (g->recorded && bit_test(g->recorded, unit_index)) {
            /* Another thread blocked on a page already recorded since it
             * was protected: one record per page per arming. */
            g->duplicates++;
            record = 0;
        } else if (!A.enabled) {
            r.attr = ATTR_OFF;
        } else if (g->stacks_left == 0) {
            r.attr = g->stacks ? ATTR_BOUND : ATTR_OFF;
        } else if (r.tid == 0) {
            r.attr = ATTR_NO_TID;
        } else if (g->count < g->capacity) {
            g->stacks_left--;
            capture = 1;
        }
        if (record && g->recorded)
            bit_set(g->recorded, unit_index);
    } else {
        H.unmatched++;
    }
    if (H.debug_fail_after > 0 && --H.debug_fail_after == 0) {
        if (record)
            store_record_locked(&r);
        pthread_mutex_unlock(&H.lock);
        fail("injected handler error (test)", ECANCELED);
        return -1;
    }
    int hold = H.debug_hold;
    pthread_mutex_unlock(&H.lock);

    /* The /proc reads happen with the writer still blocked (its state is
     * stable) and without H.lock (they take microseconds). */
    if (capture)
        capture = attribution_prepare(&r);
    uint64_t start = addr & ~(unit - 1);
    /* A fault taken in user mode is signalled before it is resolved: the
     * signal is then delivered before the write instruction is retried, so
     * the dump shows the exact frame.  A fault taken inside a system call
     * is never signalled (see attribution_name_in_syscall below). */
    int early = capture && r.syscall == SYSCALL_USER;
    int sigerr = 0;
    if (early) {
        sigerr = attribution_signal(&r, start);
        if (sigerr < 0)
            r.attr = ATTR_FAILED;
    }
    /* Which arming of which guard this record belongs to (see below). */
    uint64_t stored_id = 0, stored_arming = 0;
    if (record) {
        pthread_mutex_lock(&H.lock);
        long k = find_guard(addr);
        if (k >= 0) {
            stored_id = H.guards[k].id;
            stored_arming = H.guards[k].armings;
        }
        store_record_locked(&r);
        pthread_mutex_unlock(&H.lock);
    }

    while (hold) {
        /* Test mode: keep the writer blocked until released or the range
         * is unregistered (which wakes the writer by itself). */
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
        pthread_mutex_lock(&H.lock);
        hold = H.debug_hold && !H.stopping && find_guard(addr) >= 0;
        pthread_mutex_unlock(&H.lock);
    }

    /* A fault taken inside a system call is never signalled: the namer
     * thread names it while it is still unresolved. */
    if (capture && !early && attribution_name_in_syscall(&r, start, unit) < 0)
        return -1;
    /* Round down ourselves: without EXACT_ADDRESS some kernels report the
     * exact address anyway, and the ioctl wants an aligned range. */
    if (stored_id != 0 && rearmed(addr, stored_id, stored_arming)) {
        /* See rearmed_locked: the page belongs to a new arming now. */
        uffd_wake(H.uffd, start, unit);
        return 0;
    }
    int rc = handler_writeprotect(start, unit, 0);
    if (rc == 0 && stored_id != 0)
        record_again_if_rearmed(&r, stored_id, stored_arming);
    if (rc == 0)
        return 0;
    /* ENOENT: the range was unregistered (buffer closed) between the fault
     * and now; unregistering already woke the writer, but a wake is cheap
     * and makes sure. */
    int wrc = uffd_wake(H.uffd, start, unit);
    pthread_mutex_lock(&H.lock);
    if (rc != -ENOENT)
        H.errors++;
    pthread_mutex_unlock(&H.lock);
    if (wrc != 0 && rc != -ENOENT) {
        /* Neither un-protect nor wake worked: this writer would hang.
         * Unregistering everything is the last way to free it. */
        fail("cannot resolve write fault", -rc);
        return -1;
    }
    return 0;
}

/* Chained after faulthandler's dump on the capture signal: append the end
 * marker of the capture in flight, if this thread is its target.
 *
 * This function is signal-safe and should only call signal-safe
 * functions: write(), a raw gettid and atomics; errno is preserved. */
static void
attr_signal_handler(int signum)
{
    (void)signum;
    int saved_errno = errno;
    uint64_t token = atomic_load(&A.token);
    pid_t self = (pid_t)syscall(SYS_gettid);
    if (token != 0 && A.fd >= 0 && atomic_load(&A.tid) == self) {
        /* "\n@@uffd-guard-end <seq>\n", formatted by hand. */
        char line[64] = "\n@@uffd-guard-end ";
        size_t n = strlen("\n@@uffd-guard-end ");
        char digits[24];
        size_t nd = 0;
        uint64_t v = token;
        do {
            digits[nd++] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        while (nd)
            line[n++] = digits[--nd];
        line[n++] = '\n';
        ssize_t w = write(A.fd, line, n);
        (void)w;
        atomic_store(&A.done, token);
    }
    errno = saved_errno;
}

static void *
handler_main(void *arg)
{
    (void)arg;
    /* No signal handler may ever run on this thread: it would run with
     * writers blocked on us, and could call into Python. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);

    struct uffd_msg msgs[64];
    for (;;) {
        struct pollfd fds[2] = {
            {.fd = H.uffd, .events = POLLIN},
            {.fd = H.stopfd, .events = POLLIN},
        };
        /* While discarded units wait for their zap, wake every ms. */
        if (poll(fds, 2, B.reprotect ? 1 : -1) < 0) {
            if (errno == EINTR)
                continue;
            fail("poll", errno);
            return NULL;
        }
        if (fds[1].revents)
            return NULL;
        if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            fail("userfaultfd reported an error condition", EIO);
            return NULL;
        }
        if (fds[0].revents & POLLIN) {
            /* One message at a time: a fault read in the same batch behind
             * one being named in a system call (attribution_name) would wait
             * for that naming, and if its writer holds the GIL the namer
             * cannot run.  The naming wait reads and handles the others. */
            ssize_t n = read(H.uffd, msgs, sizeof msgs[0]);
            if (n < 0 && errno != EAGAIN && errno != EINTR) {
                fail("read", errno);
                return NULL;
            }
            if (n > 0 && n % (ssize_t)sizeof msgs[0] != 0) {
                fail("short read from userfaultfd", EIO);
                return NULL;
            }
            for (ssize_t k = 0; n > 0 && k < n / (ssize_t)sizeof msgs[0]; k++)
                if (handle_message(&msgs[k]) < 0)
                    return NULL;
        }
        /* Faults read while resolving others (pump), oldest first. */
        while (B.head < B.tail)
            if (handle_message(&B.msgs[B.head++]) < 0)
                return NULL;
        B.head = B.tail = 0;
        if (B.reprotect)
            reprotect_pending();
        atomic_store(&reprotect_waiting, B.reprotect);
    }
}

/* -------------------------------------------------- fork and lifecycle */

static void
free_guard(struct guard *g)
{
    free(g->log);
    free(g->bits);
    g->log = NULL;
    g->bits = g->recorded = g->pending = NULL;
}

static void
free_guards(void)
{
    for (size_t i = 0; i < H.nguards; i++)
        free_guard(&H.guards[i]);
    free(H.guards);
    H.guards = NULL;
    H.nguards = H.guards_cap = 0;
}

/* pthread_atfork: hold the lock across fork() so the child never inherits
 * it locked, then give the child a clean, stopped handler.  The child must
 * close its copy of the fd: it refers to the *parent's* memory, and as long
 * as any process holds it, closing it in the parent would not release the
 * parent's registrations. */
static void
atfork_prepare(void)
{
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
}

static void
atfork_parent(void)
{
    pthread_mutex_unlock(&H.lock);
    pthread_mutex_unlock(&H.reg_lock);
}

static void
atfork_child(void)
{
    pthread_mutex_init(&H.lock, NULL);
    pthread_mutex_init(&H.reg_lock, NULL);
    if (H.uffd >= 0)
        close(H.uffd);
    if (H.stopfd >= 0)
        close(H.stopfd);
    if (H.pagemap >= 0)
        close(H.pagemap);
    H.uffd = H.stopfd = H.pagemap = -1;
    H.running = H.failed = H.stopping = 0;
    B.head = B.tail = 0;
    B.reprotect = 0;
    H.pid = 0;
    free_guards();
    H.error[0] = '\0';
    /* The dump file is shared with the parent (one file offset): the
     * child must set up its own before it captures anything.  Our
     * sigaction and faulthandler's stay installed, as fork keeps them. */
    A.enabled = 0;
    A.fd = -1;
    atomic_store(&A.token, 0);
    atomic_store(&A.done, 0);
    A.captures = A.busy = A.copies = 0;
}

/* Stop the thread and release everything.  Every range is unregistered
 * first, so that nothing can block between now and the close.
 * Caller holds neither lock. */
static void
handler_stop(void)
{
    if (H.pid != getpid())
        return;
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    /* A fault held by _debug(hold=1) is let go: the thread must get back
     * to its poll loop to see the stop request. */
    H.stopping = 1;
    H.debug_hold = 0;
    int failed = H.failed;
    pthread_mutex_unlock(&H.lock);
    /* Without H.lock (see struct handler); reg_lock keeps the table. */
    for (size_t i = 0; i < H.nguards && !failed; i++)
        uffd_unregister(H.uffd, H.guards[i].start,
                        H.guards[i].end - H.guards[i].start);
    pthread_mutex_unlock(&H.reg_lock);
    if (H.running) {
        uint64_t one = 1;
        if (write(H.stopfd, &one, sizeof one) < 0) {
            /* an eventfd write can only fail on overflow; the thread
             * still sees the fd readable. */
        }
        pthread_join(H.thread, NULL);
        H.running = 0;
    }
    /* reg_lock too: a guard_remove under way must not see its guard go. */
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    free_guards();
    if (H.uffd >= 0)
        close(H.uffd);
    if (H.stopfd >= 0)
        close(H.stopfd);
    if (H.pagemap >= 0)
        close(H.pagemap);
    H.uffd = H.stopfd = H.pagemap = -1;
    H.pid = 0;
    H.failed = H.stopping = 0;
    H.error[0] = '\0';
    pthread_mutex_unlock(&H.lock);
    pthread_mutex_unlock(&H.reg_lock);
}

/* ------------------------------------------------------ Python wrappers */

static PyObject *
raise_errno(int neg_errno, const char *what)
{
    int err = -neg_errno;
    PyObject *args = Py_BuildValue("(iss)", err, strerror(err), what);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

PyDoc_STRVAR(open_doc,
"open(method, flags) -> fd\n\n"
"Open a userfaultfd.  method is 'dev' (/dev/userfaultfd + USERFAULTFD_IOC_NEW)\n"
"or 'syscall' (userfaultfd(2)).  flags are passed through (O_CLOEXEC,\n"
"O_NONBLOCK, UFFD_USER_MODE_ONLY).  Raises OSError with the kernel's errno.");

static PyObject *
open_py(PyObject *self, PyObject *args)
{
    const char *method;
    int flags;
    if (!PyArg_ParseTuple(args, "si:open", &method, &flags))
        return NULL;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = strcmp(method, "dev") == 0 ? uffd_open_dev(flags)
       : strcmp(method, "syscall") == 0 ? uffd_open_syscall(flags)
       : -EINVAL;
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return raise_errno(fd, method);
    return PyLong_FromLong(fd);
}

PyDoc_STRVAR(api_doc,
"api(fd, features) -> (supported_features, ioctls)\n\n"
"UFFDIO_API handshake.  Succeeds once per fd.");

static PyObject *
api_py(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long features, ioctls = 0;
    if (!PyArg_ParseTuple(args, "iK:api", &fd, &features))
        return NULL;
    uint64_t f = features, io = ioctls;
    int rc = uffd_api(fd, &f, &io);
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_API");
    return Py_BuildValue("(KK)", (unsigned long long)f, (unsigned long long)io);
}

PyDoc_STRVAR(register_wp_doc,
"register_wp(fd, start, length) -> range_ioctls\n\n"
"UFFDIO_REGISTER with UFFDIO_REGISTER_MODE_WP; returns uffdio_register.ioctls.");

static PyObject *
register_wp_py(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKK:register_wp", &fd, &start, &len))
        return NULL;
    uint64_t io = 0;
    int rc = uffd_register_wp(fd, start, len, &io);
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_REGISTER");
    return PyLong_FromUnsignedLongLong(io);
}

PyDoc_STRVAR(unregister_doc, "unregister(fd, start, length)\n\nUFFDIO_UNREGISTER.");

static PyObject *
unregister_py(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKK:unregister", &fd, &start, &len))
        return NULL;
    int rc = uffd_unregister(fd, start, len);
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_UNREGISTER");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(writeprotect_doc,
"writeprotect(fd, start, length, protect)\n\n"
"UFFDIO_WRITEPROTECT; protect=False un-protects and wakes blocked writers.");

static PyObject *
writeprotect_py(PyObject *self, PyObject *args)
{
    int fd, protect;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKKp:writeprotect", &fd, &start, &len, &protect))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = uffd_writeprotect(fd, start, len, protect);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_WRITEPROTECT");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(populate_doc,
"populate(start, length, page)\n\n"
"Fault in every page of the range for writing (MADV_POPULATE_WRITE, or a\n"
"touch per page on kernels before 5.14).  The range must not be protected.");

static PyObject *
populate_py(PyObject *self, PyObject *args)
{
    unsigned long long start, len, page;
    if (!PyArg_ParseTuple(args, "KKK:populate", &start, &len, &page))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = populate_write(start, len, page);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, "MADV_POPULATE_WRITE");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(diff_runs_doc,
"diff_runs(a, b, length, max_runs) -> (runs, complete)\n\n"
"Compare length bytes at addresses a and b; return the runs of differing\n"
"bytes as a list of (offset, length), at most max_runs of them, and whether\n"
"the comparison reached the end.  Reads only; the caller keeps both\n"
"memories alive.");

static PyObject *
diff_runs_py(PyObject *self, PyObject *args)
{
    unsigned long long a, b, len, max_runs;
    if (!PyArg_ParseTuple(args, "KKKK:diff_runs", &a, &b, &len, &max_runs))
        return NULL;
    const unsigned char *pa = (const unsigned char *)(uintptr_t)a;
    const unsigned char *pb = (const unsigned char *)(uintptr_t)b;
    PyObject *runs = PyList_New(0);
    if (!runs)
        return NULL;
    uint64_t off = 0;
    const uint64_t chunk = 4096;
    while (off < len) {
        /* memcmp a chunk at a time: equal chunks, the common case, cost
         * one vectorised compare each. */
        uint64_t n = len - off < chunk ? len - off : chunk;
        if (memcmp(pa + off, pb + off, n) == 0) {
            off += n;
            continue;
        }
        uint64_t end = off + n;
        while (off < end) {
            if (pa[off] == pb[off]) {
                off++;
                continue;
            }
            if ((uint64_t)PyList_Size(runs) >= max_runs)
                return Py_BuildValue("(NO)", runs, Py_False);
            uint64_t run = off;
            while (off < len && pa[off] != pb[off])
                off++;
            PyObject *item = Py_BuildValue("(KK)", (unsigned long long)run,
                                           (unsigned long long)(off - run));
            if (!item || PyList_Append(runs, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(runs);
                return NULL;
            }
            Py_DECREF(item);
            if (off > end)
                end = off;
        }
    }
    return Py_BuildValue("(NO)", runs, Py_True);
}

PyDoc_STRVAR(handler_start_doc,
"handler_start(fd, page_size, features=0)\n\n"
"Start this process's fault-handler thread on fd, which the handler now\n"
"owns (it is closed by handler_stop, or in a forked child).  features are\n"
"the UFFD_FEATURE_* bits enabled on fd at UFFDIO_API: with\n"
"FEATURE_EVENT_REMOVE, madvise discards are recorded and re-protected.");

static PyObject *
handler_start_py(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long long page, features = 0;
    if (!PyArg_ParseTuple(args, "iK|K:handler_start", &fd, &page, &features))
        return NULL;
    if (page == 0 || (page & (page - 1))) {
        PyErr_SetString(PyExc_ValueError, "page_size must be a power of two");
        return NULL;
    }
    /* Everything under life_lock, without the GIL; raise after. */
    int started = 0, rc = 0;
    const char *what = NULL;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&life_lock);
    if (H.pid == getpid()) {
        started = 1;
        goto out;
    }
    if (!H.zero_page || H.page != page) {
        /* Kept for the life of the process (one page). */
        void *zero = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (zero == MAP_FAILED) {
            rc = -errno;
            what = "mmap";
            goto out;
        }
        if (H.zero_page)
            munmap(H.zero_page, H.page);
        H.zero_page = zero;
    }
    int stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stopfd < 0) {
        rc = -errno;
        what = "eventfd";
        goto out;
    }
    /* Unreadable pagemap: discarded ranges are re-protected on the
     * deadline only (reprotect_pending). */
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    pthread_mutex_lock(&H.lock);
    H.uffd = fd;
    H.stopfd = stopfd;
    H.pagemap = pagemap;
    H.page = page;
    H.features = features;
    H.failed = H.stopping = 0;
    H.error[0] = '\0';
    H.faults = H.unmatched = H.errors = H.discards = H.other_events = 0;
    pthread_mutex_unlock(&H.lock);
    B.head = B.tail = 0;
    B.reprotect = 0;
    int err = pthread_create(&H.thread, NULL, handler_main, NULL);
    if (err != 0) {
        close(stopfd);
        if (pagemap >= 0)
            close(pagemap);
        pthread_mutex_lock(&H.lock);
        H.uffd = H.stopfd = H.pagemap = -1;
        pthread_mutex_unlock(&H.lock);
        rc = -err;
        what = "pthread_create";
        goto out;
    }
    pthread_mutex_lock(&H.lock);
    H.running = 1;
    H.pid = getpid();
    pthread_mutex_unlock(&H.lock);
out:
    pthread_mutex_unlock(&life_lock);
    Py_END_ALLOW_THREADS
    if (started) {
        PyErr_SetString(PyExc_RuntimeError, "handler already started in this process");
        return NULL;
    }
    if (rc < 0)
        return raise_errno(rc, what);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(handler_stop_doc,
"handler_stop()\n\n"
"Unregister every guarded range (freeing any blocked writer), stop the\n"
"thread and close the fd.  A no-op when no handler runs in this process.");

static PyObject *
handler_stop_py(PyObject *self, PyObject *noargs)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&life_lock);
    handler_stop();
    pthread_mutex_unlock(&life_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The handler fd for the calling process, or -1 with an exception set. */
static int
owned_fd(void)
{
    /* Copied under H.lock (the handler writes `error` as it gives up),
     * raised after (see struct handler).  The fd is only a hint: callers
     * use H.uffd again under H.reg_lock, which handler_stop holds to
     * close it. */
    char error[sizeof H.error];
    pthread_mutex_lock(&H.lock);
    int fd = H.pid == getpid() ? H.uffd : -1;
    int failed = fd >= 0 && H.failed;
    if (failed)
        memcpy(error, H.error, sizeof error);
    pthread_mutex_unlock(&H.lock);
    if (fd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "no fault handler runs in this process");
        return -1;
    }
    if (failed) {
        error[sizeof error - 1] = '\0';
        PyErr_Format(PyExc_RuntimeError, "fault handler stopped: %s", error);
        return -1;
    }
    return fd;
}

PyDoc_STRVAR(guard_add_doc,
"guard_add(start, length, unit, capacity, stacks=0, every_fault=False)\n"
"    -> (id, range_ioctls)\n\n"
"Register [start, start+length) with the handler's fd in write-protect\n"
"mode and add it to the handler's table, with a log of `capacity` records;\n"
"the writers of its first `stacks` faults are named (see\n"
"attribution_setup).  One record per unit per protection unless\n"
"every_fault: later faults on a recorded unit are only counted\n"
"(duplicates).  The range is not protected yet.");

static PyObject *
guard_add_py(PyObject *self, PyObject *args)
{
    unsigned long long start, len, unit, capacity, stacks = 0;
    int every = 0;
    if (!PyArg_ParseTuple(args, "KKKK|Kp:guard_add", &start, &len, &unit, &capacity, &stacks,
                          &every))
        return NULL;
    if (len == 0 || unit == 0 || (unit & (unit - 1)) || start % unit || len % unit) {
        PyErr_SetString(PyExc_ValueError, "range must be non-empty and unit-aligned");
        return NULL;
    }
    int fd = owned_fd();
    if (fd < 0)
        return NULL;
    size_t words = (size_t)((len / unit + 63) / 64);
    struct fault_record *log = calloc(capacity ? capacity : 1, sizeof *log);
    /* recorded, then pending: one allocation. */
    uint64_t *bits = calloc(2 * words, sizeof *bits);
    if (!log || !bits) {
        free(log);
        free(bits);
        return PyErr_NoMemory();
    }

    uint64_t ioctls = 0, id = 0;
    int rc = 0, failed = 0, nomem = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&H.reg_lock);
    /* handler_stop (another thread) may have closed the fd since
     * owned_fd: it does so under reg_lock, so look again here. */
    pthread_mutex_lock(&H.lock);
    fd = H.pid == getpid() ? H.uffd : -1;
    failed = fd < 0;
    pthread_mutex_unlock(&H.lock);
    rc = failed ? 0 : uffd_register_wp(fd, start, len, &ioctls);
    if (rc == 0 && !failed) {
        pthread_mutex_lock(&H.lock);
        failed = H.failed;
        if (!failed && H.nguards == H.guards_cap) {
            size_t cap = H.guards_cap ? H.guards_cap * 2 : 16;
            struct guard *g = realloc(H.guards, cap * sizeof *g);
            if (g) {
                H.guards = g;
                H.guards_cap = cap;
            } else {
                nomem = 1;
            }
        }
        if (!failed && !nomem) {
            size_t pos = 0;
            while (pos < H.nguards && H.guards[pos].start < start)
                pos++;
            memmove(&H.guards[pos + 1], &H.guards[pos], (H.nguards - pos) * sizeof *H.guards);
            id = ++H.next_id;
            H.guards[pos] = (struct guard){
                .id = id, .start = start, .end = start + len, .unit = unit,
                .log = log, .capacity = capacity, .stacks = stacks, .stacks_left = stacks,
                .bits = bits, .recorded = every ? NULL : bits, .pending = bits + words,
            };
            H.nguards++;
        }
        pthread_mutex_unlock(&H.lock);
        /* The handler gave up meanwhile (and unregistered what it knew). */
        if (failed || nomem)
            uffd_unregister(fd, start, len);
    }
    pthread_mutex_unlock(&H.reg_lock);
    Py_END_ALLOW_THREADS
    if (rc < 0 || failed || nomem) {
        free(log);
        free(bits);
        if (rc < 0)
            return raise_errno(rc, "UFFDIO_REGISTER");
        if (nomem)
            return PyErr_NoMemory();
        return owned_fd() < 0 ? NULL : PyErr_Format(PyExc_RuntimeError, "fault handler stopped");
    }
    return Py_BuildValue("(KK)", (unsigned long long)id, (unsigned long long)ioctls);
}

/* Index of the guard with this id, or -1.  Caller holds H.lock. */
static long
guard_index(uint64_t id)
{
    for (size_t i = 0; i < H.nguards; i++)
        if (H.guards[i].id == id)
            return (long)i;
    return -1;
}

PyDoc_STRVAR(guard_protect_doc,
"guard_protect(id, protect, start=0, length=0)\n\n"
"Write-protect (or un-protect and wake) the guard's range, or a part of\n"
"it given as offset and length from the guard's start.  Protecting makes\n"
"the next fault on each unit a first write again (see guard_add).");

static PyObject *
guard_protect_py(PyObject *self, PyObject *args)
{
    unsigned long long id, off = 0, len = 0;
    int protect;
    if (!PyArg_ParseTuple(args, "Kp|KK:guard_protect", &id, &protect, &off, &len))
        return NULL;
    int fd = owned_fd();
    if (fd < 0)
        return NULL;
    long i;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    /* reg_lock: the handler's re-protect pass never runs in between. */
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    /* The fd again under reg_lock: handler_stop closes it under both. */
    fd = H.pid == getpid() ? H.uffd : -1;
    i = fd >= 0 ? guard_index(id) : -1;
    uint64_t start = 0, end = 0;
    if (i >= 0) {
        struct guard *g = &H.guards[i];
        start = g->start;
        end = g->end;
        if (len == 0)
            len = end - start - off;
        if (protect) {
            /* Before protecting: a fault that sneaks in between is then
             * recorded (a duplicate at worst), never skipped. */
            clear_recorded_locked(g, start + off, start + off + len);
            g->armed = 1;
            g->armings++;
        } else if (off == 0 && len == end - start) {
            g->armed = 0;
        }
    }
    pthread_mutex_unlock(&H.lock);
    if (i >= 0)
        rc = uffd_writeprotect(fd, start + off, len, protect);
    pthread_mutex_unlock(&H.reg_lock);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "no fault handler runs in this process");
        return NULL;
    }
    if (i < 0) {
        PyErr_SetString(PyExc_KeyError, "unknown guard");
        return NULL;
    }
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_WRITEPROTECT");
    Py_RETURN_NONE;
}

/* A guard's log and counters, copied out under H.lock. */
struct taken {
    struct fault_record *records;   /* malloc'ed, or NULL */
    size_t count;
    uint64_t overflow;
    uint64_t duplicates;
};

/* Build the (records, overflow, duplicates) answer and free t. */
static PyObject *
taken_result(struct taken *t)
{
    PyObject *blob = PyBytes_FromStringAndSize(t->records ? (const char *)t->records : "",
                                               (Py_ssize_t)(t->count * sizeof *t->records));
    free(t->records);
    t->records = NULL;
    if (!blob)
        return NULL;
    return Py_BuildValue("(NKK)", blob, (unsigned long long)t->overflow,
                         (unsigned long long)t->duplicates);
}

PyDoc_STRVAR(guard_drain_doc,
"guard_drain(id) -> (records, overflow, duplicates)\n\n"
"Take the guard's recorded faults as packed bytes (RECORD_SIZE each, see\n"
"struct fault_record), the number that did not fit and the number of\n"
"repeated faults on already-recorded units; all are reset.");

static PyObject *
guard_drain_py(PyObject *self, PyObject *args)
{
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K:guard_drain", &id))
        return NULL;
    struct taken t = {0};
    int nomem = 0;
    /* Copy out under the lock, build the bytes after (see struct handler). */
    pthread_mutex_lock(&H.lock);
    long i = H.pid == getpid() ? guard_index(id) : -1;
    if (i >= 0) {
        struct guard *g = &H.guards[i];
        if (g->count) {
            t.records = malloc(g->count * sizeof *g->log);
            nomem = t.records == NULL;
        }
        if (!nomem) {
            if (g->count)
                memcpy(t.records, g->log, g->count * sizeof *g->log);
            t.count = g->count;
            t.overflow = g->overflow;
            t.duplicates = g->duplicates;
            g->count = 0;
            g->overflow = g->duplicates = 0;
        }
    }
    pthread_mutex_unlock(&H.lock);
    if (nomem)
        return PyErr_NoMemory();
    return taken_result(&t);
}

PyDoc_STRVAR(guard_remove_doc,
"guard_remove(id) -> (records, overflow, duplicates)\n\n"
"Unregister the guard's range (waking any writer blocked in it), drop it\n"
"from the table and return what its log still held.  Safe to call after a\n"
"fork or after the handler failed: then it only forgets the guard.");

static PyObject *
guard_remove_py(PyObject *self, PyObject *args)
{
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K:guard_remove", &id))
        return NULL;
    int rc = 0;
    struct guard g = {0};
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    long i = H.pid == getpid() ? guard_index(id) : -1;
    int unregister = i >= 0 && !H.failed;
    if (i >= 0)
        g = H.guards[i];
    pthread_mutex_unlock(&H.lock);
    /* Unregistering wakes every writer blocked in the range; after this
     * no new fault can arrive for it.  Faults already queued are still
     * filed under the guard: it leaves the table only afterwards.  The
     * ioctl runs without H.lock; reg_lock keeps anyone from registering
     * the range anew in between. */
    if (unregister)
        rc = uffd_unregister(H.uffd, g.start, g.end - g.start);
    if (i >= 0) {
        /* Still there: only reg_lock holders change the table's shape. */
        pthread_mutex_lock(&H.lock);
        i = guard_index(id);
        if (i >= 0) {
            g = H.guards[i];
            memmove(&H.guards[i], &H.guards[i + 1], (H.nguards - i - 1) * sizeof *H.guards);
            H.nguards--;
        } else {
            g = (struct guard){0};
        }
        pthread_mutex_unlock(&H.lock);
    }
    pthread_mutex_unlock(&H.reg_lock);
    Py_END_ALLOW_THREADS
    struct taken t = {.count = g.count, .overflow = g.overflow, .duplicates = g.duplicates};
    t.records = g.log;
    g.log = NULL;
    free_guard(&g);
    if (t.count == 0) {
        free(t.records);
        t.records = NULL;
    }
    PyObject *result = taken_result(&t);
    /* ENOMEM/ENOENT/EINVAL here mean the mapping is already gone: nothing
     * is registered any more, which is what we wanted. */
    if (result && rc < 0 && rc != -ENOENT && rc != -ENOMEM && rc != -EINVAL) {
        Py_DECREF(result);
        return raise_errno(rc, "UFFDIO_UNREGISTER");
    }
    return result;
}

PyDoc_STRVAR(guard_set_stacks_doc,
"guard_set_stacks(id, stacks)\n\n"
"Give the guard a fresh budget of `stacks` captures (0 turns them off).");

static PyObject *
guard_set_stacks_py(PyObject *self, PyObject *args)
{
    unsigned long long id, stacks;
    if (!PyArg_ParseTuple(args, "KK:guard_set_stacks", &id, &stacks))
        return NULL;
    pthread_mutex_lock(&H.lock);
    long i = H.pid == getpid() ? guard_index(id) : -1;
    if (i >= 0)
        H.guards[i].stacks = H.guards[i].stacks_left = stacks;
    pthread_mutex_unlock(&H.lock);
    if (i < 0) {
        PyErr_SetString(PyExc_KeyError, "unknown guard");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(signal_is_default_doc,
"signal_is_default(signum) -> bool\n\n"
"True when signum's disposition is SIG_DFL at the C level (no handler\n"
"installed by anyone, Python or C) and it is not blocked in this thread.");

static PyObject *
signal_is_default_py(PyObject *self, PyObject *args)
{
    int sig;
    if (!PyArg_ParseTuple(args, "i:signal_is_default", &sig))
        return NULL;
    if (sig < 1 || sig > SIGRTMAX) {
        PyErr_SetString(PyExc_ValueError, "signal number out of range");
        return NULL;
    }
    struct sigaction old;
    if (sigaction(sig, NULL, &old) < 0)
        return raise_errno(-errno, "sigaction");
    sigset_t mask;
    pthread_sigmask(SIG_BLOCK, NULL, &mask);
    int dfl = !(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL
              && !sigismember(&mask, sig);
    return PyBool_FromLong(dfl);
}

PyDoc_STRVAR(attribution_setup_doc,
"attribution_setup(signum, fd)\n\n"
"Prepare naming writers in this process (attribution_enable starts it):\n"
"faults are signalled with signum,\n"
"and each capture's end marker is appended to fd.  The first call in a\n"
"process image installs the C end-marker handler on signum; the caller must\n"
"then register faulthandler on signum with file=fd, all_threads=False and\n"
"chain=True, so that faulthandler dumps first and chains to it.  A forked\n"
"child calls it again with its own fd (the handlers survive fork).");

static PyObject *
attribution_setup_py(PyObject *self, PyObject *args)
{
    int sig, fd;
    if (!PyArg_ParseTuple(args, "ii:attribution_setup", &sig, &fd))
        return NULL;
    if (sig < SIGRTMIN || sig > SIGRTMAX) {
        PyErr_SetString(PyExc_ValueError, "the capture signal must be a real-time signal");
        return NULL;
    }
    /* life_lock: two setups at once must agree on one signal and install
     * one sigaction.  Raise after unlocking. */
    const char *refused = NULL;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&life_lock);
    if (A.installed && A.sig != sig) {
        refused = "attribution already set up on another signal";
        goto out;
    }
    pthread_mutex_lock(&H.lock);
    if (atomic_load(&A.token) != 0 && atomic_load(&A.done) != atomic_load(&A.token)) {
        pthread_mutex_unlock(&H.lock);
        refused = "a capture is in flight";
        goto out;
    }
    A.fd = fd;
    A.sig = sig;
    /* A new file (a forked child's): nothing in it was read yet. */
    atomic_store(&A.consumed, A.captures + A.copies);
    A.rewound_at = A.captures + A.copies;
    pthread_mutex_unlock(&H.lock);
    if (!A.installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = attr_signal_handler;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART;
        if (sigaction(sig, &sa, NULL) < 0) {
            err = errno;
            pthread_mutex_lock(&H.lock);
            A.fd = -1;
            pthread_mutex_unlock(&H.lock);
            goto out;
        }
        A.installed = 1;
    }
out:
    pthread_mutex_unlock(&life_lock);
    Py_END_ALLOW_THREADS
    if (refused) {
        PyErr_SetString(PyExc_RuntimeError, refused);
        return NULL;
    }
    if (err)
        return raise_errno(-err, "sigaction");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attribution_enable_doc,
"attribution_enable(on)\n\n"
"Start (after attribution_setup and faulthandler.register) or stop\n"
"signalling writers in this process.");

static PyObject *
attribution_enable_py(PyObject *self, PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p:attribution_enable", &on))
        return NULL;
    pthread_mutex_lock(&H.lock);
    if (on && A.fd < 0) {
        pthread_mutex_unlock(&H.lock);
        PyErr_SetString(PyExc_RuntimeError, "attribution is not set up in this process");
        return NULL;
    }
    A.enabled = on;
    pthread_mutex_unlock(&H.lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(attribution_consumed_doc,
"attribution_consumed(n)\n\n"
"Python has read n dumps (one per signalled capture) since attribution_setup\n"
"in this process: once every dump was read, the handler may truncate the\n"
"file before its next capture.");

static PyObject *
attribution_consumed_py(PyObject *self, PyObject *args)
{
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "K:attribution_consumed", &n))
        return NULL;
    atomic_store(&A.consumed, (uint64_t)n);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(namer_setup_doc,
"namer_setup(pending, claimed)\n\n"
"Let the handler name writers blocked inside a system call through a namer\n"
"thread of this process (see namer_wait).  A request waits at most\n"
"`pending` seconds for the namer to claim it, and then `claimed` more for\n"
"it to finish; the fault is resolved regardless.  A forked child calls it\n"
"again (it gets its own eventfds).  Raises OSError when eventfd fails.");

static PyObject *
namer_setup_py(PyObject *self, PyObject *args)
{
    double pending, claimed;
    if (!PyArg_ParseTuple(args, "dd:namer_setup", &pending, &claimed))
        return NULL;
    /* Checked before the casts: negative or huge values are not durations. */
    if (!(pending > 0 && pending < 3600 && claimed >= 0 && claimed < 3600)) {
        PyErr_SetString(PyExc_ValueError, "namer timeouts must be between 0 and 3600 seconds");
        return NULL;
    }
    pid_t pid = getpid();
    int err = 0;
    /* life_lock: two setups at once would each replace the eventfds. */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&life_lock);
    if (atomic_load(&A.namer_pid) != pid) {
        /* First time here, or a forked child holding the parent's fds
         * (the same eventfds as the parent's: never read or write them). */
        int nfd = eventfd(0, EFD_CLOEXEC);
        int afd = nfd < 0 ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (nfd < 0 || afd < 0) {
            err = errno;
            if (nfd >= 0)
                close(nfd);
            goto out;
        }
        if (A.namer_fd >= 0)
            close(A.namer_fd);
        if (A.ack_fd >= 0)
            close(A.ack_fd);
        A.namer_fd = nfd;
        A.ack_fd = afd;
        /* fork() may have copied a handler that was naming: this process's
         * handler never started one (namer_pid was not ours). */
        A.naming = 0;
        atomic_store(&A.nslot, NAMER_SLOT(0, NAMER_IDLE));
        A.named = A.gil_timeouts = A.late = 0;
    }
    A.pending_ns = (uint64_t)(pending * 1e9);
    A.claimed_ns = (uint64_t)(claimed * 1e9);
    atomic_store(&A.namer_stop, 0);
    atomic_store(&A.namer_pid, pid);
out:
    pthread_mutex_unlock(&life_lock);
    Py_END_ALLOW_THREADS
    if (err)
        return raise_errno(-err, "eventfd");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(namer_wait_doc,
"namer_wait() -> (seq, tid) or None\n\n"
"The namer thread's loop: wait, without the GIL, for the handler to ask for\n"
"the writer of fault `seq`, a thread blocked inside a system call, and\n"
"claim the request once the GIL is held again.  While claimed, the writer\n"
"stays blocked: read thread `tid`'s frames, then call namer_done(seq).\n"
"None when the namer was stopped (namer_stop) or after a fork.");

static PyObject *
namer_wait_py(PyObject *self, PyObject *noargs)
{
    pid_t pid = getpid();
    for (;;) {
        if (atomic_load(&A.namer_stop) || atomic_load(&A.namer_pid) != pid)
            Py_RETURN_NONE;
        uint64_t v;
        ssize_t n;
        Py_BEGIN_ALLOW_THREADS
        n = read(A.namer_fd, &v, sizeof v);
        Py_END_ALLOW_THREADS
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return raise_errno(-errno, "read(namer eventfd)");
        }
        uint64_t slot = atomic_load(&A.nslot);
        if (NAMER_STATE(slot) != NAMER_PENDING)
            continue;  /* abandoned before we got the GIL: nothing to do */
        /* The tid is stored before the slot is published and rewritten only
         * after this request left PENDING, which the CAS checks. */
        int32_t tid = atomic_load(&A.ntid);
        uint64_t seq = NAMER_SEQ(slot);
        if (atomic_compare_exchange_strong(&A.nslot, &slot, NAMER_SLOT(seq, NAMER_CLAIMED)))
            return Py_BuildValue("(Ki)", (unsigned long long)seq, (int)tid);
    }
}

PyDoc_STRVAR(namer_done_doc,
"namer_done(seq) -> bool\n\n"
"Finish the claimed request `seq`.  False when the handler abandoned it\n"
"meanwhile (the writer may have moved on: drop what was read).");

static PyObject *
namer_done_py(PyObject *self, PyObject *args)
{
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "K:namer_done", &seq))
        return NULL;
    uint64_t expect = NAMER_SLOT(seq, NAMER_CLAIMED);
    if (!atomic_compare_exchange_strong(&A.nslot, &expect, NAMER_SLOT(seq, NAMER_DONE)))
        Py_RETURN_FALSE;
    uint64_t one = 1;
    if (write(A.ack_fd, &one, sizeof one) < 0) {
        /* Only on counter overflow; the handler also re-checks the slot
         * when its poll times out. */
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(namer_stop_doc,
"namer_stop()\n\n"
"Stop naming in-system-call writers in this process: namer_wait returns\n"
"None, and the handler records such writes as not named.");

static PyObject *
namer_stop_py(PyObject *self, PyObject *noargs)
{
    /* life_lock: namer_setup never swaps the eventfd meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&life_lock);
    atomic_store(&A.namer_stop, 1);
    if (atomic_load(&A.namer_pid) == getpid() && A.namer_fd >= 0) {
        uint64_t one = 1;
        if (write(A.namer_fd, &one, sizeof one) < 0) {
            /* overflow only: the namer sees namer_stop on its next wake */
        }
    }
    pthread_mutex_unlock(&life_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

PyDoc_STRVAR(namer_state_doc,
"namer_state() -> dict\n\n"
"namer (set up and not stopped in this process), request (seq of the\n"
"request in flight, 0 when none), named, gil_timeouts (abandoned before a\n"
"claim), late (abandoned after one).");

static PyObject *
namer_state_py(PyObject *self, PyObject *noargs)
{
    int mine = atomic_load(&A.namer_pid) == getpid();
    uint64_t slot = atomic_load(&A.nslot);
    int state = NAMER_STATE(slot);
    unsigned long long request = mine && (state == NAMER_PENDING || state == NAMER_CLAIMED)
                                     ? (unsigned long long)NAMER_SEQ(slot) : 0;
    unsigned long long named = A.named, gil = A.gil_timeouts, late = A.late;
    return Py_BuildValue("{s:O,s:K,s:K,s:K,s:K}",
                         "namer", mine && !atomic_load(&A.namer_stop) ? Py_True : Py_False,
                         "request", request, "named", named, "gil_timeouts", gil,
                         "late", late);
}

PyDoc_STRVAR(handler_state_doc,
"handler_state() -> dict\n\n"
"running, failed, error, faults, unmatched, errors, discards (madvise\n"
"events), other_events, guards, features (enabled at start),\n"
"reprotect_pending (madvise-discarded pages not yet protected again),\n"
"attribution (set up in this process), captures (signals sent), busy\n"
"(captures skipped while another was in flight), capture_in_flight.");

static PyObject *
handler_state_py(PyObject *self, PyObject *noargs)
{
    /* Copy out under the lock, build the dict after: an allocation can run
     * the GC, whose finalizers take H.lock (see struct handler). */
    pthread_mutex_lock(&H.lock);
    int mine = H.pid == getpid();
    int running = mine && H.running && !H.failed, failed = mine && H.failed;
    char error[sizeof H.error];
    memcpy(error, mine ? H.error : "", mine ? sizeof error : 1);
    error[sizeof error - 1] = '\0';
    unsigned long long faults = mine ? H.faults : 0, unmatched = mine ? H.unmatched : 0,
                       errors = mine ? H.errors : 0, discards = mine ? H.discards : 0,
                       other = mine ? H.other_events : 0, features = mine ? H.features : 0;
    Py_ssize_t guards = mine ? (Py_ssize_t)H.nguards : 0;
    int attribution = A.enabled;
    int reprotect = mine && atomic_load(&reprotect_waiting);
    unsigned long long captures = A.captures, busy = A.busy;
    unsigned long long in_flight =
        atomic_load(&A.done) != atomic_load(&A.token) ? atomic_load(&A.token) : 0;
    pthread_mutex_unlock(&H.lock);
    return Py_BuildValue(
        "{s:O,s:O,s:s,s:K,s:K,s:K,s:K,s:K,s:n,s:K,s:O,s:O,s:K,s:K,s:K}",
        "running", running ? Py_True : Py_False,
        "failed", failed ? Py_True : Py_False,
        "error", error,
        "faults", faults,
        "unmatched", unmatched,
        "errors", errors,
        "discards", discards,
        "other_events", other,
        "guards", guards,
        "features", features,
        "reprotect_pending", reprotect ? Py_True : Py_False,
        "attribution", attribution ? Py_True : Py_False,
        "captures", captures,
        "busy", busy,
        "capture_in_flight", in_flight);
}

PyDoc_STRVAR(handler_failure_doc,
"handler_failure() -> str or None\n\n"
"Why this process's handler gave up, or None while it runs (or never\n"
"started).  Cheap: for checking before every use of a guard.");

static PyObject *
handler_failure_py(PyObject *self, PyObject *noargs)
{
    char error[sizeof H.error];
    pthread_mutex_lock(&H.lock);
    int failed = H.pid == getpid() && H.failed;
    if (failed)
        memcpy(error, H.error, sizeof error);
    pthread_mutex_unlock(&H.lock);
    if (!failed)
        Py_RETURN_NONE;
    error[sizeof error - 1] = '\0';
    return PyUnicode_FromString(error);
}

PyDoc_STRVAR(debug_doc,
"_debug(fail_after=0, hold=0)\n\n"
"Test hooks.  fail_after=N makes the handler treat its Nth next fault as a\n"
"fatal error (exercising the give-up path); hold=1 keeps faults unresolved\n"
"until hold=0 or the range is unregistered.");

static PyObject *
debug_py(PyObject *self, PyObject *args)
{
    int fail_after = 0, hold = 0;
    if (!PyArg_ParseTuple(args, "|ii:_debug", &fail_after, &hold))
        return NULL;
    pthread_mutex_lock(&H.lock);
    H.debug_fail_after = fail_after;
    H.debug_hold = hold;
    pthread_mutex_unlock(&H.lock);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"open", open_py, METH_VARARGS, open_doc},
    {"api", api_py, METH_VARARGS, api_doc},
    {"register_wp", register_wp_py, METH_VARARGS, register_wp_doc},
    {"unregister", unregister_py, METH_VARARGS, unregister_doc},
    {"writeprotect", writeprotect_py, METH_VARARGS, writeprotect_doc},
    {"populate", populate_py, METH_VARARGS, populate_doc},
    {"diff_runs", diff_runs_py, METH_VARARGS, diff_runs_doc},
    {"handler_start", handler_start_py, METH_VARARGS, handler_start_doc},
    {"handler_stop", handler_stop_py, METH_NOARGS, handler_stop_doc},
    {"handler_state", handler_state_py, METH_NOARGS, handler_state_doc},
    {"handler_failure", handler_failure_py, METH_NOARGS, handler_failure_doc},
    {"guard_add", guard_add_py, METH_VARARGS, guard_add_doc},
    {"guard_protect", guard_protect_py, METH_VARARGS, guard_protect_doc},
    {"guard_drain", guard_drain_py, METH_VARARGS, guard_drain_doc},
    {"guard_remove", guard_remove_py, METH_VARARGS, guard_remove_doc},
    {"guard_set_stacks", guard_set_stacks_py, METH_VARARGS, guard_set_stacks_doc},
    {"signal_is_default", signal_is_default_py, METH_VARARGS, signal_is_default_doc},
    {"attribution_setup", attribution_setup_py, METH_VARARGS, attribution_setup_doc},
    {"attribution_enable", attribution_enable_py, METH_VARARGS, attribution_enable_doc},
    {"attribution_consumed", attribution_consumed_py, METH_VARARGS, attribution_consumed_doc},
    {"namer_setup", namer_setup_py, METH_VARARGS, namer_setup_doc},
    {"namer_wait", namer_wait_py, METH_NOARGS, namer_wait_doc},
    {"namer_done", namer_done_py, METH_VARARGS, namer_done_doc},
    {"namer_stop", namer_stop_py, METH_NOARGS, namer_stop_doc},
    {"namer_state", namer_state_py, METH_NOARGS, namer_state_doc},
    {"_debug", debug_py, METH_VARARGS, debug_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_uffd",
    "Kernel-facing core of pytest-uffd-guard (userfaultfd write-protect).",
    -1, methods, NULL, NULL, NULL, NULL,
};

#define ADD_INT(m, name, value) \
    if (PyModule_AddObject(m, name, PyLong_FromUnsignedLongLong(value)) < 0) goto error

PyMODINIT_FUNC
PyInit__uffd(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    ADD_INT(m, "O_CLOEXEC", O_CLOEXEC);
    ADD_INT(m, "O_NONBLOCK", O_NONBLOCK);
    ADD_INT(m, "USER_MODE_ONLY", UFFD_USER_MODE_ONLY);
    ADD_INT(m, "FEATURE_PAGEFAULT_FLAG_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    ADD_INT(m, "FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK);
    ADD_INT(m, "FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS);
    ADD_INT(m, "FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID);
    ADD_INT(m, "FEATURE_EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS);
    ADD_INT(m, "FEATURE_WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    ADD_INT(m, "FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED);
    ADD_INT(m, "FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC);
    ADD_INT(m, "IOCTL_WRITEPROTECT_BIT", _UFFDIO_WRITEPROTECT);
    ADD_INT(m, "PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE);
    ADD_INT(m, "PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP);
    ADD_INT(m, "RECORD_SIZE", sizeof(struct fault_record));
    ADD_INT(m, "FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE);
    ADD_INT(m, "KIND_WRITE", KIND_WRITE);
    ADD_INT(m, "KIND_DISCARD", KIND_DISCARD);
    ADD_INT(m, "ATTR_OFF", ATTR_OFF);
    ADD_INT(m, "ATTR_BOUND", ATTR_BOUND);
    ADD_INT(m, "ATTR_SIGNALLED", ATTR_SIGNALLED);
    ADD_INT(m, "ATTR_BUSY", ATTR_BUSY);
    ADD_INT(m, "ATTR_BLOCKED", ATTR_BLOCKED);
    ADD_INT(m, "ATTR_NO_TID", ATTR_NO_TID);
    ADD_INT(m, "ATTR_FAILED", ATTR_FAILED);
    if (PyModule_AddObject(m, "SYSCALL_USER", PyLong_FromLong(SYSCALL_USER)) < 0)
        goto error;
    if (PyModule_AddObject(m, "SYSCALL_UNKNOWN", PyLong_FromLong(SYSCALL_UNKNOWN)) < 0)
        goto error;
    ADD_INT(m, "SIGRTMIN", SIGRTMIN);
    ADD_INT(m, "SIGRTMAX", SIGRTMAX);
    /* Registered after the handler's, so its prepare runs first:
     * life_lock, then H.reg_lock and H.lock, the usual order. */
    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0
            || pthread_atfork(life_atfork_prepare, life_atfork_parent, life_atfork_child) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        goto error;
    }
#ifdef Py_GIL_DISABLED
    /* True: see the top of the file.  Without it, importing this module
     * would turn the GIL back on for the whole process. */
    if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0)
        goto error;
#endif
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
