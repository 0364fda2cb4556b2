package profiles

import (
	"errors"
	"testing"
	"time"

	"github.com/google/pprof/profile"

	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
)

// heapProfile is a heap profile whose one site, app.grow at app.go:12
// called through the allocator, holds n objects of 100 bytes.
func heapProfile(n int64) *profile.Profile {
	fn := func(id uint64, name string) *profile.Function {
		return &profile.Function{ID: id, Name: name, SystemName: name, Filename: "app.go"}
	}
	malloc, grow := fn(1, "runtime.mallocgc"), fn(2, "app.grow")
	locs := []*profile.Location{
		{ID: 1, Address: 0x1000, Line: []profile.Line{{Function: malloc, Line: 3}}},
		{ID: 2, Address: 0x2000, Line: []profile.Line{{Function: grow, Line: 12}}},
	}
	return &profile.Profile{
		SampleType: []*profile.ValueType{{Type: signals.InuseObjects, Unit: "count"}, {Type: signals.InuseSpace, Unit: "bytes"}},
		Sample:     []*profile.Sample{{Location: locs, Value: []int64{n, 100 * n}}},
		Location:   locs,
		Function:   []*profile.Function{malloc, grow},
	}
}

func TestHeapGrowthSince(t *testing.T) {
	ps := signals.NewProfiles(4)
	h := NewHeap(ps)
	t0 := time.Unix(1700000000, 0)
	if _, _, _, err := h.GrowthSince(t0, 5); !errors.Is(err, errOneProfile) {
		t.Fatalf("no profile: %v, want errOneProfile", err)
	}
	ps.Add("heap", t0, heapProfile(1))
	ps.Add("cpu", t0.Add(time.Second), heapProfile(50)) // another kind: not a heap profile
	if _, _, _, err := h.GrowthSince(t0, 5); !errors.Is(err, errOneProfile) {
		t.Fatalf("one heap profile: %v, want errOneProfile", err)
	}
	t1, t2 := t0.Add(10*time.Second), t0.Add(20*time.Second)
	ps.Add("heap", t1, heapProfile(3))
	ps.Add("heap", t2, heapProfile(4))

	want := func(from time.Time, older, newer time.Time, objects int64) {
		t.Helper()
		sites, o, n, err := h.GrowthSince(from, 5)
		if err != nil {
			t.Fatal(err)
		}
		site := rules.AllocSite{Function: "app.grow", File: "app.go", Line: 12, Bytes: 100 * objects, Objects: objects}
		if len(sites) != 1 || sites[0] != site || !o.Equal(older) || !n.Equal(newer) {
			t.Errorf("GrowthSince(%v) = %+v from %v to %v; want %+v from %v to %v", from.Sub(t0), sites, o.Sub(t0), n.Sub(t0), site, older.Sub(t0), newer.Sub(t0))
		}
	}
	// The oldest profile at or after from against the newest.
	want(t0.Add(-time.Hour), t0, t2, 3)
	want(t0, t0, t2, 3)
	want(t0.Add(time.Second), t1, t2, 1)
	if _, _, _, err := h.GrowthSince(t2, 5); !errors.Is(err, errOneProfile) {
		t.Errorf("one profile since from: %v, want errOneProfile", err)
	}

	// A profile the diff cannot read is an error, with the window's ends.
	ps.Add("heap", t2.Add(time.Second), &profile.Profile{SampleType: []*profile.ValueType{{Type: "alloc_space", Unit: "bytes"}}})
	_, o, n, err := h.GrowthSince(t2, 5)
	if err == nil || errors.Is(err, errOneProfile) || !o.Equal(t2) || !n.Equal(t2.Add(time.Second)) {
		t.Errorf("diff with a profile without inuse_space: %v (%v to %v), want a diff error", err, o, n)
	}
}
