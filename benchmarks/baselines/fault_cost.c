/*
 * fault_cost.c -- plain-C baselines for the cost of one recorded write fault.
 *
 * The question answered here: when every first write to a page must be seen
 * by a recorder, what does that cost per page, with nothing between the
 * kernel and the recorder?  pytest-uffd-guard is measured against these
 * numbers by benchmarks/bench_faults.py.
 *
 * Modes (argv[1]):
 *
 *   uffd-sync      userfaultfd write-protect, synchronous: a handler thread
 *                  reads each WP fault message, records (address, thread id,
 *                  time) and un-protects that one page, which wakes the
 *                  writer.
 *   mprotect-segv  the classic alternative: mprotect(PROT_READ) plus a
 *                  SIGSEGV handler that records si_addr and makes that one
 *                  page writable again.
 *   none           plain memset over touched, unprotected memory.
 *   arm            setup only, uffd: mmap + touch + register + write-protect.
 *   mprotect-arm   setup only, mprotect: mmap + touch + mprotect(PROT_READ).
 *
 *   uffd-sync-unpopulated, arm-unpopulated
 *                  the same as uffd-sync and arm, but the region is never
 *                  touched: UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4) makes
 *                  the kernel protect the empty page-table entries too.  Each
 *                  fault then also allocates and zeroes its page, and arming
 *                  costs no page faults.  This is what a library that relies
 *                  on WP_UNPOPULATED pays.
 *
 * The faulting modes time memset(region, 1, N) over N bytes, so each page
 * faults exactly once, and time the same memset over a separate touched,
 * unprotected region of the same size; the difference divided by the number
 * of faults is the cost of one fault.
 *
 * Output: one line of key=value pairs per run, the median of REPEAT
 * repetitions for every *_ns field (per_fault_ns is the median of the
 * per-repetition values, not computed from the other medians).
 *
 * Build: gcc -O2 -pthread -o fault_cost fault_cost.c
 * Usage: fault_cost MODE BYTES [REPEAT]
 *
 * Exit status: 0 on success, 1 on a failed system call, 2 on bad usage,
 * 3 when the recorded faults do not match the pages written, 4 when the
 * kernel lacks a userfaultfd feature the mode needs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Older uapi headers lack these: the extension's own list of them. */
#include "../../pytest_uffd_guard/_uffd/uapi.h"

#define MSG_BATCH 64 /* uffd_msg structs read per read(2) */

static size_t page_size;

