package symbolize

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// readPerfFile reads a whole perf map file into a new table.
func readPerfFile(t testing.TB, path string, limit int64) (*perfMap, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pm := &perfMap{}
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return pm, pm.read(f, fi.Size(), limit)
}

// perfLookup is lookup with the name parsed, "" for a miss.
func perfLookup(pm *perfMap, pc uint64) string {
	name, ok := pm.lookup(pc)
	if !ok {
		return ""
	}
	return name
}

// Overlapping lines: the newest line covering an address names it, whatever
// the order of the addresses in the file.
func TestPerfMapOverlaps(t *testing.T) {
	pm, err := readPerfFile(t, "testdata/perf-overlap.map", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		pc   uint64
		want string
	}{
		{0x1fff, ""},
		{0x2000, "old"}, {0x203f, "old"}, {0x2040, "inner"}, {0x207f, "inner"}, {0x2080, "old"}, {0x20ff, "old"}, {0x2100, ""},
		{0x3000, "big"}, {0x3040, "big"}, {0x307f, "big"}, {0x30ff, "big"},
		{0x407f, "first"}, {0x4080, "second"}, {0x417f, "second"}, {0x4180, ""},
		{0x5000, "q"}, {0x50ff, "q"}, {0x5100, "p"}, {0x517f, "p"}, {0x5180, ""},
		{0x6000, "v2"}, {0x600f, "v2"}, {0x6010, ""},
		{0x6fff, ""}, {0x7000, "outer"}, {0x70ff, "outer"}, {0x7100, "mid"}, {0x7140, "leaf"}, {0x714f, "leaf"},
		{0x7150, "mid"}, {0x71ff, "mid"}, {0x7200, "outer"}, {0x7fff, "outer"},
		{0x8000, "a"}, {0x800f, "a"}, {0x8010, "b"}, {0x801f, "b"}, {0x8020, ""},
		{0x907f, "under"}, {0x9080, "across"}, {0x917f, "across"}, {0x9180, "next"}, {0x91ff, "next"}, {0x9200, ""},
		{0, ""}, {^uint64(0), ""},
	} {
		if got := perfLookup(pm, c.pc); got != c.want {
			t.Errorf("lookup(%#x) = %q, want %q", c.pc, got, c.want)
		}
	}
	if pm.lines != 18 || pm.bad != 0 || pm.truncated {
		t.Errorf("lines %d bad %d truncated %v, want 18 0 false", pm.lines, pm.bad, pm.truncated)
	}
	// Ranges stay disjoint and sorted.
	for i := 1; i < len(pm.starts); i++ {
		if pm.starts[i] < pm.starts[i-1]+uint64(pm.sizes[i-1]) {
			t.Errorf("range %d [%#x+%#x) overlaps the one before", i, pm.starts[i], pm.sizes[i])
		}
	}
}

