package testenv

import (
	"bufio"
	_ "embed"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

//go:embed testdata/rustworker.rs
var rustWorkerSource []byte

// Rustc returns a Rust compiler: on PATH, or where rustup puts it
// (CARGO_HOME, ~/.cargo/bin). Without one the test is skipped, loudly,
// because Rust symbolization is then untested.
func Rustc(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("rustc"); err == nil {
		return p
	}
	var dirs []string
	if d := os.Getenv("CARGO_HOME"); d != "" {
		dirs = append(dirs, filepath.Join(d, "bin"))
	}
	if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".cargo", "bin"))
	}
	for _, d := range append(dirs, "/root/.cargo/bin", "/usr/local/cargo/bin") {
		p := filepath.Join(d, "rustc")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Skip("SKIP: no rustc (PATH, $CARGO_HOME/bin, ~/.cargo/bin): Rust binaries are NOT TESTED; install rustc (apt-get install rustc) to test them")
	return ""
}

// RustWorker is a running testdata/rustworker.rs.
type RustWorker struct {
	PID int
	// Addresses, in the process, of rustworker::save_session and of
	// std::process::id.
	SaveSession, ProcessID uint64
	Exe                    string
}

// BuildRustWorker compiles testdata/rustworker.rs once per test into its
// temp dir. Frame pointers are forced, as the eBPF stack walker needs them
// (and as profilers ask of Rust services: -C force-frame-pointers=yes).
func BuildRustWorker(t testing.TB) string {
	t.Helper()
	rustc := Rustc(t)
	dir := t.TempDir()
	src := filepath.Join(dir, "rustworker.rs")
	if err := os.WriteFile(src, rustWorkerSource, 0o644); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "rustworker")
	cmd := exec.Command(rustc, "--edition=2021", "--crate-name", "rustworker", "-C", "opt-level=1",
		"-C", "force-frame-pointers=yes", "-o", exe, src)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, out)
	}
	return exe
}

// StartRustWorker runs exe with args (see rustworker.rs) until the test
// ends.
func StartRustWorker(t testing.TB, exe string, args ...string) *RustWorker {
	t.Helper()
	cmd := exec.Command(exe, args...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = stdin.Close()
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("rustworker printed %q: %v", line, err)
	}
	fs := strings.Fields(line)
	if len(fs) != 3 {
		t.Fatalf("rustworker printed %q", line)
	}
	w := &RustWorker{PID: cmd.Process.Pid, Exe: exe}
	if fs[0] != strconv.Itoa(w.PID) {
		t.Fatalf("rustworker says its pid is %s, started as %d", fs[0], w.PID)
	}
	for i, p := range []*uint64{&w.SaveSession, &w.ProcessID} {
		v, err := strconv.ParseUint(strings.TrimPrefix(fs[i+1], "0x"), 16, 64)
		if err != nil {
			t.Fatalf("rustworker printed %q: %v", line, err)
		}
		*p = v
	}
	return w
}
