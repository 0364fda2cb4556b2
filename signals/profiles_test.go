package signals

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/pprof/profile"
)

func TestProfilesKeepsNewestPerKind(t *testing.T) {
	ps := NewProfiles(3)
	t0 := time.Unix(1000, 0)
	profs := make([]*profile.Profile, 5)
	for i := range profs {
		profs[i] = &profile.Profile{TimeNanos: int64(i)}
		ps.Add("heap", t0.Add(time.Duration(i)*time.Second), profs[i])
	}
	ps.Add("goroutine", t0, &profile.Profile{})
	got := ps.List("heap")
	if len(got) != 3 {
		t.Fatalf("List kept %d profiles, want 3", len(got))
	}
	for i, tp := range got {
		if tp.Profile != profs[i+2] || !tp.T.Equal(t0.Add(time.Duration(i+2)*time.Second)) {
			t.Errorf("List[%d] = profile %d at %v, want profile %d", i, tp.Profile.TimeNanos, tp.T, i+2)
		}
	}
	if l, ok := ps.Latest("heap"); !ok || l.Profile != profs[4] {
		t.Errorf("Latest = %v, %v; want the fifth profile", l, ok)
	}
	if n := len(ps.List("goroutine")); n != 1 {
		t.Errorf("other kind holds %d profiles, want 1", n)
	}
	if _, ok := ps.Latest("cpu"); ok || ps.List("cpu") != nil {
		t.Error("an unknown kind has profiles")
	}

	// List returns a copy: changing it does not change the store.
	got[0] = TimedProfile{}
	if ps.List("heap")[0].Profile != profs[2] {
		t.Error("List shares its slice with the store")
	}

	// A late Add goes in time order and, being the oldest, is evicted.
	ps.Add("heap", t0, &profile.Profile{TimeNanos: -1})
	if got := ps.List("heap"); got[0].Profile != profs[2] {
		t.Errorf("late old profile displaced a newer one: oldest is %d", got[0].Profile.TimeNanos)
	}
	ps.Add("heap", t0.Add(3500*time.Millisecond), &profile.Profile{TimeNanos: 35})
	var order []int64
	for _, tp := range ps.List("heap") {
		order = append(order, tp.Profile.TimeNanos)
	}
	if diff := cmp.Diff([]int64{35, 4}, order[1:]); diff != "" || order[0] != 3 {
		t.Errorf("order after an out-of-order Add = %v, want [3 35 4]", order)
	}

	ps.Add("heap", t0, nil) // ignored
	if n := len(ps.List("heap")); n != 3 {
		t.Errorf("nil profile stored: %d profiles", n)
	}
	if NewProfiles(0).keep != 1 {
		t.Error("NewProfiles(0) keeps no profile")
	}
}

func TestProfilesConcurrent(t *testing.T) {
	ps := NewProfiles(4)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 200; i++ {
				ps.Add("heap", time.Unix(int64(g*1000+i), 0), &profile.Profile{})
				if l := ps.List("heap"); len(l) > 4 {
					t.Errorf("List returned %d profiles, keep is 4", len(l))
					return
				}
				ps.Latest("heap")
			}
		}()
	}
	wg.Wait()
}

