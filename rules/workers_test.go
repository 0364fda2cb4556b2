package rules

import (
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

var testPools = WorkerPools{Match: regexp.MustCompile(DefaultWorkerThreads), IdleSyscalls: DefaultIdleSyscalls}

var nanosleepStack = []string{"__schedule", "schedule", "do_nanosleep", "hrtimer_nanosleep", "__x64_sys_nanosleep", "do_syscall_64",
	"runtime/internal/syscall.Syscall6", "syscall.Syscall", "golang.org/x/sys/unix.Nanosleep", "app.resolveDNS", "app.handle", "runtime.goexit"}
var futexStack = []string{"__schedule", "schedule", "futex_wait", "do_futex", "__x64_sys_futex", "do_syscall_64", "runtime.futex", "runtime.notesleep", "runtime.stoplockedm"}

func episodes(es ...signals.Episode) *signals.Episodes {
	s := signals.NewEpisodes(64)
	for _, e := range es {
		s.Put(e)
	}
	return s
}

func TestBlockingWorkerNamesTheCall(t *testing.T) {
	now := time.Now()
	eps := episodes(
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 12, Thread: "tokio-runtime-w", Start: now.Add(-3 * time.Second), Duration: 2100 * time.Millisecond, Stack: nanosleepStack, KernelFrames: 6},
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 13, Thread: "tokio-runtime-w", Start: now.Add(-2 * time.Second), Duration: 300 * time.Millisecond, Stack: nanosleepStack, KernelFrames: 6},
	)
	r := NewBlockingWorker(BlockingWorkerOptions{Window: 10 * time.Second, MinBlock: 250 * time.Millisecond})
	obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}})
	if len(obs) != 1 {
		t.Fatalf("got %d observations, want 1: %+v", len(obs), obs)
	}
	o := obs[0]
	if o.Cause != CauseBlockingCallOnWorker || o.Key != "tokio-runtime-w" || o.Severity != SeverityCritical {
		t.Errorf("cause %q key %q severity %v", o.Cause, o.Key, o.Severity)
	}
	if !strings.Contains(o.RootCause, "app.resolveDNS") || !strings.Contains(o.Title, "nanosleep") || !strings.Contains(o.Symptom, "2.1 s") {
		t.Errorf("does not name the call: %q / %q / %q", o.Title, o.RootCause, o.Symptom)
	}
	if !strings.Contains(o.RootCause, "2 such blocks on 2 workers in the last 10 s, 2.4 s in all") {
		t.Errorf("root cause %q", o.RootCause)
	}
	var frame bool
	for _, a := range o.Artifacts {
		frame = frame || (a.Kind == "frame" && a.Value == "app.resolveDNS")
	}
	if !frame {
		t.Errorf("no frame artifact: %+v", o.Artifacts)
	}
}

// Silence: idle waits of workers, long blocks of non-worker threads (a
// blocking pool is for that), short blocks, and old blocks.
func TestBlockingWorkerSilentOnHealthyThreads(t *testing.T) {
	now := time.Now()
	eps := episodes(
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 1, Thread: "tokio-runtime-w", Start: now.Add(-5 * time.Second), Duration: 5 * time.Second, Ongoing: true, Stack: futexStack, KernelFrames: 6},
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 2, Thread: "tokio-blocking", Start: now.Add(-5 * time.Second), Duration: 3 * time.Second, Stack: nanosleepStack, KernelFrames: 6},
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 3, Thread: "worker-1", Start: now.Add(-time.Second), Duration: 120 * time.Millisecond, Stack: nanosleepStack, KernelFrames: 6},
		signals.Episode{Kind: signals.EpisodeBlock, Tid: 4, Thread: "worker-2", Start: now.Add(-time.Minute), Duration: 5 * time.Second, Stack: nanosleepStack, KernelFrames: 6},
	)
	r := NewBlockingWorker(BlockingWorkerOptions{Window: 10 * time.Second, MinBlock: 250 * time.Millisecond})
	if obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 0 {
		t.Fatalf("healthy threads raised %+v", obs)
	}
}

