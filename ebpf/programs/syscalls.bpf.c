/* Per-syscall latency of bookcast's processes, by role and syscall (spec: syscalls.json).
 *
 * raw_syscalls:sys_enter/sys_exit as raw tracepoints: the kernel runs its syscall hook on every syscall
 * whichever syscall tracepoint is enabled (syscalls:sys_enter_X filter by number inside that same hook),
 * so one raw pair costs no more per unrelated syscall, skips copying six arguments into a trace record,
 * and covers any configured syscall list with two attachments. raw args: sys_enter (regs, id),
 * sys_exit (regs, ret); the syscall number at exit comes from our own start record, kept in task-local
 * storage (BTF, kernel >= 5.11): no hash update and delete per syscall, nothing to look up at exit for
 * threads that are not ours, and freed with the thread.
 */
#include "bookcast.h"

struct syscall_key {
    u32 role;
    u32 syscall;
};

struct in_flight {
    u64 start_ns;
    u32 role;
    u32 syscall;
};

/* syscall number -> 1 if traced; written by user space from --syscalls */
BPF_ARRAY(traced_syscalls, u8, NR_SYSCALLS);
/* per thread: the syscall it is inside (start_ns 0 = none) */
BPF_TASK_STORAGE(syscall_start, struct in_flight);
BPF_HASH(syscall_latency, struct syscall_key, struct hist, MAX_SERIES);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 nr = ctx->args[1];
    u8 *traced = traced_syscalls.lookup(&nr);
    if (!traced || !*traced)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = roles.lookup(&tgid);
    if (!role)
        return 0;
    struct in_flight *f = syscall_start.task_storage_get(bpf_get_current_task_btf(), 0,
                                                         BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!f)
        return 0;
    f->role = *role;
    f->syscall = nr;
    f->start_ns = bpf_ktime_get_ns();
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    struct in_flight *f = syscall_start.task_storage_get(bpf_get_current_task_btf(), 0, 0);
    if (!f || !f->start_ns)
        return 0;
    u64 ns = bpf_ktime_get_ns() - f->start_ns;
    struct syscall_key key = {.role = f->role, .syscall = f->syscall};
    f->start_ns = 0;
    struct hist zero = {};
    struct hist *h = syscall_latency.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ns / 1000, ns);
    return 0;
}
