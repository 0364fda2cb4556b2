package rules

import (
	"fmt"
	"slices"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// A process can be stopped rather than slow: a stop signal (SIGSTOP, or
// SIGTSTP, SIGTTIN, SIGTTOU from a shell's job control) puts every thread
// in state T, a tracer that stops it (a debugger, strace) in state t. Its
// threads then look like sleepers, each in the system call it was in when
// it stopped (a futex, epoll_wait), and its listeners' queues fill: read
// as a service waiting on a lock (seen: caddy under SIGSTOP was told
// "threads wait in futex ... limited by a lock or a bounded pool"). What
// is true is that nothing of it runs until it gets SIGCONT or the tracer
// lets it go.

// stoppedView is what the threads collector's samples say of a stop.
type stoppedView struct {
	bySignal, byTracer, total float64 // at the latest sample
	// since is the first sample of the run, up to the latest, in which
	// every thread was stopped (the stop began before it, within a
	// collect interval); zero when not every thread is stopped now.
	since time.Time
}

// all reports whether every thread of the process is stopped.
func (v stoppedView) all() bool { return !v.since.IsZero() }

// stoppedThreads reads the thread states the threads collector wrote
// (process_threads{state}: T stopped by a signal, t by a tracer). Its
// latest sample must be fresh.
func stoppedThreads(w Window) stoppedView {
	type counts struct{ stopped, total float64 }
	at := map[time.Time]*counts{}
	var v stoppedView
	var latest time.Time
	for _, ls := range w.Store.Select(signals.ProcessThreads) {
		state := ls.Get("state")
		for _, s := range w.Store.Range(signals.ProcessThreads, ls, time.Time{}) {
			c := at[s.T]
			if c == nil {
				c = &counts{}
				at[s.T] = c
			}
			c.total += s.V
			if state == "T" || state == "t" {
				c.stopped += s.V
			}
			if s.T.After(latest) {
				latest = s.T
			}
		}
		if s, ok := w.Store.Latest(signals.ProcessThreads, ls); ok {
			v.total += s.V
			switch state {
			case "T":
				v.bySignal += s.V
			case "t":
				v.byTracer += s.V
			}
		}
	}
	if latest.IsZero() || !w.Fresh(latest, freshSlow) {
		return stoppedView{}
	}
	times := make([]time.Time, 0, len(at))
	for t := range at {
		times = append(times, t)
	}
	slices.SortFunc(times, func(a, b time.Time) int { return a.Compare(b) })
	for i := len(times) - 1; i >= 0; i-- {
		c := at[times[i]]
		if c.total == 0 || c.stopped < c.total {
			break
		}
		v.since = times[i]
	}
	return v
}

// how says which threads are stopped and by what, as a clause.
func (v stoppedView) how() string {
	const bySignal = "stopped by a signal: SIGSTOP, or SIGTSTP, SIGTTIN or SIGTTOU from a shell's job control"
	const byTracer = "stopped by a tracer: a debugger such as gdb, or strace"
	switch {
	case v.byTracer == 0:
		return fmt.Sprintf("all %s of its threads are in state T, %s", num(v.total), bySignal)
	case v.bySignal == 0:
		return fmt.Sprintf("all %s of its threads are in state t, %s", num(v.total), byTracer)
	}
	return fmt.Sprintf("all %s of its threads are stopped, %s in state T (%s) and %s in state t (%s)", num(v.total), num(v.bySignal), bySignal, num(v.byTracer), byTracer)
}
