package rules

import (
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes the accept_overflow rule tells apart.
const (
	CauseAppNotAccepting = "app_not_accepting"
	CauseBacklogTooSmall = "backlog_too_small"
)

// AcceptOverflowOptions are the rule's thresholds (agent.conf
// [rules.accept_overflow]).
type AcceptOverflowOptions struct {
	// Window over which drops, rates and queue history are summarised.
	Window time.Duration `toml:"window" range:"[1s,1h]"`
	// Recent: drops this fresh mean the overflow is happening now.
	Recent time.Duration `toml:"recent" range:"[100ms,1h]"`
	// StallAfter: a queue full this long with no accept means the app is
	// not accepting, rather than a burst the app is still draining.
	StallAfter time.Duration `toml:"stall_after" range:"[10ms,1m]"`
	// MinDrops in Recent before the rule speaks.
	MinDrops float64 `toml:"min_drops" range:"[1,1000000]"`
	// SaturateAfter: a queue full this long while the app does accept
	// (slower than connections arrive) is a saturated app, not a burst.
	SaturateAfter time.Duration `toml:"saturate_after" range:"[100ms,10m]"`
}

// DefaultAcceptOverflowOptions are the defaults agent.conf documents.
func DefaultAcceptOverflowOptions() AcceptOverflowOptions {
	return AcceptOverflowOptions{Window: 10 * time.Second, Recent: 2 * time.Second, StallAfter: 300 * time.Millisecond, MinDrops: 1, SaturateAfter: 5 * time.Second}
}

// AcceptOverflow names why a listener's accept queue overflows (seed 000,
// Problem B): the backlog is too small for bursts the app absorbs, or the
// app has stopped accepting (its threads are blocked or saturated).
type AcceptOverflow struct {
	o AcceptOverflowOptions

	// mu guards stalls: the engine evaluates from one goroutine, but
	// nothing stops two callers.
	mu sync.Mutex
	// stalls is each listener's last stall (by endpoint), kept for as
	// long as its clients can retry (see stallMemory), at most
	// maxStallMemories of them.
	stalls map[string]*stallMemory
	// bursts is each listener's burst episode, kept as its clients can
	// retry (burstMemory), at most maxStallMemories of them.
	bursts map[string]*burstMemory
	// sched is the SYN schedule last worked out, and the sysctls it was
	// worked out from: they change rarely, the rule runs 5 times a second.
	sched   synSchedule
	schedOf synSysctls
}

// synSysctls are the settings a SYN schedule is worked out from (have*:
// the sysctl collector read it).
type synSysctls struct {
	retries, linear         int
	haveRetries, haveLinear bool
}

// NewAcceptOverflow returns the rule.
func NewAcceptOverflow(o AcceptOverflowOptions) *AcceptOverflow {
	return &AcceptOverflow{o: o, stalls: map[string]*stallMemory{}}
}

func (*AcceptOverflow) Name() string { return "accept_overflow" }

func (*AcceptOverflow) Needs() []Need {
	return []Need{
		{Component: signals.CollectorAcceptQueue, What: "each listener's accept queue: length, backlog, drops", Essential: true},
		{Component: signals.ProbeSockCalls, What: "the accepts the app itself made per listener (a stall is inferred from a queue that never shrinks, with lower confidence)"},
		{Component: signals.ProbeTCPListen, What: "drops in bursts between two samples, attributed to their listener"},
		{Component: signals.ProbeSched, What: "the thread and stack that stalled the accept loop"},
		{Component: signals.CollectorThreads, What: "the target's thread states during a stall"},
		{Component: signals.CollectorSysctl, What: "net.core.somaxconn's cap on the backlog, tcp_abort_on_overflow in the remedy, and tcp_syn_retries and tcp_syn_linear_timeouts, how long a stall's clients retry (the kernel's defaults are assumed)"},
	}
}

// stalledThread names the target's thread that was off-CPU outside an idle
// wait, or busy without sleeping, for longest during [from, now]: what
// kept the accept loop from running.
func (r *AcceptOverflow) stalledThread(w Window, from, now time.Time) (signals.Episode, string) {
	if w.Episodes == nil {
		return signals.Episode{}, ""
	}
	// A worker thread that stopped serving its event loop is the likely
	// culprit; other threads (a main thread reading stdin, a logger) sleep
	// for long as a matter of course, so they count only when no worker
	// does, and never while they wait for input on a pipe or a terminal:
	// such a thread is idle, and naming it sends the reader the wrong way.
	var best, bestWorker signals.Episode
	for _, kind := range []string{signals.EpisodeBlock, signals.EpisodeBusy} {
		for _, e := range w.Episodes.Since(kind, from) {
			worker, idle := stallKind(w, e, r.o.StallAfter)
			if idle {
				continue
			}
			if !e.Start.Before(now) {
				continue
			}
			if worker && e.Duration > bestWorker.Duration {
				bestWorker = e
			}
			if !worker && kind == signals.EpisodeBlock && waitsForInput(e) {
				continue
			}
			if e.Duration > best.Duration {
				best = e
			}
		}
	}
	if bestWorker.Duration >= r.o.StallAfter {
		best = bestWorker
	}
	if best.Duration < r.o.StallAfter {
		return signals.Episode{}, ""
	}
	fn := culpritOf(best, signals.RuntimeUnknown)
	if fn == "" {
		fn = "unknown code"
	}
	// The kernel does not say which thread runs the accept loop: name the
	// stall's likeliest cause, as that.
	if best.Kind == signals.EpisodeBusy {
		return best, fmt.Sprintf("During the stall thread %s (tid %d) ran %s without yielding in %s: if the accept loop runs on it, that is why.", best.Thread, best.Tid, seconds(best.Duration), fn)
	}
	return best, fmt.Sprintf("During the stall thread %s (tid %d) was blocked %s in %s, called from %s: if the accept loop runs on it, that is why.", best.Thread, best.Tid, seconds(best.Duration), best.Syscall(), fn)
}

// inputWaits end the names of kernel functions a thread sleeps in while it
// waits for bytes on a pipe or a terminal (pipe_read, or anon_pipe_read on
// newer kernels; n_tty_read): a main thread reading its stdin.
var inputWaits = []string{"pipe_read", "tty_read"}

// waitsForInput reports whether a block sleeps on a pipe or a terminal.
func waitsForInput(e signals.Episode) bool {
	for _, f := range e.KernelStack() {
		for _, w := range inputWaits {
			if strings.HasSuffix(f, w) {
				return true
			}
		}
	}
	return false
}

func (r *AcceptOverflow) Evaluate(w Window) []Observation {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.stalls == nil {
		r.stalls = map[string]*stallMemory{}
	}
	if r.bursts == nil {
		r.bursts = map[string]*burstMemory{}
	}
	sched := r.synSchedule(w.Store)
	for k, m := range r.stalls {
		if w.Now.After(m.expires(sched)) {
			delete(r.stalls, k)
		}
	}
	for k, m := range r.bursts {
		if w.Now.After(m.last.Add(sched.giveUp + retrySlack(sched.giveUp))) {
			delete(r.bursts, k)
		}
	}
	var out []Observation
	for _, ls := range w.Store.Select(signals.ListenBacklog) {
		if o, ok := r.listener(w, ls, sched, w.Now.Add(-r.o.Window)); ok {
			out = append(out, o)
		}
	}
	return out
}

// listener judges one listener from its samples since from: the window's
// start, or the end of a stall whose tail has ended (its drops were judged,
// and what came after is judged by itself).
func (r *AcceptOverflow) listener(w Window, ls signals.Labels, sched synSchedule, from time.Time) (Observation, bool) {
	st := w.Store
	now := w.Now
	port := ls.Get("port")
	addr := ls.Get("addr")
	endpoint := joinHostPort(addr, port)

	backlog, ok := st.Latest(signals.ListenBacklog, ls)
	if !ok || !w.Fresh(backlog.T, freshFast) {
		return Observation{}, false
	}
	dropsRecent := st.Increase(signals.ListenOverflowsTotal, ls, now.Add(-r.o.Recent))
	dropsWindow := st.Increase(signals.ListenOverflowsTotal, ls, from)
	full := st.Range(signals.ListenQueueFull, ls, from)
	fullNow := len(full) > 0 && full[len(full)-1].V == 1 && w.Fresh(full[len(full)-1].T, freshFast)
	// A stalled queue keeps dropping only when clients retransmit SYNs
	// (1 s, 3 s, 7 s... apart), so while it stays full any drop in the
	// window counts as present.
	present := dropsRecent >= r.o.MinDrops || (fullNow && dropsWindow >= r.o.MinDrops)
	if !present {
		return Observation{}, false
	}

	fullFor, runStart := fullRun(full, now)
	fullFrac := fraction(full)
	qpeak := peak(st.Range(signals.ListenQueueLength, ls, from))
	portLs := signals.L("port", port)
	// The app's own accepts, counted at accept()'s return by the sockcalls
	// probe. Completed handshakes are not accepts: with the queue full,
	// syncookie handshakes complete and are then dropped, which once made
	// a listener that accepted nothing read "accepted 65 connections".
	// While the probe counts, a port with no accept series simply had
	// none; it counts them while a queue fills up (the sys_exit
	// program they need slows every system call of the host), so a count
	// speaks only for the time since counting began (counted).
	acceptsFrom, acceptsOn := acceptsCountedSince(st, portLs, now)
	counted := func(t time.Time) bool { return acceptsOn && !acceptsFrom.After(t) }
	acceptsWindow := st.Increase(signals.ProcessAcceptsTotal, portLs, from)
	somaxconn, haveSomax := st.Latest(signals.Sysctl, signals.L("name", "net.core.somaxconn"))
	abortOnOverflow, _ := st.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_abort_on_overflow"))
	win := now.Sub(from)

	ev := []Evidence{
		{Signal: signals.ListenOverflowsTotal.Name + ls.String(), Value: dropsWindow, Threshold: r.o.MinDrops, Unit: "SYNs", Window: win, Note: "connection attempts dropped on this listener's full accept queue (client retries included)"},
		{Signal: signals.ListenBacklog.Name + ls.String(), Value: backlog.V, Unit: "connections", Note: "accept queue capacity (the app's listen backlog, capped by net.core.somaxconn)"},
		{Signal: signals.ListenQueueLength.Name + ls.String(), Value: qpeak, Unit: "connections", Window: win, Note: "peak queue length seen"},
	}
	if haveSomax {
		ev = append(ev, Evidence{Signal: `sysctl{name="net.core.somaxconn"}`, Value: somaxconn.V, Unit: "connections", Note: "kernel cap on any listen backlog"})
	}
	arts := []Artifact{{Kind: "listener", Value: endpoint, Detail: fmt.Sprintf("backlog %d", int(backlog.V))}}
	labels := map[string]string{"port": port, "addr": addr}
	// The rate is over the time the drops came in, not the whole window:
	// 109 drops in the half second since a stall began are not 10.9/s.
	span := dropSpan(st.Range(signals.ListenOverflowsTotal, ls, now.Add(-win)), now, win)
	dropped := fmt.Sprintf("%s dropped on %s in the last %s (%s; SYNs, each client's retries included)",
		count(dropsWindow, "connection attempt", ""), endpoint, duration(span), rate(dropsWindow/span.Seconds()))

	if fullNow && fullFor < r.o.StallAfter {
		// Too early to tell a stall from a burst the app is draining; the
		// engine's hold-down keeps an open finding open meanwhile.
		return Observation{}, false
	}
	// What the app did while its queue was full tells a stall from a
	// burst, not how long the queue stayed full: no accept at all is a
	// stalled accept loop; accepts that keep coming are a burst the app
	// drains (the backlog is too small for it) until the queue has been
	// full for saturate_after, when the app is simply slower than its
	// arrivals.
	// From the first sample seen full: its value is the baseline.
	acceptedRun := st.Increase(signals.ProcessAcceptsTotal, portLs, runStart.Add(time.Nanosecond))
	// The accept counter is read on the same tick as the queue, in either
	// order: accepts counted within the run's first runEdge may have come
	// before the queue was full (seen in the demo: one accept just as the
	// accept loop stopped read as "keeps accepting"). They are told, not
	// taken for an accept loop that runs.
	acceptedLater := st.Increase(signals.ProcessAcceptsTotal, portLs, runStart.Add(runEdge))
	// Counting begins when the first sample shows connections queued,
	// so a queue that filled at once is seen full before: counts from
	// within the run's first runEdge judge it, and the words say over
	// how long they were counted.
	acceptsKnown := counted(runStart.Add(runEdge))
	countedRun := fullFor
	if acceptsFrom.After(runStart) {
		countedRun = now.Sub(acceptsFrom)
	}
	stalled := fullNow && (!acceptsKnown || acceptedLater == 0 || fullFor >= r.o.SaturateAfter)

	if stalled {
		r.rememberStall(endpoint, st, ls, runStart, now, now, sched)
		threads := describeThreads(st)
		ev = append(ev, Evidence{Signal: signals.ListenQueueFull.Name + ls.String(), Value: fullFor.Seconds(), Threshold: r.o.StallAfter.Seconds(), Unit: "seconds", Note: "queue continuously full"})
		var how string
		conf := 0.7
		switch {
		case acceptsKnown:
			conf = 0.9
			ev = append(ev, Evidence{Signal: signals.ProcessAcceptsTotal.Name + portLs.String(), Value: acceptedRun, Unit: "connections", Window: countedRun, Note: "connections the app accepted while the queue was full (eBPF accept)"})
			over := ""
			// Within a sample of the run's start (which is itself
			// known to a sample) is no gap worth words.
			if countedRun < fullFor-countedSlack {
				over = " in the last " + duration(countedRun) + " (accepts are counted only while a queue fills up)"
			}
			if acceptedRun == 0 {
				how = "accepted no connection" + over
			} else {
				how = fmt.Sprintf("accepted only %s (%s)%s while more arrived", count(acceptedRun, "connection", ""), rate(acceptedRun/math.Max(countedRun.Seconds(), 0.001)), over)
			}
		case acceptsOn || st.Running(signals.ProbeSockCalls):
			how = "did not drain it (inferred from the queue never shrinking: its accepts were not counted from the start of the stall)"
		default:
			how = "did not drain it (accept counts unavailable without the sockcalls eBPF probe: inferred from the queue never shrinking)"
		}
		arts = append(arts, threads.artifacts...)
		culprit, stalled := r.stalledThread(w, runStart, now)
		if stalled != "" {
			// The thread states stay: they tell whether the named thread
			// is the only one stuck.
			threads.summary += " " + stalled
			arts = append(arts, threadArtifact(culprit), stackArtifact(culprit, 24))
			if fn := culpritOf(culprit, signals.RuntimeUnknown); fn != "" {
				arts = append(arts, Artifact{Kind: "frame", Value: fn, Detail: "where the stalled thread is"})
			}
		}
		sev := SeverityCritical
		return Observation{
			Key:         endpoint,
			Cause:       CauseAppNotAccepting,
			Title:       fmt.Sprintf("Accept queue of %s overflowing: the app is not accepting", endpoint),
			Symptom:     dropped + "; clients see connect timeouts or resets",
			RootCause:   fmt.Sprintf("the accept queue of %s (backlog %d) has been full for %s and the app %s: its accept loop is starved. %s", endpoint, int(backlog.V), duration(fullFor), how, threads.summary),
			Severity:    sev,
			Confidence:  conf,
			Evidence:    ev,
			Artifacts:   arts,
			Remediation: w.advice().LoopStalled(),
			Labels:      labels,
			Linger:      r.o.Window,
		}, true
	}

	// The queue has drained. If it stalled within the window, these drops
	// are the stall's tail — clients that waited retransmit their SYNs
	// together (1 s, 3 s, 7 s after their first) and overflow the queue
	// again as a herd: the app is recovering, the cause is unchanged.
	// The tail of a stall only: a run the app accepted through (shorter
	// than saturate_after) was a burst.
	// The accepts that ended the run are not accepts through it: the
	// queue's sample and the accept counter's read land on the same tick
	// in either order, so the run's last sample interval is left out.
	run, end := longestRecentRun(full, from)
	stallRun := run >= r.o.StallAfter && (!counted(end.Add(-run).Add(runEdge)) || run >= r.o.SaturateAfter ||
		increaseBetween(st, signals.ProcessAcceptsTotal, portLs, end.Add(-run), end.Add(-runEdge)) == 0)
	if stallRun {
		// The window may hold only the stall's end: how long it lasted is
		// what the rule remembers of it.
		m := r.rememberStall(endpoint, st, ls, end.Add(-run), end, now, sched)
		if m.over {
			// The drops since are not its clients retrying (the same
			// tests as stallTail's, below): a burst problem of its own,
			// judged from the stall's end on, without the stall's drops
			// and full samples.
			return r.listener(w, ls, sched, end)
		}
		run = end.Sub(m.start)
		o := r.tail(w, endpoint, ls, run, now.Sub(end), sched, dropped, ev, arts, labels)
		o.RootCause = fmt.Sprintf("the accept queue of %s (backlog %d) was full for %s; the app accepts again since %s ago, and the drops since are the stall's tail (waiting clients retrying together)", endpoint, int(backlog.V), duration(run), duration(now.Sub(end)))
		o.Confidence = 0.8
		return o, true
	}

	// The stall has left the window, but its clients may still be
	// retrying: while the drops come when they would, they are its tail.
	if m, ok := r.stallTail(endpoint, st, ls, now, sched); ok {
		run, ago := m.end.Sub(m.start), now.Sub(m.end)
		verb := "are"
		if m.since == 1 {
			verb = "is"
		}
		o := r.tail(w, endpoint, ls, run, ago, sched, dropped, ev, arts, labels)
		o.RootCause = fmt.Sprintf("the accept queue of %s (backlog %d) was full for %s until %s ago; the app accepts again since, and the %s dropped since %s the stall's tail: clients that waited retrying their SYNs together, which they do until %s after their first (%s)",
			endpoint, int(backlog.V), duration(run), duration(ago), count(m.since, "connection attempt", ""), verb, duration(sched.rounds[len(sched.rounds)-1]), sched.source)
		o.Confidence = 0.7
		return o, true
	}

	// "Backlog too small" needs proof that the app accepts: the queue
	// drained, or eBPF saw handshakes complete into freed slots. A queue
	// one short of full with no accept is a stall that has not yet lasted
	// stall_after (samples can land on the instant between an accept and
	// the next arrival): wait.
	qnow, _ := st.Latest(signals.ListenQueueLength, ls)
	drained := qnow.V <= backlog.V/2
	// Drops no sample has yet shown a full queue for may be the first of
	// a stall whose full queue the next sample shows (the quiet sampler
	// writes its last sample again until the listener's activity moves):
	// a burst between samples is still one a second later.
	if fullFrac == 0 && now.Sub(firstRise(st.Range(signals.ListenOverflowsTotal, ls, from))) < betweenSamplesSettle {
		return Observation{}, false
	}
	// An accept counted is proof, however late counting began.
	if !drained && !(acceptsOn && st.Increase(signals.ProcessAcceptsTotal, portLs, now.Add(-r.o.Recent)) > 0) {
		return Observation{}, false
	}

	// The queue drained after the drops: the app accepts, but bursts
	// arrive faster than the queue can hold between two accepts.
	capped := haveSomax && backlog.V >= somaxconn.V
	ev = append(ev, Evidence{Signal: signals.ListenQueueFull.Name + ls.String(), Value: fullFrac, Unit: "ratio", Window: win, Note: "share of samples with the queue full: it fills only in bursts"})
	acceptRate := ""
	if acceptsOn && acceptsWindow > 0 {
		// A count, not a rate: accepts come in bursts too, and the
		// probe's counter can trail the queue's sample by a poll (then
		// nothing is said rather than "0/s"). Over the time they were
		// counted in the window.
		span := win
		if acceptsFrom.After(now.Add(-win)) {
			span = now.Sub(acceptsFrom)
		}
		ev = append(ev, Evidence{Signal: signals.ProcessAcceptsTotal.Name + portLs.String(), Value: acceptsWindow, Unit: "connections", Window: span, Note: "connections the app accepted (eBPF accept)"})
		acceptRate = fmt.Sprintf(", while it keeps accepting (%s in %s)", count(acceptsWindow, "connection", ""), duration(span))
	}
	somax := 0
	if haveSomax {
		somax = int(somaxconn.V)
	}
	fix := w.advice().Backlog(nextPow2(int(math.Max(qpeak, backlog.V)+dropsWindow)), int(backlog.V), somax)
	if capped {
		fix += fmt.Sprintf(" The backlog is already capped by net.core.somaxconn=%d, so raise that first (in a pod via securityContext.sysctls).", somax)
	}
	if abortOnOverflow.V == 1 {
		fix += " net.ipv4.tcp_abort_on_overflow=1 turns each drop into a reset the client sees: set it to 0 so clients retry instead."
	}
	// The queue can fill and drain between two samples: a share of 0 is
	// "between samples", not "never".
	fullSeen := "the queue was full in " + percent(fullFrac) + " of samples"
	if fullFrac == 0 {
		fullSeen = "the queue filled between samples"
	}
	return Observation{
		Key:         endpoint,
		Cause:       CauseBacklogTooSmall,
		Title:       fmt.Sprintf("Accept queue of %s overflowing in bursts: backlog too small", endpoint),
		Symptom:     dropped,
		RootCause:   fmt.Sprintf("the listen backlog of %s is %d and bursts overflow it%s: %s and the app drains it", endpoint, int(backlog.V), acceptRate, fullSeen),
		Severity:    SeverityWarning,
		Confidence:  0.8,
		Evidence:    ev,
		Artifacts:   arts,
		Remediation: fix,
		Labels:      labels,
		Linger:      r.burstLinger(endpoint, st, ls, now, sched),
	}, true
}

// burstMemory is a listener's burst episode: when its drops last rose, and
// the rise before (the last round, and the one before it).
type burstMemory struct{ prev, last time.Time }

// burstLinger is how long a backlog_too_small finding stays open after
// this observation. The connections a burst could not queue come back in
// rounds: clients retransmit the SYNs it dropped, and the server its
// SYN-ACKs to the clients whose handshake completed on a full queue (each
// answer is dropped again). The gaps between rounds double (measured here:
// 1.7, 3.4, 6.6 and 13.3 s after one burst) and outgrow the window, so the
// finding resolved in a gap and opened again for the same connections' next
// round (TestBacklogTooSmallOpenThroughItsRetries). Whatever their
// schedule, the next round comes within twice the last gap: the finding
// lingers that long after the last one, and never past the clients' give-up
// time.
func (r *AcceptOverflow) burstLinger(endpoint string, st *signals.Store, ls signals.Labels, now time.Time, sched synSchedule) time.Duration {
	last, ok := lastRise(st.Range(signals.ListenOverflowsTotal, ls, now.Add(-r.o.Window)))
	if !ok {
		return r.o.Window
	}
	m := r.bursts[endpoint]
	switch {
	case m == nil:
		if len(r.bursts) >= maxStallMemories {
			clear(r.bursts) // listeners come and go; a few lose their linger once
		}
		m = &burstMemory{last: last}
		r.bursts[endpoint] = m
	case last.After(m.until(r.o.Window)):
		// Later than the last burst's next round could come: a burst of
		// its own. Taken for the next round, the time since the last one
		// (a fault repeated a minute later) doubled made its finding
		// linger for minutes after its drops ended (make bench: the
		// second fault's finding had not resolved 60 s after its end).
		*m = burstMemory{last: last}
	case last.Sub(m.last) >= roundGap:
		m.prev, m.last = m.last, last
	case last.After(m.last):
		m.last = last // the same round, seen over more samples
	}
	if m.prev.IsZero() {
		return r.o.Window
	}
	return max(r.o.Window, min(m.until(r.o.Window).Sub(now), sched.giveUp))
}

// until is when the burst's next round is due at the latest: twice its
// last gap after its last round, with the timers' slack; a window after
// its first round while that is the only one.
func (m *burstMemory) until(window time.Duration) time.Time {
	if m.prev.IsZero() {
		return m.last.Add(window)
	}
	gap := m.last.Sub(m.prev)
	return m.last.Add(2*gap + retrySlack(2*gap))
}

// roundGap is the least time between two rounds of a burst's returning
// connections: rises closer together are one round seen over several
// samples.
const roundGap = 700 * time.Millisecond

// dropSpan is the time since the drops of a counter's samples ss began,
// at most win: from the last sample before its first rise (the drops came
// after it) to now.
func dropSpan(ss []signals.Sample, now time.Time, win time.Duration) time.Duration {
	if i := firstRiseAt(ss); i > 0 {
		return min(win, max(now.Sub(ss[i-1].T), time.Millisecond))
	}
	return win
}

// lastRise is the time of the last sample at which a counter rose.
func lastRise(ss []signals.Sample) (time.Time, bool) {
	for i := len(ss) - 1; i > 0; i-- {
		if ss[i].V > ss[i-1].V {
			return ss[i].T, true
		}
	}
	return time.Time{}, false
}

// The herd after a stall. A client whose SYN a full accept queue dropped
// retransmits it on the kernel's schedule (synSchedule), so the clients a
// stall kept waiting come back together, and on a small backlog overflow
// it again, for up to two minutes after the stall, long after it left the
// window. Judged by themselves those drops are bursts the app drains,
// "backlog too small", which sends the operator to the wrong fix. So the
// rule remembers each listener's last stall for as long as its clients
// can retry, and calls the drops since its tail; but only while they could
// be those clients, so that a burst problem of its own after a stall is
// still told:
//   - every drop since the stall came within a retry round of it: when
//     clients whose first SYN fell within the stall (from its start to its
//     end) send their k-th retransmission, give or take the timers'
//     slack. The drops a herd causes come exactly then, new clients
//     included (the queue overflows only while the herd fills it); a
//     burst pattern of its own soon drops a SYN between two rounds.
//   - and the drops since the stall are at most what its clients can
//     have sent since its end: each drop during the stall may be a
//     client's first SYN (every client that waited was dropped at least
//     once), and such a client retries at most once per round of the
//     schedule, of which only those that can come after the stall's end
//     count (retriesBy). A client first dropped late in the stall retries
//     after it in every round; one dropped early, only in the late
//     rounds. A client whose first SYN came before its drop retries no
//     more often after it than one that began then: the rounds' gaps
//     only grow. Seen in the demo, the cruder bound (every drop in the
//     stall times every round since its start) let a burst of 2,884
//     drops 7 s after a 15 s stall pass for its tail for 4.5 s.
//
// The schedule is the sharp test (drops come in rounds, and after the
// first rounds the rounds are far apart); the count catches a burst
// problem that happens to fall into a round, after a stall that kept few
// clients waiting. The first drop that fails either ends the tail for
// good (the memory is forgotten): the next round's herd then joins
// whatever the rule makes of the listener, rather than the cause going
// back and forth. The price: a burst problem that starts within a round
// (after a long stall the rounds join up) is called the tail until its
// first drop between two rounds, at most until the stall's last round.

// stallMemory is what the rule keeps of a listener's last stall.
type stallMemory struct {
	// start is the first sample that saw the queue full; end the first
	// that saw it not full, or, while the stall lasts, the last
	// evaluation.
	start, end time.Time
	// waiting is the drops during the stall, in buckets of time: every
	// client it kept waiting was dropped at least once, so there were at
	// most this many, and none began after its drop.
	waiting []dropBucket
	// since is the drops after the stall's end, counted as they came.
	since float64
	// lastT and lastV are the drop counter's last sample counted into
	// waiting or since.
	lastT time.Time
	lastV float64
	// over: a drop since the end failed the tail's tests, so nothing after
	// it is the stall's. Kept while the stall is in the window, so that the
	// next evaluation does not take it for a new stall and count again.
	over bool
}

// dropBucket is n drops that came between from and to.
type dropBucket struct {
	from, to time.Time
	n        float64
}

// maxDropBuckets bounds the buckets of a stall's drops (2.5 KiB): a longer
// stall's are merged in pairs, which only loosens the bound they give.
const maxDropBuckets = 64

// addWaiting counts n drops between from and to into the stall's.
func (m *stallMemory) addWaiting(from, to time.Time, n float64) {
	if len(m.waiting) == maxDropBuckets {
		half := m.waiting[:0]
		for i := 0; i+1 < len(m.waiting); i += 2 {
			a, b := m.waiting[i], m.waiting[i+1]
			half = append(half, dropBucket{from: a.from, to: b.to, n: a.n + b.n})
		}
		m.waiting = half
	}
	m.waiting = append(m.waiting, dropBucket{from: from, to: to, n: n})
}

// retriesBy bounds the SYNs the stall's clients can have sent after its
// end and by t: for each drop during it, a client that began then and
// sends one in every round of the schedule that can come after the end
// (its timer late by the slack) and by t (early by retryEarly).
func (m *stallMemory) retriesBy(s synSchedule, t time.Time) float64 {
	var n float64
	for _, b := range m.waiting {
		k := 0
		for _, r := range s.rounds {
			if !t.Before(b.from.Add(r-retryEarly)) && b.to.Add(r+retrySlack(r)).After(m.end) {
				k++
			}
		}
		n += b.n * float64(k)
	}
	return n
}

// maxStallMemories bounds the listeners whose last stall the rule keeps
// (a target has a few listeners, not hundreds).
const maxStallMemories = 256

// expires is when the last client of the stall has given up: the give-up
// time after a first SYN at the stall's end, with the timers' slack.
func (m *stallMemory) expires(s synSchedule) time.Time {
	return m.end.Add(s.giveUp + retrySlack(s.giveUp))
}

// rememberStall records a run of the full queue that the rule judged a
// stall, from start to end (now, while it lasts). A run that overlaps the
// remembered stall is the same one seen again (the window moves over a
// long stall, so the start seen moves on while the memory keeps the
// first); one that began after it ended replaces it.
func (r *AcceptOverflow) rememberStall(key string, st *signals.Store, ls signals.Labels, start, end, now time.Time, sched synSchedule) *stallMemory {
	m := r.stalls[key]
	if m == nil || start.After(m.end) {
		if m == nil && len(r.stalls) >= maxStallMemories {
			r.forgetOldestStall()
		}
		m = &stallMemory{start: start, end: end}
		m.lastT, m.lastV = counterBefore(st, signals.ListenOverflowsTotal, ls, start)
		r.stalls[key] = m
	}
	if start.Before(m.start) {
		m.start = start
	}
	if end.After(m.end) {
		m.end = end
	}
	m.count(st, ls, now, sched)
	return m
}

// forgetOldestStall makes room: the stall that ended first goes.
func (r *AcceptOverflow) forgetOldestStall() {
	var oldest string
	for k, m := range r.stalls {
		if oldest == "" || m.end.Before(r.stalls[oldest].end) {
			oldest = k
		}
	}
	delete(r.stalls, oldest)
}

// count adds the drops the counter shows since the last sample counted
// and up to now, to waiting up to the stall's end and to since after it,
// and marks the tail over at the first drop after the end that cannot be
// one of the stall's clients retrying: one that fits none of the
// schedule's rounds, or one more than they can have sent by now.
// Samples after now are left for the next evaluation: the collectors
// write while the rule runs, and while the stall lasts its end is now (a
// drop sampled a moment later was once counted after the stall).
func (m *stallMemory) count(st *signals.Store, ls signals.Labels, now time.Time, sched synSchedule) {
	for _, s := range st.Range(signals.ListenOverflowsTotal, ls, m.lastT) {
		if s.T.After(now) {
			break
		}
		if m.lastT.IsZero() {
			m.lastT, m.lastV = s.T, s.V // no baseline before: the first sample is one
			continue
		}
		if !s.T.After(m.lastT) {
			continue
		}
		inc := s.V - m.lastV
		if inc < 0 {
			inc = s.V // a reset
		}
		prev := m.lastT
		m.lastT, m.lastV = s.T, s.V
		switch {
		case inc == 0:
		case !s.T.After(m.end):
			m.addWaiting(prev, s.T, inc)
		default:
			m.since += inc
			if !sched.fits(m.start, m.end, s.T) || m.since > m.retriesBy(sched, s.T) {
				m.over = true
			}
		}
	}
}

// stallTail returns the listener's last stall when the drops since it
// ended are its tail (see "The herd after a stall" above), and forgets the
// stall as soon as they are not.
func (r *AcceptOverflow) stallTail(key string, st *signals.Store, ls signals.Labels, now time.Time, s synSchedule) (*stallMemory, bool) {
	m := r.stalls[key]
	if m == nil {
		return nil, false
	}
	m.count(st, ls, now, s)
	if m.over {
		delete(r.stalls, key)
		return nil, false
	}
	// No drop since the end: those in the window are the stall's own, which
	// the other branches judge.
	return m, m.since > 0
}

// counterBefore is a counter's last sample before t (the first sample
// when none is that old), the baseline of what it counts from t on; zero
// when it has none.
func counterBefore(st *signals.Store, d *signals.Desc, ls signals.Labels, t time.Time) (time.Time, float64) {
	var at time.Time
	var v float64
	for _, s := range st.Range(d, ls, time.Time{}) {
		if !s.T.Before(t) && !at.IsZero() {
			break
		}
		at, v = s.T, s.V
		if !s.T.Before(t) {
			break
		}
	}
	return at, v
}

// synSchedule is when a client retransmits a SYN nobody answers, counted
// from its first. The timer starts at 1 s (TCP_TIMEOUT_INIT) and stays so
// for the first tcp_syn_linear_timeouts + 1 retransmissions (Linux 6.5 on;
// for the first one before), then doubles each time, up to 120 s
// (TCP_RTO_MAX). The client sends tcp_syn_retries +
// tcp_syn_linear_timeouts of them and gives up when the next would be due.
// With the defaults, 6 and 4: 1, 2, 3, 4, 5, 7, 11, 19, 35 and 67 s,
// giving up at 131 s; before 6.5, 1, 3, 7, 15, 31 and 63 s, giving up at
// 127 s.
//
// The settings that count are the clients' kernel's. They are read in the
// target's network namespace, which clients in the same pod or host share
// (the kernel too); a remote Linux client most likely has the defaults as
// well. A client can also set its own count (TCP_SYNCNT), or give up
// sooner with a connect timeout: the schedule is the longest a client
// retries, not the shortest.
type synSchedule struct {
	rounds []time.Duration // when the retransmissions are sent
	giveUp time.Duration
	source string // the settings, in words
	// seqs are the schedules rounds merges, each as one client follows
	// it: one when the sysctls were read, both kernels' otherwise.
	seqs [][]time.Duration
}

const (
	defaultSynRetries = 6   // net.ipv4.tcp_syn_retries
	defaultSynLinear  = 4   // net.ipv4.tcp_syn_linear_timeouts (Linux 6.5 on)
	maxSynCount       = 127 // the kernel's MAX_TCP_SYNCNT
	synRTOMax         = 120 * time.Second
)

func newSynSchedule(retries, linear int) synSchedule {
	s := synSchedule{}
	at, rto := time.Duration(0), time.Second
	for i := 1; i <= retries+linear+1; i++ {
		at += rto
		if i > linear {
			rto = min(2*rto, synRTOMax)
		}
		if i <= retries+linear {
			s.rounds = append(s.rounds, at)
		} else {
			s.giveUp = at
		}
	}
	s.seqs = [][]time.Duration{s.rounds}
	return s
}

// synSchedule reads the schedule from the sysctls the sysctl collector
// wrote. A kernel without tcp_syn_linear_timeouts (before 6.5) has no
// linear retransmissions; with neither setting read (no sysctl collector)
// the defaults hold, and the rounds of both kernels' schedules.
// It is worked out again only when the sysctls it reads changed.
func (r *AcceptOverflow) synSchedule(st *signals.Store) synSchedule {
	retries, haveRetries := sysctlInt(st, "net.ipv4.tcp_syn_retries", 1, maxSynCount)
	linear, haveLinear := sysctlInt(st, "net.ipv4.tcp_syn_linear_timeouts", 0, maxSynCount)
	of := synSysctls{retries, linear, haveRetries, haveLinear}
	if r.sched.seqs == nil || of != r.schedOf {
		r.sched, r.schedOf = synScheduleFor(retries, haveRetries, linear, haveLinear), of
	}
	return r.sched
}

// synScheduleFor is the schedule of the sysctls read (have*: read at all).
func synScheduleFor(retries int, haveRetries bool, linear int, haveLinear bool) synSchedule {
	switch {
	case haveLinear:
		if !haveRetries {
			retries = defaultSynRetries
		}
		s := newSynSchedule(retries, linear)
		s.source = fmt.Sprintf("net.ipv4.tcp_syn_retries=%d, tcp_syn_linear_timeouts=%d", retries, linear)
		return s
	case haveRetries:
		s := newSynSchedule(retries, 0)
		s.source = fmt.Sprintf("net.ipv4.tcp_syn_retries=%d", retries)
		return s
	}
	old, cur := newSynSchedule(defaultSynRetries, 0), newSynSchedule(defaultSynRetries, defaultSynLinear)
	rounds := append(slices.Clone(old.rounds), cur.rounds...)
	slices.Sort(rounds)
	return synSchedule{rounds: slices.Compact(rounds), giveUp: max(old.giveUp, cur.giveUp), seqs: [][]time.Duration{old.rounds, cur.rounds},
		source: fmt.Sprintf("the kernel's defaults, net.ipv4.tcp_syn_retries=%d and tcp_syn_linear_timeouts=%d or none", defaultSynRetries, defaultSynLinear)}
}

// sysctlInt is a sysctl's latest value, when the collector read it and it
// is within [lo, hi].
func sysctlInt(st *signals.Store, name string, lo, hi int) (int, bool) {
	s, ok := st.Latest(signals.Sysctl, signals.L("name", name))
	if !ok || s.V < float64(lo) || s.V > float64(hi) {
		return 0, false
	}
	return int(s.V), true
}

// retryEarly is how much earlier than its schedule, counted from the
// stall's start, a retry may be seen: the first dropped SYN can come up to
// a sample interval before the first sample that saw the queue full.
const retryEarly = 500 * time.Millisecond

// retrySlack is how much later than its schedule a retry may be seen after
// a first SYN: a timer fires up to 1/8 of its length late (the kernel's
// timer wheel), which adds up over the retransmissions, and the drop shows
// in a sample up to a second later (sampling, attribution).
func retrySlack(after time.Duration) time.Duration { return after/8 + time.Second }

// fits reports whether a drop at t can be a retransmission of a client
// whose first SYN came during the stall [start, end].
func (s synSchedule) fits(start, end, t time.Time) bool {
	if !t.After(end) {
		return true
	}
	for _, r := range s.rounds {
		if !t.Before(start.Add(r-retryEarly)) && !t.After(end.Add(r+retrySlack(r))) {
			return true
		}
	}
	return false
}

// tail is the finding of drops after a stall of run that ended ago: the
// stall's tail, its cause unchanged. The callers add the root cause, worded
// for what they know of the stall, and their confidence. It lingers until
// the next retry of a client dropped now can come (nextRetry): the rounds
// come further apart than the window (16, 32 s), and a shorter linger
// resolved the finding between two rounds and opened another for the same
// stall when the next came. And at least as long as a burst's finding
// (burstLinger): the clients whose handshake completed on the full queue
// come back in the server's SYN-ACK rounds, whose gaps double and fit no
// client's SYN schedule (CI, under -race: a 365 ms stall's tail resolved
// at 18.8 s and a second finding opened 9 s later for the same
// connections).
func (r *AcceptOverflow) tail(w Window, endpoint string, ls signals.Labels, run, ago time.Duration, sched synSchedule, dropped string, ev []Evidence, arts []Artifact, labels map[string]string) Observation {
	end := w.Now.Add(-ago)
	ev = append(ev, Evidence{Signal: signals.ListenQueueFull.Name + ls.String(), Value: run.Seconds(), Threshold: r.o.StallAfter.Seconds(), Unit: "seconds", Note: "queue was full without a pause until " + duration(ago) + " ago"})
	return Observation{
		Key:         endpoint,
		Cause:       CauseAppNotAccepting,
		Title:       fmt.Sprintf("Accept queue of %s overflowing: the app is not accepting", endpoint),
		Symptom:     dropped,
		Severity:    SeverityWarning,
		Evidence:    ev,
		Artifacts:   arts,
		Remediation: "The stall ended by itself. " + w.advice().LoopStalled(),
		Labels:      labels,
		Linger:      max(sched.nextRetry(end.Add(-run), end, w.Now).Sub(w.Now), r.burstLinger(endpoint, w.Store, ls, w.Now, sched)), // burstLinger is at least the window
	}
}

// nextRetry bounds when a client of the stall [start, end] dropped at d
// sends its next SYN: the drop was its SYN of some round r_k (its first,
// or a retry) that fits d, the timers' slack included, and the next comes
// at r_k+1; the latest of those. A drop that fits no round: d.
func (s synSchedule) nextRetry(start, end, d time.Time) time.Time {
	latest := d
	for _, seq := range s.seqs {
		prev := time.Duration(0) // the first SYN
		for _, r := range seq {
			if !d.Before(start.Add(prev-retryEarly)) && !d.After(end.Add(prev+retrySlack(prev))) {
				if next := d.Add(r - prev + retrySlack(r)); next.After(latest) {
					latest = next
				}
			}
			prev = r
		}
	}
	return latest
}

// acceptsCountedSince is since when the sockcalls probe has counted every
// accept of the target (on: it counts now). It counts them only while a
// listener's queue fills up, and says since when in
// ProcessAcceptsCountedSince. A store without that series (the probe never
// polled; rule tests that write accepts alone) keeps the older reading:
// while the probe runs or port's accept series is fresh, since forever.
func acceptsCountedSince(st *signals.Store, port signals.Labels, now time.Time) (from time.Time, on bool) {
	since, ok := st.Latest(signals.ProcessAcceptsCountedSince, nil)
	if !ok {
		return time.Time{}, st.Running(signals.ProbeSockCalls) || len(st.Range(signals.ProcessAcceptsTotal, port, now.Add(-freshFast))) > 0
	}
	if since.V <= 0 || !st.Running(signals.ProbeSockCalls) {
		return time.Time{}, false
	}
	return time.Unix(0, int64(since.V*1e9)), true
}

// increaseBetween is how much a counter grew from its sample at (or the
// last before) from to its last sample at or before to.
func increaseBetween(st *signals.Store, d *signals.Desc, ls signals.Labels, from, to time.Time) float64 {
	var base, last float64
	have := false
	for _, s := range st.Range(d, ls, time.Time{}) {
		if !s.T.After(from) {
			base, last, have = s.V, s.V, true
			continue
		}
		if s.T.After(to) {
			break
		}
		if !have {
			base, have = s.V, true
		}
		last = s.V
	}
	if last < base {
		return last // a reset
	}
	return last - base
}

// fullRun returns how long the queue has been full up to now, and when that
// run started.
func fullRun(full []signals.Sample, now time.Time) (time.Duration, time.Time) {
	if len(full) == 0 || full[len(full)-1].V != 1 {
		return 0, now
	}
	start := full[len(full)-1].T
	for i := len(full) - 1; i >= 0 && full[i].V == 1; i-- {
		start = full[i].T
	}
	return now.Sub(start), start
}

// longestRecentRun returns the longest run of full samples that ended at or
// after since, and when it ended.
func longestRecentRun(full []signals.Sample, since time.Time) (time.Duration, time.Time) {
	var best time.Duration
	var bestEnd time.Time
	for i := 0; i < len(full); {
		if full[i].V != 1 {
			i++
			continue
		}
		j := i
		for j+1 < len(full) && full[j+1].V == 1 {
			j++
		}
		end := full[j].T
		if j+1 < len(full) {
			end = full[j+1].T // the run lasted until the first sample that was not full
		}
		if d := end.Sub(full[i].T); !end.Before(since) && d > best {
			best, bestEnd = d, end
		}
		i = j + 1
	}
	return best, bestEnd
}

func fraction(s []signals.Sample) float64 {
	if len(s) == 0 {
		return 0
	}
	n := 0
	for _, x := range s {
		if x.V == 1 {
			n++
		}
	}
	return float64(n) / float64(len(s))
}

func peak(s []signals.Sample) float64 {
	m := 0.0
	for _, x := range s {
		m = math.Max(m, x.V)
	}
	return m
}

type threadView struct {
	summary   string
	artifacts []Artifact
}

// describeThreads turns the threads collector's counts into words: all
// threads on CPU means saturated, threads in D means blocked in the kernel,
// all asleep means the accept loop is waiting on something of the app's.
func describeThreads(st *signals.Store) threadView {
	states := map[string]float64{}
	total := 0.0
	for _, ls := range st.Select(signals.ProcessThreads) {
		if s, ok := st.Latest(signals.ProcessThreads, ls); ok && s.V > 0 {
			states[ls.Get("state")] = s.V
			total += s.V
		}
	}
	if total == 0 {
		return threadView{summary: "Thread states are unknown (threads collector has no data)."}
	}
	type kv struct {
		k string
		v float64
	}
	var sys []kv
	for _, ls := range st.Select(signals.ProcessThreadsInSyscall) {
		if s, ok := st.Latest(signals.ProcessThreadsInSyscall, ls); ok && s.V > 0 {
			sys = append(sys, kv{ls.Get("syscall"), s.V})
		}
	}
	sort.Slice(sys, func(i, j int) bool { return sys[i].v > sys[j].v || (sys[i].v == sys[j].v && sys[i].k < sys[j].k) })
	var parts []string
	for _, s := range []string{"R", "D", "S", "T", "t"} {
		if states[s] > 0 {
			parts = append(parts, fmt.Sprintf("%.0f %s", states[s], stateWord(s)))
		}
	}
	stopped := states["T"] + states["t"]
	if stopped >= total {
		// The system calls a stopped thread shows are those it was in
		// when it stopped: it waits in none of them (rules/stopped.go).
		sys = nil
	}
	var in []string
	var arts []Artifact
	for _, s := range sys {
		in = append(in, fmt.Sprintf("%s×%.0f", s.k, s.v))
		arts = append(arts, Artifact{Kind: "thread", Value: s.k, Detail: fmt.Sprintf("%.0f threads waiting in %s", s.v, s.k)})
	}
	verdict := "all its threads are asleep: the accept loop waits on something of the app's own (a lock, a channel, a paused loop)"
	switch {
	case stopped >= total:
		verdict = "the process is stopped, not slow (T: by a signal such as SIGSTOP; t: by a tracer such as a debugger): nothing of it runs until it is resumed"
	case states["D"] > 0:
		verdict = fmt.Sprintf("%.0f threads are blocked in uninterruptible kernel waits (disk or NFS I/O)", states["D"])
	case states["R"] >= total || (states["R"] > 0 && states["R"] >= total-1):
		verdict = "its threads are all on CPU: saturated"
	case stopped > 0:
		verdict = fmt.Sprintf("%.0f of its %.0f threads are stopped (T: by a signal such as SIGSTOP; t: by a tracer such as a debugger): if the accept loop runs on one of them, it accepts again only when that thread is resumed", stopped, total)
	case states["R"] > 0:
		// Not "all asleep": some run (other work of the app's, a load
		// generator in a demo), and none of them accepts.
		verdict = fmt.Sprintf("%.0f of its %.0f threads run, none of them accepting: the accept loop waits on something of the app's own (a lock, a channel, a paused loop)", states["R"], total)
	}
	sum := fmt.Sprintf("Threads: %s", strings.Join(parts, ", "))
	if len(in) > 0 {
		sum += fmt.Sprintf(" (waiting in %s)", strings.Join(in, ", "))
	}
	return threadView{summary: sum + "; " + verdict + ".", artifacts: arts}
}

func stateWord(s string) string {
	switch s {
	case "R":
		return "running"
	case "D":
		return "in uninterruptible wait"
	case "T":
		return "stopped by a signal"
	case "t":
		return "stopped by a tracer"
	}
	return "sleeping"
}

func joinHostPort(addr, port string) string {
	if addr == "" {
		return ":" + port
	}
	if strings.Contains(addr, ":") {
		return "[" + addr + "]:" + port
	}
	return addr + ":" + port
}

func fmtDur(d time.Duration) string {
	if d >= time.Second {
		return d.Round(100 * time.Millisecond).String()
	}
	return d.Round(time.Millisecond).String()
}

func nextPow2(n int) int {
	p := 64
	for p < n {
		p *= 2
	}
	return p
}

// runEdge is the end of a run of full samples that accepts may share with
// the sample after it (two fast samples).
const runEdge = 200 * time.Millisecond

// countedSlack is how much of a run may go uncounted by the accept counter
// before the words say over how long it counted: one collector sample, the
// resolution of the run's own start.
const countedSlack = 100 * time.Millisecond

// betweenSamplesSettle is how long drops never seen with a full queue wait
// before they are judged a burst between samples.
const betweenSamplesSettle = time.Second