// Malformed lines are skipped and counted; the line still being written
// (no newline yet) is left for the next read, which takes it once whole.
func TestPerfMapGarbageAndTruncatedLine(t *testing.T) {
	data, err := os.ReadFile("testdata/perf-garbage.map")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "perf.map")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pm := &perfMap{}
	if err := pm.read(f, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	want := map[uint64]string{
		0x7f30: "JS:*withPrefix /a.js:3:1", 0x7f40: "crlf", 0x7f50: "doubleSpace", 0x7f60: "good",
		0x7f00: "", 0x7f10: "", 0x7f20: "", 0x7f80: "", 0x7f70: "", 0xffffffffffffff00: "",
	}
	for pc, w := range want {
		if got := perfLookup(pm, pc); got != w {
			t.Errorf("lookup(%#x) = %q, want %q", pc, got, w)
		}
	}
	// Blank, whitespace, 2 without name, 2 not hex, zero, too big, wraps, NUL.
	if pm.lines != 4 || pm.bad != 10 {
		t.Errorf("lines %d bad %d, want 4 and 10", pm.lines, pm.bad)
	}
	partial := int64(len("7f70 10 truncatedNoNewline"))
	if pm.offset != int64(len(data))-partial {
		t.Errorf("offset %d, want %d (all but the partial line)", pm.offset, int64(len(data))-partial)
	}

	// The runtime finishes the line and appends another.
	if _, err := f.WriteAt([]byte("\n8000 10 later\n"), int64(len(data))); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Seek(pm.offset, 0); err != nil {
		t.Fatal(err)
	}
	if err := pm.read(f, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if got := perfLookup(pm, 0x7f75); got != "truncatedNoNewline" {
		t.Errorf("after the line was finished: %q", got)
	}
	if got := perfLookup(pm, 0x8000); got != "later" {
		t.Errorf("appended line: %q", got)
	}
	if got := perfLookup(pm, 0x7f60); got != "good" {
		t.Errorf("older line lost: %q", got)
	}
}

// A line longer than the read buffer is skipped whole, and the lines after
// it are read.
func TestPerfMapLongLine(t *testing.T) {
	var b bytes.Buffer
	b.WriteString("1000 10 before\n")
	b.WriteString("2000 10 " + strings.Repeat("x", 3*perfLineBuf) + "\n")
	b.WriteString("3000 10 after\n")
	pm := &perfMap{}
	if err := pm.read(bytes.NewReader(b.Bytes()), int64(b.Len()), 1<<20); err != nil {
		t.Fatal(err)
	}
	if perfLookup(pm, 0x1000) != "before" || perfLookup(pm, 0x3000) != "after" || perfLookup(pm, 0x2000) != "" {
		t.Errorf("lookups: %q %q %q", perfLookup(pm, 0x1000), perfLookup(pm, 0x2000), perfLookup(pm, 0x3000))
	}
	if pm.bad != 1 || pm.offset != int64(b.Len()) {
		t.Errorf("bad %d offset %d, want 1 and %d", pm.bad, pm.offset, b.Len())
	}
}

// A real V8 perf map (node --perf-basic-prof; --interpreted-frames-native-stack
// for the interpreter's copies) under a byte limit: reading stops before the
// first line that does not fit, the table stays within the limit, and what
// was read still resolves.
func TestPerfMapSizeLimit(t *testing.T) {
	full, err := readPerfFile(t, "testdata/perf-node.map", 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if full.truncated || full.lines != 46 {
		t.Fatalf("full read: lines %d truncated %v, want 46 false", full.lines, full.truncated)
	}
	limit := full.bytes() / 2
	half, err := readPerfFile(t, "testdata/perf-node.map", limit)
	if !errors.Is(err, errPerfMapLimit) || !half.truncated {
		t.Fatalf("read under %d bytes: err %v truncated %v", limit, err, half.truncated)
	}
	if half.bytes() > limit {
		t.Errorf("table holds %d bytes, limit %d", half.bytes(), limit)
	}
	if half.lines < 10 || half.lines >= full.lines {
		t.Errorf("read %d of %d lines under half the memory", half.lines, full.lines)
	}
	// The first line resolves, the last one was never read.
	if got := perfLookup(half, 0x18c4000); got != "Builtin:DeoptimizationEntry_Eager" {
		t.Errorf("first line: %q", got)
	}
	if got := perfLookup(half, 0x7fb91c006b00); got != "" {
		t.Errorf("last line read past the limit: %q", got)
	}
	if got := perfLookup(full, 0x7fb91c006b00); got != "JS:*culpritHotLoop /tmp/jitx/hot.js:1:24" {
		t.Errorf("last line in the full read: %q", got)
	}
}

// V8's names become function and location; the engine's own code and
// other runtimes' names are kept.
func TestJITFunc(t *testing.T) {
	for _, c := range []struct {
		raw, fn, file string
		line          int
		str           string
	}{
		{"JS:*culpritHotLoop /tmp/jitx/hot.js:1:24", "culpritHotLoop", "/tmp/jitx/hot.js", 1, "culpritHotLoop (/tmp/jitx/hot.js:1)"},
		{"LazyCompile:*handler /app/server.js:12:20", "handler", "/app/server.js", 12, "handler (/app/server.js:12)"},
		{"JS:*hotLoop file:///x.js:3:1", "hotLoop", "/x.js", 3, "hotLoop (/x.js:3)"},
		{"JS:~get foo file:///tmp/jitx/m.mjs:1:18", "get foo", "/tmp/jitx/m.mjs", 1, "get foo (/tmp/jitx/m.mjs:1)"},
		{"JS:^ file:///tmp/jitx/m.mjs:1:1", "(anonymous)", "/tmp/jitx/m.mjs", 1, "(anonymous) (/tmp/jitx/m.mjs:1)"},
		{"JS:~ node:internal/main/run_main_module:1:1", "(anonymous)", "node:internal/main/run_main_module", 1, "(anonymous) (node:internal/main/run_main_module:1)"},
		{"Function:~ /app/a.js:5:3", "(anonymous)", "/app/a.js", 5, "(anonymous) (/app/a.js:5)"},
		{"Script:~ file:///tmp/jitx/m.mjs:1:1", "(script)", "/tmp/jitx/m.mjs", 1, "(script) (/tmp/jitx/m.mjs:1)"},
		{"Eval:~ :1:1", "(eval)", "", 1, "(eval)"},
		{"JS:* :1:20", "(anonymous)", "", 1, "(anonymous)"},
		{"JS:*noLocation", "noLocation", "", 0, "noLocation"},
		{"JS:*get foo", "get foo", "", 0, "get foo"},
		{"Builtin:ArrayPrototypePush", "Builtin:ArrayPrototypePush", "", 0, "Builtin:ArrayPrototypePush"},
		{"BytecodeHandler:LdaZero", "BytecodeHandler:LdaZero", "", 0, "BytecodeHandler:LdaZero"},
		{"RegExp:^[a-z]+:1:2$", "RegExp:^[a-z]+:1:2$", "", 0, "RegExp:^[a-z]+:1:2$"},
		{"Lcom/example/Handler;::handle", "Lcom/example/Handler;::handle", "", 0, "Lcom/example/Handler;::handle"},
		{"[OptimizedTier1] System.String::Concat(string,string)[Optimized]", "[OptimizedTier1] System.String::Concat(string,string)[Optimized]", "", 0, "[OptimizedTier1] System.String::Concat(string,string)[Optimized]"},
	} {
		fn, file, line := jitFunc(c.raw)
		if fn != c.fn || file != c.file || line != c.line {
			t.Errorf("jitFunc(%q) = %q %q %d, want %q %q %d", c.raw, fn, file, line, c.fn, c.file, c.line)
		}
		f := Frame{Func: fn, File: file, Line: line, JIT: true}
		if got := f.String(); got != c.str {
			t.Errorf("String() of %q = %q, want %q", c.raw, got, c.str)
		}
	}
}

// naivePerf is the reference model: the last line covering pc wins.
type naivePerf struct {
	start, size []uint64
	name        []string
}

func (n *naivePerf) lookup(pc uint64) string {
	for i := len(n.start) - 1; i >= 0; i-- {
		if pc >= n.start[i] && pc-n.start[i] < n.size[i] {
			return n.name[i]
		}
	}
	return ""
}

// Random lines, read in one go or appended in chunks (as a runtime writes
// them, with reads in between): every address resolves as the reference
// model says, and the names of ranges recompiled over are compacted away.
func TestPerfMapMatchesModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 40 {
		var model naivePerf
		var file bytes.Buffer
		n := 1 + rng.IntN(300)
		for i := range n {
			start := 0x10000 + uint64(rng.IntN(0x4000))&^3
			size := 1 + uint64(rng.IntN(0x400))
			name := fmt.Sprintf("JS:*f%d_%d /app/f%d.js:%d:1", round, i, i%7, i)
			model.start, model.size, model.name = append(model.start, start), append(model.size, size), append(model.name, name)
			fmt.Fprintf(&file, "%x %x %s\n", start, size, name)
		}
		one := &perfMap{}
		if err := one.read(bytes.NewReader(file.Bytes()), int64(file.Len()), 1<<30); err != nil {
			t.Fatal(err)
		}
		chunked := &perfMap{}
		data := file.Bytes()
		for chunked.offset < int64(len(data)) {
			// Cut anywhere, even mid-line: only complete lines are taken.
			end := min(int64(len(data)), chunked.offset+1+int64(rng.IntN(len(data)/3+1)))
			if err := chunked.read(bytes.NewReader(data[chunked.offset:end]), end-chunked.offset, 1<<30); err != nil {
				t.Fatal(err)
			}
		}
		for pc := uint64(0xfff0); pc < 0x14800; pc++ {
			want := model.lookup(pc)
			if got := perfLookup(one, pc); got != want {
				t.Fatalf("round %d: one read: lookup(%#x) = %q, want %q", round, pc, got, want)
			}
			if got := perfLookup(chunked, pc); got != want {
				t.Fatalf("round %d: chunked reads: lookup(%#x) = %q, want %q", round, pc, got, want)
			}
		}
		if int64(len(chunked.arena)) > 2*int64(len(one.arena))+4096 {
			t.Errorf("round %d: chunked arena %d bytes, one read %d: dead names not compacted", round, len(chunked.arena), len(one.arena))
		}
	}
}

// fakeProc builds a procfs with one process: its status (NSpid), maps and
// a perf map under its root. It returns the perf map's path.
func fakeProc(t *testing.T, root string, pid, nspid int, maps, perf string) string {
	t.Helper()
	dir := filepath.Join(root, strconv.Itoa(pid))
	if err := os.MkdirAll(filepath.Join(dir, "root", "tmp"), 0o755); err != nil {
		t.Fatal(err)
	}
	status := fmt.Sprintf("Name:\tnode\nTgid:\t%d\nPid:\t%d\nNSpid:\t%d\t%d\n", pid, pid, pid, nspid)
	if err := os.WriteFile(filepath.Join(dir, "status"), []byte(status), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "maps"), []byte(maps), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "root", "tmp", fmt.Sprintf("perf-%d.map", nspid))
	if err := os.WriteFile(path, []byte(perf), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

const jitMaps = "7f0000000000-7f0000100000 rwxp 00000000 00:00 0 \n"

// Through the Symbolizer: the perf map is found by the process's PID in its
// own namespace, read on the first miss, re-read at most once per
// perfMapRecheck when a miss finds it grown, and dropped with the process.
func TestSymbolizerPerfMapReloadAndDrop(t *testing.T) {
	root := t.TempDir()
	const pid, nspid = 4321, 7
	path := fakeProc(t, root, pid, nspid, jitMaps, "7f0000001000 100 JS:*first /app/a.js:3:1\n")
	s := New(Options{ProcRoot: root})
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }

	fr := s.UserStack(pid, []uint64{0x7f0000001010, 0x7f0000002010})
	if len(fr) != 2 || fr[0].String() != "first (/app/a.js:3)" || !fr[0].JIT || fr[0].Module != anonModule {
		t.Fatalf("first read: %+v", fr)
	}
	// Unnamed generated code is still code: it stays, honestly unnamed.
	if fr[1].JIT || fr[1].Func != "" || fr[1].String() != "[anon]+0x2010" {
		t.Errorf("unnamed JIT frame: %+v %q", fr[1], fr[1].String())
	}

	// The runtime compiles more; a miss within the recheck interval does
	// not read the file again, one after it does.
	f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("7f0000002000 100 JS:*second /app/b.js:9:1\n7f0000001000 80 JS:*firstAgain /app/a.js:3:1\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	now = now.Add(perfMapRecheck / 2)
	if got := s.UserStack(pid, []uint64{0x7f0000002010})[0].String(); got != "[anon]+0x2010" {
		t.Errorf("re-read within the recheck interval: %q", got)
	}
	now = now.Add(perfMapRecheck)
	fr = s.UserStack(pid, []uint64{0x7f0000002010, 0x7f0000001010, 0x7f0000001090})
	if got := []string{fr[0].String(), fr[1].String(), fr[2].String()}; !reflect.DeepEqual(got, []string{
		"second (/app/b.js:9)", "firstAgain (/app/a.js:3)", "first (/app/a.js:3)"}) {
		t.Errorf("after the file grew: %q", got)
	}
	if s.perfBytes <= 0 || s.perfBytes != s.perf[pid].m.bytes() {
		t.Errorf("perfBytes %d, table %d", s.perfBytes, s.perf[pid].m.bytes())
	}

	// The runtime collects code and compiles new code at its address: a
	// hit on the old entry is not trusted once the file grew.
	f, err = os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("7f0000002000 100 JS:*reused /app/c.js:5:1\n"); err != nil {
		t.Fatal(err)
	}
	f.Close()
	now = now.Add(perfHitRecheck)
	if got := s.UserStack(pid, []uint64{0x7f0000002010})[0].String(); got != "reused (/app/c.js:5)" {
		t.Errorf("a hit after the address was reused: %q, want the new code's name", got)
	}

	// The process exits: its maps are gone, and its JIT symbols with them.
	if err := os.RemoveAll(filepath.Join(root, strconv.Itoa(pid))); err != nil {
		t.Fatal(err)
	}
	now = now.Add(defaultMapsTTL)
	if fr := s.UserStack(pid, []uint64{0x7f0000002010}); len(fr) != 0 {
		t.Errorf("exited process: %+v", fr)
	}
	if s.perfBytes != 0 || s.perf[pid] != nil {
		t.Errorf("after exit: perfBytes %d, state %+v", s.perfBytes, s.perf[pid])
	}

	// Forget drops it too.
	fakeProc(t, root, pid, nspid, jitMaps, "7f0000001000 100 JS:*back /app/a.js:3:1\n")
	now = now.Add(defaultMapsTTL)
	if got := s.UserStack(pid, []uint64{0x7f0000001010})[0].String(); got != "back (/app/a.js:3)" {
		t.Errorf("restarted: %q", got)
	}
	s.Forget(pid)
	if s.perfBytes != 0 || len(s.perf) != 0 {
		t.Errorf("after Forget: perfBytes %d, %d states", s.perfBytes, len(s.perf))
	}
}

// All perf maps together stay within MaxPerfMapBytes: a process's map that
// needs room takes it from the least recently used other one, and one that
// alone does not fit is read up to the limit.
func TestSymbolizerPerfMapBudget(t *testing.T) {
	root := t.TempDir()
	perf := func(fn string, n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "7f%010x 10 JS:*%s%d /app/%s.js:%d:1\n", 0x1000+i*0x10, fn, i, fn, i)
		}
		return b.String()
	}
	fakeProc(t, root, 100, 100, jitMaps, perf("a", 100))
	fakeProc(t, root, 200, 200, jitMaps, perf("b", 100))
	probe := &perfMap{}
	if err := probe.read(strings.NewReader(perf("a", 100)), 0, 1<<30); err != nil {
		t.Fatal(err)
	}
	limit := probe.bytes() * 3 / 2 // room for one map, not two
	s := New(Options{ProcRoot: root, MaxPerfMapBytes: limit})
	now := time.Unix(1e9, 0)
	s.now = func() time.Time { return now }
	if got := s.UserStack(100, []uint64{0x7f0000001000})[0].Func; got != "a0" {
		t.Fatalf("pid 100: %q", got)
	}
	now = now.Add(time.Millisecond)
	if got := s.UserStack(200, []uint64{0x7f0000001000})[0].Func; got != "b0" {
		t.Fatalf("pid 200: %q", got)
	}
	if s.perfBytes > limit {
		t.Errorf("perf maps hold %d bytes, limit %d", s.perfBytes, limit)
	}
	if s.perf[100].m != nil {
		t.Errorf("pid 100's map not evicted for pid 200's")
	}

	// One map alone larger than the limit: read up to it, and said so.
	fakeProc(t, root, 300, 300, jitMaps, perf("c", 1000))
	var logBuf bytes.Buffer
	s.log = slog.New(slog.NewTextHandler(&logBuf, nil))
	s.UserStack(300, []uint64{0x7f0000001000})
	if s.perfBytes > limit || s.perf[300].m == nil || !s.perf[300].m.truncated {
		t.Errorf("oversized map: perfBytes %d (limit %d), state %+v", s.perfBytes, limit, s.perf[300].m)
	}
	if !strings.Contains(logBuf.String(), "profiling.max_perf_map_bytes") {
		t.Errorf("no warning about the limit: %q", logBuf.String())
	}
	if got := s.UserStack(300, []uint64{0x7f0000001000})[0].Func; got != "c0" {
		t.Errorf("first entry of the truncated map: %q", got)
	}

	// Negative: perf maps are not read at all.
	off := New(Options{ProcRoot: root, MaxPerfMapBytes: -1})
	if f := off.UserStack(100, []uint64{0x7f0000001000})[0]; f.JIT || len(off.perf) != 0 {
		t.Errorf("disabled: %+v", f)
	}
}

