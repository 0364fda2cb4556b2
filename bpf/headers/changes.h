/* A probe's change counters: Go maps this array (BPF_F_MMAPABLE) and reads
 * it at every poll without a system call. A poll that finds a counter where
 * it was skips walking the map it stands for, so a quiet target costs a
 * memory read per poll rather than a map walk (a cold walk of a 4096-bucket
 * hash map costs ~100 us of system call and Go code). Include after
 * bpf_helpers.h; define CULPRIT_CHANGES before use. */
#pragma once

#define CULPRIT_F_MMAPABLE (1U << 10) /* BPF_F_MMAPABLE, linux/bpf.h */

/* Counters per CPU, a cache line each: Go sizes the array to
 * CULPRIT_CHANGES_LINE * (1 + possible CPUs) entries before loading (probes
 * load.go). Line 0 holds the flags Go writes (CULPRIT_WAKES' slot) and, for
 * a CPU past the array, the counters themselves; line 1 + cpu holds that
 * CPU's counters. One shared counter bumped from every CPU bounced its cache
 * line between them at every event: nginx flat out lost ~4 % of its
 * requests/s to that alone (measured with the bumps removed). */
#define CULPRIT_CHANGES_LINE 8

/* CULPRIT_CHANGES(n) declares the counters, one per polled map (n <= 8),
 * and changed(i), which bumps counter i after its map was written. Go sums
 * counter i over the lines and only compares the sum with the one it saw
 * before its last walk, so the bump comes after the write it stands for. */
#define CULPRIT_CHANGES(n)                                                     \
	_Static_assert((n) <= CULPRIT_CHANGES_LINE, "too many change counters"); \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);                              \
		__uint(map_flags, CULPRIT_F_MMAPABLE);                         \
		__type(key, __u32);                                            \
		__type(value, __u64);                                          \
		__uint(max_entries, n);                                        \
	} changes SEC(".maps");                                                \
	static __always_inline void changed(__u32 i)                           \
	{                                                                      \
		__u32 k = CULPRIT_CHANGES_LINE * (bpf_get_smp_processor_id() + 1) + i; \
		__u64 *c = bpf_map_lookup_elem(&changes, &k);                  \
		if (!c)                                                        \
			c = bpf_map_lookup_elem(&changes, &i);                 \
		if (c)                                                         \
			__sync_fetch_and_add(c, 1);                            \
	}

/* bpf_ringbuf_output/submit flags, linux/bpf.h. */
#define CULPRIT_RB_NO_WAKEUP 1
#define CULPRIT_RB_FORCE_WAKEUP 2
/* bpf_ringbuf_query flag. */
#define CULPRIT_RB_AVAIL_DATA 0

/* CULPRIT_WAKES(slot) declares wakes, a small ring buffer whose records
 * wake the Go side at once, and wake_go(), which sends one when Go armed it:
 * Go sets entry `slot` of changes (in line 0) to 1 while its clock idles
 * (polling a second apart), and the first event after that clears it and
 * wakes Go, which then polls every 100 ms for a while. Include after
 * CULPRIT_CHANGES. */
#define CULPRIT_WAKES(slot)                                                    \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                            \
		__uint(max_entries, 4096);                                     \
	} wakes SEC(".maps");                                                  \
	static __always_inline void wake_go(void)                               \
	{                                                                      \
		__u32 i = slot;                                                \
		__u64 *a = bpf_map_lookup_elem(&changes, &i);                  \
		if (a && *a) {                                                 \
			*a = 0;                                                \
			__u64 one = 1;                                         \
			bpf_ringbuf_output(&wakes, &one, sizeof(one), 0);      \
		}                                                              \
	}
