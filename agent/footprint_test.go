package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
)

// The agent's own footprint, measured on the real binary as a sidecar
// runs it: in the target's network namespace, on the default
// configuration. The exact figures, beside a baseline measured in the same
// run, are make bench's (BenchmarkFootprint); these tests hold generous
// bounds so that a regression fails.

// rssBudgetMiB is the RSS an idle agent must stay under after warm-up
// (CULPRIT_TEST_RSS_BUDGET_MIB overrides it). The goal is 32 MiB: watching
// the quiet python target with 1,000 sockets of a neighbour, make bench
// measured 28.4 MiB (12.1 anonymous) once the agent had dropped its
// start-up pages (binaryPagesAfter). The bound leaves room for a loaded
// test machine, so that a regression fails and noise does not.
const rssBudgetMiB = 40

// sidecarAgent is how the footprint is measured: the real binary on pid,
// in the target's network namespace as a sidecar runs, without the trace
// receivers, logging at debug unless sets say otherwise; ready once it
// watches its target. beforeExec, when not nil, is given the agent's PID
// before it runs (to move it into a cgroup).
func sidecarAgent(t testing.TB, bin string, pid int, beforeExec func(pid int), sets ...string) testenv.AgentOptions {
	args := []string{"--pid", strconv.Itoa(pid), "--set", "traces.enabled=false", "--set", "agent.log_level=debug"}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	return testenv.AgentOptions{Bin: bin, Args: args, Netns: testenv.NetnsOf(t, pid), BeforeExec: beforeExec,
		Ready: "/readyz", ReadyTimeout: 30 * time.Second}
}

// agentMetrics scrapes the agent's /metrics into name{labels} -> value.
func agentMetrics(t testing.TB, a *testenv.Agent) map[string]float64 {
	t.Helper()
	resp, err := a.HTTPClient().Get("http://" + a.HTTPAddr + "/metrics")
	if err != nil {
		t.Fatalf("scrape the agent: %v", err)
	}
	defer resp.Body.Close()
	return parseExposition(resp.Body)
}

// parseExposition reads the text exposition format into name{labels} ->
// value, comments left out.
func parseExposition(r io.Reader) map[string]float64 {
	out := map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(l, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(l[i+1:], 64); err == nil {
			out[l[:i]] = v
		}
	}
	return out
}

// procCPU is the CPU time every thread of pid ran, from schedstat
// (nanoseconds, as the scheduler counts it; /proc/PID/stat's ticks are
// sampled, and a process that wakes briefly is charged whole ticks).
func procCPU(pid int) time.Duration {
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/schedstat")
	var sum int64
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if fs := bytes.Fields(b); len(fs) > 0 {
			n, _ := strconv.ParseInt(string(fs[0]), 10, 64)
			sum += n
		}
	}
	return time.Duration(sum)
}

// procStatus reads kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon,
// RssFile) in bytes.
func procStatus(pid int) map[string]int64 {
	out := map[string]int64{}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		f := strings.Fields(v)
		if !ok || len(f) != 2 || f[1] != "kB" {
			continue
		}
		n, _ := strconv.ParseInt(f[0], 10, 64)
		out[k] = n << 10
	}
	return out
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// requireRoot skips loudly without root (namespaces, cgroups, eBPF); as
// root a missing feature is a failure, as the project's other tests have it.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("SKIP: needs root (network namespaces, cgroups, eBPF)")
	}
}

func rssBudget(t testing.TB) int64 {
	if s := os.Getenv("CULPRIT_TEST_RSS_BUDGET_MIB"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CULPRIT_TEST_RSS_BUDGET_MIB=%q: want a number of MiB", s)
		}
		return int64(n) << 20
	}
	return rssBudgetMiB << 20
}

// TestIdleAgentRSSBudget: the real agent, watching a quiet target with
// ~1,000 sockets of another process in its namespace, stays under the RSS
// budget after its warm-up (probes attached, symbol tables read, a few
// cycles of every collector and rule).
func TestIdleAgentRSSBudget(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: runs the agent for 35 s")
	}
	requireRoot(t)
	// The footprint benchmark's quiet target: a small program, as most
	// apps are next to this test's own binary, whose symbol tables the
	// agent would read.
	pid := startQuietPython(t)
	nb := testenv.StartNeighbour(t, pid)
	if held := nb.HoldEstablished(t, 500); held < 500 {
		t.Fatalf("neighbour holds %d connections, want 500", held)
	}
	a := testenv.StartAgent(t, sidecarAgent(t, culpritBinary(t), pid, nil))
	// Warm-up, past the drop of the start's binary pages.
	time.Sleep(binaryPagesAfter + 5*time.Second)
	st := procStatus(a.PID)
	m := agentMetrics(t, a)
	t.Logf("idle agent: VmRSS %.1f MiB (anon %.1f, file %.1f), VmHWM %.1f MiB, Go heap in use %.1f MiB",
		mib(st["VmRSS"]), mib(st["RssAnon"]), mib(st["RssFile"]), mib(st["VmHWM"]), m["go_memstats_heap_inuse_bytes"]/(1<<20))
	if budget := rssBudget(t); st["VmRSS"] > budget {
		t.Fatalf("idle agent VmRSS %.1f MiB over the budget of %.0f MiB (anon %.1f, file %.1f MiB)",
			mib(st["VmRSS"]), mib(budget), mib(st["RssAnon"]), mib(st["RssFile"]))
	}
}

