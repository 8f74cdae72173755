/*
 * module.c -- the Python face of _uffd, the kernel-facing core of
 * pytest-uffd-guard: the _py wrappers, the method table, module init and
 * the exported constants.  The only file of the extension that includes
 * Python.h; uffd.h lists the other files and their jobs.
 *
 * This module talks to Linux userfaultfd and nothing else: it opens the fd,
 * performs the UFFDIO_* ioctls, and runs the one fault-handler thread of the
 * process.  It holds no policy (which features to ask for, what to do with a
 * write): that lives in the Python layer.
 *
 * Why C at all: a thread that writes into a write-protected page is blocked
 * inside the kernel until someone un-protects the page.  That writer usually
 * holds the GIL, so the thread that resolves the fault must never need the
 * GIL.  The handler thread below is a plain pthread that never touches a
 * Python object.
 *
 * Conventions (after the kernel's uffd selftests and CPython's
 * faulthandler.c):
 *   - one small function per ioctl, returning 0 or -errno;
 *   - a Python wrapper (suffix _py) checks arguments and raises; internal
 *     functions never raise;
 *   - functions that run on the handler thread say so, and call no Python
 *     API and no allocator.
 *
 * GIL builds compile it against the limited API (setup.py defines
 * Py_LIMITED_API), so one abi3 binary serves Python 3.9+.  A free-threaded
 * build has no limited API and gets the full one; the module declares that
 * it does not need the GIL (PyInit), which holds because no wrapper relies
 * on the GIL to serialise its callers: shared C state is read and written
 * under H.lock / H.reg_lock, through atomics, or under life_lock (uffd.h).
 */
#define PY_SSIZE_T_CLEAN
#if defined(Py_LIMITED_API) && defined(Py_GIL_DISABLED)
#error "Py_LIMITED_API cannot be used for a free-threaded build (setup.py omits it there)"
#endif
#include <Python.h>

#include "budget_py.h"
#include "collect_py.h"
#include "doc.h"
#include "uffd.h"
#include "uffd_py.h"

PyObject *
raise_errno(int neg_errno, const char *what)
{
    int err = -neg_errno;
    PyObject *args = Py_BuildValue("(iss)", err, strerror(err), what);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* None for rc >= 0, else raise_errno(rc, what). */
static PyObject *
none_or_raise(int rc, const char *what)
{
    if (rc < 0)
        return raise_errno(rc, what);
    Py_RETURN_NONE;
}

static PyObject *
open_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    const char *method;
    int flags;
    if (!PyArg_ParseTuple(args, "si:open", &method, &flags))
        return NULL;
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = strcmp(method, "dev") == 0 ? uffd_open_dev(flags)
       : strcmp(method, "syscall") == 0 ? uffd_open_syscall(flags)
       : -EINVAL;
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return raise_errno(fd, method);
    return PyLong_FromLong(fd);
}

static PyObject *
api_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    unsigned long long features, ioctls = 0;
    if (!PyArg_ParseTuple(args, "iK:api", &fd, &features))
        return NULL;
    uint64_t f = features, io = ioctls;
    int rc = uffd_api(fd, &f, &io);
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_API");
    return Py_BuildValue("(KK)", (unsigned long long)f, (unsigned long long)io);
}

/* (fd, start, len): the arguments of every range ioctl. */
struct range_args {
    int fd;
    unsigned long long start, len;
};

static int
parse_range(PyObject *args, const char *format, struct range_args *r)
{
    return PyArg_ParseTuple(args, format, &r->fd, &r->start, &r->len);
}

static PyObject *
register_wp_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    struct range_args r;
    uint64_t io = 0;
    if (!parse_range(args, "iKK:register_wp", &r))
        return NULL;
    int rc = uffd_register_wp(r.fd, r.start, r.len, &io);
    return rc < 0 ? raise_errno(rc, "UFFDIO_REGISTER") : PyLong_FromUnsignedLongLong(io);
}

static PyObject *
unregister_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    struct range_args r;
    if (!parse_range(args, "iKK:unregister", &r))
        return NULL;
    return none_or_raise(uffd_unregister(r.fd, r.start, r.len), "UFFDIO_UNREGISTER");
}

static PyObject *
writeprotect_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd, protect;
    unsigned long long start, len;
    if (!PyArg_ParseTuple(args, "iKKp:writeprotect", &fd, &start, &len, &protect))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = uffd_writeprotect(fd, start, len, protect);
    Py_END_ALLOW_THREADS
    return none_or_raise(rc, "UFFDIO_WRITEPROTECT");
}

static PyObject *
populate_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long start, len, page;
    if (!PyArg_ParseTuple(args, "KKK:populate", &start, &len, &page))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = populate_write(start, len, page);
    Py_END_ALLOW_THREADS
    return none_or_raise(rc, "MADV_POPULATE_WRITE");
}

