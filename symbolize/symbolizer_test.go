package symbolize

import (
	"debug/elf"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

//go:noinline
func culpritTarget(x int) int {
	if x > 1000 {
		return culpritTarget(x-1) + 1
	}
	return x * 2
}

// callers returns the return addresses of its callers, outermost last.
//
//go:noinline
func callers() []uintptr {
	pcs := make([]uintptr, 16)
	return pcs[:runtime.Callers(1, pcs)]
}

func TestUserGoFunction(t *testing.T) {
	pc := uint64(reflect.ValueOf(culpritTarget).Pointer())
	s := New(Options{})
	fr := s.User(os.Getpid(), []uint64{pc, pc + 4})
	if len(fr) != 2 {
		t.Fatalf("got %d frames", len(fr))
	}
	f := fr[0]
	if !strings.HasSuffix(f.Func, "symbolize.culpritTarget") {
		t.Fatalf("Func = %q, want ...symbolize.culpritTarget (frame %+v)", f.Func, f)
	}
	if !strings.HasSuffix(f.File, "symbolizer_test.go") || f.Line <= 0 {
		t.Errorf("File:Line = %s:%d, want symbolizer_test.go:N", f.File, f.Line)
	}
	_, wantLine := runtime.FuncForPC(uintptr(pc)).FileLine(uintptr(pc))
	if f.Line != wantLine {
		t.Errorf("Line = %d, runtime says %d", f.Line, wantLine)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if f.Module != exe {
		t.Errorf("Module = %q, want %q", f.Module, exe)
	}
	// The test binary is a non-PIE executable: the file offset is the
	// address minus the text segment's vaddr plus its offset.
	if want := fileOffset(t, exe, pc); f.Offset != want {
		t.Errorf("Offset = %#x, want %#x", f.Offset, want)
	}
	if fr[1].Func != f.Func || fr[1].Addr != pc+4 {
		t.Errorf("second frame = %+v", fr[1])
	}
	if got := f.String(); got != f.Func {
		t.Errorf("String() = %q, want %q", got, f.Func)
	}
}

// TestUserMatchesRuntime compares real return addresses with what the Go
// runtime itself says about them.
func TestUserMatchesRuntime(t *testing.T) {
	pcs := callers()
	if len(pcs) < 3 {
		t.Fatalf("only %d callers", len(pcs))
	}
	addrs := make([]uint64, 0, len(pcs)+1)
	// A dummy leaf, so that every real address is treated as a return address.
	addrs = append(addrs, uint64(reflect.ValueOf(culpritTarget).Pointer()))
	for _, pc := range pcs {
		addrs = append(addrs, uint64(pc))
	}
	fr := New(Options{}).User(os.Getpid(), addrs)
	for i, pc := range pcs {
		f := fr[i+1]
		rf := runtime.FuncForPC(pc - 1)
		if rf == nil {
			t.Fatalf("runtime knows no function at %#x", pc)
		}
		file, line := rf.FileLine(pc - 1)
		if f.Func != rf.Name() || f.File != file || f.Line != line {
			t.Errorf("frame %d %#x: got %s %s:%d, runtime says %s %s:%d",
				i, pc, f.Func, f.File, f.Line, rf.Name(), file, line)
		}
	}
	if !strings.HasSuffix(fr[1].Func, ".callers") || !strings.HasSuffix(fr[2].Func, ".TestUserMatchesRuntime") {
		t.Errorf("unexpected stack: %v, %v", fr[1], fr[2])
	}
}

func TestUserUnknown(t *testing.T) {
	s := New(Options{})
	// Zero (unused stack slot), an unmapped address, and a dead pid.
	fr := s.User(os.Getpid(), []uint64{0, 8})
	for i, f := range fr {
		if f.Func != "" || f.Module != "" {
			t.Errorf("frame %d = %+v, want unknown", i, f)
		}
	}
	if got := fr[1].String(); got != "0x8" {
		t.Errorf("String() = %q, want 0x8", got)
	}
	fr = s.User(1<<30, []uint64{0x400000})
	if len(fr) != 1 || fr[0].Func != "" || fr[0].Addr != 0x400000 {
		t.Errorf("dead pid: %+v", fr)
	}
	if fr := s.User(os.Getpid(), nil); len(fr) != 0 {
		t.Errorf("nil addrs: %+v", fr)
	}
}

// TestUserProcRootAndReread uses a fake ProcRoot whose maps appear after the
// first read, checking both that ProcRoot is honoured and that a miss
// re-reads maps without waiting for the TTL.
func TestUserProcRootAndReread(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	real := parseMaps(mustRead(t, "/proc/self/maps"))
	pc := uint64(reflect.ValueOf(culpritTarget).Pointer())
	i := findMapping(real, pc)
	if i < 0 {
		t.Fatalf("pc %#x not in own maps", pc)
	}
	m := real[i]

	root := t.TempDir()
	const pid = 4242
	mapsPath := filepath.Join(root, strconv.Itoa(pid), "maps")
	if err := os.MkdirAll(filepath.Dir(mapsPath), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(mapsPath, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	s := New(Options{ProcRoot: root})
	if f := s.User(pid, []uint64{pc})[0]; f.Func != "" || f.Module != "" {
		t.Fatalf("empty maps resolved %+v", f)
	}
	line := fmt.Sprintf("%x-%x r-xp %08x 00:00 %d %s\n", m.Start, m.End, m.Offset, m.Inode, exe)
	if err := os.WriteFile(mapsPath, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	if f := s.User(pid, []uint64{pc})[0]; !strings.HasSuffix(f.Func, ".culpritTarget") {
		t.Fatalf("after maps changed: %+v", f)
	}
	// Cached now: removing the file does not lose the mapping...
	if err := os.Remove(mapsPath); err != nil {
		t.Fatal(err)
	}
	if f := s.User(pid, []uint64{pc})[0]; !strings.HasSuffix(f.Func, ".culpritTarget") {
		t.Fatalf("cached maps lost: %+v", f)
	}
	// ...until Forget.
	s.Forget(pid)
	if f := s.User(pid, []uint64{pc})[0]; f.Func != "" {
		t.Fatalf("after Forget: %+v", f)
	}
}

func TestUserConcurrent(t *testing.T) {
	s := New(Options{MaxFiles: 1})
	pc := uint64(reflect.ValueOf(culpritTarget).Pointer())
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for range 8 {
		wg.Go(func() {
			for range 50 {
				f := s.User(os.Getpid(), []uint64{pc})[0]
				if !strings.HasSuffix(f.Func, ".culpritTarget") {
					errs <- f.String()
					return
				}
				s.Forget(os.Getpid())
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Errorf("concurrent lookup got %s", e)
	}
}

func TestVDSO(t *testing.T) {
	var vdso mapping
	for _, m := range parseMaps(mustRead(t, "/proc/self/maps")) {
		if m.Path == "[vdso]" {
			vdso = m
		}
	}
	if vdso.Start == 0 {
		t.Skip("SKIP: no [vdso] mapping in this process")
	}
	ef, err := readVDSO("/proc")
	if err != nil {
		t.Fatal(err)
	}
	// Find the runtime address of a vDSO function from its own symbols, then
	// symbolize it as if it came from a stack.
	var sym symbol
	for _, s := range ef.sized.all() {
		if strings.Contains(s.name, "clock_gettime") {
			sym = s
		}
	}
	if sym.name == "" {
		t.Skip("SKIP: vDSO has no clock_gettime")
	}
	base := ef.loads[0].vaddr - ef.loads[0].off
	addr := vdso.Start + sym.addr - base + 2
	f := New(Options{}).User(os.Getpid(), []uint64{addr})[0]
	if !strings.Contains(f.Func, "clock_gettime") || f.Module != "[vdso]" {
		t.Errorf("vdso frame = %+v", f)
	}
}

func mustRead(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// fileOffset converts a virtual address of the ELF file at path to a file
// offset independently of the code under test.
func fileOffset(t testing.TB, path string, vaddr uint64) uint64 {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD && vaddr >= p.Vaddr && vaddr < p.Vaddr+p.Filesz {
			return vaddr - p.Vaddr + p.Off
		}
	}
	t.Fatalf("%#x in no segment of %s", vaddr, path)
	return 0
}

// textAddrs returns n addresses spread over the test binary's .text.
func textAddrs(t testing.TB, n int) []uint64 {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	text := f.Section(".text")
	if text == nil {
		t.Fatal("no .text")
	}
	out := make([]uint64, n)
	for i := range out {
		out[i] = text.Addr + uint64(i)*(text.Size/uint64(n))
	}
	return out
}

func BenchmarkUser(b *testing.B) {
	addrs := textAddrs(b, 1000)
	s := New(Options{})
	pid := os.Getpid()
	fr := s.User(pid, addrs) // warm the caches
	known := 0
	for _, f := range fr {
		if f.Func != "" {
			known++
		}
	}
	if known < len(addrs)*9/10 {
		b.Fatalf("only %d of %d addresses symbolized", known, len(addrs))
	}
	b.ReportAllocs()
	for b.Loop() {
		s.User(pid, addrs)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(addrs)), "ns/addr")
}

// TestUnusedFilesDropped: a parsed file no lookup used for fileKeep is
// dropped from the cache, and a later lookup parses it again with the same
// answer.
func TestUnusedFilesDropped(t *testing.T) {
	pc := uint64(reflect.ValueOf(culpritTarget).Pointer())
	s := New(Options{})
	s.mu.Lock()
	s.fileKeep = time.Hour // sweeps by hand first
	s.mu.Unlock()
	first := s.User(os.Getpid(), []uint64{pc})[0]
	if !strings.HasSuffix(first.Func, "symbolize.culpritTarget") {
		t.Fatalf("Func = %q", first.Func)
	}
	if n := s.cachedFiles(); n == 0 {
		t.Fatal("no file cached after a lookup")
	}
	// Used since the last sweep: kept.
	s.sweepFiles()
	if n := s.cachedFiles(); n == 0 {
		t.Fatal("a file used since the last sweep was dropped")
	}
	s.User(os.Getpid(), []uint64{pc})
	s.sweepFiles()
	if n := s.cachedFiles(); n == 0 {
		t.Fatal("a file used since the last sweep was dropped")
	}
	// Unused for a whole period: dropped.
	s.sweepFiles()
	if n := s.cachedFiles(); n != 0 {
		t.Fatalf("%d files still cached after a period unused", n)
	}
	if again := s.User(os.Getpid(), []uint64{pc})[0]; again != first {
		t.Errorf("after the drop: %+v, before: %+v", again, first)
	}
	// The timer sweeps by itself.
	s.mu.Lock()
	s.fileKeep = 20 * time.Millisecond
	s.sweep.Reset(s.fileKeep)
	s.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for s.cachedFiles() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.cachedFiles(); n != 0 {
		t.Fatalf("%d files still cached after fileKeep unused", n)
	}
}