// TestAgentMemoryLimitFromCgroup: an agent in a memory cgroup sets its Go
// memory limit from the cgroup's (agent.memory_limit_ratio of it), and
// keeps running in a tight one.
func TestAgentMemoryLimitFromCgroup(t *testing.T) {
	requireRoot(t)
	s := testenv.Start(t, testenv.Options{Backlog: 128, Accept: true})
	const limit = 96 << 20
	a := testenv.StartAgent(t, sidecarAgent(t, culpritBinary(t), s.PID, func(pid int) { testenv.MemoryCgroup(t, limit, pid) }))
	time.Sleep(3 * time.Second)
	b := []byte(a.Log())
	want := fmt.Sprintf("bytes=%d", int64(float64(limit)*DefaultConfig().Agent.MemoryLimitRatio))
	if !bytes.Contains(b, []byte("Go memory limit set")) || !bytes.Contains(b, []byte(want)) {
		t.Fatalf("the agent did not set its Go memory limit from its cgroup (want %s):\n%s", want, b)
	}
	select {
	case <-a.Exited():
		t.Fatalf("the agent exited: %v", a.ExitErr())
	default:
	}
	// An explicit limit wins over the cgroup's.
	a2 := testenv.StartAgent(t, sidecarAgent(t, culpritBinary(t), s.PID, func(pid int) { testenv.MemoryCgroup(t, limit, pid) }, "agent.memory_limit_bytes=50000000"))
	time.Sleep(time.Second)
	b = []byte(a2.Log())
	if !bytes.Contains(b, []byte("bytes=50000000")) || !bytes.Contains(b, []byte("from=agent.memory_limit_bytes")) {
		t.Fatalf("agent.memory_limit_bytes not applied:\n%s", b)
	}
}

// TestAgentRuntimeSize: the agent runs its Go code on agent.max_procs
// threads (1 by default, the cheapest while the target is quiet) with
// agent.gogc, as its own /metrics reports them; GOMAXPROCS in the
// environment wins over the key.
func TestAgentRuntimeSize(t *testing.T) {
	requireRoot(t)
	s := testenv.Start(t, testenv.Options{Backlog: 128, Accept: true})
	for _, c := range []struct {
		name  string
		env   []string
		sets  []string
		procs float64
	}{
		{"default", nil, nil, float64(DefaultConfig().Agent.MaxProcs)},
		{"max_procs=2", nil, []string{"agent.max_procs=2"}, 2},
		{"GOMAXPROCS wins", []string{"GOMAXPROCS=2"}, nil, 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := sidecarAgent(t, culpritBinary(t), s.PID, nil, c.sets...)
			o.Env = c.env
			a := testenv.StartAgent(t, o)
			m := agentMetrics(t, a)
			if got := m["go_sched_gomaxprocs_threads"]; got != c.procs {
				t.Errorf("go_sched_gomaxprocs_threads = %v, want %v", got, c.procs)
			}
			if got, want := m["go_gc_gogc_percent"], float64(DefaultConfig().Agent.GOGC); got != want {
				t.Errorf("go_gc_gogc_percent = %v, want %v (agent.gogc)", got, want)
			}
		})
	}
}

// TestAgentPprofLoopbackOnly: agent.pprof serves the agent's own profiles
// on the HTTP listener, to loopback callers; it is off by default.
func TestAgentPprofLoopbackOnly(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 16, Accept: true})
	cfg := testConfig(t, s.PID)
	a := startAgentConfig(t, cfg)
	resp, err := http.Get("http://" + a.HTTPAddr + "/debug/pprof/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("/debug/pprof/ with agent.pprof off: %s, want 404", resp.Status)
	}
	cfg.Agent.Pprof = true
	a = startAgentConfig(t, cfg)
	resp, err = http.Get("http://" + a.HTTPAddr + "/debug/pprof/heap?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Contains(body, []byte("heap profile")) {
		t.Fatalf("/debug/pprof/heap from loopback: %s %.200s", resp.Status, body)
	}
	// From beyond loopback, without a token: refused.
	g := pprofAccess{}
	r, _ := http.NewRequest("GET", "/debug/pprof/", nil)
	r.RemoteAddr = "10.1.2.3:4567"
	if g.allowed(r) {
		t.Fatal("a non-loopback caller was let in without a token")
	}
	g.token = []byte("0123456789abcdef0123")
	r.Header.Set("Authorization", "Bearer 0123456789abcdef0123")
	if !g.allowed(r) {
		t.Fatal("a caller with the token was refused")
	}
}
