package probes

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
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
// name, and the stacks walked by frame pointers out of OpenSSL's assembly
// into garbage end where the garbage begins.
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
		Options:   Options{Log: testLog, SideStores: signals.SideStores{Samples: samples}},
		Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond,
		// Frame-pointer walks only: the garbage they read out of the
		// SHA-512 assembly must be cut (with copies, those stacks are
		// unwound instead: TestCPUProfileReachesTheJavaScriptCaller).
		StackBytes: -1,
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

// pbkdfJS is the precision app's /pbkdf2 handler alone: hashPasswordSync
// runs crypto.pbkdf2Sync round after round, called from a timer.
const pbkdfJS = `const crypto = require('crypto');
function hashPasswordSync(password, millis) {
  const deadline = Date.now() + millis;
  let key;
  do {
    key = crypto.pbkdf2Sync(password, 'culprit-salt', 5000, 64, 'sha512');
  } while (Date.now() < deadline);
  return key;
}
setInterval(() => hashPasswordSync('correct horse battery staple', 500), 10);
`

// A real node --perf-basic-prof spinning in crypto.pbkdf2Sync, called from
// the named function hashPasswordSync. Most samples land in OpenSSL's
// SHA-512 assembly, which uses rbp as a general register: by frame
// pointers alone their stacks end there. With the stack copied, the
// samples are unwound by CFI through OpenSSL and node's C++, by frame
// pointers through V8's builtins and JIT code, and reach
// hashPasswordSync; so does the pprof profile built from them.
func TestCPUProfileReachesTheJavaScriptCaller(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("node not found (CI must provide Node.js): %v", err)
		}
		fmt.Fprintln(os.Stderr, "SKIP: node not on PATH: unwinding CPU samples into JavaScript NOT TESTED")
		t.Skip("node not on PATH")
	}
	dir := t.TempDir()
	js := filepath.Join(dir, "pbkdf.js")
	if err := os.WriteFile(js, []byte(pbkdfJS), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "--perf-basic-prof", js)
	cmd.Dir = dir
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(fmt.Sprintf("/tmp/perf-%d.map", pid))
	})

	samples := signals.NewCPUSamples(4096)
	st := signals.New(600, 1000)
	s := symbolize.New(symbolize.Options{Log: testLog})
	p := NewCPUProfile(CPUProfileOptions{
		Options:   Options{Log: testLog, SideStores: signals.SideStores{Samples: samples}},
		Frequency: 99, MaxStacks: 1024, Drain: 200 * time.Millisecond, Symbolizer: s,
	})
	runProbe(t, pid, p, st)
	// The target is set at the first drain; until node's executable is
	// parsed (seconds under -race), samples find the ring buffer full and
	// are counted by their frame-pointer walk alone.
	ringFull := func() float64 {
		v, _ := st.Latest(signals.ProfileCPUStackCopiesLostTotal, signals.L("reason", "ring_full"))
		return v.V
	}
	deadline := time.Now().Add(30 * time.Second)
	for last := -1.0; ; {
		time.Sleep(500 * time.Millisecond)
		u, _ := st.Latest(signals.ProfileCPUSamplesUnwoundTotal, nil)
		if u.V > 0 && ringFull() == last {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no steady unwinding in 30 s: %v unwound, %v ring_full", u.V, ringFull())
		}
		last = ringFull()
	}
	full0 := ringFull()
	from := time.Now()
	time.Sleep(2 * time.Second)
	to := time.Now()
	time.Sleep(300 * time.Millisecond) // the last drain
	if full := ringFull(); full > full0 {
		t.Logf("%v samples found the ring buffer full", full-full0)
	}

	want := fmt.Sprintf("hashPasswordSync (%s:2)", js)
	var (
		total, reached, asm, asmReached int64
		in                              []symbolize.Sample
		missed                          = map[string]int64{}
	)
	for _, smp := range samples.Range(from, to.Add(300*time.Millisecond)) {
		if smp.Pid != pid {
			continue
		}
		in = append(in, symbolize.Sample{Pid: smp.Pid, Tid: smp.Tid, Thread: smp.Thread, User: smp.User, Kernel: smp.Kernel, Count: smp.Count})
		total += smp.Count
		// Cut where no code is: a sample caught where no unwind rule
		// applies (SHA-512's prologue keeps its CFA in rax) keeps its
		// frame-pointer walk, garbage and all.
		fs := s.UserStack(smp.Pid, smp.User)
		names := make([]string, len(fs))
		for i, f := range fs {
			names[i] = f.String()
		}
		ok := slices.Contains(names, want)
		if ok {
			reached += smp.Count
		} else {
			missed[strings.Join(names[:min(len(names), 4)], " < ")] += smp.Count
		}
		if len(names) > 0 && strings.HasPrefix(names[0], "sha512_block_data_order") {
			asm += smp.Count
			if ok {
				asmReached += smp.Count
			}
		}
	}
	t.Logf("%d samples, %d reach %s; %d in SHA-512's assembly, %d of them reach it; missed: %v", total, reached, want, asm, asmReached, missed)
	// 2 s at 99 Hz of one spinning thread: about 198 samples; a loaded
	// machine (the race detector, tests in parallel) gives node less.
	if total < 40 {
		t.Fatalf("only %d samples of node (pid %d) in 2 s", total, pid)
	}
	if reached*10 < total*9 {
		t.Errorf("%d of %d samples reach %s, want 90%%", reached, total, want)
	}
	if asm*2 < total || asmReached*10 < asm*9 {
		t.Errorf("%d of %d samples in SHA-512's assembly, %d of them reach %s", asm, total, asmReached, want)
	}

	// CaptureProfile's pprof carries the recovered frames.
	prof, err := s.CPUProfile(in, symbolize.ProfileOptions{Period: samples.Period(), Start: from, Duration: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	under := int64(0)
	for _, smp := range prof.Sample {
		for _, l := range smp.Location {
			if len(l.Line) > 0 && l.Line[0].Function.Name == "hashPasswordSync" && l.Line[0].Function.Filename == js {
				under += smp.Value[0]
				break
			}
		}
	}
	if under != reached {
		t.Errorf("the profile has %d samples under hashPasswordSync, the stacks %d", under, reached)
	}
}
