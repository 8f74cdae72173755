/*
 * diff.c -- byte comparison for .writes and .changes(): diff_runs in
 * module.c, page_firsts and changed_runs in collect_py.c.
 *
 * Plain C over two memories the caller keeps alive: reads only, no lock,
 * no shared state.  Another thread may write the live memory meanwhile, so
 * no loop here relies on an earlier compare: each is bounded by its length
 * (a run found by memcmp may be gone when the bytes are re-read).
 *
 * Speed: equal memory, the common case, costs one memcmp (glibc's is
 * vectorised) per 4 KiB; a difference is then located a block, a word and
 * a byte at a time in memory that is in the cache by then, so a page whose
 * only change is its last byte costs about one memcmp, not 4096 byte
 * compares (issue 11).
 */
#include <string.h>

#include "collect.h"
#include "uffd.h"

#define BLOCK 256u

static inline uint64_t
load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Index of the lowest byte of x (in memory order) that is nonzero; x != 0. */
static inline unsigned
low_byte(uint64_t x)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return (unsigned)__builtin_ctzll(x) / 8;
#else
    return (unsigned)__builtin_clzll(x) / 8;
#endif
}

uint64_t
diff_first(const unsigned char *a, const unsigned char *b, uint64_t n)
{
    uint64_t o = 0;
    while (n - o >= 4096 && memcmp(a + o, b + o, 4096) == 0)
        o += 4096;
    while (n - o >= BLOCK && memcmp(a + o, b + o, BLOCK) == 0)
        o += BLOCK;
    while (n - o >= 8) {
        uint64_t x = load64(a + o) ^ load64(b + o);
        if (x)
            return o + low_byte(x);
        o += 8;
    }
    while (o < n && a[o] == b[o])
        o++;
    return o;
}

/* Each byte of the result is 0x80 where x's byte is zero, else 0 (exact:
 * no false positives, unlike the classic haszero trick's borrow). */
static inline uint64_t
zero_bytes(uint64_t x)
{
    const uint64_t low7 = 0x7f7f7f7f7f7f7f7fULL;
    uint64_t y = (x & low7) + low7;
    return ~(y | x | low7);
}

uint64_t
diff_first_equal(const unsigned char *a, const unsigned char *b, uint64_t n)
{
    uint64_t o = 0;
    while (n - o >= 8) {
        uint64_t z = zero_bytes(load64(a + o) ^ load64(b + o));
        if (z)
            return o + low_byte(z);
        o += 8;
    }
    while (o < n && a[o] != b[o])
        o++;
    return o;
}

/* Find the next run of differing bytes of a and b at or after *off, within
 * [0, len).  Returns 1 with the run in *run_start, *run_len and *off just
 * past it; 0 when the rest is equal (then *off == len). */
int
diff_next_run(const unsigned char *a, const unsigned char *b, uint64_t len,
              uint64_t *off, uint64_t *run_start, uint64_t *run_len)
{
    uint64_t o = *off;
    if (o < len)
        o += diff_first(a + o, b + o, len - o);
    if (o >= len) {
        *off = len;
        return 0;
    }
    uint64_t end = o + diff_first_equal(a + o, b + o, len - o);
    if (end == o) /* set back since it was compared: count the byte anyway */
        end = o + 1;
    *run_start = o;
    *run_len = end - o;
    *off = end;
    return 1;
}

/* ------------------------------------------------ memories via pagemap */

/* Pages of a private anonymous mapping that are neither present nor
 * swapped read as zeros: they are compared and copied from a zero block
 * instead of being read, which would fault each one in (about 3 us a page
 * on the VMs measured for issue 11, six times the compare itself). */
static const unsigned char zeros[MEM_MAX_PAGE];

void
mem_init(struct mem *m, const void *base, uint64_t size, int pagemap_fd, uint64_t page,
         int no_swap)
{
    m->base = base;
    m->size = size;
    m->page = page;
    m->fd = -1;
    m->no_swap = no_swap;
    m->win = m->nwin = 0;
    if (pagemap_fd >= 0 && page > 0 && page <= MEM_MAX_PAGE && (page & (page - 1)) == 0 &&
        (uintptr_t)base % page == 0)
        m->fd = pagemap_fd;
}

