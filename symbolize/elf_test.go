package symbolize

import (
	"bytes"
	"encoding/binary"
	"os"
	"strings"
	"testing"
)

func TestSymLookup(t *testing.T) {
	ef := &elfFile{}
	ef.sized = compactSymbols(sortSymbols([]symbol{
		{addr: 0x1000, size: 0x100, name: "__getpid"},
		{addr: 0x1000, size: 0x100, name: "getpid"}, // alias: the plain name wins
		{addr: 0x2000, size: 0x10, name: "small"},
	}))
	ef.unsized = compactSymbols(sortSymbols([]symbol{
		{addr: 0x0800, name: "asm_entry"},
		{addr: 0x1800, name: "label_in_gap"},
		{addr: 0x1f00, name: "before_small"},
	}))
	for _, c := range []struct {
		pc   uint64
		want string
	}{
		{0x07ff, ""},
		{0x0800, "asm_entry"},
		{0x0fff, "asm_entry"},
		{0x1000, "getpid"},
		{0x10ff, "getpid"},
		{0x1100, ""}, // past a sized function, no label after it yet
		{0x1800, "label_in_gap"},
		{0x1f80, "before_small"},
		{0x2008, "small"},
		{0x2010, ""}, // past "small": the older label must not claim it
	} {
		if got := ef.symLookup(c.pc); got != c.want {
			t.Errorf("symLookup(%#x) = %q, want %q", c.pc, got, c.want)
		}
	}
}

func TestVaddr(t *testing.T) {
	// Go's PIE layout: segments at 0x400000, file offsets from 0.
	ef := &elfFile{loads: []loadSeg{
		{off: 0, filesz: 0xa02b0, vaddr: 0x400000},
		{off: 0xa1000, filesz: 0xdbfe8, vaddr: 0x4a1000},
	}}
	for _, c := range []struct {
		off, want uint64
		ok        bool
	}{
		{0x1234, 0x401234, true},
		{0xa1010, 0x4a1010, true},
		{0xa02b0, 0, false}, // between segments
	} {
		got, err := ef.vaddr(c.off)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("vaddr(%#x) = %#x, %v; want %#x ok=%v", c.off, got, err, c.want, c.ok)
		}
	}
}

func TestParseELFBadInput(t *testing.T) {
	for _, in := range [][]byte{nil, []byte("not an ELF file"), []byte("\x7fELF\x02\x01\x01garbage")} {
		if ef, err := parseELF(bytes.NewReader(in)); err == nil {
			t.Errorf("parseELF(%q) = %+v, want error", in, ef)
		}
	}
	// A truncated real binary must fail or degrade, never panic.
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data := mustRead(t, exe)
	for _, n := range []int{64, 4096, len(data) / 2} {
		_, _ = parseELF(bytes.NewReader(data[:n]))
	}
}

func TestParseNotes(t *testing.T) {
	var b bytes.Buffer
	put := func(name string, typ uint32, desc []byte) {
		nb := append([]byte(name), 0)
		_ = binary.Write(&b, binary.LittleEndian, [3]uint32{uint32(len(nb)), uint32(len(desc)), typ})
		b.Write(nb)
		b.Write(make([]byte, align4(uint64(len(nb)))-uint64(len(nb))))
		b.Write(desc)
		b.Write(make([]byte, align4(uint64(len(desc)))-uint64(len(desc))))
	}
	put("Go", 4, []byte("abc/def"))
	put("GNU", 3, []byte{0xde, 0xad, 0xbe, 0xef, 0x01})
	notes := parseNotes(b.Bytes(), binary.LittleEndian)
	if len(notes) != 2 || notes[0].name != "Go" || string(notes[0].desc) != "abc/def" ||
		notes[1].name != "GNU" || notes[1].typ != 3 || !bytes.Equal(notes[1].desc, []byte{0xde, 0xad, 0xbe, 0xef, 0x01}) {
		t.Fatalf("notes = %+v", notes)
	}
	// Truncated input stops cleanly.
	if got := parseNotes(b.Bytes()[:len(b.Bytes())-3], binary.LittleEndian); len(got) != 1 {
		t.Errorf("truncated: %+v", got)
	}
}

func TestBuildIDOfTestBinary(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(exe)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ef, err := parseELF(f)
	if err != nil {
		t.Fatal(err)
	}
	if ef.buildID == "" || strings.ContainsAny(ef.buildID, " \x00") {
		t.Errorf("build ID = %q", ef.buildID)
	}
	if ef.gotab == nil {
		t.Error("test binary has no Go line table")
	}
}
