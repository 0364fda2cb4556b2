// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* listen_queue: the half-open connections of every listener of a network
 * namespace, read from the listeners themselves.
 *
 * A half-open connection (a request socket, SYN_RECV) lives in the
 * kernel's established hash, so sock_diag can count them only by walking
 * every bucket of that hash: 262,144 buckets on a 24 GiB machine, with a
 * lock taken for each non-empty one, milliseconds beside a neighbour's
 * 10,000 sockets, however few of them are half-open. The listener keeps
 * their number itself (icsk_accept_queue.qlen). The tcp iterator visits
 * the listening hash first and the established hash after it, so this
 * program writes one record per listener and, at the first socket that is
 * not one, a last record that tells the reader to stop: the reader asks
 * for one record per read, the kernel stops as soon as a read is filled,
 * and the established hash is never walked past its first socket.
 *
 * The namespace is the reader's (the thread that opened the iterator). */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

/* The parts of the kernel's types read here, CO-RE relocated; the ___lq
 * suffix keeps them apart from culprit.h's own declarations. */
struct request_sock_queue___lq {
	struct {
		int counter;
	} qlen;
} __attribute__((preserve_access_index));

struct inet_connection_sock___lq {
	struct request_sock_queue___lq icsk_accept_queue;
} __attribute__((preserve_access_index));

struct seq_file;
struct bpf_iter_meta {
	struct seq_file *seq;
} __attribute__((preserve_access_index));

/* The context of an iter/tcp program: one run per TCP socket of the
 * reader's namespace, listeners first; sk_common NULL at the end. */
struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
} __attribute__((preserve_access_index));

/* One listener, or (state not TCP_LISTEN) the end of the listening hash. */
struct listen_queue {
	__u32 qlen;        /* half-open connections (request sockets) */
	__u32 ack_backlog; /* connections waiting for accept() */
	__u32 max_backlog;
	__u16 port;
	__u8 state;
	__u8 family;
};

/* Only written with bpf_seq_write: named here for bpf2go's -type. */
const struct listen_queue *unused_listen_queue __attribute__((unused));

SEC("iter/tcp")
int culprit_listen_queue(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct bpf_iter_meta *meta = ctx->meta;
	if (!skc)
		return 0;
	struct listen_queue q = {};
	q.state = BPF_CORE_READ(skc, skc_state);
	if (q.state == TCP_LISTEN) {
		const struct inet_connection_sock___lq *icsk = (const void *)skc;
		const struct sock *sk = (const void *)skc;
		q.qlen = BPF_CORE_READ(icsk, icsk_accept_queue.qlen.counter);
		q.ack_backlog = BPF_CORE_READ(sk, sk_ack_backlog);
		q.max_backlog = BPF_CORE_READ(sk, sk_max_ack_backlog);
		q.port = BPF_CORE_READ(skc, skc_num);
		q.family = BPF_CORE_READ(skc, skc_family);
	}
	bpf_seq_write(meta->seq, &q, sizeof(q));
	return 0;
}
