package rules

import (
	"fmt"
	"sort"
	"strings"
	"time"
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
// the probe does not run.
type WorkerImbalance struct{ o WorkerImbalanceOptions }

func NewWorkerImbalance(o WorkerImbalanceOptions) *WorkerImbalance { return &WorkerImbalance{o: o} }

func (*WorkerImbalance) Name() string { return "worker_imbalance" }

type threadLoad struct {
	tid, name string
	cores     float64
}

func (r *WorkerImbalance) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Window)
	series, lss := threadCPU(w.Store)
	pools := map[string][]threadLoad{}
	for _, ls := range lss {
		name := ls.Get("thread")
		pool, ok := w.Pools.Pool(name)
		if !ok {
			continue
		}
		s := w.Store.Range(series, ls, from)
		if len(s) < 2 || s[len(s)-1].T.Sub(s[0].T) < r.o.Window/2 || w.Now.Sub(s[len(s)-1].T) > 3*time.Second {
			continue
		}
		span := s[len(s)-1].T.Sub(s[0].T).Seconds()
		pools[pool] = append(pools[pool], threadLoad{ls.Get("tid"), name, (s[len(s)-1].V - s[0].V) / span})
	}
	names := make([]string, 0, len(pools))
	for p := range pools {
		names = append(names, p)
	}
	sort.Strings(names)
	var out []Observation
	for _, p := range names {
		if o, ok := r.pool(p, pools[p], series); ok {
			out = append(out, o)
		}
	}
	return out
}

func (r *WorkerImbalance) pool(pool string, ts []threadLoad, series string) (Observation, bool) {
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
		idle = append(idle, fmt.Sprintf("%s %.0f%%", t.name, 100*t.cores))
		if len(idle) == 6 {
			idle = append(idle, "...")
			break
		}
	}
	ratio := busiest.cores / max(median, 0.001)
	return Observation{
		Key:   pool,
		Cause: CauseUnbalancedWorkers,
		Title: fmt.Sprintf("Worker imbalance in pool %q: %s does %.0f%% of the work", pool, busiest.name, 100*busiest.cores/total),
		Symptom: fmt.Sprintf("%s (tid %s) used %.2f cores over %s while its %d peers used a median of %.2f (%s)",
			busiest.name, busiest.tid, busiest.cores, r.o.Window, len(peers), median, strings.Join(idle, ", ")),
		RootCause:   fmt.Sprintf("the %q pool's load is pinned to one worker: the service saturates at one core whatever the pool's size", pool),
		Remediation: "find what ties the work to one thread: connections accepted by one worker (SO_REUSEPORT hashing a few clients, a single long-lived connection or HTTP/2 stream), tasks spawned with spawn_local / on a current-thread runtime, or a shared lock held by one worker; spread connections across workers or use the work-stealing scheduler",
		Severity:    SeverityWarning,
		Confidence:  0.7,
		Evidence: []Evidence{
			{Signal: fmt.Sprintf("%s{thread=%q,tid=%q}", series, busiest.name, busiest.tid), Value: busiest.cores, Threshold: r.o.MinBusy, Unit: "cores", Window: r.o.Window, Note: "the busiest worker"},
			{Signal: "busiest / median of peers", Value: ratio, Threshold: r.o.MinRatio, Unit: "ratio", Window: r.o.Window},
		},
		Artifacts: []Artifact{{Kind: "thread", Value: fmt.Sprintf("%s (tid %s)", busiest.name, busiest.tid), Detail: "the busy worker"}},
		Labels:    map[string]string{"pool": pool},
	}, true
}
