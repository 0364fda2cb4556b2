package main

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
)

// Without BPF rights the agent keeps running on procfs and netlink, says
// once what it lost, reports the probe failed in GetSnapshot, and still
// names an accept-queue stall. The real binary runs with CAP_BPF,
// CAP_PERFMON and CAP_SYS_ADMIN removed from its bounding set by setpriv.
func TestAgentWithoutBPFRights(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to drop capabilities from")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatal("setpriv (util-linux) missing")
	}
	bin := culpritBinary(t)
	s := testenv.Start(t, testenv.Options{Backlog: 4, Accept: false, SharedNetns: true})
	a := testenv.StartAgent(t, testenv.AgentOptions{Bin: bin, Args: []string{"--pid", strconv.Itoa(s.PID)},
		Wrap: []string{setpriv, "--bounding-set", "-bpf,-perfmon,-sys_admin", "--inh-caps=-all", "--"}})
	c := client(t, a.GRPCAddr)
	waitWatching(t, c, s.Port)
	snap, err := c.GetSnapshot(context.Background(), &culpritv1.SnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var probe *culpritv1.ComponentStatus
	for _, cs := range snap.Components {
		if cs.Name == "tcplisten" {
			probe = cs
		}
	}
	if probe == nil || probe.State != "failed" || len(probe.Lost) == 0 {
		t.Fatalf("snapshot does not report the probe failed with what is lost: %+v", probe)
	}
	// What is lost is worked out from the rules' needs: each line names a
	// rule that runs (a hand-written list once named one that did not).
	registered := map[string]bool{}
	for _, r := range rules.New(rules.DefaultOptions(), time.Second) {
		registered[r.Name()] = true
	}
	for _, l := range probe.Lost {
		if rule, _, _ := strings.Cut(l, ": "); !registered[rule] {
			t.Errorf("lost %q names no registered rule", l)
		}
	}
	var warned []string
	for deadline := time.Now().Add(5 * time.Second); len(warned) == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		warned = a.LogLines("eBPF probe unavailable")
	}
	switch {
	case len(warned) == 0:
		t.Error("no warning in the log about the missing probe")
	case !strings.Contains(warned[0], "lost="):
		t.Errorf("warning does not say what is lost: %s", warned[0])
	}

	events, _ := watch(t, c, 0)
	s.MustDo(t, "dialasync 30")
	ev, _ := next(t, events, 5*time.Second, isAcceptOverflow("", culpritv1.FindingEvent_TYPE_OPENED))
	if ev.Finding.Cause != "app_not_accepting" {
		t.Fatalf("cause = %s without eBPF, want app_not_accepting: %s", ev.Finding.Cause, ev.Finding.RootCause)
	}
	if !strings.Contains(ev.Finding.RootCause, "accept counts unavailable without the sockcalls eBPF probe") {
		t.Errorf("root cause does not say it inferred without eBPF: %s", ev.Finding.RootCause)
	}
}
