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
	// gen: every loop runs while it holds the value the loop started
	// with. An int64 read with atomic.LoadInt64, not an atomic.Int64: under
	// -race the method is a call with a stack check, a preemption point
	// that hotLoop must not have. First field, for 64-bit alignment.
	gen    int64
	TIDs   []int
	queues []chan func()
	def    *Group // the loops started by Workers' own Loop, Duty and HotLoopUntilStop
}

// StartWorkers starts n workers named prefix-i.
func StartWorkers(n int, prefix string) *Workers {
	w := &Workers{TIDs: make([]int, n), queues: make([]chan func(), n)}
	w.def = w.NewGroup(0)
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
func (w *Workers) Loop(i int, body func()) { w.def.Loop(i, body) }

// Stop ends every loop of the pool, its groups' too.
func (w *Workers) Stop() { atomic.AddInt64(&w.gen, 1) }

// HotLoopUntilStop runs HotLoop until Stop, in one task that never yields.
func (w *Workers) HotLoopUntilStop(i int) { w.def.HotLoopUntilStop(i) }

// Duty keeps worker i busy pct% of every 10 ms in short runs that yield,
// until Stop.
func (w *Workers) Duty(i, pct int) { w.def.Duty(i, pct) }

// Group is a set of loops on the pool that stop together, and apart from
// the pool's other loops: one fault, so that faults can overlap and each
// ends on its own time.
type Group struct {
	gen   int64 // as Workers.gen
	w     *Workers
	after time.Duration
	once  sync.Once
}

// NewGroup returns a group whose loops run until its Stop or the pool's,
// or for d after its first task begins on a worker (not after this call:
// a worker busy with another fault's task may take it up later, and a
// fault "for 10s" should hold its worker 10 s). d = 0: until stopped.
func (w *Workers) NewGroup(d time.Duration) *Group { return &Group{w: w, after: d} }

// Stop ends the group's loops.
func (g *Group) Stop() { atomic.AddInt64(&g.gen, 1) }

// running says whether neither the pool nor the group stopped since they
// held pg and gg.
func (g *Group) running(pg, gg int64) bool {
	return atomic.LoadInt64(&g.w.gen) == pg && atomic.LoadInt64(&g.gen) == gg
}

// begin arms the group's timer, at its first task.
func (g *Group) begin() {
	if g.after > 0 {
		g.once.Do(func() { time.AfterFunc(g.after, g.Stop) })
	}
}

// Loop runs body on worker i again and again, each run a task of its own,
// until the group or the pool stops.
func (g *Group) Loop(i int, body func()) {
	pg, gg := atomic.LoadInt64(&g.w.gen), atomic.LoadInt64(&g.gen)
	var again func()
	again = func() {
		if !g.running(pg, gg) {
			return
		}
		g.begin()
		body()
		select {
		case g.w.queues[i] <- again:
		default: // queue full: the loop ends rather than block the worker
		}
	}
	g.w.queues[i] <- again
}

// HotLoopUntilStop runs HotLoop on worker i until the group or the pool
// stops, in one task that never yields.
func (g *Group) HotLoopUntilStop(i int) {
	pg, gg := atomic.LoadInt64(&g.w.gen), atomic.LoadInt64(&g.gen)
	g.w.Submit(i, func() {
		if !g.running(pg, gg) {
			return
		}
		g.begin()
		Sink.Add(hotLoop(forever, &g.w.gen, pg, &g.gen, gg))
	})
}

// Duty keeps worker i busy pct% of every 10 ms in short runs that yield,
// until the group or the pool stops.
func (g *Group) Duty(i, pct int) {
	busy := time.Duration(pct) * 100 * time.Microsecond
	g.Loop(i, func() {
		Sink.Add(HotLoop(busy))
		time.Sleep(10*time.Millisecond - busy)
	})
}

// Sink keeps HotLoop's result alive.
var Sink atomic.Uint64

var never int64

// forever is a hot loop's duration when only Stop ends it: a century, which
// still adds to a monotonic clock without overflow.
const forever = 100 * 365 * 24 * time.Hour

// HotLoop burns CPU for about d without giving its thread back: a
// CPU-heavy task on an async worker, which runs until it is done. It is
// its own function, never inlined, so a CPU profile names it.
//
// The loop makes no call that can preempt it: Go's scheduler preempts a
// goroutine at the stack check of a function call (or by signal, unless
// GODEBUG=asyncpreemptoff=1), and a preempted goroutine on a locked thread
// puts the thread to sleep until it is scheduled again, which is not what
// a Tokio worker does. Yet a goroutine that never stops hangs the whole
// process at the next stop-the-world (a GC, a goroutine profile): see
// hotLoop (hotloop.go; hotloop_race.go under -race) for how the loop lets
// the world stop without it.
//
//go:noinline
func HotLoop(d time.Duration) uint64 { return hotLoop(d, &never, 0, &never, 0) }

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
