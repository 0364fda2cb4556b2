package symbolize

import (
	"bytes"
	"debug/elf"
	"debug/gosym"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/ianlancetaylor/demangle"
)

// elfFile is what symbolization needs from one ELF file. The file itself is
// not kept open: everything is read at load time so that the cache bounds
// file descriptors as well as memory.
type elfFile struct {
	typ     elf.Type
	buildID string
	loads   []loadSeg
	sized   symtab // STT_FUNC with size > 0, sorted by addr
	unsized symtab // STT_FUNC with size 0, sorted by addr
	gotab   *gosym.Table
	cfi     *cfiTable // .eh_frame of non-Go files, or nil

	// memo caches lookups: profiles hit the same few thousand addresses
	// again and again, and decoding Go's pc tables costs about a microsecond
	// each. Guarded by the owning Symbolizer's mu.
	memo map[uint64]lookupResult
}

type lookupResult struct {
	fn, file string
	line     int
}

// maxMemo bounds elfFile.memo; when full it is simply dropped, which keeps
// the hot addresses after a moment without per-entry bookkeeping.
const maxMemo = 1 << 14

type loadSeg struct {
	off, filesz, vaddr uint64
}

type symbol struct {
	addr, size uint64
	name       string
}

// symtab is a sorted symbol table in 22 bytes a symbol plus one arena for
// the names: debug/elf hands every name as a string of its own (a 16-byte
// header and an allocation each), which a library of 20k functions turns
// into a megabyte of small objects for the collector to scan.
type symtab struct {
	addrs []uint64
	sizes []uint64
	offs  []uint32
	lens  []uint16
	names []byte
}

// compactSymbols packs sorted symbols (sortSymbols) into a symtab.
func compactSymbols(s []symbol) symtab {
	n := 0
	for _, sym := range s {
		n += min(len(sym.name), 1<<16-1)
	}
	t := symtab{addrs: make([]uint64, len(s)), sizes: make([]uint64, len(s)), offs: make([]uint32, len(s)),
		lens: make([]uint16, len(s)), names: make([]byte, 0, n)}
	for i, sym := range s {
		name := sym.name[:min(len(sym.name), 1<<16-1)]
		t.addrs[i], t.sizes[i], t.offs[i], t.lens[i] = sym.addr, sym.size, uint32(len(t.names)), uint16(len(name))
		t.names = append(t.names, name...)
	}
	return t
}

func (t *symtab) len() int { return len(t.addrs) }

// name is the name of symbol i (a new string: the arena is not shared out).
func (t *symtab) name(i int) string {
	return string(t.names[t.offs[i] : t.offs[i]+uint32(t.lens[i])])
}

// all returns the symbols unpacked (tests, benchmarks).
func (t *symtab) all() []symbol {
	out := make([]symbol, t.len())
	for i := range out {
		out[i] = symbol{addr: t.addrs[i], size: t.sizes[i], name: t.name(i)}
	}
	return out
}

// lastAtOrBelow is the index of the last symbol at or below pc, or -1.
func (t *symtab) lastAtOrBelow(pc uint64) int {
	i, found := slices.BinarySearch(t.addrs, pc)
	if found {
		return i
	}
	return i - 1
}