static PyObject *
handler_start_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fd;
    unsigned long long page, features = 0, spin_us = 0;
    if (!PyArg_ParseTuple(args, "iK|KK:handler_start", &fd, &page, &features, &spin_us))
        return NULL;
    if (spin_us > SPIN_US_MAX) {
        PyErr_Format(PyExc_ValueError, "spin_us must be at most %d", SPIN_US_MAX);
        return NULL;
    }
    if (page == 0 || (page & (page - 1))) {
        PyErr_SetString(PyExc_ValueError, "page_size must be a power of two");
        return NULL;
    }
    /* Everything under life_lock, without the GIL; raise after. */
    int rc;
    const char *what = NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = handler_start(fd, page, features, spin_us * 1000ULL, &what);
    Py_END_ALLOW_THREADS
    if (rc == TABLE_STARTED) {
        PyErr_SetString(PyExc_RuntimeError, "handler already started in this process");
        return NULL;
    }
    if (rc < 0)
        return raise_errno(rc, what);
    Py_RETURN_NONE;
}

static PyObject *
handler_stop_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    Py_BEGIN_ALLOW_THREADS
    handler_shutdown();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* The handler fd for the calling process, or -1 with an exception set. */
static int
owned_fd(void)
{
    char error[sizeof H.error];
    int fd = handler_fd(error, sizeof error);
    if (fd == -TABLE_NO_HANDLER) {
        PyErr_SetString(PyExc_RuntimeError, "no fault handler runs in this process");
        return -1;
    }
    if (fd == -TABLE_STOPPED) {
        PyErr_Format(PyExc_RuntimeError, "fault handler stopped: %s", error);
        return -1;
    }
    return fd;
}

static PyObject *
guard_add_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long start, len, unit, capacity, stacks = 0;
    int every = 0;
    if (!PyArg_ParseTuple(args, "KKKK|Kp:guard_add", &start, &len, &unit, &capacity, &stacks,
                          &every))
        return NULL;
    if (len == 0 || unit == 0 || (unit & (unit - 1)) || start % unit || len % unit) {
        PyErr_SetString(PyExc_ValueError, "range must be non-empty and unit-aligned");
        return NULL;
    }
    if (owned_fd() < 0)
        return NULL;
    uint64_t ioctls = 0, id = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = guard_add(start, len, unit, capacity, stacks, every, &id, &ioctls);
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, "UFFDIO_REGISTER");
    if (rc == TABLE_NOMEM)
        return PyErr_NoMemory();
    if (rc != 0)
        return owned_fd() < 0 ? NULL : PyErr_Format(PyExc_RuntimeError, "fault handler stopped");
    return Py_BuildValue("(KK)", (unsigned long long)id, (unsigned long long)ioctls);
}

static PyObject *
guard_protect_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long id, off = 0, len = 0;
    int protect;
    if (!PyArg_ParseTuple(args, "Kp|KK:guard_protect", &id, &protect, &off, &len))
        return NULL;
    if (owned_fd() < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = guard_protect(id, protect, off, len);
    Py_END_ALLOW_THREADS
    if (rc == TABLE_NO_HANDLER) {
        PyErr_SetString(PyExc_RuntimeError, "no fault handler runs in this process");
        return NULL;
    }
    if (rc == TABLE_UNKNOWN) {
        PyErr_SetString(PyExc_KeyError, "unknown guard");
        return NULL;
    }
    return none_or_raise(rc, "UFFDIO_WRITEPROTECT");
}

/* Build the (records, overflow, duplicates) answer and free t. */
static PyObject *
taken_result(struct taken *t)
{
    PyObject *blob = PyBytes_FromStringAndSize(t->records ? (const char *)t->records : "",
                                               (Py_ssize_t)(t->count * sizeof *t->records));
    free(t->records);
    t->records = NULL;
    if (!blob)
        return NULL;
    return Py_BuildValue("(NKK)", blob, (unsigned long long)t->overflow,
                         (unsigned long long)t->duplicates);
}

static PyObject *
guard_drain_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K:guard_drain", &id))
        return NULL;
    struct taken t = {0};
    /* Copied out under the lock, the bytes built after (see struct handler). */
    if (guard_take(id, &t) == TABLE_NOMEM)
        return PyErr_NoMemory();
    return taken_result(&t);
}

static PyObject *
guard_remove_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long id;
    if (!PyArg_ParseTuple(args, "K:guard_remove", &id))
        return NULL;
    int rc;
    struct taken t = {0};
    Py_BEGIN_ALLOW_THREADS
    rc = guard_forget(id, &t);
    Py_END_ALLOW_THREADS
    PyObject *result = taken_result(&t);
    /* ENOMEM/ENOENT/EINVAL here mean the mapping is already gone: nothing
     * is registered any more, which is what we wanted. */
    if (result && rc < 0 && rc != -ENOENT && rc != -ENOMEM && rc != -EINVAL) {
        Py_DECREF(result);
        return raise_errno(rc, "UFFDIO_UNREGISTER");
    }
    return result;
}

