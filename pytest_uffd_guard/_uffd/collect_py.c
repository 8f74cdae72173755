/*
 * collect_py.c -- the Python face of the collect path (issue 11): the
 * first changed byte of each written page (page_firsts, behind .writes of
 * the async, hybrid and diff engines) and the changed runs with their
 * bytes (changed_runs, behind .changes()), each in one call that returns
 * packed arrays, not a Python object per page or run.
 *
 * The comparisons run without the GIL (diff.c).  All state is per call:
 * the caller (a tracker or a GuardedBuffer) holds its own lock around the
 * memories and the `reported` bytearray, so free-threaded builds need
 * nothing more.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <sys/sysinfo.h>

#include "collect.h"
#include "collect_py.h"
#include "uffd.h"

/* Below this many bytes, opening /proc/self/pagemap costs more than
 * faulting in the untouched pages it lets us skip. */
#define PAGEMAP_FROM (64u << 10)

/* /proc/self/pagemap for one call, or -1 (the memory is then read). */
static int
open_pagemap(uint64_t len)
{
    if (len < PAGEMAP_FROM)
        return -1;
    return open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
}

/* No swap configured: a page mincore() says is not resident is absent.
 * Asked only when pagemap is open (fd >= 0): small buffers are read
 * directly, and a guarded 4 KiB buffer is harvested after every test phase,
 * so the system call would be most of the cost of "nothing changed". */
static int
no_swap(int fd)
{
    struct sysinfo si;
    return fd >= 0 && sysinfo(&si) == 0 && si.totalswap == 0;
}

static uint64_t
base_page(void)
{
    long page = sysconf(_SC_PAGESIZE);
    return page > 0 ? (uint64_t)page : 0;
}

static inline uint64_t
get64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

PyObject *
page_firsts_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long a, b, unit;
    PyObject *ranges, *reported;
    int only_changed, live_anonymous = 0;
    if (!PyArg_ParseTuple(args, "KKSKYi|i:page_firsts", &a, &b, &ranges, &unit, &reported,
                          &only_changed, &live_anonymous))
        return NULL;
    if (unit == 0) {
        PyErr_SetString(PyExc_ValueError, "unit must be positive");
        return NULL;
    }
    Py_ssize_t nbytes = PyBytes_Size(ranges);
    if (nbytes < 0)
        return NULL;
    if (nbytes % 16) {
        PyErr_SetString(PyExc_ValueError, "ranges must be packed (start, end) uint64 pairs");
        return NULL;
    }
    const char *r = PyBytes_AsString(ranges);
    char *seen = PyByteArray_AsString(reported);
    Py_ssize_t nunits = PyByteArray_Size(reported);
    if (!r || !seen || nunits < 0)
        return NULL;
    size_t nranges = (size_t)nbytes / 16, capacity = 0;
    for (size_t k = 0; k < nranges; k++) {
        uint64_t lo = get64(r + 16 * k), hi = get64(r + 16 * k + 8);
        if (lo % unit || hi < lo || hi / unit > (uint64_t)nunits ||
            (hi % unit && hi / unit >= (uint64_t)nunits)) {
            PyErr_SetString(PyExc_ValueError,
                            "a range is not unit-aligned or lies outside `reported`");
            return NULL;
        }
        capacity += (size_t)((hi - lo + unit - 1) / unit);
    }
    uint64_t *out = malloc((capacity ? capacity : 1) * sizeof *out);
    if (!out)
        return PyErr_NoMemory();
    size_t n = 0;
    Py_BEGIN_ALLOW_THREADS
    /* The snapshot, private anonymous, is read only where it has pages;
     * so is the live memory when it is private anonymous too. */
    uint64_t last = nranges ? get64(r + 16 * (nranges - 1) + 8) : 0;
    int fd = open_pagemap(last);
    struct mem live, snap;
    int swapless = no_swap(fd);
    mem_init(&live, (const void *)(uintptr_t)a, last, live_anonymous ? fd : -1, base_page(),
             swapless);
    mem_init(&snap, (const void *)(uintptr_t)b, last, fd, base_page(), swapless);
    for (size_t k = 0; k < nranges; k++) {
        uint64_t lo = get64(r + 16 * k), hi = get64(r + 16 * k + 8);
        for (uint64_t page = lo; page < hi; page += unit) {
            size_t index = (size_t)(page / unit);
            if (seen[index])
                continue;
            uint64_t stop = hi - page < unit ? hi : page + unit;
            uint64_t first = mem_first_diff(&live, &snap, page, stop);
            if (first == stop) {
                if (only_changed)
                    continue;
                first = page; /* written with the bytes already there */
            }
            seen[index] = 1;
            out[n++] = first;
        }
    }
    if (fd >= 0)
        close(fd);
    Py_END_ALLOW_THREADS
    PyObject *result = PyBytes_FromStringAndSize((const char *)out, (Py_ssize_t)(n * sizeof *out));
    free(out);
    return result;
}

