/* The processes a probe watches: tgid -> 1, kept by Go to the current
 * target (probes/load.go retarget). Include after bpf_helpers.h. */
#pragma once

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __u8);
	__uint(max_entries, 16);
} targets SEC(".maps");

static __always_inline int is_target(__u32 tgid)
{
	return bpf_map_lookup_elem(&targets, &tgid) != NULL;
}