/* ------------------------------------------------------------------ */
/* Small helpers                                                       */
/* ------------------------------------------------------------------ */

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void __attribute__((noreturn)) die(const char *what)
{
	fprintf(stderr, "fault_cost: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void __attribute__((noreturn)) die_err(const char *what, int neg_errno)
{
	fprintf(stderr, "fault_cost: %s: %s\n", what, strerror(-neg_errno));
	exit(1);
}

/* Keep the compiler from dropping or reordering a store into @p. */
static inline void clobber(void *p)
{
	__asm__ volatile("" : : "r"(p) : "memory");
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* Median of @n values; sorts @v in place. */
static uint64_t median(uint64_t *v, int n)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/*
 * Map @len bytes of private anonymous memory and, if @touch, write one byte
 * into every page, so that every page is present before anything protects
 * it.
 *
 * MADV_NOHUGEPAGE keeps the region on 4 KiB pages: with a transparent huge
 * page a single write would populate (and a single fault would cover) 512
 * pages at once, and the per-page fault count would no longer be N/4096.
 */
static char *map_region(size_t len, int touch)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	if (madvise(p, len, MADV_NOHUGEPAGE))
		die("madvise(MADV_NOHUGEPAGE)");
	for (size_t off = 0; touch && off < len; off += page_size)
		p[off] = 0;
	clobber(p);
	return p;
}

static char *map_touched(size_t len)
{
	return map_region(len, 1);
}

/* Time one memset(p, 1, len) in nanoseconds. */
static uint64_t timed_memset(char *p, size_t len)
{
	uint64_t t0 = now_ns();

	memset(p, 1, len);
	clobber(p);
	return now_ns() - t0;
}

/* ------------------------------------------------------------------ */
/* userfaultfd: one function per ioctl, each returns 0 or -errno       */
/* ------------------------------------------------------------------ */

/*
 * Open a userfaultfd.  O_NONBLOCK matters: without it poll(2) on the fd
 * always reports POLLERR.  UFFD_USER_MODE_ONLY lets an unprivileged caller
 * open one when vm.unprivileged_userfaultfd is 0 (the default since 5.11);
 * kernels before 5.11 do not know the flag and fail with EINVAL, so retry
 * without it.  Returns the fd or -errno.
 */
static int uffd_open(void)
{
	int fd = (int)syscall(SYS_userfaultfd,
			      O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);

	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	return fd < 0 ? -errno : fd;
}

/*
 * UFFDIO_API handshake: enable @features on @fd.  On success *@available
 * (if given) receives every feature the kernel supports -- not the enabled
 * set, which is simply what was asked for.  The handshake succeeds only
 * once per fd; a second call fails with EINVAL.
 */
static int uffd_handshake(int fd, uint64_t features, uint64_t *available)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (ioctl(fd, UFFDIO_API, &api))
		return -errno;
	if (available)
		*available = api.features;
	return 0;
}

/*
 * Ask the kernel which features it has, through a throw-away fd (the real
 * fd can be handshaken only once, and asking for a bit the kernel lacks
 * fails the whole handshake with EINVAL).
 */
static int uffd_query_features(uint64_t *available)
{
	int fd = uffd_open();
	int ret;

	if (fd < 0)
		return fd;
	ret = uffd_handshake(fd, 0, available);
	close(fd);
	return ret;
}

/*
 * Register [@start, @start+@len) in write-protect mode.  *@ioctls receives
 * the range ioctls the kernel guarantees for this range.
 */
static int uffd_register_wp(int fd, void *start, size_t len, uint64_t *ioctls)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)start, .len = len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};

	if (ioctl(fd, UFFDIO_REGISTER, &reg))
		return -errno;
	*ioctls = reg.ioctls;
	return 0;
}

/*
 * Write-protect (@protect != 0) or un-protect a page-aligned range.
 * Un-protecting without DONTWAKE also wakes every thread blocked on a WP
 * fault in the range, which is how a synchronous WP fault is resolved.
 * EAGAIN (the mm is changing under us) is retried here.
 */
static int uffd_writeprotect(int fd, void *start, size_t len, int protect)
{
	struct uffdio_writeprotect wp = {
		.range = { .start = (uintptr_t)start, .len = len },
		.mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};

	while (ioctl(fd, UFFDIO_WRITEPROTECT, &wp))
		if (errno != EAGAIN)
			return -errno;
	return 0;
}

/* ------------------------------------------------------------------ */
/* uffd-sync: the guarded region and its handler thread                */
/* ------------------------------------------------------------------ */

struct fault_rec {
	uint64_t addr;   /* faulting address (exact with EXACT_ADDRESS) */
	uint32_t ptid;   /* faulting thread id (0 without THREAD_ID) */
	uint64_t ns;     /* CLOCK_MONOTONIC when the message was read */
};

struct uffd_guard {
	char *base;
	size_t len;
	int uffd;
	int stop_pipe[2];        /* a byte on [1] stops the handler */
	pthread_t thread;
	struct fault_rec *recs;  /* preallocated, one slot per page */
	size_t cap;
	size_t nfaults;          /* written by the handler only */
	int error;               /* handler's -errno or -EPROTO, 0 if fine */
	uint64_t features;       /* what the handshake enabled */
};

/*
 * Record the handler's first error and un-protect the whole region, so a
 * writer blocked on a fault is released (and the fault count comes out
 * wrong) instead of hanging forever.  Returns NULL for handler_main.
 */
