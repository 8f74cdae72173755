/*
 * capture_py.c -- the _py wrappers of capture.c and namer.c: setting up
 * the capture signal and the namer thread's loop.  Like module.c, which
 * adds capture_methods to the module, it includes Python.h (the second
 * and last file to do so: module.c alone would be over 500 lines).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "uffd.h"
#include "uffd_py.h"

/* The docstrings, in method-table order (as doc.h is for module.c: the
 * text apart from the code). */
static const char signal_is_default_doc[] =
"signal_is_default(signum) -> bool\n\n"
"True when signum's disposition is SIG_DFL at the C level (no handler\n"
"installed by anyone, Python or C) and it is not blocked in this thread.";

static const char attribution_setup_doc[] =
"attribution_setup(signum, fd)\n\n"
"Prepare naming writers in this process (attribution_enable starts it):\n"
"faults are signalled with signum,\n"
"and each capture's end marker is appended to fd.  The first call in a\n"
"process image installs the C end-marker handler on signum; the caller must\n"
"then register faulthandler on signum with file=fd, all_threads=False and\n"
"chain=True, so that faulthandler dumps first and chains to it.  A forked\n"
"child calls it again with its own fd (the handlers survive fork).";

static const char attribution_enable_doc[] =
"attribution_enable(on)\n\n"
"Start (after attribution_setup and faulthandler.register) or stop\n"
"signalling writers in this process.";

static const char attribution_installed_signal_doc[] =
"attribution_installed_signal() -> int\n\n"
"The signal an earlier attribution_setup of this process installed its\n"
"handler on (kept across a re-import of the package), or 0.";

static const char attribution_consumed_doc[] =
"attribution_consumed(n)\n\n"
"Python has read n dumps (one per signalled capture) since attribution_setup\n"
"in this process: once every dump was read, the handler may truncate the\n"
"file before its next capture.";

static const char namer_setup_doc[] =
"namer_setup(pending, claimed)\n\n"
"Let the handler name writers blocked inside a system call through a namer\n"
"thread of this process (see namer_wait).  A request waits at most\n"
"`pending` seconds for the namer to claim it, and then `claimed` more for\n"
"it to finish; the fault is resolved regardless.  A forked child calls it\n"
"again (it gets its own eventfds).  Raises OSError when eventfd fails.";

static const char namer_wait_doc[] =
"namer_wait() -> (seq, tid) or None\n\n"
"The namer thread's loop: wait, without the GIL, for the handler to ask for\n"
"the writer of fault `seq`, a thread blocked inside a system call, and\n"
"claim the request once the GIL is held again.  While claimed, the writer\n"
"stays blocked: read thread `tid`'s frames, then call namer_done(seq).\n"
"None when the namer was stopped (namer_stop) or after a fork.";

static const char namer_done_doc[] =
"namer_done(seq) -> bool\n\n"
"Finish the claimed request `seq`.  False when the handler abandoned it\n"
"meanwhile (the writer may have moved on: drop what was read).";

static const char namer_stop_doc[] =
"namer_stop()\n\n"
"Stop naming in-system-call writers in this process: namer_wait returns\n"
"None, and the handler records such writes as not named.";

static const char namer_state_doc[] =
"namer_state() -> dict\n\n"
"namer (set up and not stopped in this process), request (seq of the\n"
"request in flight, 0 when none), named, gil_timeouts (abandoned before a\n"
"claim), late (abandoned after one).";

static PyObject *
signal_is_default_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int sig;
    if (!PyArg_ParseTuple(args, "i:signal_is_default", &sig))
        return NULL;
    if (sig < 1 || sig > SIGRTMAX) {
        PyErr_SetString(PyExc_ValueError, "signal number out of range");
        return NULL;
    }
    int dfl = signal_is_default(sig);
    if (dfl < 0)
        return raise_errno(dfl, "sigaction");
    return PyBool_FromLong(dfl);
}

