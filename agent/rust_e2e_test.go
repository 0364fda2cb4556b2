package main

import (
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// rustScenario runs the Rust worker (threads named as Tokio names them)
// in mode and a real agent watching it.
func rustScenario(t *testing.T, args ...string) <-chan *culpritv1.FindingEvent {
	t.Helper()
	w := testenv.StartRustWorker(t, testenv.BuildRustWorker(t), args...)
	cfg := testConfig(t, w.PID)
	cfg.Rules.BlockingWorker.Window = time.Duration(4 * time.Second)
	cfg.Rules.BusyWorker.Window = time.Duration(4 * time.Second)
	a := startAgentConfig(t, cfg)
	events, _ := watch(t, client(t, a.GRPCAddr), 0)
	return events
}

// The seeds' main case on a real Rust binary: a Tokio-named worker blocks
// in a synchronous call into the C library. The finding names the Rust
// function that made the call, demangled; the eBPF frame-pointer walk
// alone loses it (libc has no frame pointers), the probe's copy of the
// stack top unwound by .eh_frame brings it back.
func TestRustBlockingWorkerFinding(t *testing.T) {
	events := rustScenario(t, "block", "700")
	ev, skipped := next(t, events, 15*time.Second, openedBy("blocking_worker"))
	f := ev.Finding
	t.Logf("%s\n  %s", f.Title, f.RootCause)
	if !strings.Contains(f.Title, "tokio-runtime-w") || !strings.Contains(f.Title, "nanosleep") {
		t.Errorf("title %q does not name the worker and the call", f.Title)
	}
	if !artifact(f, "frame", "rustworker::save_session") || !strings.Contains(f.Remediation, "rustworker::save_session") {
		t.Errorf("finding does not name rustworker::save_session: %s %+v", f.Remediation, f.Artifacts)
	}
	// save_session calls libc's usleep, which calls nanosleep: neither has
	// frame pointers, so the walk alone skips save_session; the frames
	// unwound by .eh_frame put both back, in order.
	if !artifact(f, "stack", "usleep\nrustworker::save_session\n") && !artifact(f, "stack", "usleep\nrustworker::save_session") {
		t.Errorf("stack lacks usleep -> rustworker::save_session: %+v", f.Artifacts)
	}
	for _, s := range skipped {
		if s.Finding != nil && s.Finding.Rule == "busy_worker" {
			t.Errorf("a blocking worker raised busy_worker: %s", s.Finding.Title)
		}
	}
}

// A Tokio-named worker that never yields: busy_worker names the hot Rust
// function from the CPU profile.
func TestRustBusyWorkerFinding(t *testing.T) {
	events := rustScenario(t, "spin")
	ev, _ := next(t, events, 15*time.Second, openedBy("busy_worker"))
	f := ev.Finding
	deadline := time.After(10 * time.Second)
	for !artifact(f, "frame", "rustworker::checksum") {
		select {
		case ev := <-events:
			if ev.Finding != nil && ev.Finding.Rule == "busy_worker" {
				f = ev.Finding
			}
		case <-deadline:
			t.Fatalf("the finding never named rustworker::checksum: %s %+v", f.RootCause, f.Artifacts)
		}
	}
	t.Logf("%s\n  %s", f.Title, f.RootCause)
}

// Idle Tokio-named workers park in futex: no worker finding.
func TestRustIdleWorkersSilent(t *testing.T) {
	events := rustScenario(t, "idle")
	deadline := time.After(6 * time.Second)
	for {
		select {
		case ev := <-events:
			if ev.Finding != nil && strings.Contains(ev.Finding.Rule, "worker") {
				t.Fatalf("idle workers raised %s: %s", ev.Finding.Rule, ev.Finding.Title)
			}
		case <-deadline:
			return
		}
	}
}
