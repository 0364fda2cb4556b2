package collectors

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/procfs"
)

// The memory and fds collectors parse /proc/PID/status and
// /proc/PID/limits by hand instead of through procfs's Proc.NewStatus and
// Proc.Limits. Why, measured here and written down in docs/DESIGN.md
// ("Kept libraries"):
//
//   - status is read on every collector cycle. NewStatus opens the file,
//     reads it into a fresh buffer and converts every line to strings:
//     8.4 KB in 111 allocations per read on this project's VM, against
//     0.5 KB in 7 for the hand parser reading through a descriptor kept
//     open (BenchmarkStatusMemory).
//   - Limits (NewLimits, now deprecated) keeps only the soft limit of each
//     resource. The fd_exhaustion rule tells a soft limit that the process
//     may raise from a hard one that it may not, so it needs both.
//
// The tests below check the hand parsers against procfs on the same bytes,
// so the two cannot drift apart unnoticed.

// sleeper is a process whose status does not move while it is read twice.
func sleeper(t testing.TB) int {
	t.Helper()
	cmd := exec.Command("sleep", "60")
	if err := cmd.Start(); err != nil {
		t.Fatalf("start sleep: %v", err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	// Until exec completes, /proc/PID describes the forked copy of this
	// test binary; and the loader still maps pages for a moment after.
	// Wait for its own name and two equal readings of its status.
	status := filepath.Join("/proc", strconv.Itoa(pid), "status")
	var last []byte
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		comm, _ := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "comm"))
		b, err := os.ReadFile(status)
		if err == nil && string(comm) == "sleep\n" && bytes.Equal(b, last) {
			return pid
		}
		last = b
	}
	t.Fatalf("sleep (pid %d) did not settle within 5 s", pid)
	return 0
}

// sleeperFile is a settled sleeper for procfs, and the bytes of its
// /proc/PID/name for the hand parser.
func sleeperFile(t *testing.T, name string) (procfs.Proc, []byte) {
	t.Helper()
	pid := sleeper(t)
	p, err := procfs.NewProc(pid)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), name))
	if err != nil {
		t.Fatal(err)
	}
	return p, b
}

func TestStatusMemoryAgreesWithProcfs(t *testing.T) {
	p, b := sleeperFile(t, "status")
	want, err := p.NewStatus()
	if err != nil {
		t.Fatalf("procfs NewStatus: %v", err)
	}
	got, err := parseStatusMemory(b)
	if err != nil {
		t.Fatalf("parseStatusMemory: %v", err)
	}
	for _, c := range []struct {
		name string
		got  float64
		want uint64
	}{
		{"VmRSS", got.VmRSS, want.VmRSS}, {"VmSize", got.VmSize, want.VmSize},
		{"RssAnon", got.RssAnon, want.RssAnon}, {"RssFile", got.RssFile, want.RssFile},
		{"RssShmem", got.RssShmem, want.RssShmem},
	} {
		if c.want == 0 && c.name != "RssShmem" {
			t.Errorf("procfs read %s as 0: the comparison proves nothing", c.name)
		}
		if uint64(c.got) != c.want {
			t.Errorf("%s: hand parser %v bytes, procfs %d", c.name, c.got, c.want)
		}
	}
}

func TestNofileAgreesWithProcfs(t *testing.T) {
	p, b := sleeperFile(t, "limits")
	want, err := p.Limits()
	if err != nil {
		t.Fatalf("procfs Limits: %v", err)
	}
	soft, hard, softOK, hardOK, err := parseNofile(b)
	if err != nil || !softOK || !hardOK {
		t.Fatalf("parseNofile: soft %v (%v) hard %v (%v): %v", soft, softOK, hard, hardOK, err)
	}
	if uint64(soft) != want.OpenFiles {
		t.Errorf("soft nofile: hand parser %v, procfs %d", soft, want.OpenFiles)
	}
	if hard < soft {
		t.Errorf("hard nofile %v below soft %v", hard, soft)
	}
}

// BenchmarkStatusMemory: the memory collector's read of /proc/PID/status,
// by hand through a kept descriptor (what runs) beside procfs's NewStatus
// (the baseline), on the same live process.
func BenchmarkStatusMemory(b *testing.B) {
	pid := sleeper(b)
	path := filepath.Join("/proc", strconv.Itoa(pid), "status")
	b.Run("hand", func(b *testing.B) {
		var f procFile
		defer f.close()
		var buf []byte
		// The collector keeps the descriptor open and the buffer sized
		// across cycles: measure that steady state, not the first open.
		if _, err := f.read(&buf, path); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			raw, err := f.read(&buf, path)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := parseStatusMemory(raw); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("procfs", func(b *testing.B) {
		p, err := procfs.NewProc(pid)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := p.NewStatus(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkLimitsNofile: the fds collector's read of /proc/PID/limits
// beside procfs's Limits.
func BenchmarkLimitsNofile(b *testing.B) {
	pid := sleeper(b)
	path := filepath.Join("/proc", strconv.Itoa(pid), "limits")
	b.Run("hand", func(b *testing.B) {
		var buf []byte
		if _, err := readProcFile(&buf, path); err != nil { // the buffer sized, as across cycles
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			raw, err := readProcFile(&buf, path)
			if err != nil {
				b.Fatal(err)
			}
			if _, _, _, _, err := parseNofile(raw); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("procfs", func(b *testing.B) {
		p, err := procfs.NewProc(pid)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := p.Limits(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
