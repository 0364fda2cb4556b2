package testenv

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// MemoryCgroup creates a memory cgroup with limit bytes below the test's
// own cgroup, moves pid into it, and when the test ends kills pid and
// removes the cgroup. It
// returns the directory and the cgroup version. Hosts that mount the
// memory controller on v1 (this project's machines) get v1; pure v2 hosts
// get v2. As root, neither working fails the test.
func MemoryCgroup(t testing.TB, limit int64, pid int) (string, int) {
	t.Helper()
	self, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	var v1 string
	for _, line := range bytes.Split(self, []byte("\n")) {
		parts := bytes.SplitN(line, []byte(":"), 3)
		if len(parts) == 3 && bytes.Contains(append(append([]byte(","), parts[1]...), ','), []byte(",memory,")) {
			v1 = string(parts[2])
		}
	}
	name := fmt.Sprintf("culprit-test-%d-%d", os.Getpid(), pid)
	var dir, limitFile string
	version := 0
	switch {
	case v1 != "" && isDir("/sys/fs/cgroup/memory"+v1):
		dir, limitFile, version = filepath.Join("/sys/fs/cgroup/memory", v1, name), "memory.limit_in_bytes", 1
	case isFile("/sys/fs/cgroup/cgroup.controllers"):
		dir, limitFile, version = filepath.Join("/sys/fs/cgroup", name), "memory.max", 2
	default:
		if os.Geteuid() == 0 {
			t.Fatal("testenv: no memory cgroup hierarchy (v1 or v2) although root")
		}
		t.Skip("not root: cannot create a memory cgroup")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatalf("testenv: create memory cgroup: %v", err)
	}
	// A cgroup with a process in it cannot be removed, and cleanups run
	// last-registered first, before the child's own: end the child here.
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 100; i++ {
			if b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err != nil || len(bytes.TrimSpace(b)) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		if err := os.Remove(dir); err != nil {
			t.Errorf("testenv: remove cgroup %s: %v", dir, err)
		}
	})
	if err := os.WriteFile(filepath.Join(dir, limitFile), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		t.Fatalf("testenv: set %s: %v", limitFile, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		t.Fatalf("testenv: move %d into %s: %v", pid, dir, err)
	}
	return dir, version
}

func isDir(p string) bool  { st, err := os.Stat(p); return err == nil && st.IsDir() }
func isFile(p string) bool { st, err := os.Stat(p); return err == nil && !st.IsDir() }
