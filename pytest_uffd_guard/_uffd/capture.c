/*
 * capture.c -- naming the writer of a fault (see struct attribution).
 *
 * Two ways, both driven from the handler thread while the writer is still
 * blocked on its fault:
 *   - a writer in user mode is sent the capture signal: faulthandler dumps
 *     its stack into the dump file, then attr_signal_handler appends the end
 *     marker;
 *   - a writer inside a system call (which a signal could cut short) is
 *     named by the namer, a Python thread, through the A.nslot handshake
 *     (namer.c).
 *
 * ASYNC-SIGNAL-SAFE CODE: attr_signal_handler runs in a signal handler, on
 * any thread; everything the handler thread runs here (marked "Runs on the
 * handler thread") calls no Python API and no allocator, and preserves
 * errno where a signal can interrupt it.  The setup functions at the end
 * run on Python threads without the GIL, under life_lock where they say so.
 */
#include "uffd.h"

struct attribution A = {.fd = -1, .namer_fd = -1, .ack_fd = -1};

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
int
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
int
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

/* ------------------------------------------- setup, from Python threads */

/* A forked child's capture state (from atfork_child in table.c). */
void
attribution_atfork_child(void)
{
    /* The dump file is shared with the parent (one file offset): the
     * child must set up its own before it captures anything.  Our
     * sigaction and faulthandler's stay installed, as fork keeps them. */
    A.enabled = 0;
    A.fd = -1;
    atomic_store(&A.token, 0);
    atomic_store(&A.done, 0);
    A.captures = A.busy = A.copies = 0;
}

/* 1 when sig's disposition is SIG_DFL at the C level (no handler installed
 * by anyone, Python or C) and it is not blocked in this thread; 0 when
 * not; -errno when sigaction fails.  The caller checked the range. */
int
signal_is_default(int sig)
{
    struct sigaction old;
    if (sigaction(sig, NULL, &old) < 0)
        return -errno;
    sigset_t mask;
    pthread_sigmask(SIG_BLOCK, NULL, &mask);
    return !(old.sa_flags & SA_SIGINFO) && old.sa_handler == SIG_DFL
           && !sigismember(&mask, sig);
}

/* Capture on real-time signal sig, end markers into fd (see
 * attribution_setup_py).  Returns 0, -errno when sigaction fails, or 1
 * with *refused set.  Takes life_lock: two setups at once must agree on
 * one signal and install one sigaction.  Call without the GIL. */
int
attribution_setup(int sig, int fd, const char **refused)
{
    int rc = 0;
    pthread_mutex_lock(&life_lock);
    if (A.installed && A.sig != sig) {
        *refused = "attribution already set up on another signal";
        rc = 1;
        goto out;
    }
    pthread_mutex_lock(&H.lock);
    if (atomic_load(&A.token) != 0 && atomic_load(&A.done) != atomic_load(&A.token)) {
        pthread_mutex_unlock(&H.lock);
        *refused = "a capture is in flight";
        rc = 1;
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
            rc = -errno;
            pthread_mutex_lock(&H.lock);
            A.fd = -1;
            pthread_mutex_unlock(&H.lock);
            goto out;
        }
        A.installed = 1;
    }
out:
    pthread_mutex_unlock(&life_lock);
    return rc;
}

/* Start or stop signalling writers.  -1 when starting before setup. */
int
attribution_enable(int on)
{
    int rc = 0;
    pthread_mutex_lock(&H.lock);
    if (on && A.fd < 0)
        rc = -1;
    else
        A.enabled = on;
    pthread_mutex_unlock(&H.lock);
    return rc;
}

/* The real-time signal our sigaction is installed on, or 0.  It outlives
 * the Python module that asked for it: an in-process pytest run (pytester)
 * puts sys.modules back when it ends, and a fresh import of the package
 * must set up on this signal again, not pick another (attribution_setup
 * refuses a second one). */
int
attribution_installed_signal(void)
{
    pthread_mutex_lock(&life_lock);
    int sig = A.installed ? A.sig : 0;
    pthread_mutex_unlock(&life_lock);
    return sig;
}

/* Python has read n dumps since attribution_setup (see rewinding). */
void
attribution_consumed(uint64_t n)
{
    atomic_store(&A.consumed, n);
}
