package rules

import (
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseUnbalancedWorkers is worker_imbalance's root cause.
const CauseUnbalancedWorkers = "unbalanced_workers"

// WorkerImbalanceOptions ([rules.worker_imbalance] in agent.conf).
type WorkerImbalanceOptions struct {
	Window   time.Duration `toml:"window" range:"[1s,1h]"`
	MinBusy  float64       `toml:"min_busy_cores" range:"(0,1024]"` // cores the busiest worker must use
	MinRatio float64       `toml:"min_ratio" range:"[1,1000]"`      // busiest / median of its peers
}

// DefaultWorkerImbalanceOptions are the defaults agent.conf documents.
func DefaultWorkerImbalanceOptions() WorkerImbalanceOptions {
	return WorkerImbalanceOptions{Window: 10 * time.Second, MinBusy: 0.5, MinRatio: 4}
}

// WorkerImbalance names a pool whose load sits on one worker while its
// peers idle (seed 002: "worker 3 swamped while worker 7 sits idle"): the
// service saturates at one core's worth of work whatever the pool's size.
// Thread CPU time comes from the sched probe, or from /proc task stat when
// the probe does not run. Only workers of one pool are compared: an event
// loop that runs alone by design (Node.js, redis) is not a busy member of
// a pool whose other members idle, and its runtime's helper threads
// (V8's, libuv's threadpool, Tokio's blocking pool) are not its peers,
// whatever their names.
type WorkerImbalance struct{ o WorkerImbalanceOptions }

func NewWorkerImbalance(o WorkerImbalanceOptions) *WorkerImbalance { return &WorkerImbalance{o: o} }

func (*WorkerImbalance) Name() string { return "worker_imbalance" }

func (*WorkerImbalance) Needs() []Need {
	return []Need{
		{Component: signals.ProbeSched, What: "per-thread CPU time from the kernel (falls back to /proc task stat), and workers told by their stacks (falls back to thread names)"},
		{Component: signals.CollectorThreads, What: "per-thread CPU time when the sched probe does not run"},
	}
}

type threadLoad struct {
	tid, name string
	cores     float64
}

// FacetOf: one worker that runs without yielding uses the pool's CPU
// alone; busy_worker names that run and what to do about it.
func (*WorkerImbalance) FacetOf() []RuleCause {
	return []RuleCause{{Rule: (*BusyWorker).Name(nil), Cause: CauseCPUHeavyOnWorker}, {Rule: (*BusyWorker).Name(nil), Cause: CauseCPUHeavyOnEventLoop}}
}

func (r *WorkerImbalance) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Window)
	series, lss := threadCPU(w.Store)
	type member struct {
		load threadLoad
		v    threadClass
	}
	pools := map[string][]member{}
	for _, ls := range lss {
		name := ls.Get("thread")
		tid, _ := strconv.Atoi(ls.Get("tid"))
		v := threadOf(w, signals.Episode{Tid: tid, Thread: name}, signals.StackClass{})
		if !v.serves() {
			continue
		}
		s := w.Store.Range(series, ls, from)
		if len(s) < 2 || s[len(s)-1].T.Sub(s[0].T) < r.o.Window/2 || w.Now.Sub(s[len(s)-1].T) > 3*time.Second {
			continue
		}
		span := s[len(s)-1].T.Sub(s[0].T).Seconds()
		pools[v.pool] = append(pools[v.pool], member{threadLoad{ls.Get("tid"), name, (s[len(s)-1].V - s[0].V) / span}, v})
	}
	names := make([]string, 0, len(pools))
	for p := range pools {
		names = append(names, p)
	}
	sort.Strings(names)
	var out []Observation
	for _, p := range names {
		ms := pools[p]
		loop, classified := false, false
		for _, m := range ms {
			loop = loop || m.v.role == signals.RoleEventLoop
			classified = classified || (m.v.role == signals.RoleWorker && !m.v.byName)
		}
		if loop {
			// The name is shared with an event loop that runs alone: the
			// threads so named are one runtime's loop and its helpers,
			// not a pool.
			continue
		}
		var ts []threadLoad
		adv := w.advice()
		for _, m := range ms {
			if !m.v.byName {
				adv = advisorFor(w, m.v)
			}
			// Once a runtime's frames showed its workers, a thread of
			// the same name they did not show (one of Tokio's blocking
			// threads, asleep since before the probe) is not counted.
			if classified && m.v.byName {
				continue
			}
			ts = append(ts, m.load)
		}
		fix, pooled := adv.WorkerImbalance()
		if !pooled {
			// The runtime runs the app's code on one thread (Node.js,
			// CPython, redis): its threads are no pool to balance.
			continue
		}
		if o, ok := r.pool(p, ts, series, fix); ok {
			out = append(out, o)
		}
	}
	return out
}

func (r *WorkerImbalance) pool(pool string, ts []threadLoad, series *signals.Desc, fix string) (Observation, bool) {
	if len(ts) < 2 {
		return Observation{}, false
	}
	sort.Slice(ts, func(i, j int) bool { return ts[i].cores > ts[j].cores })
	busiest := ts[0]
	peers := ts[1:]
	median := peers[len(peers)/2].cores
	if busiest.cores < r.o.MinBusy || busiest.cores < r.o.MinRatio*median {
		return Observation{}, false
	}
	var total float64
	var idle []string
	for _, t := range ts {
		total += t.cores
	}
	for _, t := range peers {
		idle = append(idle, t.name+" "+percent(t.cores))
		if len(idle) == 6 {
			idle = append(idle, "...")
			break
		}
	}
	ratio := busiest.cores / max(median, 0.001)
	return Observation{
		Key:   pool,
		Cause: CauseUnbalancedWorkers,
		Title: fmt.Sprintf("Worker imbalance in pool %q: %s does %s of the work", pool, busiest.name, percent(busiest.cores/total)),
		Symptom: fmt.Sprintf("%s (tid %s) used %s over %s while its %s used a median of %s (%s)",
			busiest.name, busiest.tid, cores(busiest.cores), duration(r.o.Window), count(float64(len(peers)), "peer", ""), cores(median), strings.Join(idle, ", ")),
		RootCause:   fmt.Sprintf("the %q pool's load is pinned to one worker: the service saturates at one core whatever the pool's size", pool),
		Remediation: fix,
		Severity:    SeverityWarning,
		Confidence:  0.7,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("%s{thread=%q,tid=%q}", series.Name, busiest.name, busiest.tid), Value: busiest.cores, Threshold: r.o.MinBusy, Unit: "cores", Window: r.o.Window, Note: "the busiest worker"},
			{Signal: "busiest / median of peers", Value: ratio, Threshold: r.o.MinRatio, Unit: "ratio", Window: r.o.Window},
		},
		Artifacts: []Artifact{{Kind: "thread", Value: fmt.Sprintf("%s (tid %s)", busiest.name, busiest.tid), Detail: "the busy worker"}},
		Labels:    map[string]string{"pool": pool},
	}, true
}
