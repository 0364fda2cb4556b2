package collectors

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func TestParseTaskStat(t *testing.T) {
	const tail = " 1 7275 7275 0 -1 4194368 100 0 0 0 250 50 0 0 20 0 1"
	for _, tc := range []struct {
		name, in string
		want     taskStat
		wantErr  bool
	}{
		{name: "plain", in: "7277 (worker-3) S" + tail, want: taskStat{State: "S", Comm: "worker-3", CPU: 3}},
		{name: "spaces and parens in comm", in: "12 (a) b (c)) D" + tail, want: taskStat{State: "D", Comm: "a) b (c)", CPU: 3}},
		{name: "no comm", in: "12 S 1", wantErr: true},
		{name: "truncated", in: "12 (x)", wantErr: true},
		{name: "too few fields", in: "7277 (fixproc) S 1 7275 7275 0 -1", wantErr: true},
		{name: "bad utime", in: "7277 (x) S 1 7275 7275 0 -1 4194368 100 0 0 0 x 50", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseTaskStat([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
	if w, err := parseSchedstat([]byte("123 2500000000 7\n")); err != nil || w != 2.5 {
		t.Errorf("parseSchedstat = %v, %v; want 2.5", w, err)
	}
	if _, err := parseSchedstat([]byte("123")); err == nil {
		t.Error("parseSchedstat accepted one field")
	}
}

func TestParseTaskSyscall(t *testing.T) {
	for _, tc := range []struct {
		name, in    string
		wantNr      int
		wantRunning bool
		wantErr     bool
	}{
		{name: "running", in: "running\n", wantRunning: true},
		{name: "futex", in: "202 0x5a82f8 0x80 0x0 0x0 0x0 0x0 0xb583f13bef0 0x4810e3\n", wantNr: 202},
		{name: "outside a syscall", in: "-1 0x7ffd 0x4005\n", wantNr: -1},
		{name: "garbage", in: "sleeping\n", wantErr: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nr, running, err := parseTaskSyscall([]byte(tc.in))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if nr != tc.wantNr || running != tc.wantRunning {
				t.Errorf("got (%d, %v), want (%d, %v)", nr, running, tc.wantNr, tc.wantRunning)
			}
		})
	}
}

// TestThreadsFixture counts a Go program captured with one thread spinning,
// one in read on a pipe, one in accept, one in nanosleep and the runtime's
// own threads (sysmon in nanosleep, idle Ms in futex).
func TestThreadsFixture(t *testing.T) {
	c := newThreadsCollector(Options{ProcRoot: "testdata/proc"}, 0)
	got, err := c.count(fixturePID)
	if err != nil {
		t.Fatal(err)
	}
	want := threadCounts{
		Total:       9,
		Examined:    9,
		States:      map[string]int{"R": 1, "S": 8},
		ChildStates: map[string]int{},
		Syscalls:    map[string]int{"futex": 4, "nanosleep": 2, "read": 1, "accept4": 1},
	}
	perThread := samplesByName(got.PerThread)
	got.PerThread = nil
	// utime+stime of the captured main thread: 890+3 ticks.
	if v := perThread[`thread_stat_cpu_seconds_total{thread="fixproc",tid="7275"}`]; v != 8.93 {
		t.Errorf("main thread CPU %v, want 8.93 s; all: %v", v, perThread)
	}
	if len(perThread) != 9 {
		t.Errorf("%d per-thread samples, want 9 (no schedstat in the fixture): %v", len(perThread), perThread)
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}

	capped := newThreadsCollector(Options{ProcRoot: "testdata/proc"}, 3)
	got, err = capped.count(fixturePID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Total != 9 || got.Examined != 3 {
		t.Errorf("with MaxThreads 3: total %d examined %d, want 9 and 3", got.Total, got.Examined)
	}
}

// A child whose task directory is already empty (it is exiting) is not
// counted, and the target's threads still are: the whole collect failed
// on it before.
func TestThreadsChildExiting(t *testing.T) {
	root := t.TempDir()
	if err := os.CopyFS(root, os.DirFS("testdata/proc")); err != nil {
		t.Fatal(err)
	}
	main := filepath.Join(root, strconv.Itoa(fixturePID), "task", strconv.Itoa(fixturePID))
	if err := os.WriteFile(filepath.Join(main, "children"), []byte("7300 "), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, "7300", "task"), 0o755); err != nil {
		t.Fatal(err)
	}
	c := newThreadsCollector(Options{ProcRoot: root}, 0)
	got, err := c.count(fixturePID)
	if err != nil {
		t.Fatalf("a child with an empty task directory failed the collect: %v", err)
	}
	if got.Total != 9 || got.Examined != 9 || len(got.ChildStates) != 0 {
		t.Errorf("total %d, examined %d, child states %v: want the target's 9 threads and no child's", got.Total, got.Examined, got.ChildStates)
	}
}

func TestThreadSamplesZeroGone(t *testing.T) {
	got := samplesByName(threadSamples(
		threadCounts{Total: 2, States: map[string]int{"S": 2, "T": 1}, ChildStates: map[string]int{"T": 1}, Syscalls: map[string]int{"futex": 2}},
		map[string]bool{"S": true, "D": true},
		map[string]bool{"S": true},
		map[string]bool{"fsync": true}))
	want := map[string]float64{
		`process_num_threads{}`:                       2,
		`process_threads{state="S"}`:                  2,
		`process_threads{state="D"}`:                  0,
		`process_threads{state="T"}`:                  1,
		`process_child_threads{state="T"}`:            1,
		`process_child_threads{state="S"}`:            0,
		`process_threads_in_syscall{syscall="futex"}`: 2,
		`process_threads_in_syscall{syscall="fsync"}`: 0,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestSyscallName(t *testing.T) {
	if got := syscallName(-1); got != "none" {
		t.Errorf("syscallName(-1) = %q", got)
	}
	if got := syscallName(9999); got != "syscall_9999" {
		t.Errorf("syscallName(9999) = %q", got)
	}
}

// The threads of the target's children count with its own (a prefork
// server's workers), and so apart; a stopped thread is counted by its
// state, not by the system call it stopped in. Real processes: a shell
// waiting for two sleeps, which are stopped.
func TestThreadsCountChildrenAndStops(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 60 & sleep 60 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var kids []int
	for deadline := time.Now().Add(5 * time.Second); len(kids) < 2; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the shell's children: %v", kids)
		}
		kids = workload.Children("/proc", cmd.Process.Pid, workload.MaxGroupChildren)
	}
	for _, k := range kids {
		if err := syscall.Kill(k, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = syscall.Kill(k, syscall.SIGKILL) })
	}
	c := newThreadsCollector(Options{}, 0)
	var got threadCounts
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		var err error
		if got, err = c.count(cmd.Process.Pid); err != nil {
			t.Fatal(err)
		}
		if got.ChildStates["T"] == 2 && got.States["S"] == 1 || time.Now().After(deadline) {
			break
		}
	}
	if got.Total != 1 || got.States["T"] != 2 || got.States["S"] != 1 || got.ChildStates["T"] != 2 || len(got.ChildStates) != 1 {
		t.Errorf("total %d, states %v, children's %v: want the shell's 1 thread, S, and its 2 stopped children", got.Total, got.States, got.ChildStates)
	}
	// The shell waits in wait4 or rt_sigsuspend; the sleeps stopped in
	// clock_nanosleep, and are not counted there.
	if n := got.Syscalls["clock_nanosleep"] + got.Syscalls["nanosleep"]; n != 0 || len(got.Syscalls) != 1 {
		t.Errorf("system calls %v: want the shell's wait alone (the stopped sleeps wait in none)", got.Syscalls)
	}
}

// TestThreadsRealSleep watches a real sleep(1) settle into its one system call.
func TestThreadsRealSleep(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })

	c := newThreadsCollector(Options{}, 0)
	store := signals.New(4, 100)
	tgt := workload.Process{PID: cmd.Process.Pid}
	var last []signals.Labels
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if err := c.Collect(context.Background(), tgt, store); err != nil {
			t.Fatal(err)
		}
		last = store.Select(signals.ProcessThreadsInSyscall)
		for _, name := range []string{"clock_nanosleep", "nanosleep"} {
			if s, ok := store.Latest(signals.ProcessThreadsInSyscall, signals.L("syscall", name)); ok && s.V == 1 {
				if n, _ := store.Latest(signals.ProcessNumThreads, nil); n.V != 1 {
					t.Errorf("process_num_threads = %v, want 1", n.V)
				}
				if st, _ := store.Latest(signals.ProcessThreads, signals.L("state", "S")); st.V != 1 {
					t.Errorf(`process_threads{state="S"} = %v, want 1`, st.V)
				}
				return
			}
		}
	}
	t.Fatalf("sleep never seen in (clock_)nanosleep; series: %v", last)
}
