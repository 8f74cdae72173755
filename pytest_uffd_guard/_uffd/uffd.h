/*
 * uffd.h -- the contract between the C files of the _uffd extension.
 *
 * The extension is one Python module (pytest_uffd_guard._uffd) built from
 * several files, split by job:
 *   ioctl.c       opening a userfaultfd; one small function per UFFDIO_* ioctl;
 *   handler.c     the handler pthread: poll/read loop, event dispatch, the
 *                 handling of one write fault and its resolution;
 *   records.c     the guards' logs: lookup, storing a record, re-arm checks;
 *   remove.c      UFFD_EVENT_REMOVE: discard records, re-protecting zapped units;
 *   table.c       the guard table and the handler's life (start, stop, fork);
 *   capture.c     naming a writer by signal: the /proc reads, the capture
 *                 signal handler (async-signal-safe) and the dump file;
 *   namer.c       naming a writer inside a system call: the namer handshake;
 *   diff.c        byte comparison for the diff engine;
 *   module.c      the Python wrappers, method table, exported constants, init;
 *   capture_py.c  the Python wrappers of capture.c and namer.c;
 *   uapi.h        the kernel uapi bits older headers lack (also used by
 *                 the C baselines in benchmarks/baselines/).
 * Only module.c and capture_py.c include Python.h (with uffd_py.h and the
 * docstrings in doc.h); every other file is plain C and never raises.
 *
 * Shared state lives in three named structs (H, A, B below); the lock rules
 * are written next to struct handler.  Everything here is plain C: no
 * Python type may appear in this header.
 */
#ifndef PYTEST_UFFD_GUARD_UFFD_H
#define PYTEST_UFFD_GUARD_UFFD_H

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

/* Nothing below is exported from the shared object: only PyInit__uffd is
 * (PyMODINIT_FUNC), so these short names cannot collide with, or be
 * interposed by, symbols of the interpreter or other libraries. */
#pragma GCC visibility push(hidden)

/* Newer uapi bits (older headers lack them): uapi.h. */
#include "uapi.h"

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
    /* Records still allowed before the hybrid watcher is told (budget.c).
     * budget_on: guard_set_budget gave one (every record past it is told
     * too).  budget_hit: spent, not yet read by budget_hits. */
    uint64_t budget_left;
    int budget_on;
    int budget_hit;
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
struct attribution {
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
};
extern struct attribution A;   /* capture.c */

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
struct handler {
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
    uint64_t spin_ns;   /* read-on after a fault (handler_main); 0: off */
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
    uint32_t last_event;    /* the last unexpected event (UFFD_EVENT_*), 0: none */
    int debug_fail_after;   /* >0: the Nth next fault is treated as fatal */
    int debug_hold;         /* 1: hold faults unresolved (tests of close) */
    char error[256];        /* why the thread gave up */
    /* The last anomaly the handler survived (a fault outside every guard,
     * an un-protect that failed), "" when none: counted above and named
     * here, so handler_state can show it rather than only a count. */
    char warning[160];
};
extern struct handler H;

/* Serialises the wrappers that change the process-wide setup, which the
 * GIL used to serialise for us: handler_start/handler_stop (two stops
 * must not join the thread twice), attribution_setup (the signal and its
 * sigaction) and namer_setup/namer_stop (the namer's eventfds).  Taken
 * only without the GIL (inside Py_BEGIN_ALLOW_THREADS) and never while
 * calling the Python API; order: life_lock, then H.reg_lock, then H.lock.
 * Held across fork() (pthread_atfork in table.c) so a child never inherits
 * it locked.  Defined in table.c. */
extern pthread_mutex_t life_lock;

/* How long a discarded range waits for the kernel's zap before it is
 * re-protected anyway (MADV_FREE never zaps; see reprotect_pending). */
#define REPROTECT_WAIT_NS 1000000000ULL

/* Messages read while the handler was resolving a fault (see pump), to be
 * handled after the current batch.  Handler thread only (handler.c). */
struct backlog {
    struct uffd_msg msgs[1024];
    size_t head, tail;
    int reprotect;      /* some guard has units pending re-protection */
};
extern struct backlog B;

/* B.reprotect as other threads may read it (handler_state). */
extern _Atomic int reprotect_waiting;

/* Positive results of the table.c entry points, next to 0 and -errno. */
enum {
    TABLE_NO_HANDLER = 1,   /* no handler runs in this process */
    TABLE_STOPPED = 2,      /* the handler gave up (H.error says why) */
    TABLE_UNKNOWN = 3,      /* no guard has this id */
    TABLE_NOMEM = 4,        /* malloc failed */
    TABLE_STARTED = 5,      /* handler_start: already runs in this process */
};

/* A guard's log and counters, copied out under H.lock (guard_take,
 * guard_forget): the caller builds Python objects from it afterwards. */
struct taken {
    struct fault_record *records;   /* malloc'ed, or NULL */
    size_t count;
    uint64_t overflow;
    uint64_t duplicates;
};

/* handler_state's answer, copied out under H.lock. */
struct handler_snapshot {
    int running, failed, attribution, reprotect;
    char error[sizeof ((struct handler *)0)->error];
    char warning[sizeof ((struct handler *)0)->warning];
    uint64_t faults, unmatched, errors, discards, other_events, features;
    uint32_t last_event;
    size_t guards;
    uint64_t captures, busy, in_flight;
};

