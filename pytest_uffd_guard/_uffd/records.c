/*
 * records.c -- the guards' logs: finding the guard of an address, storing
 * a record, deciding what becomes of a write fault (classify_fault_locked:
 * one record per unit per arming, whether to name its writer), and the
 * re-arm checks that keep a record with the arming it belongs to.  Called on the handler thread, and by table.c; the _locked
 * functions want H.lock held by the caller.
 */
#include "uffd.h"

/* Index of the guard containing addr, or -1.  Caller holds H.lock. */
long
find_guard(uint64_t addr)
{
    size_t lo = 0, hi = H.nguards;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (addr < H.guards[mid].start)
            hi = mid;
        else if (addr >= H.guards[mid].end)
            lo = mid + 1;
        else
            return (long)mid;
    }
    return -1;
}

/* Index of the guard with this id, or -1.  Caller holds H.lock. */
long
guard_index(uint64_t id)
{
    for (size_t i = 0; i < H.nguards; i++)
        if (H.guards[i].id == id)
            return (long)i;
    return -1;
}

/* Forget which units of [start, end) of g were recorded: the next fault on
 * each is a first write again.  Caller holds H.lock. */
void
clear_recorded_locked(struct guard *g, uint64_t start, uint64_t end)
{
    if (!g->recorded)
        return;
    if (start < g->start)
        start = g->start;
    if (end > g->end)
        end = g->end;
    for (uint64_t a = start & ~(g->unit - 1); a < end; a += g->unit)
        bit_clear(g->recorded, (size_t)((a - g->start) / g->unit));
}

/* Store record r in the guard that contains r->address, if that guard is
 * still there.  Caller holds H.lock. */
void
store_record_locked(const struct fault_record *r)
{
    long i = find_guard(r->address);
    if (i < 0)
        return;
    struct guard *g = &H.guards[i];
    if (g->count < g->capacity)
        g->log[g->count++] = *r;
    else
        g->overflow++;
    /* After storing: a watcher told the budget is spent finds the record
     * when it drains (budget.c). */
    budget_spend_locked(g);
}

/* protect() may re-arm a guard while the handler is resolving one of its
 * faults: after the record was stored (it then went with the old arming,
 * which protect() drains and drops) and before the page is un-protected.
 * Un-protecting would leave the page writable in the new arming with no
 * record there, and the writer's store, or any later one, unseen.  So:
 *   - re-armed before the un-protect: only wake the writer; the page is
 *     protected again, so its store faults anew and is recorded (exactly)
 *     in the new arming;
 *   - re-armed after the check: file the record again in the new arming
 *     unless that page already has one there, or is protected again (the
 *     re-arming came after the un-protect: typically the writer itself,
 *     woken by it, called protect(); its next store faults and is
 *     recorded as itself, issue 9 item 8).  At worst the copy stands for
 *     a store that landed before the new snapshot: a record without a
 *     change, never a change without a record.
 * rearmed() answers for the guard that holds r; caller holds H.lock. */
static struct guard *
rearmed_locked(uint64_t addr, uint64_t id, uint64_t arming)
{
    long i = find_guard(addr);
    if (i < 0 || H.guards[i].id != id || H.guards[i].armings == arming)
        return NULL;
    return &H.guards[i];
}

int
rearmed(uint64_t addr, uint64_t id, uint64_t arming)
{
    pthread_mutex_lock(&H.lock);
    int yes = rearmed_locked(addr, id, arming) != NULL;
    pthread_mutex_unlock(&H.lock);
    return yes;
}

/* 1 when the guard holding addr is still the one with id owner (or, for
 * owner 0, there is still none).  Takes H.lock. */
int
owner_unchanged(uint64_t addr, uint64_t owner)
{
    pthread_mutex_lock(&H.lock);
    long i = find_guard(addr);
    uint64_t now = i >= 0 ? H.guards[i].id : 0;
    pthread_mutex_unlock(&H.lock);
    return now == owner;
}

