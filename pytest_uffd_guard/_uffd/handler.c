/*
 * handler.c -- the handler pthread of this process.
 *
 * handler_main polls the userfaultfd (and the stop eventfd), reads one
 * message at a time and dispatches it (handle_message): a write fault is
 * looked up in the guard table, recorded, its writer named if asked for
 * (capture.c, namer.c), and resolved by un-protecting its unit; an
 * UFFD_EVENT_REMOVE goes to remove.c; anything else makes the handler give
 * up, loudly.
 *
 * Everything here runs on the handler thread: no Python API, no
 * allocation, all signals blocked; H.lock only for lookups and copies.
 */
/* sched_getaffinity, CPU_COUNT */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <sched.h>

#include "uffd.h"

struct handler H = {
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .reg_lock = PTHREAD_MUTEX_INITIALIZER,
    .uffd = -1,
    .stopfd = -1,
    .pagemap = -1,
};

struct backlog B;
_Atomic int reprotect_waiting;

uint64_t
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Give up: remember why, then unregister every guarded range so that no
 * writer can ever block again (unregistering wakes the ones blocked now).
 * `failed` is set first, so no caller starts new work on the fd.  The
 * ioctls run without H.lock; the table cannot change shape meanwhile
 * because the caller holds H.reg_lock.  err 0: `what` says it all.
 * Runs on the handler thread.  Caller holds H.reg_lock, not H.lock. */
void
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
void
fail(const char *what, int err)
{
    pthread_mutex_lock(&H.reg_lock);
    fail_reg_held(what, err);
    pthread_mutex_unlock(&H.reg_lock);
}

/* Read what the fd holds now without blocking (it is O_NONBLOCK) into the
 * backlog.  Needed while resolving: the kernel refuses UFFDIO_WRITEPROTECT
 * and UFFDIO_COPY with EAGAIN while an event is queued and unread
 * (ctx->mmap_changing), and only this thread reads.  Events are handled
 * at once (that completes them); faults wait in the backlog.
 * Runs on the handler thread. */
void
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
int
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

/* The name of a uffd_msg event, for messages. */
const char *
event_name(uint32_t event)
{
    switch (event) {
    case UFFD_EVENT_PAGEFAULT: return "PAGEFAULT";
    case UFFD_EVENT_FORK: return "FORK";
    case UFFD_EVENT_REMAP: return "REMAP";
    case UFFD_EVENT_REMOVE: return "REMOVE";
    case UFFD_EVENT_UNMAP: return "UNMAP";
    default: return "unknown";
    }
}

/* Remember the last anomaly the handler survived, for handler_state (its
 * count is kept by the caller).  Caller holds H.lock. */
void
warn_locked(const char *what, uint64_t addr, int err)
{
    if (err)
        snprintf(H.warning, sizeof H.warning, "%s at %#llx: %s", what,
                 (unsigned long long)addr, strerror(err));
    else
        snprintf(H.warning, sizeof H.warning, "%s at %#llx", what, (unsigned long long)addr);
}

/* Test hook _debug(fail_after=N): 1 when this is the Nth fault, which is
 * stored (it was seen) and then treated as fatal.  Caller holds H.lock. */
static int
injected_failure_locked(const struct fault *f)
{
    if (H.debug_fail_after <= 0 || --H.debug_fail_after != 0)
        return 0;
    if (f->record)
        store_record_locked(&f->r);
    return 1;
}

/* Store f's record, noting which arming of which guard holds it. */
static void
store_fault(struct fault *f)
{
    pthread_mutex_lock(&H.lock);
    long k = find_guard(f->r.address);
    if (k >= 0) {
        f->guard_id = H.guards[k].id;
        f->arming = H.guards[k].armings;
    }
    store_record_locked(&f->r);
    pthread_mutex_unlock(&H.lock);
}

/* Test hook _debug(hold=1): keep the writer blocked until released or the
 * range is unregistered (which wakes the writer by itself). */
