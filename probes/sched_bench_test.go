package probes

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
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

// epollPingPong is pingPong between two event loops: each thread sleeps
// in epoll_wait on an eventfd of its own and wakes the other by writing to
// the other's. Event loops (nginx's workers, tokio's) sleep so, in a call
// the probe takes as their idle wait (quiet_calls), from the same site
// every time: the path where the probe reuses the stacks it took at that
// site rather than walking them again (bpf/sched.c same_site).
func epollPingPong(b *testing.B, n int) {
	type loop struct{ ep, ev int }
	mk := func() loop {
		ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil {
			b.Fatal(err)
		}
		ev, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			b.Fatal(err)
		}
		if err := unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, ev, &unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(ev)}); err != nil {
			b.Fatal(err)
		}
		return loop{ep, ev}
	}
	a, c := mk(), mk()
	defer func() {
		for _, fd := range []int{a.ep, a.ev, c.ep, c.ev} {
			unix.Close(fd)
		}
	}()
	one := []byte{1, 0, 0, 0, 0, 0, 0, 0}
	// wait sleeps in epoll_wait until its eventfd is written, then drains it.
	wait := func(l loop) {
		var evs [1]unix.EpollEvent
		var buf [8]byte
		for {
			if k, err := unix.EpollWait(l.ep, evs[:], -1); k == 1 || (err != nil && err != unix.EINTR) {
				break
			}
		}
		unix.Read(l.ev, buf[:])
	}
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		for range n {
			wait(c)
			unix.Write(a.ev, one)
		}
		close(done)
	}()
	runtime.LockOSThread()
	for range n {
		unix.Write(c.ev, one)
		wait(a)
	}
	runtime.UnlockOSThread()
	<-done
}

// yieldPingPong has two threads of this process share one CPU, each
// calling sched_yield n times: every yield switches a thread out while it
// is still runnable and the other in, the path a preempted worker takes
// (bpf/sched.c counts it involuntary and times its wait for the CPU).
// nginx's workers flat out are switched so ~5,000 times a second, ten times
// as often as they sleep. It skips when this thread cannot be pinned.
func yieldPingPong(b *testing.B, n int) {
	var set unix.CPUSet
	set.Set(runtime.NumCPU() - 1)
	pin := func() error {
		runtime.LockOSThread()
		return unix.SchedSetaffinity(0, &set)
	}
	stop := make(chan struct{})
	ready, done := make(chan error), make(chan struct{})
	go func() {
		defer close(done)
		defer runtime.UnlockOSThread()
		err := pin()
		ready <- err
		if err != nil {
			return
		}
		for {
			select {
			case <-stop:
				return
			default:
				unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
			}
		}
	}()
	if err := <-ready; err != nil {
		b.Skipf("SKIP: cannot pin a thread to CPU %d: %v", runtime.NumCPU()-1, err)
	}
	err := pin()
	if err == nil {
		for range n {
			unix.Syscall(unix.SYS_SCHED_YIELD, 0, 0, 0)
		}
		// Back on every CPU before the thread is given back to the runtime.
		var all unix.CPUSet
		for i := range runtime.NumCPU() {
			all.Set(i)
		}
		unix.SchedSetaffinity(0, &all)
	}
	runtime.UnlockOSThread()
	close(stop)
	<-done
	if err != nil {
		b.Skipf("SKIP: cannot pin a thread to CPU %d: %v", runtime.NumCPU()-1, err)
	}
}

