package collectors

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/culprit-dev/culprit/internal/testenv"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func TestMemoryCgroupPaths(t *testing.T) {
	hybrid := "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
	if v1, v2 := memoryCgroupPaths([]byte(hybrid)); v1 != "/process_api/abc" || v2 != "/" {
		t.Fatalf("hybrid: %q %q", v1, v2)
	}
	if v1, v2 := memoryCgroupPaths([]byte("0::/kubepods/pod1/app\n")); v1 != "" || v2 != "/kubepods/pod1/app" {
		t.Fatalf("v2: %q %q", v1, v2)
	}
}

func TestReadCgroupFixtures(t *testing.T) {
	v1, err := readV1("testdata/cgroup/v1/fs/cgroup/memory/app")
	if err != nil {
		t.Fatal(err)
	}
	// Captured from this machine: unlimited, page cache much larger than anon.
	if v1.Limit != 0 || v1.Usage <= 0 || v1.Stat["file"] != 472408064 || v1.Stat["anon"] != 2637824 {
		t.Fatalf("v1 %+v", v1)
	}
	if _, ok := v1.Events["oom_kill"]; !ok {
		t.Fatal("v1 oom_kill missing")
	}
	// v2 written by hand in the kernel's documented format
	// (Documentation/admin-guide/cgroup-v2.rst).
	v2, err := readV2("testdata/cgroup/v2/fs/cgroup/kubepods/pod1/app")
	if err != nil {
		t.Fatal(err)
	}
	want := cgroupMemory{Version: 2, Usage: 123731968, Limit: 134217728,
		Stat:     map[string]float64{"anon": 104857600, "file": 16777216, "shmem": 1048576, "kernel": 2097152, "sock": 0},
		Events:   map[string]float64{"oom": 2, "oom_kill": 1, "max": 12, "high": 0},
		Pressure: map[string]float64{"some": 0.015, "full": 0.005}}
	if diff := cmp.Diff(want, v2); diff != "" {
		t.Fatalf("v2 (-want +got):\n%s", diff)
	}
}

// A real child in a real memory cgroup with a 256 MiB limit. This machine
// mounts the memory controller on v1 only; a pure v2 machine gets a v2
// cgroup instead. As root, neither working is a failure.
func TestCgroupCollectorRealLimit(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	dir, version := testenv.MemoryCgroup(t, 256<<20, l.PID)
	l.MustDo(t, "retain 32")
	st := signals.New(16, 100)
	c := newCgroupCollector(Options{})
	if err := c.Collect(context.Background(), workload.Process{PID: l.PID}, st); err != nil {
		t.Fatal(err)
	}
	info := st.Select(signals.CgroupInfo)
	if len(info) != 1 || info[0].Get("version") != strconv.Itoa(version) || !strings.HasSuffix(dir, info[0].Get("path")) {
		t.Fatalf("cgroup_info %v, want version %d path of %s", info, version, dir)
	}
	if lim, _ := st.Latest(signals.CgroupMemoryLimitBytes, nil); lim.V != 256<<20 {
		t.Fatalf("limit %v, want 256 MiB", lim.V)
	}
	if u, _ := st.Latest(signals.CgroupMemoryUsageBytes, nil); u.V < 32<<20 {
		t.Fatalf("usage %v, want at least the 32 MiB retained", u.V)
	}
	if a, _ := st.Latest(signals.CgroupMemoryStatBytes, signals.L("kind", "anon")); a.V < 32<<20 {
		t.Fatalf("anon %v, want at least 32 MiB", a.V)
	}
}

// A target at the root of the v1 memory hierarchy: the root's usage and
// OOM kills are the host's, so nothing is reported (this host's root
// said 3.4 GiB used and 3 OOM kills, none of them the target's), and
// what was reported of an earlier cgroup is forgotten. A container's
// namespace root ("/" from inside it) is an ordinary cgroup and is read.
func TestMemoryCgroupAtTheRoot(t *testing.T) {
	st := signals.New(16, 100)
	ns := newCgroupCollector(Options{ProcRoot: "testdata/cgroup/cpu-v2-ns/proc", SysRoot: "testdata/cgroup/cpu-v2-ns/sys"})
	if err := ns.Collect(context.Background(), workload.Process{PID: 7}, st); err != nil {
		t.Fatalf("namespace root: %v", err)
	}
	if u, _ := st.Latest(signals.CgroupMemoryUsageBytes, nil); u.V != 67108864 {
		t.Fatalf("namespace root usage %v", u.V)
	}
	root := newCgroupCollector(Options{ProcRoot: "testdata/cgroup/cpu-v1/proc", SysRoot: "testdata/cgroup/cpu-v1/sys"})
	if err := root.Collect(context.Background(), workload.Process{PID: 4545}, st); !errors.Is(err, ErrNoData) {
		t.Fatalf("v1 root: %v, want ErrNoData", err)
	}
	for _, name := range memorySignals {
		if ls := st.Select(name); len(ls) != 0 {
			t.Errorf("%s kept %v", name, ls)
		}
	}
}

// memory.stat without a key leaves that kind unknown, not zero.
func TestReadV1StatKeysAbsent(t *testing.T) {
	dir := t.TempDir()
	for f, v := range map[string]string{"memory.usage_in_bytes": "1000", "memory.limit_in_bytes": "2000", "memory.stat": "total_rss 600\n"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	m, err := readV1(dir)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]float64{"anon": 600}, m.Stat); diff != "" {
		t.Errorf("stat (-want +got):\n%s", diff)
	}
}

// MemoryLimitOf reads a process's own cgroup limit, as the agent reads its
// own to set its Go memory limit.
func TestMemoryLimitOf(t *testing.T) {
	l := testenv.StartLeaker(t, testenv.LeakerOptions{})
	dir, _ := testenv.MemoryCgroup(t, 96<<20, l.PID)
	got, path, err := MemoryLimitOf("/proc", "/sys", l.PID)
	if err != nil {
		t.Fatal(err)
	}
	if got != 96<<20 || !strings.HasSuffix(dir, path) {
		t.Fatalf("MemoryLimitOf = %d in %q, want %d in %s", got, path, 96<<20, dir)
	}
	// A container's own view (cgroup namespace: it is at "/"): the limit
	// of its namespace root, 128 MiB in the fixture.
	if got, _, err := MemoryLimitOf("testdata/cgroup/cpu-v2-ns/proc", "testdata/cgroup/cpu-v2-ns/sys", 7); got != 128<<20 {
		t.Errorf("namespace root: MemoryLimitOf = %d (%v), want %d", got, err, 128<<20)
	}
}
