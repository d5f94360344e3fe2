/* Network softirq latency and run time, by the role of the task they ran on (spec: softirq.json).
 *
 * irq:softirq_raise marks a vector pending on this CPU (from a NIC's hard interrupt, or from netif_rx
 * on loopback); the vector runs on the same CPU (irq exit, local_bh_enable or ksoftirqd), so per-CPU
 * slots need no lock. Latency: first raise -> softirq_entry (the tail is ksoftirqd being starved); run
 * time: softirq_entry -> softirq_exit. Only NET_RX and NET_TX are kept (their numbers from the
 * tracepoint's print format: -DSOFTIRQ_NET_RX, -DSOFTIRQ_NET_TX); every other vector returns after one
 * compare. role: the bookcast role of the task the softirq ran on top of (a loopback sender runs the
 * receive side itself), else ROLE_HOST: the host-wide figure an SRE compares against.
 * Raw tracepoints (args: (vec_nr)): softirq_raise fires for every vector on every CPU, timers included,
 * and a raw probe returns after one compare without the perf record a classic probe builds per hit.
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

struct vec_key {
    u32 role;
    u32 vec;
};

/* per CPU, per kept vector (VEC_NET_TX, VEC_NET_RX): ns it was first raised / started running */
BPF_PERCPU_ARRAY(raised_ns, u64, 2);
BPF_PERCPU_ARRAY(entered_ns, u64, 2);
BPF_HASH(softirq_latency, struct vec_key, struct hist, MAX_SERIES);
BPF_HASH(softirq_run, struct vec_key, struct hist, MAX_SERIES);

static __always_inline int kept(u32 vec)
{
    if (vec == SOFTIRQ_NET_RX)
        return VEC_NET_RX;
    if (vec == SOFTIRQ_NET_TX)
        return VEC_NET_TX;
    return -1;
}

static __always_inline u32 role_now(void)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = role_of(tgid);
    return role ? *role : ROLE_HOST;
}

RAW_TRACEPOINT_PROBE(softirq_raise)     /* raw: (vec_nr) */
{
    int i = kept(ctx->args[0]);
    if (i < 0)
        return 0;
    u32 idx = i;
    u64 *at = raised_ns.lookup(&idx);
    if (at && !*at)
        *at = bpf_ktime_get_ns();
    return 0;
}

RAW_TRACEPOINT_PROBE(softirq_entry)
{
    int i = kept(ctx->args[0]);
    if (i < 0)
        return 0;
    u32 idx = i;
    u64 now = bpf_ktime_get_ns();
    u64 *entered = entered_ns.lookup(&idx);
    if (entered)
        *entered = now;
    u64 *at = raised_ns.lookup(&idx);
    if (!at || !*at)
        return 0;
    u64 ns = now - *at;
    *at = 0;
    struct vec_key key = {.role = role_now(), .vec = idx};
    struct hist zero = {};
    struct hist *h = softirq_latency.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ns / 1000, ns);
    return 0;
}

RAW_TRACEPOINT_PROBE(softirq_exit)
{
    int i = kept(ctx->args[0]);
    if (i < 0)
        return 0;
    u32 idx = i;
    u64 *entered = entered_ns.lookup(&idx);
    if (!entered || !*entered)
        return 0;
    u64 ns = bpf_ktime_get_ns() - *entered;
    *entered = 0;
    struct vec_key key = {.role = role_now(), .vec = idx};
    struct hist zero = {};
    struct hist *h = softirq_run.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ns / 1000, ns);
    return 0;
}
