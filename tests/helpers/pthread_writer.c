/*
 * pthread_writer.c -- test helper: write one byte from a thread that has
 * no Python state.  Built by tests/test_attribution.py with gcc into its
 * tmp_path and loaded with ctypes.
 */
#include <pthread.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

struct job {
    volatile unsigned char *target;
    unsigned char value;
    long tid;
};

static void *
run(void *arg)
{
    struct job *job = arg;
    job->tid = syscall(SYS_gettid);
    *job->target = job->value;
    return NULL;
}

/* Start a pthread that stores value at address, join it, and return its
 * thread id (or -1 if it could not be started). */
long
write_from_pthread(uintptr_t address, int value)
{
    struct job job = {(volatile unsigned char *)address, (unsigned char)value, -1};
    pthread_t thread;
    if (pthread_create(&thread, NULL, run, &job) != 0)
        return -1;
    pthread_join(thread, NULL);
    return job.tid;
}
