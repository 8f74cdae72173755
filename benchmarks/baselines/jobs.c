/*
 * jobs.c -- plain-C baselines for benchmarks/run.py (issue 11, targets 1-3).
 *
 * Each mode does one whole job the way a C program with nothing in between
 * would, REPEAT times, and prints one key=value line with the median over
 * the repetitions of the job's cost per page (ns).  Every job writes one
 * byte into every 4 KiB page, at offset WRITE_OFFSET (the page's last byte,
 * so a page comparison must read the whole page); run.py writes the same
 * pattern into the guarded buffers through touch_pages() below.
 *
 * Modes (argv[1]):
 *
 *   scan        the collect baseline: a snapshot and a live copy of BYTES
 *               bytes (both resident), one byte changed per page of the
 *               live copy; timed: memcmp() of every page against the
 *               snapshot, recording the offset of each page that differs.
 *   async-job   the raw kernel job of the async engine: mmap +
 *               MADV_NOHUGEPAGE + UFFDIO_REGISTER(WP) + UFFDIO_WRITEPROTECT
 *               on a uffd opened with WP_ASYNC (+ WP_UNPOPULATED), one write
 *               per page, one PAGEMAP_SCAN(PAGE_IS_WRITTEN) listing the
 *               written pages.  The uffd is opened once, outside the timing
 *               (the engine also opens its fd once per process).
 *   sync-job    the plain synchronous handler: mmap + register + write-
 *               protect (untouched pages with WP_UNPOPULATED, else touched
 *               first), one write per page; a handler pthread does poll +
 *               read + UFFDIO_WRITEPROTECT(mode 0) of the faulting page per
 *               fault and records (address, thread id).  The uffd and the
 *               thread are set up once, outside the timing.
 *
 * Pinning is done by the caller (sched_setaffinity before exec): the handler
 * thread inherits the writer's affinity.
 *
 * Build:  gcc -O2 -pthread -o jobs jobs.c
 *         gcc -O2 -shared -fPIC -DJOBS_LIB -o libjobs.so jobs.c  (touch_pages only)
 * Usage:  jobs MODE BYTES REPEAT
 * Exit:   0 ok, 1 system call failed, 2 usage, 3 wrong count, 4 the kernel
 *         lacks a feature the mode needs (the line says which).
 */
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>

#define PAGE 4096u
#define WRITE_OFFSET (PAGE - 1)

/* One store of @value into every page of [addr, addr+len) at @offset. */
void touch_pages(uintptr_t addr, size_t len, size_t offset, int value)
{
	volatile unsigned char *p = (volatile unsigned char *)addr;

	for (size_t i = offset; i < len; i += PAGE)
		p[i] = (unsigned char)value;
}

#ifndef JOBS_LIB
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* The uapi bits that older headers lack, shared with the extension so the
 * two use the same values (UFFD_FEATURE_THREAD_ID is in every header). */
#include "../../pytest_uffd_guard/_uffd/uapi.h"

/* PAGEMAP_SCAN (Linux 6.7, include/uapi/linux/fs.h), defined here so that
 * older headers build. */
struct bench_page_region {
	uint64_t start, end, categories;
};
struct bench_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask;
	uint64_t return_mask;
};
#define BENCH_PAGEMAP_SCAN _IOWR('f', 16, struct bench_pm_scan_arg)
#define BENCH_PAGE_IS_WRITTEN (1 << 1)

static void __attribute__((noreturn)) die(const char *what)
{
	fprintf(stderr, "jobs: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void __attribute__((noreturn)) unsupported(const char *mode, const char *why)
{
	printf("mode=%s unsupported=%s\n", mode, why);
	exit(4);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

static double median_per_page(uint64_t *v, int n, size_t pages)
{
	qsort(v, (size_t)n, sizeof(*v), cmp_u64);
	uint64_t m = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
	return (double)m / (double)pages;
}

static char *map_region(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	if (madvise(p, len, MADV_NOHUGEPAGE))
		die("madvise(MADV_NOHUGEPAGE)");
	return p;
}

static int open_uffd(uint64_t want, uint64_t need, const char *mode, uint64_t *got)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);

	if (fd < 0)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		unsupported(mode, "userfaultfd");
	/* Query what the kernel offers on a throw-away fd, then ask for it. */
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API(query)");
	uint64_t have = api.features;
	close(fd);
	if ((have & need) != need)
		unsupported(mode, need & UFFD_FEATURE_WP_ASYNC ? "UFFD_FEATURE_WP_ASYNC" : "uffd-wp");
	fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0)
		die("userfaultfd");
	api.api = UFFD_API;
	api.features = have & (want | need);
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	*got = have & (want | need);
	return fd;
}

