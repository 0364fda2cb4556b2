package collectors

import (
	"context"
	"errors"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func TestCgroupOf(t *testing.T) {
	for _, c := range []struct {
		file, controller          string
		wantMount, wantV1, wantV2 string
	}{
		// This host: every controller a hierarchy of its own.
		{"4:memory:/process_api/abc\n2:cpuacct:/a\n1:cpu:/b\n0::/\n", "cpu", "cpu", "/b", "/"},
		{"4:memory:/process_api/abc\n2:cpuacct:/a\n1:cpu:/b\n0::/\n", "cpuacct", "cpuacct", "/a", "/"},
		// Docker on v1: cpu and cpuacct mounted together.
		{"11:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n", "cpu", "cpu,cpuacct", "/docker/abc", "/"},
		{"11:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n", "cpuacct", "cpu,cpuacct", "/docker/abc", "/"},
		// cpuset is not cpu.
		{"3:cpuset:/x\n0::/kubepods/pod1/app", "cpu", "", "", "/kubepods/pod1/app"},
		{"", "cpu", "", "", ""},
	} {
		m, v1, v2 := cgroupOf([]byte(c.file), c.controller)
		if m != c.wantMount || v1 != c.wantV1 || v2 != c.wantV2 {
			t.Errorf("%q %s: %q %q %q, want %q %q %q", c.file, c.controller, m, v1, v2, c.wantMount, c.wantV1, c.wantV2)
		}
	}
}

func TestParseCPUMax(t *testing.T) {
	for in, want := range map[string][2]float64{"max 100000\n": {0, 0}, "50000 100000\n": {0.5, 0.1}, "250000 100000": {2.5, 0.1}, "5000 10000": {0.5, 0.01}} {
		if cores, period, err := parseCPUMax([]byte(in)); err != nil || cores != want[0] || period != want[1] {
			t.Errorf("%q: %v %v %v, want %v", in, cores, period, err, want)
		}
	}
	for _, in := range []string{"", "max", "x 100000", "50000 0", "1 2 3"} {
		if _, _, err := parseCPUMax([]byte(in)); !errors.Is(err, errParse) {
			t.Errorf("%q: %v, want errParse", in, err)
		}
	}
}

// The fixture trees hold /proc/PID/cgroup files under proc/ and cgroup
// files under sys/fs/cgroup/. cpu-v1 pid 4242 was captured on this host
// (cpu and cpuacct mounted apart) from a shell loop under a 0.2-core
// quota for 1.5 s, and the roots of cpuacct and memory from this host's;
// the rest is written by hand in the kernel's documented formats
// (Documentation/scheduler/sched-bwc.rst and
// Documentation/admin-guide/cgroup-v2.rst).
func TestReadCPUCgroupFixtures(t *testing.T) {
	throttledV2 := map[*signals.Desc]float64{
		signals.CgroupCPUPeriodsTotal: 1200, signals.CgroupCPUThrottledPeriodsTotal: 480,
		signals.CgroupCPUThrottledSecondsTotal: 36.5, signals.CgroupCPUUsageSecondsTotal: 8.123456}
	v1Fixture := map[*signals.Desc]float64{signals.CgroupCPUPeriodsTotal: 17, signals.CgroupCPUThrottledPeriodsTotal: 15,
		signals.CgroupCPUThrottledSecondsTotal: 1.130247877}
	withUsage := maps.Clone(v1Fixture)
	withUsage[signals.CgroupCPUUsageSecondsTotal] = 0.342243367
	for _, c := range []struct {
		tree     string
		pid      int
		wantPath string
		want     cgroupCPU
	}{
		{"cpu-v1", 4242, "/culprit-fixture", cgroupCPU{Version: 1, Quota: 0.2, Period: 0.1, Usage: "cpuacct", Counters: withUsage}},
		// The cpu group has the quota, but cpuacct holds the target at its
		// root: the root's usage is the host's, so the usage is unknown
		// (this host's cpuacct.usage read 788 s here).
		{"cpu-v1", 4545, "/culprit-fixture", cgroupCPU{Version: 1, Quota: 0.2, Period: 0.1, Usage: "unknown_root", Counters: v1Fixture}},
		// cpuacct holds it in another group: not the quota's tasks.
		{"cpu-v1", 4747, "/culprit-fixture", cgroupCPU{Version: 1, Quota: 0.2, Period: 0.1, Usage: "unknown_other_cgroup", Counters: v1Fixture}},
		{"cpu-v1", 4343, "/docker/abc", cgroupCPU{Version: 1, Usage: "cpuacct", Counters: map[*signals.Desc]float64{
			signals.CgroupCPUPeriodsTotal: 0, signals.CgroupCPUThrottledPeriodsTotal: 0,
			signals.CgroupCPUThrottledSecondsTotal: 0, signals.CgroupCPUUsageSecondsTotal: 2318.427060429}}},
		{"cpu-v2", 100, "/kubepods/pod1/app", cgroupCPU{Version: 2, Quota: 0.5, Period: 0.1, Usage: "cpu.stat", Counters: throttledV2,
			Pressure: map[string]float64{"some": 0.425, "full": 0.38}}},
		// In a pod each container has its own cgroup namespace: the app's
		// cgroup, seen from the agent's, is outside it, and is read
		// through the app's own /sys/fs/cgroup.
		{"cpu-v2", 102, "/../app-container", cgroupCPU{Version: 2, Quota: 0.5, Period: 0.1, Usage: "cpu.stat", Counters: throttledV2,
			Pressure: map[string]float64{"some": 0.425, "full": 0.38}}},
		// Hybrid host, target outside any v1 cpu cgroup: v2 under
		// unified/ without the cpu controller has usage and PSI only.
		{"cpu-v2", 101, "/system.slice/web.service", cgroupCPU{Version: 2, Usage: "cpu.stat", Counters: map[*signals.Desc]float64{
			signals.CgroupCPUUsageSecondsTotal: 2299.408},
			Pressure: map[string]float64{"some": 0.0127, "full": 0}}},
		// The agent and the app in one container with its own cgroup
		// namespace: "/" is the container's cgroup, not the host's root.
		{"cpu-v2-ns", 7, "/", cgroupCPU{Version: 2, Quota: 0.25, Period: 0.1, Usage: "cpu.stat", Counters: map[*signals.Desc]float64{
			signals.CgroupCPUPeriodsTotal: 300, signals.CgroupCPUThrottledPeriodsTotal: 120,
			signals.CgroupCPUThrottledSecondsTotal: 9, signals.CgroupCPUUsageSecondsTotal: 4}}},
	} {
		root := filepath.Join("testdata/cgroup", c.tree)
		col := newCPUCgroupCollector(Options{ProcRoot: filepath.Join(root, "proc"), SysRoot: filepath.Join(root, "sys")})
		st := signals.New(16, 100)
		if err := col.Collect(context.Background(), workload.Process{PID: c.pid}, st); err != nil {
			t.Fatalf("%s pid %d: %v", c.tree, c.pid, err)
		}
		// What the store got is what the files say.
		got := cgroupCPU{Counters: map[*signals.Desc]float64{}}
		info := st.Select(signals.CgroupCPUInfo)
		if len(info) != 1 || info[0].Get("path") != c.wantPath {
			t.Fatalf("%s pid %d: cgroup_cpu_info %v, want path %s", c.tree, c.pid, info, c.wantPath)
		}
		got.Version = map[string]int{"1": 1, "2": 2}[info[0].Get("version")]
		got.Usage = info[0].Get("usage")
		if q, ok := st.Latest(signals.CgroupCPUQuotaCores, nil); ok {
			got.Quota = q.V
		}
		if p, ok := st.Latest(signals.CgroupCPUPeriodSeconds, nil); ok {
			got.Period = p.V
		}
		for _, d := range cpuCounters {
			if s, ok := st.Latest(d, nil); ok {
				got.Counters[d] = s.V
			}
		}
		for _, typ := range []string{"some", "full"} {
			if s, ok := st.Latest(signals.CgroupCPUPressureAvg10Ratio, signals.L("type", typ)); ok {
				if got.Pressure == nil {
					got.Pressure = map[string]float64{}
				}
				got.Pressure[typ] = s.V
			}
		}
		if diff := cmp.Diff(c.want, got, cmp.Comparer(func(a, b float64) bool { return math.Abs(a-b) < 1e-9 })); diff != "" {
			t.Errorf("%s pid %d (-want +got):\n%s", c.tree, c.pid, diff)
		}
	}
}

// A target at the root of the cpu hierarchy (v1) or in the root cgroup
// (v2) has no quota of its own, and the root's counters are the host's:
// nothing is reported, and what was reported before is forgotten.
func TestCPUCgroupAtTheRoot(t *testing.T) {
	for _, c := range []struct {
		tree string
		pid  int
	}{{"cpu-v1", 4646}, {"cpu-v2", 103}} {
		root := filepath.Join("testdata/cgroup", c.tree)
		col := newCPUCgroupCollector(Options{ProcRoot: filepath.Join(root, "proc"), SysRoot: filepath.Join(root, "sys")})
		st := signals.New(16, 100)
		// Before, the target was in a limited cgroup.
		if err := newCPUCgroupCollector(Options{ProcRoot: "testdata/cgroup/cpu-v2/proc", SysRoot: "testdata/cgroup/cpu-v2/sys"}).Collect(context.Background(), workload.Process{PID: 100}, st); err != nil {
			t.Fatal(err)
		}
		if err := col.Collect(context.Background(), workload.Process{PID: c.pid}, st); !errors.Is(err, ErrNoData) {
			t.Fatalf("%s pid %d at the root: %v, want ErrNoData", c.tree, c.pid, err)
		}
		for _, name := range []*signals.Desc{signals.CgroupCPUInfo, signals.CgroupCPUUsageSecondsTotal, signals.CgroupCPUQuotaCores, signals.CgroupCPUPeriodsTotal, signals.CgroupCPUPressureAvg10Ratio} {
			if ls := st.Select(name); len(ls) != 0 {
				t.Errorf("%s pid %d: %s kept %v", c.tree, c.pid, name, ls)
			}
		}
	}
}

func TestCPUCgroupMissing(t *testing.T) {
	root := "testdata/cgroup/cpu-v1"
	col := newCPUCgroupCollector(Options{ProcRoot: filepath.Join(root, "proc"), SysRoot: filepath.Join(root, "sys")})
	// pid 4444 names a v1 cpu cgroup that is not there, and v2's root
	// has no cpu.stat.
	if err := col.Collect(context.Background(), workload.Process{PID: 4444}, signals.New(16, 100)); !errors.Is(err, ErrNoData) {
		t.Fatalf("missing cgroup: %v, want ErrNoData", err)
	}
	if err := col.Collect(context.Background(), workload.Process{PID: 1}, signals.New(16, 100)); err == nil || errors.Is(err, ErrNoData) {
		t.Fatalf("missing process: %v, want an error other than ErrNoData", err)
	}
}

// The quota going away forgets the quota gauge, and a new cgroup path
// replaces the old info series (pid 100 is limited, 101 is not).
func TestCPUCgroupForgetsQuotaAndOldPath(t *testing.T) {
	root := "testdata/cgroup/cpu-v2"
	col := newCPUCgroupCollector(Options{ProcRoot: filepath.Join(root, "proc"), SysRoot: filepath.Join(root, "sys")})
	st := signals.New(16, 100)
	for _, pid := range []int{100, 101} {
		if err := col.Collect(context.Background(), workload.Process{PID: pid}, st); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := st.Latest(signals.CgroupCPUQuotaCores, nil); ok {
		t.Error("quota kept after the cgroup became unlimited")
	}
	if info := st.Select(signals.CgroupCPUInfo); len(info) != 1 || info[0].Get("path") != "/system.slice/web.service" {
		t.Errorf("cgroup_cpu_info %v", info)
	}
}

// startCPUChild runs a shell script for at most a minute; it is killed
// when the test ends.
func startCPUChild(t *testing.T, script string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	cmd := exec.CommandContext(ctx, "sh", "-c", script)
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		cmd.Wait()
	})
	return cmd.Process.Pid
}

