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
	got := s.Range("g", L("a", "1"), time.Time{})
	if len(got) != 4 || got[0].V != 6 || got[3].V != 9 {
		t.Fatalf("ring kept %v, want the last 4 samples 6..9", got)
	}
	if l, _ := s.Latest("g", L("a", "1")); l.V != 9 {
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
	s.Forget("g", func(ls Labels) bool { return ls.Get("k") == "a" })
	if !s.Put(g, L("k", "c"), 1, now) {
		t.Fatal("Forget did not free room")
	}
	if got := s.Select("g"); len(got) != 2 {
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
	if got := s.Increase("c_total", nil, t0.Add(1500*time.Millisecond)); got != 8 {
		t.Fatalf("Increase = %v, want 8", got)
	}
	if got := s.Increase("c_total", nil, t0.Add(time.Hour)); got != 0 {
		t.Fatalf("Increase over an empty window = %v", got)
	}
	if got := s.Increase("missing", nil, t0); got != 0 {
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