// A stack walked by frame pointers into code without them: after real
// frames of this process comes an address where nothing is mapped
// (0x2e71800000000000, as seen on a Node.js service) and one in data, not
// code; the stack ends before the first of them. User keeps every address.
func TestUserStackEndsWhereNoCodeIs(t *testing.T) {
	pcs := callers()
	addrs := []uint64{uint64(reflect.ValueOf(culpritTarget).Pointer())}
	for _, pc := range pcs[:2] {
		addrs = append(addrs, uint64(pc))
	}
	var data [16]byte
	dataAddr := uint64(uintptr(unsafe.Pointer(&data)))
	cut := len(addrs)
	addrs = append(addrs, 0x2e71800000000000, uint64(pcs[2]), dataAddr)
	s := New(Options{})
	fr := s.UserStack(os.Getpid(), addrs)
	if len(fr) != cut {
		t.Fatalf("UserStack kept %d frames, want %d: %v", len(fr), cut, fr)
	}
	for i, f := range fr {
		if f.Func == "" || strings.HasPrefix(f.String(), "0x") {
			t.Errorf("frame %d = %+v", i, f)
		}
	}
	if got := s.User(os.Getpid(), addrs); len(got) != len(addrs) || got[cut].String() != "0x2e71800000000000" {
		t.Errorf("User changed length or the unknown frame: %v", got)
	}
	// An address in data rather than code ends it as well.
	if fr := s.UserStack(os.Getpid(), []uint64{addrs[0], dataAddr, addrs[1]}); len(fr) != 1 {
		t.Errorf("stack through a data address kept %d frames: %v", len(fr), fr)
	}
	// A zero (unused slot) ends it.
	if fr := s.UserStack(os.Getpid(), []uint64{addrs[0], 0, addrs[1]}); len(fr) != 1 {
		t.Errorf("stack through a zero kept %d frames: %v", len(fr), fr)
	}
	if fr := s.UserStack(os.Getpid(), nil); len(fr) != 0 {
		t.Errorf("empty stack: %v", fr)
	}
}

