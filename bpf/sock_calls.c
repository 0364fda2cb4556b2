// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* sock_calls: what the target process itself does with its sockets.
 *
 * Namespace-wide counters cannot tell the target's sockets from its
 * neighbours', and completed handshakes are not accepts (a listener that
 * accepts nothing still completes backlog+1 of them). So, by the target's
 * own system calls and only for its TCP sockets:
 *   - accepts: accept/accept4 that returned a socket, per listener port,
 *     while Go has the sys_exit program attached (while a listener's
 *     queue fills up: see probes/sockcalls.go);
 *   - connects, per remote, by their TCP states: a socket the target
 *     moves to SYN_SENT (connect runs in its context) is its attempt,
 *     counted when the handshake ends: established, refused or timed out
 *     (sk_err, by errno), or given up. One that leaves SYN_SENT within
 *     connect before its SYN went out found no local port free:
 *     EADDRNOTAVAIL, and no attempt;
 *   - unread work: for every socket the target accepted, connected or
 *     read from, when data became ready that nobody has read yet
 *     (`waiting`), while Go has the two socket hooks attached (while a
 *     thread of the target sleeps where work may wait for it: see
 *     probes/sockcalls.go watchUnread). Go turns that into the age of the
 *     oldest unread data: an event loop asleep while requests wait for
 *     it, whatever call it sleeps in. When the hooks attach, culprit_sock_
 *     seed marks the data already queued as waiting since then.
 * The sockets are keyed by their struct sock address; an entry goes when
 * the socket closes, or when its memory starts a new connection (any
 * entry then is stale).
 *
 * What each hook costs:
 *   - tp_btf/sys_exit runs at the exit of every system call of the host,
 *     and attaching any sys_exit program also moves every task's system
 *     calls to the kernel's slower traced entry/exit path. That path is
 *     most of the cost: getppid went from ~90 to ~130 ns here, and an
 *     empty sys_exit program already cost most of that; beside nginx flat
 *     out it was 1.4 million runs a second, the largest of this probe's
 *     costs. So Go attaches it only while accepts are evidence. The first
 *     test is the system call number, one load from pt_regs (six
 *     instructions to the exit for all but accept and accept4). Those
 *     then pay one hash lookup (is the caller a target?); only the
 *     target's own calls read the fd table and the socket (about ten
 *     kernel reads) and update two maps. probes/sockcalls_bench_test.go
 *     measures it.
 *   - tp_btf/sock_recv_length runs after every recvmsg/read of a socket on
 *     the host: one hash lookup by socket, plus a tgid lookup when the
 *     socket is unknown. Known sockets pay a delete in `waiting` and a read
 *     of their receive queue's length.
 *   - tp_btf/sk_data_ready runs for every data arrival on any socket of
 *     the host (softirq): one hash lookup by socket; known sockets pay a
 *     lookup in `waiting`, and an insert when nothing waited.
 *   These two cost ~100 ns a run each, dispatch included, and run for
 *   every packet and read of every socket of the host: beside nginx flat
 *   out (wrk on the same machine) ~6 % of a core, ~3 % of its requests.
 *   So Go attaches them only while their evidence is wanted.
 *   - tp_btf/inet_sock_set_state runs at every TCP state change: a hash
 *     lookup for the five states that begin or end a socket's life or its
 *     handshake; a target lookup when one enters SYN_SENT.
 * All programs are tp_btf, x86-64 system call numbers (Go refuses to start
 * the probe elsewhere). */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "targets.h"
#include "changes.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "sock.h"

char __license[] SEC("license") = "Dual MIT/GPL";

/* x86-64 system call numbers. */
#define NR_ACCEPT 43
#define NR_ACCEPT4 288
#define NR_CONNECT 42

#define EADDRNOTAVAIL 99
#define MSG_PEEK 2

struct accept_key {
	__u32 tgid;
	__u16 port;
	__u16 pad;
};

