// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* signals: termination signals sent to the target.
 *
 * A pod is stopped with SIGTERM, then SIGKILL after its grace period. A
 * service that keeps serving long-lived streams after SIGTERM is killed
 * mid-request (seed 000 Problem D). tp_btf on signal_generate sees the
 * signal when it is sent, whoever sends it; this counts SIGTERM, SIGINT
 * and SIGQUIT sent to the target's threads, with the last time and the
 * sender. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "targets.h"
#include "changes.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

struct sig_key {
	__u32 tgid;
	__u32 sig;
};

struct sig_stats {
	__u64 count;
	__u64 last_ns;
	__u32 sender;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sig_key);
	__type(value, struct sig_stats);
	__uint(max_entries, 64);
} sigs SEC(".maps");

/* [0]: sigs changed (changes.h): Go walks it only then. */
CULPRIT_CHANGES(1)

SEC("tp_btf/signal_generate")
int BPF_PROG(culprit_signal_generate, int sig, void *info, struct task_struct *task, int group, int result)
{
	if (sig != 2 && sig != 3 && sig != 15) /* SIGINT, SIGQUIT, SIGTERM */
		return 0;
	__u32 tgid = task->tgid; /* a trusted tp_btf argument: a plain load */
	if (!is_target(tgid))
		return 0;
	struct sig_key key = {.tgid = tgid, .sig = sig};
	struct sig_stats *st = bpf_map_lookup_elem(&sigs, &key);
	if (!st) {
		struct sig_stats zero = {};
		bpf_map_update_elem(&sigs, &key, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&sigs, &key);
		if (!st)
			return 0;
	}
	__sync_fetch_and_add(&st->count, 1);
	st->last_ns = bpf_ktime_get_ns();
	st->sender = bpf_get_current_pid_tgid() >> 32;
	changed(0);
	return 0;
}