// Generated code in this very process: an anonymous executable mapping,
// named by a perf map at the real /tmp/perf-PID.map. Unnamed, a frame there
// is "[anon]+0x..."; named, it is a JIT frame; past the mapping's end (the
// map names nothing there) the stack ends.
func TestUserStackRealAnonymousCode(t *testing.T) {
	mem, err := syscall.Mmap(-1, 0, 1<<16, syscall.PROT_READ|syscall.PROT_EXEC, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		t.Fatalf("mmap executable memory: %v", err)
	}
	t.Cleanup(func() { syscall.Munmap(mem) })
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	pid := os.Getpid()
	path := fmt.Sprintf("/tmp/perf-%d.map", pid)
	if _, err := os.Stat(path); err == nil {
		t.Fatalf("%s exists already: not ours to overwrite", path)
	}
	t.Cleanup(func() { os.Remove(path) })

	s := New(Options{})
	now := time.Now()
	s.now = func() time.Time { return now }
	goFrame := uint64(callers()[1]) // a return address, as frames past the leaf are
	fr := s.UserStack(pid, []uint64{base + 0x100, goFrame})
	if len(fr) != 2 || fr[0].String() != "[anon]+0x100" || fr[0].JIT {
		t.Fatalf("unnamed generated code: %v", fr)
	}
	perf := fmt.Sprintf("%x 200 JS:*culpritJIT /srv/app.js:42:7\n%x 10 Builtin:CEntry\n", base, base+0x400)
	if err := os.WriteFile(path, []byte(perf), 0o644); err != nil {
		t.Fatal(err)
	}
	now = now.Add(perfMapRecheck)
	fr = s.UserStack(pid, []uint64{base + 0x100, base + 0x404, goFrame, base + 1<<16 + 0x100})
	if len(fr) != 3 {
		t.Fatalf("want 3 frames (the one past the mapping cut): %v", fr)
	}
	if !fr[0].JIT || fr[0].Func != "culpritJIT" || fr[0].File != "/srv/app.js" || fr[0].Line != 42 ||
		fr[0].String() != "culpritJIT (/srv/app.js:42)" {
		t.Errorf("JIT frame: %+v %q", fr[0], fr[0].String())
	}
	if !fr[1].JIT || fr[1].String() != "Builtin:CEntry" {
		t.Errorf("runtime frame: %+v", fr[1])
	}
	if fr[2].JIT || !strings.HasSuffix(fr[2].Func, ".TestUserStackRealAnonymousCode") {
		t.Errorf("Go frame after JIT frames: %+v", fr[2])
	}
}