func TestWorkerPools(t *testing.T) {
	for name, want := range map[string]string{"worker-3": "worker", "tokio-runtime-w": "tokio-runtime-w", "actix-rt|system:0|arbiter:11": "actix-rt|system:0|arbiter", "nginx": ""} {
		got, ok := testPools.Pool(name)
		if ok != (want != "") || got != want {
			t.Errorf("Pool(%q) = %q, %v; want %q", name, got, ok, want)
		}
	}
	if f := culpritFrame([]string{"__nanosleep", "runtime.cgocall", "libfoo.so+0x1234", "app::db::query", "app::handler"}); f != "app::db::query" {
		t.Errorf("culpritFrame = %q", f)
	}
}

type fakeHot []FrameShare

func (f fakeHot) HotFrames(int, time.Time, time.Time, int) []FrameShare { return f }

func TestBusyWorkerNamesTheHotFunction(t *testing.T) {
	now := time.Now()
	st := signals.New(100, 100)
	for i := 0; i <= 10; i++ {
		ts := now.Add(time.Duration(i-10) * time.Second)
		ls := signals.L("tid", "7", "thread", "worker-1")
		st.Put(signals.ThreadRunqWaitSecondsTotal, ls, 0.05*float64(i), ts)
		st.Put(signals.ThreadRunqWaitsTotal, ls, 10*float64(i), ts)
	}
	eps := episodes(signals.Episode{Kind: signals.EpisodeBusy, Tid: 6, Thread: "worker-0", Start: now.Add(-2 * time.Second), Duration: 1500 * time.Millisecond})
	r := NewBusyWorker(BusyWorkerOptions{Window: 10 * time.Second, MinBusy: 500 * time.Millisecond})
	obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools, Hot: fakeHot{{"app.compress", 0.8}, {"runtime.memmove", 0.1}}}})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if o.Cause != CauseCPUHeavyOnWorker || !strings.Contains(o.Title, "app.compress") || !strings.Contains(o.Remediation, "app.compress") {
		t.Errorf("%q / %q", o.Title, o.Remediation)
	}
	if len(o.Evidence) != 3 || o.Evidence[2].Value < 0.004 || o.Evidence[2].Value > 0.006 {
		t.Errorf("peer run-queue wait evidence: %+v", o.Evidence)
	}
	// The run ended: it is told in the past.
	if want := "ran for 1.5 s without yielding; it ran no other task meanwhile"; !strings.Contains(o.Symptom, want) {
		t.Errorf("symptom of an ended run %q, want %q", o.Symptom, want)
	}
	eps = episodes(signals.Episode{Kind: signals.EpisodeBusy, Tid: 6, Thread: "worker-0", Start: now.Add(-1500 * time.Millisecond), Duration: 1500 * time.Millisecond, Ongoing: true})
	obs = r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools, Hot: fakeHot{{"app.compress", 0.8}}}})
	if want := "has been running for 1.5 s without yielding; it runs no other task meanwhile"; len(obs) != 1 || !strings.Contains(obs[0].Symptom, want) {
		t.Errorf("an ongoing run: %+v, want a symptom saying %q", obs, want)
	}
}

func TestBusyWorkerSilentOnShortRuns(t *testing.T) {
	now := time.Now()
	eps := episodes(
		signals.Episode{Kind: signals.EpisodeBusy, Tid: 6, Thread: "worker-0", Start: now.Add(-2 * time.Second), Duration: 300 * time.Millisecond},
		signals.Episode{Kind: signals.EpisodeBusy, Tid: 8, Thread: "gc-helper", Start: now.Add(-2 * time.Second), Duration: 2 * time.Second},
	)
	r := NewBusyWorker(BusyWorkerOptions{Window: 10 * time.Second, MinBusy: 500 * time.Millisecond})
	if obs := r.Evaluate(Window{Store: signals.New(10, 10), Now: now, Inputs: Inputs{Episodes: eps, Pools: testPools}}); len(obs) != 0 {
		t.Fatalf("healthy runs raised %+v", obs)
	}
}

