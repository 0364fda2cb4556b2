// SPDX-License-Identifier: (GPL-2.0-only OR MIT)
/* sched: per-thread scheduling of the target process.
 *
 * The worker thread of an async runtime that stops serving its event loop
 * is the most common cause of a slow service (seed 000 Problems A, F, G).
 * From the scheduler's side it looks like one of two things:
 *   - the thread goes off-CPU voluntarily (it sleeps in a syscall) for long:
 *     a blocking call. The stacks it went off-CPU with name the call.
 *   - the thread runs for long without sleeping (it is only preempted): CPU
 *     work that never yields. Its peers then wait longer on the run queue.
 * So, for the target's threads only (tgid in `target_tgids`), this keeps:
 *   - run-queue latency (wake-up or preemption to switch-in), log2 buckets,
 *   - on-CPU time and voluntary/involuntary switch counts,
 *   - the current "busy run": time since the thread last slept voluntarily
 *     for longer than busy_gap_ns, and a log2 histogram of finished busy
 *     runs,
 *   - the current off-CPU interval with the user and kernel stacks it
 *     started with, and a ring buffer event when one longer than
 *     min_block_ns ends.
 * All programs are tp_btf: no tracefs; CAP_BPF + CAP_PERFMON suffice. */
#include "culprit.h"
#include <bpf/bpf_helpers.h>
#include "targets.h"
#include "ringbuf.h"
#include "changes.h"
#include "frames.h"
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char __license[] SEC("license") = "Dual MIT/GPL";

#define RUNQ_SLOTS 24 /* log2 microseconds: up to ~8 s */
#define BUSY_SLOTS 16 /* log2 milliseconds: up to ~32 s */
#define MAX_STACK_DEPTH 127
/* Words of the user stack copied from sp when a thread goes to sleep: Go
 * unwinds from them, by .eh_frame, the leaf frames that the frame-pointer
 * walk skips (a libc wrapper built without frame pointers hides the
 * function that called it). 256 bytes covers syscall wrappers' frames. */
#define SCAN_WORDS 32

/* Set from Go before loading. */
volatile const __u64 min_block_ns = 100ULL * 1000 * 1000;
/* A sleep shorter than this does not end a busy run: a page fault or a
 * brief lock wait in the middle of CPU work is not the thread going back to
 * its event loop. */
volatile const __u64 busy_gap_ns = 1000ULL * 1000;

struct thread_stats {
	/* Only the thread's own switches write oncpu_ns, voluntary,
	 * involuntary and the run-queue figures, and a thread switches on one
	 * CPU at a time (it cannot be switched in elsewhere before its switch
	 * out is done): plain adds, not atomic ones. Its wakers also write
	 * what end_block does: those stay atomic. With the stack words not
	 * copied again at an idle wait's kept site (scan_site) and one change
	 * bump a run, 5 % less run time per sched_switch beside nginx flat
	 * out (616 against 650 ns, two A/B and two B/A runs of 40 s, the
	 * builds attached in turns a second each).
	 *
	 * What every switch of the thread reads or writes comes first, in
	 * two or three cache lines of the element rather than five spread
	 * over it: 4-6 % less run time per sched_switch run beside nginx
	 * flat out (both builds loaded at once and attached in turns, a
	 * second each). Of the ~850 ns a run cost there then, ~300 were a
	 * page fault (frame_pointer); ~370 ns now. */
	__u32 tgid;
	__u32 quiet; /* the current/last sleep is in one of quiet_calls */
	char comm[TASK_COMM_LEN]; /* at the last switch out (or creation) */
	__u64 runnable_since; /* woken or preempted, waiting for a CPU; 0 if not */
	__u64 oncpu_since;    /* switched in at; 0 when off-CPU */
	__u64 busy_since;     /* first switch-in after the last voluntary sleep */
	__u64 offcpu_since;   /* voluntary switch-out at; 0 when not sleeping */
	__u64 oncpu_ns;       /* total on-CPU time (finished slices) */
	__u64 runq_ns;        /* total run-queue wait */
	__u64 voluntary;      /* switches out while sleeping */
	__u64 involuntary;    /* switches out while runnable (preempted) */
	__u64 runq_slots[RUNQ_SLOTS];
	__u64 busy_slots[BUSY_SLOTS];
	__u64 offcpu_ns;      /* total voluntary off-CPU time (finished) */
	__u64 long_blocks;    /* finished off-CPU intervals >= min_block_ns */
	__s32 off_ustack;     /* stacks the current/last sleep started with */
	__s32 off_kstack;
	__u64 off_sp;         /* user sp and bp then; sp 0 if the copy failed */
	__u64 off_bp;
	__u64 off_ip;         /* user ip then: the user stack's first frame */
	__u64 off_scan[SCAN_WORDS];
	/* Where the thread's last quiet sleep began, and the stack ids taken
	 * then (see same_site); site_gen is the stack map's generation then,
	 * plus one (0: none kept). */
	__u64 site_ip;
	__u64 site_sp;
	__u64 site_bp;
	__u64 site_ret; /* the return address at bp + 8 (0 if unreadable, or bp is no frame pointer) */
	__u32 site_nr;
	__u32 site_gen;
	__s32 site_ustack;
	__s32 site_kstack;
	/* off_scan holds the words copied when the kept site was taken: a
	 * sleep at that site need not copy them again. */
	__u32 scan_site;
	/* The current/last time off-CPU is a stop (STOPPED_STATES), not a
	 * sleep: a SIGSTOP or a tracer holds the thread wherever it was, in
	 * a syscall or not, and it waits for nothing of its own. */
	__u32 stopped;
};

