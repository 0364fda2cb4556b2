package rules

import (
	"fmt"
	"sort"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// SpanSource is what rules read of the app's traces (signals.Spans, fed
// by the OTLP receiver): the requests of a window, and the spans of one
// trace. Both share the spans with the store (read only) and copy none:
// the store may hold 65536 of them and rules read every second.
type SpanSource interface {
	Requests(from, to time.Time) []*signals.Span
	Trace(traceID string) []*signals.Span
}

// tracesDuring names the slowest requests that were in flight during
// [from, to], as trace artifacts. With tid > 0, requests that recorded
// thread.id = tid come first: they ran on that very thread.
func tracesDuring(src SpanSource, from, to time.Time, tid, n int) []Artifact {
	if src == nil {
		return nil
	}
	reqs := src.Requests(from, to) // a fresh slice: ours to sort
	sort.SliceStable(reqs, func(i, j int) bool {
		oni, onj := tid > 0 && reqs[i].ThreadID == tid, tid > 0 && reqs[j].ThreadID == tid
		if oni != onj {
			return oni
		}
		return reqs[i].Duration() > reqs[j].Duration()
	})
	var out []Artifact
	for _, s := range reqs {
		if len(out) == n {
			break
		}
		detail := fmt.Sprintf("%s took %s", s.Route, fmtDur(s.Duration().Round(time.Millisecond)))
		if tid > 0 && s.ThreadID == tid {
			detail += ", on this thread"
		}
		out = append(out, Artifact{Kind: "trace", Value: s.TraceID, Detail: detail})
	}
	return out
}

// breakdown splits a request's time among its descendants: database
// calls, other outbound calls, and what is left: the app's own time.
type breakdown struct {
	total, db, downstream time.Duration
	dbWait                time.Duration // from the request's start to its first database call
	haveDB                bool
}

func (b breakdown) self() time.Duration { return max(0, b.total-b.db-b.downstream) }

// breakdownOf finds the descendants of root among spans of its trace.
func breakdownOf(root *signals.Span, trace []*signals.Span) breakdown {
	b := breakdown{total: root.Duration()}
	children := map[string][]*signals.Span{}
	for _, s := range trace {
		children[s.ParentID] = append(children[s.ParentID], s)
	}
	var firstDB time.Time
	var walk func(id string, depth int)
	walk = func(id string, depth int) {
		if depth > 32 {
			return
		}
		for _, c := range children[id] {
			if c.Kind == signals.SpanClient {
				// A client span's own children (a driver's internals)
				// are part of it: count it whole and stop.
				if c.DBSystem != "" {
					b.db += c.Duration()
					if firstDB.IsZero() || c.Start.Before(firstDB) {
						firstDB = c.Start
					}
				} else {
					b.downstream += c.Duration()
				}
				continue
			}
			walk(c.SpanID, depth+1)
		}
	}
	walk(root.SpanID, 0)
	if !firstDB.IsZero() {
		b.haveDB = true
		b.dbWait = max(0, firstDB.Sub(root.Start))
	}
	return b
}
