package symbolize

import (
	"bufio"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestParseKallsymsFixture(t *testing.T) {
	ks := fixtureKallsyms(t)
	for _, c := range []struct {
		addr uint64
		want string
	}{
		{0xffffffff80ffffff, ""},
		{0xffffffff81000000, "_stext"}, // global preferred over the local alias
		{0xffffffff81000fff, "_stext"},
		{0xffffffff81001000, "do_one_initcall"},
		{0xffffffff81002500, "do_one_initcall"}, // data symbols are dropped
		{0xffffffff81003001, "weak_func"},
		{0xffffffff81004000, "local_func"},
		{0xffffffff81005000, "local_func"}, // bss dropped
		{0xffffffffc0a00010, "nft_do_chain"},
		{0xffffffffc0a01000, "nft_register_chain_type"},
	} {
		got, _ := ks.lookup(c.addr)
		if got != c.want {
			t.Errorf("lookup(%#x) = %q, want %q", c.addr, got, c.want)
		}
	}
	if n := len(ks.tab.ents); n != 6 {
		t.Errorf("kept %d symbols, want 6", n)
	}
}

func TestParseKallsymsLongLine(t *testing.T) {
	in := strings.Repeat("x", 1<<20) + "\nffffffff81000000 T after_long\nffffffff81001000 t no_newline"
	ks, ok, err := parseKallsyms(strings.NewReader(in))
	if err != nil || !ok {
		t.Fatalf("ok=%v err=%v", ok, err)
	}
	if got, _ := ks.lookup(0xffffffff81000010); got != "after_long" {
		t.Errorf("lookup = %q, want after_long", got)
	}
	if got, _ := ks.lookup(0xffffffff81001010); got != "no_newline" {
		t.Errorf("lookup = %q, want no_newline", got)
	}
}

func TestKallsymsZeroAddressesAndReload(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "kallsyms")
	zero := "0000000000000000 T _stext\n0000000000000000 T schedule\n"
	if err := os.WriteFile(path, []byte(zero), 0o644); err != nil {
		t.Fatal(err)
	}
	s := New(Options{ProcRoot: dir})
	s.kallsymsRetry = 0
	fr := s.Kernel([]uint64{0xffffffff81001000})
	if fr[0].Func != "" || fr[0].Module != kernelModule || fr[0].Addr != 0xffffffff81001000 {
		t.Fatalf("unprivileged kallsyms resolved %+v", fr[0])
	}
	if got := fr[0].String(); got != "0xffffffff81001000" {
		t.Errorf("String() = %q", got)
	}
	// Once kallsyms becomes readable, the next call loads it.
	data, err := os.ReadFile("testdata/kallsyms.txt")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	fr = s.Kernel([]uint64{0xffffffff81001000, 0xffffffff81003000})
	if fr[0].Func != "do_one_initcall" {
		t.Errorf("leaf = %+v, want do_one_initcall", fr[0])
	}
	// A non-leaf frame is a return address: the byte before it belongs to
	// the caller, which here is the previous symbol.
	if fr[1].Func != "do_one_initcall" {
		t.Errorf("return address = %+v, want do_one_initcall", fr[1])
	}
	// Loaded symbols are kept even if the file goes away.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if fr = s.Kernel([]uint64{0xffffffff81004001}); fr[0].Func != "local_func" {
		t.Errorf("after removal: %+v", fr[0])
	}
}

func TestKernelRealKallsyms(t *testing.T) {
	addr := kallsymsAddr(t, "schedule")
	s := New(Options{})
	fr := s.Kernel([]uint64{addr, addr + 1, addr + 5})
	for i, f := range fr {
		if f.Func != "schedule" {
			t.Errorf("frame %d (%#x) = %+v, want schedule", i, f.Addr, f)
		}
	}
}

// kallsymsAddr returns the address of a text symbol from the real
// /proc/kallsyms, skipping when addresses are hidden.
func kallsymsAddr(t testing.TB, name string) uint64 {
	t.Helper()
	f, err := os.Open("/proc/kallsyms")
	if err != nil {
		t.Skipf("SKIP: no /proc/kallsyms: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 3 && fs[2] == name && (fs[1] == "T" || fs[1] == "t") {
			a, err := strconv.ParseUint(fs[0], 16, 64)
			if err != nil || a == 0 {
				t.Skipf("SKIP: kallsyms addresses hidden (not root or kptr_restrict): %q", sc.Text())
			}
			return a
		}
	}
	t.Skipf("SKIP: %s not in /proc/kallsyms", name)
	return 0
}

