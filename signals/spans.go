package signals

import (
	"math"
	"sort"
	"sync"
	"time"
	"unsafe"
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

// IsRequest reports whether the span is a request the app served: a server
// span, or a root span.
func (s *Span) IsRequest() bool { return s.Kind == SpanServer || s.ParentID == "" }

// spanOverhead is what a kept span costs beyond its strings' bytes: the
// struct, its own allocation, and its entries in the store's indexes
// (arrival order, requests, the trace map). An estimate on the high side,
// so that the byte bound holds for the real heap.
const spanOverhead = int(unsafe.Sizeof(Span{})) + 96

// Bytes is what the span costs the store, in bytes: its strings and the
// overhead of keeping it. Strings a span shares with others (a resource's
// service name) are counted for each: the bound errs on the safe side.
func (s *Span) Bytes() int {
	return spanOverhead + len(s.TraceID) + len(s.SpanID) + len(s.ParentID) + len(s.Service) +
		len(s.Name) + len(s.Route) + len(s.DBSystem) + len(s.Peer)
}

// DefaultMaxSpanBytes bounds the spans a store from NewSpans holds, in
// bytes (traces.max_span_bytes).
const DefaultMaxSpanBytes = 32 << 20

// Spans keeps the last spans received, in arrival order, at most maxSpans
// of them and at most maxBytes (Span.Bytes) in all: the oldest are evicted
// first. It is safe for concurrent use.
//
// Rules read it every second over windows of minutes, so reads must not
// copy the whole store: every span is stored once, behind a pointer that
// is never written again, and readers get those pointers. Two indexes
// serve the reads: arrival order with the running maximum of end times
// (spans arrive roughly in end order, so a binary search finds the first
// one that can end in a window, and only later ones are looked at), the
// same for requests alone, and a map from trace id to the trace's spans.
type Spans struct {
	maxSpans, maxBytes int

	mu     sync.RWMutex
	all    spanIndex // every span kept
	reqs   spanIndex // the requests among them (Span.IsRequest)
	traces map[string][]*Span
	bytes  int
	stats  SpanStats
	slab   []Span // small spans are allocated from it, slabSize at a time
}

// Small spans (the receiver cuts every string to traces.max_string_bytes)
// are allocated slabSize at a time: one allocation instead of 64, and
// fewer objects for the collector (Add measured ~10% cheaper). Spans are evicted in arrival order, so a slab
// outlives its last kept span only while that span is kept: at most one
// slab holds evicted spans, at most slabSize × slabMaxBytes bytes beyond
// the bound. Larger spans get an allocation of their own, freed with them.
const (
	slabSize     = 64
	slabMaxBytes = 1024
)

// SpanStats counts what the store holds and what it let go.
type SpanStats struct {
	Spans, Bytes int // held now
	// EvictedByCount and EvictedByBytes are spans evicted to make room
	// under maxSpans and maxBytes.
	EvictedByCount, EvictedByBytes uint64
	// TooLarge are spans refused because one alone exceeds maxBytes.
	TooLarge uint64
}

// NewSpans keeps at most max spans (at least one) and
// DefaultMaxSpanBytes bytes.
func NewSpans(max int) *Spans { return NewSpansBounded(max, DefaultMaxSpanBytes) }

// NewSpansBounded keeps at most maxSpans spans and maxBytes bytes of them
// (traces.max_spans, traces.max_span_bytes); each at least one span's
// worth. Nothing is allocated up front: memory follows what is kept.
func NewSpansBounded(maxSpans, maxBytes int) *Spans {
	return &Spans{maxSpans: max(maxSpans, 1), maxBytes: max(maxBytes, spanOverhead), traces: map[string][]*Span{}}
}

// Add stores copies of spans, evicting the oldest ones over the bounds.
func (s *Spans) Add(ss []Span) {
	if len(ss) == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range ss {
		// Each span is written once, here, and never again: readers
		// hold pointers to it.
		sp := s.alloc(&ss[i])
		n := sp.Bytes()
		if n > s.maxBytes {
			s.stats.TooLarge++
			continue
		}
		s.all.push(sp)
		if sp.IsRequest() {
			s.reqs.push(sp)
		}
		t, ok := s.traces[sp.TraceID]
		if !ok {
			t = make([]*Span, 0, 4) // a request and a few children
		}
		s.traces[sp.TraceID] = append(t, sp)
		s.bytes += n
		for s.all.len() > s.maxSpans {
			s.evictOldest()
			s.stats.EvictedByCount++
		}
		for s.bytes > s.maxBytes {
			s.evictOldest()
			s.stats.EvictedByBytes++
		}
	}
}

// alloc copies v into memory of its own (see slabSize).
func (s *Spans) alloc(v *Span) *Span {
	if v.Bytes() > slabMaxBytes {
		sp := new(Span)
		*sp = *v
		return sp
	}
	if len(s.slab) == cap(s.slab) {
		s.slab = make([]Span, 0, slabSize)
	}
	s.slab = append(s.slab, *v)
	return &s.slab[len(s.slab)-1]
}

// evictOldest drops the span that arrived first. Being the oldest of all,
// it is also the oldest request (if it is one) and the oldest of its trace.
func (s *Spans) evictOldest() {
	sp := s.all.pop()
	s.bytes -= sp.Bytes()
	if sp.IsRequest() {
		s.reqs.pop()
	}
	t := s.traces[sp.TraceID]
	if len(t) > 0 && t[0] == sp {
		t[0] = nil
		t = t[1:]
	}
	if len(t) == 0 {
		delete(s.traces, sp.TraceID)
	} else {
		s.traces[sp.TraceID] = t
	}
}

// Overlapping returns copies of the spans that were running at some time
// in [from, to], in arrival order. Requests and Trace copy nothing.
func (s *Spans) Overlapping(from, to time.Time) []Span {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []Span
	s.all.overlapping(from, to, func(sp *Span) { out = append(out, *sp) })
	return out
}

// Requests returns the requests (server or root spans) that were running
// at some time in [from, to], in arrival order. The spans are shared with
// the store and other readers: read them, never write them.
func (s *Spans) Requests(from, to time.Time) []*Span {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Span
	s.reqs.overlapping(from, to, func(sp *Span) { out = append(out, sp) })
	return out
}

// Trace returns the spans kept of one trace, in arrival order (shared:
// read only).
func (s *Spans) Trace(traceID string) []*Span {
	s.mu.RLock()
	defer s.mu.RUnlock()
	t := s.traces[traceID]
	if len(t) == 0 {
		return nil
	}
	// A copy of the slice (not the spans): Add appends to the store's.
	return append([]*Span(nil), t...)
}

// Evicted is how many spans were pushed out by newer ones.
func (s *Spans) Evicted() uint64 {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.stats.EvictedByCount + s.stats.EvictedByBytes
}

// Stats says what the store holds and what it evicted or refused.
func (s *Spans) Stats() SpanStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	st := s.stats
	st.Spans, st.Bytes = s.all.len(), s.bytes
	return st
}

