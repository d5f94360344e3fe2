/* Per-syscall latency of bookcast's processes, by role and syscall (spec: syscalls.json).
 *
 * raw_syscalls:sys_enter/sys_exit as raw tracepoints: one pair covers any configured syscall list with
 * two attachments and skips copying six arguments into a trace record. Once any syscall tracepoint is
 * attached the kernel sends every syscall of every task through its slow path, so what matters for the
 * processes we do not trace is how fast each probe says "not ours". raw args: sys_enter (regs, id),
 * sys_exit (regs, ret); the start record (time, role, syscall number) of a traced thread lives in
 * task-local storage (BTF, kernel >= 5.11), freed with the thread.
 *
 * The exit probe cannot filter by syscall number (only regs, a kernel struct, holds it), so it must
 * recognise its own threads. SYSCALL_EXIT_FILTER (spec parameter) picks how:
 *   0  bpf_task_storage_get on every syscall exit of every task (returns NULL for other tasks);
 *   1  first a bit per thread id (pid) in an array (PID_WORDS u64 words, 512 KiB for the 2^22 pid
 *      limit), set at a traced entry and cleared at its exit: one inlined array load for everyone else,
 *      the task storage only for our threads. Stale bits (a thread killed inside a syscall) only cost a
 *      task-storage miss for the next thread given that pid; counts stay exact.
 * Before either test, "is this process ours" is a bit per tgid (bookcast.h), so a listed syscall of
 * another process costs no more than an unlisted one.
 * Measured (python -m ebpf.bench --parts variants --rounds 12, untraced process, this 2-core VM shared
 * with other engineers' tests, detached write(2) ~350 ns; mean [95% interval] against the same run's
 * detached windows, run 20261201-103218):
 *   raw pair, SYSCALL_EXIT_FILTER=0   write +252 [+242, +262] ns, lseek +243 [+232, +254] ns
 *   raw pair, SYSCALL_EXIT_FILTER=1   write +248 [+239, +257] ns, lseek +235 [+225, +246] ns
 *   (an earlier run with 16 rounds, before the tgid bit: write +300 [+291, +307] vs +280 [+278, +282])
 * So 1 is the default: never worse, and it does strictly less for other tasks. A pair of empty raw probes,
 * timed the same way, costs +174 ns: the kernel's syscall slow path plus two probe calls is the floor of
 * any raw syscall probe on this VM, above the 100 ns target. Per-syscall tracepoints (syscalls:sys_enter_<name>,
 * SYSCALL_ATTACH_PER_SYSCALL=1) run no program for unlisted syscalls but build a perf record for listed
 * ones: default list, write +478 [+415, +545] ns, lseek +94 [+57, +134] ns; for sendto,recvfrom only,
 * write +135 [+105, +169] ns, lseek +139 [+113, +169] ns. The loader therefore attaches per syscall for
 * lists of at most two (ebpf/loader.py PER_SYSCALL_MAX), and the raw pair otherwise: every process calls
 * read/write/epoll_wait, so a list naming them must not pay a perf record per call host-wide.
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

struct syscall_key {
    u32 role;
    u32 syscall;
};

struct in_flight {
    u64 start_ns;
    u32 role;
    u32 syscall;
};

/* per thread: the syscall it is inside (start_ns 0 = none) */
BPF_TASK_STORAGE(syscall_start, struct in_flight);
BPF_HASH(syscall_latency, struct syscall_key, struct hist, MAX_SERIES);
#if SYSCALL_EXIT_FILTER
/* bit (pid % 64) of word (pid / 64): that thread is inside a traced syscall */
BPF_ARRAY(in_syscall, u64, PID_WORDS);
#endif

static __always_inline int enter(u32 nr)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 *role = role_of(tgid);
    if (!role)
        return 0;
#if SYSCALL_EXIT_FILTER
    u32 pid = id, word = pid / 64;
    u64 *bits = in_syscall.lookup(&word);
    if (!bits)
        return 0;
#endif
    struct in_flight *f = syscall_start.task_storage_get(bpf_get_current_task_btf(), 0,
                                                         BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!f)
        return 0;
    f->role = *role;
    f->syscall = nr;
    f->start_ns = bpf_ktime_get_ns();
#if SYSCALL_EXIT_FILTER
    __sync_fetch_and_or(bits, 1ULL << (pid % 64));
#endif
    return 0;
}

static __always_inline int leave(void)
{
#if SYSCALL_EXIT_FILTER
    u32 pid = bpf_get_current_pid_tgid(), word = pid / 64;
    u64 *bits = in_syscall.lookup(&word);
    u64 bit = 1ULL << (pid % 64);
    if (!bits || !(*bits & bit))
        return 0;
    __sync_fetch_and_and(bits, ~bit);
#endif
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

#if !SYSCALL_ATTACH_PER_SYSCALL
/* syscall number -> 1 if traced; written by user space from --syscalls */
BPF_ARRAY(traced_syscalls, u8, NR_SYSCALLS);

RAW_TRACEPOINT_PROBE(sys_enter)
{
    u32 nr = ctx->args[1];
    u8 *traced = traced_syscalls.lookup(&nr);
    if (!traced || !*traced)
        return 0;
    return enter(nr);
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    return leave();
}
#else
/* the benchmark's alternative: one tracepoint pair per listed syscall (-DTRACE_<NAME>=1) */
#include <linux/signal.h>  /* sigset_t in epoll_pwait's record */
#define TRACE_SYSCALL(name) \
    TRACEPOINT_PROBE(syscalls, sys_enter_##name) { return enter(args->__syscall_nr); } \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return leave(); }
#if defined(TRACE_SENDTO) && TRACE_SENDTO
TRACE_SYSCALL(sendto)
#endif
#if defined(TRACE_SENDMSG) && TRACE_SENDMSG
TRACE_SYSCALL(sendmsg)
#endif
#if defined(TRACE_WRITE) && TRACE_WRITE
TRACE_SYSCALL(write)
#endif
#if defined(TRACE_WRITEV) && TRACE_WRITEV
TRACE_SYSCALL(writev)
#endif
#if defined(TRACE_RECVFROM) && TRACE_RECVFROM
TRACE_SYSCALL(recvfrom)
#endif
#if defined(TRACE_RECVMSG) && TRACE_RECVMSG
TRACE_SYSCALL(recvmsg)
#endif
#if defined(TRACE_READ) && TRACE_READ
TRACE_SYSCALL(read)
#endif
#if defined(TRACE_EPOLL_WAIT) && TRACE_EPOLL_WAIT
TRACE_SYSCALL(epoll_wait)
#endif
#if defined(TRACE_EPOLL_PWAIT) && TRACE_EPOLL_PWAIT
TRACE_SYSCALL(epoll_pwait)
#endif
#endif