// The perf map of a process in its own PID and mount namespaces: it names
// the file with its PID there (1) and writes it to its own /tmp, which the
// agent sees only through /proc/PID/root.
func TestPerfMapOfNamespacedProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFail(t, "creating PID and mount namespaces needs root")
	}
	const script = `mount -t tmpfs tmpfs /tmp && printf '10000000 100 JS:*culpritNsFunc /srv/app.js:7:3\n' > /tmp/perf-$$.map.tmp && mv /tmp/perf-$$.map.tmp /tmp/perf-$$.map && exec sleep 60`
	cmd := exec.Command("sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:   syscall.CLONE_NEWPID,
		Unshareflags: syscall.CLONE_NEWNS, // Go makes / private first: the tmpfs stays inside
		Pdeathsig:    syscall.SIGKILL,
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start namespaced child: %v", err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	pid := cmd.Process.Pid
	inside := fmt.Sprintf("/proc/%d/root/tmp/perf-1.map", pid)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(inside); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("child never wrote %s; stderr: %s", inside, stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	p, err := perfPath("/proc", pid)
	if err != nil {
		t.Fatal(err)
	}
	if p != inside {
		t.Errorf("perfPath = %s, want %s", p, inside)
	}
	if _, err := os.Stat(fmt.Sprintf("/tmp/perf-%d.map", pid)); err == nil {
		t.Fatalf("a perf map for host pid %d exists in our /tmp: the test proves nothing", pid)
	}
	fr := New(Options{}).UserStack(pid, []uint64{0x10000010})
	if len(fr) != 1 || fr[0].String() != "culpritNsFunc (/srv/app.js:7)" {
		t.Errorf("frame of the namespaced process: %+v", fr)
	}
}

func skipOrFail(t *testing.T, reason string) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Fatal(reason)
	}
	fmt.Fprintln(os.Stderr, "SKIP:", reason)
	t.Skip(reason)
}