// spanIndex is a FIFO of spans in arrival order, each with the latest end
// time of itself and everything pushed before it. That running maximum
// never decreases, so a binary search finds the first span after which
// one may end at or after a given time; every span before it ended
// earlier. Popping from the front keeps the property: the maxima then
// also cover spans already gone, which only makes them higher.
type spanIndex struct {
	e    []spanEntry
	head int // e[:head] are popped
}

type spanEntry struct {
	s      *Span
	maxEnd int64 // Unix ns
}

func (x *spanIndex) len() int { return len(x.e) - x.head }

func (x *spanIndex) push(sp *Span) {
	end := unixNano(sp.End)
	if n := len(x.e); n > x.head {
		end = max(end, x.e[n-1].maxEnd)
	}
	x.e = append(x.e, spanEntry{s: sp, maxEnd: end})
}

func (x *spanIndex) pop() *Span {
	sp := x.e[x.head].s
	x.e[x.head] = spanEntry{} // the evicted span is freed with its strings
	x.head++
	// Compact once the popped half dominates: amortized O(1) per pop, and
	// the slice never holds more than twice what is kept.
	if x.head >= 1024 && 2*x.head >= len(x.e) {
		n := copy(x.e, x.e[x.head:])
		clear(x.e[n:])
		x.e = x.e[:n]
		x.head = 0
	}
	return sp
}

// overlapping calls f, in arrival order, on the spans with End >= from and
// Start <= to, skipping by binary search those that ended before from.
func (x *spanIndex) overlapping(from, to time.Time, f func(*Span)) {
	live := x.e[x.head:]
	fromNs := unixNano(from)
	i := sort.Search(len(live), func(k int) bool { return live[k].maxEnd >= fromNs })
	for _, e := range live[i:] {
		if !e.s.End.Before(from) && !e.s.Start.After(to) {
			f(e.s)
		}
	}
}

// unixNano is t.UnixNano, clamped where that is undefined (before 1678,
// after 2262: a zero time, a client's garbage clock) so the order holds.
func unixNano(t time.Time) int64 {
	switch {
	case t.Year() < 1678:
		return math.MinInt64
	case t.Year() > 2261:
		return math.MaxInt64
	}
	return t.UnixNano()
}
