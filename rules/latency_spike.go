package rules

import (
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of latency_spike: where the slow requests spent their time.
const (
	CauseDBBound         = "db_bound"
	CauseDownstreamBound = "downstream_bound"
	CauseComputeBound    = "in_process"
)

// LatencySpikeOptions ([rules.latency_spike] in agent.conf).
type LatencySpikeOptions struct {
	Recent     time.Duration `toml:"recent" range:"[1s,1h]"`        // the spike is judged over this
	Window     time.Duration `toml:"window" range:"[2s,24h]"`       // the baseline is the window before Recent
	Ratio      float64       `toml:"ratio" range:"[1,1000]"`        // recent p99 / baseline p99 at or above this is a spike
	MinLatency time.Duration `toml:"min_latency" range:"[1ms,1h]"`  // recent p99 below this never fires
	MinSpans   int           `toml:"min_spans" range:"[1,1000000]"` // requests needed on each side
}

// DefaultLatencySpikeOptions are the defaults agent.conf documents.
func DefaultLatencySpikeOptions() LatencySpikeOptions {
	return LatencySpikeOptions{Recent: 10 * time.Second, Window: 5 * time.Minute, Ratio: 3, MinLatency: 200 * time.Millisecond, MinSpans: 10}
}

// LatencySpike classifies a route's latency spike from its traces (seed
// 000: "correlate HTTP spans with DB spans to decide if the delay is
// compute-bound, DB-bound, or network-bound"): the slow requests' time is
// split among their database calls, other outbound calls, and the app's
// own time, and the largest share is the cause.
type LatencySpike struct {
	o LatencySpikeOptions
	// The window holds up to traces.max_spans spans: judge it once a
	// second, not on every engine tick and wake-up (Requests lists the
	// window's requests without copying them, still O(requests)).
	at   time.Time
	last []Observation
}

// latencyEvery is how often the spans are judged again.
const latencyEvery = time.Second

func NewLatencySpike(o LatencySpikeOptions) *LatencySpike { return &LatencySpike{o: o} }

func (*LatencySpike) Name() string { return "latency_spike" }

func (*LatencySpike) Needs() []Need {
	return []Need{
		{Component: signals.ReceiverOTLP, What: "the app's spans: p99 per route, and where slow requests spend their time", Essential: true},
	}
}

// Symptom: a spike whose slow traces another finding carries is that
// finding's (Engine.explain).
func (*LatencySpike) Symptom() {}

func (r *LatencySpike) Evaluate(w Window) []Observation {
	if w.Spans == nil {
		return nil
	}
	if !r.at.IsZero() && w.Now.Sub(r.at) < latencyEvery && !w.Now.Before(r.at) {
		return r.last
	}
	r.at, r.last = w.Now, r.evaluate(w)
	return r.last
}

func (r *LatencySpike) evaluate(w Window) []Observation {
	reqs := w.Spans.Requests(w.Now.Add(-r.o.Window), w.Now)
	recentFrom := w.Now.Add(-r.o.Recent)
	type route struct{ recent, base []*signals.Span }
	routes := map[string]*route{}
	for _, s := range reqs {
		rt := routes[s.Route]
		if rt == nil {
			rt = &route{}
			routes[s.Route] = rt
		}
		if s.End.Before(recentFrom) {
			rt.base = append(rt.base, s)
		} else {
			rt.recent = append(rt.recent, s)
		}
	}
	names := make([]string, 0, len(routes))
	for n := range routes {
		names = append(names, n)
	}
	sort.Strings(names)
	var out []Observation
	for _, n := range names {
		if o, ok := r.route(n, routes[n].recent, routes[n].base, w.Spans); ok {
			out = append(out, o)
		}
	}
	return out
}

func p99(ss []*signals.Span) time.Duration {
	ds := make([]time.Duration, len(ss))
	for i, s := range ss {
		ds[i] = s.Duration()
	}
	slices.Sort(ds)
	return ds[min(len(ds)-1, len(ds)*99/100)]
}

func (r *LatencySpike) route(name string, recent, base []*signals.Span, src SpanSource) (Observation, bool) {
	if len(recent) < r.o.MinSpans {
		return Observation{}, false
	}
	now99 := p99(recent)
	if now99 < r.o.MinLatency {
		return Observation{}, false
	}
	ratio := 0.0
	if len(base) >= r.o.MinSpans {
		before := p99(base)
		ratio = float64(now99) / float64(max(before, time.Microsecond))
		if ratio < r.o.Ratio {
			return Observation{}, false
		}
	}
	// The slowest tenth of recent requests (at least one) tell why.
	sorted := slices.Clone(recent)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Duration() > sorted[j].Duration() })
	slow := sorted[:max(1, len(sorted)/10)]
	// Only the slow requests' traces are broken down, looked up by id.
	var sum breakdown
	for _, s := range slow {
		b := breakdownOf(s, src.Trace(s.TraceID))
		sum.total += b.total
		sum.db += b.db
		sum.downstream += b.downstream
		sum.dbWait += b.dbWait
		sum.haveDB = sum.haveDB || b.haveDB
	}
	share := func(d time.Duration) float64 { return float64(d) / float64(max(sum.total, 1)) }
	dbS, downS, selfS := share(sum.db), share(sum.downstream), share(sum.self())
	o := Observation{
		Key:      name,
		Severity: SeverityWarning,
		Symptom:  fmt.Sprintf("p99 latency of %s is %s over the last %s (%d requests)", name, fmtDur(now99.Round(time.Millisecond)), r.o.Recent, len(recent)),
		Evidence: []Evidence{
			{Signal: "p99 latency (spans)", Value: now99.Seconds(), Threshold: r.o.MinLatency.Seconds(), Unit: "seconds", Window: r.o.Recent},
			{Signal: "share of slow requests' time in database calls", Value: dbS, Unit: "ratio"},
			{Signal: "share in other outbound calls", Value: downS, Unit: "ratio"},
			{Signal: "share in the app itself", Value: selfS, Unit: "ratio"},
		},
		Labels: map[string]string{"route": name},
	}
	if ratio > 0 {
		o.Symptom += fmt.Sprintf(", %.1f× its p99 before", ratio)
		o.Evidence = append(o.Evidence, Evidence{Signal: "p99 now / p99 before", Value: ratio, Threshold: r.o.Ratio, Unit: "ratio", Window: r.o.Window})
	}
	n := len(slow)
	switch {
	case dbS >= downS && dbS >= selfS:
		o.Cause, o.Confidence = CauseDBBound, 0.5+dbS/2
		o.Title = fmt.Sprintf("Latency spike on %s: database-bound (%.0f%% of slow requests' time in DB calls)", name, 100*dbS)
		o.RootCause = fmt.Sprintf("the slowest requests spend %.0f%% of their time in database calls", 100*dbS)
		if wait := sum.dbWait / time.Duration(n); wait > sum.total/time.Duration(n)/5 {
			o.RootCause += fmt.Sprintf(", and wait %s before their first one starts: waiting for a pooled connection", fmtDur(wait.Round(time.Millisecond)))
			o.Evidence = append(o.Evidence, Evidence{Signal: "time before the first DB span", Value: wait.Seconds(), Unit: "seconds", Note: "a connection pool wait"})
		}
		o.Remediation = "Look at the queries of these traces (slow query log, missing index, lock waits) and at the database's load. If requests wait before the DB span starts, the pool is too small."
	case downS >= selfS:
		o.Cause, o.Confidence = CauseDownstreamBound, 0.5+downS/2
		o.Title = fmt.Sprintf("Latency spike on %s: downstream-bound (%.0f%% of slow requests' time in outbound calls)", name, 100*downS)
		o.RootCause = fmt.Sprintf("the slowest requests spend %.0f%% of their time waiting on other services", 100*downS)
		o.Remediation = "Look at the called services in these traces. Set timeouts and budgets on outbound calls, and retry with backoff only where a call is idempotent."
	default:
		o.Cause, o.Confidence = CauseComputeBound, 0.5+selfS/2
		o.Title = fmt.Sprintf("Latency spike on %s: in-process (%.0f%% of slow requests' time in the app itself)", name, 100*selfS)
		o.RootCause = fmt.Sprintf("the slowest requests spend %.0f%% of their time in the app's own code, outside any outbound call: CPU work, a blocking call, a lock or a queue inside the process (see the scheduler findings)", 100*selfS)
		o.Remediation = "Profile the app (culprit profile) during the spike and look for blocking calls on async workers; the scheduler findings name the thread."
	}
	for i, s := range sorted {
		if i == 3 {
			break
		}
		o.Artifacts = append(o.Artifacts, Artifact{Kind: "trace", Value: s.TraceID, Detail: fmt.Sprintf("%s took %s", s.Route, fmtDur(s.Duration().Round(time.Millisecond)))})
	}
	return o, true
}