struct block_event {
	__u32 tid;
	__u32 tgid;
	__u64 start_ns;
	__u64 dur_ns;
	__s32 ustack;
	__s32 kstack;
	__u32 waker_tid;
	__u32 quiet; /* bit 0: the sleep was in one of quiet_calls; bit 1: a stop (thread_stats.stopped) */
	char comm[TASK_COMM_LEN]; /* when the sleep began */
	__u64 sp;
	__u64 bp;
	__u64 ip;
	__u64 scan[SCAN_WORDS];
};

/* The user ip of pt_regs (culprit.h declares bp and sp only); the ___ip
 * flavour relocates against the kernel's struct pt_regs. */
struct pt_regs___ip {
	unsigned long ip;
} __attribute__((preserve_access_index));

/* All zeros (.bss): the template of a new thread's entry. */
struct thread_stats zero_stats = {};

/* Keeps block_event in the BTF, so bpf2go emits its Go type. */
const struct block_event *unused_block_event __attribute__((unused));

/* max_entries set from Go (sched.max_threads). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, __u32);
	__type(value, struct thread_stats);
	__uint(max_entries, 4096);
} threads SEC(".maps");

/* max_entries set from Go (sched.max_stacks). */
struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, MAX_STACK_DEPTH * sizeof(__u64));
	__uint(max_entries, 4096);
} stacks SEC(".maps");

CULPRIT_RINGBUF(blocks);

/* [0]: the threads map changed (a target thread switched or woke).
 * [1]: armed (changes.h CULPRIT_WAKES).
 * [2]: not a counter: the stack map's generation, which Go bumps before
 *      it empties the map (probes/sched.go resetStacks), so that no stack
 *      id from before is reused after. */
#define STACK_GEN 2
CULPRIT_CHANGES(3)
CULPRIT_WAKES(1)

static __always_inline __u32 stack_gen(void)
{
	__u32 i = STACK_GEN;
	__u64 *g = bpf_map_lookup_elem(&changes, &i);
	return g ? (__u32)*g : 0;
}

/* System calls (x86-64 numbers, a bit each) in which a sleep is a worker's
 * idle wait (rules.workers.idle_syscalls), set from Go before loading: such
 * a sleep wakes nobody, neither when it begins nor when it ends long (its
 * block event waits in the ring for Go's next look). Any other sleep that
 * begins while Go idles wakes it: it may be a blocking call. */
volatile const __u64 quiet_calls[8] = {};

/* A nanosleep or relative clock_nanosleep shorter than this (set from Go:
 * sched.min_block) cannot become a block episode: it is quiet too. Go's
 * runtime (sysmon) and spin-backoffs sleep so, many times a second. */
volatile const __u64 short_sleep_ns = 0;

/* The system call number and arguments a task entered the kernel with
 * (x86-64). */
