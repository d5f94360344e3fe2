/* TCP retransmits and smoothed RTT on bookcast's listening ports (spec: tcp.json).
 *
 * Both tracepoints fire outside the owner's context (softirq, timers), so sockets are matched by their
 * local port (sport, host byte order in these tracepoints) against `ports`, which user space fills with
 * the listening ports of the traced processes (and --tcp-port). tcp:tcp_probe's srtt is already in µs
 * (the kernel stores srtt_us >> 3); it fires for each segment received on an established socket.
 * Each probe is compiled only when its tracepoint exists (HAVE_* from the spec).
 */
#include "bookcast.h"

struct role_key {
    u32 role;
};

/* local port -> role id of the process listening on it */
BPF_HASH(ports, u16, u32, MAX_PORTS);

#if HAVE_TCP_RETRANSMIT_SKB
BPF_HASH(tcp_retransmits, struct role_key, u64, MAX_SERIES);

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    u16 sport = args->sport;
    u32 *role = ports.lookup(&sport);
    if (!role)
        return 0;
    struct role_key key = {.role = *role};
    u64 one = 1;
    u64 *n = tcp_retransmits.lookup(&key);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        tcp_retransmits.insert(&key, &one);
    return 0;
}
#endif

#if HAVE_TCP_PROBE
BPF_HASH(tcp_srtt, struct role_key, struct hist, MAX_SERIES);

TRACEPOINT_PROBE(tcp, tcp_probe)
{
    u16 sport = args->sport;
    u32 *role = ports.lookup(&sport);
    if (!role)
        return 0;
    struct role_key key = {.role = *role};
    u64 us = args->srtt;
    struct hist zero = {};
    struct hist *h = tcp_srtt.lookup_or_try_init(&key, &zero);
    if (h)
        hist_add(h, us, us * 1000);
    return 0;
}
#endif
