package rules

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// spanList is a SpanSource over a plain list.
type spanList []signals.Span

func (l spanList) Requests(from, to time.Time) []*signals.Span {
	var out []*signals.Span
	for i := range l {
		if s := &l[i]; s.IsRequest() && !s.End.Before(from) && !s.Start.After(to) {
			out = append(out, s)
		}
	}
	return out
}

func (l spanList) Trace(id string) []*signals.Span {
	var out []*signals.Span
	for i := range l {
		if l[i].TraceID == id {
			out = append(out, &l[i])
		}
	}
	return out
}

// request makes a server span of d ending at end, with one client child
// taking child (database when db) that starts after wait.
func request(i int, end time.Time, d, wait, child time.Duration, db bool) []signals.Span {
	tid := fmt.Sprintf("%032x", i)
	root := signals.Span{TraceID: tid, SpanID: fmt.Sprintf("%016x", 2*i), Route: "/orders", Kind: signals.SpanServer, Start: end.Add(-d), End: end}
	out := []signals.Span{root}
	if child > 0 {
		c := signals.Span{TraceID: tid, SpanID: fmt.Sprintf("%016x", 2*i+1), ParentID: root.SpanID, Kind: signals.SpanClient,
			Start: root.Start.Add(wait), End: root.Start.Add(wait + child)}
		if db {
			c.DBSystem = "postgresql"
		}
		out = append(out, c)
	}
	return out
}

func TestLatencySpikeClassifies(t *testing.T) {
	now := time.Now()
	mk := func(slow func(i int, end time.Time) []signals.Span) spanList {
		var l spanList
		for i := range 30 { // baseline: fast, 20 ms with a 5 ms query
			l = append(l, request(i, now.Add(-time.Minute+time.Duration(i)*time.Second), 20*time.Millisecond, 2*time.Millisecond, 5*time.Millisecond, true)...)
		}
		for i := 30; i < 50; i++ {
			l = append(l, slow(i, now.Add(-time.Duration(i-29)*200*time.Millisecond))...)
		}
		return l
	}
	cases := map[string]func(i int, end time.Time) []signals.Span{
		CauseDBBound: func(i int, end time.Time) []signals.Span {
			return request(i, end, 600*time.Millisecond, 150*time.Millisecond, 400*time.Millisecond, true) // waits for a connection, then queries
		},
		CauseDownstreamBound: func(i int, end time.Time) []signals.Span {
			return request(i, end, 600*time.Millisecond, 10*time.Millisecond, 550*time.Millisecond, false)
		},
		CauseComputeBound: func(i int, end time.Time) []signals.Span {
			return request(i, end, 600*time.Millisecond, 2*time.Millisecond, 5*time.Millisecond, true)
		},
	}
	for cause, slow := range cases {
		r := NewLatencySpike(LatencySpikeOptions{Recent: 10 * time.Second, Window: 5 * time.Minute, Ratio: 3, MinLatency: 200 * time.Millisecond, MinSpans: 10})
		obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Spans: mk(slow)}})
		if len(obs) != 1 || obs[0].Cause != cause {
			t.Errorf("%s: %+v", cause, obs)
			continue
		}
		if cause == CauseDBBound && !strings.Contains(obs[0].RootCause, "waiting for a pooled connection") {
			t.Errorf("db-bound with a 150 ms wait before the query: %s", obs[0].RootCause)
		}
		if a := obs[0].Artifacts; len(a) != 3 || a[0].Kind != "trace" {
			t.Errorf("%s: artifacts %+v", cause, a)
		}
	}
	// Silence: the same fast requests now as before.
	r := NewLatencySpike(LatencySpikeOptions{Recent: 10 * time.Second, Window: 5 * time.Minute, Ratio: 3, MinLatency: 200 * time.Millisecond, MinSpans: 10})
	steady := mk(func(i int, end time.Time) []signals.Span {
		return request(i, end, 22*time.Millisecond, 2*time.Millisecond, 5*time.Millisecond, true)
	})
	if obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Spans: steady}}); len(obs) != 0 {
		t.Errorf("steady latency raised %+v", obs)
	}
}

func TestTracesDuringPrefersTheThread(t *testing.T) {
	now := time.Now()
	l := spanList{
		{TraceID: "slow-elsewhere", Kind: signals.SpanServer, Route: "/a", Start: now.Add(-3 * time.Second), End: now, ThreadID: 7},
		{TraceID: "on-thread", Kind: signals.SpanServer, Route: "/b", Start: now.Add(-time.Second), End: now, ThreadID: 12},
		{TraceID: "before", Kind: signals.SpanServer, Route: "/c", Start: now.Add(-time.Minute), End: now.Add(-50 * time.Second)},
	}
	got := tracesDuring(l, now.Add(-2*time.Second), now, 12, 5)
	if len(got) != 2 || got[0].Value != "on-thread" || !strings.Contains(got[0].Detail, "on this thread") || got[1].Value != "slow-elsewhere" {
		t.Errorf("%+v", got)
	}
}
