// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* tcp_life: how the target's TCP connections end, and why resets are sent.
 *
 * For connections of the target's network namespace (target_netns), one
 * ring buffer event per:
 *   - peer close: ESTABLISHED -> CLOSE_WAIT (the peer's FIN came first),
 *   - local close: ESTABLISHED -> FIN_WAIT1 (this side closed first),
 *   - reset received on an established connection,
 *   - completed active open (SYN_SENT -> ESTABLISHED: the handshake time),
 * each with the connection's lifetime and its idle age: jiffies since the
 * later of the last data received and the last data sent. Many peer closes
 * at one idle age are an intermediary's idle timeout.
 * Events are for the whole namespace; each names its owner as far as the
 * kernel knows it: the socket's inode (what /proc/PID/fd shows as
 * socket:[N]; 0 once close() orphaned it) and, for connections opened
 * here, the process that called connect (current at the SYN_SENT
 * transition, kept with the start time).
 * Resets sent are counted per reason (enum sk_rst_reason, 6.10+): the
 * reason names the path (no socket: a closed port; abort on close/data/
 * linger: the application).
 * All programs are tp_btf. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "ringbuf.h"
#include "changes.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "sock.h"

char __license[] SEC("license") = "Dual MIT/GPL";

enum close_kind {
	CLOSE_PEER = 1,
	CLOSE_LOCAL = 2,
	CLOSE_RESET_RECV = 3,
	OPEN_ACTIVE = 4,
};

struct conn_event {
	__u64 lifetime_ns;
	__u32 idle_jiffies;
	__u32 netns;
	__u8 kind;
	__u8 family;
	__u16 lport;
	__u16 rport;
	__u16 pad;
	__u8 raddr[16];
	__u64 inode; /* 0: orphaned */
	__u32 pid;   /* tgid that called connect; 0: passive or unknown */
	__u32 pad2;
	/* Data the connection carried, both ways (bytes received, and sent
	 * and acknowledged): a connection cut when idle had carried some; a
	 * client that connects and leaves, or gives up in an accept queue,
	 * carried none. */
	__u64 data_bytes;
};

struct conn_start {
	__u64 ns;
	__u32 tgid;
	__u32 pad;
};

/* Resets sent, by reason and by the local port of the connection (or of
 * the segment that reached no socket): Go tells the target's ports from
 * the others', so a neighbour's resets are not the target's. Cleared by
 * Go when the target's namespace changes. */
struct rst_key {
	__u32 reason;
	__u16 lport;
	__u16 pad;
};

/* Set by Go while it polls every probes.poll_interval because connections
 * are ending: events then wait in the ring without waking the reader, and
 * each poll flushes them (flat out, a wake-up per event kept the agent's
 * reader and the Go runtime's sysmon busy). 0 while Go idles, so that the
 * first event wakes it. */
volatile __u32 batch_events;

/* Keeps conn_event in the BTF, so bpf2go emits its Go type. */
const struct conn_event *unused_conn_event __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} target_netns SEC(".maps");

