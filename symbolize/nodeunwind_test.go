package symbolize

import (
	"bufio"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// nodeFaultsJS runs the precision test app's two faults in named functions
// on node's main thread, on a line of stdin each: exportReportSync waits
// for a child in execSync's nested event loop; hashPasswordSync runs
// OpenSSL's PBKDF2 (SHA-512 in assembly that uses rbp as a general
// register) until the test ends.
const nodeFaultsJS = `'use strict';
const crypto = require('crypto');
const { execSync } = require('child_process');
function exportReportSync(ms) {
  execSync('sleep ' + (ms / 1000));
  return ms;
}
function hashPasswordSync(ms) {
  const end = Date.now() + ms;
  let key;
  do {
    key = crypto.pbkdf2Sync('pw', 'salt', 5000, 64, 'sha512');
  } while (Date.now() < end);
  return key;
}
process.stdin.on('data', (d) => {
  const cmd = String(d).trim();
  if (cmd === 'exec') exportReportSync(4000);
  if (cmd === 'hash') hashPasswordSync(600000);
});
process.stdout.write('ready\n');
`

// The lines of nodeFaultsJS where the two functions are defined: the perf
// map names a function by where its definition starts.
const (
	nodeExecLine = 4
	nodeHashLine = 8
)

// nodeProcess is a running node --perf-basic-prof on nodeFaultsJS.
type nodeProcess struct {
	pid    int
	script string
	stdin  io.Writer
}

func startNodeFaults(t testing.TB) *nodeProcess {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("node not found (CI must provide Node.js): %v", err)
		}
		fmt.Fprintln(os.Stderr, "SKIP: node not on PATH: unwinding into JavaScript NOT TESTED")
		t.Skip("node not on PATH")
	}
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "SKIP: not root: ptrace of node, unwinding into JavaScript NOT TESTED")
		t.Skip("needs root (ptrace, /proc/PID/mem)")
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "faults.js")
	if err := os.WriteFile(script, []byte(nodeFaultsJS), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "--perf-basic-prof", script)
	cmd.Dir = dir // V8 writes its isolate log here
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start node: %v", err)
	}
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		_ = os.Remove(fmt.Sprintf("/tmp/perf-%d.map", pid)) // node leaves it behind
	})
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("node said %q", line)
		}
		ready <- err
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("node: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("node did not start in 20 s")
	}
	return &nodeProcess{pid: pid, script: script, stdin: in}
}

func (n *nodeProcess) do(t testing.TB, cmd string) {
	t.Helper()
	if _, err := io.WriteString(n.stdin, cmd+"\n"); err != nil {
		t.Fatalf("node %s: %v", cmd, err)
	}
}

// syscallOf is the system call thread tid sleeps in (/proc/PID/syscall's
// number), -1 when it runs.
func syscallOf(pid, tid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/syscall", pid, tid))
	if err != nil {
		return -1
	}
	f := strings.Fields(string(b))
	if len(f) == 0 || f[0] == "running" {
		return -1
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return -1
	}
	return n
}

// stackCopy is what a probe takes of a thread: its user registers and its
// stack from base (the red zone below sp) up.
type stackCopy struct {
	ip, sp, bp, base uint64
	words            []uint64
}

