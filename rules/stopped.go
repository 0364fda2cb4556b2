package rules

import (
	"fmt"
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
// lets it go. A prefork server (nginx) serves from its children: with its
// workers stopped and its master in its idle rt_sigsuspend, nginx was told
// "threads wait in rt_sigsuspend"; its workers are what is stopped.

// stoppedView is what the threads collector's samples say of a stop.
type stoppedView struct {
	bySignal, byTracer, total float64 // of the stopped set, at the latest sample
	// children: the stopped set is the target's child processes (its own
	// threads are not stopped); withChildren: the stopped set is the
	// target and children it has.
	children, withChildren bool
	// since is the first sample of the run, up to the latest, in which
	// every thread of the set was stopped (the stop began before it,
	// within a collect interval); zero when not all are stopped now.
	since time.Time
}

// all reports whether every thread of the set is stopped.
func (v stoppedView) all() bool { return !v.since.IsZero() }

// stoppedThreads reads the thread states the threads collector wrote:
// process_threads{state} (the target and its children) and
// process_child_threads{state} (its children), T stopped by a signal, t by
// a tracer. The whole group stopped, or else all the children, is a stop.
// The latest sample must be fresh.
func stoppedThreads(w Window) stoppedView {
	g := stoppedIn(w, signals.ProcessThreads)
	c := stoppedIn(w, signals.ProcessChildThreads)
	switch {
	case g.all():
		g.withChildren = c.total > 0
		return g
	case c.all():
		c.children = true
		return c
	}
	return stoppedView{}
}

// stoppedIn is the stop view of one series of thread states. The latest
// samples decide first: the rules run five times a second, and a process
// that is not stopped (nearly always) costs one Latest per state. Only a
// stop now walks back through the samples, newest first, to where it
// began; the collector writes every state at the same instant.
func stoppedIn(w Window, d *signals.Desc) stoppedView {
	var v stoppedView
	var latest time.Time
	lss := w.Store.Select(d)
	for _, ls := range lss {
		s, ok := w.Store.Latest(d, ls)
		if !ok {
			continue
		}
		v.total += s.V
		switch ls.Get("state") {
		case "T":
			v.bySignal += s.V
		case "t":
			v.byTracer += s.V
		}
		if s.T.After(latest) {
			latest = s.T
		}
	}
	if v.total == 0 || v.bySignal+v.byTracer < v.total || !w.Fresh(latest, freshSlow) {
		return stoppedView{}
	}
	type series struct {
		ss   []signals.Sample
		i    int // the next sample to read, walking back
		stop bool
	}
	all := make([]series, 0, len(lss))
	for _, ls := range lss {
		st := ls.Get("state")
		ss := w.Store.Range(d, ls, time.Time{})
		all = append(all, series{ss: ss, i: len(ss) - 1, stop: st == "T" || st == "t"})
	}
	for at := latest; !at.IsZero(); {
		var stopped, total float64
		next := time.Time{}
		for k := range all {
			s := &all[k]
			for s.i >= 0 && s.ss[s.i].T.After(at) {
				s.i--
			}
			if s.i >= 0 && s.ss[s.i].T.Equal(at) {
				total += s.ss[s.i].V
				if s.stop {
					stopped += s.ss[s.i].V
				}
				s.i--
			}
			if s.i >= 0 && s.ss[s.i].T.After(next) {
				next = s.ss[s.i].T
			}
		}
		if total == 0 || stopped < total {
			break
		}
		v.since, at = at, next
	}
	return v
}

// who is what is stopped, in words: "the process", "its child processes".
func (v stoppedView) who() string {
	if v.children {
		return "its child processes"
	}
	return "the process"
}

// how says which threads are stopped and by what, as a clause.
func (v stoppedView) how() string {
	const bySignal = "stopped by a signal: SIGSTOP, or SIGTSTP, SIGTTIN or SIGTTOU from a shell's job control"
	const byTracer = "stopped by a tracer: a debugger such as gdb, or strace"
	whose := "of its threads"
	switch {
	case v.children:
		whose = "threads of its child processes, which serve its listeners in a prefork server such as nginx (the process itself is not stopped),"
	case v.withChildren:
		whose = "threads of the process and its child processes"
	}
	switch {
	case v.byTracer == 0:
		return fmt.Sprintf("all %s %s are in state T, %s", num(v.total), whose, bySignal)
	case v.bySignal == 0:
		return fmt.Sprintf("all %s %s are in state t, %s", num(v.total), whose, byTracer)
	}
	return fmt.Sprintf("all %s %s are stopped, %s in state T (%s) and %s in state t (%s)", num(v.total), whose, num(v.bySignal), bySignal, num(v.byTracer), byTracer)
}