// collectFor runs the collector every 250 ms for d.
func collectFor(t *testing.T, pid int, st *signals.Store, d time.Duration) {
	t.Helper()
	c := newCPUCgroupCollector(Options{})
	for end := time.Now().Add(d); ; time.Sleep(250 * time.Millisecond) {
		if err := c.Collect(context.Background(), workload.Process{PID: pid}, st); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(end) {
			return
		}
	}
}

func counterGrowth(st *signals.Store, d *signals.Desc) float64 {
	return st.Increase(d, nil, time.Time{})
}

// A real busy loop under a real 0.2-core quota is throttled, and the rule
// names it.
func TestCPUCgroupRealThrottling(t *testing.T) {
	pid := startCPUChild(t, "while :; do :; done")
	dir := testenv.CPUCgroup(t, 0.2, pid)
	st := signals.New(64, 100)
	start := time.Now()
	collectFor(t, pid, st, 1500*time.Millisecond)
	elapsed := time.Since(start)

	info := st.Select(signals.CgroupCPUInfo)
	if len(info) != 1 || !strings.HasSuffix(dir, info[0].Get("path")) {
		t.Fatalf("cgroup_cpu_info %v, want the path of %s", info, dir)
	}
	if q, _ := st.Latest(signals.CgroupCPUQuotaCores, nil); math.Abs(q.V-0.2) > 0.005 {
		t.Fatalf("quota %v cores, want 0.2", q.V)
	}
	periods, throttled := counterGrowth(st, signals.CgroupCPUPeriodsTotal), counterGrowth(st, signals.CgroupCPUThrottledPeriodsTotal)
	usage, waited := counterGrowth(st, signals.CgroupCPUUsageSecondsTotal), counterGrowth(st, signals.CgroupCPUThrottledSecondsTotal)
	t.Logf("in %s: %v of %v periods throttled, %.3f s used, %.3f s throttled", elapsed.Round(time.Millisecond), throttled, periods, usage, waited)
	if throttled <= 0 || waited <= 0 {
		t.Fatalf("a busy loop under 0.2 cores was not throttled: %v of %v periods, %.3f s", throttled, periods, waited)
	}
	if cores := usage / elapsed.Seconds(); cores <= 0 || cores > 0.3 {
		t.Fatalf("usage %.3f cores under a 0.2-core quota", cores)
	}

	r := rules.NewCPUThrottling(rules.CPUThrottlingOptions{Window: 2 * time.Second})
	obs := r.Evaluate(rules.Window{Store: st, Now: time.Now()})
	if len(obs) != 1 || obs[0].Cause != rules.CauseCPUQuotaThrottled {
		t.Fatalf("rule: %+v", obs)
	}
	t.Logf("%s: %s", obs[0].Title, obs[0].RootCause)
	if obs[0].Labels["cgroup"] != info[0].Get("path") || !strings.Contains(obs[0].RootCause, "0.2 cores") {
		t.Errorf("finding does not name the cgroup and its quota: %+v", obs[0])
	}
}