struct pt_regs___nr {
	unsigned long orig_ax;
	unsigned long di;
	unsigned long si;
	unsigned long dx;
} __attribute__((preserve_access_index));

/* __TASK_STOPPED and __TASK_TRACED (include/linux/sched.h): prev_state
 * of a thread switched out by a stop signal or a tracer. */
#define STOPPED_STATES (0x4 | 0x8)

#define NR_NANOSLEEP 35
#define NR_CLOCK_NANOSLEEP 230
#define TIMER_ABSTIME 1

struct timespec___user {
	__s64 sec;
	__s64 nsec;
};

/* short_sleep: the call is a timed sleep asking for less than
 * short_sleep_ns. */
static __always_inline __u32 short_sleep(const struct pt_regs___nr *r, __u64 nr)
{
	const void *req;
	if (!short_sleep_ns)
		return 0;
	if (nr == NR_NANOSLEEP) {
		req = (const void *)r->di;
	} else if (nr == NR_CLOCK_NANOSLEEP) {
		if (r->si & TIMER_ABSTIME)
			return 0;
		req = (const void *)r->dx;
	} else {
		return 0;
	}
	struct timespec___user ts;
	if (bpf_probe_read_user(&ts, sizeof(ts), req))
		return 0;
	return ts.sec >= 0 && ts.nsec >= 0 && (__u64)ts.sec * 1000000000ULL + (__u64)ts.nsec < short_sleep_ns;
}

/* syscall_nr is the system call the task sleeps in (512 when unknown). */
static __always_inline __u64 syscall_nr(struct pt_regs *regs)
{
	if (!bpf_core_field_exists(((struct pt_regs___nr *)0)->orig_ax))
		return 512;
	const struct pt_regs___nr *r = (const void *)regs;
	return r->orig_ax;
}

static __always_inline __u32 quiet_call(struct pt_regs *regs, __u64 nr)
{
	if (nr >= 512)
		return 0;
	if ((quiet_calls[nr >> 6] >> (nr & 63)) & 1)
		return 1;
	return short_sleep((const struct pt_regs___nr *)regs, nr);
}

/* same_site reports whether a quiet sleep begins where the thread's last
 * one did, so that its stack ids can be reused rather than walked again:
 * an event loop's idle wait, every time, beside nginx flat out ~20,000
 * times a second, and two stack walks each were most of this program's
 * cost. The same system call, user ip, sp and frame pointer, the same
 * return address at bp + 8, and the same stack map generation: a walk
 * from the same registers over the same frame chain. The stack words near
 * sp are not compared: they hold the sleeping function's locals. */
