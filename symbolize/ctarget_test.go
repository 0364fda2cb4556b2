package symbolize

import (
	"bufio"
	"debug/elf"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// cTarget is a running testdata/target.c process.
type cTarget struct {
	pid                    int
	pieFn, staticFn, libFn uint64
	getpid                 uint64
	exe, lib               string
}

// compiler returns a C compiler on PATH, skipping loudly without one.
func compiler(t *testing.T) string {
	t.Helper()
	for _, cc := range []string{"cc", "clang", "gcc"} {
		if p, err := exec.LookPath(cc); err == nil {
			return p
		}
	}
	t.Skip("SKIP: no C compiler (cc, clang, gcc) on PATH: PIE and shared library symbolization NOT TESTED")
	return ""
}

// buildCTarget compiles target.c as a PIE linked against lib.c as a shared
// library. extra flags go to the executable's link.
func buildCTarget(t *testing.T, dir string, extra ...string) (exe, lib string) {
	t.Helper()
	cc := compiler(t)
	src, err := filepath.Abs("testdata")
	if err != nil {
		t.Fatal(err)
	}
	lib = filepath.Join(dir, "libculprit.so")
	exe = filepath.Join(dir, "target")
	run := func(args ...string) {
		out, err := exec.Command(cc, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %s: %v\n%s", cc, strings.Join(args, " "), err, out)
		}
	}
	run("-O0", "-g", "-fPIC", "-shared", "-o", lib, filepath.Join(src, "lib.c"))
	args := []string{"-O0", "-fPIE", "-pie", "-o", exe, filepath.Join(src, "target.c"),
		"-L" + dir, "-lculprit", "-Wl,-rpath," + dir}
	run(append(args, extra...)...)
	return exe, lib
}

func startCTarget(t *testing.T, exe, lib string) *cTarget {
	t.Helper()
	cmd := exec.Command(exe)
	out, err := cmd.StdoutPipe()
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
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil && err != io.EOF {
		t.Fatal(err)
	}
	fs := strings.Fields(line)
	if len(fs) != 4 {
		t.Fatalf("target printed %q", line)
	}
	var a [4]uint64
	for i, f := range fs {
		if a[i], err = strconv.ParseUint(strings.TrimPrefix(f, "0x"), 16, 64); err != nil {
			t.Fatalf("target printed %q: %v", line, err)
		}
	}
	return &cTarget{pid: cmd.Process.Pid, pieFn: a[0], staticFn: a[1], libFn: a[2], getpid: a[3], exe: exe, lib: lib}
}

func TestUserPIEAndSharedLibrary(t *testing.T) {
	exe, lib := buildCTarget(t, t.TempDir())
	if f, err := elf.Open(exe); err != nil || f.Type != elf.ET_DYN {
		t.Fatalf("target is not PIE (err %v)", err)
	}
	tg := startCTarget(t, exe, lib)
	if tg.pieFn < 0x10000000 {
		t.Fatalf("culprit_pie_fn at %#x: not relocated, so PIE is not being tested", tg.pieFn)
	}
	s := New(Options{MaxFiles: 1}) // evictions must not change answers

	for _, c := range []struct {
		name   string
		addr   uint64
		want   string
		module string
	}{
		{"pie global", tg.pieFn, "culprit_pie_fn", exe},
		{"pie static", tg.staticFn, "culprit_static_fn", exe},
		{"shared library", tg.libFn, "culprit_lib_fn", lib},
		{"libc", tg.getpid, "getpid", "libc"},
	} {
		t.Run(c.name, func(t *testing.T) {
			// As a leaf, one byte in; and as a return address one byte past
			// the entry, which must resolve through addr-1 to the entry.
			fr := s.User(tg.pid, []uint64{c.addr + 1, c.addr + 1})
			for i, f := range fr {
				if f.Func != c.want && !(c.want == "getpid" && strings.Contains(f.Func, "getpid")) {
					t.Errorf("frame %d %#x: Func = %q, want %q (%+v)", i, f.Addr, f.Func, c.want, f)
				}
				if !strings.Contains(f.Module, c.module) {
					t.Errorf("frame %d: Module = %q, want %q", i, f.Module, c.module)
				}
			}
		})
	}
	if n := s.lru.Len(); n > 1 || len(s.files) > 1 {
		t.Errorf("file cache holds %d entries, MaxFiles is 1", n)
	}
	// The executable was evicted by the libraries; it is opened again.
	if f := s.User(tg.pid, []uint64{tg.pieFn})[0]; f.Func != "culprit_pie_fn" {
		t.Errorf("after eviction: %+v", f)
	}
	for _, o := range s.pids[tg.pid].objs {
		if o.entry != nil && o.entry.evicted && o.entry.file != nil {
			t.Errorf("evicted entry still holds its parsed file")
		}
	}
	// The entry address as a return address belongs to whatever precedes
	// the function, never to the function itself.
	if f := s.User(tg.pid, []uint64{0, tg.libFn})[1]; f.Func == "culprit_lib_fn" {
		t.Errorf("return address at the entry resolved to the function itself: %+v", f)
	}
}

func TestUserStrippedAndDeleted(t *testing.T) {
	dir := t.TempDir()
	exe, lib := buildCTarget(t, dir)
	stripped := filepath.Join(dir, "target-stripped")
	cc := compiler(t)
	src, _ := filepath.Abs("testdata/target.c")
	out, err := exec.Command(cc, "-O0", "-fPIE", "-pie", "-s", "-o", stripped, src,
		"-L"+dir, "-lculprit", "-Wl,-rpath,"+dir).CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	s := New(Options{})

	t.Run("stripped", func(t *testing.T) {
		tg := startCTarget(t, stripped, lib)
		f := s.User(tg.pid, []uint64{tg.staticFn})[0]
		if f.Func != "" {
			t.Fatalf("stripped binary named a static function: %+v", f)
		}
		if f.Module != stripped {
			t.Fatalf("Module = %q, want %q", f.Module, stripped)
		}
		// The same function in the unstripped twin, at the same file offset
		// since -s changes no loaded bytes.
		want := fileOffset(t, exe, symbolValue(t, exe, "culprit_static_fn"))
		if f.Offset != want {
			t.Errorf("Offset = %#x, want %#x", f.Offset, want)
		}
		if got, want := f.String(), "target-stripped+0x"+strconv.FormatUint(want, 16); got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
		// The shared library still has its symbols.
		if f := s.User(tg.pid, []uint64{tg.libFn})[0]; f.Func != "culprit_lib_fn" {
			t.Errorf("library function = %+v", f)
		}
	})

	t.Run("deleted", func(t *testing.T) {
		moved := filepath.Join(dir, "target-deleted")
		if err := os.Link(exe, moved); err != nil {
			t.Fatal(err)
		}
		tg := startCTarget(t, moved, lib)
		if err := os.Remove(moved); err != nil {
			t.Fatal(err)
		}
		// Something else now lives at the path: it must not be used.
		if err := os.WriteFile(moved, []byte("not an ELF file"), 0o755); err != nil {
			t.Fatal(err)
		}
		maps := string(mustRead(t, "/proc/"+strconv.Itoa(tg.pid)+"/maps"))
		if !strings.Contains(maps, moved+" (deleted)") {
			t.Fatalf("maps do not show the file deleted:\n%s", maps)
		}
		f := s.User(tg.pid, []uint64{tg.pieFn})[0]
		if f.Func != "culprit_pie_fn" || f.Module != moved {
			t.Errorf("deleted binary: %+v", f)
		}
	})
}

func symbolValue(t *testing.T, path, name string) uint64 {
	t.Helper()
	f, err := elf.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	syms, err := f.Symbols()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range syms {
		if s.Name == name {
			return s.Value
		}
	}
	t.Fatalf("%s not in %s", name, path)
	return 0
}
