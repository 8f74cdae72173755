/*
 * table.c -- the guard table and the handler's life.
 *
 * The table (H.guards) is sorted by start and changes shape only under
 * H.reg_lock, together with the UFFDIO_(UN)REGISTER that goes with the
 * change; H.lock covers the lookups and copies (see struct handler).
 * Every entry point here returns 0 or -errno, or a positive TABLE_* code,
 * and is called by a _py wrapper of module.c without the GIL when it may
 * block: none raises, none calls the Python API.
 */
#include "uffd.h"

pthread_mutex_t life_lock = PTHREAD_MUTEX_INITIALIZER;

static void life_atfork_prepare(void) { pthread_mutex_lock(&life_lock); }
static void life_atfork_parent(void) { pthread_mutex_unlock(&life_lock); }
static void life_atfork_child(void) { pthread_mutex_init(&life_lock, NULL); }

/* This process's pid.  getpid() is a system call (glibc stopped caching it
 * in 2.25) and every guard call asks whether the table is this process's
 * (8 calls per create and close of a buffer): cached here, and set again in
 * a forked child by atfork_child.  A child made without fork()'s atfork
 * handlers (a raw clone(2), vfork + exec) never calls into this module. */
static _Atomic pid_t own_pid;

static pid_t
self_pid(void)
{
    pid_t pid = atomic_load_explicit(&own_pid, memory_order_relaxed);
    if (pid == 0) {
        pid = getpid();
        atomic_store_explicit(&own_pid, pid, memory_order_relaxed);
    }
    return pid;
}

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

/* Forget the guards, close the fds and clear the failure, error and
 * warning: a stopped handler.  Caller holds H.reg_lock and H.lock, or is
 * a forked child's only thread. */
static void
reset_stopped(void)
{
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
    H.error[0] = H.warning[0] = '\0';
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
    atomic_store_explicit(&own_pid, getpid(), memory_order_relaxed);
    pthread_mutex_init(&H.lock, NULL);
    pthread_mutex_init(&H.reg_lock, NULL);
    reset_stopped();
    H.running = 0;
    B.head = B.tail = 0;
    B.reprotect = 0;
    attribution_atfork_child();
    budget_atfork_child();
}

/* Install the fork handlers (once, from PyInit).  Registered after the
 * handler's, so its prepare runs first: life_lock, then H.reg_lock and
 * H.lock, the usual order.  0 or -1. */
int
install_atfork(void)
{
    if (pthread_atfork(atfork_prepare, atfork_parent, atfork_child) != 0
            || pthread_atfork(life_atfork_prepare, life_atfork_parent, life_atfork_child) != 0)
        return -1;
    return 0;
}

/* Stop the thread and release everything.  Every range is unregistered
 * first, so that nothing can block between now and the close.
 * Caller holds neither lock. */
void
handler_stop(void)
{
    if (H.pid != self_pid())
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
    reset_stopped();
    pthread_mutex_unlock(&H.lock);
    pthread_mutex_unlock(&H.reg_lock);
}


/* handler_stop under life_lock (two stops must not join the thread
 * twice).  Call without the GIL. */
void
handler_shutdown(void)
{
    pthread_mutex_lock(&life_lock);
    handler_stop();
    pthread_mutex_unlock(&life_lock);
}

/* Start this process's handler thread on fd (see handler_start_py).
 * Returns 0, TABLE_STARTED, or -errno with *what naming the call that
 * failed.  Everything under life_lock; call without the GIL. */
int
handler_start(int fd, uint64_t page, uint64_t features, uint64_t spin_ns, const char **what)
{
    int rc = 0;
    pthread_mutex_lock(&life_lock);
    if (H.pid == self_pid()) {
        rc = TABLE_STARTED;
        goto out;
    }
    if (!H.zero_page || H.page != page) {
        /* Kept for the life of the process (one page). */
        void *zero = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (zero == MAP_FAILED) {
            rc = -errno;
            *what = "mmap";
            goto out;
        }
        if (H.zero_page)
            munmap(H.zero_page, H.page);
        H.zero_page = zero;
    }
    int stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (stopfd < 0) {
        rc = -errno;
        *what = "eventfd";
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
    H.spin_ns = spin_ns;
    H.failed = H.stopping = 0;
    H.error[0] = H.warning[0] = '\0';
    H.faults = H.unmatched = H.errors = H.discards = H.other_events = 0;
    H.last_event = 0;
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
        *what = "pthread_create";
        goto out;
    }
    pthread_mutex_lock(&H.lock);
    H.running = 1;
    H.pid = self_pid();
    pthread_mutex_unlock(&H.lock);
out:
    pthread_mutex_unlock(&life_lock);
    return rc;
}