static PyObject *
attribution_setup_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int sig, fd;
    if (!PyArg_ParseTuple(args, "ii:attribution_setup", &sig, &fd))
        return NULL;
    if (sig < SIGRTMIN || sig > SIGRTMAX) {
        PyErr_SetString(PyExc_ValueError, "the capture signal must be a real-time signal");
        return NULL;
    }
    /* Under life_lock, without the GIL; raise after unlocking. */
    const char *refused = NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = attribution_setup(sig, fd, &refused);
    Py_END_ALLOW_THREADS
    if (rc > 0) {
        PyErr_SetString(PyExc_RuntimeError, refused);
        return NULL;
    }
    if (rc < 0)
        return raise_errno(rc, "sigaction");
    Py_RETURN_NONE;
}

static PyObject *
attribution_enable_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    int on;
    if (!PyArg_ParseTuple(args, "p:attribution_enable", &on))
        return NULL;
    if (attribution_enable(on) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "attribution is not set up in this process");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
attribution_installed_signal_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    return PyLong_FromLong(attribution_installed_signal());
}

static PyObject *
attribution_consumed_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long n;
    if (!PyArg_ParseTuple(args, "K:attribution_consumed", &n))
        return NULL;
    attribution_consumed((uint64_t)n);
    Py_RETURN_NONE;
}

static PyObject *
namer_setup_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    double pending, claimed;
    if (!PyArg_ParseTuple(args, "dd:namer_setup", &pending, &claimed))
        return NULL;
    /* Checked before the casts: negative or huge values are not durations. */
    if (!(pending > 0 && pending < 3600 && claimed >= 0 && claimed < 3600)) {
        PyErr_SetString(PyExc_ValueError, "namer timeouts must be between 0 and 3600 seconds");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = namer_setup((uint64_t)(pending * 1e9), (uint64_t)(claimed * 1e9));
    Py_END_ALLOW_THREADS
    if (rc < 0)
        return raise_errno(rc, "eventfd");
    Py_RETURN_NONE;
}

static PyObject *
namer_wait_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    for (;;) {
        if (namer_stopped())
            Py_RETURN_NONE;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = namer_read_wake();
        Py_END_ALLOW_THREADS
        if (rc == -EINTR)
            continue;
        if (rc < 0)
            return raise_errno(rc, "read(namer eventfd)");
        uint64_t seq;
        int32_t tid;
        if (namer_claim(&seq, &tid))
            return Py_BuildValue("(Ki)", (unsigned long long)seq, (int)tid);
    }
}

static PyObject *
namer_done_py(PyObject *Py_UNUSED(self), PyObject *args)
{
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "K:namer_done", &seq))
        return NULL;
    return PyBool_FromLong(namer_done(seq));
}

static PyObject *
namer_stop_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    Py_BEGIN_ALLOW_THREADS
    namer_stop();
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
namer_state_py(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(noargs))
{
    struct namer_snapshot s;
    namer_snapshot(&s);
    return Py_BuildValue("{s:O,s:K,s:K,s:K,s:K}",
                         "namer", s.namer ? Py_True : Py_False,
                         "request", (unsigned long long)s.request,
                         "named", (unsigned long long)s.named,
                         "gil_timeouts", (unsigned long long)s.gil_timeouts,
                         "late", (unsigned long long)s.late);
}

/* An entry of the table: name_py, documented by name_doc. */
#define METHOD(name, flags) {#name, name##_py, flags, name##_doc}

PyMethodDef capture_methods[] = {
    METHOD(signal_is_default, METH_VARARGS),
    METHOD(attribution_setup, METH_VARARGS),
    METHOD(attribution_enable, METH_VARARGS),
    METHOD(attribution_installed_signal, METH_NOARGS),
    METHOD(attribution_consumed, METH_VARARGS),
    METHOD(namer_setup, METH_VARARGS),
    METHOD(namer_wait, METH_NOARGS),
    METHOD(namer_done, METH_VARARGS),
    METHOD(namer_stop, METH_NOARGS),
    METHOD(namer_state, METH_NOARGS),
    {NULL, NULL, 0, NULL},
};

#undef METHOD