/* errno 0 counts attempts; any other value failures with that errno. */
struct connect_key {
	__u32 tgid;
	__u16 err;
	__u16 port;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

/* A socket of the target. */
struct owned_sock {
	__u32 tgid;
	__u16 lport;
	__u16 rport;
	__u8 family;
	__u8 pad[3];
	/* 1 from the target's connect (SYN_SENT) until its handshake ends
	 * and is counted; state changes of a socket are serialized by its
	 * lock, so plain loads and stores do. */
	__u32 connecting;
	__u8 raddr[16];
};

/* Keep the types in the BTF, so bpf2go emits their Go types. */
const struct owned_sock *unused_owned_sock __attribute__((unused));
const struct connect_key *unused_connect_key __attribute__((unused));
const struct accept_key *unused_accept_key __attribute__((unused));

/* max_entries of all three set from Go (probes.max_entries for the
 * counters, sockcalls.max_sockets for the sockets). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct accept_key);
	__type(value, __u64);
	__uint(max_entries, 4096);
} accepts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct connect_key);
	__type(value, __u64);
	__uint(max_entries, 4096);
} connects SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, struct owned_sock);
	__uint(max_entries, 16384);
} owned SEC(".maps");

/* Sockets of owned with data unread: bpf_ktime_get_ns since when nobody
 * read (data arrived, or was still queued after a read, or when the hooks
 * attached). Written only while the socket hooks are attached, which Go
 * says in HOOKED; emptied by Go before it attaches them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u64);
	__type(value, __u64);
	__uint(max_entries, 16384);
} waiting SEC(".maps");

/* Change counters Go polls before walking a map (changes.h). */
#define CHANGED_ACCEPTS 0
#define CHANGED_CONNECTS 1
#define CHANGED_WAITING 2
#define ARMED 3
/* Not a counter: line 0's entry 4 is 1 while Go has the socket hooks
 * attached, so that an accept marks data already queued as waiting only
 * when a read will be seen to clear it. */
#define HOOKED 4
CULPRIT_CHANGES(5)
CULPRIT_WAKES(ARMED)

static __always_inline int hooked(void)
{
	__u32 i = HOOKED;
	__u64 *h = bpf_map_lookup_elem(&changes, &i);
	return h && *h;
}

/* note bumps counter which and wakes Go if it idles: the target accepted,
 * connected, or has data waiting. */
static __always_inline void note(__u32 which)
{
	changed(which);
	wake_go();
}

static __always_inline void count(void *map, const void *key, __u32 which)
{
	__u64 *n = bpf_map_lookup_elem(map, key);
	if (n) {
		__sync_fetch_and_add(n, 1);
		note(which);
		return;
	}
	__u64 one = 1;
	/* Two CPUs may insert the same key at once; one of the two counts
	 * is then lost, which is rare enough for a rate. */
	if (bpf_map_update_elem(map, key, &one, BPF_NOEXIST))
		if ((n = bpf_map_lookup_elem(map, key)))
			__sync_fetch_and_add(n, 1);
	note(which);
}

/* sock_of_file is the TCP socket behind a file, or NULL. */
static __always_inline struct sock___sock *sock_of_file(const struct file___sock *f)
{
	/* Another thread may have closed and reused the fd meanwhile: make
	 * sure it is a socket before reading private_data as one. */
	if ((BPF_CORE_READ(f, f_inode, i_mode) & S_IFMT) != S_IFSOCK)
		return NULL;
	struct socket___sock *so = BPF_CORE_READ(f, private_data);
	struct sock___sock *sk = BPF_CORE_READ(so, sk);
	if (!sk || BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
		return NULL;
	return sk;
}

/* sock_of_fd is the TCP socket behind the caller's fd, or NULL: the fd
 * table is read at the exit of the call that made or used the fd. */
static __always_inline struct sock___sock *sock_of_fd(long fd)
{
	if (fd < 0)
		return NULL;
	struct task_struct___sock *task = (void *)bpf_get_current_task();
	struct fdtable___sock *fdt = BPF_CORE_READ(task, files, fdt);
	if (!fdt)
		return NULL;
	if ((unsigned long)fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	struct file___sock **fds = BPF_CORE_READ(fdt, fd);
	struct file___sock *f = NULL;
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]) || !f)
		return NULL;
	return sock_of_file(f);
}

static __always_inline __u8 sk_state(const struct sock___sock *sk)
{
	return BPF_CORE_READ(sk, __sk_common.skc_state);
}

static __always_inline __u32 unread_skbs(const struct sock___sock *sk)
{
	return BPF_CORE_READ(sk, sk_receive_queue.qlen);
}

/* wait_from_now marks the socket's data as waiting since now, unless it
 * waits already (since earlier). */
static __always_inline void wait_from_now(__u64 key)
{
	__u64 now = bpf_ktime_get_ns();
	if (!bpf_map_update_elem(&waiting, &key, &now, BPF_NOEXIST))
		note(CHANGED_WAITING);
}

