// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* cpu_profile: sampled on-CPU stacks of the target process.
 *
 * A software CPU_CLOCK perf event per CPU (this machine has no hardware
 * PMU) runs this program at profiling.frequency; when the interrupted task
 * belongs to the target, its (thread, user stack, kernel stack) is counted.
 *
 * Counts and stacks are double-buffered: the program writes to the pair
 * selected by `gen`, and Go flips `gen` before draining the other pair.
 * Deleting stack ids from a map the program still writes to would let a
 * count refer to a stack id reused for another stack. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "targets.h"
#include <bpf/bpf_tracing.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define MAX_STACK_DEPTH 127

struct sample_key {
	__u32 tid;
	__u32 tgid;
	__s32 ustack;
	__s32 kstack;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
} gen SEC(".maps");

/* max_entries of these four set from Go (profiling.max_stacks). */
struct counts_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct sample_key);
	__type(value, __u64);
	__uint(max_entries, 4096);
};
struct counts_map counts0 SEC(".maps");
struct counts_map counts1 SEC(".maps");

struct stacks_map {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAX_STACK_DEPTH * sizeof(__u64));
	__uint(max_entries, 4096);
};
struct stacks_map stacks0 SEC(".maps");
struct stacks_map stacks1 SEC(".maps");

/* Samples not counted: [0] map full, [1] no stack. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 2);
} lost SEC(".maps");

static __always_inline void count_lost(__u32 i)
{
	__u64 *n = bpf_map_lookup_elem(&lost, &i);
	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline void count(void *ctx, void *counts, void *stacks, __u64 id)
{
	struct sample_key key = {
		.tid = (__u32)id,
		.tgid = id >> 32,
		.ustack = bpf_get_stackid(ctx, stacks, BPF_F_USER_STACK),
		.kstack = bpf_get_stackid(ctx, stacks, 0),
	};
	if (key.ustack < 0 && key.kstack < 0)
		count_lost(1);
	__u64 *n = bpf_map_lookup_elem(counts, &key);
	if (n) {
		__sync_fetch_and_add(n, 1);
		return;
	}
	__u64 one = 1;
	if (bpf_map_update_elem(counts, &key, &one, BPF_NOEXIST)) {
		n = bpf_map_lookup_elem(counts, &key);
		if (n)
			__sync_fetch_and_add(n, 1);
		else
			count_lost(0);
	}
}

SEC("perf_event")
int culprit_cpu_sample(struct bpf_perf_event_data *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (!is_target(tgid))
		return 0;
	__u32 zero = 0;
	__u32 *g = bpf_map_lookup_elem(&gen, &zero);
	if (g && (*g & 1))
		count(ctx, &counts1, &stacks1, id);
	else
		count(ctx, &counts0, &stacks0, id);
	return 0;
}