static void *handler_fail(struct uffd_guard *g, int neg_errno)
{
	g->error = neg_errno;
	uffd_writeprotect(g->uffd, g->base, g->len, 0);
	return NULL;
}

/*
 * Handler thread.  Runs with every signal blocked (the mask is inherited
 * from guard_start), allocates nothing, and touches only the guard.  It
 * exits on a byte on the stop pipe, or on the first error, which it
 * leaves in g->error.
 */
static void *handler_main(void *arg)
{
	struct uffd_guard *g = arg;
	struct uffd_msg msgs[MSG_BATCH];
	struct pollfd pfd[2] = {
		{ .fd = g->uffd, .events = POLLIN },
		{ .fd = g->stop_pipe[0], .events = POLLIN },
	};

	for (;;) {
		if (poll(pfd, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return handler_fail(g, -errno);
		}
		if (pfd[0].revents & (POLLERR | POLLHUP))
			return handler_fail(g, -EPIPE);
		if (pfd[0].revents & POLLIN) {
			ssize_t n = read(g->uffd, msgs, sizeof(msgs));

			if (n < 0) {
				/* Another reader or a spurious wake-up. */
				if (errno == EAGAIN || errno == EINTR)
					continue;
				return handler_fail(g, -errno);
			}
			if (n % (ssize_t)sizeof(msgs[0]))
				return handler_fail(g, -EPROTO); /* short */
			for (ssize_t i = 0; i < n / (ssize_t)sizeof(msgs[0]); i++) {
				const struct uffd_msg *m = &msgs[i];
				uint64_t addr = m->arg.pagefault.address;
				uintptr_t page = addr & ~(uint64_t)(page_size - 1);
				int ret;

				/* Only WP page faults are expected here. */
				if (m->event != UFFD_EVENT_PAGEFAULT ||
				    !(m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP))
					return handler_fail(g, -EPROTO);
				if (g->nfaults < g->cap) {
					struct fault_rec *r = &g->recs[g->nfaults];

					r->addr = addr;
					r->ptid = m->arg.pagefault.feat.ptid;
					r->ns = now_ns();
				}
				g->nfaults++;
				/*
				 * Round down ourselves: with EXACT_ADDRESS (or
				 * on old kernels that leak it) the address is
				 * not page-aligned, and the ioctl wants pages.
				 */
				ret = uffd_writeprotect(g->uffd, (void *)page,
							page_size, 0);
				if (ret)
					return handler_fail(g, ret);
			}
		}
		if (pfd[1].revents)
			return NULL;
	}
}

/*
 * Open and handshake a uffd for @g.  PAGEFAULT_FLAG_WP and @extra are
 * required; THREAD_ID and EXACT_ADDRESS only when the kernel has them.
 */
static void guard_open(struct uffd_guard *g, uint64_t extra)
{
	const uint64_t required = UFFD_FEATURE_PAGEFAULT_FLAG_WP | extra;
	const uint64_t optional = UFFD_FEATURE_THREAD_ID |
				  UFFD_FEATURE_EXACT_ADDRESS;
	uint64_t available = 0;
	int ret;

	ret = uffd_query_features(&available);
	if (ret)
		die_err("userfaultfd feature query", ret);
	if ((available & required) != required) {
		fprintf(stderr, "fault_cost: kernel lacks userfaultfd feature "
			"bits %#" PRIx64 "\n", required & ~available);
		exit(4);
	}
	g->features = required | (optional & available);
	g->uffd = uffd_open();
	if (g->uffd < 0)
		die_err("userfaultfd", g->uffd);
	ret = uffd_handshake(g->uffd, g->features, NULL);
	if (ret)
		die_err("UFFDIO_API", ret);
}

/*
 * Register @g's region for WP and protect all of it.
 *
 * The register result, not the UFFDIO_API result, is where write-protect
 * support shows: UFFDIO_API only ever lists the fd-level ioctls (API,
 * REGISTER, UNREGISTER), while UFFDIO_REGISTER lists the range ioctls that
 * are guaranteed for this particular range, and it includes
 * _UFFDIO_WRITEPROTECT only for a MODE_WP registration on memory that
 * supports it.
 *
 * The pages must already be present (map_touched) unless the uffd has
 * UFFD_FEATURE_WP_UNPOPULATED: without that feature (new in 6.4) the kernel
 * silently skips page-table entries that were never populated, so the
 * first write to a never-touched page would not be reported at all.
 */
static void guard_arm(struct uffd_guard *g)
{
	uint64_t ioctls = 0;
	int ret;

	ret = uffd_register_wp(g->uffd, g->base, g->len, &ioctls);
	if (ret)
		die_err("UFFDIO_REGISTER(MODE_WP)", ret);
	if (!(ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) {
		fprintf(stderr, "fault_cost: range does not support "
			"UFFDIO_WRITEPROTECT (ioctls=%#" PRIx64 ")\n", ioctls);
		exit(1);
	}
	ret = uffd_writeprotect(g->uffd, g->base, g->len, 1);
	if (ret)
		die_err("UFFDIO_WRITEPROTECT", ret);
}

/*
 * Start the handler thread.  Signals are blocked *before* pthread_create so
 * the thread is born with the full mask; blocking them from inside the
 * thread would leave a window in which a handler could run on it.
 */
static void guard_start(struct uffd_guard *g)
{
	sigset_t all, old;
	int ret;

	g->cap = g->len / page_size;
	g->recs = calloc(g->cap, sizeof(*g->recs));
	if (!g->recs)
		die("calloc");
	/* Fault the record array in now, not while the handler runs. */
	memset(g->recs, 0, g->cap * sizeof(*g->recs));
	if (pipe2(g->stop_pipe, O_CLOEXEC))
		die("pipe2");
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	ret = pthread_create(&g->thread, NULL, handler_main, g);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	if (ret) {
		errno = ret;
		die("pthread_create");
	}
}

/* Stop the handler thread and wait for it; its counters are final after. */
static void guard_join(struct uffd_guard *g)
{
	if (write(g->stop_pipe[1], "x", 1) != 1)
		die("write(stop pipe)");
	pthread_join(g->thread, NULL);
}

/* Release what the guard holds; closing the uffd also unregisters. */
static void guard_release(struct uffd_guard *g)
{
	close(g->stop_pipe[0]);
	close(g->stop_pipe[1]);
	close(g->uffd);
	munmap(g->base, g->len);
	free(g->recs);
	g->recs = NULL;
	g->uffd = -1;
}

/*
 * Check that every page was reported exactly once, by the writing thread.
 * Returns 0 if so, else prints why and returns -1.
 */
static int check_records(const struct uffd_guard *g, pid_t writer)
{
	size_t pages = g->len / page_size;
	unsigned char *seen;
	int bad = 0;

	if (g->error) {
		fprintf(stderr, "fault_cost: handler failed: %s\n",
			strerror(-g->error));
		return -1;
	}
	if (g->nfaults != pages) {
		fprintf(stderr, "fault_cost: %zu faults recorded for %zu pages\n",
			g->nfaults, pages);
		return -1;
	}
	seen = calloc(pages, 1);
	if (!seen)
		die("calloc");
	for (size_t i = 0; i < g->nfaults && !bad; i++) {
		const struct fault_rec *r = &g->recs[i];
		uintptr_t off = r->addr - (uintptr_t)g->base;

		if (r->addr < (uintptr_t)g->base || off >= g->len ||
		    seen[off / page_size]++)
			bad = 1;
		else if ((g->features & UFFD_FEATURE_THREAD_ID) &&
			 r->ptid != (uint32_t)writer)
			bad = 1;
	}
	free(seen);
	if (bad)
		fprintf(stderr, "fault_cost: bad or repeated fault record\n");
	return bad ? -1 : 0;
}

/* ------------------------------------------------------------------ */
/* mprotect-segv: the recorder is a SIGSEGV handler                    */
/* ------------------------------------------------------------------ */

/* Signal handlers cannot take arguments, so this state is global. */
static struct {
	char *base;
	size_t len;
	void **addrs;            /* preallocated, one slot per page */
	volatile size_t nfaults;
} segv;

/*
 * SIGSEGV handler.  Async-signal context: no stdio, no allocation, errno
 * saved and restored.  mprotect(2) is not on POSIX's async-signal-safe
 * list, but on Linux it is a plain system call with no user-space state.
 * A fault outside the region is a real crash: restore the default action
 * and return, so the faulting instruction re-runs and kills the process.
 */
static void segv_handler(int sig, siginfo_t *si, void *ctx)
{
	int saved_errno = errno;
	uintptr_t addr = (uintptr_t)si->si_addr;
	uintptr_t base = (uintptr_t)segv.base;
	size_t n = segv.nfaults;

	(void)ctx;
	if (addr < base || addr - base >= segv.len ||
	    mprotect((void *)(addr & ~(uintptr_t)(page_size - 1)), page_size,
		     PROT_READ | PROT_WRITE)) {
		signal(sig, SIG_DFL);
		errno = saved_errno;
		return;
	}
	if (n < segv.len / page_size)
		segv.addrs[n] = si->si_addr;
	segv.nfaults = n + 1;
	errno = saved_errno;
}

static void segv_install(void)
{
	struct sigaction sa = { .sa_sigaction = segv_handler,
				.sa_flags = SA_SIGINFO };

	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSEGV, &sa, NULL))
		die("sigaction(SIGSEGV)");
}