// BenchmarkSchedProbe measures what the sched probe costs the target: one
// op is one round trip between two threads of this process (two wake-ups,
// four context switches). "baseline" runs without the probe, "target" with
// the probe watching this process, "other" with the probe watching another
// process (the cost every switch on the machine pays for the tgid filter),
// and "runqlat" and "offcputime" with libbpf-tools' tools of those names
// watching this process (-p) instead: what an established eBPF tool costs
// the same round trip. Compare ns/op against baseline in the same run;
// switches/s is the rate of the target's switches. bpf-ns/op is the run
// time the kernel counted (BPF stats) for every eBPF program on the
// machine during the run, per round trip: the probe's own cost, which the
// wall time of a round trip (two threads on two CPUs) shows only blurred.
// The "epoll" modes do the same round trip between two event loops
// (epollPingPong): "epoll-baseline" without the probe, "epoll-target"
// with it watching them, sleeps in epoll_wait being their idle waits.
// The "yield" modes are one sched_yield of two threads sharing a CPU
// (yieldPingPong): two switches of runnable threads, a preemption's path.
// This process's CPU per wall second is no measure of it: a slower round
// trip leaves the CPUs idle longer, so it came out below the baseline's.
func BenchmarkSchedProbe(b *testing.B) {
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	statsOn := err == nil
	if !statsOn {
		b.Logf("SKIP bpf-ns/op: BPF run-time stats (needs CAP_SYS_ADMIN): %v", err)
	} else {
		defer stats.Close()
	}
	for _, mode := range []string{"baseline", "target", "other", "runqlat", "offcputime", "epoll-baseline", "epoll-target", "yield-baseline", "yield-target"} {
		b.Run(mode, func(b *testing.B) {
			st := signals.New(64, 4096)
			trip, switches := pingPong, 4.0
			switch mode {
			case "epoll-baseline", "epoll-target":
				trip = func(n int) { epollPingPong(b, n) }
				if mode == "epoll-target" {
					startBenchProbe(b, os.Getpid(), st, "epoll_wait", "epoll_pwait")
				}
			case "yield-baseline", "yield-target":
				trip, switches = func(n int) { yieldPingPong(b, n) }, 2
				if mode == "yield-target" {
					startBenchProbe(b, os.Getpid(), st)
				}
			case "baseline":
			case "runqlat", "offcputime":
				startLibbpfTool(b, mode, os.Getpid())
			default:
				pid := os.Getpid()
				if mode == "other" {
					pid = 1
				}
				startBenchProbe(b, pid, st)
			}
			trip(1000) // warm up
			bpf0, t0 := bpfRuntime(b), time.Now()
			b.ResetTimer()
			trip(b.N)
			b.StopTimer()
			wall := time.Since(t0).Seconds()
			b.ReportMetric(float64(b.N)*switches/wall, "switches/s")
			if statsOn {
				b.ReportMetric(float64(bpfRunSince(b, bpf0))/float64(b.N), "bpf-ns/op")
			}
		})
	}
}

// startBenchProbe runs the sched probe on pid, with quiet (idle) calls.
func startBenchProbe(b *testing.B, pid int, st *signals.Store, quiet ...string) {
	b.Helper()
	res, err := workload.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	p := NewSched(SchedOptions{Options: Options{Log: testLog, PollInterval: 100 * time.Millisecond, RingBufferBytes: 1 << 16}, MaxThreads: 4096, MaxStacks: 4096, QuietCalls: quiet})
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, st); err != nil {
		cancel()
		b.Skipf("SKIP: sched probe does not load here: %v", err)
	}
	b.Cleanup(func() { cancel(); p.Close() })
	time.Sleep(300 * time.Millisecond) // the target is set at the first poll
}

// startLibbpfTool runs libbpf-tools' runqlat or offcputime (-p pid) until
// the benchmark ends; it skips loudly when the tool is not installed.
func startLibbpfTool(b *testing.B, name string, pid int) {
	b.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		if path, err = exec.LookPath("/usr/sbin/" + name); err != nil {
			b.Skipf("SKIP: %s not installed (apt-get install -y libbpf-tools)", name)
		}
	}
	cmd := exec.Command(path, "-p", strconv.Itoa(pid))
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt) // they print their histogram or stacks and exit
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	// Both say they trace once their programs are attached.
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "Tracing") || strings.Contains(sc.Text(), "Hit Ctrl-C") {
				ready <- ""
			}
		}
		ready <- "exited"
		io.Copy(io.Discard, out)
	}()
	// offcputime says nothing until it exits: three seconds are enough for
	// libbpf to load and attach.
	select {
	case r := <-ready:
		if r != "" {
			b.Fatalf("%s exited before it traced", name)
		}
	case <-time.After(3 * time.Second):
		if cmd.ProcessState != nil {
			b.Fatalf("%s exited", name)
		}
	}
}

// bpfRuntime is the run time the kernel has counted for each eBPF
// program loaded on the machine (while BPF stats are enabled), by program
// ID. A program that goes away between the listing and its stats is
// skipped.
func bpfRuntime(b *testing.B) map[ebpf.ProgramID]time.Duration {
	rt := map[ebpf.ProgramID]time.Duration{}
	for id := ebpf.ProgramID(0); ; {
		next, err := ebpf.ProgramGetNextID(id)
		if errors.Is(err, os.ErrNotExist) {
			return rt
		}
		if err != nil {
			b.Fatalf("list eBPF programs: %v", err)
		}
		id = next
		prog, err := ebpf.NewProgramFromID(id)
		if err != nil {
			continue
		}
		if s, err := prog.Stats(); err == nil {
			rt[id] = s.Runtime
		}
		prog.Close()
	}
}

// bpfRunSince is the run time counted since before, over the programs
// loaded both then and now: a program unloaded meanwhile (the last
// sub-benchmark's, freed after its links closed) would otherwise take its
// whole run time off the sum.
func bpfRunSince(b *testing.B, before map[ebpf.ProgramID]time.Duration) time.Duration {
	var d time.Duration
	for id, t := range bpfRuntime(b) {
		if t0, ok := before[id]; ok {
			d += t - t0
		}
	}
	return d
}