/* The handler fd for the calling process; TABLE_NO_HANDLER, or
 * TABLE_STOPPED with why copied into error, as negative numbers
 * (-TABLE_*).  Copied under H.lock (the handler writes `error` as it gives
 * up), raised by the caller after.  The fd is only a hint: callers use
 * H.uffd again under H.reg_lock, which handler_stop holds to close it. */
int
handler_fd(char *error, size_t size)
{
    pthread_mutex_lock(&H.lock);
    int fd = H.pid == self_pid() ? H.uffd : -1;
    int failed = fd >= 0 && H.failed;
    if (failed)
        snprintf(error, size, "%s", H.error);
    pthread_mutex_unlock(&H.lock);
    if (fd < 0)
        return -TABLE_NO_HANDLER;
    return failed ? -TABLE_STOPPED : fd;
}

/* Register [start, start+len) in write-protect mode and add it to the
 * table with a log of `capacity` records (see guard_add_py).  Returns 0
 * with *id and *ioctls set; -errno when UFFDIO_REGISTER failed;
 * TABLE_NOMEM; TABLE_NO_HANDLER or TABLE_STOPPED when the handler went
 * away meanwhile.  Takes reg_lock across the ioctl; call without the GIL. */
int
guard_add(uint64_t start, uint64_t len, uint64_t unit, uint64_t capacity,
          uint64_t stacks, int every, uint64_t *id, uint64_t *ioctls)
{
    size_t words = (size_t)((len / unit + 63) / 64);
    struct fault_record *log = calloc(capacity ? capacity : 1, sizeof *log);
    /* recorded, then pending: one allocation. */
    uint64_t *bits = calloc(2 * words, sizeof *bits);
    if (!log || !bits) {
        free(log);
        free(bits);
        return TABLE_NOMEM;
    }
    int rc = 0;
    pthread_mutex_lock(&H.reg_lock);
    /* handler_stop (another thread) may have closed the fd since the
     * caller's handler_fd: it does so under reg_lock, so look again here. */
    pthread_mutex_lock(&H.lock);
    int fd = H.pid == self_pid() ? H.uffd : -1;
    pthread_mutex_unlock(&H.lock);
    rc = fd < 0 ? TABLE_NO_HANDLER : uffd_register_wp(fd, start, len, ioctls);
    if (rc == 0) {
        pthread_mutex_lock(&H.lock);
        if (H.failed)
            rc = TABLE_STOPPED;
        if (rc == 0 && H.nguards == H.guards_cap) {
            size_t cap = H.guards_cap ? H.guards_cap * 2 : 16;
            struct guard *g = realloc(H.guards, cap * sizeof *g);
            if (g) {
                H.guards = g;
                H.guards_cap = cap;
            } else {
                rc = TABLE_NOMEM;
            }
        }
        if (rc == 0) {
            size_t pos = 0;
            while (pos < H.nguards && H.guards[pos].start < start)
                pos++;
            memmove(&H.guards[pos + 1], &H.guards[pos], (H.nguards - pos) * sizeof *H.guards);
            *id = ++H.next_id;
            H.guards[pos] = (struct guard){
                .id = *id, .start = start, .end = start + len, .unit = unit,
                .log = log, .capacity = capacity, .stacks = stacks, .stacks_left = stacks,
                .bits = bits, .recorded = every ? NULL : bits, .pending = bits + words,
            };
            H.nguards++;
        }
        pthread_mutex_unlock(&H.lock);
        /* The handler gave up meanwhile (and unregistered what it knew). */
        if (rc != 0)
            uffd_unregister(fd, start, len);
    }
    pthread_mutex_unlock(&H.reg_lock);
    if (rc != 0) {
        free(log);
        free(bits);
    }
    return rc;
}

/* Write-protect (or un-protect and wake) [off, off+len) of guard id, all
 * of it when len is 0.  0, -errno (UFFDIO_WRITEPROTECT), TABLE_NO_HANDLER
 * or TABLE_UNKNOWN.  Call without the GIL. */
int
guard_protect(uint64_t id, int protect, uint64_t off, uint64_t len)
{
    /* reg_lock: the handler's re-protect pass never runs in between. */
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    /* The fd again under reg_lock: handler_stop closes it under both. */
    int fd = H.pid == self_pid() ? H.uffd : -1;
    long i = fd >= 0 ? guard_index(id) : -1;
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
    /* The ioctl runs without H.lock, under reg_lock.  It cannot wait for
     * a writer (the kernel drops mmap_lock before a writer sleeps); on
     * EAGAIN (an event queued and unread) it retries, a bounded number of
     * times, while the handler reads the event: the handler's own use of
     * reg_lock is a trylock (reprotect_pending) or its give-up (fail). */
    int rc = fd < 0 ? TABLE_NO_HANDLER
           : i < 0 ? TABLE_UNKNOWN
           : uffd_writeprotect(fd, start + off, len, protect);
    pthread_mutex_unlock(&H.reg_lock);
    return rc;
}