/* Map, touch and read-protect @len bytes; the handler state points at it. */
static void segv_arm(size_t len)
{
	segv.base = map_touched(len);
	segv.len = len;
	segv.nfaults = 0;
	if (mprotect(segv.base, len, PROT_READ))
		die("mprotect(PROT_READ)");
}

static void segv_release(void)
{
	munmap(segv.base, segv.len);
	segv.base = NULL;
}

/* Every page reported exactly once?  0 if so, else -1. */
static int check_segv_records(void)
{
	size_t pages = segv.len / page_size;

	if (segv.nfaults != pages) {
		fprintf(stderr, "fault_cost: %zu SIGSEGVs for %zu pages\n",
			(size_t)segv.nfaults, pages);
		return -1;
	}
	for (size_t i = 0; i < pages; i++)
		if ((char *)segv.addrs[i] < segv.base + i * page_size ||
		    (char *)segv.addrs[i] >= segv.base + (i + 1) * page_size) {
			fprintf(stderr, "fault_cost: SIGSEGV %zu at %p is out "
				"of order\n", i, segv.addrs[i]);
			return -1;
		}
	return 0;
}

/* ------------------------------------------------------------------ */
/* Modes                                                               */
/* ------------------------------------------------------------------ */

struct samples {
	uint64_t *total;     /* memset over the protected region */
	uint64_t *memset;    /* memset over an unprotected region */
	uint64_t *per_fault; /* (total - memset) / faults */
};

