/* Shared by every bookcast eBPF program; included through -I ebpf/programs.
 *
 * Sizes and limits arrive as -D flags built by ebpf/spec.py from the program's spec file and the metric
 * catalog (HIST_SLOTS from the catalog's bucket count); nothing here has a default, so a limit is written
 * once. Only tracepoint arguments and helper results are read, never kernel struct fields: the headers
 * bcc compiles against may be older than the running kernel.
 */
#ifndef BOOKCAST_H
#define BOOKCAST_H

#if !defined(HIST_SLOTS) || !defined(MAX_PROCESSES) || !defined(PID_WORDS)
#error "HIST_SLOTS, MAX_PROCESSES and PID_WORDS come from the spec: -DHIST_SLOTS=N -DMAX_PROCESSES=N -DPID_WORDS=N"
#endif

/* A log2 histogram. slot[k] counts values whose bit length is k: slot 0 holds 0, slot k holds
 * [2^(k-1), 2^k), so its upper bound is 2^k units (Prometheus le). slot[HIST_SLOTS] is the overflow
 * (+Inf). Units: slots in microseconds and sum in nanoseconds for durations; bytes for sizes. */
struct hist {
    u64 slot[HIST_SLOTS + 1];
    u64 sum;
};

/* Process (tgid) -> role id; written only by user space (ebpf/targets.py), read on every event. */
BPF_HASH(roles, u32, u32, MAX_PROCESSES);
/* The same set as one bit per tgid (bit tgid % 64 of word tgid / 64; PID_WORDS covers the kernel's 2^22
 * pid limit in 512 KiB), written by user space beside `roles`: most events on a host are not ours, and
 * an inlined array load says so without a hash lookup (python -m ebpf.bench, variants). */
BPF_ARRAY(our_tgids, u64, PID_WORDS);

/* Each program defines, right after including this file (bcc rewrites map calls in the program's own
 * file only, so they cannot live here):
 *   static __always_inline int is_ours(u32 tgid)     -- the bit
 *   static __always_inline u32 *role_of(u32 tgid)    -- its role, or NULL: the bit first, the hash for ours
 */

static __always_inline u64 bit_length(u64 v)
{
    u64 n = 0;
    if (v >> 32) { v >>= 32; n += 32; }
    if (v >> 16) { v >>= 16; n += 16; }
    if (v >> 8)  { v >>= 8;  n += 8; }
    if (v >> 4)  { v >>= 4;  n += 4; }
    if (v >> 2)  { v >>= 2;  n += 2; }
    if (v >> 1)  { v >>= 1;  n += 1; }
    return n + v;
}

/* Count one value: `slot_value` picks the slot (µs or bytes), `sum_value` is added to the sum (ns or bytes). */
static __always_inline void hist_add(struct hist *h, u64 slot_value, u64 sum_value)
{
    u64 k = bit_length(slot_value);
    if (k > HIST_SLOTS)
        k = HIST_SLOTS;
    __sync_fetch_and_add(&h->slot[k], 1);
    __sync_fetch_and_add(&h->sum, sum_value);
}

#endif