/* When each connection started (SYN_SENT, or ESTABLISHED for passive
 * ones); max_entries set from Go (probes.max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, struct conn_start);
	__uint(max_entries, 4096);
} conn_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct rst_key);
	__type(value, __u64);
	__uint(max_entries, 256);
} rst_sent SEC(".maps");

CULPRIT_RINGBUF(conn_events);

static __always_inline __u32 target(void)
{
	__u32 zero = 0;
	__u32 *ns = bpf_map_lookup_elem(&target_netns, &zero);
	return ns ? *ns : 0;
}

static __always_inline void emit(const struct sock *sk, __u32 netns, __u8 kind, __u64 now)
{
	__u64 key = (__u64)sk;
	struct conn_start *start = bpf_map_lookup_elem(&conn_start, &key);
	struct conn_event ev = {};
	ev.netns = netns;
	ev.kind = kind;
	if (start) {
		ev.lifetime_ns = now > start->ns ? now - start->ns : 0;
		ev.pid = start->tgid;
	}
	ev.inode = sock_inode(sk);
	if (kind != OPEN_ACTIVE) {
		const struct tcp_sock *tp = (const struct tcp_sock *)sk;
		__u32 rcv = BPF_CORE_READ(tp, inet_conn.icsk_ack.lrcvtime);
		__u32 snd = BPF_CORE_READ(tp, lsndtime);
		__u32 last = (__s32)(rcv - snd) > 0 ? rcv : snd;
		ev.idle_jiffies = (__u32)bpf_jiffies64() - last;
		ev.data_bytes = BPF_CORE_READ(tp, bytes_received) + BPF_CORE_READ(tp, bytes_acked);
	}
	ev.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	ev.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	ev.rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (ev.family == AF_INET) {
		__be32 a = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(ev.raddr, &a, 4);
	} else {
		BPF_CORE_READ_INTO(&ev.raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	CULPRIT_OUTPUT_FLAGS(conn_events, ev, batch_events ? CULPRIT_RB_NO_WAKEUP : 0);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(culprit_life_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return 0;
	__u32 netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (netns != target())
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 key = (__u64)sk;
	if (newstate == TCP_SYN_SENT) {
		/* connect() makes this transition in the caller's context. */
		struct conn_start st = {.ns = now, .tgid = bpf_get_current_pid_tgid() >> 32};
		bpf_map_update_elem(&conn_start, &key, &st, BPF_ANY);
		return 0;
	}
	if (oldstate == TCP_SYN_SENT && newstate == TCP_ESTABLISHED) {
		emit(sk, netns, OPEN_ACTIVE, now);
		return 0;
	}
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		/* softirq: current is whoever the packet interrupted. */
		struct conn_start st = {.ns = now};
		bpf_map_update_elem(&conn_start, &key, &st, BPF_ANY);
		return 0;
	}
	if (oldstate == TCP_ESTABLISHED && newstate == TCP_CLOSE_WAIT)
		emit(sk, netns, CLOSE_PEER, now);
	else if (oldstate == TCP_ESTABLISHED && newstate == TCP_FIN_WAIT1)
		emit(sk, netns, CLOSE_LOCAL, now);
	if (newstate == TCP_CLOSE)
		bpf_map_delete_elem(&conn_start, &key);
	return 0;
}

SEC("tp_btf/tcp_receive_reset")
int BPF_PROG(culprit_life_receive_reset, struct sock *sk)
{
	__u32 netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	if (netns != target())
		return 0;
	/* A reset answering a SYN (a refused connect) ends no connection: it
	 * never carried data, so it has no idle age (its lrcvtime and
	 * lsndtime are unset, and the age would read as the time since
	 * boot). */
	__u8 st = BPF_CORE_READ(sk, __sk_common.skc_state);
	if (st == TCP_SYN_SENT || st == TCP_SYN_RECV)
		return 0;
	emit(sk, netns, CLOSE_RESET_RECV, bpf_ktime_get_ns());
	return 0;
}

SEC("tp_btf/tcp_send_reset")
int BPF_PROG(culprit_life_send_reset, const struct sock *sk, const struct sk_buff *skb, const enum sk_rst_reason reason)
{
	__u32 netns;
	struct rst_key key = {.reason = reason};
	if (sk) {
		netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
		key.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	} else if (skb) {
		/* No socket: the segment's destination is the local port it
		 * was sent to (a closed port). */
		struct tcphdr th;
		unsigned char *head = BPF_CORE_READ(skb, head);
		__u16 off = BPF_CORE_READ(skb, transport_header);
		netns = BPF_CORE_READ(skb, dev, nd_net.net, ns.inum);
		if (!bpf_probe_read_kernel(&th, sizeof(th), head + off))
			key.lport = bpf_ntohs(th.dest);
	} else
		return 0;
	if (netns != target())
		return 0;
	__u64 *n = bpf_map_lookup_elem(&rst_sent, &key);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return 0;
	}
	__u64 one = 1;
	bpf_map_update_elem(&rst_sent, &key, &one, BPF_NOEXIST);
	return 0;
}