static void samples_alloc(struct samples *s, int repeat)
{
	s->total = calloc((size_t)repeat, sizeof(uint64_t));
	s->memset = calloc((size_t)repeat, sizeof(uint64_t));
	s->per_fault = calloc((size_t)repeat, sizeof(uint64_t));
	if (!s->total || !s->memset || !s->per_fault)
		die("calloc");
}

/* Time memset over a fresh touched, unprotected region of @len bytes. */
static uint64_t unprotected_memset_ns(size_t len)
{
	char *p = map_touched(len);
	uint64_t ns = timed_memset(p, len);

	munmap(p, len);
	return ns;
}

static void print_fault_line(const char *mode, size_t len, size_t faults,
			     struct samples *s, int repeat)
{
	printf("mode=%s bytes=%zu pages=%zu faults=%zu repeat=%d "
	       "total_ns=%" PRIu64 " memset_ns=%" PRIu64
	       " per_fault_ns=%" PRIu64 "\n",
	       mode, len, len / page_size, faults, repeat,
	       median(s->total, repeat), median(s->memset, repeat),
	       median(s->per_fault, repeat));
}

/* Signed difference, clamped at 0, divided per fault. */
static uint64_t per_fault(uint64_t total, uint64_t base, size_t faults)
{
	return total > base ? (total - base) / faults : 0;
}

