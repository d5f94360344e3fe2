/* Network-stack latency: a packet's arrival to the read by bookcast's process (spec: netstack.json).
 *
 * Like ebpf_exporter's netstacklat, but from tracepoint arguments only (no skb fields, so no kernel
 * struct layout): net:netif_receive_skb records when each skb (by address) entered the stack, on every
 * CPU, for every packet (loopback ones too, through the backlog queue); skb:skb_copy_datagram_iovec,
 * run in the reader's context by tcp_recvmsg (TCP: the gateway, NATS and the ingest's venue links; UDP
 * copies a linear skb with copy_linear_skb, which has no tracepoint), takes the arrival time of
 * the skb being copied when the reader is ours; sock:sock_recv_length, at the end of that same recvmsg,
 * observes read time - the oldest arrival copied, for AF_INET and AF_INET6 sockets only (a unix socket's
 * skb never passed netif_receive_skb; an address reused by one is discarded there). An skb TCP coalesced
 * into an earlier one reports the earlier arrival: the figure is how long the oldest byte read waited.
 * Cost on other processes: one LRU hash update per received packet (netif_receive_skb); the copy and
 * read probes return after one hash lookup for readers that are not ours. The two per-packet probes are
 * raw tracepoints (no perf record per hit); the read probe stays a classic one because it needs the
 * socket's family, which only the trace record carries without reading struct sock.
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

#define BOOKCAST_AF_INET 2
#define BOOKCAST_AF_INET6 10

struct role_key {
    u32 role;
};

/* skb address -> ns it reached netif_receive_skb; evicted when nobody of ours reads it */
BPF_TABLE("lru_hash", u64, u64, arrived_ns, MAX_PACKETS);
/* thread of ours inside a recvmsg -> oldest arrival among the skbs it copied so far */
BPF_HASH(reading_since, u32, u64, MAX_THREADS);
BPF_HASH(netstack_latency, struct role_key, struct hist, MAX_SERIES);

RAW_TRACEPOINT_PROBE(netif_receive_skb)         /* raw: (skb) */
{
    u64 skb = ctx->args[0];
    u64 now = bpf_ktime_get_ns();
    arrived_ns.update(&skb, &now);
    return 0;
}

RAW_TRACEPOINT_PROBE(skb_copy_datagram_iovec)   /* raw: (skb, len) */
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, pid = id;
    if (!role_of(tgid))
        return 0;
    u64 skb = ctx->args[0];
    u64 *at = arrived_ns.lookup(&skb);
    if (!at)
        return 0;
    u64 since = *at;
    arrived_ns.delete(&skb);
    u64 *oldest = reading_since.lookup(&pid);
    if (!oldest || since < *oldest)
        reading_since.update(&pid, &since);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, pid = id;
    u32 *role = role_of(tgid);
    if (!role)
        return 0;
    u64 *since = reading_since.lookup(&pid);
    if (!since)
        return 0;
    u64 start = *since;
    reading_since.delete(&pid);
    if (args->ret <= 0 || (args->family != BOOKCAST_AF_INET && args->family != BOOKCAST_AF_INET6))
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now < start)
        return 0;
    u64 ns = now - start;
    struct role_key key = {.role = *role};
    struct hist zero = {};
    struct hist *h = netstack_latency.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, ns / 1000, ns);
    return 0;
}