static PyObject *
guard_set_stacks_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long id, stacks;
    if (!PyArg_ParseTuple(args, "KK:guard_set_stacks", &id, &stacks))
        return NULL;
    if (guard_set_stacks(id, stacks) != 0) {
        PyErr_SetString(PyExc_KeyError, "unknown guard");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
handler_state_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    /* Copied out under the lock, the dict built after: an allocation can
     * run the GC, whose finalizers take H.lock (see struct handler). */
    struct handler_snapshot s;
    handler_snapshot(&s);
    return Py_BuildValue(
        "{s:O,s:O,s:s,s:K,s:K,s:K,s:K,s:K,s:n,s:K,s:O,s:O,s:K,s:K,s:K,s:I,s:s,s:s}",
        "running", s.running ? Py_True : Py_False,
        "failed", s.failed ? Py_True : Py_False,
        "error", s.error,
        "faults", (unsigned long long)s.faults,
        "unmatched", (unsigned long long)s.unmatched,
        "errors", (unsigned long long)s.errors,
        "discards", (unsigned long long)s.discards,
        "other_events", (unsigned long long)s.other_events,
        "guards", (Py_ssize_t)s.guards,
        "features", (unsigned long long)s.features,
        "reprotect_pending", s.reprotect ? Py_True : Py_False,
        "attribution", s.attribution ? Py_True : Py_False,
        "captures", (unsigned long long)s.captures,
        "busy", (unsigned long long)s.busy,
        "capture_in_flight", (unsigned long long)s.in_flight,
        "unexpected_event", (unsigned int)s.last_event,
        "unexpected_event_name", s.last_event ? event_name(s.last_event) : "",
        "warning", s.warning);
}

static PyObject *
handler_failure_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    char error[sizeof H.error];
    if (!handler_failure_copy(error, sizeof error))
        Py_RETURN_NONE;
    return PyUnicode_FromString(error);
}

static PyObject *
debug_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int fail_after = 0, hold = 0;
    if (!PyArg_ParseTuple(args, "|ii:_debug", &fail_after, &hold))
        return NULL;
    handler_debug(fail_after, hold);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"open", open_py, METH_VARARGS, open_doc},
    {"api", api_py, METH_VARARGS, api_doc},
    {"register_wp", register_wp_py, METH_VARARGS, register_wp_doc},
    {"unregister", unregister_py, METH_VARARGS, unregister_doc},
    {"writeprotect", writeprotect_py, METH_VARARGS, writeprotect_doc},
    {"populate", populate_py, METH_VARARGS, populate_doc},
    {"diff_runs", diff_runs_py, METH_VARARGS, diff_runs_doc},
    {"page_firsts", page_firsts_py, METH_VARARGS, page_firsts_doc},
    {"changed_runs", changed_runs_py, METH_VARARGS, changed_runs_doc},
    {"handler_start", handler_start_py, METH_VARARGS, handler_start_doc},
    {"handler_stop", handler_stop_py, METH_NOARGS, handler_stop_doc},
    {"handler_state", handler_state_py, METH_NOARGS, handler_state_doc},
    {"handler_failure", handler_failure_py, METH_NOARGS, handler_failure_doc},
    {"guard_add", guard_add_py, METH_VARARGS, guard_add_doc},
    {"guard_protect", guard_protect_py, METH_VARARGS, guard_protect_doc},
    {"guard_drain", guard_drain_py, METH_VARARGS, guard_drain_doc},
    {"guard_remove", guard_remove_py, METH_VARARGS, guard_remove_doc},
    {"guard_set_stacks", guard_set_stacks_py, METH_VARARGS, guard_set_stacks_doc},
    {"guard_set_budget", guard_set_budget_py, METH_VARARGS, guard_set_budget_doc},
    {"budget_hits", budget_hits_py, METH_NOARGS, budget_hits_doc},
    {"budget_fd", budget_fd_py, METH_NOARGS, budget_fd_doc},
    {"_debug", debug_py, METH_VARARGS, debug_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_uffd",
    "Kernel-facing core of pytest-uffd-guard (userfaultfd write-protect).",
    -1, methods, NULL, NULL, NULL, NULL,
};

/* The constants Python mirrors or passes back, by name.  Every value the
 * Python side repeats (records.py, attribution.py, probe.FEATURES) is here,
 * so tests/test_contract.py can compare them; append freely. */
