package faults

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// childEnv makes the test binary a child that runs one scenario of this
// file (see TestMain) instead of the tests.
const childEnv = "CULPRIT_FAULTS_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(childEnv) {
	case "gc-under-spin":
		os.Exit(gcUnderSpin())
	}
	os.Exit(m.Run())
}

// gcUnderSpin spins worker-0 without end and keeps worker-1 busy 80% in
// short runs (the demo's spin-worker and imbalance faults), then collects
// garbage 30 times, each a stop-the-world, and prints how many times
// worker-0 slept meanwhile and its CPU time. A child of its own: the
// faults want GODEBUG=asyncpreemptoff=1, which the test process does not
// run with.
func gcUnderSpin() int {
	w := StartWorkers(2, "worker")
	spin := w.NewGroup(0)
	spin.HotLoopUntilStop(0)
	w.Duty(1, 80)
	time.Sleep(200 * time.Millisecond) // both are on their CPU
	sw0, cpu0, err := threadStats(w.TIDs[0])
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	start := time.Now()
	var keep [][]byte
	for range 30 {
		keep = append(keep, make([]byte, 4<<20))
		runtime.GC()
	}
	elapsed := time.Since(start)
	sw1, cpu1, err := threadStats(w.TIDs[0])
	if err != nil {
		fmt.Println("error:", err)
		return 1
	}
	spin.Stop()
	w.Stop()
	fmt.Printf("ok %d GCs in %s: spinning worker slept %d times, on CPU %s\n", len(keep), elapsed.Round(time.Millisecond), sw1-sw0, cpu1-cpu0)
	return 0
}

// threadStats reads a thread of this process: how many times it went to
// sleep (voluntary context switches) and its time on the CPU.
func threadStats(tid int) (sleeps int, oncpu time.Duration, err error) {
	dir := "/proc/self/task/" + strconv.Itoa(tid)
	b, err := os.ReadFile(dir + "/status")
	if err != nil {
		return 0, 0, fmt.Errorf("read thread status: %w", err)
	}
	for l := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
			if sleeps, err = strconv.Atoi(strings.TrimSpace(v)); err != nil {
				return 0, 0, fmt.Errorf("parse %q: %w", l, err)
			}
		}
	}
	b, err = os.ReadFile(dir + "/schedstat")
	if err != nil {
		return 0, 0, fmt.Errorf("read thread schedstat: %w", err)
	}
	ns, err := strconv.ParseInt(strings.Fields(string(b))[0], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("parse schedstat %q: %w", b, err)
	}
	return sleeps, time.Duration(ns), nil
}

// A worker spinning in HotLoop, with asynchronous preemption off as in
// the demo, does not hold up the garbage collector's stop-the-world: 30
// collections finish. Before, the first one waited for the loop forever
// and the process hung. Without -race the spinning thread does not even
// sleep meanwhile: it stays one busy run.
func TestHotLoopLetsTheWorldStop(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"=gc-under-spin", "GODEBUG=asyncpreemptoff=1", "GOMAXPROCS=8")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the child hung (30 s): a stop-the-world waits for the spinning worker\n%s", out)
	}
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	line := strings.TrimSpace(string(out))
	t.Log(line)
	var gcs, sleeps int
	var took, oncpu string
	if _, err := fmt.Sscanf(line, "ok %d GCs in %s spinning worker slept %d times, on CPU %s", &gcs, &took, &sleeps, &oncpu); err != nil {
		t.Fatalf("unexpected child output %q: %v", line, err)
	}
	cpu, err := time.ParseDuration(oncpu)
	if err != nil {
		t.Fatalf("child's CPU time %q: %v", oncpu, err)
	}
	if cpu < 10*time.Millisecond {
		t.Errorf("the worker did not spin during the collections: %s on CPU", cpu)
	}
	if !SleepsInStopTheWorld && sleeps > 0 {
		t.Errorf("the spinning worker slept %d times during the collections; want none (one busy run)", sleeps)
	}
}

// Groups stop apart: a fault's loops end with its group, or with the
// pool, and a group's time counts from its first task.
func TestGroupsStopApart(t *testing.T) {
	w := StartWorkers(2, "worker")
	defer w.Stop()
	var a, b atomic.Int64
	ga, gb := w.NewGroup(0), w.NewGroup(0)
	ga.Loop(0, func() { a.Add(1); time.Sleep(time.Millisecond) })
	gb.Loop(1, func() { b.Add(1); time.Sleep(time.Millisecond) })
	waitFor(t, "both groups run", func() bool { return a.Load() > 0 && b.Load() > 0 })
	ga.Stop()
	time.Sleep(20 * time.Millisecond) // a task of a may have been running
	na := a.Load()
	nb := b.Load()
	waitFor(t, "group b runs on after a stopped", func() bool { return b.Load() > nb+5 })
	if a.Load() != na {
		t.Errorf("group a ran on after its Stop: %d -> %d", na, a.Load())
	}
	w.Stop()
	time.Sleep(20 * time.Millisecond)
	nb = b.Load()
	time.Sleep(50 * time.Millisecond)
	if b.Load() != nb {
		t.Errorf("group b ran on after the pool's Stop: %d -> %d", nb, b.Load())
	}

	// A timed group behind a busy worker: its time starts with its task.
	w2 := StartWorkers(1, "timed")
	defer w2.Stop()
	block := make(chan struct{})
	w2.Submit(0, func() { <-block })
	var ran atomic.Int64
	g := w2.NewGroup(100 * time.Millisecond)
	g.Loop(0, func() { ran.Add(1); time.Sleep(time.Millisecond) })
	time.Sleep(200 * time.Millisecond) // longer than the group's time
	close(block)
	waitFor(t, "the timed group runs once its worker is free", func() bool { return ran.Load() > 0 })
	waitFor(t, "the timed group stops after its time", func() bool {
		n := ran.Load()
		time.Sleep(20 * time.Millisecond)
		return ran.Load() == n
	})
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
