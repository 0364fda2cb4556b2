package profiles

import (
	"bufio"
	"errors"
	"os"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
)

// hotA and hotB are leaves the fake samples below were "taken" in: real
// code of this process, so the real symbolizer names them.
//
//go:noinline
func hotA() int { return 1 }

//go:noinline
func hotB() int { return 2 }

// stackAt is a user stack, leaf first, as the profiler records it: the
// leaf's own address, then real return addresses of this test's callers.
func stackAt(leaf func() int) []uint64 {
	pcs := make([]uintptr, 16)
	pcs = pcs[:runtime.Callers(1, pcs)]
	out := []uint64{uint64(reflect.ValueOf(leaf).Pointer()) + 1}
	for _, pc := range pcs {
		out = append(out, uint64(pc))
	}
	return out
}

// kernelSymbol is the address of a kernel function, 0 when kallsyms hides
// addresses (not root) or has no such symbol.
func kernelSymbol(name string) uint64 {
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 3 && fs[2] == name && (fs[1] == "T" || fs[1] == "t") {
			a, _ := strconv.ParseUint(fs[0], 16, 64)
			return a
		}
	}
	return 0
}

// cpuFixture is a window of samples: thread 1 ran hotA 3 times and hotB
// twice (once stamped within a drain after the window: taken in it),
// besides samples of another thread, samples outside the window, and 5
// samples where no code is mapped.
type cpuFixture struct {
	cpu      CPU
	from, to time.Time
	pid      int
}

func newCPUFixture(t *testing.T) cpuFixture {
	t.Helper()
	const drain = 100 * time.Millisecond
	pid := os.Getpid()
	from := time.Now().Add(-10 * time.Second)
	to := from.Add(5 * time.Second)
	a, b := stackAt(hotA), stackAt(hotB)
	samples := signals.NewCPUSamples(64)
	samples.SetPeriod(10 * time.Millisecond)
	samples.Add([]signals.StackSample{
		{T: from.Add(-time.Millisecond), Pid: pid, Tid: 1, Thread: "w", User: b, Count: 7}, // before the window
		{T: from.Add(time.Second), Pid: pid, Tid: 1, Thread: "w", User: a, Count: 3},
		{T: from.Add(2 * time.Second), Pid: pid, Tid: 1, Thread: "w", User: b, Count: 1},
		{T: from.Add(2 * time.Second), Pid: pid, Tid: 2, Thread: "x", User: b, Count: 5}, // another thread
		{T: from.Add(3 * time.Second), Pid: pid, Tid: 1, Thread: "w", User: []uint64{1}, Count: 5},
		{T: to.Add(drain / 2), Pid: pid, Tid: 1, Thread: "w", User: b, Count: 1}, // taken before to
		{T: to.Add(2 * drain), Pid: pid, Tid: 1, Thread: "w", User: a, Count: 9}, // after the window
	})
	sym := symbolize.New(symbolize.Options{})
	return cpuFixture{cpu: NewCPU(samples, sym, drain), from: from, to: to, pid: pid}
}

func TestCPUHotFrames(t *testing.T) {
	f := newCPUFixture(t)
	if f.cpu.Settle() != 100*time.Millisecond {
		t.Errorf("Settle = %v, want the drain interval", f.cpu.Settle())
	}
	got := f.cpu.HotFrames(1, f.from, f.to, 10)
	// Samples where no code is are not named and not counted: shares are
	// of the named ones.
	if len(got) != 2 {
		t.Fatalf("HotFrames = %+v, want hotA and hotB", got)
	}
	if !strings.HasSuffix(got[0].Func, ".hotA") || got[0].Share != 0.6 {
		t.Errorf("hottest = %+v, want hotA at 0.6", got[0])
	}
	if !strings.HasSuffix(got[1].Func, ".hotB") || got[1].Share != 0.4 {
		t.Errorf("second = %+v, want hotB at 0.4", got[1])
	}
	if top := f.cpu.HotFrames(1, f.from, f.to, 1); len(top) != 1 || top[0] != got[0] {
		t.Errorf("HotFrames n=1 = %+v, want %+v", top, got[:1])
	}
	if none := f.cpu.HotFrames(3, f.from, f.to, 10); len(none) != 0 {
		t.Errorf("HotFrames of a thread without samples = %+v", none)
	}
}