#define C(name, value) {name, (long long)(value)}
static const struct {
    const char *name;
    long long value;
} constants[] = {
    C("O_CLOEXEC", O_CLOEXEC), C("O_NONBLOCK", O_NONBLOCK),
    C("USER_MODE_ONLY", UFFD_USER_MODE_ONLY),
    C("FEATURE_PAGEFAULT_FLAG_WP", UFFD_FEATURE_PAGEFAULT_FLAG_WP),
    C("FEATURE_EVENT_FORK", UFFD_FEATURE_EVENT_FORK),
    C("FEATURE_EVENT_REMAP", UFFD_FEATURE_EVENT_REMAP),
    C("FEATURE_EVENT_REMOVE", UFFD_FEATURE_EVENT_REMOVE),
    C("FEATURE_MISSING_HUGETLBFS", UFFD_FEATURE_MISSING_HUGETLBFS),
    C("FEATURE_MISSING_SHMEM", UFFD_FEATURE_MISSING_SHMEM),
    C("FEATURE_EVENT_UNMAP", UFFD_FEATURE_EVENT_UNMAP),
    C("FEATURE_SIGBUS", UFFD_FEATURE_SIGBUS),
    C("FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID),
    C("FEATURE_MINOR_HUGETLBFS", UFFD_FEATURE_MINOR_HUGETLBFS),
    C("FEATURE_MINOR_SHMEM", UFFD_FEATURE_MINOR_SHMEM),
    C("FEATURE_EXACT_ADDRESS", UFFD_FEATURE_EXACT_ADDRESS),
    C("FEATURE_WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM),
    C("FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED),
    C("FEATURE_POISON", UFFD_FEATURE_POISON),
    C("FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC),
    C("FEATURE_MOVE", UFFD_FEATURE_MOVE),
    C("IOCTL_WRITEPROTECT_BIT", _UFFDIO_WRITEPROTECT),
    C("PAGEFAULT_FLAG_WRITE", UFFD_PAGEFAULT_FLAG_WRITE),
    C("PAGEFAULT_FLAG_WP", UFFD_PAGEFAULT_FLAG_WP),
    C("EVENT_PAGEFAULT", UFFD_EVENT_PAGEFAULT), C("EVENT_FORK", UFFD_EVENT_FORK),
    C("EVENT_REMAP", UFFD_EVENT_REMAP), C("EVENT_REMOVE", UFFD_EVENT_REMOVE),
    C("EVENT_UNMAP", UFFD_EVENT_UNMAP),
    C("RECORD_SIZE", sizeof(struct fault_record)), C("SPIN_US_MAX", SPIN_US_MAX),
    C("KIND_WRITE", KIND_WRITE), C("KIND_DISCARD", KIND_DISCARD),
    C("ATTR_OFF", ATTR_OFF), C("ATTR_BOUND", ATTR_BOUND), C("ATTR_SIGNALLED", ATTR_SIGNALLED),
    C("ATTR_BUSY", ATTR_BUSY), C("ATTR_BLOCKED", ATTR_BLOCKED), C("ATTR_NO_TID", ATTR_NO_TID),
    C("ATTR_FAILED", ATTR_FAILED), C("ATTR_NAMING", ATTR_NAMING), C("ATTR_NAMED", ATTR_NAMED),
    C("ATTR_GIL_HELD", ATTR_GIL_HELD), C("ATTR_NAMER_LATE", ATTR_NAMER_LATE),
    C("ATTR_NO_NAMER", ATTR_NO_NAMER), C("ATTR_UNKNOWN", ATTR_UNKNOWN),
    C("SYSCALL_USER", SYSCALL_USER), C("SYSCALL_UNKNOWN", SYSCALL_UNKNOWN),
};
#undef C

/* Add one integer constant; 0 or -1 with an exception set. */
static int
add_int(PyObject *m, const char *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (!v || PyModule_AddObject(m, name, v) < 0) {
        Py_XDECREF(v);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__uffd(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddFunctions(m, capture_methods) < 0)
        goto error;
    for (size_t k = 0; k < sizeof constants / sizeof constants[0]; k++)
        if (add_int(m, constants[k].name, constants[k].value) < 0)
            goto error;
    /* Not constant expressions in glibc: added at run time. */
    if (add_int(m, "SIGRTMIN", SIGRTMIN) < 0 || add_int(m, "SIGRTMAX", SIGRTMAX) < 0)
        goto error;
    if (install_atfork() != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        goto error;
    }
#ifdef Py_GIL_DISABLED
    /* True: see the top of the file.  Without it, importing this module
     * would turn the GIL back on for the whole process. */
    if (PyUnstable_Module_SetGIL(m, Py_MOD_GIL_NOT_USED) < 0)
        goto error;
#endif
    return m;
error:
    Py_DECREF(m);
    return NULL;
}