static void
hold_fault(const struct fault *f)
{
    int hold = f->hold;
    while (hold) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
        pthread_mutex_lock(&H.lock);
        hold = H.debug_hold && !H.stopping && find_guard(f->r.address) >= 0;
        pthread_mutex_unlock(&H.lock);
    }
}

/* Resolve the fault: un-protect its unit, which wakes the writer.
 * Returns 0, or -1 when the handler had to give up. */
static int
resolve_fault(const struct fault *f)
{
    /* The fault's guard went away while the fault was held (closed during
     * a naming wait or a test hold): unregistering woke the writer.  If
     * another guard took the range since, un-protecting would open that
     * guard's page with no record there, so only wake.  (A guard added
     * between this check and the ioctl is not caught: that window is the
     * ioctl's, not the naming wait's.) */
    if (!owner_unchanged(f->r.address, f->owner)) {
        uffd_wake(H.uffd, f->start, f->unit);
        return 0;
    }
    /* Round down ourselves: without EXACT_ADDRESS some kernels report the
     * exact address anyway, and the ioctl wants an aligned range. */
    if (f->guard_id != 0 && rearmed(f->r.address, f->guard_id, f->arming)) {
        /* See rearmed_locked: the page belongs to a new arming now. */
        uffd_wake(H.uffd, f->start, f->unit);
        return 0;
    }
    int rc = handler_writeprotect(f->start, f->unit, 0);
    if (rc == 0 && f->guard_id != 0)
        record_again_if_rearmed(&f->r, f->guard_id, f->arming);
    if (rc == 0)
        return 0;
    /* ENOENT: the range was unregistered (buffer closed) between the fault
     * and now; unregistering already woke the writer, but a wake is cheap
     * and makes sure. */
    int wrc = uffd_wake(H.uffd, f->start, f->unit);
    pthread_mutex_lock(&H.lock);
    if (rc != -ENOENT) {
        H.errors++;
        warn_locked("un-protecting a write fault failed", f->start, -rc);
    }
    pthread_mutex_unlock(&H.lock);
    if (wrc != 0 && rc != -ENOENT) {
        /* Neither un-protect nor wake worked: this writer would hang.
         * Unregistering everything is the last way to free it. */
        fail("cannot resolve write fault", -rc);
        return -1;
    }
    return 0;
}

/* One write fault.  Returns 0 to go on, -1 when the thread must stop. */
static int
handle_fault(const struct uffd_msg *msg)
{
    struct fault f = {
        .r = {
            .address = msg->arg.pagefault.address,
            .tid = msg->arg.pagefault.feat.ptid,
            .flags = (uint32_t)msg->arg.pagefault.flags,
            .syscall = SYSCALL_UNKNOWN,
            .attr = ATTR_OFF,
        },
        .unit = H.page,
    };
    pthread_mutex_lock(&H.lock);
    classify_fault_locked(&f);
    if (injected_failure_locked(&f)) {
        pthread_mutex_unlock(&H.lock);
        fail("injected handler error (test)", ECANCELED);
        return -1;
    }
    f.hold = H.debug_hold;
    pthread_mutex_unlock(&H.lock);

    /* The /proc reads happen with the writer still blocked (its state is
     * stable) and without H.lock (they take microseconds). */
    if (f.capture)
        f.capture = attribution_prepare(&f.r);
    f.start = f.r.address & ~(f.unit - 1);
    /* A fault taken in user mode is signalled before it is resolved: the
     * signal is then delivered before the write instruction is retried, so
     * the dump shows the exact frame.  A fault taken inside a system call
     * is never signalled (see attribution_name_in_syscall below). */
    int early = f.capture && f.r.syscall == SYSCALL_USER;
    if (early && attribution_signal(&f.r, f.start) < 0)
        f.r.attr = ATTR_FAILED;
    if (f.record)
        store_fault(&f);
    hold_fault(&f);
    /* A fault taken inside a system call is never signalled: the namer
     * thread names it while it is still unresolved. */
    if (f.capture && !early && attribution_name_in_syscall(&f.r, f.start, f.unit) < 0)
        return -1;
    return resolve_fault(&f);
}

