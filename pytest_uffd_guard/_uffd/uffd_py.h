/*
 * uffd_py.h -- what the files that include Python.h share.  Include
 * after Python.h and uffd.h.
 */
#ifndef PYTEST_UFFD_GUARD_UFFD_PY_H
#define PYTEST_UFFD_GUARD_UFFD_PY_H

#pragma GCC visibility push(hidden)

/* Raise OSError(errno, strerror, what) for -errno; returns NULL. */
PyObject *raise_errno(int neg_errno, const char *what);

/* The capture and namer functions, added to the module by PyInit. */
extern PyMethodDef capture_methods[];

#pragma GCC visibility pop

#endif /* PYTEST_UFFD_GUARD_UFFD_PY_H */
