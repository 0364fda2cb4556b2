package symbolize

import (
	"os"
	"strings"
	"testing"
)

func TestParseMapsFixture(t *testing.T) {
	data, err := os.ReadFile("testdata/maps.txt")
	if err != nil {
		t.Fatal(err)
	}
	got := parseMaps(data)
	want := []mapping{
		{Start: 0x400000, End: 0x52b000, Offset: 0, Inode: 1234, Path: "/usr/local/bin/server"},
		{Start: 0x5566c019d000, End: 0x5566c01a2000, Offset: 0x2000, Inode: 247026, Path: "/usr/bin/cat"},
		{Start: 0x7f904ac3a000, End: 0x7f904ad90000, Offset: 0x26000, Inode: 326269, Path: "/usr/lib/x86_64-linux-gnu/libc.so.6"},
		{Start: 0x7f904b000000, End: 0x7f904b010000, Offset: 0x1000, Inode: 99, Path: "/app/lib/my plugin.so", Deleted: true},
		{Start: 0x7f904c000000, End: 0x7f904c100000},
		{Start: 0x7ffd1a5fe000, End: 0x7ffd1a600000, Path: "[vdso]"},
		{Start: 0xffffffffff600000, End: 0xffffffffff601000, Path: "[vsyscall]"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %d mappings, want %d:\n%+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("mapping %d:\n got %+v\nwant %+v", i, got[i], want[i])
		}
	}

	for _, c := range []struct {
		addr uint64
		want int
	}{
		{0x3fffff, -1},
		{0x400000, 0},
		{0x52afff, 0},
		{0x52b000, -1}, // read-only data, not executable
		{0x5566c01a1fff, 1},
		{0x7f904ac3a123, 2},
		{0x7f904b00ffff, 3},
		{0x7f904c000010, 4},
		{0xffffffffff600400, 6},
		{0xffffffffffffffff, -1},
	} {
		if i := findMapping(got, c.addr); i != c.want {
			t.Errorf("findMapping(%#x) = %d, want %d", c.addr, i, c.want)
		}
	}
}

func TestParseMapsBadLines(t *testing.T) {
	for _, line := range []string{
		"",
		"   ",
		"00400000",
		"00400000-00500000",
		"00400000-00500000 r-xp",
		"00400000-00500000 r-xp 0",
		"00400000-00500000 r-xp 0 fe:00",
		"00400000-00500000 r-x 0 fe:00 1 /x",   // short perms
		"00400000-00500000 r-xp 0 fe00 1 /x",   // no ':' in dev
		"00400000-00500000 r-xp 0 fe:00 -1 /x", // negative inode
		"00500000-00400000 r-xp 0 fe:00 1 /x",  // end before start
		"00400000-00400000 r-xp 0 fe:00 1 /x",  // empty
		"0x400000-00500000 r-xp 0 fe:00 1 /x",
		"00400000_00500000 r-xp 0 fe:00 1 /x",
		"1ffffffffffffffff-2ffffffffffffffff r-xp 0 fe:00 1 /x",
		"\x00\xff-\n r-xp",
	} {
		if got := parseMaps([]byte(line)); len(got) != 0 {
			t.Errorf("parseMaps(%q) = %+v, want nothing", line, got)
		}
	}
	// A valid line still parses among bad ones, with or without a final
	// newline.
	in := "garbage\n00400000-00500000 r-xp 00001000 fe:00 7 /bin/x\nmore garbage"
	got := parseMaps([]byte(in))
	if len(got) != 1 || got[0].Path != "/bin/x" || got[0].Offset != 0x1000 {
		t.Fatalf("parseMaps(%q) = %+v", in, got)
	}
	// Only the kernel's suffix is stripped from a file named "... (deleted)".
	got = parseMaps([]byte("00400000-00500000 r-xp 0 fe:00 1 /tmp/a (deleted) (deleted)"))
	if len(got) != 1 || !got[0].Deleted || got[0].Path != "/tmp/a (deleted)" {
		t.Fatalf("double suffix: %+v", got)
	}
	// A pseudo-path ending in "(deleted)" is not a deleted file.
	got = parseMaps([]byte("00400000-00500000 r-xp 0 00:00 0 [anon:x] (deleted)"))
	if len(got) != 1 || got[0].Deleted {
		t.Fatalf("pseudo path: %+v", got)
	}
}

func FuzzParseMaps(f *testing.F) {
	if data, err := os.ReadFile("testdata/maps.txt"); err == nil {
		f.Add(data)
	}
	f.Add([]byte("00400000-00500000 r-xp 0 fe:00 1 /x (deleted)\n"))
	f.Add([]byte("ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		maps := parseMaps(data)
		for i, m := range maps {
			if m.Start >= m.End {
				t.Fatalf("mapping %d: start %#x >= end %#x", i, m.Start, m.End)
			}
			if i > 0 && maps[i-1].Start > m.Start {
				t.Fatalf("not sorted at %d", i)
			}
			// Only one suffix is stripped: a file really named "x (deleted)"
			// shows as "x (deleted) (deleted)" once deleted.
			if m.Deleted && !strings.Contains(string(data), m.Path+deletedSuffix) {
				t.Fatalf("deleted path %q not followed by the suffix in the input", m.Path)
			}
			if j := findMapping(maps, m.Start); j < 0 {
				t.Fatalf("start of mapping %d not found", i)
			}
		}
	})
}