// A sleeping process under a 1.5-core quota: never throttled, rule silent.
func TestCPUCgroupRealHealthy(t *testing.T) {
	pid := startCPUChild(t, "exec sleep 60")
	testenv.CPUCgroup(t, 1.5, pid)
	st := signals.New(64, 100)
	collectFor(t, pid, st, time.Second)
	if q, _ := st.Latest(signals.CgroupCPUQuotaCores, nil); math.Abs(q.V-1.5) > 0.005 {
		t.Fatalf("quota %v cores, want 1.5", q.V)
	}
	if th := counterGrowth(st, signals.CgroupCPUThrottledPeriodsTotal); th != 0 {
		t.Fatalf("a sleeping process was throttled in %v periods", th)
	}
	r := rules.NewCPUThrottling(rules.CPUThrottlingOptions{Window: 2 * time.Second})
	if obs := r.Evaluate(rules.Window{Store: st, Now: time.Now()}); len(obs) != 0 {
		t.Fatalf("healthy cgroup raised %+v", obs[0])
	}
}

// The memory collector reads the app's cgroup through its own mount too,
// when the app's cgroup is outside the agent's cgroup namespace.
func TestMemoryCgroupOutsideOurNamespace(t *testing.T) {
	root := "testdata/cgroup/cpu-v2"
	col := newCgroupCollector(Options{ProcRoot: filepath.Join(root, "proc"), SysRoot: filepath.Join(root, "sys")})
	st := signals.New(16, 100)
	if err := col.Collect(context.Background(), workload.Process{PID: 102}, st); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(filepath.Join(root, "proc/102/root/sys/fs/cgroup/memory.current"))
	if err != nil {
		t.Fatal(err)
	}
	if v, ok := st.Latest(signals.CgroupMemoryUsageBytes, nil); !ok || strconv.FormatFloat(v.V, 'f', -1, 64) != strings.TrimSpace(string(want)) {
		t.Errorf("usage %v (%v), want %s", v.V, ok, want)
	}
}