static __always_inline int same_site(const struct thread_stats *st, __u64 nr, __u64 ip, __u64 sp, __u64 bp, __u64 ret, __u32 gen)
{
	return st->site_gen == gen && st->site_nr == nr && st->site_ip == ip && st->site_sp == sp && st->site_bp == bp && st->site_ret == ret;
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

/* The task pointers here are tp_btf arguments, which the verifier trusts:
 * plain loads (relocated by CO-RE all the same) rather than
 * BPF_CORE_READ's bpf_probe_read_kernel calls, which cost a helper call
 * each on every context switch of the machine. */
static __always_inline int watched(const struct task_struct *t)
{
	return is_target(t->tgid);
}

static __always_inline struct thread_stats *stats_of(const struct task_struct *t)
{
	__u32 tid = t->pid;
	struct thread_stats *st = bpf_map_lookup_elem(&threads, &tid);
	if (st)
		return st;
	/* Inserted from a zeroed template: the struct is too big for the BPF
	 * stack. Only this thread's own switches and its wakers race on a new
	 * entry, and a zero they might see for a moment is harmless. */
	bpf_map_update_elem(&threads, &tid, &zero_stats, BPF_NOEXIST);
	st = bpf_map_lookup_elem(&threads, &tid);
	if (st && st->tgid == 0) {
		st->tgid = t->tgid;
		st->off_ustack = -1;
		st->off_kstack = -1;
		BPF_CORE_READ_STR_INTO(&st->comm, t, comm);
	}
	return st;
}

/* end_block closes the thread's off-CPU interval; woken by waker (0 if
 * unknown). */
static __always_inline void end_block(struct thread_stats *st, __u32 tid, __u64 now, __u32 waker)
{
	__u64 since = st->offcpu_since;
	if (!since || now < since)
		return;
	st->offcpu_since = 0;
	__u64 dur = now - since;
	__sync_fetch_and_add(&st->offcpu_ns, dur);
	if (dur >= busy_gap_ns && st->busy_since) {
		if (since > st->busy_since) {
			__u64 ms = (since - st->busy_since) / 1000000;
			__u32 slot = log2_u64(ms + 1);
			if (slot >= BUSY_SLOTS)
				slot = BUSY_SLOTS - 1;
			__sync_fetch_and_add(&st->busy_slots[slot], 1);
		}
		st->busy_since = 0;
	}
	if (dur < min_block_ns)
		return;
	__sync_fetch_and_add(&st->long_blocks, 1);
	/* Reserved in place: with the stack copy the event is too big for the
	 * BPF stack. */
	struct block_event *ev = bpf_ringbuf_reserve(&blocks, sizeof(*ev), 0);
	if (!ev) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			__sync_fetch_and_add(n, 1);
		return;
	}
	ev->tid = tid;
	ev->tgid = st->tgid;
	ev->start_ns = since;
	ev->dur_ns = dur;
	ev->ustack = st->off_ustack;
	ev->kstack = st->off_kstack;
	ev->waker_tid = waker;
	ev->quiet = st->quiet | (st->stopped << 1);
	__builtin_memcpy(ev->comm, st->comm, TASK_COMM_LEN);
	ev->sp = st->off_sp;
	ev->bp = st->off_bp;
	ev->ip = st->off_ip;
	__builtin_memcpy(ev->scan, st->off_scan, sizeof(ev->scan));
	/* An idle wait that ended long is no news, nor is a stop: Go reads
	 * it at its next look rather than being woken for it. */
	bpf_ringbuf_submit(ev, (st->quiet || st->stopped) ? CULPRIT_RB_NO_WAKEUP : 0);
}

