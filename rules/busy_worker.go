package rules

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of busy_worker: CPU work without yielding on a pool's worker, or
// on an event loop that runs its callbacks alone.
const (
	CauseCPUHeavyOnWorker    = "cpu_heavy_on_worker"
	CauseCPUHeavyOnEventLoop = "cpu_heavy_on_event_loop"
)

// BusyWorkerOptions ([rules.busy_worker] in agent.conf).
type BusyWorkerOptions struct {
	Window  time.Duration `toml:"window" range:"[1s,1h]"`     // runs are looked for over this window
	MinBusy time.Duration `toml:"min_busy" range:"[10ms,1m]"` // a run this long without sleeping is CPU work that does not yield
	TopN    int           `toml:"top_frames" range:"[1,100]"` // hottest functions named
	// MaxIOShare: a run whose CPU samples are at least this share in the
	// thread's own I/O (read, write, send, epoll_wait...) is an event loop
	// serving its connections back to back, not CPU work.
	MaxIOShare float64 `toml:"max_io_share" range:"(0,1]"`
	// LoopSleepRate: a run during which the thread went to sleep this
	// often per second (each sleep shorter than sched.busy_gap, or the run
	// would have ended) keeps coming back to its wait for work: a loop
	// turning under load (redis at 14k sleeps/s measured), not one task
	// that does not yield (a CPU-bound task sleeps about never).
	LoopSleepRate float64 `toml:"loop_sleep_rate" range:"[1,1000000]"`
}

// DefaultBusyWorkerOptions are the defaults agent.conf documents.
func DefaultBusyWorkerOptions() BusyWorkerOptions {
	return BusyWorkerOptions{Window: 10 * time.Second, MinBusy: 500 * time.Millisecond, TopN: 5, MaxIOShare: 0.3, LoopSleepRate: 200}
}

// BusyWorker names CPU-heavy work (serialization, compression, crypto, a
// regex over a large body) run on an async worker or an event loop without
// yielding (seed 000 Problem F): the thread cannot poll its other tasks
// until it is done, so their latency rises by the length of the run while
// the process's CPU use looks moderate. The CPU profile of the run names
// the work; a run spent in the thread's own I/O is a loop under load, not
// this.
type BusyWorker struct {
	o BusyWorkerOptions
}

func NewBusyWorker(o BusyWorkerOptions) *BusyWorker {
	if o.TopN <= 0 {
		o.TopN = 5
	}
	if o.MaxIOShare <= 0 {
		o.MaxIOShare = DefaultBusyWorkerOptions().MaxIOShare
	}
	if o.LoopSleepRate <= 0 {
		o.LoopSleepRate = DefaultBusyWorkerOptions().LoopSleepRate
	}
	return &BusyWorker{o: o}
}

func (*BusyWorker) Name() string { return "busy_worker" }

func (*BusyWorker) Needs() []Need {
	return []Need{
		{Component: signals.ProbeSched, What: "long runs without yielding, and run-queue latency of peers", Essential: true},
		{Component: signals.ProbeCPUProfile, What: "the hottest functions of the busy thread"},
		{Component: signals.ReceiverOTLP, What: "the traces of the requests a run held up"},
	}
}

// settler is implemented by a HotFrames whose samples reach it late (the
// profiler drains them once a period): samples of the last Settle are not
// all there yet.
type settler interface{ Settle() time.Duration }

// profileFrames is how many hot frames are asked for: enough to weigh the
// run's I/O against its work.
const profileFrames = 50

func (r *BusyWorker) Evaluate(w Window) []Observation {
	if w.Episodes == nil {
		return nil
	}
	from := w.Now.Add(-r.o.Window)
	type poolRuns struct {
		worst signals.Episode
		v     threadClass
		count int
	}
	byPool := map[string]*poolRuns{}
	for _, e := range w.Episodes.Since(signals.EpisodeBusy, from) {
		if e.Duration < r.o.MinBusy {
			continue
		}
		v := threadOf(w, e, signals.StackClass{})
		if !v.serves() {
			continue
		}
		pr := byPool[v.pool]
		if pr == nil {
			pr = &poolRuns{}
			byPool[v.pool] = pr
		}
		pr.count++
		if e.Duration > pr.worst.Duration {
			pr.worst, pr.v = e, v
		}
	}
	pools := make([]string, 0, len(byPool))
	for p := range byPool {
		pools = append(pools, p)
	}
	sort.Strings(pools)
	out := make([]Observation, 0, len(pools))
	for _, p := range pools {
		if o, ok := r.observation(w, p, byPool[p].worst, byPool[p].v, byPool[p].count); ok {
			out = append(out, o)
		}
	}
	return out
}