// parseELF reads r as an ELF file. Only a file that is not ELF at all is an
// error; missing symbols or a bad .gopclntab leave a usable, if less
// informative, result.
func parseELF(r io.ReaderAt) (ef *elfFile, err error) {
	// debug/elf and debug/gosym are not hardened against every malformed
	// input, and the files come from processes we do not control.
	defer func() {
		if p := recover(); p != nil {
			ef, err = nil, fmt.Errorf("malformed ELF: %v", p)
		}
	}()
	f, err := elf.NewFile(r)
	if err != nil {
		return nil, fmt.Errorf("parse ELF: %w", err)
	}
	defer f.Close()

	ef = &elfFile{typ: f.Type}
	for _, p := range f.Progs {
		if p.Type == elf.PT_LOAD {
			ef.loads = append(ef.loads, loadSeg{off: p.Off, filesz: p.Filesz, vaddr: p.Vaddr})
		}
	}
	ef.buildID = readBuildID(f)

	sized, unsized, gs, n, err := funcSymbols(f, elf.SHT_SYMTAB)
	if err != nil || n == 0 {
		// A stripped file: its dynamic symbols, at least the exported
		// functions.
		sized, unsized, gs, _, _ = funcSymbols(f, elf.SHT_DYNSYM)
	}
	ef.sized = compactSymbols(sortSymbols(sized))
	ef.unsized = compactSymbols(sortSymbols(unsized))
	ef.gotab = goTable(f, gs)
	if ef.gotab == nil {
		// Go keeps frame pointers everywhere; other code needs its CFI
		// to recover leaf frames (RecoverLeaf).
		if sec := f.Section(".eh_frame"); sec != nil && sec.Type != elf.SHT_NOBITS && sec.Size <= maxEHFrame {
			if data, err := sec.Data(); err == nil {
				ef.cfi, _ = parseEHFrame(data, sec.Addr)
			}
		}
	}
	return ef, nil
}

// sortSymbols sorts by address and keeps one name per address. Aliases
// (getpid/__getpid) are common; the shortest name without a leading
// underscore is usually the one people search for.
func sortSymbols(s []symbol) []symbol {
	slices.SortStableFunc(s, func(a, b symbol) int {
		if a.addr != b.addr {
			if a.addr < b.addr {
				return -1
			}
			return 1
		}
		return aliasRank(a) - aliasRank(b)
	})
	return slices.CompactFunc(s, func(a, b symbol) bool { return a.addr == b.addr })
}

func aliasRank(s symbol) int {
	return 64*(len(s.name)-len(strings.TrimLeft(s.name, "_"))) + min(len(s.name), 63)
}

// goTable builds the Go line table. It returns nil when the file is not a Go
// binary or its pclntab cannot be read, so that lookups fall back to the
// ELF symbols.
func goTable(f *elf.File, gs goSymbols) *gosym.Table {
	var data []byte
	for _, name := range []string{".gopclntab", ".data.rel.ro.gopclntab"} {
		if s := f.Section(name); s != nil && s.Type != elf.SHT_NOBITS {
			data, _ = s.Data()
			break
		}
	}
	textStart := uint64(0)
	if s := f.Section(".text"); s != nil {
		textStart = s.Addr
	}
	if gs.text != 0 {
		textStart = gs.text
	}
	pcln, epcln := gs.pclntab, gs.epclntab
	if data == nil && pcln != 0 && epcln > pcln {
		data = sectionBytes(f, pcln, epcln)
	}
	if len(data) == 0 {
		return nil
	}
	var symtab []byte
	if s := f.Section(".gosymtab"); s != nil && s.Type != elf.SHT_NOBITS {
		symtab, _ = s.Data()
	}
	tab, err := gosym.NewTable(symtab, gosym.NewLineTable(data, textStart))
	if err != nil || len(tab.Funcs) == 0 {
		return nil
	}
	return tab
}

// sectionBytes returns the bytes at virtual addresses [lo, hi).
func sectionBytes(f *elf.File, lo, hi uint64) []byte {
	for _, s := range f.Sections {
		if s.Type == elf.SHT_NOBITS || lo < s.Addr || hi > s.Addr+s.Size {
			continue
		}
		b := make([]byte, hi-lo)
		if _, err := s.ReadAt(b, int64(lo-s.Addr)); err != nil {
			return nil
		}
		return b
	}
	return nil
}

// readBuildID returns the GNU build ID in hex, or else the Go build ID; pprof
// only uses it to match binaries, so either identifies the file.
func readBuildID(f *elf.File) string {
	var goID string
	for _, s := range f.Sections {
		if s.Type != elf.SHT_NOTE {
			continue
		}
		data, err := s.Data()
		if err != nil {
			continue
		}
		for _, n := range parseNotes(data, f.ByteOrder) {
			switch {
			case n.name == "GNU" && n.typ == 3: // NT_GNU_BUILD_ID
				return hex.EncodeToString(n.desc)
			case n.name == "Go" && n.typ == 4: // Go's ELF_NOTE_GOBUILDID_TAG
				goID = string(n.desc)
			}
		}
	}
	return goID
}

