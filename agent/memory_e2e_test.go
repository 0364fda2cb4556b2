package main

import (
	"bufio"
	"io"
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
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: %s %s", url, resp.Status, body)
	}
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
		cfg.Rules.HeapLeak.Window = time.Duration(8 * time.Second)
		cfg.Rules.HeapLeak.MinGrowth = 16 << 20
	})
	post(t, control+"/fault/leak-heap?mb=4&every=500ms&for=30s")
	ev, skipped := next(t, events, 30*time.Second, openedBy("heap_leak"))
	for _, s := range skipped {
		if s.Finding != nil && s.Finding.Rule != "heap_leak" {
			t.Errorf("unrelated finding during a heap leak: %s %s", s.Finding.Rule, s.Finding.Cause)
		}
	}
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if f.Cause != "heap_leak" {
		t.Fatalf("cause %s: %s", f.Cause, f.RootCause)
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
	cfg.Rules.RSSWithoutHeap.Window = time.Duration(5 * time.Second)
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
	if !strings.Contains(f.RootCause, "heap is flat") {
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
		cfg.Rules.FDExhaustion.Window = time.Duration(6 * time.Second)
	})
	post(t, control+"/fault/leak-fds?n=5&every=250ms&for=30s")
	ev, _ := next(t, events, 20*time.Second, openedBy("fd_exhaustion"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  fix: %s", f.Title, f.RootCause, f.Remediation)
	if f.Cause != "fd_leak" || !strings.Contains(f.RootCause, "pipe descriptors") || !strings.Contains(f.RootCause, "limit is hit in") {
		t.Fatalf("finding %s: %s", f.Cause, f.RootCause)
	}
	if !strings.Contains(f.Remediation, "Pipes leak") {
		t.Errorf("remediation does not address pipes: %s", f.Remediation)
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
