package main

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// tracedScenario runs an agent with its OTLP receiver on a free port and a
// traced app (real OTel SDK) exporting to it.
func tracedScenario(t *testing.T, tune func(*Config)) (*testenv.TracedApp, culpritv1.DiagnosticsClient, <-chan *culpritv1.FindingEvent) {
	t.Helper()
	otlp := freeAddr(t)
	app := testenv.StartTracedApp(t, otlp)
	cfg := testConfig(t, app.PID)
	cfg.Traces.GRPCAddr = otlp
	cfg.Rules.BlockingWorker.Window = time.Duration(4 * time.Second)
	cfg.Rules.LatencySpike.Recent = time.Duration(3 * time.Second)
	cfg.Rules.LatencySpike.Window = time.Duration(30 * time.Second)
	cfg.Rules.LatencySpike.MinSpans = 8
	if tune != nil {
		tune(&cfg)
	}
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitSched(t, c)
	events, _ := watch(t, c, 0)
	return app, c, events
}

func traceArtifacts(f *culpritv1.Finding) []string {
	var out []string
	for _, a := range f.Artifacts {
		if a.Kind == "trace" {
			out = append(out, a.Value)
		}
	}
	return out
}

// waitForTraces returns the first event of rule whose finding carries a
// trace id from want.
func waitForTraces(t *testing.T, events <-chan *culpritv1.FindingEvent, rule string, want []string) *culpritv1.Finding {
	t.Helper()
	ev, _ := next(t, events, 15*time.Second, func(ev *culpritv1.FindingEvent) bool {
		if ev.Finding == nil || ev.Finding.Rule != rule {
			return false
		}
		return slices.ContainsFunc(traceArtifacts(ev.Finding), func(id string) bool { return slices.Contains(want, id) })
	})
	return ev.Finding
}

// Requests served on a worker that makes a blocking call: the
// blocking_worker finding carries the trace ids of exactly those requests.
func TestTraceIDsOnBlockingWorkerFinding(t *testing.T) {
	app, _, events := tracedScenario(t, nil)
	var blocked, fast []string
	for range 3 {
		blocked = append(blocked, app.Get(t, "/block?ms=700"))
		fast = append(fast, app.Get(t, "/fast"))
	}
	f := waitForTraces(t, events, "blocking_worker", blocked)
	t.Logf("%s: traces %v", f.Title, traceArtifacts(f))
	for _, id := range traceArtifacts(f) {
		if slices.Contains(fast, id) {
			t.Errorf("a fast request's trace %s is on the blocking finding", id)
		}
	}
	if !strings.Contains(f.Title, "worker-1") {
		t.Errorf("title %q", f.Title)
	}
}

// A route whose database calls slow down from 5 ms to 400 ms is classified
// DB-bound, and one whose outbound call slows down downstream-bound; each
// finding carries its own slow traces.
func TestLatencySpikeClassifiedFromSpans(t *testing.T) {
	app, _, events := tracedScenario(t, nil)
	for range 10 {
		app.Get(t, "/orders?db=5")
		app.Get(t, "/proxy?ms=5")
	}
	time.Sleep(3500 * time.Millisecond) // the fast requests become the baseline
	// Concurrently, as under load: all within the recent window.
	slowDB, slowProxy := make([]string, 10), make([]string, 10)
	var wg sync.WaitGroup
	for i := range 10 {
		wg.Go(func() { slowDB[i] = app.Get(t, "/orders?db=400") })
		wg.Go(func() { slowProxy[i] = app.Get(t, "/proxy?ms=400") })
	}
	wg.Wait()
	seen := map[string]*culpritv1.Finding{}
	deadline := time.After(15 * time.Second)
	for len(seen) < 2 {
		select {
		case ev := <-events:
			if ev.Finding != nil && ev.Finding.Rule == "latency_spike" {
				seen[ev.Finding.Key] = ev.Finding
			}
		case <-deadline:
			t.Fatalf("latency spikes seen: %v", seen)
		}
	}
	for route, want := range map[string]struct {
		cause  string
		traces []string
	}{"/orders": {"db_bound", slowDB}, "/proxy": {"downstream_bound", slowProxy}} {
		f := seen[route]
		if f == nil {
			t.Errorf("no finding for %s", route)
			continue
		}
		t.Logf("%s\n  %s", f.Title, f.RootCause)
		if f.Cause != want.cause {
			t.Errorf("%s classified %s, want %s", route, f.Cause, want.cause)
		}
		for _, id := range traceArtifacts(f) {
			if !slices.Contains(want.traces, id) {
				t.Errorf("%s finding carries trace %s, not one of its slow requests", route, id)
			}
		}
	}
}

// Requests queue behind a worker that blocks: their route's p99 jumps, and
// the slow traces are the ones the blocking_worker finding carries. The
// spike is that finding's symptom: blocking_worker names the route, and no
// latency_spike finding of its own opens (DESIGN: "p99 outlier
// explained").
func TestLatencySpikeExplainedByBlockingWorker(t *testing.T) {
	app, _, events := tracedScenario(t, func(c *Config) {
		c.Rules.LatencySpike.Recent = time.Duration(5 * time.Second)
	})
	for range 10 {
		app.Get(t, "/block?ms=1")
	}
	time.Sleep(5500 * time.Millisecond) // the fast requests become the baseline
	var wg sync.WaitGroup
	slow := make([]string, 8)
	for i := range slow {
		wg.Go(func() { slow[i] = app.Get(t, "/block?ms=400") })
	}
	wg.Wait()
	ev, skipped := next(t, events, 10*time.Second, func(ev *culpritv1.FindingEvent) bool {
		return ev.Finding != nil && ev.Finding.Rule == "blocking_worker" && artifact(ev.Finding, "route", "/block")
	})
	t.Logf("%s; traces %v", ev.Finding.Title, traceArtifacts(ev.Finding))
	// The spike's evaluation runs once a second; give it a few.
	deadline := time.After(4 * time.Second)
	for {
		for _, s := range skipped {
			if s.Finding != nil && s.Finding.Rule == "latency_spike" {
				t.Fatalf("the explained spike opened a finding of its own: %s", s.Finding.Title)
			}
		}
		select {
		case ev := <-events:
			skipped = []*culpritv1.FindingEvent{ev}
			continue
		case <-deadline:
		}
		break
	}
}