/* own returns the socket's entry, creating it for tgid. */
static __always_inline struct owned_sock *own(const struct sock___sock *sk, __u32 tgid)
{
	__u64 key = (__u64)sk;
	struct owned_sock *o = bpf_map_lookup_elem(&owned, &key);
	if (o)
		return o;
	struct owned_sock v = {.tgid = tgid};
	v.family = BPF_CORE_READ(sk, __sk_common.skc_family);
	v.lport = BPF_CORE_READ(sk, __sk_common.skc_num);
	v.rport = bpf_ntohs(BPF_CORE_READ(sk, __sk_common.skc_dport));
	if (v.family == AF_INET) {
		__be32 a = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(v.raddr, &a, 4);
	} else {
		BPF_CORE_READ_INTO(&v.raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	bpf_map_update_elem(&owned, &key, &v, BPF_NOEXIST);
	/* Data that arrived before the socket was known (with the
	 * handshake, before accept) waits from now on at the latest. */
	if (hooked() && unread_skbs(sk))
		wait_from_now(key);
	return bpf_map_lookup_elem(&owned, &key);
}

static __always_inline void on_accept(long ret, __u32 tgid)
{
	struct sock___sock *sk = sock_of_fd(ret);
	if (!sk)
		return;
	struct accept_key key = {.tgid = tgid, .port = BPF_CORE_READ(sk, __sk_common.skc_num)};
	count(&accepts, &key, CHANGED_ACCEPTS);
	/* Reset by the peer while queued: its close has passed, an entry
	 * would never be removed. */
	if (sk_state(sk) != TCP_CLOSE)
		own(sk, tgid);
}

/* no_syn_sent: the socket never sent a segment. Without the field (before
 * Linux 4.6) a SYN is assumed sent: the close counts as given up, a
 * missed EADDRNOTAVAIL rather than an untrue one. */
static __always_inline int no_syn_sent(const struct sock___sock *s)
{
	const struct tcp_sock___sock *tp = (const void *)s;
	if (!bpf_core_field_exists(tp->segs_out))
		return 0;
	return BPF_CORE_READ(tp, segs_out) == 0;
}

/* in_connect: the current task is in connect(2). A deferred Fast Open
 * connect (TCP_FASTOPEN_CONNECT) also sends nothing until the first
 * write: closed before it, it is given up, not a failed connect. */
static __always_inline int in_connect(void)
{
	struct task_struct *t = bpf_get_current_task_btf();
	const struct pt_regs___sock *r = (const void *)bpf_task_pt_regs(t);
	return r->orig_ax == NR_CONNECT;
}

/* count_connect counts one connect outcome of tgid's socket toward its
 * remote (errno 0: an attempt). The remote is the socket's own: set
 * before SYN_SENT, and still set when a connect fails within the call. */
static __always_inline void count_connect(__u32 tgid, const struct sock___sock *s, int err)
{
	struct connect_key ck = {.tgid = tgid, .err = err};
	ck.family = BPF_CORE_READ(s, __sk_common.skc_family);
	ck.port = bpf_ntohs(BPF_CORE_READ(s, __sk_common.skc_dport));
	if (ck.family == AF_INET) {
		__be32 a = BPF_CORE_READ(s, __sk_common.skc_daddr);
		__builtin_memcpy(ck.addr, &a, 4);
	} else {
		BPF_CORE_READ_INTO(&ck.addr, s, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	count(&connects, &ck, CHANGED_CONNECTS);
}

SEC("tp_btf/sys_exit")
int BPF_PROG(culprit_sock_sys_exit, struct pt_regs *regs, long ret)
{
	const struct pt_regs___sock *r = (const void *)regs;
	unsigned long nr = r->orig_ax;
	if (nr != NR_ACCEPT4 && nr != NR_ACCEPT)
		return 0;
	if (ret < 0)
		return 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	if (!is_target(tgid))
		return 0;
	on_accept(ret, tgid);
	return 0;
}

/* settle records that someone just read from the socket: nothing waits
 * unless data is still queued. The delete comes first, so either this
 * re-check sees data queued meanwhile, or its sk_data_ready runs after the
 * delete and inserts. */
static __always_inline void settle(__u64 key, const struct sock___sock *sk)
{
	/* Only a read that changed what Go sees (data that waited, or data
	 * still queued) counts: most reads find nothing waiting. */
	if (!bpf_map_delete_elem(&waiting, &key))
		note(CHANGED_WAITING);
	if (unread_skbs(sk))
		wait_from_now(key);
}

SEC("tp_btf/sock_recv_length")
int BPF_PROG(culprit_sock_recv_length, struct sock *sk, int ret, int flags)
{
	if (flags & MSG_PEEK)
		return 0;
	__u64 key = (__u64)sk;
	struct owned_sock *o = bpf_map_lookup_elem(&owned, &key);
	const struct sock___sock *s = (const void *)sk;
	if (!o) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		if (!is_target(tgid))
			return 0;
		if (BPF_CORE_READ(s, sk_protocol) != IPPROTO_TCP)
			return 0;
		__u8 st = sk_state(s);
		if (st == TCP_LISTEN || st == TCP_CLOSE)
			return 0;
		o = own(s, tgid);
		if (!o)
			return 0;
	}
	if (ret >= 0)
		settle(key, s);
	return 0;
}

SEC("tp_btf/sk_data_ready")
int BPF_PROG(culprit_sock_data_ready, const struct sock *sk)
{
	__u64 key = (__u64)sk;
	if (!bpf_map_lookup_elem(&owned, &key))
		return 0;
	if (bpf_map_lookup_elem(&waiting, &key))
		return 0; /* older data waits */
	wait_from_now(key);
	return 0;
}

/* culprit_sock_seed runs over the open files of every process once,
 * right after Go attached the socket hooks: every TCP socket the target
 * holds becomes its own, whether or not its accept or its reads were seen
 * (while the hooks and sys_exit were detached, they were not), and data
 * queued on it then waits since then at the latest (a lower bound of its
 * age: how long it waited before, nothing watched). A walk of every file
 * table of the host, a hash lookup per file: 1.6 ms beside another
 * process's 10,000 sockets (measured: the agent's debug log says), once
 * per attach. */
SEC("iter/task_file")
int culprit_sock_seed(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	if (!task || !file)
		return 0;
	__u32 tgid = BPF_CORE_READ(task, tgid);
	if (!is_target(tgid))
		return 0;
	const struct sock___sock *sk = sock_of_file((const void *)file);
	if (!sk)
		return 0;
	__u8 st = sk_state(sk);
	if (st == TCP_LISTEN || st == TCP_CLOSE)
		return 0;
	if (own(sk, tgid) && unread_skbs(sk))
		wait_from_now((__u64)sk);
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(culprit_sock_set_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (newstate != TCP_CLOSE && newstate != TCP_SYN_SENT && newstate != TCP_SYN_RECV &&
	    newstate != TCP_LISTEN && newstate != TCP_ESTABLISHED)
		return 0;
	__u64 key = (__u64)sk;
	const struct sock___sock *s = (const void *)sk;
	struct owned_sock *o = bpf_map_lookup_elem(&owned, &key);
	if (newstate == TCP_ESTABLISHED) {
		/* The target's connect completed: an attempt, and now the
		 * socket has its local port. */
		if (o && o->connecting) {
			o->connecting = 0;
			o->lport = BPF_CORE_READ(s, __sk_common.skc_num);
			count_connect(o->tgid, s, 0);
		}
		return 0;
	}
	if (o && o->connecting && newstate == TCP_CLOSE) {
		int err = BPF_CORE_READ(s, sk_err);
		if (err) {
			/* Refused (RST), unreachable or timed out (SYN retries
			 * exhausted): the SYN went out. */
			count_connect(o->tgid, s, 0);
			count_connect(o->tgid, s, err);
		} else if (no_syn_sent(s) && in_connect()) {
			/* Still within connect, and no SYN went out:
			 * tcp_v4_connect and tcp_v6_connect enter SYN_SENT
			 * before they choose the local port, and close the
			 * socket again when none is free. (The local port is
			 * no sign: tcp_set_state frees it before the state
			 * change is traced, so a connect the app gave up on
			 * shows none either.) The errno itself is not seen:
			 * the rarer failures between the port and the SYN (a
			 * bind bucket not allocated, a route lost) count here
			 * too. */
			count_connect(o->tgid, s, EADDRNOTAVAIL);
		} else {
			/* Given up by the app (closed while connecting). */
			count_connect(o->tgid, s, 0);
		}
	}
	if (o) {
		/* Closed, or the memory of a closed socket begins a new
		 * connection. */
		bpf_map_delete_elem(&owned, &key);
		if (!bpf_map_delete_elem(&waiting, &key))
			note(CHANGED_WAITING);
	}
	if (newstate == TCP_SYN_SENT && oldstate == TCP_CLOSE) {
		/* connect() runs in the caller's context. */
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		if (!is_target(tgid) || BPF_CORE_READ(s, sk_protocol) != IPPROTO_TCP)
			return 0;
		o = own(s, tgid);
		if (o)
			o->connecting = 1;
	}
	return 0;
}
