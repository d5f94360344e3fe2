/* Accept-queue (listen backlog) length and overflows on bookcast's listening ports (spec: listenq.json).
 *
 * Tracepoint arguments only. A connection joins a listener's accept queue when its child socket goes
 * TCP_SYN_RECV -> TCP_ESTABLISHED (sock:inet_sock_set_state, softirq; sport is the listening port); the
 * child's address is remembered. It has left the queue (been accepted) by the first time its owner reads
 * or sends on it (sock:sock_recv_length / sock_send_length, any result) or closes it (ESTABLISHED ->
 * FIN_WAIT1, CLOSE_WAIT -> LAST_ACK): no socket is read, written or closed by a process before accept()
 * returned it. The accept syscalls themselves are not traced, on purpose: a syscall tracepoint sends every
 * syscall of every process on the host through the kernel's slow path (see syscalls.bpf.c), where these
 * socket tracepoints cost only socket operations one hash lookup. A server that accepts and then waits
 * before its first read shows that wait as queue length (for the gateway, which reads the HTTP upgrade
 * at once, the two agree). Per port: length = offset + enqueued - dequeued, where user space re-anchors
 * `offset` from the exact queue length in /proc/net/tcp (rx_queue of the LISTEN sockets) at every
 * refresh, so nothing drifts. Each arrival observes the length it found, itself included.
 * Overflows: skb:kfree_skb with reason TCP_LISTEN_OVERFLOW (the final ACK found the queue full; its value
 * from the tracepoint's print format, -DREASON_TCP_LISTEN_OVERFLOW) whose rx_sk is one of our listeners;
 * a listener's address is learnt at its sk_data_ready right after an enqueue on the same CPU (the kernel
 * wakes the listener in the softirq that queued the child) or from tcp:tcp_retransmit_synack. The final
 * ACK finds the queue full when the handshake completed while the queue filled up (several CPUs, or
 * TCP_DEFER_ACCEPT, whose child is created only when the first data arrives: the test's case). A SYN that
 * finds the queue full is consumed without a drop reason (consume_skb): no tracepoint tells it apart, so
 * those refusals show only as the length sitting at bookcast_ebpf_accept_queue_limit.
 */
#include "bookcast.h"

#define BOOKCAST_IPPROTO_TCP 6
#define BOOKCAST_TCP_ESTABLISHED 1
#define BOOKCAST_TCP_SYN_RECV 3
#define BOOKCAST_TCP_FIN_WAIT1 4
#define BOOKCAST_TCP_CLOSE_WAIT 8
#define BOOKCAST_TCP_LAST_ACK 9

/* headers older than the kernel may not define it; the tracepoint record only needs its size (int) */
enum skb_drop_reason { BOOKCAST_SKB_DROP_REASON_UNKNOWN = 0 };

struct port_key {
    u32 role;
    u32 port;
};

struct accept_queue {
    u64 enqueued;
    u64 dequeued;
    s64 offset;      /* written by user space: exact length - (enqueued - dequeued) at its last look */
    u32 role;
    u32 port;
};

/* port -> counters; created by user space with role and offset */
BPF_HASH(accept_queue, u16, struct accept_queue, MAX_PORTS);
BPF_HASH(accept_queue_length, struct port_key, struct hist, MAX_SERIES);
BPF_HASH(accept_queue_overflows, struct port_key, u64, MAX_SERIES);
/* listener socket address -> port, learnt in the kernel */
BPF_TABLE("lru_hash", u64, u16, listeners, MAX_LISTENERS);
/* port whose child this CPU just queued, and how many sk_data_ready calls of that softirq may still be
 * the listener's: the child's own comes first when the final ACK carried data (TCP_DEFER_ACCEPT, fast
 * open), then the listener's; learning the child too is harmless (a child is never a drop's rx_sk) */
struct queued_on_cpu {
    u16 port;
    u16 left;
};
BPF_PERCPU_ARRAY(just_queued, struct queued_on_cpu, 1);
/* child socket address -> port, from its enqueue until its owner first uses it */
BPF_TABLE("lru_hash", u64, u16, queued_children, MAX_QUEUED);

static __always_inline void accepted(u64 sk)
{
    u16 *port = queued_children.lookup(&sk);
    if (!port)
        return;
    u16 p = *port;
    queued_children.delete(&sk);
    struct accept_queue *q = accept_queue.lookup(&p);
    if (q)
        __sync_fetch_and_add(&q->dequeued, 1);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != BOOKCAST_IPPROTO_TCP)
        return 0;
    if ((args->oldstate == BOOKCAST_TCP_ESTABLISHED && args->newstate == BOOKCAST_TCP_FIN_WAIT1) ||
        (args->oldstate == BOOKCAST_TCP_CLOSE_WAIT && args->newstate == BOOKCAST_TCP_LAST_ACK)) {
        accepted((u64)args->skaddr);    /* closed by its owner */
        return 0;
    }
    if (args->oldstate != BOOKCAST_TCP_SYN_RECV || args->newstate != BOOKCAST_TCP_ESTABLISHED)
        return 0;
    u16 port = args->sport;
    struct accept_queue *q = accept_queue.lookup(&port);
    if (!q)
        return 0;
    u64 child = (u64)args->skaddr;
    queued_children.update(&child, &port);
    __sync_fetch_and_add(&q->enqueued, 1);
    s64 length = q->offset + (s64)(q->enqueued - q->dequeued);
    if (length < 1)
        length = 1;
    struct port_key key = {.role = q->role, .port = port};
    struct hist zero = {};
    struct hist *h = accept_queue_length.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, length, length);
    u32 zero_idx = 0;
    struct queued_on_cpu *queued = just_queued.lookup(&zero_idx);
    if (queued) {
        queued->port = port;
        queued->left = 2;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sk_data_ready)     /* raw: (sk) */
{
    u32 zero_idx = 0;
    struct queued_on_cpu *queued = just_queued.lookup(&zero_idx);
    if (!queued || !queued->left)
        return 0;
    u64 sk = ctx->args[0];
    u16 port = queued->port;
    queued->left -= 1;
    listeners.update(&sk, &port);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack)
{
    u16 port = args->sport;
    if (!accept_queue.lookup(&port))
        return 0;
    u64 sk = (u64)args->skaddr;
    listeners.update(&sk, &port);
    return 0;
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    if ((int)args->reason != REASON_TCP_LISTEN_OVERFLOW)
        return 0;
    u64 sk = (u64)args->rx_sk;
    u16 *port = listeners.lookup(&sk);
    if (!port)
        return 0;
    u16 p = *port;
    struct accept_queue *q = accept_queue.lookup(&p);
    if (!q)
        return 0;
    struct port_key key = {.role = q->role, .port = p};
    u64 one = 1;
    u64 *n = accept_queue_overflows.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        accept_queue_overflows.insert(&key, &one);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_recv_length)  /* raw: (sk, ret, flags) */
{
    accepted(ctx->args[0]);
    return 0;
}

RAW_TRACEPOINT_PROBE(sock_send_length)  /* raw: (sk, ret, flags) */
{
    accepted(ctx->args[0]);
    return 0;
}
