package signals

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// testSpan is a span of trace tr ending at end after d; child spans have a
// parent and are not requests.
func testSpan(tr, id int, child bool, end time.Time, d time.Duration) Span {
	s := Span{TraceID: fmt.Sprintf("%032x", tr), SpanID: fmt.Sprintf("%016x", id), Route: fmt.Sprintf("/r%d", tr%10),
		Kind: SpanServer, Start: end.Add(-d), End: end}
	if child {
		s.ParentID = fmt.Sprintf("%016x", id-1)
		s.Kind = SpanClient
	}
	return s
}

func ids(ss []*Span) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = s.SpanID
	}
	return out
}

// The store keeps the newest spans by count, and every reader agrees with
// a plain scan of what is kept, whatever the order in which spans end.
func TestSpansIndexesMatchAScan(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	s := NewSpansBounded(500, 1<<30)
	t0 := time.Unix(1_000_000, 0)
	var all []Span // what was added, in order
	for i := range 2000 {
		// Ends mostly increase, but some arrive late (a slow exporter)
		// and a few claim the far future or the distant past.
		end := t0.Add(time.Duration(i) * 10 * time.Millisecond).Add(-time.Duration(rng.IntN(5000)) * time.Millisecond)
		switch rng.IntN(200) {
		case 0:
			end = time.Date(2500, 1, 1, 0, 0, 0, 0, time.UTC)
		case 1:
			end = time.Unix(0, 0)
		}
		sp := testSpan(i/4, i, i%4 != 0, end, time.Duration(rng.IntN(3000))*time.Millisecond)
		all = append(all, sp)
		s.Add([]Span{sp})
	}
	kept := all[len(all)-500:]
	if st := s.Stats(); st.Spans != 500 || st.EvictedByCount != 1500 || s.Evicted() != 1500 {
		t.Fatalf("stats %+v", st)
	}
	for range 200 {
		from := t0.Add(time.Duration(rng.IntN(25000)-2000) * time.Millisecond)
		to := from.Add(time.Duration(rng.IntN(10000)) * time.Millisecond)
		var wantAll, wantReq []string
		for i := range kept {
			sp := &kept[i]
			if sp.End.Before(from) || sp.Start.After(to) {
				continue
			}
			wantAll = append(wantAll, sp.SpanID)
			if sp.IsRequest() {
				wantReq = append(wantReq, sp.SpanID)
			}
		}
		var gotAll []string
		for _, sp := range s.Overlapping(from, to) {
			gotAll = append(gotAll, sp.SpanID)
		}
		if !slices.Equal(gotAll, wantAll) {
			t.Fatalf("Overlapping(%v, %v) = %v, want %v", from, to, gotAll, wantAll)
		}
		if got := ids(s.Requests(from, to)); !slices.Equal(got, wantReq) && len(got)+len(wantReq) > 0 {
			t.Fatalf("Requests(%v, %v) = %v, want %v", from, to, got, wantReq)
		}
	}
	// Traces: the kept spans of each, in arrival order; evicted traces
	// are gone from the map.
	byTrace := map[string][]string{}
	for _, sp := range kept {
		byTrace[sp.TraceID] = append(byTrace[sp.TraceID], sp.SpanID)
	}
	for id, want := range byTrace {
		if got := ids(s.Trace(id)); !slices.Equal(got, want) {
			t.Errorf("Trace(%s) = %v, want %v", id, got, want)
		}
	}
	if got := s.Trace(all[0].TraceID); got != nil {
		t.Errorf("an evicted trace is still indexed: %v", ids(got))
	}
	s.mu.RLock()
	nTraces := len(s.traces)
	s.mu.RUnlock()
	if nTraces != len(byTrace) {
		t.Errorf("trace index holds %d traces, want %d", nTraces, len(byTrace))
	}
}

