/*
 * budget.c -- telling the hybrid engine that a guard used its budget.
 *
 * A hybrid buffer starts on the sync engine and moves to the async one
 * after BUDGET recorded pages (engines/hybrid.py).  Its watcher thread used
 * to poll every such buffer every few milliseconds: with hundreds of them
 * it kept a CPU busy and the GIL contended while nothing was written.  Now
 * the handler counts: guard_set_budget gives a guard a number of records,
 * classify_fault_locked spends one per record, and when the last is spent
 * the guard is flagged and one eventfd, read by the watcher, is bumped.
 * The watcher sleeps in read() until then and asks budget_hits() which
 * guards they were.  The count is an upper bound on new pages (a page can
 * be recorded again after a re-protect); the watcher checks and re-arms
 * the budget with what is left.
 *
 * No hit may be lost, or a buffer stays sync for good (seen on 3.13t with
 * four writer threads): a record is spent only once it is in the log (the
 * watcher then finds it when it drains), every record made after the
 * budget is spent flags the guard again (one made while the watcher is
 * between budget_hits and guard_set_budget), and guard_set_budget leaves
 * a pending flag alone (the watcher looks once more: harmless).
 *
 * The eventfd is per process: a forked child gets its own on first use
 * (budget_atfork_child), so a parent's hit never wakes the child's watcher
 * nor is eaten by it.
 */
#include "uffd.h"

static int notify_fd = -1;
static pid_t notify_pid;

/* Bump the watcher's eventfd.  A write to an eventfd cannot block short of
 * 2^64 - 1 unread bumps, and is async-signal-safe.  Caller holds H.lock. */
static void
budget_notify_locked(void)
{
    if (notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t n = write(notify_fd, &one, sizeof one);
        (void)n;  /* only EAGAIN (overflow) is possible: the watcher is awake */
    }
}

/* One record made for g: spend one unit of its budget.  Caller holds H.lock. */
void
budget_spend_locked(struct guard *g)
{
    if (!g->budget_on)
        return;
    if (g->budget_left > 0 && --g->budget_left > 0)
        return;
    if (!g->budget_hit) {  /* one bump per flag: the watcher reads them all */
        g->budget_hit = 1;
        budget_notify_locked();
    }
}

/* Give guard id `n` more records before it is flagged (0: no budget).
 * 0 or TABLE_UNKNOWN. */
int
guard_set_budget(uint64_t id, uint64_t n)
{
    pthread_mutex_lock(&H.lock);
    long i = guard_index(id);
    if (i >= 0) {
        H.guards[i].budget_left = n;
        H.guards[i].budget_on = n > 0;
    }
    pthread_mutex_unlock(&H.lock);
    return i >= 0 ? 0 : TABLE_UNKNOWN;
}

/* Copy up to cap ids of flagged guards into ids and clear their flags;
 * how many were copied (call again while it returns cap). */
size_t
budget_hits(uint64_t *ids, size_t cap)
{
    size_t n = 0;
    pthread_mutex_lock(&H.lock);
    for (size_t i = 0; i < H.nguards && n < cap; i++) {
        if (H.guards[i].budget_hit) {
            H.guards[i].budget_hit = 0;
            ids[n++] = H.guards[i].id;
        }
    }
    pthread_mutex_unlock(&H.lock);
    return n;
}

/* This process's eventfd (created on first use), or -errno. */
int
budget_fd(void)
{
    int rc;
    pthread_mutex_lock(&H.lock);
    if (notify_fd < 0 || notify_pid != getpid()) {
        notify_fd = eventfd(0, EFD_CLOEXEC);
        notify_pid = getpid();
    }
    rc = notify_fd >= 0 ? notify_fd : -errno;
    pthread_mutex_unlock(&H.lock);
    return rc;
}

/* In a forked child: the parent's eventfd is not ours to read or bump. */
void
budget_atfork_child(void)
{
    if (notify_fd >= 0)
        close(notify_fd);
    notify_fd = -1;
}
