package workload

import (
	"io"
	"log/slog"
	"os/exec"
	"regexp"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

func startSleep(t *testing.T, tag string) *exec.Cmd {
	t.Helper()
	// exec -a gives the process a recognisable argv without a script.
	cmd := exec.Command("bash", "-c", "exec -a culprit-test-"+tag+" sleep 60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestResolveByPIDCmdAndPort(t *testing.T) {
	r, err := NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	sl := startSleep(t, "resolve")
	waitFor(t, func() bool {
		p, err := r.Resolve(Selector{Cmd: regexp.MustCompile(`^culprit-test-resolve\b`)})
		return err == nil && p.PID == sl.Process.Pid
	})
	p, err := r.Resolve(Selector{PID: sl.Process.Pid})
	if err != nil || p.StartTime == 0 || p.NetnsIno == 0 {
		t.Fatalf("by pid: %+v %v", p, err)
	}

	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: true, SharedNetns: true})
	p, err = r.Resolve(Selector{Port: s.Port})
	if err != nil || p.PID != s.PID {
		t.Fatalf("by port %d: got %+v, %v; want pid %d", s.Port, p, err, s.PID)
	}
	if _, err := r.Resolve(Selector{Port: 1}); err == nil {
		t.Fatal("found a process on port 1")
	}
	if _, err := r.Resolve(Selector{PID: 1 << 30}); err == nil {
		t.Fatal("found a nonexistent pid")
	}
}

// A wrapper repeats its child's command line (timeout, sh -c): the child,
// which does the work, is chosen.
func TestResolveByCmdSkipsWrapper(t *testing.T) {
	r, err := NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	wrapper := exec.Command("timeout", "60", "sleep", "62")
	if err := wrapper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wrapper.Process.Kill(); wrapper.Wait() })
	waitFor(t, func() bool {
		p, err := r.Resolve(Selector{Cmd: regexp.MustCompile(`sleep 62$`)})
		return err == nil && p.PID != wrapper.Process.Pid && p.Comm == "sleep"
	})
}

// The target restarts under a new PID: the tracker finds it again.
func TestTrackerRefindsRestartedTarget(t *testing.T) {
	r, err := NewResolver("/proc")
	if err != nil {
		t.Fatal(err)
	}
	tr := NewTracker(r, Selector{Cmd: regexp.MustCompile(`^culprit-test-restart\b`)}, 50*time.Millisecond, slog.New(slog.NewTextHandler(io.Discard, nil)))
	first := startSleep(t, "restart")
	waitFor(t, func() bool { tr.Refresh(); p, ok := tr.Current(); return ok && p.PID == first.Process.Pid })
	first.Process.Kill()
	first.Wait()
	tr.Refresh()
	if _, ok := tr.Current(); ok {
		t.Fatal("dead target still current")
	}
	second := startSleep(t, "restart")
	waitFor(t, func() bool { tr.Refresh(); p, ok := tr.Current(); return ok && p.PID == second.Process.Pid })
	if tr.Changes() != 2 {
		t.Fatalf("changes = %d, want 2", tr.Changes())
	}
}

func TestSocketInodes(t *testing.T) {
	s := testenv.Start(t, testenv.Options{Backlog: 8, Accept: true})
	inodes, err := SocketInodes("/proc", s.PID)
	if err != nil || len(inodes) == 0 {
		t.Fatalf("socket inodes of pid %d: %v %v", s.PID, inodes, err)
	}
	if _, err := SocketInodes("/proc", 1<<30); err == nil {
		t.Fatal("no error for a missing pid")
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