// liveHeap is the live heap after a full collection.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// The attack that kept 430 MB: 100 spans with 4 MB names. By bytes, the
// store keeps what fits its bound and lets the strings of the rest go.
func TestSpansBoundedInBytes(t *testing.T) {
	const maxBytes = 16 << 20
	s := NewSpansBounded(65536, maxBytes)
	before := liveHeap()
	now := time.Now()
	for i := range 100 {
		sp := testSpan(i, 2*i, false, now, time.Millisecond)
		sp.Name = strings.Repeat(string(rune('a'+i%26)), 4<<20) // a fresh 4 MB string each
		s.Add([]Span{sp})
	}
	grew := int64(liveHeap()) - int64(before)
	st := s.Stats()
	t.Logf("after 100 spans with 4 MB names: %d spans, %d bytes held, %d evicted by bytes; live heap grew %.1f MB", st.Spans, st.Bytes, st.EvictedByBytes, float64(grew)/(1<<20))
	if st.Bytes > maxBytes || st.Spans != 3 || st.EvictedByBytes != 97 {
		t.Errorf("stats %+v: want 3 spans kept within %d bytes", st, maxBytes)
	}
	if grew > maxBytes+2<<20 {
		t.Errorf("live heap grew %d bytes, more than the %d-byte bound", grew, maxBytes)
	}
	// One span larger than the whole store is refused, not kept alone.
	small := NewSpansBounded(10, 4096)
	big := testSpan(1, 1, false, now, time.Millisecond)
	big.Name = strings.Repeat("x", 8192)
	small.Add([]Span{big, testSpan(2, 2, false, now, time.Millisecond)})
	if st := small.Stats(); st.TooLarge != 1 || st.Spans != 1 {
		t.Errorf("oversized span: %+v", st)
	}
	runtime.KeepAlive(s)
}

// Readers and writers together, under -race: spans handed to readers are
// never written again.
func TestSpansConcurrent(t *testing.T) {
	s := NewSpansBounded(1000, 1<<20)
	now := time.Now()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s.Add([]Span{testSpan(w*1_000_000+i/2, w*1_000_000+i, i%2 == 1, now.Add(time.Duration(i)*time.Millisecond), time.Millisecond)})
			}
		}()
	}
	deadline := time.Now().Add(300 * time.Millisecond)
	n := 0
	for time.Now().Before(deadline) {
		for _, r := range s.Requests(now, now.Add(time.Hour)) {
			n += len(s.Trace(r.TraceID))
			_ = r.Duration()
		}
		_ = s.Overlapping(now, now.Add(time.Hour))
	}
	close(stop)
	wg.Wait()
	if st := s.Stats(); st.Spans > 1000 || st.Bytes > 1<<20 {
		t.Errorf("bounds broken: %+v", st)
	}
	if n == 0 {
		t.Error("readers saw no trace")
	}
}

// fullStore is a store at its default bound of 65536 spans over the last
// 5 minutes: traces of one server span and three children, 10 routes.
func fullStore(now time.Time) *Spans {
	const n = 65536
	s := NewSpans(n)
	batch := make([]Span, 0, 512)
	for i := range n {
		end := now.Add(-5 * time.Minute).Add(time.Duration(i) * 5 * time.Minute / n)
		batch = append(batch, testSpan(i/4, i, i%4 != 0, end, time.Duration(10+i%97)*time.Millisecond))
		if len(batch) == cap(batch) {
			s.Add(batch)
			batch = batch[:0]
		}
	}
	return s
}

// BenchmarkSpansAdd is ingest: a 512-span export into a full store.
func BenchmarkSpansAdd(b *testing.B) {
	now := time.Now()
	s := fullStore(now)
	// Distinct spans made beforehand: the benchmark times the store, and
	// traces do not repeat while their earlier spans are still kept.
	batches := make([][]Span, 256)
	for i := range batches {
		batches[i] = make([]Span, 512)
		for j := range batches[i] {
			batches[i][j] = testSpan(1<<20+i*128+j/4, i*512+j, j%4 != 0, now, 20*time.Millisecond)
		}
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.Add(batches[i%len(batches)])
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*512), "ns/span")
}

