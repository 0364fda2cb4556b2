package symbolize

import (
	"bufio"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"unsafe"
)

// This file reads an ELF file's function symbols for a symtab without
// debug/elf's File.Symbols, which returns every symbol of the table
// (objects, sections, files, not only functions) as an elf.Symbol of ~80
// bytes with a string of its own, after reading the whole table into
// memory. Parsing a python target's libpython that way allocated ~2.7 MB
// (the agent's allocation profile while idle, which a parse made half of),
// and a file is parsed again whenever it was dropped from the cache. Here
// the table is streamed through a small buffer, only functions are kept,
// and their names are slices of one copy of the string table.

// goSymbols are the values of the symbols goTable looks for.
type goSymbols struct {
	text, pclntab, epclntab uint64
}

// errNoSymbols means the file has no symbol table of the type asked for.
var errNoSymbols = errors.New("no symbol table")

// funcSymbols reads the STT_FUNC symbols of f's table of type typ
// (SHT_SYMTAB or SHT_DYNSYM): those with an address, a name and a
// section, split by whether they have a size, in file order; the Go
// runtime's symbols, whatever their type; and how many entries the table
// has besides its null one.
func funcSymbols(f *elf.File, typ elf.SectionType) (sized, unsized []symbol, gs goSymbols, n int, err error) {
	var sec *elf.Section
	for _, s := range f.Sections {
		if s.Type == typ {
			sec = s
			break
		}
	}
	if sec == nil {
		return nil, nil, gs, 0, errNoSymbols
	}
	if sec.Link == 0 || int(sec.Link) >= len(f.Sections) {
		return nil, nil, gs, 0, fmt.Errorf("symbol table %s: string table index %d out of range", sec.Name, sec.Link)
	}
	strData, err := f.Sections[sec.Link].Data()
	if err != nil {
		return nil, nil, gs, 0, fmt.Errorf("symbol table %s: string table: %w", sec.Name, err)
	}
	// The names are slices of the one table (no string each), which
	// nothing writes to after this: compactSymbols copies the ones kept.
	var strtab string
	if len(strData) > 0 {
		strtab = unsafe.String(&strData[0], len(strData))
	}
	entSize := 24
	if f.Class == elf.ELFCLASS32 {
		entSize = 16
	}
	r := bufio.NewReaderSize(sec.Open(), int(min(sec.Size, 32<<10)))
	var ent [24]byte
	bo := f.ByteOrder
	// The first entry is the reserved null symbol.
	for i := 0; ; i++ {
		if _, err := io.ReadFull(r, ent[:entSize]); err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return sized, unsized, gs, n, fmt.Errorf("symbol table %s: truncated entry %d", sec.Name, i)
			}
			return sized, unsized, gs, n, fmt.Errorf("symbol table %s: %w", sec.Name, err)
		}
		if i == 0 {
			continue
		}
		n++
		var nameOff uint32
		var info byte
		var shndx uint16
		var value, size uint64
		if entSize == 24 {
			nameOff, info, shndx = bo.Uint32(ent[0:]), ent[4], bo.Uint16(ent[6:])
			value, size = bo.Uint64(ent[8:]), bo.Uint64(ent[16:])
		} else {
			nameOff, value, size = bo.Uint32(ent[0:]), uint64(bo.Uint32(ent[4:])), uint64(bo.Uint32(ent[8:]))
			info, shndx = ent[12], bo.Uint16(ent[14:])
		}
		name, ok := cString(strtab, nameOff)
		if !ok {
			continue
		}
		switch name {
		case "runtime.text":
			gs.text = value
		case "runtime.pclntab":
			gs.pclntab = value
		case "runtime.epclntab":
			gs.epclntab = value
		}
		if elf.ST_TYPE(info) != elf.STT_FUNC || value == 0 || name == "" || elf.SectionIndex(shndx) == elf.SHN_UNDEF {
			continue
		}
		sym := symbol{addr: value, size: size, name: name}
		if size > 0 {
			sized = append(sized, sym)
		} else {
			unsized = append(unsized, sym)
		}
	}
	return sized, unsized, gs, n, nil
}

// cString is the NUL-terminated string at off in tab.
func cString(tab string, off uint32) (string, bool) {
	if int64(off) >= int64(len(tab)) {
		return "", false
	}
	s := tab[off:]
	for i := 0; i < len(s); i++ {
		if s[i] == 0 {
			return s[:i], true
		}
	}
	return "", false
}