/*
 * uffd-sync and uffd-sync-unpopulated.  The unprotected memset it subtracts
 * runs over touched memory in both, so with @unpopulated the per-fault
 * cost includes allocating and zeroing the page.
 */
static int run_uffd(size_t len, int repeat, int unpopulated)
{
	uint64_t extra = unpopulated ? UFFD_FEATURE_WP_UNPOPULATED : 0;
	struct samples s;
	pid_t self = (pid_t)syscall(SYS_gettid);
	size_t pages = len / page_size;

	samples_alloc(&s, repeat);
	for (int r = 0; r < repeat; r++) {
		struct uffd_guard g = { .len = len };

		s.memset[r] = unprotected_memset_ns(len);
		g.base = map_region(len, !unpopulated);
		guard_open(&g, extra);
		guard_arm(&g);
		guard_start(&g);
		s.total[r] = timed_memset(g.base, len);
		guard_join(&g);
		if (check_records(&g, self))
			return 3;
		guard_release(&g);
		s.per_fault[r] = per_fault(s.total[r], s.memset[r], pages);
	}
	print_fault_line(unpopulated ? "uffd-sync-unpopulated" : "uffd-sync",
			 len, pages, &s, repeat);
	return 0;
}

static int run_uffd_sync(size_t len, int repeat)
{
	return run_uffd(len, repeat, 0);
}

static int run_uffd_sync_unpopulated(size_t len, int repeat)
{
	return run_uffd(len, repeat, 1);
}

static int run_mprotect_segv(size_t len, int repeat)
{
	struct samples s;
	size_t pages = len / page_size;

	samples_alloc(&s, repeat);
	segv.addrs = calloc(pages, sizeof(*segv.addrs));
	if (!segv.addrs)
		die("calloc");
	segv_install();
	for (int r = 0; r < repeat; r++) {
		s.memset[r] = unprotected_memset_ns(len);
		segv_arm(len);
		s.total[r] = timed_memset(segv.base, len);
		if (check_segv_records())
			return 3;
		segv_release();
		s.per_fault[r] = per_fault(s.total[r], s.memset[r], pages);
	}
	print_fault_line("mprotect-segv", len, pages, &s, repeat);
	return 0;
}

static int run_none(size_t len, int repeat)
{
	uint64_t *ns = calloc((size_t)repeat, sizeof(*ns));
	uint64_t *per_page = calloc((size_t)repeat, sizeof(*per_page));
	size_t pages = len / page_size;

	if (!ns || !per_page)
		die("calloc");
	for (int r = 0; r < repeat; r++) {
		ns[r] = unprotected_memset_ns(len);
		per_page[r] = ns[r] / pages;
	}
	printf("mode=none bytes=%zu pages=%zu faults=0 repeat=%d "
	       "memset_ns=%" PRIu64 " per_page_ns=%" PRIu64 "\n",
	       len, pages, repeat, median(ns, repeat), median(per_page, repeat));
	return 0;
}

/*
 * arm and arm-unpopulated: time the setup of a guarded region.  arm_ns
 * covers what a guard costs per buffer (mmap + touch unless @unpopulated +
 * register + write-protect); setup_ns adds the per-fd work (feature query,
 * open, handshake) and the handler thread start, which a library may share
 * between buffers.
 */
