package testenv

import (
	"context"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

//go:embed testdata/tokio-hyper/Cargo.toml testdata/tokio-hyper/src/main.rs
var tokioHyperSource embed.FS

// The functions of testdata/tokio-hyper that the faults run, as a
// finding names them (rustc's legacy mangling demangled, hash dropped).
const (
	// TokioBlockingFunction sleeps on the calling thread: /block runs it
	// on an async worker, /offload on the blocking pool.
	TokioBlockingFunction = "tokio_hyper::load_user_sync"
	// TokioSpinFunction burns CPU without yielding (/spin).
	TokioSpinFunction = "tokio_hyper::compute_digest"
)

// debianRegistry is where Debian's librust-*-dev packages put crate
// sources, usable by cargo as a directory source (offline).
const debianRegistry = "/usr/share/cargo/registry"

// TokioApp is testdata/tokio-hyper running: a real Tokio 1.24
// multi-thread runtime serving hyper 0.14 on 127.0.0.1 in its network
// namespace. Routes (see src/main.rs): / fast; /block?ms=N sleeps in
// load_user_sync on the async worker; /spin?ms=N runs compute_digest on
// the worker; /offload?ms=N sleeps in load_user_sync inside
// spawn_blocking. Answers name the thread that did the work in
// X-Thread-Id and X-Thread-Name. The accept loop runs on the main thread
// (block_on), each connection is a task on the workers.
type TokioApp struct {
	*HTTPTarget
	Exe string
	// WorkerTIDs are the runtime's worker threads, named
	// "tokio-runtime-worker" (comm "tokio-runtime-w"). Threads the
	// blocking pool starts later (for /offload) have the same name.
	WorkerTIDs []int
}

// TokioOptions for StartTokioApp.
type TokioOptions struct {
	// Netns to serve in; nil makes a fresh private one.
	Netns *Netns
	// Workers is the runtime's worker_threads (default: Tokio's, one per
	// CPU).
	Workers int
}

// StartTokioApp builds testdata/tokio-hyper (once per machine, cached)
// and starts it.
func StartTokioApp(t testing.TB, o TokioOptions) *TokioApp {
	t.Helper()
	exe := BuildTokioHyper(t)
	ns := o.Netns
	if ns == nil {
		ns = NewNetns(t)
	}
	port, err := ns.FreePort()
	if err != nil {
		t.Fatalf("testenv: tokio-hyper port: %v", err)
	}
	args := []string{"--port", strconv.Itoa(port)}
	if o.Workers > 0 {
		args = append(args, "--workers", strconv.Itoa(o.Workers))
	}
	p := startProcess(t, ns, t.TempDir(), exe, args, nil)
	a := &TokioApp{HTTPTarget: newHTTPTarget(t, p, fmt.Sprintf("127.0.0.1:%d", port)), Exe: exe}
	p.waitFor(t, "serving /", 10*time.Second, func() error { return a.expect200("/") })
	// Tokio starts every worker when the runtime is built, and nothing
	// has used the blocking pool yet: the threads of that name are the
	// workers.
	p.waitFor(t, "running its workers", 5*time.Second, func() error {
		threads, err := p.Threads()
		if err != nil {
			return err
		}
		a.WorkerTIDs = a.WorkerTIDs[:0]
		for tid, name := range threads {
			if name == "tokio-runtime-w" {
				a.WorkerTIDs = append(a.WorkerTIDs, tid)
			}
		}
		slices.Sort(a.WorkerTIDs)
		if len(a.WorkerTIDs) == 0 || (o.Workers > 0 && len(a.WorkerTIDs) != o.Workers) {
			return fmt.Errorf("worker threads %v, want %d", a.WorkerTIDs, o.Workers)
		}
		return nil
	})
	return a
}

// Cargo returns a cargo: on PATH, where rustup puts it (CARGO_HOME,
// ~/.cargo/bin), or Debian's /usr/bin/cargo. Without one the test is
// skipped, loudly (fails under CI=true).
func Cargo(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("cargo"); err == nil {
		return p
	}
	var dirs []string
	if d := os.Getenv("CARGO_HOME"); d != "" {
		dirs = append(dirs, filepath.Join(d, "bin"))
	}
	if h, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(h, ".cargo", "bin"))
	}
	for _, d := range append(dirs, "/root/.cargo/bin", "/usr/local/cargo/bin", "/usr/bin") {
		p := filepath.Join(d, "cargo")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	skipUnlessCI(t, "SKIP: no cargo (PATH, $CARGO_HOME/bin, ~/.cargo/bin, /usr/bin): the Tokio target is NOT TESTED; install it with apt-get install cargo")
	return ""
}

// BuildTokioHyper returns testdata/tokio-hyper built in release mode with
// frame pointers, offline against Debian's crates. It is built once per
// machine into the cache (CacheDir), keyed by the sources, the crates
// available and the toolchain; parallel test processes wait for one
// build. A rebuild after an edit reuses the compiled dependencies.
func BuildTokioHyper(t testing.TB) string {
	t.Helper()
	cargo := Cargo(t)
	crates, err := filepath.Glob(filepath.Join(debianRegistry, "*"))
	if err != nil {
		t.Fatalf("testenv: list %s: %v", debianRegistry, err)
	}
	var have []string
	for _, c := range crates {
		have = append(have, filepath.Base(c))
	}
	if !slices.ContainsFunc(have, func(s string) bool { return strings.HasPrefix(s, "tokio-1.") }) ||
		!slices.ContainsFunc(have, func(s string) bool { return strings.HasPrefix(s, "hyper-0.14.") }) {
		skipUnlessCI(t, "SKIP: Tokio or hyper 0.14 missing from "+debianRegistry+": the Tokio target is NOT TESTED; install them with apt-get install librust-tokio-dev librust-hyper-dev")
	}
	version, err := exec.Command(cargo, "--version").CombinedOutput()
	if err != nil {
		t.Fatalf("testenv: %s --version: %v\n%s", cargo, err, version)
	}
	files, err := embeddedFiles(tokioHyperSource, "testdata/tokio-hyper")
	if err != nil {
		t.Fatalf("testenv: %v", err)
	}
	key := hashKey(files, cargo, string(version), strings.Join(have, " "), tokioRustflags)
	return cached(t, "tokio-hyper-"+key, "tokio-hyper", func(dst string) error {
		return buildTokioHyper(t, cargo, files, dst)
	})
}