static __always_inline int on_wakeup(const struct task_struct *p)
{
	if (!watched(p))
		return 0;
	struct thread_stats *st = stats_of(p);
	if (!st)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u32 waker = (__u32)bpf_get_current_pid_tgid();
	end_block(st, p->pid, now, waker);
	if (!st->runnable_since)
		st->runnable_since = now;
	changed(0);
	return 0;
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(culprit_sched_wakeup, struct task_struct *p)
{
	return on_wakeup(p);
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(culprit_sched_wakeup_new, struct task_struct *p)
{
	return on_wakeup(p);
}

SEC("tp_btf/sched_switch")
int BPF_PROG(culprit_sched_switch, bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state)
{
	int wprev = watched(prev), wnext = watched(next);
	/* Most switches of the machine are of other processes: they stop at
	 * the two filters, before the clock read. In a KVM guest with a
	 * paravirtual clock that read was ~40 % of such a run
	 * (BenchmarkSchedProbe/other: 2,600 -> 1,600 ns of eBPF run time per
	 * round trip, BPF stats included). */
	if (!wprev && !wnext)
		return 0;
	__u64 now = bpf_ktime_get_ns();

	if (wprev) {
		struct thread_stats *st = stats_of(prev);
		if (st) {
			if (st->oncpu_since && now > st->oncpu_since)
				st->oncpu_ns += now - st->oncpu_since;
			st->oncpu_since = 0;
			/* The name as it goes off-CPU: a new thread runs under its
			 * parent's name until it renames itself (prctl, or
			 * pthread_setname_np), which it does while running. Copied at
			 * switch-in only, a sleep that follows the rename would carry
			 * the old name. prev is current here. Two plain loads from
			 * the trusted task pointer, stored only when the name
			 * changed, rather than bpf_get_current_comm (a helper call
			 * and a byte-wise copy, and a store to the entry at every
			 * switch): ~10 % less run time per sched_switch run beside
			 * nginx flat out (299 against 332 ns, scripts/schedab). A
			 * rename racing this read (only from /proc/PID/comm) may
			 * show torn for one switch, as with the helper. */
			const __u64 *name = (const __u64 *)prev->comm;
			__u64 *kept = (__u64 *)st->comm;
			__u64 n0 = name[0], n1 = name[1];
			if (kept[0] != n0 || kept[1] != n1) {
				kept[0] = n0;
				kept[1] = n1;
			}
			/* TASK_RUNNING is 0: preempted (or yielded), still runnable. */
			if (preempt || prev_state == 0) {
				st->involuntary++;
				st->runnable_since = now;
			} else {
				st->voluntary++;
				/* busy_since is reset when the sleep ends, if it was
				 * longer than busy_gap_ns (end_block). */
				st->runnable_since = 0;
				st->offcpu_since = now;
				struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
				__u64 sp = regs->sp;
				__u64 bp = regs->bp;
				/* With BPF_F_REUSE_STACKID a later stack that hashes to
				 * the same bucket replaces this one: Go checks the user
				 * stack it reads still starts here. */
				__u64 ip = ((struct pt_regs___ip *)regs)->ip;
				__u64 nr = syscall_nr(regs);
				st->off_bp = bp;
				st->off_ip = ip;
				st->quiet = quiet_call(regs, nr);
				st->stopped = (prev_state & STOPPED_STATES) != 0;
				__u64 ret = 0;
				__u32 gen = stack_gen() + 1;
				if (st->quiet && frame_pointer(sp, bp) && bpf_probe_read_user(&ret, sizeof(ret), (const void *)(bp + 8)))
					ret = 0;
				int same = st->quiet && same_site(st, nr, ip, sp, bp, ret, gen);
				int kept = 0;
				/* An event loop's idle wait at its kept site does not
				 * copy the stack words again: they were copied when
				 * the site was taken, and Go unwinds a site once
				 * (probes/sched.go sleepTexts): 256 bytes into four
				 * cold cache lines of the entry, at each of nginx's
				 * thousands of waits a second. */
				int copy = !(same && st->scan_site);
				if (copy) {
					if (sp && !bpf_probe_read_user(st->off_scan, sizeof(st->off_scan), (const void *)sp))
						st->off_sp = sp;
					else
						st->off_sp = 0;
				} else {
					st->off_sp = sp;
				}
				if (same) {
					st->off_ustack = st->site_ustack;
					st->off_kstack = st->site_kstack;
				} else {
					/* prev is current here, so these are its stacks
					 * as it goes to sleep: the blocking call. */
					/* REUSE: a hash collision with another stack
					 * replaces it rather than failing. A missing stack
					 * loses the finding (no syscall, no function); a
					 * replaced one only misnames a stack read after
					 * the collision, and Go reads and caches each
					 * within a poll. */
					st->off_ustack = bpf_get_stackid(ctx, &stacks, BPF_F_USER_STACK | BPF_F_REUSE_STACKID);
					st->off_kstack = bpf_get_stackid(ctx, &stacks, BPF_F_REUSE_STACKID);
					/* A blocking call between two idle waits leaves
					 * the idle wait's site kept (and its words in
					 * off_scan no longer: scan_site below). */
					if (st->quiet)
						st->site_gen = 0;
					if (st->quiet && st->off_ustack >= 0 && st->off_kstack >= 0) {
						st->site_nr = nr;
						st->site_ip = ip;
						st->site_sp = sp;
						st->site_bp = bp;
						st->site_ret = ret;
						st->site_ustack = st->off_ustack;
						st->site_kstack = st->off_kstack;
						st->site_gen = gen;
						kept = 1;
					}
				}
				if (copy)
					st->scan_site = (same || kept) && st->off_sp;
				if (!st->quiet && !st->stopped)
					wake_go();
			}
		}
	}

	if (wnext) {
		struct thread_stats *st = stats_of(next);
		if (st) {
			/* A wake-up we did not see (or that predates the target). */
			end_block(st, next->pid, now, 0);
			if (st->runnable_since && now > st->runnable_since) {
				__u64 wait = now - st->runnable_since;
				__u32 slot = log2_u64(wait / 1000 + 1);
				if (slot >= RUNQ_SLOTS)
					slot = RUNQ_SLOTS - 1;
				st->runq_slots[slot]++;
				st->runq_ns += wait;
			}
			st->runnable_since = 0;
			st->oncpu_since = now;
			if (!st->busy_since)
				st->busy_since = now;
			/* comm is not read again here: the thread renames itself
			 * while it runs, so its switch out copies the new name. */
		}
	}
	changed(0);
	return 0;
}