func putThreadCPU(st *signals.Store, now time.Time, cores []float64) {
	for i := 0; i <= 10; i++ {
		ts := now.Add(time.Duration(i-10) * time.Second)
		for w, c := range cores {
			st.Put(signals.ThreadCPUSecondsTotal, signals.L("tid", strconv.Itoa(100+w), "thread", "worker-"+strconv.Itoa(w)), c*float64(i), ts)
		}
	}
}

func TestWorkerImbalance(t *testing.T) {
	now := time.Now()
	r := NewWorkerImbalance(WorkerImbalanceOptions{Window: 10 * time.Second, MinBusy: 0.5, MinRatio: 4})
	pools := Inputs{Pools: testPools}

	st := signals.New(100, 100)
	putThreadCPU(st, now, []float64{0.9, 0.05, 0.04, 0.06})
	obs := r.Evaluate(Window{Store: st, Now: now, Inputs: pools})
	if len(obs) != 1 || obs[0].Cause != CauseUnbalancedWorkers || !strings.Contains(obs[0].Title, "worker-0") {
		t.Fatalf("unbalanced pool: %+v", obs)
	}

	// Silence: the same total load spread evenly, and a lightly loaded pool.
	for _, cores := range [][]float64{{0.3, 0.25, 0.28, 0.3}, {0.2, 0.01, 0.01, 0.01}} {
		st := signals.New(100, 100)
		putThreadCPU(st, now, cores)
		if obs := r.Evaluate(Window{Store: st, Now: now, Inputs: pools}); len(obs) != 0 {
			t.Errorf("%v raised %+v", cores, obs)
		}
	}
}

func plateauStore(now time.Time, queue float64, cores float64) *signals.Store {
	st := signals.New(200, 100)
	ls := signals.L("addr", "127.0.0.1", "port", "8080")
	for i := 0; i <= 50; i++ {
		ts := now.Add(time.Duration(i-50) * 100 * time.Millisecond)
		st.Put(signals.ListenQueueLength, ls, queue, ts)
		st.Put(signals.ThreadCPUSecondsTotal, signals.L("tid", "1", "thread", "app"), cores*float64(i)/10, ts)
	}
	st.Put(signals.ProcessThreadsInSyscall, signals.L("syscall", "futex"), 7, now)
	st.Put(signals.ProcessThreadsInSyscall, signals.L("syscall", "epoll_wait"), 1, now)
	st.Put(signals.ProcessThreadsInSyscall, signals.L("syscall", "read"), 1, now)
	return st
}