/* The runs found by the first pass of changed_runs: offset, length, and
 * (filled once the cap is known) where the run's kept bytes start in
 * `before` and `after`. */
struct runs {
    uint64_t *v; /* 3 per run */
    size_t n, cap;
    uint64_t total; /* changed bytes */
};

static int
runs_add(struct runs *rs, uint64_t offset, uint64_t length)
{
    if (rs->n == rs->cap) {
        size_t cap = rs->cap ? 2 * rs->cap : 256;
        uint64_t *v = realloc(rs->v, cap * 3 * sizeof *v);
        if (!v)
            return -1;
        rs->v = v;
        rs->cap = cap;
    }
    uint64_t *e = rs->v + 3 * rs->n++;
    e[0] = offset;
    e[1] = length;
    e[2] = 0;
    rs->total += length;
    return 0;
}

PyObject *
changed_runs_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long a, b, len, preview, whole_up_to;
    int live_anonymous = 0;
    if (!PyArg_ParseTuple(args, "KKKKK|i:changed_runs", &a, &b, &len, &preview, &whole_up_to,
                          &live_anonymous))
        return NULL;
    struct runs rs = {0};
    int failed = 0;
    uint64_t kept = 0, cap;
    struct mem live, snap;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = open_pagemap(len);
    int swapless = no_swap(fd);
    mem_init(&live, (const void *)(uintptr_t)a, len, live_anonymous ? fd : -1, base_page(),
             swapless);
    mem_init(&snap, (const void *)(uintptr_t)b, len, fd, base_page(), swapless);
    uint64_t off = 0, run, n;
    while (!failed && mem_next_run(&live, &snap, len, &off, &run, &n))
        failed = runs_add(&rs, run, n) < 0;
    cap = rs.total <= whole_up_to ? UINT64_MAX : preview;
    for (size_t k = 0; k < rs.n; k++) {
        uint64_t *e = rs.v + 3 * k;
        e[2] = kept;
        kept += e[1] < cap ? e[1] : cap;
    }
    Py_END_ALLOW_THREADS
    if (failed) {
        if (fd >= 0)
            close(fd);
        free(rs.v);
        return PyErr_NoMemory();
    }
    PyObject *packed = PyBytes_FromStringAndSize(rs.v ? (const char *)rs.v : "",
                                                 (Py_ssize_t)(rs.n * 3 * sizeof *rs.v));
    PyObject *before = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)kept);
    PyObject *after = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)kept);
    char *pbefore = before ? PyBytes_AsString(before) : NULL;
    char *pafter = after ? PyBytes_AsString(after) : NULL;
    if (!packed || !pbefore || !pafter) {
        if (fd >= 0)
            close(fd);
        free(rs.v);
        Py_XDECREF(packed);
        Py_XDECREF(before);
        Py_XDECREF(after);
        return NULL;
    }
    /* Not yet shared with any thread: filled without the GIL. */
    Py_BEGIN_ALLOW_THREADS
    for (size_t k = 0; k < rs.n; k++) {
        const uint64_t *e = rs.v + 3 * k;
        uint64_t keep = e[1] < cap ? e[1] : cap;
        mem_copy((unsigned char *)pbefore + e[2], &snap, e[0], keep);
        mem_copy((unsigned char *)pafter + e[2], &live, e[0], keep);
    }
    if (fd >= 0)
        close(fd);
    Py_END_ALLOW_THREADS
    free(rs.v);
    return Py_BuildValue("(NNN)", packed, before, after);
}

/* The runs one by one, as a list (the diff engine's older path). */
PyObject *
diff_runs_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long a, b, len, max_runs;
    if (!PyArg_ParseTuple(args, "KKKK:diff_runs", &a, &b, &len, &max_runs))
        return NULL;
    const unsigned char *pa = (const unsigned char *)(uintptr_t)a;
    const unsigned char *pb = (const unsigned char *)(uintptr_t)b;
    PyObject *runs = PyList_New(0);
    if (!runs)
        return NULL;
    uint64_t off = 0, run, n;
    while (diff_next_run(pa, pb, len, &off, &run, &n)) {
        if ((uint64_t)PyList_Size(runs) >= max_runs)
            return Py_BuildValue("(NO)", runs, Py_False);
        PyObject *item = Py_BuildValue("(KK)", (unsigned long long)run, (unsigned long long)n);
        if (!item || PyList_Append(runs, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(runs);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(NO)", runs, Py_True);
}
