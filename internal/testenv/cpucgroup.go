package testenv

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// CPUCgroup creates a CPU cgroup limited to quotaCores (CFS quota =
// quotaCores × period) below the test's own cgroup, moves pid into it, and
// returns its directory. When the test ends it moves the processes back to
// the parent cgroup and removes the cgroup; it does not end pid.
//
// Hosts that mount the cpu controller on v1 (this project's machines) get
// v1, and when cpuacct is a hierarchy of its own pid also moves into a
// cgroup of the same name there, so that cpuacct.usage is pid's alone.
// Hosts with the cpu controller on v2 get v2. Without root or without a
// cpu controller the test is skipped, with the reason; under CI=true it
// fails instead.
func CPUCgroup(t testing.TB, quotaCores float64, pid int) string {
	t.Helper()
	return cpuCgroup(t, quotaCores, pid, true)
}

// CPUCgroupOutsideCPUAcct is CPUCgroup on a v1 host that mounts cpuacct
// apart from cpu, except that pid stays where it is in cpuacct (for a test
// run from the root cgroup, as here, the root): a quota whose tasks no
// cpuacct group of their own counts, the condition in which the root's
// host-wide usage was once reported as the cgroup's. Where cpu and
// cpuacct are one hierarchy, or on v2, the condition cannot exist and the
// test is skipped, with the reason.
func CPUCgroupOutsideCPUAcct(t testing.TB, quotaCores float64, pid int) string {
	t.Helper()
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	cpu := v1Hierarchy(self, "cpu", "cpu.cfs_quota_us")
	if cpu == "" || isFile(filepath.Join(cpu, "cpuacct.usage")) || v1Hierarchy(self, "cpuacct", "cpuacct.usage") == "" {
		t.Skip("testenv: cpu and cpuacct are not separate v1 hierarchies here: a cpu cgroup outside cpuacct cannot be made")
	}
	return cpuCgroup(t, quotaCores, pid, false)
}

func cpuCgroup(t testing.TB, quotaCores float64, pid int, acctToo bool) string {
	t.Helper()
	if os.Geteuid() != 0 {
		skipUnlessCI(t, "testenv: not root: cannot create a CPU cgroup")
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	name := fmt.Sprintf("culprit-cpu-test-%d-%d", os.Getpid(), pid)
	if parent := v1Hierarchy(self, "cpu", "cpu.cfs_quota_us"); parent != "" {
		dir := makeCgroup(t, parent, name)
		period, err := readCgroupInt(filepath.Join(dir, "cpu.cfs_period_us"))
		if err != nil {
			t.Fatalf("testenv: %v", err)
		}
		writeCgroupFile(t, dir, "cpu.cfs_quota_us", strconv.FormatInt(int64(math.Round(quotaCores*float64(period))), 10))
		if acct := v1Hierarchy(self, "cpuacct", "cpuacct.usage"); acctToo && acct != "" && !isFile(filepath.Join(dir, "cpuacct.usage")) {
			writeCgroupFile(t, makeCgroup(t, acct, name), "cgroup.procs", strconv.Itoa(pid))
		}
		writeCgroupFile(t, dir, "cgroup.procs", strconv.Itoa(pid))
		return dir
	}
	for _, root := range []string{"/sys/fs/cgroup", "/sys/fs/cgroup/unified"} {
		ctrls, err := os.ReadFile(filepath.Join(root, "cgroup.controllers"))
		if err != nil || !slices.Contains(strings.Fields(string(ctrls)), "cpu") {
			continue
		}
		// Under the root, which alone may have both processes and
		// controller-enabled children, as MemoryCgroup does.
		sub, err := os.ReadFile(filepath.Join(root, "cgroup.subtree_control"))
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Contains(strings.Fields(string(sub)), "cpu") {
			writeCgroupFile(t, root, "cgroup.subtree_control", "+cpu")
		}
		const period = 100000
		dir := makeCgroup(t, root, name)
		writeCgroupFile(t, dir, "cpu.max", fmt.Sprintf("%d %d", int64(math.Round(quotaCores*period)), period))
		writeCgroupFile(t, dir, "cgroup.procs", strconv.Itoa(pid))
		return dir
	}
	skipUnlessCI(t, "testenv: no cpu controller on cgroup v1 or v2")
	return ""
}

// v1Hierarchy returns this process's directory in the v1 hierarchy that
// holds controller, found by a file only that controller has; "" when the
// controller is not mounted on v1.
func v1Hierarchy(procCgroup []byte, controller, file string) string {
	for line := range strings.Lines(string(procCgroup)) {
		parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
		if len(parts) != 3 || !slices.Contains(strings.Split(parts[1], ","), controller) {
			continue
		}
		for _, m := range []string{parts[1], controller} {
			if d := filepath.Join("/sys/fs/cgroup", m, parts[2]); isFile(filepath.Join(d, file)) {
				return d
			}
		}
	}
	return ""
}

// makeCgroup creates parent/name and, at cleanup, moves whatever is in it
// back to parent and removes it.
func makeCgroup(t testing.TB, parent, name string) string {
	t.Helper()
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("testenv: create cgroup: %v", err)
	}
	t.Cleanup(func() {
		var err error
		for i := 0; i < 100; i++ {
			if err = evacuate(dir, parent); err == nil {
				if err = os.Remove(dir); err == nil {
					return
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		t.Errorf("testenv: remove cgroup %s: %v", dir, err)
	})
	return dir
}

// evacuate moves every process of dir into parent.
func evacuate(dir, parent string) error {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return err
	}
	for _, p := range strings.Fields(string(b)) {
		// One pid per write; a process that exited meanwhile is ESRCH.
		if err := os.WriteFile(filepath.Join(parent, "cgroup.procs"), []byte(p), 0o644); err != nil && !processGone(p) {
			return fmt.Errorf("move %s to %s: %w", p, parent, err)
		}
	}
	return nil
}

func writeCgroupFile(t testing.TB, dir, file, value string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, file), []byte(value), 0o644); err != nil {
		t.Fatalf("testenv: write %q to %s: %v", value, filepath.Join(dir, file), err)
	}
}

func readCgroupInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
}

func processGone(pid string) bool {
	_, err := os.Stat("/proc/" + pid)
	return err != nil
}

// skipUnlessCI skips the test with the reason, or fails it under CI=true,
// where the environment is expected to provide what is missing.
func skipUnlessCI(t testing.TB, reason string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(reason)
	}
	t.Skip(reason)
}
