package probes

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/target"
)

// A worker spinning in faults.hotLoop is what the profiler samples of the
// target, at about the configured rate, and the profile built from those
// samples names hotLoop in `go tool pprof -top`.
func TestCPUProfileNamesTheHotFunction(t *testing.T) {
	w := testenv.StartWorkers(t, 2)
	samples := signals.NewCPUSamples(4096)
	st := signals.New(600, 1000)
	p := NewCPUProfile(CPUProfileOptions{
		Options:   Options{Log: testLog},
		Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond, Samples: samples,
	})
	runProbe(t, w.PID, p, st)
	time.Sleep(300 * time.Millisecond) // the target is set at the first drain
	from := time.Now()
	w.MustDo(t, "spin 0 2000")
	time.Sleep(2300 * time.Millisecond)
	got := samples.Range(from, time.Now())
	var total, worker0 int64
	var in []symbolize.Sample
	for _, s := range got {
		total += s.Count
		if s.Tid == w.TIDs[0] {
			worker0 += s.Count
		}
		if s.Pid != w.PID {
			t.Fatalf("sample of another process: %+v", s)
		}
		in = append(in, symbolize.Sample{Pid: s.Pid, Tid: s.Tid, Thread: s.Thread, User: s.User, Kernel: s.Kernel, Count: s.Count})
	}
	// 2 s at 99 Hz on one CPU: about 198 samples; allow for a loaded machine.
	if worker0 < 80 || worker0 > 260 {
		t.Errorf("worker-0 samples %d (of %d), want about 198", worker0, total)
	}
	prof, err := symbolize.New(symbolize.Options{}).CPUProfile(in, symbolize.ProfileOptions{
		Period: samples.Period(), Start: from, Duration: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := prof.Write(&buf); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "cpu.pb.gz")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("go", "tool", "pprof", "-top", path).CombinedOutput()
	if err != nil {
		t.Fatalf("go tool pprof -top: %v\n%s", err, out)
	}
	lines := strings.Split(string(out), "\n")
	found := false
	for _, l := range lines {
		if strings.Contains(l, "faults.hotLoop") {
			found = true
			// hotLoop is the leaf: most of the profile is its own time.
			if f := strings.Fields(l); len(f) < 2 || !strings.HasSuffix(f[1], "%") {
				t.Errorf("unexpected pprof line %q", l)
			}
		}
	}
	if !found {
		t.Errorf("pprof -top does not name faults.hotLoop:\n%s", out)
	}
	if n, ok := st.Latest("profile_cpu_samples_total", nil); !ok || n.V < float64(worker0) {
		t.Errorf("profile_cpu_samples_total %v (seen %v), want >= %d", n.V, ok, worker0)
	}
}

// A prefork server: the master (the process --port finds) idles while its
// children work. The profiler samples the children, each under its own
// pid, so their stacks are symbolized against their own binaries.
func TestCPUProfileSamplesAPreforkServersWorkers(t *testing.T) {
	master := exec.Command("bash", "-c", "sh -c 'while :; do :; done' & sh -c 'while :; do :; done' & wait")
	if err := master.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// The workers are the master's children: end them with it.
		for _, c := range target.Children("/proc", master.Process.Pid, 16) {
			syscall.Kill(c, syscall.SIGKILL)
		}
		master.Process.Kill()
		master.Wait()
	})
	samples := signals.NewCPUSamples(4096)
	p := NewCPUProfile(CPUProfileOptions{Options: Options{Log: testLog}, Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond, Samples: samples})
	runProbe(t, master.Process.Pid, p, signals.New(600, 1000))
	time.Sleep(2 * time.Second)
	byPid := map[int]int64{}
	for _, s := range samples.Range(time.Now().Add(-time.Minute), time.Now()) {
		byPid[s.Pid] += s.Count
	}
	workers := 0
	for pid, n := range byPid {
		if pid != master.Process.Pid && n > 20 {
			workers++
		}
	}
	if workers != 2 {
		t.Errorf("samples by pid %v: want two busy workers besides the master %d", byPid, master.Process.Pid)
	}
}
