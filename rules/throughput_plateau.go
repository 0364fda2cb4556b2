package rules

import (
	"fmt"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseWaitingNotWorking is throughput_plateau's root cause.
const CauseWaitingNotWorking = "waiting_not_working"

// CauseProcessStopped is throughput_plateau's when connections queue on a
// process whose every thread is stopped (rules/stopped.go).
const CauseProcessStopped = "process_stopped"

// ThroughputPlateauOptions ([rules.throughput_plateau] in agent.conf).
type ThroughputPlateauOptions struct {
	Window       time.Duration `toml:"window" range:"[1s,1h]"`
	MinQueued    float64       `toml:"min_queued" range:"(0,1]"`        // share of samples with connections waiting in an accept queue
	MaxBusyCores float64       `toml:"max_busy_cores" range:"(0,1024]"` // the process uses less CPU than this
}

// DefaultThroughputPlateauOptions are the defaults agent.conf documents.
func DefaultThroughputPlateauOptions() ThroughputPlateauOptions {
	return ThroughputPlateauOptions{Window: 10 * time.Second, MinQueued: 0.8, MaxBusyCores: 0.5}
}

// ThroughputPlateau names a service that queues work while its CPU idles
// (seed 002: "8,000 RPS at 30% CPU"): requests wait for something that
// is not CPU: a lock, a bounded pool (database connections, a semaphore),
// a slow dependency called synchronously. Adding CPU or replicas of the
// same bottleneck does not help; the wait is what to name.
type ThroughputPlateau struct{ o ThroughputPlateauOptions }

func NewThroughputPlateau(o ThroughputPlateauOptions) *ThroughputPlateau {
	return &ThroughputPlateau{o: o}
}

func (*ThroughputPlateau) Name() string { return "throughput_plateau" }

func (*ThroughputPlateau) Needs() []Need {
	return []Need{
		{Component: signals.CollectorAcceptQueue, What: "accept queue lengths: the work that queues", Essential: true},
		{Component: signals.ProbeSched, What: "the event loop or worker blocked now, named as what the service waits on; per-thread CPU time (falls back to /proc task stat)"},
		{Component: signals.CollectorThreads, What: "the system call most threads wait in, and per-thread CPU time when the sched probe does not run"},
		{Component: signals.ProbeSockCalls, What: "data waiting unread while a loop blocked (on a runtime culprit does not know, a block counts only with work seen waiting)"},
	}
}

// FacetOf: a queue that stays full while the process idles because the
// app stopped accepting is accept_overflow's stall, not a plateau.
func (*ThroughputPlateau) FacetOf() []RuleCause {
	return []RuleCause{{Rule: (*AcceptOverflow).Name(nil), Cause: CauseAppNotAccepting}}
}

func (r *ThroughputPlateau) Evaluate(w Window) []Observation {
	st, from := w.Store, w.Now.Add(-r.o.Window)
	if sv := stoppedThreads(w); sv.all() {
		return r.stopped(w, sv)
	}
	cpu, ok := processCores(w, from, r.o.Window)
	if !ok || cpu >= r.o.MaxBusyCores {
		return nil
	}
	var out []Observation
	for _, ls := range st.Select(signals.ListenQueueLength) {
		ss := st.Range(signals.ListenQueueLength, ls, from)
		if len(ss) < 4 || ss[len(ss)-1].T.Sub(ss[0].T) < r.o.Window/2 || !w.Fresh(ss[len(ss)-1].T, freshFast) {
			continue
		}
		queued, sum := 0, 0.0
		for _, s := range ss {
			if s.V > 0 {
				queued++
			}
			sum += s.V
		}
		share := float64(queued) / float64(len(ss))
		if share < r.o.MinQueued || ss[len(ss)-1].V == 0 {
			continue
		}
		endpoint := joinHostPort(ls.Get("addr"), ls.Get("port"))
		wait, detail := r.dominantWait(w)
		out = append(out, Observation{
			Key:   endpoint,
			Cause: CauseWaitingNotWorking,
			Title: fmt.Sprintf("Throughput plateau on %s: work queues while the CPU idles (%s)", endpoint, wait),
			Symptom: fmt.Sprintf("connections waited in the accept queue of %s in %s of samples over %s (%s on average) while the process used %s",
				endpoint, percent(share), duration(r.o.Window), num(sum/float64(len(ss))), cores(cpu)),
			RootCause:   fmt.Sprintf("the service is waiting, not working: %s. %sRequests are limited by what they wait on (a lock, a bounded pool such as database connections or a semaphore, a dependency called synchronously), not by CPU", wait, detail),
			Remediation: w.advice().WaitingThreads(),
			Severity:    SeverityWarning,
			Confidence:  0.6,
			Evidence: []Evidence{
				{Signal: signals.ListenQueueLength.Name + ls.String(), Value: share, Threshold: r.o.MinQueued, Unit: "ratio", Window: r.o.Window, Note: "share of samples with connections waiting"},
				{Signal: "process CPU (thread_cpu_seconds_total)", Value: cpu, Threshold: r.o.MaxBusyCores, Unit: "cores", Window: r.o.Window, Note: "below the threshold: not CPU-bound"},
			},
			Artifacts: []Artifact{{Kind: "listener", Value: endpoint}},
			Labels:    map[string]string{"port": ls.Get("port"), "addr": ls.Get("addr")},
		})
	}
	return out
}

// processCores is the target's CPU use over the window, summed over its
// threads (sched probe, or /proc task stat).
func processCores(w Window, from time.Time, window time.Duration) (float64, bool) {
	d, lss := threadCPU(w.Store)
	if len(lss) == 0 {
		return 0, false
	}
	var total float64
	for _, ls := range lss {
		total += w.Store.Increase(d, ls, from)
	}
	return total / window.Seconds(), true
}

// threadCPU is the per-thread CPU series the rules read: the sched
// probe's, or /proc task stat's when the probe does not run.
func threadCPU(st *signals.Store) (*signals.Desc, []signals.Labels) {
	for _, d := range []*signals.Desc{signals.ThreadCPUSecondsTotal, signals.ThreadStatCPUSecondsTotal} {
		if lss := st.Select(d); len(lss) > 0 {
			return d, lss
		}
	}
	return nil, nil
}

// loopStall is how long an event loop or worker must have been blocked
// (blocking_worker's default threshold) for the plateau to name it as
// what the service waits on.
const loopStall = 250 * time.Millisecond

// dominantWait names where the target's sleeping threads are, as a phrase
// ("threads wait in futex") and a sentence of detail: an event
// loop or worker blocked now (a loop that sleeps outside its idle wait
// queues everything, whatever the other threads do), else the system call
// most threads wait in, leaving out the idle wait of a network poller.
func (r *ThroughputPlateau) dominantWait(w Window) (string, string) {
	if e, j, ok := blockedNow(w); ok {
		fn := culpritOf(e, j.thread.runtime)
		if fn == "" {
			fn = "an unknown function"
		}
		return fmt.Sprintf("the %s %s is blocked in %s", roleWords(j.thread), e.Thread, e.Syscall()), fmt.Sprintf("The %s thread %s (tid %d) has been blocked in %s, called from %s, for %s. ",
			roleWords(j.thread), e.Thread, e.Tid, e.Syscall(), fn, duration(e.Duration))
	}
	best, n, total := "", 0.0, 0.0
	for _, ls := range w.Store.Select(signals.ProcessThreadsInSyscall) {
		sc := ls.Get("syscall")
		s, ok := w.Store.Latest(signals.ProcessThreadsInSyscall, ls)
		if !ok || strings.HasPrefix(sc, "epoll") {
			continue
		}
		total += s.V
		if s.V > n || (s.V == n && sc < best) {
			best, n = sc, s.V
		}
	}
	if best == "" {
		return "threads wait in the kernel", ""
	}
	detail := fmt.Sprintf("%s of %s waiting threads are in %s. ", num(n), num(total), best)
	if best == "futex" {
		detail += "futex is a lock, a condition variable or a parked pool slot. "
	}
	return "threads wait in " + best, detail
}

// blockedNow is the longest block going on now (seen in the last
// freshFast) of an event loop or worker, outside its idle wait.
func blockedNow(w Window) (signals.Episode, blockJudgement, bool) {
	if w.Episodes == nil {
		return signals.Episode{}, blockJudgement{}, false
	}
	var best signals.Episode
	var bestJ blockJudgement
	for _, e := range w.Episodes.Since(signals.EpisodeBlock, w.Now.Add(-freshFast)) {
		if !e.Ongoing || e.Duration < loopStall || e.Duration <= best.Duration {
			continue
		}
		if j, blocked := judgeBlock(w, e, loopStall); blocked {
			best, bestJ = e, j
		}
	}
	return best, bestJ, best.Duration > 0
}

// stopped is the plateau of a process whose every thread is stopped: each
// listener whose queue holds connections now. Neither the window's CPU
// (spent before the stop) nor the share of samples queued (the stop may
// be younger than the window) says anything of a stop: the queue now and
// the threads' states do.
func (r *ThroughputPlateau) stopped(w Window, sv stoppedView) []Observation {
	st := w.Store
	var out []Observation
	for _, ls := range st.Select(signals.ListenQueueLength) {
		q, ok := st.Latest(signals.ListenQueueLength, ls)
		if !ok || q.V == 0 || !w.Fresh(q.T, freshFast) {
			continue
		}
		// The queue's latest sample can be older than the first thread
		// sample that saw the stop: it counts too.
		most := ""
		if p := peak(st.Range(signals.ListenQueueLength, ls, sv.since)); p > q.V {
			most = fmt.Sprintf(" (%s at most since the stop)", num(p))
		}
		endpoint := joinHostPort(ls.Get("addr"), ls.Get("port"))
		is, it, itIs, states := "is", "it", "it is", signals.ProcessThreads
		if sv.children {
			is, it, itIs, states = "are", "them", "they are", signals.ProcessChildThreads
		}
		out = append(out, Observation{
			Key:     endpoint,
			Cause:   CauseProcessStopped,
			Title:   fmt.Sprintf("Connections queue on %s: %s %s stopped", endpoint, sv.who(), is),
			Symptom: fmt.Sprintf("%s wait in the accept queue of %s%s, and none is served", count(q.V, "connection", ""), endpoint, most),
			// How long it has been stopped is in the evidence: words
			// are sent again only when what they count moves.
			RootCause:   fmt.Sprintf("%s %s stopped, not slow: %s. Nothing of %s runs, and the listeners' queues fill, until %s resumed", sv.who(), is, sv.how(), it, itIs),
			Remediation: processStoppedFix,
			Severity:    SeverityCritical,
			Confidence:  0.9,
			Evidence: []Evidence{
				{Signal: signals.ListenQueueLength.Name + ls.String(), Value: q.V, Unit: "connections", Note: "connections waiting to be accepted now"},
				{Signal: states.Name + `{state="T"|"t"}`, Value: sv.bySignal + sv.byTracer, Threshold: sv.total, Unit: "threads", Window: w.Now.Sub(sv.since), Note: "threads stopped, of all those of " + sv.who()},
			},
			Artifacts: []Artifact{{Kind: "listener", Value: endpoint}},
			Labels:    map[string]string{"port": ls.Get("port"), "addr": ls.Get("addr")},
		})
	}
	return out
}

// processStoppedFix is the remedy for a stopped process, whatever its
// runtime.
const processStoppedFix = "Resume what is stopped with kill -CONT (ps -o pid,stat,comm -p PID --ppid PID lists the process and its children with state T or t) if nothing should hold it, and find what stopped it: a tracer shows as TracerPid in /proc/PID/status (a debugger left attached, a tool that stops the process to inspect it); a stop signal comes from a shell's job control (Ctrl-Z, a background job that reads the terminal) or from a kill -STOP by a script or an operator."