/* Any other message.  We enable no other event: a message we do not
 * understand means we do not understand the kernel.  Free every writer,
 * say why (H.error, and H.last_event for handler_state).  A FORK message
 * carries a new userfaultfd for the child's memory, which read() put in
 * our fd table: close it, or the child's ranges stay registered with
 * nobody to resolve their faults and its writers hang.  Closed last: the
 * child may run, exit and be reaped as soon as it is, and whoever reaps it
 * must find the failure already said. */
static int
handle_unexpected(const struct uffd_msg *msg)
{
    pthread_mutex_lock(&H.lock);
    H.other_events++;
    H.last_event = msg->event;
    pthread_mutex_unlock(&H.lock);
    char what[96];
    snprintf(what, sizeof what, "unexpected userfaultfd event %s (%#x)",
             event_name(msg->event), (unsigned)msg->event);
    fail(what, 0);
    if (msg->event == UFFD_EVENT_FORK)
        close((int)msg->arg.fork.ufd);
    return -1;
}

/* Handle one message.  Returns 0 to go on, -1 when the thread must stop.
 * Runs on the handler thread: no Python API, no allocation. */
int
handle_message(const struct uffd_msg *msg)
{
    switch (msg->event) {
    case UFFD_EVENT_PAGEFAULT:
        return handle_fault(msg);
    case UFFD_EVENT_REMOVE:
        handle_remove(msg);
        return 0;
    default:
        return handle_unexpected(msg);
    }
}
/* Whether this thread may run on more than one CPU (affinity, cpusets). */
static int
several_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 0;
    return CPU_COUNT(&set) > 1;
}

/* Read one message if the fd holds one and handle it, then the backlog.
 * Returns 1 when a message was handled, 0 when there was none, -1 when
 * the thread must stop.  One message at a time: a fault read in the same
 * batch behind one being named in a system call (attribution_name) would
 * wait for that naming, and if its writer holds the GIL the namer cannot
 * run.  The naming wait reads and handles the others. */
static int
take_one(void)
{
    struct uffd_msg msg;
    ssize_t n = read(H.uffd, &msg, sizeof msg);
    if (n < 0 && errno != EAGAIN && errno != EINTR) {
        fail("read", errno);
        return -1;
    }
    if (n > 0 && n != (ssize_t)sizeof msg) {
        fail("short read from userfaultfd", EIO);
        return -1;
    }
    if (n > 0 && handle_message(&msg) < 0)
        return -1;
    /* Faults read while resolving others (pump), oldest first. */
    while (B.head < B.tail)
        if (handle_message(&B.msgs[B.head++]) < 0)
            return -1;
    B.head = B.tail = 0;
    if (B.reprotect)
        reprotect_pending();
    atomic_store(&reprotect_waiting, B.reprotect);
    return n > 0;
}

void *
handler_main(void *arg)
{
    (void)arg;
    /* No signal handler may ever run on this thread: it would run with
     * writers blocked on us, and could call into Python. */
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    const uint64_t spin_ns = H.spin_ns;

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
        int got = take_one();
        if (got < 0)
            return NULL;
        if (!got || !spin_ns)
            continue;
        /* The spin window (handler_start's spin_ns; Python's
         * PYTEST_UFFD_GUARD_SPIN_US, off by default): after a fault, read
         * the non-blocking fd in a loop, yielding in between, so that a
         * writer faulting again within the window finds this thread awake:
         * one cross-CPU wake-up per fault instead of two.  Renewed by each
         * message; once none came for spin_ns the thread sleeps in poll(),
         * so an idle handler uses no CPU.  Never when this thread may use
         * one CPU only: it would spin on the CPU the writer needs. */
        if (!several_cpus())
            continue;
        uint64_t until = monotonic_ns() + spin_ns;
        while (monotonic_ns() < until) {
            got = take_one();
            if (got < 0)
                return NULL;
            if (got)
                until = monotonic_ns() + spin_ns;
            else
                sched_yield();
        }
    }
}
