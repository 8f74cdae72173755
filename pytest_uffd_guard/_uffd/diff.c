/*
 * diff.c -- byte comparison for the diff engine (diff_runs in module.c).
 *
 * Plain C over two memories the caller keeps alive: reads only, no lock,
 * no shared state.
 */
#include "uffd.h"

/* Find the next run of differing bytes of a and b at or after *off, within
 * [0, len).  Returns 1 with the run in *run_start, *run_len and *off just
 * past it; 0 when the rest is equal (then *off == len). */
int
diff_next_run(const unsigned char *a, const unsigned char *b, uint64_t len,
              uint64_t *off, uint64_t *run_start, uint64_t *run_len)
{
    const uint64_t chunk = 4096;
    uint64_t o = *off;
    while (o < len) {
        /* memcmp a chunk at a time: equal chunks, the common case, cost
         * one vectorised compare each. */
        uint64_t n = len - o < chunk ? len - o : chunk;
        if (memcmp(a + o, b + o, n) == 0) {
            o += n;
            continue;
        }
        /* memcmp saw a difference within [o, o + n), but the memory is
         * live: another thread (numpy, ctypes, a C extension: none of them
         * holds the GIL, and a free-threaded build has none) may have set
         * the byte back since.  So the search stays inside the chunk, and a
         * chunk that became equal again is simply passed. */
        uint64_t end = o + n;
        while (o < end && a[o] == b[o])
            o++;
        if (o == end)
            continue;
        /* o differed when read; it counts even if it is equal again by
         * the time the run is extended (a run is never empty). */
        uint64_t run = o++;
        while (o < len && a[o] != b[o])
            o++;
        *run_start = run;
        *run_len = o - run;
        *off = o;
        return 1;
    }
    *off = len;
    return 0;
}
