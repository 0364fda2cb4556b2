package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// CPUCgroup puts a process under the quota and, at cleanup, gives it back
// to the parent cgroup alive and removes the cgroup.
func TestCPUCgroup(t *testing.T) {
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := cmd.Process.Pid
	procCgroup := func() string {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}

	var dir string
	t.Run("limited", func(t *testing.T) {
		dir = CPUCgroup(t, 0.25, pid)
		name := filepath.Base(dir)
		if !strings.Contains(procCgroup(), "/"+name+"\n") {
			t.Fatalf("pid %d not in %s:\n%s", pid, name, procCgroup())
		}
		// On v1, cpuacct too, mounted with cpu or apart.
		for line := range strings.Lines(procCgroup()) {
			parts := strings.SplitN(strings.TrimSpace(line), ":", 3)
			if len(parts) == 3 && slices.ContainsFunc(strings.Split(parts[1], ","), func(c string) bool { return c == "cpu" || c == "cpuacct" }) && !strings.HasSuffix(parts[2], "/"+name) {
				t.Fatalf("pid %d: %q is not %s", pid, line, name)
			}
		}
		var quota string
		if b, err := os.ReadFile(filepath.Join(dir, "cpu.cfs_quota_us")); err == nil {
			period, err := readCgroupInt(filepath.Join(dir, "cpu.cfs_period_us"))
			if err != nil {
				t.Fatal(err)
			}
			quota = strings.TrimSpace(string(b))
			if want := strconv.FormatInt(period/4, 10); quota != want {
				t.Fatalf("v1 cpu.cfs_quota_us %s, want %s (period %d)", quota, want, period)
			}
		} else {
			b, err := os.ReadFile(filepath.Join(dir, "cpu.max"))
			if err != nil {
				t.Fatal(err)
			}
			if quota = strings.TrimSpace(string(b)); quota != "25000 100000" {
				t.Fatalf("v2 cpu.max %q, want 25000 100000", quota)
			}
		}
		t.Logf("%s: quota %s", dir, quota)
	})
	if dir == "" {
		t.Skip("no CPU cgroup was made")
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("%s still there after cleanup (%v)", dir, err)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("cleanup ended pid %d: %v", pid, err)
	}
	if cg := procCgroup(); strings.Contains(cg, filepath.Base(dir)) {
		t.Fatalf("pid %d still in the removed cgroup:\n%s", pid, cg)
	}
}