static int run_uffd_arm(size_t len, int repeat, int unpopulated)
{
	uint64_t extra = unpopulated ? UFFD_FEATURE_WP_UNPOPULATED : 0;
	uint64_t *arm = calloc((size_t)repeat, sizeof(*arm));
	uint64_t *setup = calloc((size_t)repeat, sizeof(*setup));

	if (!arm || !setup)
		die("calloc");
	for (int r = 0; r < repeat; r++) {
		struct uffd_guard g = { .len = len };
		uint64_t t0, t1, t2, t3;

		t0 = now_ns();
		guard_open(&g, extra);
		t1 = now_ns();
		g.base = map_region(len, !unpopulated);
		guard_arm(&g);
		t2 = now_ns();
		guard_start(&g);
		t3 = now_ns();
		guard_join(&g);
		guard_release(&g);
		arm[r] = t2 - t1;
		setup[r] = t3 - t0;
	}
	printf("mode=%s bytes=%zu pages=%zu repeat=%d arm_ns=%" PRIu64
	       " setup_ns=%" PRIu64 "\n", unpopulated ? "arm-unpopulated" : "arm",
	       len, len / page_size, repeat, median(arm, repeat),
	       median(setup, repeat));
	return 0;
}

static int run_arm(size_t len, int repeat)
{
	return run_uffd_arm(len, repeat, 0);
}

static int run_arm_unpopulated(size_t len, int repeat)
{
	return run_uffd_arm(len, repeat, 1);
}

/* mprotect-arm: mmap + touch + mprotect(PROT_READ). */
static int run_mprotect_arm(size_t len, int repeat)
{
	uint64_t *arm = calloc((size_t)repeat, sizeof(*arm));

	if (!arm)
		die("calloc");
	segv_install();
	for (int r = 0; r < repeat; r++) {
		uint64_t t0 = now_ns();

		segv_arm(len);
		arm[r] = now_ns() - t0;
		segv_release();
	}
	printf("mode=mprotect-arm bytes=%zu pages=%zu repeat=%d arm_ns=%" PRIu64
	       "\n", len, len / page_size, repeat, median(arm, repeat));
	return 0;
}

static int usage(void)
{
	fprintf(stderr,
		"usage: fault_cost MODE BYTES [REPEAT]\n"
		"  MODE: uffd-sync | mprotect-segv | none | arm | mprotect-arm |\n"
		"        uffd-sync-unpopulated | arm-unpopulated\n"
		"  BYTES: a positive multiple of the page size\n"
		"  REPEAT: repetitions, median reported (default 5)\n");
	return 2;
}

int main(int argc, char **argv)
{
	static const struct {
		const char *name;
		int (*run)(size_t len, int repeat);
	} modes[] = {
		{ "uffd-sync", run_uffd_sync },
		{ "mprotect-segv", run_mprotect_segv },
		{ "none", run_none },
		{ "arm", run_arm },
		{ "uffd-sync-unpopulated", run_uffd_sync_unpopulated },
		{ "arm-unpopulated", run_arm_unpopulated },
		{ "mprotect-arm", run_mprotect_arm },
	};
	unsigned long long bytes;
	long repeat = 5;
	char *end;

	page_size = (size_t)sysconf(_SC_PAGESIZE);
	if (argc < 3 || argc > 4)
		return usage();
	errno = 0;
	bytes = strtoull(argv[2], &end, 10);
	if (errno || *end || bytes == 0 || bytes % page_size ||
	    bytes > SIZE_MAX / 2)
		return usage();
	if (argc == 4) {
		repeat = strtol(argv[3], &end, 10);
		if (*end || repeat < 1 || repeat > 100000)
			return usage();
	}
	for (size_t i = 0; i < sizeof(modes) / sizeof(modes[0]); i++)
		if (!strcmp(argv[1], modes[i].name))
			return modes[i].run((size_t)bytes, (int)repeat);
	return usage();
}
