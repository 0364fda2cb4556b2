package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/signals"
)

// The text form a person scans: a full block when a finding opens or
// changes cause, one line when only its numbers move, a short line when it
// resolves.
func TestFindingPrinterText(t *testing.T) {
	var b bytes.Buffer
	p := &findingPrinter{w: &b}
	ts := timestamppb.New(time.Unix(1000, 0))
	f := &culpritv1.Finding{Id: "x", Rule: "accept_overflow", Title: "Accept queue of :8080 overflowing", Cause: "app_not_accepting",
		Severity: culpritv1.Severity_SEVERITY_CRITICAL, Symptom: "12 dropped", RootCause: "queue full", Remediation: "move blocking calls",
		FirstSeen: ts, Evidence: []*culpritv1.Evidence{{Signal: signals.ListenOverflowsTotal.Name, Value: 12, Unit: "connections", Threshold: 1}}}
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Sequence: 1, Time: ts, Finding: f})
	f2 := proto.Clone(f).(*culpritv1.Finding)
	f2.Symptom = "20 dropped"
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_UPDATED, Sequence: 2, Time: ts, Finding: f2})
	f3 := proto.Clone(f2).(*culpritv1.Finding)
	f3.Resolved = timestamppb.New(time.Unix(1005, 0))
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_RESOLVED, Sequence: 3, Time: ts, Finding: f3})
	out := b.String()
	for _, want := range []string{"OPENED   critical accept_overflow", "cause:   queue full (app_not_accepting", "evidence: listen_overflows_total = 12 connections (threshold 1 connection)",
		"fix:     move blocking calls", "UPDATED  critical accept_overflow  20 dropped  [#2]", "RESOLVED", "resolved after 5s"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Count(out, "fix:") != 1 {
		t.Errorf("a numbers-only update repeated the whole block:\n%s", out)
	}
	if len(p.shown) != 0 {
		t.Errorf("printer still remembers %d resolved findings", len(p.shown))
	}
}

// Evidence values read in human units by their unit, never as float
// noise; --json keeps the exact numbers.
func TestFindingPrinterEvidenceUnits(t *testing.T) {
	ts := timestamppb.New(time.Unix(1000, 0))
	f := &culpritv1.Finding{Id: "y", Rule: "heap_leak", Title: "t", Cause: "heap_leak", Severity: culpritv1.Severity_SEVERITY_WARNING, FirstSeen: ts,
		Evidence: []*culpritv1.Evidence{
			{Signal: signals.HeapInuseBytes.Name, Value: 4.8943905e+07, Unit: "bytes", Threshold: 33554432, Window: durationpb.New(15 * time.Second)},
			{Signal: signals.HeapInuseBytes.Name, Value: 503316480, Unit: "bytes/min"},
			{Signal: signals.CgroupCPUUsageSecondsTotal.Name, Value: 0.06383225810000001, Unit: "cores"},
			{Signal: signals.ThreadBlockedSeconds.Name, Value: 0.27, Unit: "seconds", Threshold: 0.25},
			{Signal: "share", Value: 0.9, Unit: "ratio", Threshold: 0.2},
			{Signal: "p99 now / p99 before", Value: 3.24, Unit: "ratio", Threshold: 3},
			{Signal: "drops", Value: 1, Unit: "connections"},
			{Signal: "fds", Value: 2400.5, Unit: "fds/min"},
			{Signal: "kills", Value: 1, Unit: "kills"},
			{Signal: "addrs", Value: 1, Unit: "addresses"},
			{Signal: "sigterm", Value: 12.34, Unit: "seconds since"},
		}}
	var b bytes.Buffer
	p := &findingPrinter{w: &b}
	p.finding(f)
	out := b.String()
	for _, want := range []string{
		"heap_inuse_bytes = 46.7 MiB over 15 s (threshold 32 MiB)",
		"heap_inuse_bytes = 480 MiB/min",
		"cgroup_cpu_usage_seconds_total = 0.064 cores",
		"thread_blocked_seconds = 270 ms (threshold 250 ms)",
		"share = 90% (threshold 20%)",
		"p99 now / p99 before = 3.24× (threshold 3×)",
		"drops = 1 connection\n",
		"fds = 2400 fds/min", // whole from 1000 on
		"kills = 1 kill\n",
		"addrs = 1 address\n",
		"sigterm = 12.3 s since",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "e+") || strings.Contains(out, "000000") {
		t.Errorf("float noise:\n%s", out)
	}
	b.Reset()
	(&findingPrinter{w: &b, json: true}).finding(f)
	for _, exact := range []string{`"value":48943905`, `"value":0.06383225810000001`} {
		if !strings.Contains(b.String(), exact) {
			t.Errorf("--json lacks %s: %s", exact, b.String())
		}
	}
}