// profile returns the run's hottest frames once the profile covers enough
// of it (ready false: wait, rather than open naming what ran before the
// run, or nothing). Samples reach the profile a drain after they are
// taken; a profile still empty three drains after the run began has
// nothing for this thread (the profiler does not run, or lost them).
func (r *BusyWorker) profile(w Window, e signals.Episode) (hot []FrameShare, ready bool) {
	if w.Hot == nil {
		return nil, true
	}
	to, settle := e.End(), time.Duration(0)
	if s, ok := w.Hot.(settler); ok {
		settle = s.Settle()
		to = minTime(to, w.Now.Add(-settle))
	}
	if to.Sub(e.Start) < min(e.Duration, r.o.MinBusy)/2 {
		return nil, false
	}
	hot = w.Hot.HotFrames(e.Tid, e.Start, to, max(profileFrames, r.o.TopN))
	if len(hot) == 0 && w.Now.Sub(e.Start) < 3*settle {
		return nil, false
	}
	return hot, true
}

// minAppShare is the share of a run's samples the app's function must
// have been under to be named: most of the run, or the finding would name
// one of several functions as if it were the work.
const minAppShare = 0.5

// appOf is the app's function the run's CPU samples ran under (appFrame of
// each sample's stack), and its share of them; "" when the profile has no
// stacks, or no one function of the app has most of them.
func (r *BusyWorker) appOf(w Window, e signals.Episode, v threadClass) (string, float64) {
	hs, ok := w.Hot.(HotStacks)
	if !ok {
		return "", 0
	}
	to := e.End()
	if s, ok := w.Hot.(settler); ok {
		to = minTime(to, w.Now.Add(-s.Settle()))
	}
	shares := map[string]float64{}
	for _, s := range hs.HotStacks(e.Tid, e.Start, to, maxAppStacks) {
		if f := appFrame(s, v.runtime); f != "" {
			shares[f] += s.Share
		}
	}
	best, share := "", 0.0
	for f, sh := range shares {
		if sh > share || (sh == share && f < best) {
			best, share = f, sh
		}
	}
	if share < minAppShare {
		return "", 0
	}
	return best, share
}

