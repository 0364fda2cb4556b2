package symbolize

import (
	"bufio"
	"debug/elf"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestUserGoPIE covers a Go binary built as PIE: Go's linker places its
// segments at 0x400000 even then, so file offsets and virtual addresses
// differ and only the program headers relate them.
func TestUserGoPIE(t *testing.T) {
	if testing.Short() {
		t.Skip("SKIP: builds a Go program")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("SKIP: go not on PATH: Go PIE symbolization NOT TESTED")
	}
	exe := filepath.Join(t.TempDir(), "gopie")
	out, err := exec.Command(goBin, "build", "-buildmode=pie", "-o", exe, "./testdata/gopie").CombinedOutput()
	if err != nil {
		t.Fatalf("go build -buildmode=pie: %v\n%s", err, out)
	}
	if f, err := elf.Open(exe); err != nil || f.Type != elf.ET_DYN {
		t.Fatalf("not PIE (err %v)", err)
	}

	cmd := exec.Command(exe)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("read target output %q: %v", line, err)
	}
	addr, err := strconv.ParseUint(strings.TrimPrefix(strings.TrimSpace(line), "0x"), 16, 64)
	if err != nil {
		t.Fatal(err)
	}

	fr := New(Options{}).User(cmd.Process.Pid, []uint64{addr + 3, addr + 3})
	for i, f := range fr {
		if f.Func != "main.culpritPIEWork" {
			t.Errorf("frame %d: %+v, want main.culpritPIEWork", i, f)
		}
		// Lines 13-19 are the function; the exact line of an instruction is
		// the compiler's choice.
		if !strings.HasSuffix(f.File, "testdata/gopie/main.go") || f.Line < 13 || f.Line > 19 {
			t.Errorf("frame %d: %s:%d, want testdata/gopie/main.go:13-19", i, f.File, f.Line)
		}
		if f.Module != exe {
			t.Errorf("frame %d: Module = %q", i, f.Module)
		}
	}
}
