/* What user-stack registers can be trusted for, before user memory is read
 * through them. Include after culprit.h. */
#pragma once

/* The most a frame pointer may stand above sp: a thread's stack (8 MiB is
 * glibc's and Linux's default). */
#define MAX_FRAME_SPAN (8ULL << 20)

/* frame_pointer reports whether bp can be a frame pointer of the stack at
 * sp: at or above it (a function with no locals, right after its
 * prologue, has bp == sp), by less than a thread's stack. In code built
 * without frame pointers (Debian's nginx, most of the C library) bp is a
 * register like any other, often 0 or a small number, and a read through
 * it takes a page fault: in this project's VM, where a fault in the guest
 * is dear, ~300 ns against tens for a good read. Beside nginx flat out the
 * sched probe's read of bp + 8 at every idle wait was 40 % of its
 * sched_switch run time (scripts/schedab, docs/NOTES.md Session 16). */
static __always_inline int frame_pointer(__u64 sp, __u64 bp)
{
	return sp && bp >= sp && bp - sp < MAX_FRAME_SPAN;
}
