/*
 * collect_py.h -- the functions of collect_py.c (the collect path, and the
 * diff engine's run list) and their docstrings, for
 * module.c's method table.  Include after Python.h.
 */
#ifndef PYTEST_UFFD_GUARD_COLLECT_PY_H
#define PYTEST_UFFD_GUARD_COLLECT_PY_H

#pragma GCC visibility push(hidden)

PyObject *page_firsts_py(PyObject *self, PyObject *args);
PyObject *changed_runs_py(PyObject *self, PyObject *args);
PyObject *diff_runs_py(PyObject *self, PyObject *args);

#pragma GCC visibility pop

static const char page_firsts_doc[] =
"page_firsts(a, b, ranges, unit, reported, only_changed, live_anonymous=0)\n"
"    -> bytes\n\n"
"For each unit (page) of the packed uint64 (start, end) offset pairs\n"
"`ranges` (unit-aligned starts, ascending) whose byte in the bytearray\n"
"`reported` is 0: the offset of its first byte that differs between the\n"
"memories at a and b, or of the unit itself when none differs (then the\n"
"unit is skipped instead when only_changed is true); its byte in\n"
"`reported` is set.  b is a private anonymous mapping, and so is a when\n"
"live_anonymous: their pages neither present nor swapped are taken as\n"
"zeros without being read.\n"
"Returns the offsets as packed native uint64.";

static const char changed_runs_doc[] =
"changed_runs(a, b, length, preview, whole_up_to, live_anonymous=0)\n"
"    -> (runs, before, after)\n\n"
"The maximal runs of differing bytes of the memories at a and b, within\n"
"[0, length), in one pass: `runs` packs three native uint64 per run\n"
"(offset, length, position of its bytes in `before` and `after`), and\n"
"`before`/`after` hold the bytes of each run of b and of a, run after\n"
"run: all of them when the runs add up to at most whole_up_to bytes,\n"
"else the first `preview` bytes of each.  b is a private anonymous mapping,\n"
"and so is a when live_anonymous: their pages that are neither present nor\n"
"swapped are taken as zeros without being read (/proc/self/pagemap).";

static const char diff_runs_doc[] =
"diff_runs(a, b, length, max_runs) -> (runs, complete)\n\n"
"Compare length bytes at addresses a and b; return the runs of differing\n"
"bytes as a list of (offset, length), at most max_runs of them, and whether\n"
"the comparison reached the end.  Reads only; the caller keeps both\n"
"memories alive.";

#endif /* PYTEST_UFFD_GUARD_COLLECT_PY_H */
