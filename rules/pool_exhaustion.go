package rules

import (
	"fmt"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CausePoolAtCeiling is pool_exhaustion's root cause.
const CausePoolAtCeiling = "pool_at_ceiling"

// PoolExhaustionOptions ([rules.pool_exhaustion] in agent.conf).
type PoolExhaustionOptions struct {
	Window   time.Duration `toml:"window" range:"[1s,1h]"`        // the ceiling must hold this long
	MinConns float64       `toml:"min_conns" range:"[1,1000000]"` // pools smaller than this are not judged
	MinQueue float64       `toml:"min_queue" range:"(0,1]"`       // share of samples with connections waiting to be accepted
}

// DefaultPoolExhaustionOptions are the defaults agent.conf documents.
func DefaultPoolExhaustionOptions() PoolExhaustionOptions {
	return PoolExhaustionOptions{Window: 10 * time.Second, MinConns: 2, MinQueue: 0.5}
}

// PoolExhaustion names a connection pool to an upstream that is full
// (seed 000 Problem E): the app's established connections to
// one remote stay flat at a ceiling (the pool's max) while new requests
// queue in front of the app. More traffic then only lengthens the queue.
type PoolExhaustion struct{ o PoolExhaustionOptions }

func NewPoolExhaustion(o PoolExhaustionOptions) *PoolExhaustion { return &PoolExhaustion{o: o} }

func (*PoolExhaustion) Name() string { return "pool_exhaustion" }

func (*PoolExhaustion) Needs() []Need {
	return []Need{
		{Component: signals.CollectorSockets, What: "the target's established connections per remote: its pools", Essential: true},
		{Component: signals.CollectorAcceptQueue, What: "accept queue lengths: the requests that wait", Essential: true},
		{Component: signals.ReceiverOTLP, What: "the wait before the first database call, from the app's traces"},
	}
}

func (r *PoolExhaustion) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Window)
	queued, port := r.queueing(w, from)
	if queued < r.o.MinQueue {
		return nil
	}
	var out []Observation
	for _, ls := range w.Store.Select(signals.TCPSocketsByRemote) {
		remote, owner := ls.Get("remote"), ls.Get("owner")
		// Only the target's own pools: the queue is the target's, and a
		// neighbour's connections (a sidecar's, culprit's own API clients)
		// are not held up by it. Connections to the queueing listener
		// itself are the waiters, not the pool.
		if ls.Get("state") != "ESTABLISHED" || owner != ownerTarget || remote == "other" || strings.HasSuffix(remote, ":"+port) {
			continue
		}
		// The count that stood when the window began is the last sample
		// before it: the sockets collector spaces its dumps up to
		// freshSockets apart while connections churn in a namespace where
		// a dump is dear, and the window (10 s) then holds as few as two,
		// 4 s apart, for part of each spacing.
		ss := w.Store.Range(signals.TCPSocketsByRemote, ls, from.Add(-freshSockets))
		for len(ss) > 1 && !ss[1].T.After(from) {
			ss = ss[1:]
		}
		if len(ss) < 3 || ss[len(ss)-1].T.Sub(ss[0].T) < r.o.Window/2 || !w.Fresh(ss[len(ss)-1].T, freshSockets) {
			continue
		}
		lo, hi := ss[0].V, ss[0].V
		for _, s := range ss {
			lo, hi = min(lo, s.V), max(hi, s.V)
		}
		if hi < r.o.MinConns || hi-lo > 0 {
			continue
		}
		o := Observation{
			Key:   remote,
			Cause: CausePoolAtCeiling,
			Title: fmt.Sprintf("Connection pool to %s exhausted: %s, flat, while requests queue", remote, count(hi, "connection", "")),
			Symptom: fmt.Sprintf("exactly %s to %s stayed established for %s while connections waited in the accept queue of port %s in %s of samples",
				count(hi, "connection", ""), remote, duration(r.o.Window), port, percent(queued)),
			RootCause:   fmt.Sprintf("requests wait for a connection to %s: the pool holds its maximum (%.0f) and every connection is busy, so throughput is capped by the pool size and the upstream's latency", remote, hi),
			Remediation: w.advice().PoolCeiling(int(hi), remote),
			Severity:    SeverityWarning,
			Confidence:  0.7,
			Evidence: []Evidence{
				{Signal: signals.TCPSocketsByRemote.Name + ls.String(), Value: hi, Threshold: r.o.MinConns, Unit: "connections", Window: r.o.Window, Note: "flat: the same count in every sample"},
				{Signal: fmt.Sprintf("listen_queue_length{port=%q}", port), Value: queued, Threshold: r.o.MinQueue, Unit: "ratio", Window: r.o.Window, Note: "share of samples with connections waiting"},
			},
			Artifacts: []Artifact{{Kind: "endpoint", Value: remote, Detail: fmt.Sprintf("the upstream; pool ceiling %.0f", hi)}},
			Labels:    map[string]string{"remote": remote},
		}
		r.spanEvidence(w, &o, from)
		out = append(out, o)
	}
	return out
}

// spanEvidence adds, from the app's traces, how long requests waited
// before their first database call started: the pool wait, seen from
// inside the app.
func (r *PoolExhaustion) spanEvidence(w Window, o *Observation, from time.Time) {
	to := w.Now
	if w.Spans == nil {
		return
	}
	var wait time.Duration
	n := 0
	for _, s := range w.Spans.Requests(from, to) {
		if b := breakdownOf(s, w.Spans.Trace(s.TraceID)); b.haveDB {
			wait += b.dbWait
			n++
		}
	}
	if n == 0 {
		return
	}
	mean := wait / time.Duration(n)
	o.Evidence = append(o.Evidence, Evidence{Signal: "time before the first DB span (traces)", Value: mean.Seconds(), Unit: "seconds", Window: r.o.Window, Note: fmt.Sprintf("mean over %d requests: time spent waiting for a connection", n)})
	o.Artifacts = append(o.Artifacts, tracesDuring(w.Spans, from, to, 0, 3)...)
}

// queueing is the largest share of samples, over the target's listeners,
// with connections waiting in an accept queue, and that listener's port.
func (r *PoolExhaustion) queueing(w Window, from time.Time) (float64, string) {
	best, port := 0.0, ""
	for _, ls := range w.Store.Select(signals.ListenQueueLength) {
		ss := w.Store.Range(signals.ListenQueueLength, ls, from)
		if len(ss) == 0 || !w.Fresh(ss[len(ss)-1].T, freshFast) {
			continue
		}
		n := 0
		for _, s := range ss {
			if s.V > 0 {
				n++
			}
		}
		if share := float64(n) / float64(len(ss)); share > best {
			best, port = share, ls.Get("port")
		}
	}
	return best, port
}