// capture stops thread tid with ptrace (PTRACE_INTERRUPT: no signal is
// delivered), reads its registers and n bytes of its stack from 128 bytes
// below sp, and lets it go on: the same bytes the eBPF probes copy.
func capture(t testing.TB, pid, tid, n int) stackCopy {
	t.Helper()
	// ptrace requests must come from the thread that attached.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.PtraceSeize(tid); err != nil {
		t.Fatalf("ptrace seize %d: %v", tid, err)
	}
	defer func() {
		if err := unix.PtraceDetach(tid); err != nil {
			t.Errorf("ptrace detach %d: %v", tid, err)
		}
	}()
	if err := unix.PtraceInterrupt(tid); err != nil {
		t.Fatalf("ptrace interrupt %d: %v", tid, err)
	}
	var ws unix.WaitStatus
	if _, err := unix.Wait4(tid, &ws, unix.WALL, nil); err != nil || !ws.Stopped() {
		t.Fatalf("wait for %d to stop: %v (status %#x)", tid, err, ws)
	}
	var regs unix.PtraceRegs
	if err := unix.PtraceGetRegs(tid, &regs); err != nil {
		t.Fatalf("ptrace getregs %d: %v", tid, err)
	}
	mem, err := os.Open(fmt.Sprintf("/proc/%d/mem", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	c := stackCopy{ip: regs.Rip, sp: regs.Rsp, bp: regs.Rbp, base: regs.Rsp - 128}
	buf := make([]byte, 128+n)
	got, _ := mem.ReadAt(buf, int64(c.base)) // short at the stack's top: what came is good
	for off := 0; off+8 <= got; off += 8 {
		c.words = append(c.words, binary.LittleEndian.Uint64(buf[off:]))
	}
	if len(c.words) < 32 {
		t.Fatalf("read %d bytes of the stack of %d at %#x", got, tid, c.base)
	}
	return c
}

// unwind is the stack a probe would report for c: the leaf, then the
// frames unwound from the copy, symbolized; all, because every frame must
// be code.
func unwind(t *testing.T, s *Symbolizer, pid int, c stackCopy) ([]uint64, []string) {
	t.Helper()
	addrs := s.RecoverLeafAt(pid, []uint64{c.ip}, c.sp, c.bp, c.base, c.words)
	fs := s.UserStack(pid, addrs)
	if len(fs) != len(addrs) {
		t.Errorf("frame %d of %x is no code: the unwinder guessed", len(fs), addrs)
	}
	names := make([]string, len(fs))
	for i, f := range fs {
		names[i] = f.String()
	}
	return addrs, names
}

// prefixesOnly checks that every shorter copy of c unwinds to a prefix of
// the whole copy's stack: where the bytes run out the unwinder stops, it
// never continues with other frames. The last frame may be less named:
// a return into V8's interpreter whose frame (the function it runs) lies
// past the copy stays the interpreter's.
func prefixesOnly(t *testing.T, s *Symbolizer, pid int, c stackCopy, whole []uint64) {
	t.Helper()
	for n := 16; n < len(c.words); n += 61 {
		got := s.RecoverLeafAt(pid, []uint64{c.ip}, c.sp, c.bp, c.base, c.words[:n])
		ok := len(got) <= len(whole)
		for i := 0; ok && i < len(got); i++ {
			ok = got[i] == whole[i] || (i == len(got)-1 && s.User(pid, got[i:])[0].Func == "Builtins_InterpreterEntryTrampoline")
		}
		if !ok {
			t.Errorf("%d bytes of stack unwind to %x, not a prefix of %x", 8*n, got, whole)
			return
		}
	}
}

// execSync's wait, read from the sleeping thread's memory as the sched
// probe's deep read does: the stack goes from epoll_pwait through libuv's
// nested loop, node's SyncProcessRunner, V8's C++ and builtins (no CFI:
// frame pointers) and interpreted JavaScript up to exportReportSync.
func TestUnwindNodeExecSyncToJavaScript(t *testing.T) {
	n := startNodeFaults(t)
	n.do(t, "exec")
	// The main thread idles in epoll_pwait too: wait for execSync's child,
	// then for the wait on it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		children, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", n.pid, n.pid))
		if len(strings.Fields(string(children))) > 0 && syscallOf(n.pid, n.pid) == unix.SYS_EPOLL_PWAIT {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("node never waited for execSync's child (syscall %d)", syscallOf(n.pid, n.pid))
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	c := capture(t, n.pid, n.pid, 32<<10)
	s := New(Options{})
	addrs, names := unwind(t, s, n.pid, c)
	t.Logf("%d frames from %d bytes of stack:\n%s", len(names), 8*len(c.words), strings.Join(names, "\n"))
	want := fmt.Sprintf("exportReportSync (%s:%d)", n.script, nodeExecLine)
	order := []string{"epoll_pwait", "uv__io_poll", "uv_run", "node::SyncProcessRunner::TryInitializeAndRunLoop", "execSync (node:child_process", want}
	at := 0
	for _, f := range names {
		if at < len(order) && strings.HasPrefix(f, order[at]) {
			at++
		}
	}
	if at < len(order) {
		t.Errorf("the stack does not reach %q in order (found up to %q)", order[at], order[max(at-1, 0)])
	}
	prefixesOnly(t, s, n.pid, c, addrs)
}

// pbkdf2Sync's CPU work, caught at random points as the profiler's
// samples are: most stacks have their leaf in OpenSSL (SHA-512's assembly,
// whose CFA is read from the stack) and all but the few caught where no
// rule applies reach hashPasswordSync.
func TestUnwindNodePBKDF2ToJavaScript(t *testing.T) {
	n := startNodeFaults(t)
	n.do(t, "hash")
	time.Sleep(300 * time.Millisecond) // into the loop
	s := New(Options{})
	want := fmt.Sprintf("hashPasswordSync (%s:%d)", n.script, nodeHashLine)
	const samples = 40
	reached, asm, asmReached := 0, 0, 0
	var missed []string
	for i := 0; i < samples; i++ {
		time.Sleep(time.Duration(20+i%7*3) * time.Millisecond)
		c := capture(t, n.pid, n.pid, 16<<10)
		addrs, names := unwind(t, s, n.pid, c)
		ok := slices.Contains(names, want)
		if ok {
			reached++
		} else {
			missed = append(missed, strings.Join(names, " < "))
		}
		if len(names) > 0 && strings.HasPrefix(names[0], "sha512_block_data_order") {
			asm++
			if ok {
				asmReached++
			}
		}
		if i%8 == 0 {
			prefixesOnly(t, s, n.pid, c, addrs)
		}
	}
	t.Logf("%d of %d stacks reach %s; %d had their leaf in SHA-512's assembly, %d of them reach it; missed: %q", reached, samples, want, asm, asmReached, missed)
	if reached < samples*3/4 {
		t.Errorf("only %d of %d stacks reach %s", reached, samples, want)
	}
	if asm == 0 || asmReached*4 < asm*3 {
		t.Errorf("%d of %d stacks in SHA-512's assembly reach %s", asmReached, asm, want)
	}
}

// BenchmarkUnwindNode is the agent's cost of unwinding one CPU sample of
// node in pbkdf2Sync (16 KiB copied, the profiler's default), with the
// files' CFI and the perf map already read: the work the profiler does per
// sample on top of reading it.
func BenchmarkUnwindNode(b *testing.B) {
	n := startNodeFaults(b)
	n.do(b, "hash")
	time.Sleep(500 * time.Millisecond)
	s := New(Options{})
	var copies []stackCopy
	for range 16 {
		copies = append(copies, capture(b, n.pid, n.pid, 16<<10))
		time.Sleep(13 * time.Millisecond)
	}
	frames := 0
	for _, c := range copies { // parse the files, read the perf map
		frames += len(s.RecoverLeafAt(n.pid, []uint64{c.ip}, c.sp, c.bp, c.base, c.words))
	}
	b.ResetTimer()
	for i := range b.N {
		c := copies[i%len(copies)]
		s.RecoverLeafAt(n.pid, []uint64{c.ip}, c.sp, c.bp, c.base, c.words)
	}
	b.ReportMetric(float64(frames)/float64(len(copies)), "frames/stack")
}

// The interpreted-frame layout the unwinder reads is the one the node on
// this machine describes in its postmortem metadata (v8dbg_* data
// symbols, for debuggers): the bytecode array and offset below fp, Smis in
// the upper half of a word or, with pointer compression, shifted by one.
func TestV8FrameLayoutMatchesNode(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("node not found (CI must provide Node.js): %v", err)
		}
		t.Skip("SKIP: node not on PATH: V8's frame layout NOT CHECKED")
	}
	f, err := elf.Open(node)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Skipf("SKIP: %s has no symbol table: V8's frame layout NOT CHECKED (%v)", node, err)
	}
	want := map[string]int32{
		"v8dbg_off_fp_bytecode_array":  -v8FPBytecodeArray,
		"v8dbg_off_fp_bytecode_offset": -v8FPBytecodeOffset,
		"v8dbg_HeapObjectTag":          v8HeapObjectTag,
	}
	got := map[string]int32{}
	for _, s := range syms {
		if _, ok := want[s.Name]; !ok && s.Name != "v8dbg_SmiShiftSize" && s.Name != "v8dbg_SmiValueShift" {
			continue
		}
		if int(s.Section) >= len(f.Sections) || f.Sections[s.Section].Type == elf.SHT_NOBITS {
			continue
		}
		sec := f.Sections[s.Section]
		b := make([]byte, 4)
		if _, err := sec.ReadAt(b, int64(s.Value-sec.Addr)); err != nil {
			t.Fatalf("%s: %v", s.Name, err)
		}
		got[s.Name] = int32(binary.LittleEndian.Uint32(b))
	}
	if len(got) < len(want) {
		t.Skipf("SKIP: %s lacks V8's postmortem metadata (%v): V8's frame layout NOT CHECKED", node, got)
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("%s = %d, the unwinder reads %d", name, got[name], w)
		}
	}
	if shift := got["v8dbg_SmiShiftSize"] + got["v8dbg_SmiValueShift"]; shift != 32 && shift != 1 {
		t.Errorf("Smis are shifted by %d, the unwinder reads 32 or 1", shift)
	}
}
