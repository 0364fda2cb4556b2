package testenv

import (
	"context"
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The real Tokio + hyper app: / answers at once; /block sleeps on an
// async worker, /offload on a blocking-pool thread of the same name, and
// /spin runs on a worker; each takes at least its ms.
func TestTokioApp(t *testing.T) {
	start := time.Now()
	exe := BuildTokioHyper(t)
	t.Logf("tokio-hyper ready in %v: %s", time.Since(start).Round(time.Millisecond), exe)
	for _, fn := range []string{TokioBlockingFunction, TokioSpinFunction} {
		if !hasRustSymbol(t, exe, fn) {
			t.Errorf("%s: no symbol for %s (inlined?)", exe, fn)
		}
	}

	a := StartTokioApp(t, TokioOptions{Workers: 2})
	t.Logf("pid %d, workers %v, %s", a.PID, a.WorkerTIDs, a.URL)
	if r := a.MustGet(t, "/"); r.Body != "ok\n" || r.Elapsed > time.Second {
		t.Fatalf("/: %q in %v", r.Body, r.Elapsed)
	}
	onThread := func(path string, wantMin time.Duration) (int, string) {
		t.Helper()
		r := a.MustGet(t, path)
		tid, err := strconv.Atoi(r.Header.Get("X-Thread-Id"))
		if err != nil {
			t.Fatalf("%s: X-Thread-Id %q", path, r.Header.Get("X-Thread-Id"))
		}
		if r.Elapsed < wantMin {
			t.Errorf("%s answered in %v, want at least %v", path, r.Elapsed, wantMin)
		}
		t.Logf("%s: %v on %s (tid %d): %s", path, r.Elapsed.Round(time.Millisecond), r.Header.Get("X-Thread-Name"), tid, strings.TrimSpace(r.Body))
		return tid, r.Header.Get("X-Thread-Name")
	}
	if tid, name := onThread("/block?ms=300", 300*time.Millisecond); !slices.Contains(a.WorkerTIDs, tid) || name != "tokio-runtime-worker" {
		t.Errorf("/block ran on %s (tid %d), want a worker %v", name, tid, a.WorkerTIDs)
	}
	if tid, name := onThread("/spin?ms=200", 200*time.Millisecond); !slices.Contains(a.WorkerTIDs, tid) || name != "tokio-runtime-worker" {
		t.Errorf("/spin ran on %s (tid %d), want a worker %v", name, tid, a.WorkerTIDs)
	}
	tid, name := onThread("/offload?ms=300", 300*time.Millisecond)
	if slices.Contains(a.WorkerTIDs, tid) || name != "tokio-runtime-worker" {
		t.Errorf("/offload ran on %s (tid %d), want a blocking-pool thread named like the workers %v", name, tid, a.WorkerTIDs)
	}
	threads, err := a.Threads()
	if err != nil {
		t.Fatal(err)
	}
	if threads[tid] != "tokio-runtime-w" {
		t.Errorf("blocking-pool thread %d is named %q, want tokio-runtime-w (threads %v)", tid, threads[tid], threads)
	}

	// With one worker, a blocking call on it holds up every other
	// request; the same sleep offloaded to the blocking pool holds up
	// none.
	one := StartTokioApp(t, TokioOptions{Workers: 1})
	worker := one.WorkerTIDs[0]
	for _, c := range []struct {
		path    string
		asleep  func(tid int) bool
		blocked bool
	}{
		{"/block?ms=800", func(tid int) bool { return tid == worker }, true},
		{"/offload?ms=800", func(tid int) bool { return tid != worker }, false},
	} {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		done := make(chan error, 1)
		go func() {
			_, err := one.Get(ctx, c.path)
			done <- err
		}()
		// Until a thread of the kind the route uses sleeps in it.
		waitUntil(t, 5*time.Second, func() error {
			threads, err := one.Threads()
			if err != nil {
				return err
			}
			for tid, name := range threads {
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/wchan", one.PID, tid))
				if name == "tokio-runtime-w" && c.asleep(tid) && strings.Contains(string(b), "nanosleep") {
					return nil
				}
			}
			return fmt.Errorf("%s: no thread asleep in it yet", c.path)
		})
		r, err := one.Get(ctx, "/")
		if err != nil {
			t.Fatal(err)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		cancel()
		t.Logf("/ during %s with one worker: %v", c.path, r.Elapsed.Round(time.Millisecond))
		if held := r.Elapsed > 300*time.Millisecond; held != c.blocked {
			t.Errorf("/ during %s answered in %v: held up %v, want %v", c.path, r.Elapsed, held, c.blocked)
		}
	}
}

// hasRustSymbol reports whether exe's symbol table has a function whose
// legacy-mangled name spells path (a::b -> _ZN1a1b17h<hash>E).
func hasRustSymbol(t *testing.T, exe, path string) bool {
	t.Helper()
	f, err := elf.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	var mangled strings.Builder
	mangled.WriteString("_ZN")
	for _, part := range strings.Split(path, "::") {
		mangled.WriteString(strconv.Itoa(len(part)) + part)
	}
	for _, s := range syms {
		if strings.HasPrefix(s.Name, mangled.String()) && elf.ST_TYPE(s.Info) == elf.STT_FUNC {
			return true
		}
	}
	return false
}

// Parallel callers of cached (flock is per open file, so goroutines of one
// process contend as test processes do) see one build, and a killed
// build's leftover does not count as built.
func TestCachedBuildsOnce(t *testing.T) {
	t.Setenv("CULPRIT_TESTENV_CACHE", t.TempDir())
	dir := CacheDir(t)
	if err := os.WriteFile(filepath.Join(dir, "thing-k.tmp"), []byte("half"), 0o644); err != nil {
		t.Fatal(err)
	}
	var builds atomic.Int32
	build := func(dst string) error {
		builds.Add(1)
		time.Sleep(200 * time.Millisecond)
		return os.WriteFile(dst, []byte("whole"), 0o644)
	}
	paths := make(chan string, 4)
	for range 4 {
		go func() { paths <- cached(t, "thing-k", "thing", build) }()
	}
	for range 4 {
		p := <-paths
		if b, err := os.ReadFile(p); err != nil || string(b) != "whole" {
			t.Errorf("%s: %q, %v", p, b, err)
		}
	}
	if n := builds.Load(); n != 1 {
		t.Errorf("%d builds, want 1", n)
	}
}