func TestThroughputPlateauNamesTheWait(t *testing.T) {
	now := time.Now()
	r := NewThroughputPlateau(ThroughputPlateauOptions{Window: 5 * time.Second, MinQueued: 0.8, MaxBusyCores: 0.5})
	obs := r.Evaluate(Window{Store: plateauStore(now, 12, 0.05), Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if o.Cause != CauseWaitingNotWorking || !strings.Contains(o.Title, "futex") || !strings.Contains(o.RootCause, "7 of 8 waiting threads") {
		t.Errorf("%q / %q", o.Title, o.RootCause)
	}
	// Silence: an empty queue at low CPU (an idle service), and a queue
	// with busy CPU (CPU-bound: other rules' business).
	for _, tc := range []struct{ q, cores float64 }{{0, 0.05}, {12, 1.5}} {
		if obs := r.Evaluate(Window{Store: plateauStore(now, tc.q, tc.cores), Now: now}); len(obs) != 0 {
			t.Errorf("queue %v at %v cores raised %+v", tc.q, tc.cores, obs)
		}
	}
}

// A process whose every thread is stopped (caddy under SIGSTOP, its
// threads shown in the futex they were in) is not a service waiting on a
// lock: the plateau says it is stopped, since when, and by what, whatever
// CPU it used before the stop; while any thread is not stopped the rule
// judges as before.
func TestThroughputPlateauSaysTheProcessIsStopped(t *testing.T) {
	now := time.Now()
	r := NewThroughputPlateau(ThroughputPlateauOptions{Window: 5 * time.Second, MinQueued: 0.8, MaxBusyCores: 0.5})
	// Busy before the stop (1.5 cores over the window), stopped for the
	// last 3 of 5 thread samples.
	st := plateauStore(now, 12, 1.5)
	for i := 0; i <= 4; i++ {
		ts := now.Add(time.Duration(i-4) * time.Second)
		stopped := 0.0
		if i >= 2 {
			stopped = 9
		}
		st.Put(signals.ProcessThreads, signals.L("state", "S"), 9-stopped, ts)
		st.Put(signals.ProcessThreads, signals.L("state", "T"), stopped, ts)
	}
	obs := r.Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	for _, want := range []string{"the process is stopped, not slow: all 9 of its threads are in state T, stopped by a signal: SIGSTOP"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause %q lacks %q", o.RootCause, want)
		}
	}
	if o.Cause != CauseProcessStopped || strings.Contains(o.RootCause, "futex") || !strings.Contains(o.Symptom, "12 connections wait in the accept queue of 127.0.0.1:8080") {
		t.Errorf("%s: %q / %q", o.Cause, o.Symptom, o.RootCause)
	}
	// Stopped at the last 3 of 5 thread samples, a second apart: since 2 s.
	if e := o.Evidence[len(o.Evidence)-1]; e.Window != 2*time.Second || e.Value != 9 || e.Threshold != 9 {
		t.Errorf("stopped threads' evidence %+v, want 9 of 9 over the 2 s since the first sample that saw them stopped", e)
	}

	// One thread still asleep, not stopped: the CPU the window holds
	// (1.5 cores) rules the plateau out, as before.
	st.Put(signals.ProcessThreads, signals.L("state", "S"), 1, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("a process with a thread not stopped was told %+v", obs)
	}
	// A prefork server whose workers are stopped while its master waits
	// in rt_sigsuspend (nginx): its child processes are what is stopped.
	st = plateauStore(now, 12, 0.05)
	st.Put(signals.ProcessThreads, signals.L("state", "S"), 1, now)
	st.Put(signals.ProcessThreads, signals.L("state", "T"), 2, now)
	st.Put(signals.ProcessChildThreads, signals.L("state", "T"), 2, now)
	obs = r.Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseProcessStopped || obs[0].Title != "Connections queue on 127.0.0.1:8080: its child processes are stopped" ||
		!strings.Contains(obs[0].RootCause, "its child processes are stopped, not slow: all 2 threads of its child processes, which serve its listeners in a prefork server such as nginx (the process itself is not stopped), are in state T") {
		t.Errorf("workers stopped: %+v", obs)
	}
	// One of two workers stopped: not a stopped service.
	st.Put(signals.ProcessChildThreads, signals.L("state", "S"), 1, now)
	st.Put(signals.ProcessChildThreads, signals.L("state", "T"), 1, now)
	st.Put(signals.ProcessThreads, signals.L("state", "S"), 2, now)
	st.Put(signals.ProcessThreads, signals.L("state", "T"), 1, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) == 1 && obs[0].Cause == CauseProcessStopped {
		t.Errorf("one worker of two stopped was told %+v", obs)
	}
	// Stopped, with nothing queued: nothing to tell here.
	st = plateauStore(now, 0, 0)
	st.Put(signals.ProcessThreads, signals.L("state", "T"), 9, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("a stopped process with empty queues was told %+v", obs)
	}
}

// A blocking call whose stack reaches the app's JavaScript names that
// function, even when the thread's runtime was not told yet: the first
// frame past the C library would be libuv's poll.
func TestCulpritOfPrefersTheAppsJavaScript(t *testing.T) {
	e := signals.Episode{Stack: append(slices.Clone(kEpollPwait), uNodeExecJS...), KernelFrames: len(kEpollPwait), LibcFrames: 1}
	for _, rt := range []signals.Runtime{signals.RuntimeNode, signals.RuntimeUnknown} {
		if got := culpritOf(e, rt); got != "handler (/app/server.js:12)" {
			t.Errorf("culpritOf(%v) = %q", rt, got)
		}
	}
}
