package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// workersScenario runs a workers child (an async runtime's shape: threads
// worker-0..3) and a real agent watching it with short rule windows, and
// returns the live finding stream once the sched probe has seen the
// workers.
func workersScenario(t *testing.T, tune func(*Config)) (*testenv.Workers, *Agent, culpritv1.DiagnosticsClient, <-chan *culpritv1.FindingEvent) {
	t.Helper()
	w := testenv.StartWorkers(t, 4)
	cfg := testConfig(t, w.PID)
	cfg.Rules.BlockingWorker.Window = time.Duration(4 * time.Second)
	cfg.Rules.BusyWorker.Window = time.Duration(4 * time.Second)
	cfg.Rules.WorkerImbalance.Window = time.Duration(3 * time.Second)
	cfg.Rules.CPUThrottling.Window = time.Duration(3 * time.Second)
	cfg.Rules.ResolveAfter = time.Duration(2 * time.Second)
	if tune != nil {
		tune(&cfg)
	}
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitSched(t, c)
	events, _ := watch(t, c, 0)
	return w, a, c, events
}

// waitSched blocks until the sched probe watches the target's threads: a
// sleep that began before cannot be seen.
func waitSched(t testing.TB, c culpritv1.DiagnosticsClient) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
		if err == nil && signalValue(s, signals.ThreadCPUSecondsTotal, "thread", "worker-1") != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the agent never saw the worker threads (sched probe): %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func artifact(f *culpritv1.Finding, kind, contains string) bool {
	for _, a := range f.Artifacts {
		if a.Kind == kind && strings.Contains(a.Value, contains) {
			return true
		}
	}
	return false
}