func readHeapFixture(t *testing.T, name string) *profile.Profile {
	t.Helper()
	f, err := os.Open("../collectors/testdata/pprof/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p, err := profile.Parse(f)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return p
}

func totalInuse(t *testing.T, p *profile.Profile) int64 {
	t.Helper()
	i, ok := SampleIndex(p, InuseSpace)
	if !ok {
		t.Fatal("fixture has no inuse_space")
	}
	var sum int64
	for _, s := range p.Sample {
		sum += s.Value[i]
	}
	return sum
}

// The fixtures are two real Go heap profiles of one process
// (collectors/testdata/pprof/capture): between them a map-backed cache grew
// by 16 MiB, a slice of records by 8 MiB, and a 6 MiB transient buffer was
// freed. Values are sampled estimates, hence the ranges.
func TestDiffInuseRealHeapProfiles(t *testing.T) {
	older, newer := readHeapFixture(t, "heap-1.pb.gz"), readHeapFixture(t, "heap-2.pb.gz")
	all, err := DiffInuse(older, newer, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Every live byte lands on some site: the diff sums to the change of
	// the whole heap.
	var sum int64
	for _, s := range all {
		sum += s.Bytes
	}
	if want := totalInuse(t, newer) - totalInuse(t, older); sum != want {
		t.Errorf("growth over all sites = %d, want the heap's change %d", sum, want)
	}

	top, err := DiffInuse(older, newer, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(top) != 2 {
		t.Fatalf("top 2 returned %d sites: %+v", len(top), top)
	}
	const mib = 1 << 20
	for i, want := range []struct {
		fn       string
		line     int64
		min, max int64
	}{
		{"main.leakIntoCache", 34, 12 * mib, 20 * mib},
		{"main.appendRecords", 44, 6 * mib, 10 * mib},
	} {
		got := top[i]
		if got.Function != want.fn || got.Line != want.line || got.Bytes < want.min || got.Bytes > want.max {
			t.Errorf("site %d = %s:%d %+d bytes, want %s line %d growing %d-%d MiB", i, got.Function, got.Line, got.Bytes, want.fn, want.line, want.min/mib, want.max/mib)
		}
		if got.Objects <= 0 || got.File == "" {
			t.Errorf("site %d = %+v, want a file and a positive object growth", i, got)
		}
	}
	last := all[len(all)-1]
	if last.Function != "main.allocTransient" || last.Bytes > -5*mib {
		t.Errorf("last site = %+v, want main.allocTransient shrinking by about 6 MiB", last)
	}
	for _, s := range all {
		if isAllocatorFrame(s.Function) {
			t.Errorf("site in the allocator: %+v", s)
		}
	}
}

// heapBuilder makes small heap profiles with chosen stacks, for the cases
// the fixtures do not have: allocator frames at the leaf, inlining,
// unsymbolized frames, missing sample types.
type heapBuilder struct {
	p     *profile.Profile
	funcs map[string]*profile.Function
}

func newHeapBuilder(types ...string) *heapBuilder {
	p := &profile.Profile{}
	for _, ty := range types {
		p.SampleType = append(p.SampleType, &profile.ValueType{Type: ty, Unit: "bytes"})
	}
	return &heapBuilder{p: p, funcs: map[string]*profile.Function{}}
}

func (b *heapBuilder) fn(name string) *profile.Function {
	f, ok := b.funcs[name]
	if !ok {
		f = &profile.Function{ID: uint64(len(b.funcs) + 1), Name: name, Filename: name + ".go"}
		b.funcs[name] = f
		b.p.Function = append(b.p.Function, f)
	}
	return f
}

// sample adds one sample; each frame is "func:line", or several joined by
// "|" for one location with inlined calls (innermost first), or "" for an
// unsymbolized location.
func (b *heapBuilder) sample(values []int64, frames ...[]string) {
	s := &profile.Sample{Value: values}
	for _, fr := range frames {
		loc := &profile.Location{ID: uint64(len(b.p.Location) + 1), Address: 0x1000 + uint64(len(b.p.Location))}
		for _, f := range fr {
			var name string
			var line int64
			fmt.Sscanf(f, "%s %d", &name, &line)
			loc.Line = append(loc.Line, profile.Line{Function: b.fn(name), Line: line})
		}
		b.p.Location = append(b.p.Location, loc)
		s.Location = append(s.Location, loc)
	}
	b.p.Sample = append(b.p.Sample, s)
}

func TestDiffInuseAttribution(t *testing.T) {
	types := []string{"alloc_objects", "alloc_space", InuseObjects, InuseSpace}
	mk := func(scale int64) *profile.Profile {
		b := newHeapBuilder(types...)
		// A map growing: the allocator and the map implementation are
		// skipped down to the caller.
		b.sample([]int64{0, 0, 2 * scale, 200 * scale},
			[]string{"runtime.mallocgc 1"}, []string{"internal/runtime/maps.newarray 2"}, []string{"runtime.mapassign 3"},
			[]string{"app.(*Cache).Put 40"}, []string{"main.main 9"})
		// A helper inlined into its caller is its own frame.
		b.sample([]int64{0, 0, 1 * scale, 100 * scale},
			[]string{"runtime.makeslice 1"}, []string{"app.newBuf 7", "app.handle 20"})
		// Only runtime frames: attributed to the leaf.
		b.sample([]int64{0, 0, scale, 10 * scale}, []string{"runtime.malg 5"}, []string{"runtime.newproc1 6"})
		// Unsymbolized (a stripped native binary): named by address.
		b.sample([]int64{0, 0, 1, 5 * scale}, []string{})
		return b.p
	}
	got, err := DiffInuse(mk(1), mk(3), 0)
	if err != nil {
		t.Fatal(err)
	}
	want := []SiteGrowth{
		{Function: "app.(*Cache).Put", File: "app.(*Cache).Put.go", Line: 40, Bytes: 400, Objects: 4},
		{Function: "app.newBuf", File: "app.newBuf.go", Line: 7, Bytes: 200, Objects: 2},
		{Function: "runtime.malg", File: "runtime.malg.go", Line: 5, Bytes: 20, Objects: 2},
		{Function: "0x1009", Bytes: 10, Objects: 0},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("DiffInuse (-want +got):\n%s", diff)
	}
	if top, _ := DiffInuse(mk(1), mk(3), 1); len(top) != 1 || top[0].Function != "app.(*Cache).Put" {
		t.Errorf("top 1 = %+v", top)
	}
	// Shrinking sites come last with negative growth.
	if back, _ := DiffInuse(mk(3), mk(1), 0); len(back) != 4 || back[3].Bytes != -400 {
		t.Errorf("reverse diff = %+v, want the cache site last at -400", back)
	}

	// Profiles from different producers may order sample types differently.
	b := newHeapBuilder(InuseSpace, InuseObjects)
	b.sample([]int64{700, 7}, []string{"app.(*Cache).Put 40"})
	if got, err := DiffInuse(mk(1), b.p, 1); err != nil || got[0].Bytes != 500 || got[0].Objects != 5 {
		t.Errorf("diff across sample type orders = %+v, %v; want +500 bytes, +5 objects", got, err)
	}
	// inuse_objects is optional.
	b = newHeapBuilder(InuseSpace)
	b.sample([]int64{700}, []string{"app.(*Cache).Put 40"})
	if got, err := DiffInuse(b.p, b.p, 0); err != nil || len(got) != 0 {
		t.Errorf("self diff without objects = %+v, %v; want nothing", got, err)
	}
}

func TestDiffInuseNeedsInuseSpace(t *testing.T) {
	heap := newHeapBuilder(InuseSpace).p
	cpu := newHeapBuilder("samples", "cpu").p
	for _, tc := range []struct {
		name         string
		older, newer *profile.Profile
	}{
		{"older", cpu, heap},
		{"newer", heap, cpu},
	} {
		if _, err := DiffInuse(tc.older, tc.newer, 5); !errors.Is(err, ErrNoInuseSpace) {
			t.Errorf("%s profile without inuse_space: err = %v, want ErrNoInuseSpace", tc.name, err)
		}
	}
	if _, err := DiffInuse(nil, heap, 5); err == nil {
		t.Error("nil profile accepted")
	}
}