// latencyReadScan is the read latency_spike made each second before the
// indexes: copy every span of the 5-minute window, group the requests by
// route into recent and base, take the slowest tenth of recent requests
// per route, and collect their traces by scanning the window again.
func latencyReadScan(s *Spans, now time.Time) int {
	spans := s.Overlapping(now.Add(-5*time.Minute), now)
	recentFrom := now.Add(-10 * time.Second)
	type route struct{ recent, base []Span }
	routes := map[string]*route{}
	for _, sp := range spans {
		if sp.Kind != SpanServer && sp.ParentID != "" {
			continue
		}
		rt := routes[sp.Route]
		if rt == nil {
			rt = &route{}
			routes[sp.Route] = rt
		}
		if sp.End.Before(recentFrom) {
			rt.base = append(rt.base, sp)
		} else {
			rt.recent = append(rt.recent, sp)
		}
	}
	found := 0
	for _, rt := range routes {
		p99Durations(rt.base)
		sorted := slices.Clone(rt.recent)
		sort.Slice(sorted, func(i, j int) bool { return sorted[i].Duration() > sorted[j].Duration() })
		slow := sorted[:max(1, len(sorted)/10)]
		byTrace := map[string][]Span{}
		for _, sp := range slow {
			byTrace[sp.TraceID] = nil
		}
		for _, sp := range spans {
			if t, ok := byTrace[sp.TraceID]; ok {
				byTrace[sp.TraceID] = append(t, sp)
			}
		}
		for _, t := range byTrace {
			found += len(t)
		}
	}
	return found
}

func p99Durations(ss []Span) time.Duration {
	ds := make([]time.Duration, len(ss))
	for i, s := range ss {
		ds[i] = s.Duration()
	}
	slices.Sort(ds)
	if len(ds) == 0 {
		return 0
	}
	return ds[len(ds)*99/100]
}

// latencyReadIndexed is the same read through Requests and Trace: only
// the window's requests are listed (pointers), and only the slow traces
// are looked up.
func latencyReadIndexed(s *Spans, now time.Time) int {
	reqs := s.Requests(now.Add(-5*time.Minute), now)
	recentFrom := now.Add(-10 * time.Second)
	type route struct{ recent, base []*Span }
	routes := map[string]*route{}
	for _, sp := range reqs {
		rt := routes[sp.Route]
		if rt == nil {
			rt = &route{}
			routes[sp.Route] = rt
		}
		if sp.End.Before(recentFrom) {
			rt.base = append(rt.base, sp)
		} else {
			rt.recent = append(rt.recent, sp)
		}
	}
	found := 0
	for _, rt := range routes {
		ds := make([]time.Duration, len(rt.base))
		for i, sp := range rt.base {
			ds[i] = sp.Duration()
		}
		slices.Sort(ds)
		sorted := slices.Clone(rt.recent)
		sort.Slice(sorted, func(i, j int) bool { return sorted[i].Duration() > sorted[j].Duration() })
		for _, sp := range sorted[:max(1, len(sorted)/10)] {
			found += len(s.Trace(sp.TraceID))
		}
	}
	return found
}

// BenchmarkLatencyRead is latency_spike's once-a-second read over a full
// store (65536 spans in its 5-minute window), the old way and through the
// indexes; both find the same spans.
func BenchmarkLatencyRead(b *testing.B) {
	now := time.Now()
	s := fullStore(now)
	if a, c := latencyReadScan(s, now), latencyReadIndexed(s, now); a != c || a == 0 {
		b.Fatalf("the reads disagree: scan found %d spans, indexed %d", a, c)
	}
	b.Run("scan", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			latencyReadScan(s, now)
		}
	})
	b.Run("indexed", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			latencyReadIndexed(s, now)
		}
	})
}