// benchPerfMap writes a perf map of n entries whose names are the real V8
// names of testdata/perf-node.map in turn, at increasing addresses with
// gaps, and returns it with addresses inside its entries.
func benchPerfMap(b *testing.B, n int) ([]byte, []uint64) {
	b.Helper()
	real, err := os.ReadFile("testdata/perf-node.map")
	if err != nil {
		b.Fatal(err)
	}
	var names []string
	for line := range strings.Lines(string(real)) {
		f := strings.SplitN(strings.TrimSpace(line), " ", 3)
		names = append(names, f[2])
	}
	rng := rand.New(rand.NewPCG(3, 4))
	var file bytes.Buffer
	addr := uint64(0x7f0000000000)
	pcs := make([]uint64, 0, 1024)
	for i := range n {
		size := 0x20 + uint64(rng.IntN(0x800))
		fmt.Fprintf(&file, "%x %x %s\n", addr, size, names[i%len(names)])
		if len(pcs) < cap(pcs) && rng.IntN(n/cap(pcs)+1) == 0 {
			pcs = append(pcs, addr+uint64(rng.IntN(int(size))))
		}
		addr += size + uint64(rng.IntN(2))*0x40
	}
	return file.Bytes(), pcs
}

// BenchmarkPerfMapLookup measures naming an address from a 50k-entry perf
// map (lookup and parsing the V8 name into function, file and line), the
// memory the table takes per entry, and the read of the whole file; beside
// it, naming an address from an ELF symbol table (libc's, uncached, and the
// memoized path the symbolizer takes).
func BenchmarkPerfMapLookup(b *testing.B) {
	const entries = 50000
	data, pcs := benchPerfMap(b, entries)
	pm := &perfMap{}
	if err := pm.read(bytes.NewReader(data), int64(len(data)), 1<<30); err != nil {
		b.Fatal(err)
	}
	if pm.lines != entries || len(pm.starts) != entries {
		b.Fatalf("read %d lines into %d ranges, want %d", pm.lines, len(pm.starts), entries)
	}
	b.Run("perfmap-50k", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			name, ok := pm.lookup(pcs[i%len(pcs)])
			if !ok {
				b.Fatalf("miss at %#x", pcs[i%len(pcs)])
			}
			jitFunc(name)
			i++
		}
		b.ReportMetric(float64(pm.bytes())/entries, "bytes/entry")
		b.ReportMetric(float64(len(data))/entries, "file-bytes/entry")
	})
	b.Run("perfmap-50k-no-parse", func(b *testing.B) {
		i := 0
		for b.Loop() {
			if _, ok := pm.lookup(pcs[i%len(pcs)]); !ok {
				b.Fatalf("miss at %#x", pcs[i%len(pcs)])
			}
			i++
		}
	})
	b.Run("perfmap-read-50k", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(data)))
		for b.Loop() {
			m := &perfMap{}
			if err := m.read(bytes.NewReader(data), int64(len(data)), 1<<30); err != nil {
				b.Fatal(err)
			}
		}
	})

	libc := ""
	for _, m := range parseMaps(mustRead(b, "/proc/self/maps")) {
		if IsCLibrary(m.Path) && strings.Contains(m.Path, "libc.so") {
			libc = m.Path
		}
	}
	if libc == "" {
		// A static Go test binary maps no libc: its own symbols will do.
		exe, err := os.Executable()
		if err != nil {
			b.Fatal(err)
		}
		libc = exe
	}
	f, err := os.Open(libc)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	ef, err := parseELF(f)
	if err != nil {
		b.Fatal(err)
	}
	syms := append(ef.sized.all(), ef.unsized.all()...)
	if len(syms) == 0 {
		b.Fatalf("%s has no function symbols", libc)
	}
	var symBytes int
	for _, s := range syms {
		symBytes += int(unsafe.Sizeof(s)) + len(s.name)
	}
	epcs := make([]uint64, 1024)
	rng := rand.New(rand.NewPCG(5, 6))
	for i := range epcs {
		s := syms[rng.IntN(len(syms))]
		epcs[i] = s.addr + uint64(rng.IntN(int(max(s.size, 1))))
	}
	b.Run("elf-symtab-uncached", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			ef.symLookup(epcs[i%len(epcs)])
			i++
		}
		b.ReportMetric(float64(symBytes)/float64(len(syms)), "bytes/symbol")
		b.ReportMetric(float64(len(syms)), "symbols")
	})
	b.Run("elf-lookup-memo", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			ef.lookup(epcs[i%len(epcs)])
			i++
		}
	})
}