// tokioRustflags: the eBPF stack walker follows frame pointers, which
// profilers also ask of Rust services.
const tokioRustflags = "-C force-frame-pointers=yes"

// buildTokioHyper builds in a fixed workspace of the cache whose target
// dir survives, so a change of main.rs recompiles main.rs alone.
func buildTokioHyper(t testing.TB, cargo string, files map[string][]byte, dst string) error {
	t.Helper()
	work := filepath.Join(CacheDir(t), "tokio-hyper-build")
	// The lock may be a leftover of other crate versions: cargo resolves
	// it again from what the directory source holds.
	_ = os.Remove(filepath.Join(work, "Cargo.lock"))
	files[".cargo/config.toml"] = []byte(`# Written by internal/testenv/tokio.go: crates come from Debian's
# librust-*-dev packages, never from the network.
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "` + debianRegistry + `"

[net]
offline = true
`)
	for name, b := range files {
		p := filepath.Join(work, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return fmt.Errorf("workspace: %w", err)
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			return fmt.Errorf("workspace: %w", err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, cargo, "build", "--release", "--offline")
	cmd.Dir = work
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "RUSTFLAGS" || k == "CARGO_ENCODED_RUSTFLAGS" || k == "CARGO_TARGET_DIR" || k == "PATH" || strings.HasPrefix(k, "CARGO_BUILD_") {
			continue
		}
		env = append(env, kv)
	}
	// cargo runs rustc from PATH: the one beside it first (rustup's, or
	// Debian's).
	cmd.Env = append(env, "RUSTFLAGS="+tokioRustflags, "CARGO_TARGET_DIR="+filepath.Join(work, "target"),
		"PATH="+filepath.Dir(cargo)+string(os.PathListSeparator)+os.Getenv("PATH"))
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s (in %s): %w\n%s", strings.Join(cmd.Args, " "), work, err, out)
	}
	t.Logf("testenv: built tokio-hyper in %v (cargo build --release --offline, %s)", time.Since(start).Round(100*time.Millisecond), tokioRustflags)
	return copyFile(filepath.Join(work, "target", "release", "tokio-hyper"), dst, 0o755)
}

// CacheDir is where testenv keeps what it builds once per machine:
// $CULPRIT_TESTENV_CACHE, else culprit-testenv in the user's cache dir
// (~/.cache).
func CacheDir(t testing.TB) string {
	t.Helper()
	dir := os.Getenv("CULPRIT_TESTENV_CACHE")
	if dir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			t.Fatalf("testenv: no cache dir (set CULPRIT_TESTENV_CACHE): %v", err)
		}
		dir = filepath.Join(base, "culprit-testenv")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatalf("testenv: cache dir: %v", err)
	}
	return dir
}

// cached returns CacheDir/name, making it with build first if it is not
// there. Test packages run in parallel processes: an exclusive flock on
// CacheDir/lock.lock makes one build while the others wait, and build
// writes a temporary path that is renamed into place, so a path that
// exists is complete (even after a build was killed halfway).
func cached(t testing.TB, name, lock string, build func(dst string) error) string {
	t.Helper()
	dir := CacheDir(t)
	final := filepath.Join(dir, name)
	if _, err := os.Stat(final); err == nil {
		return final
	}
	f, err := os.OpenFile(filepath.Join(dir, lock+".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatalf("testenv: cache lock: %v", err)
	}
	defer f.Close() // releases the lock
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); errors.Is(err, unix.EWOULDBLOCK) {
		t.Logf("testenv: waiting for another test process building %s", name)
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != nil {
			t.Fatalf("testenv: cache lock: %v", err)
		}
	} else if err != nil {
		t.Fatalf("testenv: cache lock: %v", err)
	}
	if _, err := os.Stat(final); err == nil {
		return final // built while we waited
	}
	tmp := final + ".tmp"
	if err := os.RemoveAll(tmp); err != nil { // a killed build's leftover
		t.Fatalf("testenv: cache: %v", err)
	}
	if err := build(tmp); err != nil {
		_ = os.RemoveAll(tmp)
		t.Fatalf("testenv: build %s: %v", name, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		t.Fatalf("testenv: cache: %v", err)
	}
	return final
}

// embeddedFiles reads every file under root of fsys, by path relative to
// root.
func embeddedFiles(fsys embed.FS, root string) (map[string][]byte, error) {
	files := map[string][]byte{}
	err := fs.WalkDir(fsys, root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fsys.ReadFile(p)
		if err != nil {
			return err
		}
		rel := strings.TrimPrefix(p, root+"/")
		files[path.Clean(rel)] = b
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("embedded %s: %w", root, err)
	}
	return files, nil
}

// hashKey is a short hex digest of files (names and contents, in order of
// name) and extra strings.
func hashKey(files map[string][]byte, extra ...string) string {
	h := sha256.New()
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Fprintf(h, "%s %d\n", n, len(files[n]))
		h.Write(files[n])
	}
	for _, e := range extra {
		fmt.Fprintf(h, "%d %s\n", len(e), e)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, mode)
	if err != nil {
		return fmt.Errorf("copy: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return nil
}
