/*
 * remove.c -- UFFD_EVENT_REMOVE: madvise discarding guarded memory.
 *
 * The kernel zaps discarded pages, which drops their write-protection.
 * handle_remove logs a KIND_DISCARD record and marks the units;
 * reprotect_pending protects them again once the zap has passed (read
 * from /proc/self/pagemap).  Runs on the handler thread.
 */
#include "uffd.h"

/* madvise(MADV_DONTNEED / MADV_FREE / MADV_REMOVE) on a guarded range:
 * the kernel sends UFFD_EVENT_REMOVE and makes the caller wait until we
 * read it, then zaps the pages, which drops their write-protection.  Log
 * a KIND_DISCARD record in every armed guard the range overlaps (the
 * discarded bytes changed as surely as written ones), forget which of its
 * units were recorded, and mark them for re-protection once zapped.
 * Runs on the handler thread: H.lock only, no ioctl. */
void
handle_remove(const struct uffd_msg *msg)
{
    uint64_t start = msg->arg.remove.start, end = msg->arg.remove.end;
    uint64_t now = monotonic_ns();
    pthread_mutex_lock(&H.lock);
    H.discards++;
    atomic_store(&reprotect_waiting, 1);
    for (size_t i = 0; i < H.nguards; i++) {
        struct guard *g = &H.guards[i];
        if (g->end <= start || g->start >= end || !g->armed)
            continue;
        uint64_t s = start > g->start ? start : g->start;
        uint64_t e = end < g->end ? end : g->end;
        struct fault_record r = {
            .address = s,
            .time_ns = now,
            .seq = ++H.faults,
            .syscall = SYSCALL_UNKNOWN,
            .attr = ATTR_OFF,
            .kind = KIND_DISCARD,
            .length = e - s,
        };
        if (g->count < g->capacity)
            g->log[g->count++] = r;
        else
            g->overflow++;
        clear_recorded_locked(g, s, e);
        for (uint64_t a = s & ~(g->unit - 1); a < e; a += g->unit) {
            size_t k = (size_t)((a - g->start) / g->unit);
            if (!bit_test(g->pending, k)) {
                bit_set(g->pending, k);
                g->npending++;
            }
        }
        g->reprotect_deadline = now + REPROTECT_WAIT_NS;
        B.reprotect = 1;
    }
    pthread_mutex_unlock(&H.lock);
}

/* One pagemap entry per base page for [start, start + n pages), into out.
 * Returns 0, or -1 when pagemap cannot be read (then nothing is known). */
int
pagemap_read(uint64_t start, uint64_t *out, size_t n)
{
    if (H.pagemap < 0)
        return -1;
    off_t off = (off_t)(start / H.page * sizeof(uint64_t));
    ssize_t got = pread(H.pagemap, out, n * sizeof *out, off);
    return got == (ssize_t)(n * sizeof *out) ? 0 : -1;
}

/* Re-protect the units madvise discarded (handle_remove).  The event
 * arrives BEFORE the zap (the caller waits only until we read it), so
 * protecting at once could be undone by the zap.  A unit is re-protected
 * once /proc/self/pagemap shows it not present: the zap has passed it (a
 * zapped anonymous pte is none; a never-populated unit keeps its uffd-wp
 * marker through the zap), or once the guard's deadline has passed
 * (MADV_FREE keeps the pages).  Without WP_UNPOPULATED protecting a none
 * pte does nothing, so a write-protected zero page is put there instead
 * (UFFDIO_COPY_MODE_WP).  Then the unit counts as never recorded.
 * Leaves B.reprotect set while units still wait.  Runs on the handler thread; takes
 * H.reg_lock only if free (a Python caller holding it may be waiting for
 * us to read an event: try again next tick). */
void
reprotect_pending(void)
{
    if (pthread_mutex_trylock(&H.reg_lock) != 0)
        return;
    /* handle_remove (called from pump during this pass) sets it again. */
    B.reprotect = 0;
    int more = 0;
    uint64_t now = monotonic_ns();
    for (size_t i = 0; i < H.nguards; i++) {
        struct guard *g = &H.guards[i];
        if (!g->npending)
            continue;
        /* guard_protect holds reg_lock: `armed` is stable here. */
        pthread_mutex_lock(&H.lock);
        int armed = g->armed;
        pthread_mutex_unlock(&H.lock);
        int late = now >= g->reprotect_deadline;
        size_t units = (size_t)((g->end - g->start) / g->unit);
        uint64_t entries[512];
        for (size_t k0 = 0; k0 < units && g->npending; k0 += 512) {
            size_t n = units - k0 < 512 ? units - k0 : 512;
            int any = 0;
            for (size_t k = k0; k < k0 + n && !any; k++)
                any = bit_test(g->pending, k);
            if (!any)
                continue;
            int known = armed && pagemap_read(g->start + k0 * g->unit, entries, n) == 0;
            for (size_t k = k0; k < k0 + n; k++) {
                if (!bit_test(g->pending, k))
                    continue;
                uint64_t a = g->start + k * g->unit;
                uint64_t e = known ? entries[k - k0] : PM_PRESENT;
                if (armed) {
                    /* Present, or a uffd-wp marker (a swap-type pte): not
                     * zapped yet.  A zapped anonymous pte is none. */
                    if ((e & (PM_PRESENT | PM_SWAP)) && !late) {
                        more = 1;
                        continue;
                    }
                    int rc = -EEXIST;
                    if (!(e & PM_PRESENT) && !(H.features & UFFD_FEATURE_WP_UNPOPULATED)) {
                        for (int attempt = 0; attempt < 10000; attempt++) {
                            rc = uffd_copy_zero_wp(H.uffd, a, g->unit, H.zero_page);
                            if (rc != -EAGAIN)
                                break;
                            pump();
                            sched_yield();
                        }
                    }
                    if (rc == -EEXIST)
                        rc = handler_writeprotect(a, g->unit, 1);
                    pthread_mutex_lock(&H.lock);
                    if (rc < 0 && rc != -ENOENT) {
                        H.errors++;
                        warn_locked("re-protecting a discarded page failed", a, -rc);
                    }
                    clear_recorded_locked(g, a, a + g->unit);
                    pthread_mutex_unlock(&H.lock);
                }
                bit_clear(g->pending, k);
                g->npending--;
            }
        }
    }
    pthread_mutex_unlock(&H.reg_lock);
    if (more)
        B.reprotect = 1;
}
