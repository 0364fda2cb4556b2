package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
)

// The text form a person scans: a full block when a finding opens or
// changes cause, one line when only its numbers move, a short line when it
// resolves.
func TestFindingPrinterText(t *testing.T) {
	var b bytes.Buffer
	p := &findingPrinter{w: &b}
	ts := timestamppb.New(time.Unix(1000, 0))
	f := &culpritv1.Finding{Id: "x", Rule: "accept_overflow", Title: "accept queue of :8080 overflowing", Cause: "app_not_accepting",
		Severity: culpritv1.Severity_SEVERITY_CRITICAL, Symptom: "12 dropped", RootCause: "queue full", Remediation: "move blocking calls",
		FirstSeen: ts, Evidence: []*culpritv1.Evidence{{Signal: "listen_overflows_total", Value: 12, Unit: "connections", Threshold: 1}}}
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_OPENED, Sequence: 1, Time: ts, Finding: f})
	f2 := proto.Clone(f).(*culpritv1.Finding)
	f2.Symptom = "20 dropped"
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_UPDATED, Sequence: 2, Time: ts, Finding: f2})
	f3 := proto.Clone(f2).(*culpritv1.Finding)
	f3.Resolved = timestamppb.New(time.Unix(1005, 0))
	p.event(&culpritv1.FindingEvent{Type: culpritv1.FindingEvent_TYPE_RESOLVED, Sequence: 3, Time: ts, Finding: f3})
	out := b.String()
	for _, want := range []string{"OPENED   critical accept_overflow", "cause:   queue full (app_not_accepting", "evidence: listen_overflows_total = 12 connections (threshold 1)",
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
