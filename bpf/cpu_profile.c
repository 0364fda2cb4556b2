// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* cpu_profile: sampled on-CPU stacks of the target process.
 *
 * A software CPU_CLOCK perf event per CPU (this machine has no hardware
 * PMU) runs this program at profiling.frequency; when the interrupted task
 * belongs to the target, its (thread, user stack, kernel stack) is taken.
 *
 * The user stack the kernel walks by frame pointers loses the callers of
 * code without them: OpenSSL's assembly uses rbp as a general register, so
 * a sample in SHA-512 has no caller at all, and a sample in the C library
 * skips the function that called it. So each sample also carries the user
 * registers (ip, sp, bp) and up to copy_bytes of the user stack from sp,
 * sent on the ring buffer `samples`, and Go unwinds them by the files' CFI
 * (and by frame pointers through JIT code). The event is built in the
 * CPU's scratch entry (too big for the BPF stack) and only the bytes
 * copied go on the ring.
 *
 * A sample that does not go on the ring (copy_bytes 0, ring full) is
 * counted in maps, by its frame-pointer walk, as before. Counts and stacks
 * are double-buffered: the program writes to the pair selected by `gen`,
 * and Go flips `gen` before draining the other pair. Deleting stack ids
 * from a map the program still writes to would let a count refer to a
 * stack id reused for another stack. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "targets.h"
#include "changes.h"
#include "frames.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define MAX_STACK_DEPTH 127
/* The most user stack one sample carries; copy_bytes (set from Go) is at
 * most this. */
#define STACK_COPY_MAX (32 << 10)
#define PAGE_SIZE 4096
#define REDZONE 128

/* Bytes of user stack to copy per sample; 0: none (counts only). Set from
 * Go; a global so that a benchmark can turn it off and on in one run. */
volatile __u32 copy_bytes = 0;

struct sample_key {
	__u32 tid;
	__u32 tgid;
	__s32 ustack;
	__s32 kstack;
};

/* One sample with its stack copy. Only the first
 * offsetof(stack) + stack_len bytes go on the ring. */
struct sample_event {
	__u32 tid;
	__u32 tgid;
	__u64 ip;
	__u64 sp;
	__u64 bp;
	__u32 user_len;   /* bytes of user, 0 when the walk failed */
	__u32 kernel_len; /* bytes of kernel */
	__u32 stack_len;  /* bytes of stack, copied from sp */
	__u32 pad;
	__u64 user[MAX_STACK_DEPTH];   /* frame-pointer walk, leaf first */
	__u64 kernel[MAX_STACK_DEPTH];
	/* The red zone, the 128 bytes below sp that code may use without
	 * moving sp: OpenSSL's SHA-512 keeps its caller's sp at sp-8 there in
	 * its main loop. Zero unless redzone_ok. Right before stack, so that
	 * the two are the memory from sp-128 up. */
	__u64 redzone_ok;
	__u64 redzone[REDZONE / 8];
	/* A page of slack past STACK_COPY_MAX: each copy is at most a page,
	 * and the verifier then sees every one in bounds. */
	__u8 stack[STACK_COPY_MAX + PAGE_SIZE];
};

/* The main thread's stack starts (argc, then argv, envp and auxv above
 * it) at mm->start_stack. */
struct mm_struct___cpu {
	unsigned long start_stack;
} __attribute__((preserve_access_index));

struct task_struct___cpu {
	struct mm_struct___cpu *mm;
} __attribute__((preserve_access_index));

/* Bytes copied past start_stack: argc and argv[0], which no unwinder
 * needs, but a frame that ends right at start_stack is whole. */
#define STACK_TOP_SLACK 64

/* The user registers a task entered the kernel with. */
struct pt_regs___cpu {
	unsigned long ip;
	unsigned long sp;
	unsigned long bp;
} __attribute__((preserve_access_index));

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

/* One scratch event per CPU, indexed by CPU number (max_entries set from
 * Go to the possible CPUs). A per-CPU array cannot hold values this big
 * (32 KiB at most); a perf_event program does not nest on its CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct sample_event);
	__uint(max_entries, 1);
} scratch SEC(".maps");

/* Samples with their stack copies; size set from Go. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} samples SEC(".maps");

/* Samples not counted: [0] map full, [1] no stack. [2]: samples counted
 * without their stack copy because the ring was full. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 3);
} lost SEC(".maps");

/* [0], [1]: samples counted into counts0, counts1 (changes.h): a drain
 * whose generation counted none skips walking its map. */
CULPRIT_CHANGES(2)

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

/* copy_stack copies up to limit bytes of user stack from sp into dst, a
 * page at a time so that a copy reaching past the top of the stack's
 * mapping keeps the pages before it (one read across an unmapped page
 * fails whole). Returns the bytes copied. */