// A worker of the pool that blocks in nanosleep on a timer (a sync call on
// an async worker): the finding names the thread, the call and the Go
// function that made it, over the real gRPC stream.
func TestBlockingWorkerFinding(t *testing.T) {
	w, _, _, events := workersScenario(t, nil)
	w.MustDo(t, "blockloop 1 700")
	ev, _ := next(t, events, 10*time.Second, openedBy("blocking_worker"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.RootCause, f.Remediation)
	if f.Cause != "blocking_call_on_worker" || !strings.Contains(f.Title, "worker-1") || !strings.Contains(f.Title, "nanosleep") {
		t.Errorf("finding %s: %s", f.Cause, f.Title)
	}
	if !artifact(f, "frame", "faults.BlockingCall") || !artifact(f, "stack", "do_nanosleep") || !artifact(f, "thread", "worker-1") {
		t.Errorf("artifacts do not name the blocking function, stack and thread: %+v", f.Artifacts)
	}
	// Advice for the program at hand: the demo is Go, so no Tokio remedy.
	if !strings.Contains(f.Remediation, "faults.BlockingCall") || strings.Contains(strings.ToLower(f.Remediation), "tokio") {
		t.Errorf("remediation %q", f.Remediation)
	}
	w.MustDo(t, "stop")
	next(t, events, 15*time.Second, resolvedBy("blocking_worker"))
}

// A worker that runs CPU work without yielding: the finding names the
// thread and, from the CPU profile, the hot function. The pool's CPU is
// then all that worker's: no worker_imbalance beside it (its "load pinned
// to one worker" is the same run; rules.Facet).
func TestBusyWorkerFinding(t *testing.T) {
	w, _, _, events := workersScenario(t, nil)
	w.MustDo(t, "spinloop 2")
	ev, _ := next(t, events, 10*time.Second, openedBy("busy_worker"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if f.Cause != "cpu_heavy_on_worker" || !strings.Contains(f.Symptom, "worker-2") {
		t.Errorf("finding %s: %s / %s", f.Cause, f.Title, f.Symptom)
	}
	// The profile needs a drain or two before it names the function; an
	// update then carries it.
	deadline := time.After(10 * time.Second)
	for !artifact(f, "frame", "faults.hotLoop") {
		select {
		case ev := <-events:
			if ev.Finding != nil && ev.Finding.Rule == "busy_worker" {
				f = ev.Finding
			}
		case <-deadline:
			t.Fatalf("the finding never named faults.hotLoop: %+v", f.Artifacts)
		}
	}
	// worker_imbalance's window (10 s) full of the spin.
	for end := time.After(12 * time.Second); ; {
		select {
		case ev := <-events:
			if ev.Finding != nil && ev.Finding.Rule == "worker_imbalance" && ev.Type == culpritv1.FindingEvent_TYPE_OPENED {
				t.Errorf("the spinning worker also opened worker_imbalance: %s", ev.Finding.Title)
			}
			continue
		case <-end:
		}
		break
	}
	w.MustDo(t, "stop")
}

// One worker does nearly all the work in short runs (so no single run is
// long) while its peers idle: worker imbalance, naming the busy worker.
func TestWorkerImbalanceFinding(t *testing.T) {
	w, _, _, events := workersScenario(t, nil)
	w.MustDo(t, "duty 0 80")
	for _, i := range []string{"1", "2", "3"} {
		w.MustDo(t, "duty "+i+" 3")
	}
	ev, skipped := next(t, events, 12*time.Second, openedBy("worker_imbalance"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.Symptom)
	if f.Cause != "unbalanced_workers" || !artifact(f, "thread", "worker-0") {
		t.Errorf("finding %s: %s %+v", f.Cause, f.Title, f.Artifacts)
	}
	for _, s := range skipped {
		if s.Finding != nil && (s.Finding.Rule == "busy_worker" || s.Finding.Rule == "blocking_worker") {
			t.Errorf("short runs and idle waits raised %s: %s", s.Finding.Rule, s.Finding.Title)
		}
	}
	w.MustDo(t, "stop")
}

// The workers placed in a cgroup with a 0.2-core quota while two of them
// want a core: CFS throttles the cgroup and the finding names the quota.
func TestCPUThrottlingFinding(t *testing.T) {
	w, _, _, events := workersScenario(t, nil)
	testenv.CPUCgroup(t, 0.2, w.PID)
	w.MustDo(t, "duty 0 50")
	w.MustDo(t, "duty 1 50")
	ev, _ := next(t, events, 15*time.Second, openedBy("cpu_throttling"))
	f := ev.Finding
	t.Logf("%s\n  %s\n  %s", f.Title, f.RootCause, f.Remediation)
	if f.Cause != "cpu_quota_throttled" || !strings.Contains(f.RootCause, "0.2") {
		t.Errorf("finding %s: %s", f.Cause, f.RootCause)
	}
	w.MustDo(t, "stop")
}

// Silence: a pool doing balanced short tasks, with brief blocking calls
// under the threshold, raises none of the scheduler findings.
func TestHealthyWorkersRaiseNoFinding(t *testing.T) {
	w, _, _, events := workersScenario(t, nil)
	for _, i := range []string{"0", "1", "2", "3"} {
		w.MustDo(t, "duty "+i+" 20")
	}
	for range 5 {
		w.MustDo(t, "block 1 50")
	}
	deadline := time.After(6 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Finding != nil {
				t.Errorf("healthy workers raised %s/%s: %s", ev.Finding.Rule, ev.Finding.Cause, ev.Finding.Title)
			}
		case <-deadline:
			w.MustDo(t, "stop")
			return
		}
	}
}

// A profile captured over gRPC opens in `go tool pprof -top` and names the
// function the spinning worker runs.
func TestCaptureProfileOverGRPC(t *testing.T) {
	w, _, c, _ := workersScenario(t, nil)
	w.MustDo(t, "spinloop 3")
	resp, err := c.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Duration: durationpb.New(2 * time.Second)})
	if err != nil {
		t.Fatalf("CaptureProfile: %v", err)
	}
	w.MustDo(t, "stop")
	if resp.Samples < 40 {
		t.Errorf("%d samples in 2 s of one spinning thread at 49 Hz, want about 98", resp.Samples)
	}
	path := filepath.Join(t.TempDir(), "cpu.pb.gz")
	if err := os.WriteFile(path, resp.Pprof, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("go", "tool", "pprof", "-top", path).CombinedOutput()
	if err != nil {
		t.Fatalf("go tool pprof -top: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "faults.hotLoop") {
		t.Errorf("pprof -top does not name faults.hotLoop:\n%s", out)
	}
	// Bad requests are refused with a reason.
	_, err = c.CaptureProfile(context.Background(), &culpritv1.CaptureProfileRequest{Duration: durationpb.New(time.Hour)})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "profiling.max_capture") {
		t.Errorf("an hour-long capture: %v", err)
	}
}

func resolvedBy(rule string) func(*culpritv1.FindingEvent) bool {
	return func(ev *culpritv1.FindingEvent) bool {
		return ev.Type == culpritv1.FindingEvent_TYPE_RESOLVED && ev.Finding.Rule == rule
	}
}

// The accept loop runs on worker-0 (one accept per task, as an event loop
// does); worker-0 then makes a 4 s blocking call while clients connect.
// The accept queue overflows, and "app not accepting" names the stalled
// thread, the system call and the function that made it.
func TestAppNotAcceptingNamesTheStalledThread(t *testing.T) {
	w := testenv.StartWorkersNetns(t, 2)
	var port int
	if _, err := fmt.Sscanf(w.MustDo(t, "listen 4"), "ok port %d", &port); err != nil {
		t.Fatal(err)
	}
	a := startAgent(t, w.PID)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, port)
	waitSched(t, c)
	events, _ := watch(t, c, 0)
	w.MustDo(t, "block 0 4000")
	time.Sleep(200 * time.Millisecond)
	w.MustDo(t, "dial 12")
	ev, _ := next(t, events, 5*time.Second, isAcceptOverflow("app_not_accepting", culpritv1.FindingEvent_TYPE_OPENED))
	f := ev.Finding
	// The thread is named once its stack is symbolized: at once, or in
	// an update a moment later (the first look at a binary parses it).
	if !strings.Contains(f.RootCause, "worker-0") {
		ev, _ = next(t, events, 3*time.Second, func(ev *culpritv1.FindingEvent) bool {
			return ev.Finding != nil && ev.Finding.Rule == "accept_overflow" && strings.Contains(ev.Finding.RootCause, "worker-0")
		})
		f = ev.Finding
	}
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if !strings.Contains(f.RootCause, "nanosleep") || !strings.Contains(f.RootCause, "faults.BlockingCall") {
		t.Errorf("root cause does not name the stalled thread and call: %s", f.RootCause)
	}
	if !artifact(f, "frame", "faults.BlockingCall") || !artifact(f, "stack", "do_nanosleep") {
		t.Errorf("artifacts: %+v", f.Artifacts)
	}
}

// Each accepted connection waits 300 ms for a slot of a bounded pool (a
// channel: the thread sleeps in futex) before the next accept: clients
// queue in the accept queue while the process uses almost no CPU. The
// finding says the service waits rather than works, and names futex.
func TestThroughputPlateauFinding(t *testing.T) {
	w := testenv.StartWorkersNetns(t, 2)
	var port int
	if _, err := fmt.Sscanf(w.MustDo(t, "listen 64"), "ok port %d", &port); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, w.PID)
	cfg.Rules.ThroughputPlateau.Window = time.Duration(3 * time.Second)
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, port)
	events, _ := watch(t, c, 0)
	w.MustDo(t, "pool 300")
	w.MustDo(t, "dial 30")
	ev, skipped := next(t, events, 10*time.Second, openedBy("throughput_plateau"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if f.Cause != "waiting_not_working" || !strings.Contains(f.Title, "futex") {
		t.Errorf("finding %s: %s", f.Cause, f.Title)
	}
	for _, s := range skipped {
		if s.Finding != nil && s.Finding.Rule == "accept_overflow" {
			t.Errorf("a queue under its backlog raised accept_overflow: %s", s.Finding.Title)
		}
	}
}