// A real busy loop under a real 0.2-core quota in a v1 cpu cgroup, left
// at the root of the separate cpuacct hierarchy (this host's layout when
// only cpu is delegated): the collector must not take the root's
// cpuacct.usage (the whole host's) as the cgroup's, and the rule says the
// usage is unknown instead of "it used 1.4 cores (698% of the limit)".
func TestCPUCgroupRealOutsideCPUAcct(t *testing.T) {
	pid := startCPUChild(t, "while :; do :; done")
	testenv.CPUCgroupOutsideCPUAcct(t, 0.2, pid)
	hostUsage := func() float64 {
		v, err := readNumber("/sys/fs/cgroup/cpuacct/cpuacct.usage")
		if err != nil {
			t.Fatal(err)
		}
		return v / 1e9
	}
	st := signals.New(64, 100)
	start, host0 := time.Now(), hostUsage()
	collectFor(t, pid, st, 2*time.Second)
	hostCores := (hostUsage() - host0) / time.Since(start).Seconds()

	info := st.Select(signals.CgroupCPUInfo)
	if len(info) != 1 || info[0].Get("usage") != "unknown_root" {
		t.Fatalf("cgroup_cpu_info %v, want usage=unknown_root", info)
	}
	if _, ok := st.Latest(signals.CgroupCPUUsageSecondsTotal, nil); ok {
		t.Fatal("the root's cpuacct.usage reported as the cgroup's usage")
	}
	if th := counterGrowth(st, signals.CgroupCPUThrottledPeriodsTotal); th <= 0 {
		t.Fatalf("a busy loop under 0.2 cores was not throttled")
	}
	r := rules.NewCPUThrottling(rules.CPUThrottlingOptions{Window: 2 * time.Second})
	obs := r.Evaluate(rules.Window{Store: st, Now: time.Now()})
	if len(obs) != 1 {
		t.Fatalf("rule: %+v", obs)
	}
	o := obs[0]
	t.Logf("the host used %.2f cores meanwhile (what the root's counter says)\n%s\n%s\n%s", hostCores, o.Title, o.RootCause, o.Remediation)
	if !strings.Contains(o.RootCause, "its CPU usage is unknown: the target is at the root of the cpuacct hierarchy") || strings.Contains(o.RootCause, "it used") || strings.Contains(o.RootCause, "of the limit)") {
		t.Errorf("root cause: %s", o.RootCause)
	}
	for _, e := range o.Evidence {
		if e.Signal == signals.CgroupCPUUsageSecondsTotal.Name {
			t.Errorf("usage evidence %+v", e)
		}
	}
}
