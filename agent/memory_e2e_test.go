package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// culpritBinary builds bin/culprit once per test run, for tests that need
// the real program as a separate process (a target, or the agent itself).
func culpritBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "culprit-bin")
		if err != nil {
			buildErr = err
			return
		}
		builtBin = filepath.Join(dir, "culprit")
		if out, err := exec.Command("go", "build", "-o", builtBin, ".").CombinedOutput(); err != nil {
			buildErr = err
			builtBin = string(out)
		}
	})
	if buildErr != nil {
		t.Fatalf("build culprit: %v\n%s", buildErr, builtBin)
	}
	return builtBin
}

// demoProcess runs `culprit demo` on ephemeral loopback ports, with env
// added to its environment, and returns its pid and fault-switch base URL.
func demoProcess(t testing.TB, env ...string) (pid int, control string) {
	t.Helper()
	cmd := exec.Command(culpritBinary(t), "demo", "--addr", "127.0.0.1:0", "--control", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("demo did not start: %v", err)
	}
	m := regexp.MustCompile(`fault switches on (http://\S+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("unexpected demo greeting %q", line)
	}
	go io.Copy(io.Discard, out)
	return cmd.Process.Pid, m[1]
}

func post(t testing.TB, url string) {
	t.Helper()
	resp, err := http.Post(url, "", nil)
	answer(t, "POST", url, resp, err)
}

// get GETs a demo control URL and returns the answer's body.
func get(t testing.TB, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	return answer(t, "GET", url, resp, err)
}

func answer(t testing.TB, method, url string, resp *http.Response, err error) string {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %s %s", method, url, resp.Status, body)
	}
	return string(body)
}

// demoScenario runs the real demo (env added to its environment) and an
// agent watching it with its heap profile pulled every second; tune
// adjusts the agent's config. It asserts that the steady demo raises
// nothing for quiet, then returns the fault-switch URL and the stream.
func demoScenario(t *testing.T, env []string, quiet time.Duration, tune func(*Config)) (string, <-chan *culpritv1.FindingEvent) {
	t.Helper()
	pid, control := demoProcess(t, env...)
	cfg := testConfig(t, pid)
	cfg.Pprof.HeapURL = control + "/debug/pprof/heap"
	cfg.Pprof.Interval = time.Duration(time.Second)
	tune(&cfg)
	a := startAgentConfig(t, cfg)
	events, _ := watch(t, client(t, a.GRPCAddr), 0)
	select {
	case ev := <-events:
		t.Fatalf("the steady demo raised %v", ev)
	case <-time.After(quiet):
	}
	return control, events
}

func openedBy(rule string) func(*culpritv1.FindingEvent) bool {
	return func(ev *culpritv1.FindingEvent) bool {
		return ev.Type == culpritv1.FindingEvent_TYPE_OPENED && ev.Finding.Rule == rule
	}
}

// A Go service leaks heap steadily; the agent pulls its real heap profile
// over HTTP, sees the live heap grow, and names the leaking function from
// the diff of two profiles.
func TestHeapLeakFindingNamesTheFunction(t *testing.T) {
	control, events := demoScenario(t, nil, 4*time.Second, func(cfg *Config) {
		cfg.Rules.HeapLeak.Window = time.Duration(10 * time.Second)
		cfg.Rules.HeapLeak.MinGrowth = 16 << 20
		cfg.Rules.HeapLeak.MinDuration = 3 * time.Second
		// Go's heap profile is as of the last GC, which a growing heap
		// runs only when it doubles: without gc=1 the profiles lag the
		// leak in steps (seen: 120 MiB/min for this 480 MiB/min leak).
		cfg.Pprof.HeapURL += "?gc=1"
	})
	start := time.Now()
	post(t, control+"/fault/leak-heap?mb=4&every=500ms&for=30s")
	ev, skipped := next(t, events, 30*time.Second, openedBy("heap_leak"))
	// The rate the demo really leaked at: what it holds past its first
	// 4 MiB (at once, before the growth's line) over the time since.
	var held, pipes int
	if _, err := fmt.Sscanf(get(t, control+"/fault/held"), "%d MiB of heap leaked, %d pipes leaked", &held, &pipes); err != nil {
		t.Fatal(err)
	}
	real := float64(held-4) / time.Since(start).Minutes()
	for _, s := range skipped {
		if s.Finding != nil && s.Finding.Rule != "heap_leak" {
			t.Errorf("unrelated finding during a heap leak: %s %s", s.Finding.Rule, s.Finding.Cause)
		}
	}
	f := ev.Finding
	t.Logf("real %.0f MiB/min\n  %s\n  %s", real, f.Title, f.RootCause)
	if f.Cause != "heap_leak" {
		t.Fatalf("cause %s: %s", f.Cause, f.RootCause)
	}
	// 4 MiB every 500 ms: 480 MiB/min, if the demo kept its schedule.
	if got := evidenceOf(t, f, "bytes/min").Value / (1 << 20); math.Abs(got-real)/real > 0.2 {
		t.Errorf("reported %.0f MiB/min for a leak of %.0f MiB/min", got, real)
	}
	named := false
	for _, a := range f.Artifacts {
		if a.Kind == "frame" && strings.Contains(a.Value, "leakHeap") {
			named = true
		}
	}
	if !named {
		t.Fatalf("the heap diff does not name demo.leakHeap: %+v / %s", f.Artifacts, f.RootCause)
	}
}

func tuneRetention(cfg *Config) {
	cfg.Rules.RSSWithoutHeap.Window = time.Duration(10 * time.Second)
	cfg.Rules.RSSWithoutHeap.MinGap = 128 << 20
}

// testConfig is the agent's defaults on ephemeral loopback ports, watching pid.
func testConfig(t testing.TB, pid int) Config {
	t.Helper()
	cfg := DefaultConfig()
	cfg.Agent.HTTPAddr = "127.0.0.1:0"
	cfg.Agent.GRPCAddr = "127.0.0.1:0"
	cfg.Traces.GRPCAddr = "127.0.0.1:0"
	cfg.Traces.HTTPAddr = "127.0.0.1:0"
	cfg.Target.PID = pid
	return cfg
}

// A Go service allocates a large heap and frees it; its runtime keeps the
// pages (MADV_FREE: GODEBUG=madvdontneed=0), so RSS stays far above a
// small, flat live heap: named allocator retention, not a leak (seed 000
// Problem C, "memory does not return after spikes").
func TestAllocatorRetentionFinding(t *testing.T) {
	control, events := demoScenario(t, []string{"GODEBUG=madvdontneed=0"}, 3*time.Second, tuneRetention)
	post(t, control+"/fault/spike?mb=300")
	ev, _ := next(t, events, 20*time.Second, openedBy("rss_without_heap"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if f.Cause != "allocator_retention" || !strings.Contains(f.Remediation, "GOMEMLIMIT") {
		t.Fatalf("finding %s: %s / %s", f.Cause, f.RootCause, f.Remediation)
	}
	if !strings.Contains(f.RootCause, "heap is flat") && !strings.Contains(f.RootCause, "heap is falling") {
		t.Errorf("root cause does not rule out a leak: %s", f.RootCause)
	}
}

// Memory mapped outside the heap and later unmapped: the finding opens on
// the gap and resolves when RSS comes back.
func TestAllocatorRetentionResolves(t *testing.T) {
	control, events := demoScenario(t, nil, time.Second, tuneRetention)
	post(t, control+"/fault/retain?mb=256")
	ev, _ := next(t, events, 20*time.Second, openedBy("rss_without_heap"))
	post(t, control+"/fault/release")
	next(t, events, 20*time.Second, func(e *culpritv1.FindingEvent) bool {
		return e.Type == culpritv1.FindingEvent_TYPE_RESOLVED && e.Finding.Id == ev.Finding.Id
	})
}

// The demo leaks pipes steadily: the finding names the kind that grows and
// forecasts when RLIMIT_NOFILE is hit.
func TestFDLeakFinding(t *testing.T) {
	control, events := demoScenario(t, nil, 3*time.Second, func(cfg *Config) {
		cfg.Rules.FDExhaustion.Window = time.Duration(10 * time.Second)
		cfg.Rules.FDExhaustion.MinDuration = 2 * time.Second
	})
	post(t, control+"/fault/leak-fds?n=5&every=250ms&for=30s")
	ev, _ := next(t, events, 20*time.Second, openedBy("fd_exhaustion"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  fix: %s", f.Title, f.RootCause, f.Remediation)
	if f.Cause != "fd_leak" || !strings.Contains(f.RootCause, "pipe descriptors") || !strings.Contains(f.RootCause, "limit is hit in") || !strings.Contains(f.RootCause, "rising by") {
		t.Fatalf("finding %s: %s", f.Cause, f.RootCause)
	}
	if !strings.Contains(f.Remediation, "Pipes leak") {
		t.Errorf("remediation does not address pipes: %s", f.Remediation)
	}
}

// The demo loses 40 pipes every 3 s for 21 s, then stops (the pipes stay
// open). The leak is reported; once it has stayed flat for longer than its
// bursts' rhythm the stop is told by an UPDATED, in the past tense and
// without a forecast, with the time of the last burst; no event after
// that says the FDs are rising.
func TestFDLeakStoppedIsToldAsStopped(t *testing.T) {
	control, events := demoScenario(t, nil, 3*time.Second, func(cfg *Config) {
		cfg.Rules.FDExhaustion.Window = time.Duration(40 * time.Second)
		cfg.Rules.FDExhaustion.MinDuration = 5 * time.Second
	})
	post(t, control+"/fault/leak-fds?n=40&every=3s&for=21s")
	began := time.Now()
	ev, _ := next(t, events, 30*time.Second, openedBy("fd_exhaustion"))
	id := ev.Finding.Id
	t.Logf("OPENED at +%.1fs: %s\n  %s", time.Since(began).Seconds(), ev.Finding.Title, ev.Finding.RootCause)
	var told *culpritv1.Finding
	deadline := time.After(50 * time.Second)
	for told == nil {
		select {
		case ev := <-events:
			f := ev.Finding
			if f.Id != id {
				continue
			}
			t.Logf("%s at +%.1fs: %s\n  %s", ev.Type, time.Since(began).Seconds(), f.Title, f.RootCause)
			if strings.Contains(f.RootCause, "have not grown since") {
				told = f
				if ev.Type != culpritv1.FindingEvent_TYPE_UPDATED {
					t.Errorf("the stop was first told by a %s event", ev.Type)
				}
			} else if ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED {
				t.Fatalf("resolved without telling the stop: %s", f.RootCause)
			}
		case <-deadline:
			t.Fatal("the leak's stop was never told")
		}
	}
	// The last burst is at about +18 s (7 bursts, 3 s apart, from +0 s);
	// the stop is told once the series stayed flat for longer than 3 s.
	if after := time.Since(began); after < 21*time.Second || after > 32*time.Second {
		t.Errorf("the stop told %.1f s after the leak began, want 21-32 s (the last burst at ~18 s)", after.Seconds())
	}
	for _, bad := range []string{"rising by", "at this rate", "heading for"} {
		if strings.Contains(told.Title+told.RootCause, bad) {
			t.Errorf("the stop says %q: %s / %s", bad, told.Title, told.RootCause)
		}
	}
	if !strings.Contains(told.Title, "File descriptors leaked: ") || !strings.Contains(told.RootCause, "pipe descriptors") {
		t.Errorf("%s / %s", told.Title, told.RootCause)
	}
	// Nothing after it says rising.
	end := time.After(8 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Finding.Id == id && strings.Contains(ev.Finding.RootCause, "rising by") {
				t.Errorf("%s after the stop says rising: %s", ev.Type, ev.Finding.RootCause)
			}
		case <-end:
			return
		}
	}
}

// A process in a 128 MiB memory cgroup fills it with memory outside its
// heap: OOM ahead, and what fills it is named from the cgroup's anon/file
// split and the app's heap profile.
func TestOOMAheadFinding(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	const limit = 256 << 20
	dir, version := testenv.MemoryCgroup(t, limit, l.PID)
	cfg := testConfig(t, l.PID)
	cfg.Pprof.HeapURL = l.PprofURL
	cfg.Pprof.Interval = time.Duration(time.Second)
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	events, _ := watch(t, c, 0)
	select {
	case ev := <-events:
		t.Fatalf("an idle process with headroom raised %v", ev)
	case <-time.After(3 * time.Second):
	}
	// Fill to 93% of the limit from what the child already uses (a -race
	// build uses several times more than a plain one).
	usageFile := map[int]string{1: "memory.usage_in_bytes", 2: "memory.current"}[version]
	b, err := os.ReadFile(filepath.Join(dir, usageFile))
	if err != nil {
		t.Fatal(err)
	}
	used, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	mb := (limit*93/100 - used) >> 20
	if mb < 16 {
		t.Fatalf("the child already uses %d MiB of the %d MiB cgroup", used>>20, limit>>20)
	}
	l.MustDo(t, "retain "+strconv.FormatInt(mb, 10))
	ev, _ := next(t, events, 15*time.Second, openedBy("oom_ahead"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.Symptom, f.RootCause)
	if f.Cause != "allocator_retention" || !strings.Contains(f.RootCause, "held by the allocator") {
		t.Fatalf("cause %s: %s", f.Cause, f.RootCause)
	}
}

// evidenceOf returns the value of the first evidence of f with unit.
func evidenceOf(t *testing.T, f *culpritv1.Finding, unit string) *culpritv1.Evidence {
	t.Helper()
	for _, e := range f.Evidence {
		if e.Unit == unit {
			return e
		}
	}
	t.Fatalf("no %s evidence in %+v", unit, f.Evidence)
	return nil
}

// heldCounts asks the leaker what it holds: MiB of heap and fds.
func heldCounts(t *testing.T, l *testenv.Leaker) (heapMiB, fds int) {
	t.Helper()
	if _, err := fmt.Sscanf(l.MustDo(t, "held"), "ok %d MiB heap held, %d fds held", &heapMiB, &fds); err != nil {
		t.Fatal(err)
	}
	return heapMiB, fds
}

// leakerAgent runs an agent watching the leaker with tune applied to its
// config, checks that the idle leaker raises nothing for quiet (the quiet
// part of the window the rate must not be averaged over), and returns
// the finding stream.
func leakerAgent(t *testing.T, l *testenv.Leaker, quiet time.Duration, tune func(*Config)) <-chan *culpritv1.FindingEvent {
	t.Helper()
	cfg := testConfig(t, l.PID)
	tune(&cfg)
	a := startAgentConfig(t, cfg)
	events, _ := watch(t, client(t, a.GRPCAddr), 0)
	select {
	case ev := <-events:
		t.Fatalf("the idle leaker raised %s: %s", ev.Finding.GetRule(), ev.Finding.GetRootCause())
	case <-time.After(quiet):
	}
	return events
}

// A real process quiet for 8 s (32 samples at 250 ms: the quiet half of a
// 20 s window), then leaking 40 FDs a second: the finding's rate is the
// leak's, within 20%, measured from where it began, and the forecast is
// from it. (The whole-window fit reported such a leak at a seventh of
// its rate: "350.5/min" for 2400/min.)
func TestFDLeakRateFromItsOnset(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	l.MustDo(t, "nofile 8192")
	events := leakerAgent(t, l, 8*time.Second, func(cfg *Config) {
		cfg.Collect.Interval = 250 * time.Millisecond
		cfg.Rules.FDExhaustion.Window = 20 * time.Second
		cfg.Rules.FDExhaustion.MinDuration = 3 * time.Second
	})
	start := time.Now()
	l.MustDo(t, "fdrate 40")
	ev, _ := next(t, events, 20*time.Second, openedBy("fd_exhaustion"))
	_, fds := heldCounts(t, l)
	real := float64(fds) / time.Since(start).Seconds() * 60
	l.MustDo(t, "stop")
	f := ev.Finding
	got := evidenceOf(t, f, "fds/min")
	t.Logf("real %.0f/min, reported %.0f/min over %s\n  %s\n  %s", real, got.Value, got.Window.AsDuration(), f.Title, f.RootCause)
	if math.Abs(got.Value-real)/real > 0.2 {
		t.Errorf("reported %.0f/min, real %.0f/min", got.Value, real)
	}
	if w := got.Window.AsDuration(); w > time.Since(start) || w < 2*time.Second {
		t.Errorf("rate measured over %s: not from the leak's onset %s ago", w, time.Since(start).Round(time.Millisecond))
	}
	if f.Cause != "fd_leak" || !strings.Contains(f.RootCause, "rising by") || !strings.Contains(f.RootCause, "(since ") || !strings.Contains(f.RootCause, "pipe descriptors") || !strings.Contains(f.RootCause, "limit is hit in") {
		t.Errorf("finding %s: %s", f.Cause, f.RootCause)
	}
}

// FDs opened at once to 106 of a 128 limit, then flat: near the limit,
// and in no event "rising" or "hit in" (it said "rising steadily by
// 177.7/min, limit hit in 7.4s" of FDs flat at 106 of 128 for 45 s).
func TestFDFlatNearLimit(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	l.MustDo(t, "nofile 128")
	events := leakerAgent(t, l, 2*time.Second, func(cfg *Config) {
		cfg.Collect.Interval = 250 * time.Millisecond
		cfg.Rules.FDExhaustion.Window = 20 * time.Second
		cfg.Rules.FDExhaustion.MinDuration = 3 * time.Second
	})
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", l.PID))
	if err != nil {
		t.Fatal(err)
	}
	l.MustDo(t, fmt.Sprintf("leakfds %d", 106-len(ents)))
	ev, _ := next(t, events, 10*time.Second, openedBy("fd_exhaustion"))
	seen := []*culpritv1.FindingEvent{ev}
	for end := time.After(25 * time.Second); ; {
		select {
		case e := <-events:
			seen = append(seen, e)
			continue
		case <-end:
		}
		break
	}
	for _, e := range seen {
		f := e.Finding
		if f.GetRule() != "fd_exhaustion" {
			continue
		}
		if f.Cause != "fd_near_limit" || !strings.Contains(f.RootCause, "106 of 128") || !strings.Contains(f.RootCause, "near the limit") {
			t.Errorf("%s %s: %s", e.Type, f.Cause, f.RootCause)
		}
		for _, bad := range []string{"rising", "hit in", "leak"} {
			if strings.Contains(f.Title+f.Symptom+f.RootCause, bad) {
				t.Errorf("%s says %q of flat FDs: %s / %s", e.Type, bad, f.Title, f.RootCause)
			}
		}
	}
	for _, e := range seen {
		t.Logf("%s %s %s: %s", e.Type, e.Finding.GetRule(), e.Finding.GetCause(), e.Finding.GetTitle())
	}
	t.Logf("%d events over 25 s; first: %s\n  %s", len(seen), ev.Finding.Title, ev.Finding.RootCause)
}

// A real live heap quiet for 8 s, then leaking 8 MiB a second (480
// MiB/min), pulled as real heap profiles every second: the finding's rate
// is the leak's within 20%, from where it began (the whole-window fit
// reported "10.3 MiB/min" for ~480 MiB/min), and the profiles' diff names
// the leaking function.
func TestHeapLeakRateFromItsOnset(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	events := leakerAgent(t, l, 8*time.Second, func(cfg *Config) {
		cfg.Pprof.HeapURL = l.PprofURL
		// Every 2 s: a profile counts as current for 3 intervals, and
		// a -race child under load can be slow to serve one.
		cfg.Pprof.Interval = 2 * time.Second
		cfg.Rules.HeapLeak.Window = 30 * time.Second
		cfg.Rules.HeapLeak.MinGrowth = 32 << 20
		cfg.Rules.HeapLeak.MinDuration = 5 * time.Second
	})
	start := time.Now()
	l.MustDo(t, "heaprate 8")
	// The finding may first open as anonymous-RSS growth, should a heap
	// profile be late; the heap leak is what is measured.
	ev, _ := next(t, events, 40*time.Second, func(ev *culpritv1.FindingEvent) bool {
		return ev.Finding.GetRule() == "heap_leak" && ev.Finding.GetCause() == "heap_leak"
	})
	heap, _ := heldCounts(t, l)
	real := float64(heap<<20) / time.Since(start).Seconds() * 60
	l.MustDo(t, "stop")
	f := ev.Finding
	got := evidenceOf(t, f, "bytes/min")
	t.Logf("real %.0f MiB/min, reported %.0f MiB/min over %s\n  %s\n  %s", real/(1<<20), got.Value/(1<<20), got.Window.AsDuration(), f.Title, f.RootCause)
	if math.Abs(got.Value-real)/real > 0.2 {
		t.Errorf("reported %.0f MiB/min, real %.0f MiB/min", got.Value/(1<<20), real/(1<<20))
	}
	if w := got.Window.AsDuration(); w > time.Since(start) {
		t.Errorf("rate measured over %s, longer than the leak (%s)", w, time.Since(start).Round(time.Millisecond))
	}
	if f.Cause != "heap_leak" || !strings.Contains(f.RootCause, "leakHeapSlowly") || !strings.Contains(f.Title, "MiB/min") {
		t.Errorf("finding %s: %s / %s", f.Cause, f.Title, f.RootCause)
	}
}

// A real heap leak at 8 MiB a second that stops between two heap profiles
// (4 s apart): once the next profiles show it flat, the finding says the
// heap grew (past tense), for about as long as it really did, and when it
// stopped, dated from the anonymous RSS read each second, in an UPDATED
// event; nothing told after the stop says it still grows. (The demo's 40 s leak was "growing
// by 392.1 MiB/min for 48.5 s ... and still grows" 8 s after it ended.)
func TestHeapLeakStoppedIsToldAsStopped(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	const every = 4 * time.Second
	events := leakerAgent(t, l, 8*time.Second, func(cfg *Config) {
		cfg.Pprof.HeapURL = l.PprofURL
		cfg.Pprof.Interval = every
		cfg.Rules.HeapLeak.Window = 60 * time.Second
		cfg.Rules.HeapLeak.MinGrowth = 32 << 20
		cfg.Rules.HeapLeak.MinDuration = 5 * time.Second
	})
	start := time.Now()
	l.MustDo(t, "heaprate 8")
	next(t, events, 40*time.Second, func(ev *culpritv1.FindingEvent) bool {
		return ev.Finding.GetRule() == "heap_leak" && ev.Finding.GetCause() == "heap_leak"
	})
	// The stop falls between two profiles (the finding opens on one).
	time.Sleep(every / 2)
	l.MustDo(t, "stop")
	stop := time.Now()
	ran := stop.Sub(start)
	heap, _ := heldCounts(t, l)
	real := float64(heap<<20) / ran.Seconds() * 60
	var told *culpritv1.Finding
	deadline := time.After(5 * every)
	for told == nil {
		select {
		case ev := <-events:
			f := ev.Finding
			if f.GetRule() != "heap_leak" {
				continue
			}
			t.Logf("%s at +%.1fs: %s\n  %s", ev.Type, time.Since(stop).Seconds(), f.Title, f.Symptom)
			if time.Since(stop) > 2*every && strings.Contains(f.Symptom, "still grows") {
				t.Errorf("%.0f s after the leak stopped: %s", time.Since(stop).Seconds(), f.Symptom)
			}
			if strings.Contains(f.Symptom, "has not grown since") {
				told = f
				// Watchers are told when it stops, not only when the
				// finding resolves (it was: 15 s after the stop).
				if ev.Type != culpritv1.FindingEvent_TYPE_UPDATED {
					t.Errorf("the stop was first told by a %s event", ev.Type)
				}
			}
		case <-deadline:
			t.Fatalf("%s after the leak stopped, heap_leak never said it had stopped", 5*every)
		}
	}
	if !strings.HasPrefix(told.Title, "Live heap grew by ") {
		t.Errorf("a stopped leak's title is not in the past tense: %s", told.Title)
	}
	m := regexp.MustCompile(`has not grown since (?:about )?(\d\d:\d\d:\d\d)`).FindStringSubmatch(told.Symptom)
	if m == nil {
		t.Fatalf("no time of the stop in: %s", told.Symptom)
	}
	at, err := time.ParseInLocation("15:04:05", m[1], time.Local)
	if err != nil {
		t.Fatal(err)
	}
	y, mo, d := stop.Date()
	at = time.Date(y, mo, d, at.Hour(), at.Minute(), at.Second(), 0, time.Local)
	// The RSS is read once a second; the time is told to the second.
	if off := at.Sub(stop); off < -3*time.Second || off > 3*time.Second {
		t.Errorf("said the heap stopped growing at %s; it stopped at %s", m[1], stop.Format("15:04:05.0"))
	}
	rate := evidenceOf(t, told, "bytes/min")
	if w := rate.Window.AsDuration(); w > ran+2*time.Second || w < ran/2 {
		t.Errorf("said it grew for %s; it grew for %s", w, ran.Round(100*time.Millisecond))
	}
	if math.Abs(rate.Value-real)/real > 0.2 {
		t.Errorf("said %.0f MiB/min for a leak of %.0f MiB/min", rate.Value/(1<<20), real/(1<<20))
	}
}
