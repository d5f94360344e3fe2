/* Run-queue latency and off-CPU time by state for bookcast's processes (spec: sched.json).
 *
 * sched_switch runs in the context of the task leaving the CPU (prev), so its tgid says whether it is
 * ours; the thread is then remembered in `tasks`, which is how sched_wakeup (which carries only the
 * woken thread's pid, not its tgid) finds it later. A thread created by one of ours (sched_wakeup_new,
 * run by the parent) inherits the parent's role. prev_state follows the tracepoint's print format:
 * bits 0x01 S, 0x02 D, ...; low byte 0 means runnable (0x100 marks a preemption).
 * Run-queue latency: from wakeup, or from a switch-out while still runnable, to the next switch-in.
 * Off-CPU time: from switch-out to the next switch-in, labelled with the state the thread left in.
 * Every wakeup and context switch on the host runs these probes, so the question "is the thread
 * being woken / switched in one of ours?" is answered first by a bit per thread id (one inlined array
 * load, as in syscalls.bpf.c), set while the thread has an entry in `tasks`; only then the LRU hash.
 */
#include "bookcast.h"

/* the bit first, the hash only for our processes (see bookcast.h) */
static __always_inline int is_ours(u32 tgid)
{
    u32 word = tgid / 64;
    u64 *bits = our_tgids.lookup(&word);
    return bits && ((*bits >> (tgid % 64)) & 1);
}

static __always_inline u32 *role_of(u32 tgid)
{
    if (!is_ours(tgid))
        return 0;
    return roles.lookup(&tgid);
}

struct role_key {
    u32 role;
};

struct offcpu_key {
    u32 role;
    u32 state;
};

/* a thread of ours while it is off CPU: created at switch-out (or wakeup_new), deleted at switch-in */
struct task {
    u64 off_ns;      /* switched out at; 0 = new thread, not seen leaving */
    u64 queued_ns;   /* runnable since; 0 = not waiting for a CPU */
    u32 role;
    u32 state;
};

BPF_TABLE("lru_hash", u32, struct task, tasks, MAX_THREADS);
/* bit (pid % 64) of word (pid / 64): that thread may have an entry in `tasks` */
BPF_ARRAY(in_tasks, u64, PID_WORDS);

static __always_inline u64 *task_word(u32 pid)
{
    u32 word = pid / 64;
    return in_tasks.lookup(&word);
}

static __always_inline int maybe_ours(u32 pid)
{
    u64 *bits = task_word(pid);
    return bits && (*bits & (1ULL << (pid % 64)));
}

static __always_inline void mark(u32 pid, int on)
{
    u64 *bits = task_word(pid);
    if (!bits)
        return;
    if (on)
        __sync_fetch_and_or(bits, 1ULL << (pid % 64));
    else
        __sync_fetch_and_and(bits, ~(1ULL << (pid % 64)));
}
BPF_HASH(runqueue_latency, struct role_key, struct hist, MAX_SERIES);
BPF_HASH(offcpu_time, struct offcpu_key, struct hist, MAX_SERIES);

static __always_inline u32 state_of(long prev_state)
{
    if ((prev_state & 0xff) == 0)
        return STATE_RUNNABLE;
    if (prev_state & 0x01)
        return STATE_INTERRUPTIBLE;
    if (prev_state & 0x02)
        return STATE_UNINTERRUPTIBLE;
    return STATE_OTHER;
}

static __always_inline void queued(u32 pid, u64 now)
{
    if (!maybe_ours(pid))
        return;
    struct task *t = tasks.lookup(&pid);
    if (t && !t->queued_ns)
        t->queued_ns = now;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    queued(args->pid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = role_of(tgid);
    if (!role)
        return 0;
    u32 pid = args->pid;
    struct task t = {.queued_ns = bpf_ktime_get_ns(), .role = *role};
    tasks.update(&pid, &t);
    mark(pid, 1);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev = args->prev_pid, next = args->next_pid;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = prev ? role_of(tgid) : 0;
    if (role) {
        u32 state = state_of(args->prev_state);
        struct task t = {.off_ns = now, .queued_ns = state == STATE_RUNNABLE ? now : 0, .role = *role,
                         .state = state};
        tasks.update(&prev, &t);
        mark(prev, 1);
    }
    if (!maybe_ours(next))
        return 0;
    struct task *t = tasks.lookup(&next);
    if (!t) {
        mark(next, 0);     /* evicted by the LRU */
        return 0;
    }
    if (t->off_ns) {
        struct offcpu_key key = {.role = t->role, .state = t->state};
        u64 ns = now - t->off_ns;
        struct hist zero = {};
        struct hist *h = offcpu_time.lookup_or_try_init(&key, &zero);
        if (h)
            hist_add(h, ns / 1000, ns);
    }
    if (t->queued_ns) {
        struct role_key key = {.role = t->role};
        u64 ns = now - t->queued_ns;
        struct hist zero = {};
        struct hist *h = runqueue_latency.lookup_or_try_init(&key, &zero);
        if (h)
            hist_add(h, ns / 1000, ns);
    }
    tasks.delete(&next);   /* re-created at its next switch-out, and only while its process is ours */
    mark(next, 0);
    return 0;
}
