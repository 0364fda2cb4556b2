package symbolize

import (
	"bytes"
	"debug/elf"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// referenceSymbols is what parseELF did before funcSymbols: debug/elf's
// whole symbol table, filtered. The tests hold funcSymbols to it and the
// benchmark measures it as the baseline.
func referenceSymbols(f *elf.File) (sized, unsized symtab) {
	syms, err := f.Symbols()
	if err != nil || len(syms) == 0 {
		syms, _ = f.DynamicSymbols()
	}
	var s, u []symbol
	for _, sym := range syms {
		if elf.ST_TYPE(sym.Info) != elf.STT_FUNC || sym.Value == 0 || sym.Name == "" || sym.Section == elf.SHN_UNDEF {
			continue
		}
		if sym.Size > 0 {
			s = append(s, symbol{addr: sym.Value, size: sym.Size, name: sym.Name})
		} else {
			u = append(u, symbol{addr: sym.Value, size: sym.Size, name: sym.Name})
		}
	}
	return compactSymbols(sortSymbols(s)), compactSymbols(sortSymbols(u))
}

// elfSamples are real files of this machine: this test binary (Go), libc
// and, when present, nginx and redis (stripped: .dynsym only) and python's
// libpython (pyenv's has a .symtab).
func elfSamples(t testing.TB) []string {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	paths := []string{exe}
	for _, p := range []string{"/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/sbin/nginx", "/usr/bin/redis-server",
		"/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0", "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0"} {
		if _, err := os.Stat(p); err == nil {
			paths = append(paths, p)
		}
	}
	return paths
}

// TestFuncSymbolsMatchDebugELF: the streamed reader finds the same
// functions, at the same addresses with the same sizes and names, as
// debug/elf's tables, in files of both kinds, and the Go runtime's
// symbols that goTable needs.
func TestFuncSymbolsMatchDebugELF(t *testing.T) {
	kinds := map[elf.SectionType]bool{}
	exe, lib := buildCTarget(t, t.TempDir()) // with .symtab, whatever the machine's files are
	for _, path := range append(elfSamples(t), exe, lib) {
		f, err := elf.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		wantSized, wantUnsized := referenceSymbols(f)
		if f.Section(".symtab") != nil {
			kinds[elf.SHT_SYMTAB] = true
		} else {
			kinds[elf.SHT_DYNSYM] = true
		}
		f.Close()
		fr, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		ef, err := parseELF(fr)
		fr.Close()
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if !slices.Equal(ef.sized.all(), wantSized.all()) || !slices.Equal(ef.unsized.all(), wantUnsized.all()) {
			t.Errorf("%s: %d sized and %d unsized functions, debug/elf has %d and %d (or they differ)",
				path, ef.sized.len(), ef.unsized.len(), wantSized.len(), wantUnsized.len())
		}
		if wantSized.len() == 0 {
			t.Errorf("%s: no functions at all: not a useful sample", path)
		}
	}
	if !kinds[elf.SHT_SYMTAB] || !kinds[elf.SHT_DYNSYM] {
		t.Errorf("samples cover tables %v: want a .symtab file and a stripped one", kinds)
	}
	self, _ := os.Executable()
	fr, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer fr.Close()
	ef, err := parseELF(fr)
	if err != nil || ef.gotab == nil {
		t.Fatalf("the Go test binary has no Go line table: %v", err)
	}
}

// TestFuncSymbolsTruncatedTable: a table cut short mid-entry (its
// section header says 7 bytes less) is an error with the entries read
// before the cut, never a panic.
func TestFuncSymbolsTruncatedTable(t *testing.T) {
	exe, _ := buildCTarget(t, t.TempDir())
	data := mustRead(t, exe)
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	idx := slices.IndexFunc(f.Sections, func(s *elf.Section) bool { return s.Type == elf.SHT_SYMTAB })
	if idx < 0 || f.Class != elf.ELFCLASS64 {
		t.Fatal("the C target has no .symtab, or is not ELF64")
	}
	// Elf64_Shdr: sh_size at byte 32; e_shoff at byte 40 of the header,
	// e_shentsize at 58.
	shoff := f.ByteOrder.Uint64(data[40:])
	entsize := uint64(f.ByteOrder.Uint16(data[58:]))
	at := shoff + uint64(idx)*entsize + 32
	f.ByteOrder.PutUint64(data[at:], f.Sections[idx].Size-7)
	cut, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	sized, _, _, n, err := funcSymbols(cut, elf.SHT_SYMTAB)
	if err == nil || n == 0 || len(sized) == 0 {
		t.Errorf("truncated table: %d entries, %d functions, err %v; want the entries before the cut and an error", n, len(sized), err)
	}
}

// BenchmarkParseSymbols reads the function symbols of each sample with
// funcSymbols (as parseELF does) and, as the baseline, with debug/elf's
// Symbols: B/op is the figure (what a parse leaves for the collector).
func BenchmarkParseSymbols(b *testing.B) {
	for _, path := range elfSamples(b) {
		f, err := elf.Open(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		name := filepath.Base(path)
		b.Run("funcSymbols/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				s, u, _, _, err := funcSymbols(f, elf.SHT_SYMTAB)
				if err != nil {
					s, u, _, _, _ = funcSymbols(f, elf.SHT_DYNSYM)
				}
				compactSymbols(sortSymbols(s))
				compactSymbols(sortSymbols(u))
			}
		})
		b.Run("debug-elf/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				referenceSymbols(f)
			}
		})
	}
}
