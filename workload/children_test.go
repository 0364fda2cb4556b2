package workload

import (
	"os/exec"
	"slices"
	"testing"
	"time"
)

func TestChildren(t *testing.T) {
	cmd := exec.Command("bash", "-c", "sleep 30 & sleep 30 & wait")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	var kids []int
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if kids = Children("/proc", cmd.Process.Pid, 16); len(kids) == 2 {
			break
		}
	}
	if len(kids) != 2 || !slices.IsSorted(kids) {
		t.Fatalf("children of bash %d: %v, want its two sleeps", cmd.Process.Pid, kids)
	}
	if got := Children("/proc", cmd.Process.Pid, 1); len(got) != 1 {
		t.Errorf("max 1: %v", got)
	}
	// The kernel's children files and the scan of every stat agree.
	if files, ok := childrenFiles("/proc", cmd.Process.Pid, 16); !ok || !slices.Equal(files, childrenScan("/proc", cmd.Process.Pid, 16)) {
		t.Errorf("children files %v (%v), scan %v", files, ok, childrenScan("/proc", cmd.Process.Pid, 16))
	}
	for _, in := range []string{"12 (a) b) S 7 1", "1 (x) R 0"} {
		if _, ok := parsePPID([]byte(in)); !ok {
			t.Errorf("parsePPID(%q) failed", in)
		}
	}
	if p, _ := parsePPID([]byte("12 (a) b) S 7 1")); p != 7 {
		t.Errorf("ppid %d, want 7", p)
	}
	if _, ok := parsePPID([]byte("garbage")); ok {
		t.Error("parsePPID accepted garbage")
	}
}
