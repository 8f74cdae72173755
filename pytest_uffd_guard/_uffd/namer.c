/*
 * namer.c -- naming writers blocked inside a system call (see the namer
 * in struct attribution): the handler thread's side of the A.nslot
 * handshake (attribution_name*), then the namer thread's side, which the
 * Python wrappers call (namer_setup .. namer_snapshot).
 *
 * The handler side runs on the handler thread: no Python API, no
 * allocation.  Every transition of A.nslot is one compare-and-swap, so
 * neither side needs a lock.
 */
#include "uffd.h"

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
int
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

/* Let the handler name in-system-call writers through this process's
 * namer (see namer_setup_py).  Returns 0 or -errno (eventfd).  Takes
 * life_lock: two setups at once would each replace the eventfds. */
int
namer_setup(uint64_t pending_ns, uint64_t claimed_ns)
{
    pid_t pid = getpid();
    int rc = 0;
    pthread_mutex_lock(&life_lock);
    if (atomic_load(&A.namer_pid) != pid) {
        /* First time here, or a forked child holding the parent's fds
         * (the same eventfds as the parent's: never read or write them). */
        int nfd = eventfd(0, EFD_CLOEXEC);
        int afd = nfd < 0 ? -1 : eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (nfd < 0 || afd < 0) {
            rc = -errno;
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
    A.pending_ns = pending_ns;
    A.claimed_ns = claimed_ns;
    atomic_store(&A.namer_stop, 0);
    atomic_store(&A.namer_pid, pid);
out:
    pthread_mutex_unlock(&life_lock);
    return rc;
}

/* 1 when namer_wait must return: stopped, or not this process's namer. */
int
namer_stopped(void)
{
    return atomic_load(&A.namer_stop) || atomic_load(&A.namer_pid) != getpid();
}

/* Block until the handler posts a request (or a stop).  0 or -errno.
 * Call without the GIL. */
int
namer_read_wake(void)
{
    uint64_t v;
    return read(A.namer_fd, &v, sizeof v) < 0 ? -errno : 0;
}

/* Claim the pending request, if there is one: 1 with *seq and *tid set,
 * 0 when it was abandoned before the namer got the GIL (nothing to do). */
int
namer_claim(uint64_t *seq, int32_t *tid)
{
    uint64_t slot = atomic_load(&A.nslot);
    if (NAMER_STATE(slot) != NAMER_PENDING)
        return 0;
    /* The tid is stored before the slot is published and rewritten only
     * after this request left PENDING, which the CAS checks. */
    *tid = atomic_load(&A.ntid);
    *seq = NAMER_SEQ(slot);
    return atomic_compare_exchange_strong(&A.nslot, &slot, NAMER_SLOT(*seq, NAMER_CLAIMED));
}

/* Finish the claimed request seq: 1, or 0 when the handler abandoned it. */
int
namer_done(uint64_t seq)
{
    uint64_t expect = NAMER_SLOT(seq, NAMER_CLAIMED);
    if (!atomic_compare_exchange_strong(&A.nslot, &expect, NAMER_SLOT(seq, NAMER_DONE)))
        return 0;
    uint64_t one = 1;
    if (write(A.ack_fd, &one, sizeof one) < 0) {
        /* Only on counter overflow; the handler also re-checks the slot
         * when its poll times out. */
    }
    return 1;
}

/* Stop naming in this process and wake the namer.  Takes life_lock:
 * namer_setup never swaps the eventfd meanwhile.  Call without the GIL. */
void
namer_stop(void)
{
    pthread_mutex_lock(&life_lock);
    atomic_store(&A.namer_stop, 1);
    if (atomic_load(&A.namer_pid) == getpid() && A.namer_fd >= 0) {
        uint64_t one = 1;
        if (write(A.namer_fd, &one, sizeof one) < 0) {
            /* overflow only: the namer sees namer_stop on its next wake */
        }
    }
    pthread_mutex_unlock(&life_lock);
}

/* namer_state's numbers (lock-free reads, as before the split). */
void
namer_snapshot(struct namer_snapshot *s)
{
    int mine = atomic_load(&A.namer_pid) == getpid();
    uint64_t slot = atomic_load(&A.nslot);
    int state = NAMER_STATE(slot);
    s->namer = mine && !atomic_load(&A.namer_stop);
    s->request = mine && (state == NAMER_PENDING || state == NAMER_CLAIMED) ? NAMER_SEQ(slot) : 0;
    s->named = A.named;
    s->gil_timeouts = A.gil_timeouts;
    s->late = A.late;
}
