/*
 * budget_py.c -- the Python face of budget.c: the hybrid engine's watcher
 * sleeps on budget_fd() and asks budget_hits() which guards spent the
 * budget their tracker gave them with guard_set_budget.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "budget_py.h"
#include "uffd.h"
#include "uffd_py.h"

PyObject *
guard_set_budget_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long id, records;
    if (!PyArg_ParseTuple(args, "KK:guard_set_budget", &id, &records))
        return NULL;
    if (guard_set_budget(id, records) != 0) {
        PyErr_SetString(PyExc_KeyError, "unknown guard");
        return NULL;
    }
    Py_RETURN_NONE;
}

PyObject *
budget_hits_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    uint64_t ids[64];
    size_t n;
    do {
        /* Copied out under H.lock, the objects made after: an allocation
         * can run the GC, whose finalizers take H.lock. */
        n = budget_hits(ids, sizeof ids / sizeof *ids);
        for (size_t i = 0; i < n; i++) {
            PyObject *id = PyLong_FromUnsignedLongLong(ids[i]);
            if (id == NULL || PyList_Append(list, id) < 0) {
                Py_XDECREF(id);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(id);
        }
    } while (n == sizeof ids / sizeof *ids);
    return list;
}

PyObject *
budget_fd_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    int fd = budget_fd();
    if (fd < 0)
        return raise_errno(fd, "eventfd");
    return PyLong_FromLong(fd);
}
