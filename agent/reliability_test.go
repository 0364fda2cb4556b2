package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// startNamed runs `sleep` under a recognisable process name.
func startNamed(t *testing.T, name string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("bash", "-c", "exec -a "+name+" sleep 300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func snapshotPID(t *testing.T, c culpritv1.DiagnosticsClient) int {
	s, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil || s.Target == nil || !s.Target.Found {
		return 0
	}
	return int(s.Target.Pid)
}

// The target (chosen by command line) restarts under a new PID: the agent
// watches the new process within a second.
func TestTargetRefoundWithinOneSecond(t *testing.T) {
	name := fmt.Sprintf("culprit-reliability-%d", os.Getpid())
	first := startNamed(t, name)
	cfg := testConfig(t, 0)
	cfg.Target.PID = 0
	cfg.Target.Cmd = "^" + name + `\b`
	a := startAgentConfig(t, cfg)
	c := client(t, a.GRPCAddr)
	deadline := time.Now().Add(5 * time.Second)
	for snapshotPID(t, c) != first.Process.Pid {
		if time.Now().After(deadline) {
			t.Fatalf("first target never found")
		}
		time.Sleep(20 * time.Millisecond)
	}
	first.Process.Kill()
	first.Wait()
	second := startNamed(t, name)
	start := time.Now()
	for snapshotPID(t, c) != second.Process.Pid {
		if time.Since(start) > time.Second {
			t.Fatalf("restarted target (pid %d) not found within 1 s (agent has %d)", second.Process.Pid, snapshotPID(t, c))
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("re-found in %s", time.Since(start).Round(time.Millisecond))
}

// TestSoak runs a real agent against a server under steady load and fault
// cycles for CULPRIT_SOAK (e.g. 10m; `make reliability` sets it) and fails
// if its goroutines or live heap grow from the first to the last part of
// the run. Without CULPRIT_SOAK it is skipped, saying so.
func TestSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("CULPRIT_SOAK"))
	if err != nil || d <= 0 {
		fmt.Fprintln(os.Stderr, "SKIP: TestSoak runs only with CULPRIT_SOAK=<duration> (make reliability)")
		t.Skip("CULPRIT_SOAK not set")
	}
	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: true})
	a := startAgent(t, s.PID)
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	events, _ := watch(t, c, 0)
	go func() {
		for range events { // a watcher that keeps up
		}
	}()
	type point struct {
		goroutines int
		heap       uint64
	}
	measure := func() point {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return point{runtime.NumGoroutine(), ms.HeapInuse}
	}
	var points []point
	end := time.Now().Add(d)
	step := max(d/40, time.Second)
	cycle := 0
	for time.Now().Before(end) {
		// Load, and now and then a fault that opens and resolves findings.
		s.MustDo(t, "burst 50")
		if cycle%10 == 5 {
			s.MustDo(t, "accept off")
			s.MustDo(t, "dialasync 20")
		}
		if cycle%10 == 7 {
			s.MustDo(t, "accept on")
			s.MustDo(t, "close")
		}
		cycle++
		time.Sleep(step)
		points = append(points, measure())
	}
	n := len(points) / 4
	if n < 2 {
		t.Fatalf("too few measurements (%d): CULPRIT_SOAK too short", len(points))
	}
	avg := func(ps []point) (float64, float64) {
		var g, h float64
		for _, p := range ps {
			g += float64(p.goroutines)
			h += float64(p.heap)
		}
		return g / float64(len(ps)), h / float64(len(ps))
	}
	g0, h0 := avg(points[n : 2*n]) // after warm-up
	g1, h1 := avg(points[len(points)-n:])
	t.Logf("soak %s, %d cycles: goroutines %.0f -> %.0f, heap in use %.1f -> %.1f MiB", d, cycle, g0, g1, h0/(1<<20), h1/(1<<20))
	if g1 > g0*1.1+5 {
		t.Errorf("goroutines grew: %.0f -> %.0f", g0, g1)
	}
	if h1 > h0*1.3+4<<20 {
		t.Errorf("heap grew: %.1f -> %.1f MiB", h0/(1<<20), h1/(1<<20))
	}
	snap, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var bad []string
	for _, cs := range snap.Components {
		if cs.State == "failed" || cs.State == "degraded" {
			bad = append(bad, cs.Name+": "+cs.Detail)
		}
	}
	if len(bad) > 0 {
		t.Errorf("components not running after the soak: %s", strings.Join(bad, "; "))
	}
}
