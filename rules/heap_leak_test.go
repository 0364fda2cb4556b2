package rules

import (
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// fixedHistory is a HeapHistory holding one precomputed diff: the real one
// (agent's profile store + pprof diff) is exercised by the end-to-end test.
type fixedHistory struct {
	sites        []AllocSite
	older, newer time.Time
}

func (f fixedHistory) GrowthSince(time.Time, int) ([]AllocSite, time.Time, time.Time, error) {
	return f.sites, f.older, f.newer, nil
}

// heapRule is the rule and the Inputs it reads its heap history from.
func heapRule(h HeapHistory) (*HeapLeak, Inputs) {
	return NewHeapLeak(HeapLeakOptions{Window: 30 * time.Second, MinGrowth: 32 << 20, Steady: 0.7, TopSites: 3, HeapFresh: 30 * time.Second}), Inputs{Heap: h}
}

func evalHeap(h HeapHistory, st *signals.Store, now time.Time) []Observation {
	r, in := heapRule(h)
	return r.Evaluate(Window{Store: st, Now: now, Inputs: in})
}

func TestHeapLeakNamesTheGrowingSite(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.HeapInuseBytes, nil, now, func(age time.Duration) float64 { return float64(200<<20) - age.Seconds()*float64(2<<20) })
	h := fixedHistory{sites: []AllocSite{{Function: "main.leakHeapSlowly", File: "/src/main.go", Line: 42, Bytes: 60 << 20, Objects: 60}}, older: now.Add(-30 * time.Second), newer: now}
	obs := evalHeap(h, st, now)
	if len(obs) != 1 || obs[0].Cause != CauseHeapLeak {
		t.Fatalf("got %+v", obs)
	}
	if !strings.Contains(obs[0].RootCause, "main.leakHeapSlowly (/src/main.go:42, +60 MiB)") {
		t.Errorf("root cause does not name the site: %s", obs[0].RootCause)
	}
	if len(obs[0].Artifacts) != 1 || obs[0].Artifacts[0].Kind != "frame" {
		t.Errorf("artifacts %+v", obs[0].Artifacts)
	}
}

func TestHeapLeakSilentOnSawtoothHeap(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	// GC sawtooth: up 10 MiB, then back down, around 100 MiB.
	series(st, signals.HeapInuseBytes, nil, now, func(age time.Duration) float64 {
		return float64(100<<20) + float64(int(age.Seconds())%5)*float64(2<<20)
	})
	if obs := evalHeap(nil, st, now); len(obs) != 0 {
		t.Fatalf("sawtooth heap raised %+v", obs[0])
	}
}

func TestHeapLeakWithoutHeapSourceSaysUnknown(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"), now, func(age time.Duration) float64 { return float64(500<<20) - age.Seconds()*float64(2<<20) })
	obs := evalHeap(nil, st, now)
	if len(obs) != 1 || obs[0].Cause != CauseRSSGrowthNoHeap || !strings.Contains(obs[0].RootCause, "cannot tell") {
		t.Fatalf("got %+v", obs)
	}
}

// Without a heap source, anonymous RSS (read each second) that grew at 2
// MiB/s for 40 s and then stood still, but for the app's other
// allocations, is not said to grow after its stop: the stop is a new
// regime at the next sample, and the finding is no longer observed.
func TestHeapLeakWithoutHeapSourceStopsAtTheStop(t *testing.T) {
	t0 := time.Unix(5000, 0)
	stop := t0.Add(50 * time.Second)
	st := signals.New(600, 1000)
	anon := func(at time.Time) float64 {
		d := min(max(at.Sub(t0)-10*time.Second, 0), 40*time.Second)
		other := max(at.Sub(stop), 0).Seconds() * float64(64<<10)
		return float64(100<<20) + d.Seconds()*float64(2<<20) + other
	}
	r, in := heapRule(nil)
	r.o.Window = 2 * time.Minute // the growth's start is in it
	for at := t0; !at.After(stop.Add(20 * time.Second)); at = at.Add(time.Second) {
		st.Put(signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"), anon(at), at)
		obs := r.Evaluate(Window{Store: st, Now: at, Inputs: in})
		switch {
		case at.Equal(stop) && (len(obs) != 1 || obs[0].Cause != CauseRSSGrowthNoHeap || !strings.HasSuffix(obs[0].Symptom, "and still grows")):
			t.Fatalf("while it grows: %+v", obs)
		case at.After(stop) && len(obs) > 0:
			t.Errorf("%s after the stop: %s / %s", at.Sub(stop), obs[0].Title, obs[0].Symptom)
		}
	}
}
