package symbolize

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/pprof/profile"
)

func TestCPUProfile(t *testing.T) {
	target := uint64(reflect.ValueOf(culpritTarget).Pointer())
	pcs := callers() // real return addresses: callers, this test, tRunner, goexit
	user := []uint64{target + 1}
	for _, pc := range pcs {
		user = append(user, uint64(pc))
	}
	user = append(user, 0, 0) // unused stack slots

	s := New(Options{})
	var kernel []uint64
	if ks := s.kernelSyms(); ks != nil {
		sched := kallsymsAddr(t, "schedule")
		kernel = []uint64{sched + 4, sched + 16}
	}
	pid := os.Getpid()
	samples := []Sample{
		{Pid: pid, Tid: pid, Thread: "worker", User: user, Count: 3},
		{Pid: pid, Tid: pid + 1, Thread: "other", User: user[1:], Kernel: kernel, Count: 2},
		{Pid: pid, Tid: pid, Thread: "worker", User: user, Count: 0}, // dropped
	}
	period := time.Second / 49
	start := time.Unix(1700000000, 0)
	p, err := s.CPUProfile(samples, ProfileOptions{Period: period, Start: start, Duration: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CheckValid(); err != nil {
		t.Fatalf("CheckValid: %v", err)
	}
	if len(p.Sample) != 2 {
		t.Fatalf("%d samples, want 2", len(p.Sample))
	}
	s0, s1 := p.Sample[0], p.Sample[1]
	if want := []int64{3, 3 * period.Nanoseconds()}; !reflect.DeepEqual(s0.Value, want) {
		t.Errorf("values = %v, want %v", s0.Value, want)
	}
	if got := s0.Label["thread"]; len(got) != 1 || got[0] != "worker" {
		t.Errorf("thread label = %v", got)
	}
	if got := s1.NumLabel["tid"]; len(got) != 1 || got[0] != int64(pid+1) {
		t.Errorf("tid label = %v", got)
	}
	if p.Period != period.Nanoseconds() || p.PeriodType.Type != "cpu" || p.TimeNanos != start.UnixNano() {
		t.Errorf("period/time = %d %v %d", p.Period, p.PeriodType, p.TimeNanos)
	}

	// Leaf first, zero slots dropped; only the leaf keeps its exact address.
	if len(s0.Location) != len(pcs)+1 {
		t.Fatalf("sample 0 has %d locations, want %d", len(s0.Location), len(pcs)+1)
	}
	if got := funcName(s0.Location[0]); !strings.HasSuffix(got, ".culpritTarget") {
		t.Errorf("leaf = %q", got)
	}
	if s0.Location[0].Address != target+1 || s0.Location[1].Address != uint64(pcs[0])-1 {
		t.Errorf("addresses = %#x, %#x; want %#x, %#x",
			s0.Location[0].Address, s0.Location[1].Address, target+1, uint64(pcs[0])-1)
	}
	if got := funcName(s0.Location[2]); !strings.HasSuffix(got, ".TestCPUProfile") {
		t.Errorf("caller = %q", got)
	}
	m := s0.Location[0].Mapping
	exe, _ := os.Executable()
	if m == nil || m.File != exe || m.Start > target || m.Limit <= target || !m.HasFunctions {
		t.Errorf("mapping = %+v", m)
	}
	// Sample 1's user frames are all return addresses, so the frame that
	// was a leaf in sample 0 (pcs[0]) is the same location there.
	nk := len(kernel)
	if len(s1.Location) != nk+len(pcs) {
		t.Fatalf("sample 1 has %d locations, want %d", len(s1.Location), nk+len(pcs))
	}
	if s1.Location[nk] != s0.Location[1] {
		t.Errorf("locations not shared between samples")
	}
	if nk > 0 {
		for i := range nk {
			if got := funcName(s1.Location[i]); got != "schedule" {
				t.Errorf("kernel frame %d = %q", i, got)
			}
		}
		if s1.Location[0].Mapping == nil || s1.Location[0].Mapping.File != kernelModule {
			t.Errorf("kernel mapping = %+v", s1.Location[0].Mapping)
		}
	} else {
		t.Log("kernel symbols unavailable: kernel frames not tested")
	}
	// Functions are deduplicated.
	seen := map[string]bool{}
	for _, f := range p.Function {
		if seen[f.Name] {
			t.Errorf("function %s twice", f.Name)
		}
		seen[f.Name] = true
	}

	// The profile survives a round trip and pprof itself reads it.
	var buf bytes.Buffer
	if err := p.Write(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := profile.Parse(bytes.NewReader(buf.Bytes())); err != nil {
		t.Fatalf("parse written profile: %v", err)
	}
	path := filepath.Join(t.TempDir(), "cpu.pb.gz")
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("SKIP: go not on PATH: `go tool pprof -top` NOT TESTED")
	}
	cmd := exec.Command(goBin, "tool", "pprof", "-top", path)
	cmd.Env = append(os.Environ(), "PPROF_BINARY_PATH=/nonexistent")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go tool pprof -top: %v\n%s", err, out)
	}
	for _, want := range []string{"symbolize.culpritTarget", "symbolize.TestCPUProfile", "Type: cpu"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("pprof -top output lacks %q:\n%s", want, out)
		}
	}
	if nk > 0 && !strings.Contains(string(out), "schedule") {
		t.Errorf("pprof -top output lacks schedule:\n%s", out)
	}
	t.Logf("pprof -top:\n%s", out)
}

func TestCPUProfileErrors(t *testing.T) {
	s := New(Options{})
	if _, err := s.CPUProfile(nil, ProfileOptions{}); err == nil {
		t.Error("zero period accepted")
	}
	// Unknown pids and addresses still give a valid profile.
	p, err := s.CPUProfile([]Sample{{Pid: 1 << 30, User: []uint64{0x1234, 0x5678}, Kernel: []uint64{0xffffffff00000000}, Count: 1}},
		ProfileOptions{Period: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Sample) != 1 || len(p.Sample[0].Location) != 1 {
		t.Fatalf("profile = %v", p)
	}
	for _, l := range p.Sample[0].Location {
		if len(l.Line) != 0 {
			t.Errorf("unknown address got a function: %+v", l.Line)
		}
	}
}

func funcName(l *profile.Location) string {
	if len(l.Line) == 0 {
		return ""
	}
	return l.Line[0].Function.Name
}
