package rules

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseCPUHeavyOnWorker is busy_worker's root cause.
const CauseCPUHeavyOnWorker = "cpu_heavy_on_worker"

// BusyWorkerOptions ([rules.busy_worker] in agent.conf).
type BusyWorkerOptions struct {
	Window  time.Duration `toml:"window" range:"[1s,1h]"`     // runs are looked for over this window
	MinBusy time.Duration `toml:"min_busy" range:"[10ms,1m]"` // a run this long without sleeping is CPU work that does not yield
	TopN    int           `toml:"top_frames" range:"[1,100]"` // hottest functions named
}

// DefaultBusyWorkerOptions are the defaults agent.conf documents.
func DefaultBusyWorkerOptions() BusyWorkerOptions {
	return BusyWorkerOptions{Window: 10 * time.Second, MinBusy: 500 * time.Millisecond, TopN: 5}
}

// BusyWorker names CPU-heavy work (serialization, compression, crypto, a
// regex over a large body) run on an async worker without yielding (seed
// 000 Problem G): the worker cannot poll its other tasks until it is done,
// so their latency rises by the length of the run while the process's CPU
// use looks moderate.
type BusyWorker struct {
	o BusyWorkerOptions
}

func NewBusyWorker(o BusyWorkerOptions) *BusyWorker {
	if o.TopN <= 0 {
		o.TopN = 5
	}
	return &BusyWorker{o: o}
}

func (*BusyWorker) Name() string { return "busy_worker" }

func (r *BusyWorker) Evaluate(w Window) []Observation {
	if w.Episodes == nil {
		return nil
	}
	from := w.Now.Add(-r.o.Window)
	worst := map[string]signals.Episode{}
	count := map[string]int{}
	for _, e := range w.Episodes.Since(signals.EpisodeBusy, from) {
		if e.Duration < r.o.MinBusy {
			continue
		}
		pool, ok := w.Pools.Pool(e.Thread)
		if !ok {
			continue
		}
		count[pool]++
		if e.Duration > worst[pool].Duration {
			worst[pool] = e
		}
	}
	pools := make([]string, 0, len(worst))
	for p := range worst {
		pools = append(pools, p)
	}
	sort.Strings(pools)
	out := make([]Observation, 0, len(pools))
	for _, p := range pools {
		out = append(out, r.observation(w, p, worst[p], count[p]))
	}
	return out
}

func (r *BusyWorker) observation(w Window, pool string, e signals.Episode, count int) Observation {
	var hot []FrameShare
	if w.Hot != nil {
		hot = w.Hot.HotFrames(e.Tid, e.Start, e.End(), r.o.TopN)
	}
	fn := "its current task"
	var names []string
	for _, h := range hot {
		names = append(names, fmt.Sprintf("%s %.0f%%", h.Func, 100*h.Share))
	}
	if len(hot) > 0 {
		fn = hot[0].Func
	}
	sev := SeverityWarning
	if e.Duration >= time.Second {
		sev = SeverityCritical
	}
	state := "ran"
	if e.Ongoing {
		state = "has been running"
	}
	o := Observation{
		Key:     pool,
		Cause:   CauseCPUHeavyOnWorker,
		Title:   fmt.Sprintf("CPU-heavy work on async worker %s: %s", e.Thread, fn),
		Symptom: fmt.Sprintf("worker thread %s (tid %d) %s for %s without yielding; tasks queued on it wait that long", e.Thread, e.Tid, state, seconds(e.Duration)),
		RootCause: fmt.Sprintf("%s runs on a worker of the %q pool without an await point (%d such runs in the last %s)",
			fn, pool, count, r.o.Window),
		Remediation: fmt.Sprintf("move %s to a CPU pool (tokio::task::spawn_blocking, rayon, actix web::block), or split it and yield between parts (tokio::task::yield_now)", fn),
		Severity:    sev,
		Confidence:  0.8,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("thread_busy_seconds{thread=%q,tid=\"%d\"}", e.Thread, e.Tid), Value: e.Duration.Seconds(), Threshold: r.o.MinBusy.Seconds(), Unit: "seconds", Note: "on CPU (or preempted) without sleeping"},
		},
		Artifacts: []Artifact{threadArtifact(e)},
		Labels:    map[string]string{"pool": pool},
	}
	if wait, ok := peersRunqWait(w.Store, e.Tid, w.Now.Add(-r.o.Window)); ok {
		o.Evidence = append(o.Evidence, Evidence{Signal: "thread_runq_wait_seconds_total (other threads)", Value: wait, Unit: "seconds", Window: r.o.Window, Note: "mean run-queue wait of the other threads"})
	}
	if len(names) > 0 {
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "frame", Value: fn, Detail: "hottest function of the run (CPU profile): " + strings.Join(names, ", ")})
		o.Confidence = 0.9
	}
	o.Artifacts = append(o.Artifacts, tracesDuring(w.Spans, e.Start, e.End(), e.Tid, 3)...)
	return o
}

// peersRunqWait is the mean run-queue wait of the target's other threads
// over the window.
func peersRunqWait(st *signals.Store, tid int, from time.Time) (float64, bool) {
	var wait, n float64
	self := strconv.Itoa(tid)
	for _, ls := range st.Select("thread_runq_wait_seconds_total") {
		if ls.Get("tid") == self {
			continue
		}
		wait += st.Increase("thread_runq_wait_seconds_total", ls, from)
		n += st.Increase("thread_runq_waits_total", ls, from)
	}
	if n == 0 {
		return 0, false
	}
	return wait / n, true
}