/* Learn which pages of [k, k + MEM_WINDOW) have data: mincore() first (a
 * byte a page, ~20 times cheaper than pagemap here), then, for pages it
 * says are not resident, pagemap's present and swapped bits, unless the
 * machine has no swap (not resident is then absent).  0, or -1 when
 * neither answers (read the memory then). */
static int
mem_window(struct mem *m, uint64_t k)
{
    uint64_t pages = (m->size + m->page - 1) / m->page;
    uint64_t n = pages - k < MEM_WINDOW ? pages - k : MEM_WINDOW;
    unsigned char vec[MEM_WINDOW];
    int unsure = 1;
    if (mincore((void *)(uintptr_t)(m->base + k * m->page), n * m->page, vec) == 0) {
        unsure = 0;
        for (uint64_t i = 0; i < n; i++) {
            m->present[i] = vec[i] & 1;
            if (!m->present[i] && !m->no_swap)
                unsure = 1;
        }
    }
    if (unsure) {
        uint64_t entries[MEM_WINDOW];
        off_t at = (off_t)(((uintptr_t)m->base / m->page + k) * sizeof entries[0]);
        ssize_t got = pread(m->fd, entries, n * sizeof entries[0], at);
        if (got < (ssize_t)sizeof entries[0])
            return -1;
        n = (uint64_t)got / sizeof entries[0];
        for (uint64_t i = 0; i < n; i++)
            m->present[i] = (entries[i] >> 62) != 0; /* PM_PRESENT | PM_SWAP */
    }
    m->win = k;
    m->nwin = n;
    return 0;
}

/* Byte o of m, or of the zero block when its page reads as zeros. */
static const unsigned char *
mem_at(struct mem *m, uint64_t o, int *zero)
{
    *zero = 0;
    if (m->fd < 0)
        return m->base + o;
    uint64_t k = o / m->page;
    if ((k < m->win || k >= m->win + m->nwin) && mem_window(m, k) < 0) {
        m->fd = -1; /* neither mincore nor pagemap: read the memory itself */
        return m->base + o;
    }
    if (m->present[k - m->win])
        return m->base + o;
    *zero = 1;
    return zeros + o % m->page;
}

/* The end of o's page, or end if sooner. */
static inline uint64_t
page_end(const struct mem *m, uint64_t o, uint64_t end)
{
    uint64_t p = m->page ? (o / m->page + 1) * m->page : end;
    return p < end ? p : end;
}

uint64_t
mem_first_diff(struct mem *a, struct mem *b, uint64_t o, uint64_t end)
{
    while (o < end) {
        uint64_t stop = page_end(a, o, end);
        int za, zb;
        const unsigned char *pa = mem_at(a, o, &za), *pb = mem_at(b, o, &zb);
        if (!(za && zb)) {
            uint64_t d = diff_first(pa, pb, stop - o);
            if (d < stop - o)
                return o + d;
        }
        o = stop;
    }
    return end;
}

static uint64_t
mem_first_equal(struct mem *a, struct mem *b, uint64_t o, uint64_t end)
{
    while (o < end) {
        uint64_t stop = page_end(a, o, end);
        int za, zb;
        const unsigned char *pa = mem_at(a, o, &za), *pb = mem_at(b, o, &zb);
        if (za && zb)
            return o;
        uint64_t d = diff_first_equal(pa, pb, stop - o);
        if (d < stop - o)
            return o + d;
        o = stop;
    }
    return end;
}

int
mem_next_run(struct mem *a, struct mem *b, uint64_t len, uint64_t *off, uint64_t *run_start,
             uint64_t *run_len)
{
    uint64_t o = mem_first_diff(a, b, *off, len);
    if (o >= len) {
        *off = len;
        return 0;
    }
    uint64_t end = mem_first_equal(a, b, o, len);
    if (end == o) /* set back since it was compared: count the byte anyway */
        end = o + 1;
    *run_start = o;
    *run_len = end - o;
    *off = end;
    return 1;
}

void
mem_copy(unsigned char *dst, struct mem *m, uint64_t o, uint64_t n)
{
    uint64_t end = o + n;
    while (o < end) {
        uint64_t stop = page_end(m, o, end);
        int zero;
        const unsigned char *p = mem_at(m, o, &zero);
        if (zero)
            memset(dst, 0, stop - o);
        else
            memcpy(dst, p, stop - o);
        dst += stop - o;
        o = stop;
    }
}
