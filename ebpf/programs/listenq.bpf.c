/* Accept-queue (listen backlog) length and overflows on bookcast's listening ports (spec: listenq.json).
 *
 * Tracepoint arguments only. A connection joins a listener's accept queue when its child socket goes
 * TCP_SYN_RECV -> TCP_ESTABLISHED (sock:inet_sock_set_state, softirq; sport is the listening port), and
 * leaves it when a process of ours returns from accept()/accept4() on a listening fd of that port
 * (syscalls:sys_enter/exit_accept*; user space maps (tgid, fd) -> port from /proc). Per port:
 * length = offset + enqueued - dequeued, where user space re-anchors `offset` from the exact queue
 * length in /proc/net/tcp (rx_queue of the LISTEN sockets) at every refresh, so a missed accept (a worker
 * whose fd was not mapped yet) cannot drift it. Each arrival observes the length it found, itself included.
 * Overflows: skb:kfree_skb with reason TCP_LISTEN_OVERFLOW (the final ACK found the queue full; its value
 * from the tracepoint's print format, -DREASON_TCP_LISTEN_OVERFLOW) whose rx_sk is one of our listeners;
 * a listener's address is learnt at its sk_data_ready right after an enqueue on the same CPU (the kernel
 * wakes the listener in the softirq that queued the child) or from tcp:tcp_retransmit_synack. A SYN that
 * finds the queue full is consumed without a drop reason (consume_skb): no tracepoint tells it apart, so
 * those refusals show only as the length sitting at bookcast_ebpf_accept_queue_limit.
 */
#include "bookcast.h"

#define BOOKCAST_IPPROTO_TCP 6
#define BOOKCAST_TCP_ESTABLISHED 1
#define BOOKCAST_TCP_SYN_RECV 3

/* headers older than the kernel may not define it; the tracepoint record only needs its size (int) */
enum skb_drop_reason { BOOKCAST_SKB_DROP_REASON_UNKNOWN = 0 };

struct port_key {
    u32 role;
    u32 port;
};

struct fd_key {
    u32 tgid;
    u32 fd;
};

struct accept_queue {
    u64 enqueued;
    u64 dequeued;
    s64 offset;      /* written by user space: exact length - (enqueued - dequeued) at its last look */
    u32 role;
    u32 port;
};

/* listening port -> role of the process listening on it (user space) */
BPF_HASH(ports, u16, u32, MAX_PORTS);
/* (tgid, fd) of each listening socket of ours -> its port (user space) */
BPF_HASH(listen_fds, struct fd_key, u16, MAX_LISTEN_FDS);
/* port -> counters; created by user space with role and offset */
BPF_HASH(accept_queue, u16, struct accept_queue, MAX_PORTS);
BPF_HASH(accept_queue_length, struct port_key, struct hist, MAX_SERIES);
BPF_HASH(accept_queue_overflows, struct port_key, u64, MAX_SERIES);
/* listener socket address -> port, learnt in the kernel */
BPF_TABLE("lru_hash", u64, u16, listeners, MAX_LISTENERS);
/* port whose child this CPU just queued, until the listener's sk_data_ready in the same softirq */
BPF_PERCPU_ARRAY(just_queued, u16, 1);
/* thread of ours inside accept() on a listening fd -> its port */
BPF_HASH(accepting, u32, u16, MAX_THREADS);

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != BOOKCAST_IPPROTO_TCP || args->oldstate != BOOKCAST_TCP_SYN_RECV ||
        args->newstate != BOOKCAST_TCP_ESTABLISHED)
        return 0;
    u16 port = args->sport;
    struct accept_queue *q = accept_queue.lookup(&port);
    if (!q)
        return 0;
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
    u16 *queued = just_queued.lookup(&zero_idx);
    if (queued)
        *queued = port;
    return 0;
}

TRACEPOINT_PROBE(sock, sk_data_ready)
{
    u32 zero_idx = 0;
    u16 *queued = just_queued.lookup(&zero_idx);
    if (!queued || !*queued)
        return 0;
    u64 sk = (u64)args->skaddr;
    u16 port = *queued;
    *queued = 0;
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

static __always_inline int accept_enter(u64 fd)
{
    u64 id = bpf_get_current_pid_tgid();
    struct fd_key key = {.tgid = id >> 32, .fd = fd};
    u16 *port = listen_fds.lookup(&key);
    if (!port)
        return 0;
    u32 pid = id;
    accepting.update(&pid, port);
    return 0;
}

static __always_inline int accept_exit(long ret)
{
    u32 pid = bpf_get_current_pid_tgid();
    u16 *port = accepting.lookup(&pid);
    if (!port)
        return 0;
    u16 p = *port;
    accepting.delete(&pid);
    if (ret < 0)
        return 0;
    struct accept_queue *q = accept_queue.lookup(&p);
    if (q)
        __sync_fetch_and_add(&q->dequeued, 1);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept) { return accept_enter(args->fd); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accept_exit(args->ret); }
