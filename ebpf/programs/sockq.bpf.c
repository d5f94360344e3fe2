/* Socket queueing and send sizes of bookcast's processes (spec: sockq.json).
 *
 * Queueing: from sock:sk_data_ready (data became readable; softirq, or the sender's context on
 * loopback) to the owner's next successful read (sock:sock_recv_length, run in the reader's context by
 * sock_recvmsg for recv*, read and readv alike). The oldest unread arrival is kept, so the figure is how
 * long the first waiting byte waited. sk_data_ready cannot tell the owner, so a socket is learnt as ours
 * at its first read by a traced process and measured from then on (that first read is not counted).
 * Send sizes: sock:sock_send_length's return value in the sender's context (MSG_PEEK reads skipped).
 * Either pair is compiled only when the tracepoints exist (HAVE_* from the spec).
 * Raw tracepoints (args are the TP_PROTO: sk_data_ready(sk), sock_{send,recv}_length(sk, ret, flags)):
 * they fire on every socket operation of every process, and a raw probe skips building the perf trace
 * record a classic tracepoint probe pays for on each hit (python -m ebpf.bench: the TCP round trip).
 */
#include <linux/socket.h>  /* MSG_PEEK */
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

#if HAVE_SK_DATA_READY && HAVE_SOCK_RECV_LENGTH
/* socket address -> role of the process reading it */
BPF_TABLE("lru_hash", u64, u32, our_sockets, MAX_SOCKETS);
/* socket address -> ns its oldest unread data became readable */
BPF_TABLE("lru_hash", u64, u64, readable_since, MAX_SOCKETS);
BPF_HASH(socket_queue_latency, struct role_key, struct hist, MAX_SERIES);

RAW_TRACEPOINT_PROBE(sk_data_ready)
{
    u64 sk = ctx->args[0];
    if (!our_sockets.lookup(&sk))
        return 0;
    u64 now = bpf_ktime_get_ns();
    readable_since.insert(&sk, &now);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    int ret = ctx->args[1], flags = ctx->args[2];
    if (ret <= 0 || (flags & MSG_PEEK))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = role_of(tgid);
    if (!role)
        return 0;
    u64 sk = ctx->args[0];
    u64 *since = readable_since.lookup(&sk);
    if (!since) {
        if (!our_sockets.lookup(&sk))
            our_sockets.update(&sk, role);
        return 0;
    }
    u64 ns = bpf_ktime_get_ns() - *since;
    readable_since.delete(&sk);
    struct role_key key = {.role = *role};
    struct hist zero = {};
    struct hist *h = socket_queue_latency.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ns / 1000, ns);
    return 0;
}
#endif

#if HAVE_SOCK_SEND_LENGTH
BPF_HASH(socket_send_size, struct role_key, struct hist, MAX_SERIES);

RAW_TRACEPOINT_PROBE(sock_send_length)
{
    int ret = ctx->args[1];
    if (ret <= 0)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 *role = role_of(tgid);
    if (!role)
        return 0;
    struct role_key key = {.role = *role};
    struct hist zero = {};
    struct hist *h = socket_send_size.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ret, ret);
    return 0;
}
#endif
