package probes

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
	"github.com/culprit-dev/culprit/workload"
)

// A worker spinning in faults.hotLoop is what the profiler samples of the
// target, at about the configured rate, and the profile built from those
// samples names hotLoop in `go tool pprof -top`.
func TestCPUProfileNamesTheHotFunction(t *testing.T) {
	w := testenv.StartWorkers(t, 2)
	samples := signals.NewCPUSamples(4096)
	st := signals.New(600, 1000)
	p := NewCPUProfile(CPUProfileOptions{
		Options:   Options{Log: testLog, SideStores: signals.SideStores{Samples: samples}},
		Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond,
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
	if n, ok := st.Latest(signals.ProfileCPUSamplesTotal, nil); !ok || n.V < float64(worker0) {
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
		for _, c := range workload.Children("/proc", master.Process.Pid, 16) {
			syscall.Kill(c, syscall.SIGKILL)
		}
		master.Process.Kill()
		master.Wait()
	})
	samples := signals.NewCPUSamples(4096)
	p := NewCPUProfile(CPUProfileOptions{Options: Options{Log: testLog, SideStores: signals.SideStores{Samples: samples}}, Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond})
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

// BenchmarkCPUProfileSample measures what one CPU sample of the target
// costs with the stack copy (profiling's default DefaultStackBytes) and
// without it (copy_bytes 0: the counts-only program as it was), alternating
// rounds in one run. The target is a real node spinning in pbkdf2Sync
// (pbkdfJS): deep stacks, most samples in OpenSSL's assembly. One op is
// one sample of the target, in each mode.
//
// bpf-ns/sample is the program's run time (kernel BPF stats) per target
// sample: the cost to the target, on its own CPU. Runs on CPUs where the
// target was not running (the filter alone) are measured in a window with
// the target stopped and subtracted. unwind-ns/sample is the agent's Go
// unwinding per sample; target-cpu-%-49Hz is what the program costs a
// thread that runs all the time, at the default 49 Hz. ns/op is wall time
// (rounds wait for the drains), not a cost. About a minute at make
// bench's 50000x.
func BenchmarkCPUProfileSample(b *testing.B) {
	node, err := exec.LookPath("node")
	if err != nil {
		b.Skip("SKIP: node not on PATH: the profiler's per-sample cost NOT MEASURED")
	}
	stats, err := ebpf.EnableStats(uint32(unix.BPF_STATS_RUN_TIME))
	if err != nil {
		b.Skipf("SKIP: BPF run-time stats (needs CAP_SYS_ADMIN): %v", err)
	}
	defer stats.Close()
	dir := b.TempDir()
	js := filepath.Join(dir, "pbkdf.js")
	if err := os.WriteFile(js, []byte(pbkdfJS), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(node, "--perf-basic-prof", js)
	cmd.Dir = dir
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	pid := cmd.Process.Pid
	b.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(fmt.Sprintf("/tmp/perf-%d.map", pid))
	})

	const (
		freq  = 2999 // fast enough for 50000 samples a mode in tens of seconds
		drain = 50 * time.Millisecond
		round = 300 * time.Millisecond
	)
	st := signals.New(64, 4096)
	p := NewCPUProfile(CPUProfileOptions{Options: Options{Log: testLog, SideStores: signals.SideStores{Samples: signals.NewCPUSamples(1 << 16)}}, Frequency: freq, MaxStacks: 8192, Drain: drain})
	res, err := workload.NewResolver("/proc")
	if err != nil {
		b.Fatal(err)
	}
	tr := workload.NewTracker(res, workload.Selector{PID: pid}, time.Second, testLog)
	tr.Refresh()
	ctx, cancel := context.WithCancel(context.Background())
	if err := p.Start(ctx, tr, st); err != nil {
		cancel()
		b.Skipf("SKIP: cpu_profile does not load here: %v", err)
	}
	b.Cleanup(func() { cancel(); p.Close() })
	time.Sleep(2 * time.Second) // node compiles its functions; the target is set

	prog := p.objs.CulpritCpuSample
	runTime := func() (time.Duration, uint64) {
		s, err := prog.Stats()
		if err != nil {
			b.Fatalf("program stats: %v", err)
		}
		return s.Runtime, s.RunCount
	}
	latest := func(d *signals.Desc) float64 {
		v, _ := st.Latest(d, nil)
		return v.V
	}
	signal := func(sig syscall.Signal) {
		if err := syscall.Kill(pid, sig); err != nil {
			b.Fatal(err)
		}
	}
	// The filter's cost: runs while the target is stopped.
	signal(syscall.SIGSTOP)
	time.Sleep(3 * drain)
	r0, c0 := runTime()
	time.Sleep(round)
	r1, c1 := runTime()
	filter := float64(r1-r0) / float64(max(c1-c0, 1))

	type acc struct {
		bpf             time.Duration
		runs, samples   uint64
		unwind, unwound float64
	}
	var modes [2]acc // 0: counts only, 1: with the stack copy
	b.ResetTimer()
	for i := 0; modes[0].samples < uint64(b.N) || modes[1].samples < uint64(b.N); i++ {
		m := i % 2
		if err := p.SetStackBytes(m * DefaultStackBytes); err != nil {
			b.Fatal(err)
		}
		r0, c0 := runTime()
		n0, u0, w0 := latest(signals.ProfileCPUSamplesTotal), latest(signals.ProfileCPUUnwindSecondsTotal), latest(signals.ProfileCPUSamplesUnwoundTotal)
		signal(syscall.SIGCONT)
		time.Sleep(round)
		signal(syscall.SIGSTOP)
		time.Sleep(4 * drain) // unwound and drained
		r1, c1 := runTime()
		a := &modes[m]
		a.bpf += r1 - r0
		a.runs += c1 - c0
		a.samples += uint64(latest(signals.ProfileCPUSamplesTotal) - n0)
		a.unwind += latest(signals.ProfileCPUUnwindSecondsTotal) - u0
		a.unwound += latest(signals.ProfileCPUSamplesUnwoundTotal) - w0
	}
	b.StopTimer()
	signal(syscall.SIGCONT)
	perSample := func(a acc) float64 {
		return (float64(a.bpf) - float64(a.runs-a.samples)*filter) / float64(max(a.samples, 1))
	}
	before, after := perSample(modes[0]), perSample(modes[1])
	b.ReportMetric(before, "bpf-ns/sample-fp-only")
	b.ReportMetric(after, "bpf-ns/sample-copy")
	b.ReportMetric(after/before, "copy/fp-only")
	b.ReportMetric(filter, "bpf-ns/run-not-target")
	b.ReportMetric(1e9*modes[1].unwind/max(modes[1].unwound, 1), "unwind-ns/sample")
	b.ReportMetric(100*49*after/1e9, "target-cpu-%-49Hz")
	b.ReportMetric(modes[1].unwound/float64(max(modes[1].samples, 1)), "unwound/sample")
}
