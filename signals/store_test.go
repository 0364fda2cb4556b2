package signals

import (
	"testing"
	"time"
)

var (
	g = &Desc{Name: "g", Kind: Gauge}
	c = &Desc{Name: "c_total", Kind: Counter}
)

func TestRingIsBounded(t *testing.T) {
	s := New(4, 10)
	t0 := time.Unix(100, 0)
	for i := 0; i < 10; i++ {
		s.Put(g, L("a", "1"), float64(i), t0.Add(time.Duration(i)*time.Second))
	}
	got := s.Range(g, L("a", "1"), time.Time{})
	if len(got) != 4 || got[0].V != 6 || got[3].V != 9 {
		t.Fatalf("ring kept %v, want the last 4 samples 6..9", got)
	}
	if l, _ := s.Latest(g, L("a", "1")); l.V != 9 {
		t.Fatalf("latest = %v", l)
	}
}

func TestMaxSeriesDropsAndCounts(t *testing.T) {
	s := New(4, 2)
	now := time.Now()
	if !s.Put(g, L("k", "a"), 1, now) || !s.Put(g, L("k", "b"), 1, now) {
		t.Fatal("first two series refused")
	}
	if s.Put(g, L("k", "c"), 1, now) {
		t.Fatal("third series accepted beyond max_series=2")
	}
	if !s.Put(g, L("k", "a"), 2, now) {
		t.Fatal("existing series refused when full")
	}
	if st := s.Stats(); st.Dropped != 1 || st.Series != 2 {
		t.Fatalf("stats %+v", st)
	}
	s.Forget(g, func(ls Labels) bool { return ls.Get("k") == "a" })
	if !s.Put(g, L("k", "c"), 1, now) {
		t.Fatal("Forget did not free room")
	}
	if got := s.Select(g); len(got) != 2 {
		t.Fatalf("Select = %v", got)
	}
}

func TestIncreaseCountsResetsAndWindowEdge(t *testing.T) {
	s := New(16, 10)
	t0 := time.Unix(100, 0)
	for i, v := range []float64{10, 12, 15, 3, 5} { // reset after 15
		s.Put(c, nil, v, t0.Add(time.Duration(i)*time.Second))
	}
	// From t0+1.5s: baseline is the sample at t0+1 (12): 12->15 (+3), reset to 3 (+3), 3->5 (+2).
	if got := s.Increase(c, nil, t0.Add(1500*time.Millisecond)); got != 8 {
		t.Fatalf("Increase = %v, want 8", got)
	}
	if got := s.Increase(c, nil, t0.Add(time.Hour)); got != 0 {
		t.Fatalf("Increase over an empty window = %v", got)
	}
	if got := s.Increase(&Desc{Name: "missing", Kind: Counter}, nil, t0); got != 0 {
		t.Fatalf("Increase of a missing series = %v", got)
	}
}

func TestLabelsAreCanonical(t *testing.T) {
	if L("b", "2", "a", "1").String() != L("a", "1", "b", "2").String() {
		t.Fatal("label order changes the series key")
	}
}

func TestNotifyCoalesces(t *testing.T) {
	s := New(4, 4)
	s.Notify()
	s.Notify()
	<-s.Wake()
	select {
	case <-s.Wake():
		t.Fatal("two notifies gave two wake-ups")
	default:
	}
}

func BenchmarkPut(b *testing.B) {
	s := New(600, 1000)
	ls := L("addr", "127.0.0.1", "port", "8080")
	now := time.Now()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		s.Put(g, ls, float64(i), now)
	}
}

// A write to an existing series allocates nothing, through Put (the key is
// built in the store's buffer) or a Handle (no key at all).
func TestPutDoesNotAllocate(t *testing.T) {
	s := New(600, 1000)
	ls := L("addr", "127.0.0.1", "port", "8080")
	h := s.Handle(g, ls)
	now := time.Now()
	s.Put(g, ls, 1, now)
	if n := testing.AllocsPerRun(100, func() { s.Put(g, ls, 1, now) }); n != 0 {
		t.Errorf("Put allocates %v times per call", n)
	}
	if n := testing.AllocsPerRun(100, func() { h.Put(1, now) }); n != 0 {
		t.Errorf("Handle.Put allocates %v times per call", n)
	}
	if n := testing.AllocsPerRun(100, func() { s.Latest(g, ls) }); n != 0 {
		t.Errorf("Latest allocates %v times per call", n)
	}
}

// A series' ring grows as samples come, up to the ring size, and reads
// the same through its growth and after it wraps.
func TestRingGrowsOnDemand(t *testing.T) {
	s := New(100, 10)
	t0 := time.Unix(100, 0)
	for i := 0; i < 250; i++ {
		s.Put(c, nil, float64(i), t0.Add(time.Duration(i)*time.Second))
		sr, _ := s.lookup("c_total", nil)
		if want := min(100, max(minRing, i+1)); len(sr.ring) < i+1 && len(sr.ring) != want && i < 100 {
			t.Fatalf("after %d samples the ring holds %d", i+1, len(sr.ring))
		}
		if len(sr.ring) > 100 {
			t.Fatalf("ring grew past its size: %d", len(sr.ring))
		}
		got := s.Range(c, nil, time.Time{})
		if len(got) != min(i+1, 100) || got[len(got)-1].V != float64(i) || got[0].V != float64(max(0, i-99)) {
			t.Fatalf("after %d samples Range = %d samples [%v..%v]", i+1, len(got), got[0].V, got[len(got)-1].V)
		}
	}
	if got := s.Increase(c, nil, t0.Add(200*time.Second)); got != 50 {
		t.Fatalf("Increase = %v, want 50", got)
	}
}

// A handle outlives Forget: its next Put creates the series again.
func TestHandleAfterForget(t *testing.T) {
	s := New(8, 10)
	h := s.Handle(g, L("k", "v"))
	h.Put(1, time.Unix(1, 0))
	s.Forget(g, func(Labels) bool { return false })
	if _, ok := s.Latest(g, L("k", "v")); ok {
		t.Fatal("forgotten series still there")
	}
	h.Put(2, time.Unix(2, 0))
	if l, ok := s.Latest(g, L("k", "v")); !ok || l.V != 2 {
		t.Fatalf("Latest after Forget and Put = %v %v", l, ok)
	}
	if st := s.Stats(); st.Series != 1 {
		t.Fatalf("%d series, want 1", st.Series)
	}
}

// Samples out of time order (two writers of one series) are read as a
// scan would, not by the binary search.
func TestRangeOutOfOrder(t *testing.T) {
	s := New(16, 10)
	for _, sec := range []int64{10, 12, 11, 13} {
		s.Put(g, nil, float64(sec), time.Unix(sec, 0))
	}
	if got := s.Range(g, nil, time.Unix(12, 0)); len(got) != 2 || got[0].V != 12 || got[1].V != 13 {
		t.Fatalf("Range = %v", got)
	}
}

func BenchmarkHandlePut(b *testing.B) {
	s := New(600, 1000)
	h := s.Handle(g, L("addr", "127.0.0.1", "port", "8080"))
	now := time.Now()
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		h.Put(float64(i), now)
	}
}