static void register_wp(int uffd, char *p, size_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)p, .len = len },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	struct uffdio_writeprotect wp = {
		.range = { .start = (uintptr_t)p, .len = len },
		.mode = UFFDIO_WRITEPROTECT_MODE_WP,
	};
	if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp))
		die("UFFDIO_WRITEPROTECT");
}

/* ---------------------------------------------------------------- scan */

static int run_scan(size_t len, int repeat)
{
	size_t pages = len / PAGE;
	char *snap = map_region(len), *live = map_region(len);
	uint64_t *found = malloc(pages * sizeof(*found));
	uint64_t *ns = malloc((size_t)repeat * sizeof(*ns));

	memset(snap, 0, len);
	memset(live, 0, len);
	touch_pages((uintptr_t)live, len, WRITE_OFFSET, 1);
	for (int r = 0; r < repeat; r++) {
		size_t n = 0;
		uint64_t t0 = now_ns();
		for (size_t off = 0; off < len; off += PAGE)
			if (memcmp(live + off, snap + off, PAGE))
				found[n++] = off;
		ns[r] = now_ns() - t0;
		if (n != pages) {
			fprintf(stderr, "jobs: scan found %zu of %zu pages\n", n, pages);
			return 3;
		}
	}
	printf("mode=scan bytes=%zu pages=%zu repeat=%d per_page_ns=%.2f\n", len, pages,
	       repeat, median_per_page(ns, repeat, pages));
	return 0;
}

/* ----------------------------------------------------------- async-job */

static int run_async_job(size_t len, int repeat)
{
	size_t pages = len / PAGE;
	uint64_t features;
	int uffd = open_uffd(UFFD_FEATURE_WP_UNPOPULATED,
			     UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, "async-job",
			     &features);
	int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	uint64_t *ns = malloc((size_t)repeat * sizeof(*ns));
	struct bench_page_region vec[512];

	if (pm < 0)
		die("open(/proc/self/pagemap)");
	for (int r = 0; r < repeat; r++) {
		uint64_t t0 = now_ns();
		char *p = map_region(len);
		register_wp(uffd, p, len);
		touch_pages((uintptr_t)p, len, WRITE_OFFSET, 1);
		size_t written = 0;
		uint64_t start = (uintptr_t)p, end = start + len;
		while (start < end) {
			struct bench_pm_scan_arg arg = {
				.size = sizeof(arg), .start = start, .end = end,
				.vec = (uintptr_t)vec, .vec_len = 512,
				.category_mask = BENCH_PAGE_IS_WRITTEN,
				.return_mask = BENCH_PAGE_IS_WRITTEN,
			};
			long got = ioctl(pm, BENCH_PAGEMAP_SCAN, &arg);
			if (got < 0) {
				if (errno == EINVAL || errno == ENOTTY)
					unsupported("async-job", "PAGEMAP_SCAN");
				die("PAGEMAP_SCAN");
			}
			for (long i = 0; i < got; i++)
				written += (vec[i].end - vec[i].start) / PAGE;
			start = arg.walk_end;
		}
		ns[r] = now_ns() - t0;
		munmap(p, len);
		if (written != pages) {
			fprintf(stderr, "jobs: PAGEMAP_SCAN found %zu of %zu pages\n", written, pages);
			return 3;
		}
	}
	printf("mode=async-job bytes=%zu pages=%zu repeat=%d per_page_ns=%.2f\n", len, pages,
	       repeat, median_per_page(ns, repeat, pages));
	return 0;
}

