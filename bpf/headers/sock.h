/* Kernel types for reaching a socket from a file descriptor, and the
 * fields of struct sock beyond those culprit.h declares. Include after
 * culprit.h.
 *
 * Every name carries the CO-RE flavour suffix ___sock: the loader drops
 * it when matching against the kernel's BTF, so these relocate against
 * the real struct sock, struct file, ... while culprit.h keeps its own
 * minimal declarations of the same kernel types without a clash. */
#pragma once

#define S_IFMT 00170000
#define S_IFSOCK 0140000

struct inode___sock {
	unsigned short i_mode;
	unsigned long i_ino;
} __attribute__((preserve_access_index));

struct file___sock {
	void *private_data;
	struct inode___sock *f_inode;
} __attribute__((preserve_access_index));

struct sk_buff_head___sock {
	__u32 qlen;
} __attribute__((preserve_access_index));

struct sock_common___sock {
	__be32 skc_daddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
} __attribute__((preserve_access_index));

struct socket___sock;

struct sock___sock {
	struct sock_common___sock __sk_common;
	struct sk_buff_head___sock sk_receive_queue;
	int sk_err;
	struct socket___sock *sk_socket;
	u16 sk_type;
	u16 sk_protocol;
} __attribute__((preserve_access_index));

/* segs_out: every segment the socket sent, its SYN included (RFC 4898
 * tcpEStatsPerfSegsOut, Linux 4.6+). */
struct tcp_sock___sock {
	__u32 segs_out;
} __attribute__((preserve_access_index));

struct socket___sock {
	struct file___sock *file;
	struct sock___sock *sk;
} __attribute__((preserve_access_index));

struct fdtable___sock {
	unsigned int max_fds;
	struct file___sock **fd;
} __attribute__((preserve_access_index));

struct files_struct___sock {
	struct fdtable___sock *fdt;
} __attribute__((preserve_access_index));

struct task_struct___sock {
	struct files_struct___sock *files;
} __attribute__((preserve_access_index));

/* The registers a task entered the kernel with (x86-64 names): orig_ax is
 * the system call number, di/si/dx its first three arguments. */
struct pt_regs___sock {
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long orig_ax;
} __attribute__((preserve_access_index));

/* sock_inode is the inode number of the socket's file (what /proc/PID/fd
 * shows as socket:[N]), 0 when the socket has no file any more (orphaned
 * by close) or never had one. */
static __always_inline __u64 sock_inode(const void *sk)
{
	const struct sock___sock *s = sk;
	return BPF_CORE_READ(s, sk_socket, file, f_inode, i_ino);
}
