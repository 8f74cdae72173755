/*
 * doc.h -- the docstrings of module.c's functions, in method-table order
 * (after CPython's clinic/\*.c.h headers: the text apart from the code).
 * Plain C strings: included by module.c only.
 */
#ifndef PYTEST_UFFD_GUARD_DOC_H
#define PYTEST_UFFD_GUARD_DOC_H

static const char open_doc[] =
"open(method, flags) -> fd\n\n"
"Open a userfaultfd.  method is 'dev' (/dev/userfaultfd + USERFAULTFD_IOC_NEW)\n"
"or 'syscall' (userfaultfd(2)).  flags are passed through (O_CLOEXEC,\n"
"O_NONBLOCK, UFFD_USER_MODE_ONLY).  Raises OSError with the kernel's errno.";

static const char api_doc[] =
"api(fd, features) -> (supported_features, ioctls)\n\n"
"UFFDIO_API handshake.  Succeeds once per fd.";

static const char register_wp_doc[] =
"register_wp(fd, start, length) -> range_ioctls\n\n"
"UFFDIO_REGISTER with UFFDIO_REGISTER_MODE_WP; returns uffdio_register.ioctls.";

static const char unregister_doc[] = "unregister(fd, start, length)\n\nUFFDIO_UNREGISTER.";

static const char writeprotect_doc[] =
"writeprotect(fd, start, length, protect)\n\n"
"UFFDIO_WRITEPROTECT; protect=False un-protects and wakes blocked writers.";

static const char populate_doc[] =
"populate(start, length, page)\n\n"
"Fault in every page of the range for writing (MADV_POPULATE_WRITE, or a\n"
"touch per page on kernels before 5.14).  The range must not be protected.";

static const char handler_start_doc[] =
"handler_start(fd, page_size, features=0, spin_us=0)\n\n"
"Start this process's fault-handler thread on fd, which the handler now\n"
"owns (it is closed by handler_stop, or in a forked child).  features are\n"
"the UFFD_FEATURE_* bits enabled on fd at UFFDIO_API: with\n"
"FEATURE_EVENT_REMOVE, madvise discards are recorded and re-protected.\n"
"spin_us (at most SPIN_US_MAX): after a fault the thread keeps reading\n"
"for that long before it sleeps, on a process that may use several CPUs;\n"
"0 turns it off.";

static const char handler_stop_doc[] =
"handler_stop()\n\n"
"Unregister every guarded range (freeing any blocked writer), stop the\n"
"thread and close the fd.  A no-op when no handler runs in this process.";

static const char guard_add_doc[] =
"guard_add(start, length, unit, capacity, stacks=0, every_fault=False)\n"
"    -> (id, range_ioctls)\n\n"
"Register [start, start+length) with the handler's fd in write-protect\n"
"mode and add it to the handler's table, with a log of `capacity` records;\n"
"the writers of its first `stacks` faults are named (see\n"
"attribution_setup).  One record per unit per protection unless\n"
"every_fault: later faults on a recorded unit are only counted\n"
"(duplicates).  The range is not protected yet.";

static const char guard_protect_doc[] =
"guard_protect(id, protect, start=0, length=0)\n\n"
"Write-protect (or un-protect and wake) the guard's range, or a part of\n"
"it given as offset and length from the guard's start.  Protecting makes\n"
"the next fault on each unit a first write again (see guard_add).";

static const char guard_drain_doc[] =
"guard_drain(id) -> (records, overflow, duplicates)\n\n"
"Take the guard's recorded faults as packed bytes (RECORD_SIZE each, see\n"
"struct fault_record), the number that did not fit and the number of\n"
"repeated faults on already-recorded units; all are reset.";

static const char guard_remove_doc[] =
"guard_remove(id) -> (records, overflow, duplicates)\n\n"
"Unregister the guard's range (waking any writer blocked in it), drop it\n"
"from the table and return what its log still held.  Safe to call after a\n"
"fork or after the handler failed: then it only forgets the guard.";

static const char guard_set_stacks_doc[] =
"guard_set_stacks(id, stacks)\n\n"
"Give the guard a fresh budget of `stacks` captures (0 turns them off).";

static const char handler_state_doc[] =
"handler_state() -> dict\n\n"
"running, failed, error, faults, unmatched, errors, discards (madvise\n"
"events), other_events, guards, features (enabled at start),\n"
"reprotect_pending (madvise-discarded pages not yet protected again),\n"
"attribution (set up in this process), captures (signals sent), busy\n"
"(captures skipped while another was in flight), capture_in_flight,\n"
"unexpected_event (the uffd_msg event that made the handler give up, one of\n"
"EVENT_*; 0: none) and unexpected_event_name, warning (the last anomaly the\n"
"handler survived and counted in unmatched or errors, as a sentence; \"\"\n"
"when none).";

static const char handler_failure_doc[] =
"handler_failure() -> str or None\n\n"
"Why this process's handler gave up, or None while it runs (or never\n"
"started).  Cheap: for checking before every use of a guard.";

static const char debug_doc[] =
"_debug(fail_after=0, hold=0)\n\n"
"Test hooks.  fail_after=N makes the handler treat its Nth next fault as a\n"
"fatal error (exercising the give-up path); hold=1 keeps faults unresolved\n"
"until hold=0 or the range is unregistered.";

#endif /* PYTEST_UFFD_GUARD_DOC_H */