static __always_inline __u32 copy_stack(__u8 *dst, __u64 sp, __u64 limit)
{
	/* 64-bit, so that the bound checked is the register passed. */
	__u64 n = 0;
	for (int i = 0; i <= STACK_COPY_MAX / PAGE_SIZE; i++) {
		if (n >= limit || n > STACK_COPY_MAX)
			break;
		__u64 chunk = PAGE_SIZE - ((sp + n) & (PAGE_SIZE - 1));
		if (chunk > limit - n)
			chunk = limit - n;
		/* The compiler knows chunk <= PAGE_SIZE and would drop the
		 * check; the verifier does not know it without the check. */
		barrier_var(chunk);
		if (chunk > PAGE_SIZE)
			break;
		if (bpf_probe_read_user(dst + n, chunk, (const void *)(sp + n)))
			break;
		n += chunk;
	}
	return n;
}

/* send_sample puts the sample with its stack copy on the ring; 0 when
 * it could not (then it is counted without). */
static __always_inline int send_sample(void *ctx, __u64 id, __u32 limit)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct sample_event *ev = bpf_map_lookup_elem(&scratch, &cpu);
	if (!ev)
		return 0;
	struct pt_regs___cpu *regs = (struct pt_regs___cpu *)bpf_task_pt_regs(bpf_get_current_task_btf());
	ev->tid = (__u32)id;
	ev->tgid = id >> 32;
	ev->ip = BPF_CORE_READ(regs, ip);
	ev->sp = BPF_CORE_READ(regs, sp);
	ev->bp = BPF_CORE_READ(regs, bp);
	/* The kernel's user walk starts at ip and follows bp. Where bp is no
	 * frame pointer (code built without them: nginx), its first read
	 * faults, ~2 of the ~25 us a sample costs beside nginx, and gives ip
	 * alone; or bp points at other memory and the walk returns words
	 * that are not return addresses. Go unwinds such a sample from the
	 * stack copy by CFI either way. */
	long u = sizeof(ev->user[0]);
	if (frame_pointer(ev->sp, ev->bp))
		u = bpf_get_stack(ctx, ev->user, sizeof(ev->user), BPF_F_USER_STACK);
	else
		ev->user[0] = ev->ip;
	long k = bpf_get_stack(ctx, ev->kernel, sizeof(ev->kernel), 0);
	if (u < 0 && k < 0)
		return 0; /* counted (or lost as no_stack) the old way */
	ev->user_len = u > 0 ? u : 0;
	ev->kernel_len = k > 0 ? k : 0;
	__u64 copied = 0;
	ev->redzone_ok = 0;
	if (ev->sp) {
		/* A main thread's frames all lie below start_stack; above it
		 * are the arguments and the environment, then the end of the
		 * stack's mapping. Beside nginx (8 KiB of them) a 16 KiB copy
		 * from a worker's sp copied them too, and faulted on the page
		 * past the mapping at most samples; so the copy stops there.
		 * Other threads' stacks are elsewhere (sp far from it) and
		 * keep the whole limit. */
		const struct task_struct___cpu *t = (const void *)bpf_get_current_task_btf();
		__u64 top = BPF_CORE_READ(t, mm, start_stack);
		if (top > ev->sp && top - ev->sp + STACK_TOP_SLACK < limit)
			limit = top - ev->sp + STACK_TOP_SLACK;
		copied = copy_stack(ev->stack, ev->sp, limit);
		ev->redzone_ok = copied && ev->sp > REDZONE &&
				 !bpf_probe_read_user(ev->redzone, sizeof(ev->redzone), (const void *)(ev->sp - REDZONE));
	}
	ev->stack_len = copied;
	/* As in copy_stack: the bound checked must be the register passed. */
	barrier_var(copied);
	if (copied > STACK_COPY_MAX)
		return 0;
	__u64 size = __builtin_offsetof(struct sample_event, stack) + copied;
	/* Go reads the samples once a drain interval (it flushes the ring);
	 * only a ring filling past half wakes it sooner: a sample a wake-up
	 * would cost the VM more than its unwinding. */
	__u64 flags = CULPRIT_RB_NO_WAKEUP;
	if (bpf_ringbuf_query(&samples, CULPRIT_RB_AVAIL_DATA) > bpf_ringbuf_query(&samples, 1 /* BPF_RB_RING_SIZE */) / 2)
		flags = CULPRIT_RB_FORCE_WAKEUP;
	if (bpf_ringbuf_output(&samples, ev, size, flags)) {
		count_lost(2);
		return 0;
	}
	return 1;
}

SEC("perf_event")
int culprit_cpu_sample(struct bpf_perf_event_data *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tgid = id >> 32;
	if (!is_target(tgid))
		return 0;
	__u32 limit = copy_bytes;
	if (limit > STACK_COPY_MAX)
		limit = STACK_COPY_MAX;
	if (limit && send_sample(ctx, id, limit))
		return 0;
	__u32 zero = 0;
	__u32 *g = bpf_map_lookup_elem(&gen, &zero);
	if (g && (*g & 1)) {
		count(ctx, &counts1, &stacks1, id);
		changed(1);
	} else {
		count(ctx, &counts0, &stacks0, id);
		changed(0);
	}
	return 0;
}
