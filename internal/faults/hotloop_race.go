//go:build race

package faults

import (
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// SleepsInStopTheWorld says whether a spinning worker's thread sleeps while
// the Go runtime stops the world: under -race it does (see hotLoop).
const SleepsInStopTheWorld = true

// hotLoop spins until d has passed or pool or grp no longer holds p0 or g0.
//
// The race runtime needs a P for every instrumented access, so under -race
// the loop cannot spin inside the system-call bracket as hotloop.go's
// does. Instead, every 10000 rounds (about 40 µs) it reads the clock with a real
// clock_gettime through unix.Syscall: the syscall package's entry and exit
// are nosplit, so the call is no preemption point, but entering it hands
// the P to a pending stop-the-world or forEachP. The world cannot hang on
// this loop; the price is that the thread sleeps through each
// stop-the-world that catches it, and a long one (over sched.busy_gap,
// under heavy GC on a loaded machine) splits its busy run.
//
//go:noinline
func hotLoop(d time.Duration, pool *int64, p0 int64, grp *int64, g0 int64) uint64 {
	var ts unix.Timespec
	x := uint64(88172645463325252)
	_, _, errno := unix.Syscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
	end := ts.Sec*1e9 + ts.Nsec + int64(d)
	for errno == 0 && atomic.LoadInt64(pool) == p0 && atomic.LoadInt64(grp) == g0 {
		for i := 0; i < 10000; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
		_, _, errno = unix.Syscall(unix.SYS_CLOCK_GETTIME, unix.CLOCK_MONOTONIC, uintptr(unsafe.Pointer(&ts)), 0)
		if ts.Sec*1e9+ts.Nsec >= end {
			break
		}
	}
	return x
}