/* namer_state's answer. */
struct namer_snapshot {
    int namer;
    uint64_t request, named, gil_timeouts, late;
};

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

/* ---------------------------------------------------------------- ioctl.c
 * Each returns 0 (or an fd) or -errno and touches no shared state. */
int uffd_open_syscall(int flags);
int uffd_open_dev(int flags);
int uffd_api(int fd, uint64_t *features, uint64_t *ioctls);
int uffd_register_wp(int fd, uint64_t start, uint64_t len, uint64_t *ioctls);
int uffd_unregister(int fd, uint64_t start, uint64_t len);
int uffd_writeprotect(int fd, uint64_t start, uint64_t len, int protect);
int uffd_copy_zero_wp(int fd, uint64_t start, uint64_t len, const void *zero);
int uffd_wake(int fd, uint64_t start, uint64_t len);
int populate_write(uint64_t start, uint64_t len, uint64_t page);

/* -------------------------------------------------------------- handler.c */
void *handler_main(void *arg);
int handle_message(const struct uffd_msg *msg);
uint64_t monotonic_ns(void);
void fail_reg_held(const char *what, int err);
void fail(const char *what, int err);
void pump(void);
int handler_writeprotect(uint64_t start, uint64_t len, int protect);
const char *event_name(uint32_t event);
void warn_locked(const char *what, uint64_t addr, int err);

/* One write fault, from its lookup to its resolution: what handle_fault
 * learnt and decided about it.  Handler thread only. */
struct fault {
    struct fault_record r;
    uint64_t start;         /* the faulting unit, rounded down */
    uint64_t unit;          /* its guard's unit (H.page outside every guard) */
    int record;             /* r is a first write of its unit: store it */
    int capture;            /* name the writer */
    int hold;               /* _debug(hold=1): keep the writer blocked */
    uint64_t owner;         /* id of the guard holding the address, 0: none */
    /* Which arming of which guard r was stored in (see rearmed_locked);
     * guard_id 0: not stored. */
    uint64_t guard_id;
    uint64_t arming;
};

/* -------------------------------------------------------------- records.c */
long find_guard(uint64_t addr);
long guard_index(uint64_t id);
void clear_recorded_locked(struct guard *g, uint64_t start, uint64_t end);
void store_record_locked(const struct fault_record *r);
void set_record_attr_locked(uint64_t addr, uint64_t seq, uint32_t attr);
int rearmed(uint64_t addr, uint64_t id, uint64_t arming);
int owner_unchanged(uint64_t addr, uint64_t owner);
void record_again_if_rearmed(const struct fault_record *r, uint64_t id, uint64_t arming);
void classify_fault_locked(struct fault *f);

/* --------------------------------------------------------------- remove.c */
void handle_remove(const struct uffd_msg *msg);
int pagemap_read(uint64_t start, uint64_t *out, size_t n);
void reprotect_pending(void);

/* ---------------------------------------------------------------- table.c */
/* Longest spin window handler_start accepts (10 ms); exported to Python. */
#define SPIN_US_MAX 10000
int handler_start(int fd, uint64_t page, uint64_t features, uint64_t spin_ns,
                  const char **what);
void handler_stop(void);
void handler_shutdown(void);
int handler_fd(char *error, size_t size);
int guard_add(uint64_t start, uint64_t len, uint64_t unit, uint64_t capacity,
              uint64_t stacks, int every, uint64_t *id, uint64_t *ioctls);
int guard_protect(uint64_t id, int protect, uint64_t off, uint64_t len);
int guard_take(uint64_t id, struct taken *t);
int guard_forget(uint64_t id, struct taken *t);
int guard_set_stacks(uint64_t id, uint64_t stacks);
void handler_snapshot(struct handler_snapshot *s);
int handler_failure_copy(char *error, size_t size);
void handler_debug(int fail_after, int hold);
int install_atfork(void);

/* --------------------------------------------------------------- budget.c */
void budget_spend_locked(struct guard *g);
int guard_set_budget(uint64_t id, uint64_t n);
size_t budget_hits(uint64_t *ids, size_t cap);
int budget_fd(void);
void budget_atfork_child(void);

/* -------------------------------------------------------------- capture.c */
int attribution_prepare(struct fault_record *r);
int attribution_signal(const struct fault_record *r, uint64_t page);
int attribution_name_in_syscall(const struct fault_record *r, uint64_t start, uint64_t unit);
void attribution_atfork_child(void);
int signal_is_default(int sig);
int attribution_setup(int sig, int fd, const char **refused);
int attribution_enable(int on);
int attribution_installed_signal(void);
void attribution_consumed(uint64_t n);
int namer_setup(uint64_t pending_ns, uint64_t claimed_ns);
int namer_stopped(void);
int namer_read_wake(void);
int namer_claim(uint64_t *seq, int32_t *tid);
int namer_done(uint64_t seq);
void namer_stop(void);
void namer_snapshot(struct namer_snapshot *s);

/* ----------------------------------------------------------------- diff.c */
int diff_next_run(const unsigned char *a, const unsigned char *b, uint64_t len,
                  uint64_t *off, uint64_t *run_start, uint64_t *run_len);

#pragma GCC visibility pop

#endif /* PYTEST_UFFD_GUARD_UFFD_H */

