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
