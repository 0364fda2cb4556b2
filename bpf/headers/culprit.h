/* Minimal kernel types for culprit's eBPF programs, CO-RE relocated.
 *
 * Only the fields the programs read are declared; preserve_access_index
 * makes libbpf match them by name against the running kernel's BTF, so
 * offsets (and the nesting of anonymous unions) need not match. This keeps
 * a 3 MB vmlinux.h out of the repository, as cilium/ebpf's examples do. */
#pragma once

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef _Bool bool;

enum bpf_map_type {
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_LRU_HASH = 9,
	BPF_MAP_TYPE_RINGBUF = 27,
};

enum {
	BPF_ANY = 0,
	BPF_NOEXIST = 1,
};

#define IPPROTO_TCP 6

/* TCP states, from include/net/tcp_states.h: part of the user ABI. */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_FIN_WAIT1 = 4,
	TCP_CLOSE = 7,
	TCP_CLOSE_WAIT = 8,
	TCP_SYN_RECV = 3,
	TCP_LISTEN = 10,
};

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common {
	__be32 skc_daddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	u16 sk_protocol;
	u32 sk_ack_backlog;
	u32 sk_max_ack_backlog;
} __attribute__((preserve_access_index));

struct request_sock {
} __attribute__((preserve_access_index));

struct net_device {
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
	__u16 transport_header;
	unsigned char *head;
} __attribute__((preserve_access_index));

/* Only the destination port is read, from the packet itself. */
struct tcphdr {
	__be16 source;
	__be16 dest;
};

/* Values differ between kernels; bpf_core_enum_value resolves the running
 * kernel's value by name at load time. */
enum skb_drop_reason {
	SKB_DROP_REASON_TCP_LISTEN_OVERFLOW = 40,
};

/* Scheduler probes. */
enum {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_STACK_TRACE = 7,
};

#define BPF_F_USER_STACK (1ULL << 8)
#define BPF_F_REUSE_STACKID (1ULL << 10)
#define TASK_COMM_LEN 16

struct task_struct {
	int pid;
	int tgid;
	char comm[TASK_COMM_LEN];
} __attribute__((preserve_access_index));

struct bpf_perf_event_data;

/* The user registers a task entered the kernel with (x86-64 names). */
struct pt_regs {
	unsigned long bp;
	unsigned long sp;
} __attribute__((preserve_access_index));

/* TCP connection lifetimes. */
struct inet_connection_sock {
	struct {
		__u32 lrcvtime;
	} __attribute__((preserve_access_index)) icsk_ack;
} __attribute__((preserve_access_index));

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u32 lsndtime;
	__u64 bytes_received;
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

enum sk_rst_reason {
	SK_RST_REASON_NOT_SPECIFIED = 0,
};

#define AF_INET 2
#define AF_INET6 10

/* The context of an iter/task_file program: one run per open file of
 * every process (threads sharing a file table are visited once); task and
 * file NULL at the end. */
struct bpf_iter_meta;
struct file;
struct bpf_iter__task_file {
	struct bpf_iter_meta *meta;
	struct task_struct *task;
	__u32 fd;
	struct file *file;
} __attribute__((preserve_access_index));
