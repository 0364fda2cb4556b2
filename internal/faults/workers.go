package faults

import (
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Workers is a pool shaped like an async runtime: N worker threads named
// PREFIX-0 ... PREFIX-N-1, each a locked OS thread running the tasks sent
// to it in order and sleeping in futex between them (an event loop's idle
// wait). A blocking call or a long CPU run in a task holds up every task
// queued behind it on that worker, as on a Tokio or actix worker.
//
// For HotLoop to keep its thread on the CPU, the process should run with
// GODEBUG=asyncpreemptoff=1 and more GOMAXPROCS than busy workers: see
// HotLoop.
type Workers struct {
	TIDs   []int
	queues []chan func()
	gen    atomic.Int64 // loops run while it equals the value they started with
}

// StartWorkers starts n workers named prefix-i.
func StartWorkers(n int, prefix string) *Workers {
	startClock()
	w := &Workers{TIDs: make([]int, n), queues: make([]chan func(), n)}
	var wg sync.WaitGroup
	for i := range n {
		w.queues[i] = make(chan func(), 16)
		wg.Add(1)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread stays the worker's
			setThreadName(prefix + "-" + strconv.Itoa(i))
			w.TIDs[i] = unix.Gettid()
			wg.Done()
			for f := range w.queues[i] {
				f()
			}
		}()
	}
	wg.Wait()
	return w
}

// Len is the number of workers.
func (w *Workers) Len() int { return len(w.queues) }

// Submit queues f on worker i.
func (w *Workers) Submit(i int, f func()) { w.queues[i] <- f }

// Loop runs body on worker i again and again, each run a task of its own,
// until Stop.
func (w *Workers) Loop(i int, body func()) {
	g := w.gen.Load()
	var again func()
	again = func() {
		if w.gen.Load() != g {
			return
		}
		body()
		select {
		case w.queues[i] <- again:
		default: // queue full: the loop ends rather than block the worker
		}
	}
	w.queues[i] <- again
}

// Stop ends every Loop and every HotLoopUntilStop.
func (w *Workers) Stop() { w.gen.Add(1) }

// HotLoopUntilStop runs HotLoop until Stop, in one task that never yields.
func (w *Workers) HotLoopUntilStop(i int) {
	g := w.gen.Load()
	w.Submit(i, func() { Sink.Add(hotLoop(time.Hour, &w.gen, g)) })
}

// Duty keeps worker i busy pct% of every 10 ms in short runs that yield,
// until Stop.
func (w *Workers) Duty(i, pct int) {
	busy := time.Duration(pct) * 100 * time.Microsecond
	w.Loop(i, func() {
		Sink.Add(HotLoop(busy))
		time.Sleep(10*time.Millisecond - busy)
	})
}

// Sink keeps HotLoop's result alive.
var Sink atomic.Uint64

var never atomic.Int64

// HotLoop burns CPU for about d without a system call and without giving
// its thread back: a CPU-heavy task on an async worker, which runs until it
// is done. It is its own function, never inlined, so a CPU profile names
// it.
//
// The loop makes no function call: Go's scheduler preempts a goroutine at
// calls (or by signal, unless GODEBUG=asyncpreemptoff=1), and a preempted
// goroutine on a locked thread puts the thread to sleep until it is
// scheduled again, which is not what a Tokio worker does.
//
//go:noinline
func HotLoop(d time.Duration) uint64 { return hotLoop(d, &never, 0) }

//go:noinline
func hotLoop(d time.Duration, gen *atomic.Int64, g int64) uint64 {
	end := clockMillis.Load() + d.Milliseconds()
	x := uint64(88172645463325252)
	for clockMillis.Load() < end && gen.Load() == g {
		for i := 0; i < 10000; i++ {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
		}
	}
	return x
}

// clockMillis is the time in milliseconds, kept by a goroutine of its own:
// HotLoop reads it with an atomic load, which is not a call.
var (
	clockMillis atomic.Int64
	clockOnce   sync.Once
)

func startClock() {
	clockOnce.Do(func() {
		clockMillis.Store(time.Now().UnixMilli())
		go func() {
			for {
				clockMillis.Store(time.Now().UnixMilli())
				time.Sleep(time.Millisecond)
			}
		}()
	})
}

// BlockingCall sleeps in the kernel for d, as a blocking driver call (a
// DNS lookup, fsync, a sync database client) does. Its own function, never
// inlined, so the off-CPU stack names it.
//
//go:noinline
func BlockingCall(d time.Duration) {
	ts := unix.NsecToTimespec(d.Nanoseconds())
	for {
		var rem unix.Timespec
		if err := unix.Nanosleep(&ts, &rem); err != unix.EINTR {
			return
		}
		ts = rem // the Go runtime's preemption signals interrupt it
	}
}

// WaitForPoolSlot waits on a channel, as code waiting for a database
// connection or a semaphore does: the thread sleeps in futex, using no CPU.
//
//go:noinline
func WaitForPoolSlot(d time.Duration) {
	<-time.After(d)
}

func setThreadName(name string) {
	b := append([]byte(name), 0)
	_ = unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&b[0])), 0, 0, 0)
}