// The CLI reaches an agent whose API needs a token, with --token-file or
// CULPRIT_TOKEN, and says why when it has none.
func TestCLIWithToken(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: true})
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte("a-token-of-sixteen-chars\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t, s.PID)
	cfg.Agent.TokenFile = tokenFile
	a := startAgentConfig(t, cfg)
	var out, errb bytes.Buffer
	if code := run([]string{"snapshot", "--addr", a.GRPCAddr, "--token-file", tokenFile}, &out, &errb); code != 0 || !strings.Contains(out.String(), "target:") {
		t.Fatalf("with --token-file: exit %d\n%s%s", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	if code := run([]string{"snapshot", "--addr", a.GRPCAddr}, &out, &errb); code == 0 || !strings.Contains(errb.String(), "Unauthenticated") {
		t.Errorf("without a token: exit %d, %q", code, errb.String())
	}
	t.Setenv("CULPRIT_TOKEN", "a-token-of-sixteen-chars")
	errb.Reset()
	if code := run([]string{"snapshot", "--addr", a.GRPCAddr}, &out, &errb); code != 0 {
		t.Errorf("with CULPRIT_TOKEN: exit %d, %q", code, errb.String())
	}
}

func TestFindingsTable(t *testing.T) {
	now := time.Unix(2000, 0)
	fs := []*culpritv1.Finding{
		{Rule: "close_wait", Cause: "close_wait_leak", Title: "CLOSE_WAIT leak on local port 8080", Severity: culpritv1.Severity_SEVERITY_WARNING,
			State: culpritv1.FindingState_FINDING_STATE_OPEN, FirstSeen: timestamppb.New(now.Add(-90 * time.Second))},
		{Rule: "accept_overflow", Cause: "app_not_accepting", Title: strings.Repeat("x", 150), Severity: culpritv1.Severity_SEVERITY_CRITICAL,
			State: culpritv1.FindingState_FINDING_STATE_OPEN, FirstSeen: timestamppb.New(now.Add(-5 * time.Second))},
	}
	var b bytes.Buffer
	printTable(&b, fs, now)
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "SEVERITY") {
		t.Fatalf("table:\n%s", b.String())
	}
	if !strings.HasPrefix(lines[1], "critical") || !strings.Contains(lines[1], "5s") || !strings.HasSuffix(lines[1], "...") || len(lines[1]) > 200 {
		t.Errorf("most severe first, titles cut: %q", lines[1])
	}
	if !strings.HasPrefix(lines[2], "warning") || !strings.Contains(lines[2], "1m30s") || !strings.Contains(lines[2], "close_wait_leak") {
		t.Errorf("second row %q", lines[2])
	}
	// Columns line up: FINDING starts at the same offset on every row.
	col := strings.Index(lines[0], "FINDING")
	for _, l := range lines[1:] {
		if len(l) <= col || l[col-1] != ' ' || l[col] == ' ' {
			t.Errorf("row not aligned at %d: %q", col, l)
		}
	}
}

// Flags that contradict each other are refused with what to do, before
// any connection is tried; --version answers like version.
func TestCLIFlagsThatConflict(t *testing.T) {
	for _, args := range [][]string{
		{"findings", "--json", "--table"},
		{"findings", "--table", "--follow"},
		{"findings", "stray"},
	} {
		var out, errb strings.Builder
		code := run(append(args, "--addr", "127.0.0.1:1"), &out, &errb)
		if code == 0 || !strings.Contains(errb.String(), "findings: ") || strings.Contains(errb.String(), "connection refused") {
			t.Errorf("%v: exit %d, %q", args, code, errb.String())
		}
	}
	for _, v := range []string{"version", "--version"} {
		var out, errb strings.Builder
		if code := run([]string{v}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "culprit ") || !strings.Contains(out.String(), "go1.") {
			t.Errorf("%s: exit %d, %q", v, code, out.String())
		}
	}
}
