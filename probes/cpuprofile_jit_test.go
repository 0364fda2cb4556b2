package probes

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/symbolize"
)

// hotJS spins in culpritHotLoop. Each call runs 100 ms, so the function's
// own loop is what V8 optimizes (on-stack replacement) and the top level
// that calls it stays cold: inlined into an optimized caller, it would have
// no frame of its own. Between calls it hashes for about 20 ms in OpenSSL's
// SHA-512 assembly, which uses rbp as a general register: a frame-pointer
// walk from there reads hash state as return addresses (0xa81a664bbc423001
// was seen), the garbage that must never be shown.
const hotJS = `const crypto = require('crypto');
function culpritHotLoop(ms) {
  const end = Date.now() + ms;
  let x = 0;
  while (Date.now() < end) {
    for (let i = 0; i < 10000; i++) x = (x * 31 + i) | 0;
  }
  return x;
}
let sink = 0;
for (;;) {
  sink ^= culpritHotLoop(100);
  crypto.pbkdf2Sync('pw', 'salt', 40000, 64, 'sha512');
}
`

// A real Node.js process started with --perf-basic-prof spins in a named
// JavaScript function. The profiler's samples of it, symbolized through
// the process's perf map, name culpritHotLoop with its file as the hottest
// frame, and no frame of any stack is an unnamed address: JIT code has a
// name, and the stacks walked out of OpenSSL's assembly into garbage end
// where the garbage begins.
func TestCPUProfileNamesJavaScriptFunctions(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("node not found (CI must provide Node.js): %v", err)
		}
		fmt.Fprintln(os.Stderr, "SKIP: node not on PATH: JIT symbolization through perf maps NOT TESTED")
		t.Skip("node not on PATH")
	}
	dir := t.TempDir()
	js := filepath.Join(dir, "hot.js")
	if err := os.WriteFile(js, []byte(hotJS), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "--perf-basic-prof", js)
	// --perf-basic-prof also makes V8 write isolate-*-v8.log into the
	// working directory.
	cmd.Dir = dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(fmt.Sprintf("/tmp/perf-%d.map", pid)) // node leaves it behind
	})

	samples := signals.NewCPUSamples(4096)
	p := NewCPUProfile(CPUProfileOptions{
		Options:   Options{Log: testLog},
		Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond, Samples: samples,
	})
	runProbe(t, pid, p, signals.New(600, 1000))
	// The target is set at the first drain, and V8 needs a moment to
	// optimize the loop: take the samples after that.
	time.Sleep(time.Second)
	from := time.Now()
	time.Sleep(2 * time.Second)
	to := time.Now()
	time.Sleep(300 * time.Millisecond) // the last drain
	got := samples.Range(from, to.Add(300*time.Millisecond))

	s := symbolize.New(symbolize.Options{Log: testLog})
	var (
		total, cut int64
		leaves     = map[string]int64{}
		in         []symbolize.Sample
	)
	for _, smp := range got {
		if smp.Pid != pid || len(smp.User) == 0 {
			continue
		}
		fs := s.UserStack(smp.Pid, smp.User)
		if len(fs) == 0 {
			t.Errorf("stack %x: no frame left", smp.User)
			continue
		}
		total += smp.Count
		if len(fs) < len(smp.User) {
			cut += smp.Count
		}
		leaves[fs[0].String()] += smp.Count
		for i, f := range fs {
			name := f.String()
			if name == "" || name == "<unknown>" || strings.HasPrefix(name, "0x") {
				t.Errorf("frame %d of %v is %q (address %#x)", i, smp.User, name, f.Addr)
			}
		}
		in = append(in, symbolize.Sample{Pid: smp.Pid, Tid: smp.Tid, Thread: smp.Thread, User: smp.User, Kernel: smp.Kernel, Count: smp.Count})
	}
	// 2 s at 99 Hz of one spinning thread: about 198 samples.
	if total < 80 {
		t.Fatalf("only %d samples of node (pid %d) in 2 s; node stderr: %s", total, pid, stderr.String())
	}
	type share struct {
		name string
		n    int64
	}
	var hot []share
	for name, n := range leaves {
		hot = append(hot, share{name, n})
	}
	sort.Slice(hot, func(i, j int) bool { return hot[i].n > hot[j].n })
	t.Logf("%d samples, %d stacks cut where no code is; hottest leaves: %v", total, cut, hot[:min(len(hot), 8)])
	if cut == 0 {
		t.Errorf("no stack ended early: the SHA-512 samples' garbage frames were not seen or not cut")
	}
	want := "culpritHotLoop (" + js + ":2)"
	if hot[0].name != want {
		t.Errorf("hottest frame %q, want %q", hot[0].name, want)
	}
	if hot[0].n*2 < total {
		t.Errorf("culpritHotLoop is the leaf of %d of %d samples, want most", hot[0].n, total)
	}

	// The pprof profile names the function and its file too.
	prof, err := s.CPUProfile(in, symbolize.ProfileOptions{Period: samples.Period(), Start: from, Duration: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, fn := range prof.Function {
		if fn.Name == "culpritHotLoop" && fn.Filename == js {
			found = true
		}
	}
	if !found {
		t.Errorf("profile has no function culpritHotLoop in %s", js)
	}
}
