//go:build !race

package faults

import (
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SleepsInStopTheWorld says whether a spinning worker's thread sleeps while
// the Go runtime stops the world: not in this build (see hotLoop).
const SleepsInStopTheWorld = false

// The Go runtime's system-call bracket, as the syscall package and cgo use
// it. The runtime keeps both for outside callers (go.dev/issue/67401).
//
//go:linkname entersyscall runtime.entersyscall
func entersyscall()

//go:linkname exitsyscall runtime.exitsyscall
func exitsyscall()

// hotLoop spins until d has passed or pool or grp no longer holds p0 or g0.
//
// It spins inside the runtime's system-call bracket, as a thread in a long
// cgo call does, which is what a Tokio worker is to a Go runtime: native
// code that nobody stops. A goroutine in a system call does not hold up a
// stop-the-world (GC, goroutine profiles) nor forEachP: the world stops
// and restarts around it while its thread stays on the CPU, so the sched
// probe sees one unbroken busy run however many GCs happen meanwhile.
// Before, the loop was plain Go code that made no preemptible call: the
// next stop-the-world waited for it forever, and the whole process hung
// (it waited on a clock that only the stopped world could advance).
//
// Between the two brackets the runtime forbids what needs a P: stack
// growth (it throws), heap writes with write barriers, race
// instrumentation (hence the race build's own hotLoop). So the loop only
// does arithmetic on locals, atomic loads (plain MOVs without -race), and
// raw system calls (nosplit): the clock is read with clock_gettime every
// 10000 rounds, about 40 µs on this project's VM for a 0.5 µs call.
//
//go:noinline
func hotLoop(d time.Duration, pool *int64, p0 int64, grp *int64, g0 int64) uint64 {
	var ts unix.Timespec
	x := uint64(88172645463325252)
	entersyscall()
	_, _, errno := unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
	// Nanoseconds by hand: Timespec.Nano is a call, which this bracket
	// only allows when the compiler inlines it.
	end := ts.Sec*1e9 + ts.Nsec + int64(d)
	for errno == 0 && atomic.LoadInt64(pool) == p0 && atomic.LoadInt64(grp) == g0 {
		for i := 0; i < 10000; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
		// An error (none is possible for CLOCK_MONOTONIC) ends the loop
		// rather than let it spin past its end unseen.
		_, _, errno = unix.RawSyscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
		if ts.Sec*1e9+ts.Nsec >= end {
			break
		}
	}
	exitsyscall()
	return x
}
