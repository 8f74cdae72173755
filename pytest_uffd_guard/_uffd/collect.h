/*
 * collect.h -- the byte comparisons behind .writes and .changes() (diff.c),
 * shared by module.c (diff_runs) and collect_py.c (page_firsts,
 * changed_runs).  Plain C: reads of two memories the caller keeps alive,
 * no lock, no shared state.
 */
#ifndef PYTEST_UFFD_GUARD_COLLECT_H
#define PYTEST_UFFD_GUARD_COLLECT_H

#include <stdint.h>

#pragma GCC visibility push(hidden)

/* Offset of the first byte at which a and b differ within [0, n), or n. */
uint64_t diff_first(const unsigned char *a, const unsigned char *b, uint64_t n);

/* Offset of the first byte at which a and b are equal within [0, n), or n. */
uint64_t diff_first_equal(const unsigned char *a, const unsigned char *b, uint64_t n);

/* One memory being compared.  With a pagemap fd (/proc/self/pagemap, for
 * private anonymous mappings only), pages neither present nor swapped are
 * taken as zeros without being read; without one (-1) the memory is read.
 * Per call, on the caller's stack. */
#define MEM_WINDOW 512
#define MEM_MAX_PAGE 65536
struct mem {
    const unsigned char *base;
    uint64_t size; /* bytes mapped from base on (mincore fails past them) */
    uint64_t page;
    int fd;
    int no_swap; /* the machine has no swap: not resident means absent */
    uint64_t win, nwin; /* pages [win, win + nwin) have `present` known */
    unsigned char present[MEM_WINDOW];
};

void mem_init(struct mem *m, const void *base, uint64_t size, int pagemap_fd, uint64_t page,
              int no_swap);

/* Offset of the first byte in [o, end) at which a and b differ, or end. */
uint64_t mem_first_diff(struct mem *a, struct mem *b, uint64_t o, uint64_t end);

/* The next run of differing bytes at or after *off within [0, len): 1 with
 * it in *run_start, *run_len and *off just past it; 0 when the rest is
 * equal (then *off == len). */
int mem_next_run(struct mem *a, struct mem *b, uint64_t len, uint64_t *off,
                 uint64_t *run_start, uint64_t *run_len);

/* Copy n bytes of m from offset o to dst. */
void mem_copy(unsigned char *dst, struct mem *m, uint64_t o, uint64_t n);

#pragma GCC visibility pop

#endif /* PYTEST_UFFD_GUARD_COLLECT_H */
