// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* tcp_listen: per-listener evidence of accept-queue overflow.
 *
 * The kernel counts ListenOverflows per network namespace only, and a SYN
 * dropped on a full accept queue is freed with consume_skb and no drop
 * reason. What can be attributed to one listener is counted here, keyed by
 * (netns inode, local port):
 *   - completed handshakes dropped on a full queue (kfree_skb, reason
 *     TCP_LISTEN_OVERFLOW; rx_sk is the listener),
 *   - SYN-ACK retransmits, which keep firing while the queue stays full,
 *   - passive opens (a child going SYN_RECV -> ESTABLISHED): while the queue
 *     is full a handshake can only complete into a slot an accept freed, so
 *     these count the app's accepts.
 * All programs are tp_btf: no tracefs, CAP_BPF + CAP_PERFMON suffice. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "ringbuf.h"
#include "changes.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>

char __license[] SEC("license") = "Dual MIT/GPL";

struct port_key {
	__u32 netns;
	__u16 port;
	__u16 pad;
};

struct port_stats {
	__u64 overflow_drops;
	__u64 synack_retrans;
	__u64 passive_opens;
	__u32 ack_backlog;     /* listener's queue length at the last event */
	__u32 max_ack_backlog; /* and its capacity */
	__u64 last_event_ns;   /* rate limit for ring buffer wake-ups */
};

enum event_kind {
	EVENT_OVERFLOW_DROP = 1,
	EVENT_SYNACK_RETRANS = 2,
};

struct event {
	__u32 netns;
	__u16 port;
	__u8 kind;
	__u8 pad;
	__u64 ts;
};

/* max_entries is set from Go (probes.max_entries) before loading. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct port_key);
	__type(value, struct port_stats);
	__uint(max_entries, 4096);
} port_stats_map SEC(".maps");

CULPRIT_RINGBUF(events);

/* The target's network namespace, set from Go; 0: any. */
volatile __u32 target_netns;

/* [0]: a port of target_netns changed (changes.h). The map holds every
 * namespace's ports; only the target's make Go walk it. [1]: armed. */
CULPRIT_CHANGES(2)
CULPRIT_WAKES(1)

static __always_inline void port_changed(const struct port_key *key)
{
	__u32 ns = target_netns;
	if (!ns || key->netns == ns) {
		changed(0);
		wake_go(); /* a connection arrived: the accept queue is sampled closely */
	}
}

/* One wake-up per listener per 50 ms is enough for the engine; a SYN flood
 * must not turn into a flood of ring buffer records. */
#define EVENT_GAP_NS (50ULL * 1000 * 1000)

static __always_inline struct port_stats *stats_lookup(struct port_key *key)
{
	struct port_stats *st = bpf_map_lookup_elem(&port_stats_map, key);
	if (st)
		return st;
	struct port_stats zero = {};
	bpf_map_update_elem(&port_stats_map, key, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&port_stats_map, key);
}

static __always_inline struct port_stats *stats_for(const struct sock *sk, struct port_key *key)
{
	key->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	key->port = BPF_CORE_READ(sk, __sk_common.skc_num);
	key->pad = 0;
	return stats_lookup(key);
}

static __always_inline void wake(struct port_stats *st, struct port_key *key, __u8 kind)
{
	__u64 now = bpf_ktime_get_ns();
	if (now - st->last_event_ns < EVENT_GAP_NS)
		return;
	st->last_event_ns = now;
	struct event ev = {.netns = key->netns, .port = key->port, .kind = kind, .ts = now};
	CULPRIT_OUTPUT(events, ev);
}

SEC("tp_btf/kfree_skb")
int BPF_PROG(culprit_kfree_skb, struct sk_buff *skb, void *location, enum skb_drop_reason reason, struct sock *rx_sk)
{
	if (reason != bpf_core_enum_value(enum skb_drop_reason, SKB_DROP_REASON_TCP_LISTEN_OVERFLOW))
		return 0;
	struct port_key key;
	struct port_stats *st;
	if (rx_sk) {
		st = stats_for(rx_sk, &key);
		if (!st)
			return 0;
		st->ack_backlog = BPF_CORE_READ(rx_sk, sk_ack_backlog);
		st->max_ack_backlog = BPF_CORE_READ(rx_sk, sk_max_ack_backlog);
	} else {
		/* A SYN cookie's ACK meeting a full queue is dropped without the
		 * listener (measured on 6.18): take the port from the TCP header
		 * and the namespace from the receiving device. */
		struct tcphdr th;
		unsigned char *head = BPF_CORE_READ(skb, head);
		__u16 off = BPF_CORE_READ(skb, transport_header);
		if (bpf_probe_read_kernel(&th, sizeof(th), head + off))
			return 0;
		key.netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
		key.port = bpf_ntohs(th.dest);
		key.pad = 0;
		st = stats_lookup(&key);
		if (!st)
			return 0;
	}
	__sync_fetch_and_add(&st->overflow_drops, 1);
	port_changed(&key);
	wake(st, &key, EVENT_OVERFLOW_DROP);
	return 0;
}

SEC("tp_btf/tcp_retransmit_synack")
int BPF_PROG(culprit_retransmit_synack, const struct sock *sk, const struct request_sock *req)
{
	struct port_key key;
	struct port_stats *st = stats_for(sk, &key);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->synack_retrans, 1);
	st->ack_backlog = BPF_CORE_READ(sk, sk_ack_backlog);
	st->max_ack_backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
	port_changed(&key);
	wake(st, &key, EVENT_SYNACK_RETRANS);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(culprit_inet_sock_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (oldstate != TCP_SYN_RECV || newstate != TCP_ESTABLISHED)
		return 0;
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	struct port_key key;
	struct port_stats *st = stats_for(sk, &key);
	if (!st)
		return 0;
	__sync_fetch_and_add(&st->passive_opens, 1);
	port_changed(&key);
	return 0;
}
