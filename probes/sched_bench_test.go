package probes

import (
	"context"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

// pingPong hands a token between two locked OS threads n times: each
// handoff wakes a sleeping thread (sched_wakeup) and switches it in
// (sched_switch), the events the sched probe handles for its target.
func pingPong(n int) {
	ping, pong := make(chan struct{}), make(chan struct{})
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for range ping {
			pong <- struct{}{}
		}
		close(done)
	}()
	runtime.LockOSThread()
	for range n {
		ping <- struct{}{}
		<-pong
	}
	runtime.UnlockOSThread()
	close(ping)
	<-done
}

// BenchmarkSchedProbe measures what the sched probe costs the target: one
// op is one round trip between two threads of this process (two wake-ups,
// four context switches). "baseline" runs without the probe, "target" with
// the probe watching this process, "other" with the probe watching another
// process (the cost every switch on the machine pays for the tgid filter).
// Compare ns/op against baseline in the same run; events/s is the rate of
// target switches the probe handled; probe-cpu-% is the agent-side CPU
// (this process's CPU beyond the baseline's, per wall second).
func BenchmarkSchedProbe(b *testing.B) {
	var baseCPU float64
	for _, mode := range []string{"baseline", "target", "other"} {
		b.Run(mode, func(b *testing.B) {
			st := signals.New(64, 4096)
			if mode != "baseline" {
				pid := os.Getpid()
				if mode == "other" {
					pid = 1
				}
				startBenchProbe(b, pid, st)
			}
			pingPong(1000) // warm up
			cpu0, t0 := cpuSeconds(), time.Now()
			b.ResetTimer()
			pingPong(b.N)
			b.StopTimer()
			wall := time.Since(t0).Seconds()
			cpu := (cpuSeconds() - cpu0) / wall
			if mode == "baseline" {
				baseCPU = cpu
			}
			b.ReportMetric(float64(b.N)*4/wall, "switches/s")
			b.ReportMetric(100*(cpu-baseCPU), "probe-cpu-%")
		})
	}
}

func startBenchProbe(b *testing.B, pid int, st *signals.Store) {
	b.Helper()
	res, err := target.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tr := target.NewTracker(res, target.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	p := NewSched(SchedOptions{Options: Options{Log: testLog, PollInterval: 100 * time.Millisecond, RingBufferBytes: 1 << 16}, MaxThreads: 4096, MaxStacks: 4096})
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, st); err != nil {
		cancel()
		b.Skipf("SKIP: sched probe does not load here: %v", err)
	}
	b.Cleanup(func() { cancel(); p.Close() })
	time.Sleep(300 * time.Millisecond) // the target is set at the first poll
}

func cpuSeconds() float64 {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru) // cannot fail for RUSAGE_SELF
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}
