/* The processes a probe watches, kept by Go to the current target and its
 * children (probes/load.go setTargets). Include after bpf_helpers.h.
 *
 * An array in .bss rather than a hash map: sched_switch asks twice per
 * context switch of the whole machine whether a task is watched, and a
 * hash lookup (a helper call, a hash, a bucket walk) was a third of the
 * cost of a switch that watches nothing. Sixteen loads from one cache
 * line, stopping at the first 0, cost less than the call alone. Go writes
 * the array through the .bss mmap: a reader may see a half-written set for
 * one switch, which at worst misses or counts one event of a process that
 * just joined or left the group. */
#pragma once

#define MAX_TARGETS 16

/* Packed: the members come first, then zeros. */
volatile __u32 target_tgids[MAX_TARGETS];

static __always_inline int is_target(__u32 tgid)
{
	if (!tgid)
		return 0;
#pragma unroll
	for (int i = 0; i < MAX_TARGETS; i++) {
		__u32 t = target_tgids[i];
		if (t == tgid)
			return 1;
		if (!t)
			return 0;
	}
	return 0;
}
