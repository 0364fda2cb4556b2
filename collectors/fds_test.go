package collectors

import (
	"context"
	"os"
	"os/exec"
	"testing"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func TestFDKind(t *testing.T) {
	for link, want := range map[string]string{
		"socket:[12345]":         "socket",
		"pipe:[99]":              "pipe",
		"/var/log/app.log":       "file",
		"/dev/null":              "file",
		"anon_inode:[eventfd]":   "anon_eventfd",
		"anon_inode:[eventpoll]": "anon_eventpoll",
		"anon_inode:[timerfd]":   "anon_timerfd",
		"anon_inode:inotify":     "anon_inotify",
		"anon_inode:[io_uring]":  "anon_other",
		"net:[4026531840]":       "other",
	} {
		if got := fdKind([]byte(link)); got != want {
			t.Errorf("fdKind(%q) = %s, want %s", link, got, want)
		}
	}
}

func TestParseNofile(t *testing.T) {
	b, err := os.ReadFile("testdata/proc_memory/limits")
	if err != nil {
		t.Fatal(err)
	}
	soft, hard, sok, hok, err := parseNofile(b)
	if err != nil || !sok || !hok || soft != 20000 || hard != 20000 {
		t.Fatalf("parseNofile = %v %v %v %v %v", soft, hard, sok, hok, err)
	}
	_, _, sok, _, err = parseNofile([]byte("Max open files            unlimited            unlimited            files\n"))
	if err != nil || sok {
		t.Fatalf("unlimited: ok=%v err=%v", sok, err)
	}
	if _, _, _, _, err := parseNofile([]byte("garbage")); err == nil {
		t.Fatal("garbage accepted")
	}
}

// A real child holds pipes and files it inherited: every one is counted
// by kind, and its lowered RLIMIT_NOFILE is read.
func TestFDsCollectorRealProcess(t *testing.T) {
	var extra []*os.File
	for i := 0; i < 3; i++ {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		extra = append(extra, r, w)
	}
	for i := 0; i < 2; i++ {
		f, err := os.CreateTemp(t.TempDir(), "fd")
		if err != nil {
			t.Fatal(err)
		}
		extra = append(extra, f)
	}
	cmd := exec.Command("prlimit", "--nofile=512:1024", "sleep", "60")
	cmd.ExtraFiles = extra
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for _, f := range extra {
		f.Close()
	}
	c := newFDsCollector(Options{})
	st := signals.New(16, 100)
	var pipes, files, soft, hard, total float64
	for i := 0; i < 100; i++ { // prlimit execs sleep: wait for that
		if err := c.Collect(context.Background(), workload.Process{PID: cmd.Process.Pid}, st); err != nil {
			t.Fatal(err)
		}
		p, _ := st.Latest(signals.ProcessOpenFDs, signals.L("kind", "pipe"))
		f, _ := st.Latest(signals.ProcessOpenFDs, signals.L("kind", "file"))
		l, _ := st.Latest(signals.ProcessFDLimit, signals.L("type", "soft"))
		h, _ := st.Latest(signals.ProcessFDLimit, signals.L("type", "hard"))
		n, _ := st.Latest(signals.ProcessFDsOpen, nil)
		pipes, files, soft, hard, total = p.V, f.V, l.V, h.V, n.V
		if l.V == 512 {
			break
		}
		sleep()
	}
	// A child without the extra files is the baseline (the test runner
	// may hand children a pipe of its own).
	base := exec.Command("sleep", "60")
	if err := base.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { base.Process.Kill(); base.Wait() })
	if err := c.Collect(context.Background(), workload.Process{PID: base.Process.Pid}, st); err != nil {
		t.Fatal(err)
	}
	basePipes, _ := st.Latest(signals.ProcessOpenFDs, signals.L("kind", "pipe"))
	if pipes != basePipes.V+6 {
		t.Errorf("pipes = %v, want the baseline %v + 6", pipes, basePipes.V)
	}
	if files < 2 {
		t.Errorf("files = %v, want >= 2 (the two temp files)", files)
	}
	if soft != 512 || hard != 1024 {
		t.Errorf("limits = %v/%v, want 512/1024", soft, hard)
	}
	if total < 11 {
		t.Errorf("total = %v, want at least 3 std + 8 inherited", total)
	}
}
