/* The event ring buffer every probe with events has, and its loss counter:
 * records that did not fit are counted in `lost`, which Go reads into
 * culprit_probe_events_lost_total. Include after bpf_helpers.h. */
#pragma once

#define CULPRIT_RINGBUF(name)                                                  \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_RINGBUF);                            \
		__uint(max_entries, 65536); /* set from probes.ring_buffer_bytes */ \
	} name SEC(".maps");                                                   \
	struct {                                                               \
		__uint(type, BPF_MAP_TYPE_ARRAY);                              \
		__type(key, __u32);                                            \
		__type(value, __u64);                                          \
		__uint(max_entries, 1);                                        \
	} lost SEC(".maps")

/* output copies ev into ring, counting it in lost when it does not fit. */
#define CULPRIT_OUTPUT(ring, ev) CULPRIT_OUTPUT_FLAGS(ring, ev, 0)

/* CULPRIT_OUTPUT with bpf_ringbuf_output's flags (BPF_RB_NO_WAKEUP: the
 * reader is not woken; Go flushes the ring when it polls). */
#define CULPRIT_OUTPUT_FLAGS(ring, ev, flags)                                  \
	do {                                                                   \
		if (bpf_ringbuf_output(&ring, &(ev), sizeof(ev), (flags))) {   \
			__u32 zero_ = 0;                                       \
			__u64 *n_ = bpf_map_lookup_elem(&lost, &zero_);        \
			if (n_)                                                \
				__sync_fetch_and_add(n_, 1);                   \
		}                                                              \
	} while (0)
