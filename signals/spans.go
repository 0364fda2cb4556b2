package signals

import (
	"sync"
	"time"
)

// Span is what culprit keeps of one received OpenTelemetry span: enough to
// time a request, break it down by its children, and name its trace.
type Span struct {
	TraceID, SpanID, ParentID string // hex; ParentID "" for a root span
	Service                   string
	Name                      string
	Route                     string // http.route, else the span name
	Kind                      SpanKind
	Start, End                time.Time
	Error                     bool
	DBSystem                  string // db.system(.name): a database call
	Peer                      string // server.address / net.peer.name of a client span
	ThreadID                  int    // thread.id, when the app records it
}

// SpanKind follows OTLP's SpanKind.
type SpanKind int

const (
	SpanInternal SpanKind = 1
	SpanServer   SpanKind = 2
	SpanClient   SpanKind = 3
	SpanProducer SpanKind = 4
	SpanConsumer SpanKind = 5
)

// Duration of the span.
func (s Span) Duration() time.Duration { return s.End.Sub(s.Start) }

// Spans keeps the last max spans received, in arrival order. It is safe
// for concurrent use.
type Spans struct {
	mu sync.RWMutex
	r  ring[Span]
}

// NewSpans keeps at most max spans (at least one).
func NewSpans(max int) *Spans { return &Spans{r: newRing[Span](max)} }

// Add appends spans, evicting the oldest when full.
func (s *Spans) Add(ss []Span) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range ss {
		s.r.add(sp)
	}
}

// Overlapping returns the spans that were running at some time in
// [from, to], in arrival order.
func (s *Spans) Overlapping(from, to time.Time) []Span {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []Span
	s.r.each(func(sp Span) {
		if !sp.End.Before(from) && !sp.Start.After(to) {
			out = append(out, sp)
		}
	})
	return out
}

// Evicted is how many spans were pushed out by newer ones.
func (s *Spans) Evicted() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.r.evicted
}