/* Runs on the handler thread, after the un-protect. */
void
record_again_if_rearmed(const struct fault_record *r, uint64_t id, uint64_t arming)
{
    if (!rearmed(r->address, id, arming))
        return;
    /* Protected since our un-protect (pagemap's uffd-wp bit, Linux 5.13+;
     * read without H.lock): no copy.  Unknown: copy, as before. */
    uint64_t e;
    if (pagemap_read(r->address & ~(H.page - 1), &e, 1) == 0 && (e & PM_UFFD_WP))
        return;
    pthread_mutex_lock(&H.lock);
    struct guard *g = rearmed_locked(r->address, id, arming);
    if (g != NULL) {
        size_t k = (size_t)(((r->address & ~(g->unit - 1)) - g->start) / g->unit);
        if (!g->recorded || !bit_test(g->recorded, k)) {
            if (g->recorded)
                bit_set(g->recorded, k);
            size_t before = g->count;
            store_record_locked(r);
            if (g->count > before && r->attr == ATTR_SIGNALLED)
                A.copies++;
        }
    }
    pthread_mutex_unlock(&H.lock);
}

/* Change the attr of the record with this seq, if it is still in a log.
 * Caller holds H.lock. */
void
set_record_attr_locked(uint64_t addr, uint64_t seq, uint32_t attr)
{
    long i = find_guard(addr);
    if (i < 0)
        return;
    struct guard *g = &H.guards[i];
    for (size_t k = g->count; k-- > 0;)
        if (g->log[k].seq == seq) {
            g->log[k].attr = attr;
            return;
        }
}

/* The thread we signalled faulted again on the same page: the signal woke
 * it before the page was resolved (or, in a system call, the kernel
 * retried).  One write, one record. */
static int
refault_of_capture(const struct fault_record *r, uint64_t page)
{
    uint64_t token = atomic_load(&A.token);
    return token != 0 && atomic_load(&A.done) != token
           && (uint32_t)atomic_load(&A.tid) == r->tid && A.page == page;
}

/* Whether to name the writer of this first write of guard g; when not,
 * r->attr says why.  The decisions are Python's parameters: the budget
 * (guard_add's stacks, guard_set_stacks) and the switch
 * (attribution_enable); what is left here is mechanism: no thread id, no
 * naming; no room for the record, no capture spent on it.
 * Caller holds H.lock. */
static int
wants_capture_locked(struct guard *g, struct fault_record *r)
{
    if (!A.enabled) {
        r->attr = ATTR_OFF;
        return 0;
    }
    if (g->stacks_left == 0) {
        r->attr = g->stacks ? ATTR_BOUND : ATTR_OFF;
        return 0;
    }
    if (r->tid == 0) {
        r->attr = ATTR_NO_TID;
        return 0;
    }
    if (g->count >= g->capacity)
        return 0;
    g->stacks_left--;
    return 1;
}

/* Number the fault, find its guard and decide whether it is recorded and
 * its writer named.  Caller holds H.lock. */
void
classify_fault_locked(struct fault *f)
{
    f->r.seq = ++H.faults;
    f->r.time_ns = monotonic_ns();
    long i = find_guard(f->r.address);
    if (i < 0) {
        H.unmatched++;
        warn_locked("a write fault outside every guarded range", f->r.address, 0);
        f->record = 0;
        return;
    }
    struct guard *g = &H.guards[i];
    f->owner = g->id;
    f->unit = g->unit;
    uint64_t page = f->r.address & ~(f->unit - 1);
    size_t unit_index = (size_t)((page - g->start) / f->unit);
    f->record = 1;
    if (refault_of_capture(&f->r, page)) {
        f->record = 0;
    } else if (g->recorded && bit_test(g->recorded, unit_index)) {
        /* Another thread blocked on a page already recorded since it
         * was protected: one record per page per arming. */
        g->duplicates++;
        f->record = 0;
    } else {
        f->capture = wants_capture_locked(g, &f->r);
    }
    if (f->record && g->recorded)
        bit_set(g->recorded, unit_index);
    /* The budget is spent by store_record_locked, once the record is in
     * the log. */
}
