/*
 * budget_py.h -- the functions of budget_py.c (the hybrid engine's page
 * budget) and their docstrings, for module.c's method table.  Include
 * after Python.h.
 */
#ifndef PYTEST_UFFD_GUARD_BUDGET_PY_H
#define PYTEST_UFFD_GUARD_BUDGET_PY_H

#pragma GCC visibility push(hidden)

PyObject *guard_set_budget_py(PyObject *self, PyObject *args);
PyObject *budget_hits_py(PyObject *self, PyObject *noargs);
PyObject *budget_fd_py(PyObject *self, PyObject *noargs);

#pragma GCC visibility pop

static const char guard_set_budget_doc[] =
"guard_set_budget(id, records)\n\n"
"After `records` more records of guard id (0: never), flag the guard and\n"
"bump this process's budget eventfd (budget_fd).  Replaces any budget\n"
"left and clears the flag.  KeyError for an unknown guard.";

static const char budget_hits_doc[] =
"budget_hits() -> list of ids\n\n"
"The guards whose budget was spent since the last call (their flags are\n"
"cleared).  Does not read the eventfd.";

static const char budget_fd_doc[] =
"budget_fd() -> int\n\n"
"This process's budget eventfd (blocking, close-on-exec), created on first\n"
"use and again in a forked child; never close it.  The handler adds 1 to\n"
"it each time a guard's budget is spent; anyone may add to it to wake its\n"
"reader.  Raises OSError when eventfd fails.";

#endif /* PYTEST_UFFD_GUARD_BUDGET_PY_H */