/* Take guard id's log and counters into t and reset them (guard_drain).
 * 0 (t empty for an unknown guard) or TABLE_NOMEM.  Copies under H.lock;
 * the caller builds the bytes after (see struct handler). */
int
guard_take(uint64_t id, struct taken *t)
{
    int rc = 0;
    pthread_mutex_lock(&H.lock);
    long i = H.pid == self_pid() ? guard_index(id) : -1;
    if (i >= 0) {
        struct guard *g = &H.guards[i];
        if (g->count) {
            t->records = malloc(g->count * sizeof *g->log);
            rc = t->records == NULL ? TABLE_NOMEM : 0;
        }
        if (rc == 0) {
            if (g->count)
                memcpy(t->records, g->log, g->count * sizeof *g->log);
            t->count = g->count;
            t->overflow = g->overflow;
            t->duplicates = g->duplicates;
            g->count = 0;
            g->overflow = g->duplicates = 0;
        }
    }
    pthread_mutex_unlock(&H.lock);
    return rc;
}

/* Unregister guard id's range (waking any writer blocked in it), drop it
 * from the table and hand its log to t (guard_remove).  Returns the
 * unregister's 0 or -errno.  Forgets only, after a fork or once the
 * handler failed.  Call without the GIL. */
int
guard_forget(uint64_t id, struct taken *t)
{
    int rc = 0;
    struct guard g = {0};
    pthread_mutex_lock(&H.reg_lock);
    pthread_mutex_lock(&H.lock);
    long i = H.pid == self_pid() ? guard_index(id) : -1;
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
    *t = (struct taken){.count = g.count, .overflow = g.overflow, .duplicates = g.duplicates};
    t->records = g.log;
    g.log = NULL;
    free_guard(&g);
    if (t->count == 0) {
        free(t->records);
        t->records = NULL;
    }
    return rc;
}

/* A fresh budget of `stacks` captures for guard id.  0 or TABLE_UNKNOWN. */
int
guard_set_stacks(uint64_t id, uint64_t stacks)
{
    pthread_mutex_lock(&H.lock);
    long i = H.pid == self_pid() ? guard_index(id) : -1;
    if (i >= 0)
        H.guards[i].stacks = H.guards[i].stacks_left = stacks;
    pthread_mutex_unlock(&H.lock);
    return i >= 0 ? 0 : TABLE_UNKNOWN;
}

/* Copy handler_state's numbers out under H.lock (the caller builds the
 * dict after: an allocation can run the GC, whose finalizers take H.lock). */
void
handler_snapshot(struct handler_snapshot *s)
{
    pthread_mutex_lock(&H.lock);
    int mine = H.pid == self_pid();
    s->running = mine && H.running && !H.failed;
    s->failed = mine && H.failed;
    snprintf(s->error, sizeof s->error, "%s", mine ? H.error : "");
    snprintf(s->warning, sizeof s->warning, "%s", mine ? H.warning : "");
    s->faults = mine ? H.faults : 0;
    s->unmatched = mine ? H.unmatched : 0;
    s->errors = mine ? H.errors : 0;
    s->discards = mine ? H.discards : 0;
    s->other_events = mine ? H.other_events : 0;
    s->last_event = mine ? H.last_event : 0;
    s->features = mine ? H.features : 0;
    s->guards = mine ? H.nguards : 0;
    s->attribution = A.enabled;
    s->reprotect = mine && atomic_load(&reprotect_waiting);
    s->captures = A.captures;
    s->busy = A.busy;
    s->in_flight = atomic_load(&A.done) != atomic_load(&A.token) ? atomic_load(&A.token) : 0;
    pthread_mutex_unlock(&H.lock);
}

/* 1 with why copied into error when this process's handler gave up. */
int
handler_failure_copy(char *error, size_t size)
{
    pthread_mutex_lock(&H.lock);
    int failed = H.pid == self_pid() && H.failed;
    if (failed)
        snprintf(error, size, "%s", H.error);
    pthread_mutex_unlock(&H.lock);
    return failed;
}

/* The test hooks of _debug. */
void
handler_debug(int fail_after, int hold)
{
    pthread_mutex_lock(&H.lock);
    H.debug_fail_after = fail_after;
    H.debug_hold = hold;
    pthread_mutex_unlock(&H.lock);
}