// TestKallsymsDropAndReload: the table goes after kallsymsKeep without a
// lookup that needed it; cached answers stay, and a new address reads it
// again.
func TestKallsymsDropAndReload(t *testing.T) {
	ks := fixtureKallsyms(t)
	ks.mu.Lock()
	ks.keep = 20 * time.Millisecond
	ks.scheduleDropLocked()
	ks.mu.Unlock()
	if got, _ := ks.lookup(0xffffffff81001000); got != "do_one_initcall" {
		t.Fatalf("lookup = %q", got)
	}
	deadline := time.Now().Add(5 * time.Second)
	for ks.loaded() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if ks.loaded() {
		t.Fatal("table still loaded after keep")
	}
	if got, _ := ks.lookup(0xffffffff81001000); got != "do_one_initcall" {
		t.Fatalf("cached lookup after the drop = %q", got)
	}
	if ks.loads != 1 {
		t.Fatalf("a cached lookup read the table again (%d loads)", ks.loads)
	}
	if got, _ := ks.lookup(0xffffffffc0a00010); got != "nft_do_chain" {
		t.Fatalf("lookup after the drop = %q", got)
	}
	if ks.loads != 2 {
		t.Fatalf("loads = %d, want 2", ks.loads)
	}
}

// TestKallsymsOutOfOrder: a file not in address order is sorted.
func TestKallsymsOutOfOrder(t *testing.T) {
	in := "ffffffff81002000 T b\nffffffff81000000 t a_local\nffffffff81000000 T a\nffffffff81001000 T mid\n"
	ks, ok, err := parseKallsyms(strings.NewReader(in))
	if err != nil || !ok {
		t.Fatalf("ok=%v err=%v", ok, err)
	}
	for addr, want := range map[uint64]string{0xffffffff81000010: "a", 0xffffffff81001001: "mid", 0xffffffff81002001: "b"} {
		if got, _ := ks.lookup(addr); got != want {
			t.Errorf("lookup(%#x) = %q, want %q", addr, got, want)
		}
	}
}

// TestStreamKallsymsMatchesTable: one pass over the file answers as the
// table does, for every kind of address: below the first symbol, at a
// symbol, between two, in modules and BPF programs (the file's unsorted
// part), past the last; and for the fixture's aliases and out-of-order
// lines.
func TestStreamKallsymsMatchesTable(t *testing.T) {
	// /proc/kallsyms changes as BPF programs come and go (other tests load
	// some): both read one copy of it.
	live, err := os.ReadFile("/proc/kallsyms")
	if err != nil {
		t.Fatal(err)
	}
	snapshot := filepath.Join(t.TempDir(), "kallsyms")
	if err := os.WriteFile(snapshot, live, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"testdata/kallsyms.txt", snapshot} {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		tab, ok, err := readKallsyms(f, ksSize{})
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if !ok {
			t.Logf("%s: no addresses (not root?)", path)
			continue
		}
		var addrs []uint64
		rng := rand.New(rand.NewPCG(1, 2))
		for i := 0; i < 2000; i++ {
			e := tab.ents[rng.IntN(len(tab.ents))]
			addrs = append(addrs, e.addr, e.addr+1, e.addr-1, e.addr+uint64(rng.IntN(4096)))
		}
		first, last := tab.ents[0].addr, tab.ents[len(tab.ents)-1].addr
		addrs = append(addrs, 0, 1, first-1, first, last, last+1, ^uint64(0))
		got, ok := streamKallsyms(path, addrs)
		if !ok {
			t.Fatalf("%s: streamKallsyms failed", path)
		}
		bad := 0
		for i, a := range addrs {
			name, found := tab.find(a)
			if got[i] != (ksName{name, found}) && bad < 10 {
				bad++
				t.Errorf("%s: %#x: stream %+v, table %q %v", path, a, got[i], name, found)
			}
		}
	}
}

// After a drop, a miss is answered by one pass over the file, the table
// left out; misses again within keep bring the table back.
func TestKallsymsStreamThenLoad(t *testing.T) {
	ks := fixtureKallsyms(t)
	ks.mu.Lock()
	ks.tab = nil // dropped
	ks.mu.Unlock()
	out := make([]ksName, 2)
	ks.lookupAll([]uint64{0xffffffff81001000, 0xffffffffc0a00010}, out)
	if out[0].name != "do_one_initcall" || out[1].name != "nft_do_chain" {
		t.Fatalf("streamed answers %+v", out)
	}
	if ks.loaded() || ks.loads != 2 {
		t.Fatalf("after one miss: table loaded %v, %d reads; want a pass over the file, no table", ks.loaded(), ks.loads)
	}
	if got, _ := ks.lookup(0xffffffff81004000); got != "local_func" {
		t.Fatalf("second miss: %q", got)
	}
	if !ks.loaded() || ks.loads != 3 {
		t.Fatalf("after a second miss within keep: table loaded %v, %d reads; want the table", ks.loaded(), ks.loads)
	}
}

// fixtureKallsyms is the table of testdata/kallsyms.txt.
func fixtureKallsyms(t *testing.T) *kallsyms {
	t.Helper()
	f, err := os.Open("testdata/kallsyms.txt")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ks, ok, err := parseKallsyms(f)
	if err != nil || !ok {
		t.Fatalf("parseKallsyms: ok=%v err=%v", ok, err)
	}
	return ks
}
