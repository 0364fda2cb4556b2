package probes

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"syscall"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// A target that restarts is watched from the moment the tracker finds
// it: a SIGTERM 50 ms after the restart is counted, although the probe's
// polls had slowed to one a second (they used to retarget only at the
// next poll, and missed it). Real processes, real signals, real eBPF.
func TestProcSignalsRetargetsAtOnce(t *testing.T) {
	name := fmt.Sprintf("culprit-procsignals-%d", os.Getpid())
	startNamed := func() *exec.Cmd {
		// SIGTERM ignored (kept across exec): the signal is generated
		// and counted, the process stays.
		cmd := exec.Command("bash", "-c", `trap "" TERM; exec -a `+name+` sleep 300`)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	first := startNamed()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{Cmd: regexp.MustCompile("^" + name + `\b`)}, time.Second, testLog)
	// found refreshes the tracker until it watches cmd.
	found := func(cmd *exec.Cmd) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			tr.Refresh()
			if cur, ok := tr.Current(); ok && cur.PID == cmd.Process.Pid {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("target (pid %d) not found", cmd.Process.Pid)
			}
		}
	}
	found(first)
	store := signals.New(64, 64)
	p := NewProcSignals(Options{Log: testLog, PollInterval: 100 * time.Millisecond, IdlePollInterval: time.Second})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if err := p.Start(ctx, tr, store); err != nil {
		t.Fatalf("procsignals does not load here: %v", err)
	}
	defer p.Close()
	time.Sleep(2500 * time.Millisecond) // quiet: the polls slow to 1 s apart

	first.Process.Kill()
	first.Wait()
	second := startNamed()
	found(second)
	time.Sleep(50 * time.Millisecond)
	if err := syscall.Kill(second.Process.Pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	ls := signals.L("signal", "SIGTERM")
	deadline := time.Now().Add(3 * time.Second)
	for {
		if s, ok := store.Latest(signals.ProcessSignalsTotal, ls); ok && s.V == 1 {
			return
		}
		if time.Now().After(deadline) {
			s, ok := store.Latest(signals.ProcessSignalsTotal, ls)
			t.Fatalf("the SIGTERM 50 ms after the restart was not counted: %s = %v (%v)", signals.ProcessSignalsTotal.Name, s.V, ok)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