type note struct {
	name string
	typ  uint32
	desc []byte
}

func parseNotes(b []byte, bo binary.ByteOrder) []note {
	var out []note
	for len(b) >= 12 {
		namesz, descsz, typ := uint64(bo.Uint32(b)), uint64(bo.Uint32(b[4:])), bo.Uint32(b[8:])
		b = b[12:]
		nameEnd := align4(namesz)
		if nameEnd > uint64(len(b)) {
			break
		}
		name := string(bytes.TrimRight(b[:namesz], "\x00"))
		b = b[nameEnd:]
		descEnd := align4(descsz)
		if descEnd > uint64(len(b)) {
			break
		}
		out = append(out, note{name: name, typ: typ, desc: b[:descsz]})
		b = b[descEnd:]
	}
	return out
}

func align4(n uint64) uint64 { return (n + 3) &^ 3 }

var errNoSegment = errors.New("file offset is in no PT_LOAD segment")

// vaddr converts a file offset into the virtual address the symbol tables
// use. Going through the program headers rather than assuming a base makes
// non-PIE executables, PIE executables and shared libraries one case.
func (ef *elfFile) vaddr(off uint64) (uint64, error) {
	for _, l := range ef.loads {
		if off >= l.off && off < l.off+l.filesz {
			return off - l.off + l.vaddr, nil
		}
	}
	return 0, errNoSegment
}

// lookup returns the function containing the virtual address pc.
func (ef *elfFile) lookup(pc uint64) (fn, file string, line int) {
	if r, ok := ef.memo[pc]; ok {
		return r.fn, r.file, r.line
	}
	fn, file, line = ef.lookupUncached(pc)
	if ef.memo == nil || len(ef.memo) >= maxMemo {
		ef.memo = make(map[uint64]lookupResult)
	}
	ef.memo[pc] = lookupResult{fn: fn, file: file, line: line}
	return fn, file, line
}

func (ef *elfFile) lookupUncached(pc uint64) (fn, file string, line int) {
	if ef.gotab != nil {
		if fn, file, line, ok := goLookup(ef.gotab, pc); ok {
			return fn, file, line
		}
	}
	return demangled(ef.symLookup(pc)), "", 0
}

// demangled turns C++ and Rust (legacy _ZN…17h<hash>E and v0 _R) symbol
// names into what their authors wrote, w::save_session rather than
// _ZN1w12save_session17h645688450877549aE, without parameters or template
// arguments, as pprof shows them. A name the demangler rejects is kept.
func demangled(name string) (out string) {
	if !strings.HasPrefix(name, "_Z") && !strings.HasPrefix(name, "_R") {
		return name
	}
	// The names come from binaries we do not control.
	defer func() {
		if recover() != nil {
			out = name
		}
	}()
	return demangle.Filter(name, demangle.NoParams, demangle.NoTemplateParams, demangle.NoClones)
}

func goLookup(tab *gosym.Table, pc uint64) (fn, file string, line int, ok bool) {
	defer func() {
		if recover() != nil {
			ok = false
		}
	}()
	file, line, f := tab.PCToLine(pc)
	if f == nil {
		return "", "", 0, false
	}
	return f.Name, file, line, true
}

// symLookup prefers a sized symbol that contains pc. A zero-sized symbol
// (hand-written assembly often has no size) is only a fallback, and not
// across a sized function: an address past the end of a sized function is
// padding or unknown code, not part of a label before it.
func (ef *elfFile) symLookup(pc uint64) string {
	si := ef.sized.lastAtOrBelow(pc)
	if si >= 0 && pc < ef.sized.addrs[si]+ef.sized.sizes[si] {
		return ef.sized.name(si)
	}
	ui := ef.unsized.lastAtOrBelow(pc)
	if ui < 0 {
		return ""
	}
	if si >= 0 && ef.sized.addrs[si] > ef.unsized.addrs[ui] {
		return ""
	}
	return ef.unsized.name(ui)
}