/* ------------------------------------------------------------ sync-job */

struct record {
	uint64_t address;
	uint32_t tid;
};

static struct {
	int uffd, stop_pipe;
	struct record *log;
	size_t cap;
	volatile size_t n;
} handler;

static void *handler_main(void *unused)
{
	struct uffd_msg msgs[64];
	struct pollfd fds[2] = {
		{ .fd = handler.uffd, .events = POLLIN },
		{ .fd = handler.stop_pipe, .events = POLLIN },
	};

	(void)unused;
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[1].revents)
			return NULL;
		ssize_t got = read(handler.uffd, msgs, sizeof(msgs));
		if (got < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			die("read(uffd)");
		}
		for (size_t i = 0; i < (size_t)got / sizeof(msgs[0]); i++) {
			struct uffd_msg *m = &msgs[i];
			if (m->event != UFFD_EVENT_PAGEFAULT)
				continue;
			uint64_t page = m->arg.pagefault.address & ~(uint64_t)(PAGE - 1);
			if (handler.n < handler.cap) {
				handler.log[handler.n].address = page;
				handler.log[handler.n].tid = m->arg.pagefault.feat.ptid;
				handler.n++;
			}
			struct uffdio_writeprotect wp = {
				.range = { .start = page, .len = PAGE },
				.mode = 0,
			};
			if (ioctl(handler.uffd, UFFDIO_WRITEPROTECT, &wp))
				die("UFFDIO_WRITEPROTECT(resolve)");
		}
	}
}

static int run_sync_job(size_t len, int repeat)
{
	size_t pages = len / PAGE;
	uint64_t features;
	int uffd = open_uffd(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_THREAD_ID, 0, "sync-job",
			     &features);
	int unpopulated = !!(features & UFFD_FEATURE_WP_UNPOPULATED);
	int pipefd[2];
	pthread_t thread;
	uint64_t *ns = malloc((size_t)repeat * sizeof(*ns));

	if (pipe2(pipefd, O_CLOEXEC))
		die("pipe2");
	handler.uffd = uffd;
	handler.stop_pipe = pipefd[0];
	handler.cap = pages;
	handler.log = malloc(pages * sizeof(*handler.log));
	if (pthread_create(&thread, NULL, handler_main, NULL))
		die("pthread_create");
	for (int r = 0; r < repeat; r++) {
		handler.n = 0;
		uint64_t t0 = now_ns();
		char *p = map_region(len);
		if (!unpopulated)
			touch_pages((uintptr_t)p, len, 0, 0);
		register_wp(uffd, p, len);
		touch_pages((uintptr_t)p, len, WRITE_OFFSET, 1);
		ns[r] = now_ns() - t0;
		size_t n = handler.n;
		munmap(p, len);
		if (n != pages) {
			fprintf(stderr, "jobs: handler recorded %zu of %zu faults\n", n, pages);
			return 3;
		}
	}
	if (write(pipefd[1], "x", 1) != 1)
		die("write(stop)");
	pthread_join(thread, NULL);
	printf("mode=sync-job bytes=%zu pages=%zu repeat=%d unpopulated=%d per_page_ns=%.2f\n",
	       len, pages, repeat, unpopulated, median_per_page(ns, repeat, pages));
	return 0;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: jobs scan|async-job|sync-job BYTES REPEAT\n");
		return 2;
	}
	size_t len = strtoull(argv[2], NULL, 0);
	int repeat = atoi(argv[3]);
	if (len == 0 || len % PAGE || repeat < 1) {
		fprintf(stderr, "jobs: BYTES must be a positive multiple of %u, REPEAT >= 1\n", PAGE);
		return 2;
	}
	if (!strcmp(argv[1], "scan"))
		return run_scan(len, repeat);
	if (!strcmp(argv[1], "async-job"))
		return run_async_job(len, repeat);
	if (!strcmp(argv[1], "sync-job"))
		return run_sync_job(len, repeat);
	fprintf(stderr, "jobs: unknown mode %s\n", argv[1]);
	return 2;
}
#endif /* JOBS_LIB */