// A thread sampled in the kernel without a user stack is named by its
// kernel leaf.
func TestCPUHotFramesKernelLeaf(t *testing.T) {
	sched := kernelSymbol("schedule")
	if sched == 0 {
		t.Skip("SKIP: /proc/kallsyms gives no addresses (needs root): kernel leaves NOT TESTED")
	}
	now := time.Now()
	samples := signals.NewCPUSamples(8)
	samples.Add([]signals.StackSample{{T: now, Pid: os.Getpid(), Tid: 1, Kernel: []uint64{sched + 4}, Count: 2}})
	c := NewCPU(samples, symbolize.New(symbolize.Options{}), 0)
	got := c.HotFrames(1, now.Add(-time.Second), now, 5)
	if len(got) != 1 || got[0].Func != "schedule" || got[0].Share != 1 {
		t.Fatalf("HotFrames = %+v, want schedule at 1", got)
	}
}

func TestCPUHotStacks(t *testing.T) {
	f := newCPUFixture(t)
	got := f.cpu.HotStacks(1, f.from, f.to, 10)
	// Shares are of every sample of the thread, those without a function
	// of the app included.
	if len(got) != 2 {
		t.Fatalf("HotStacks = %+v, want the stacks of hotA and hotB", got)
	}
	for i, want := range []struct {
		leaf  string
		share float64
	}{{".hotA", 0.3}, {".hotB", 0.2}} {
		st := got[i]
		if len(st.Frames) < 2 || !strings.HasSuffix(st.Frames[0], want.leaf) || st.Share != want.share {
			t.Errorf("stack %d = %.2f %v, want %s at %.1f", i, st.Share, st.Frames, want.leaf, want.share)
			continue
		}
		if !strings.HasSuffix(st.Frames[1], ".stackAt") || !strings.HasSuffix(st.Frames[2], ".newCPUFixture") {
			t.Errorf("stack %d: callers %v, want stackAt then newCPUFixture", i, st.Frames[1:3])
		}
		if len(st.Library) != len(st.Frames) {
			t.Errorf("stack %d: %d library flags for %d frames", i, len(st.Library), len(st.Frames))
		}
		for j, lib := range st.Library {
			if lib {
				t.Errorf("stack %d: frame %s of the test binary taken for a shared library", i, st.Frames[j])
			}
		}
	}
	if top := f.cpu.HotStacks(1, f.from, f.to, 1); len(top) != 1 || !strings.HasSuffix(top[0].Frames[0], ".hotA") {
		t.Errorf("HotStacks n=1 = %+v, want hotA's", top)
	}
}

func TestCPUProfile(t *testing.T) {
	f := newCPUFixture(t)
	p, err := f.cpu.Profile(f.from, f.to, []int{2})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CheckValid(); err != nil {
		t.Fatalf("CheckValid: %v", err)
	}
	if len(p.Sample) != 1 || p.Sample[0].Value[0] != 5 {
		t.Fatalf("profile of thread 2: %d samples %v, want one of 5", len(p.Sample), p.Sample)
	}
	if p.Period != (10*time.Millisecond).Nanoseconds() || p.DurationNanos != f.to.Sub(f.from).Nanoseconds() {
		t.Errorf("period %d, duration %d: want the samples' period and the window", p.Period, p.DurationNanos)
	}
	if leaf := p.Sample[0].Location[0].Line[0].Function.Name; !strings.HasSuffix(leaf, ".hotB") {
		t.Errorf("leaf = %s, want hotB", leaf)
	}
	all, err := f.cpu.Profile(f.from, f.to, nil)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, s := range all.Sample {
		n += s.Value[0]
	}
	// (from, to]: neither the sample before it nor those stamped after.
	if n != 3+1+5+5 {
		t.Errorf("profile of every thread counts %d samples, want 14", n)
	}
	if _, err := f.cpu.Profile(f.to.Add(time.Hour), f.to.Add(2*time.Hour), nil); !errors.Is(err, errNoSamples) {
		t.Errorf("profile of an empty window: %v, want errNoSamples", err)
	}
}

func TestSharedLibrary(t *testing.T) {
	for module, want := range map[string]bool{
		"/usr/lib/x86_64-linux-gnu/libc.so.6":      true,
		"/usr/lib/x86_64-linux-gnu/libcrypto.so.3": true,
		"/lib64/ld-linux-x86-64.so.2":              true,
		"/opt/app/libplugin.so":                    true,
		"/usr/bin/python3.12":                      false,
		"/app/server":                              false,
		"/app/so.what/server":                      false,
		"":                                         false,
	} {
		if got := sharedLibrary(module); got != want {
			t.Errorf("sharedLibrary(%q) = %v, want %v", module, got, want)
		}
	}
}