// maxAppStacks bounds the distinct stacks weighed for the app's function.
const maxAppStacks = 200

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func (r *BusyWorker) observation(w Window, pool string, e signals.Episode, v threadClass, runs int) (Observation, bool) {
	sleeps, sleepsKnown := sleepRate(w.Store, e.Tid, e.Start, e.End())
	if sleepsKnown && sleeps >= r.o.LoopSleepRate {
		return Observation{}, false // a loop turning under load
	}
	hot, ready := r.profile(w, e)
	if !ready {
		return Observation{}, false
	}
	var work []FrameShare
	io := 0.0
	for _, h := range hot {
		if ioFrame(h.Func) {
			io += h.Share
			continue
		}
		work = append(work, h)
	}
	if len(hot) > 0 && (io >= r.o.MaxIOShare || len(work) == 0) {
		return Observation{}, false // the loop is serving its own I/O
	}
	if len(hot) == 0 && !v.byName && !sleepsKnown {
		// Without a profile or the thread's sleeps, a loop under load
		// cannot be told from one stuck in a callback.
		return Observation{}, false
	}
	fn := "its current task"
	if v.role == signals.RoleEventLoop {
		fn = "the callback it runs"
	}
	var names []string
	for i, h := range work {
		if i == r.o.TopN {
			break
		}
		names = append(names, h.Func+" "+percent(h.Share))
	}
	// The hottest leaf may be a library's (OpenSSL's SHA-512 under
	// pbkdf2Sync): true, but the fix is in the app's function that called
	// it, up the stack.
	leaf, named, app, appShare := "", fn, "", 0.0
	if len(work) > 0 {
		leaf = work[0].Func
		named, fn = leaf, leaf
	}
	who := fn // the subject of the root cause
	if app, appShare = r.appOf(w, e, v); app != "" {
		fn, named, who = app, app, app
		if leaf != "" && leaf != app {
			named = app + ", hottest in " + leaf
			who = fmt.Sprintf("%s, with %s of the run's samples in %s,", app, percent(work[0].Share), leaf)
		}
	}
	sev := SeverityWarning
	if e.Duration >= time.Second {
		sev = SeverityCritical
	}
	// A run that ended is told in the past, what it kept from running
	// too: the update after the run said tasks "wait" when none did. The
	// words claim only what the thread itself did: it ran nothing else.
	// How long each queued task waited is not known: one queued late
	// waited less, and a work-stealing runtime's idle workers take tasks
	// from its queue.
	state, did := "ran", "ran"
	if e.Ongoing {
		state, did = "has been running", "runs"
	}
	rt := runtimeName(v.runtime)
	o := Observation{
		Key:        pool,
		Cause:      CauseCPUHeavyOnWorker,
		Title:      fmt.Sprintf("CPU-heavy work on async worker %s: %s", e.Thread, named),
		Symptom:    fmt.Sprintf("worker thread %s (tid %d) %s for %s without yielding; it %s no other task meanwhile", e.Thread, e.Tid, state, duration(e.Duration), did),
		RootCause:  fmt.Sprintf("%s runs on a worker of the %q pool without an await point (%s in the last %s)", who, pool, count(float64(runs), "such run", ""), duration(r.o.Window)),
		Severity:   sev,
		Confidence: 0.8,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("thread_busy_seconds{thread=%q,tid=\"%d\"}", e.Thread, e.Tid), Value: e.Duration.Seconds(), Threshold: r.o.MinBusy.Seconds(), Unit: "seconds", Note: "on CPU (or preempted) without sleeping"},
		},
		Artifacts: []Artifact{threadArtifact(e)},
		Labels:    map[string]string{"pool": pool, "role": v.role.String()},
	}
	if v.runtime != signals.RuntimeUnknown {
		o.Labels["runtime"] = string(v.runtime)
	}
	if v.role == signals.RoleEventLoop {
		o.Cause = CauseCPUHeavyOnEventLoop
		o.Title = fmt.Sprintf("CPU-heavy work on the event loop of %s: %s", e.Thread, named)
		o.Symptom = fmt.Sprintf("event-loop thread %s (tid %d) %s for %s without sleeping; its loop %s no other callback meanwhile", e.Thread, e.Tid, state, duration(e.Duration), did)
		o.RootCause = fmt.Sprintf("%s runs on the event-loop thread of %s and keeps it from serving anything else (%s in the last %s)", who, rtOr(rt, "the process"), count(float64(runs), "such run", ""), duration(r.o.Window))
	}
	if sleepsKnown {
		o.Evidence = append(o.Evidence, Evidence{Signal: fmt.Sprintf("rate(thread_voluntary_switches_total{tid=\"%d\"})", e.Tid), Value: sleeps, Threshold: r.o.LoopSleepRate, Unit: "/s",
			Note: "sleeps during the run: below the threshold, it is not a loop coming back to its wait"})
	}
	if len(hot) > 0 {
		o.Evidence = append(o.Evidence, Evidence{Signal: fmt.Sprintf("cpu_profile_io_share{tid=\"%d\"}", e.Tid), Value: io, Threshold: r.o.MaxIOShare, Unit: "ratio", Note: "share of the run's samples in the thread's own I/O: below the threshold, it computes"})
	}
	if wait, ok := peersRunqWait(w.Store, e.Tid, w.Now.Add(-r.o.Window)); ok {
		o.Evidence = append(o.Evidence, Evidence{Signal: "thread_runq_wait_seconds_total (other threads)", Value: wait, Unit: "seconds", Window: r.o.Window, Note: "mean run-queue wait of the other threads"})
	}
	switch {
	case app != "":
		detail := fmt.Sprintf("the app's function %s of the run's CPU samples ran under (CPU profile, whole stacks)", percent(appShare))
		if len(names) > 0 {
			detail += "; hottest functions (self time): " + strings.Join(names, ", ")
		}
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "frame", Value: app, Detail: detail})
		o.Confidence = 0.9
	case len(names) > 0:
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "frame", Value: fn, Detail: "hottest function of the run (CPU profile): " + strings.Join(names, ", ")})
		o.Confidence = 0.9
	}
	o.Remediation = advisorFor(w, v).CPUHeavy(fn)
	o.Artifacts = append(o.Artifacts, tracesDuring(w.Spans, e.Start, e.End(), e.Tid, 3)...)
	return o, true
}

// sleepRate is how often thread tid went to sleep per second between from
// and to, from the sched probe's per-thread counter (sampled each poll);
// false when fewer than two samples fall in the interval.
func sleepRate(st *signals.Store, tid int, from, to time.Time) (float64, bool) {
	self := strconv.Itoa(tid)
	for _, ls := range st.Select(signals.ThreadVoluntarySwitchesTotal) {
		if ls.Get("tid") != self {
			continue
		}
		var first, last signals.Sample
		n := 0
		for _, s := range st.Range(signals.ThreadVoluntarySwitchesTotal, ls, from) {
			if s.T.After(to) {
				break
			}
			if n == 0 {
				first = s
			}
			last = s
			n++
		}
		if span := last.T.Sub(first.T).Seconds(); n >= 2 && span > 0 && last.V >= first.V {
			return (last.V - first.V) / span, true
		}
	}
	return 0, false
}

// peersRunqWait is the mean run-queue wait of the target's other threads
// over the window.
func peersRunqWait(st *signals.Store, tid int, from time.Time) (float64, bool) {
	var wait, n float64
	self := strconv.Itoa(tid)
	for _, ls := range st.Select(signals.ThreadRunqWaitSecondsTotal) {
		if ls.Get("tid") == self {
			continue
		}
		wait += st.Increase(signals.ThreadRunqWaitSecondsTotal, ls, from)
		n += st.Increase(signals.ThreadRunqWaitsTotal, ls, from)
	}
	if n == 0 {
		return 0, false
	}
	return wait / n, true
}
