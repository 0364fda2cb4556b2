package symbolize

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
)

// Call frame information from .eh_frame: for a pc, where the caller's stack
// pointer (the CFA) and the return address are. The eBPF stack walker
// follows frame pointers, and the C library (and Rust's std, and most C
// code) is built without them, so a thread that blocks inside a libc
// wrapper loses the frame that called it: exactly the app function a
// finding must name. Unwinding only those leaf frames by their CFI, from a
// copy of the top of the user stack, brings it back. Only what x86-64
// compilers emit is understood, plus the one DWARF expression OpenSSL's
// assembly uses for its CFA (the caller's sp kept in a stack slot:
// rsp+N, deref, +8); anything else ends the unwind rather than guessing.

// DWARF register numbers on x86-64.
const (
	dwRBP = 6
	dwRSP = 7
	dwRA  = 16
)

// cfiTable indexes the FDEs of one .eh_frame section.
type cfiTable struct {
	data []byte
	addr uint64 // the section's virtual address: pc-relative pointers
	fdes []fde  // sorted by lo

	// rows caches row: an unwind looks up the same few hundred return
	// addresses sample after sample, and each lookup otherwise runs the
	// FDE's program from its start. Bounded by maxRowMemo, dropped whole
	// when full. Guarded by the owning Symbolizer's mu.
	rows map[uint64]rowMemo
}

type rowMemo struct {
	row frameRow
	ok  bool
}

// maxRowMemo bounds cfiTable.rows: some 400 KiB per file at most, a
// thousand times the return addresses a profile of one service meets.
const maxRowMemo = 1 << 12

type fde struct {
	lo, hi uint64
	insns  []byte // the FDE's instructions (a slice of data)
	cie    *cie
}

type cie struct {
	codeAlign uint64
	dataAlign int64
	raReg     uint64
	ptrEnc    byte
	insns     []byte
}

var errCFI = errors.New("unsupported call frame information")

// parseEHFrame indexes data, the contents of .eh_frame loaded at addr.
// FDEs it cannot read are skipped; the error is for a section that is
// unreadable as a whole.
func parseEHFrame(data []byte, addr uint64) (*cfiTable, error) {
	t := &cfiTable{data: data, addr: addr}
	cies := map[int]*cie{}
	for off := 0; off+4 <= len(data); {
		length := uint64(binary.LittleEndian.Uint32(data[off:]))
		hdr := 4
		if length == 0xffffffff {
			if off+12 > len(data) {
				break
			}
			length = binary.LittleEndian.Uint64(data[off+4:])
			hdr = 12
		}
		if length == 0 { // terminator
			break
		}
		start := off + hdr
		end := start + int(length)
		if length > uint64(len(data)) || end > len(data) || start+4 > end {
			return t, fmt.Errorf("eh_frame entry at %#x: length %d past the section: %w", off, length, errCFI)
		}
		id := binary.LittleEndian.Uint32(data[start:])
		if id != 0 {
			// An FDE: id is the distance back to its CIE.
			cieOff := start - int(id)
			c, ok := cies[cieOff]
			if !ok {
				var err error
				if c, err = parseCIE(data, cieOff); err == nil {
					cies[cieOff] = c
				}
			}
			if c != nil {
				if f, err := t.parseFDE(start+4, end, c); err == nil && f.hi > f.lo {
					t.fdes = append(t.fdes, f)
				}
			}
		}
		off = end
	}
	sort.Slice(t.fdes, func(i, j int) bool { return t.fdes[i].lo < t.fdes[j].lo })
	return t, nil
}

func parseCIE(data []byte, off int) (*cie, error) {
	if off < 0 || off+8 > len(data) {
		return nil, errCFI
	}
	length := int(binary.LittleEndian.Uint32(data[off:]))
	if length < 4 || length == 0xffffffff || off+4+length > len(data) {
		return nil, errCFI
	}
	r := reader{b: data[off+8 : off+4+length]}
	version := r.u8()
	aug := r.cstring()
	c := &cie{codeAlign: r.uleb(), dataAlign: r.sleb(), ptrEnc: 0}
	if version == 1 {
		c.raReg = uint64(r.u8())
	} else {
		c.raReg = r.uleb()
	}
	if len(aug) > 0 && aug[0] == 'z' {
		n := r.uleb()
		augData := reader{b: r.take(int(n))}
		for _, a := range aug[1:] {
			switch a {
			case 'R':
				c.ptrEnc = augData.u8()
			case 'P':
				enc := augData.u8()
				augData.pointer(enc)
			case 'L':
				augData.u8()
			case 'S', 'B':
			default:
				return nil, errCFI
			}
		}
	} else if len(aug) > 0 {
		return nil, errCFI
	}
	if r.err {
		return nil, errCFI
	}
	c.insns = r.b
	return c, nil
}

func (t *cfiTable) parseFDE(start, end int, c *cie) (fde, error) {
	r := reader{b: t.data[start:end], base: t.addr + uint64(start)}
	lo := r.pointer(c.ptrEnc)
	n := r.pointer(c.ptrEnc & 0x0f) // the range is never pc-relative
	r.take(int(r.uleb()))           // augmentation data ('z'): the LSDA
	if r.err {
		return fde{}, errCFI
	}
	return fde{lo: lo, hi: lo + n, insns: r.b, cie: c}, nil
}

// frameRow is the unwinding rule at one pc: CFA = reg + off (cfaDeref:
// CFA = the word at reg + off, plus cfaAdd); the return address and rbp
// saved at CFA + raOff / rbpOff (rbpSaved false: rbp is unchanged by this
// frame).
type frameRow struct {
	cfaReg   uint64
	cfaOff   int64
	cfaDeref bool
	cfaAdd   int64
	// cfaUnknown: the CFA rule is one this unwinder does not evaluate (an
	// expression, or a register it has no value for); a later def_cfa may
	// still replace it.
	cfaUnknown bool
	raOff      int64
	rbpOff     int64
	rbpSaved   bool
}

// row returns the rule at vaddr pc, false when no FDE covers it or its
// program uses what this unwinder does not understand.
func (t *cfiTable) row(pc uint64) (frameRow, bool) {
	if m, ok := t.rows[pc]; ok {
		return m.row, m.ok
	}
	r, ok := t.rowUncached(pc)
	if t.rows == nil || len(t.rows) >= maxRowMemo {
		t.rows = make(map[uint64]rowMemo)
	}
	t.rows[pc] = rowMemo{r, ok}
	return r, ok
}

func (t *cfiTable) rowUncached(pc uint64) (frameRow, bool) {
	i := sort.Search(len(t.fdes), func(i int) bool { return t.fdes[i].lo > pc }) - 1
	if i < 0 || pc >= t.fdes[i].hi {
		return frameRow{}, false
	}
	f := t.fdes[i]
	var st cfiState
	if !st.run(f.cie.insns, f.cie, f.lo, ^uint64(0), nil) {
		return frameRow{}, false
	}
	initial := st.row
	if !st.run(f.insns, f.cie, f.lo, pc, &initial) {
		return frameRow{}, false
	}
	if !st.raKnown || st.row.cfaUnknown || (st.row.cfaReg != dwRSP && st.row.cfaReg != dwRBP) {
		return frameRow{}, false
	}
	return st.row, true
}

// DWARF expression opcodes of the one CFA expression understood.
const (
	dwOpDeref      = 0x06
	dwOpPlusUconst = 0x23
	dwOpBreg0      = 0x70
	dwOpBreg31     = 0x8f
)

// setCFAExpr sets the CFA from a DW_CFA_def_cfa_expression. OpenSSL's
// perlasm keeps the caller's sp in a stack slot while it uses every
// register, and says so as DW_OP_breg7 (rsp) N; DW_OP_deref;
// DW_OP_plus_uconst 8 (or breg6, rbp): that form, with or without the
// addition, is evaluated; any other expression leaves the CFA unknown.
func (row *frameRow) setCFAExpr(expr []byte) {
	row.cfaUnknown = true
	r := reader{b: expr}
	op := r.u8()
	if op < dwOpBreg0 || op > dwOpBreg31 {
		return
	}
	reg := uint64(op - dwOpBreg0)
	off := r.sleb()
	if r.u8() != dwOpDeref || r.err {
		return
	}
	var add uint64
	if len(r.b) > 0 {
		if r.u8() != dwOpPlusUconst {
			return
		}
		add = r.uleb()
	}
	if r.err || len(r.b) != 0 || add > 1<<20 || (reg != dwRSP && reg != dwRBP) {
		return
	}
	*row = frameRow{cfaReg: reg, cfaOff: off, cfaDeref: true, cfaAdd: int64(add),
		raOff: row.raOff, rbpOff: row.rbpOff, rbpSaved: row.rbpSaved}
}

// setCFA sets the CFA to reg + off, the plain rule.
func (row *frameRow) setCFA(reg uint64, off int64) {
	row.cfaReg, row.cfaOff = reg, off
	row.cfaDeref, row.cfaAdd, row.cfaUnknown = false, 0, false
}

type cfiState struct {
	row     frameRow
	raKnown bool
	stack   []frameRow // remember_state
}

// run executes a CFA program from location loc until the row for pc is
// reached (the first advance past pc). initial is the CIE's row, for
// DW_CFA_restore.
func (st *cfiState) run(insns []byte, c *cie, loc, pc uint64, initial *frameRow) bool {
	r := reader{b: insns}
	setReg := func(reg uint64, off int64, saved bool) {
		switch reg {
		case dwRA:
			st.row.raOff, st.raKnown = off, saved
		case dwRBP:
			st.row.rbpOff, st.row.rbpSaved = off, saved
		}
	}
	restore := func(reg uint64) {
		if initial == nil {
			return
		}
		switch reg {
		case dwRA:
			st.row.raOff = initial.raOff
		case dwRBP:
			st.row.rbpOff, st.row.rbpSaved = initial.rbpOff, initial.rbpSaved
		}
	}
	advance := func(delta uint64) bool {
		loc += delta * c.codeAlign
		return loc <= pc
	}
	for len(r.b) > 0 && !r.err {
		op := r.u8()
		switch op >> 6 {
		case 1: // advance_loc
			if !advance(uint64(op & 0x3f)) {
				return true
			}
			continue
		case 2: // offset
			setReg(uint64(op&0x3f), int64(r.uleb())*c.dataAlign, true)
			continue
		case 3: // restore
			restore(uint64(op & 0x3f))
			continue
		}
		switch op {
		case 0x00: // nop
		case 0x01: // set_loc
			loc = r.pointer(c.ptrEnc)
			if loc > pc {
				return true
			}
		case 0x02:
			if !advance(uint64(r.u8())) {
				return true
			}
		case 0x03:
			if !advance(uint64(r.u16())) {
				return true
			}
		case 0x04:
			if !advance(uint64(r.u32())) {
				return true
			}
		case 0x05: // offset_extended
			reg := r.uleb()
			setReg(reg, int64(r.uleb())*c.dataAlign, true)
		case 0x06: // restore_extended
			restore(r.uleb())
		case 0x07, 0x08: // undefined, same_value
			reg := r.uleb()
			if reg == dwRA {
				return false
			}
			setReg(reg, 0, false)
		case 0x09: // register: a value in another register is beyond us
			reg := r.uleb()
			r.uleb()
			if reg == dwRA || reg == dwRBP {
				return false
			}
		case 0x0a: // remember_state
			if len(st.stack) >= 16 {
				return false
			}
			st.stack = append(st.stack, st.row)
		case 0x0b: // restore_state
			if len(st.stack) == 0 {
				return false
			}
			st.row = st.stack[len(st.stack)-1]
			st.stack = st.stack[:len(st.stack)-1]
		case 0x0c: // def_cfa
			reg := r.uleb()
			st.row.setCFA(reg, int64(r.uleb()))
		case 0x0d: // def_cfa_register: keeps the offset of a register rule
			st.row.cfaReg = r.uleb()
			st.row.cfaUnknown = st.row.cfaUnknown || st.row.cfaDeref
		case 0x0e: // def_cfa_offset: likewise
			st.row.cfaOff = int64(r.uleb())
			st.row.cfaUnknown = st.row.cfaUnknown || st.row.cfaDeref
		case 0x0f: // def_cfa_expression: OpenSSL's, the PLT's, signal frames'
			st.row.setCFAExpr(r.take(int(r.uleb())))
		case 0x10, 0x16: // expression, val_expression
			reg := r.uleb()
			r.take(int(r.uleb()))
			if reg == dwRA || reg == dwRBP {
				return false
			}
		case 0x11: // offset_extended_sf
			reg := r.uleb()
			setReg(reg, r.sleb()*c.dataAlign, true)
		case 0x12: // def_cfa_sf
			reg := r.uleb()
			st.row.setCFA(reg, r.sleb()*c.dataAlign)
		case 0x13: // def_cfa_offset_sf
			st.row.cfaOff = r.sleb() * c.dataAlign
			st.row.cfaUnknown = st.row.cfaUnknown || st.row.cfaDeref
		case 0x14, 0x15: // val_offset(_sf): the register's value is CFA+n, not saved
			reg := r.uleb()
			if op == 0x14 {
				r.uleb()
			} else {
				r.sleb()
			}
			if reg == dwRA || reg == dwRBP {
				return false
			}
		case 0x2e: // GNU_args_size
			r.uleb()
		case 0x2f: // GNU_negative_offset_extended
			reg := r.uleb()
			setReg(reg, -int64(r.uleb())*c.dataAlign, true)
		default:
			return false
		}
	}
	return !r.err
}

// reader decodes the little-endian encodings of .eh_frame; a read past the
// end sets err and returns zeros, so callers check once.
type reader struct {
	b    []byte
	base uint64 // virtual address of b[0], for pc-relative pointers
	err  bool
}

func (r *reader) take(n int) []byte {
	if n < 0 || n > len(r.b) {
		r.err = true
		r.b = nil
		return nil
	}
	out := r.b[:n]
	r.b = r.b[n:]
	r.base += uint64(n)
	return out
}

func (r *reader) u8() byte {
	if b := r.take(1); b != nil {
		return b[0]
	}
	return 0
}

func (r *reader) u16() uint16 {
	if b := r.take(2); b != nil {
		return binary.LittleEndian.Uint16(b)
	}
	return 0
}

func (r *reader) u32() uint32 {
	if b := r.take(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

func (r *reader) u64() uint64 {
	if b := r.take(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (r *reader) cstring() string {
	for i, c := range r.b {
		if c == 0 {
			s := string(r.b[:i])
			r.take(i + 1)
			return s
		}
	}
	r.err = true
	return ""
}

func (r *reader) uleb() uint64 {
	var v uint64
	for shift := uint(0); ; shift += 7 {
		b := r.u8()
		if r.err {
			return 0
		}
		if shift < 64 {
			v |= uint64(b&0x7f) << shift
		}
		if b&0x80 == 0 {
			return v
		}
	}
}

func (r *reader) sleb() int64 {
	var v int64
	var shift uint
	var b byte
	for {
		b = r.u8()
		if r.err {
			return 0
		}
		if shift < 64 {
			v |= int64(b&0x7f) << shift
		}
		shift += 7
		if b&0x80 == 0 {
			break
		}
	}
	if shift < 64 && b&0x40 != 0 {
		v |= -1 << shift
	}
	return v
}

// pointer reads a DW_EH_PE-encoded pointer. Only absolute and pc-relative
// applications occur in .eh_frame of executables and shared libraries.
func (r *reader) pointer(enc byte) uint64 {
	if enc == 0xff { // omit
		return 0
	}
	at := r.base
	var v uint64
	switch enc & 0x0f {
	case 0x00: // absptr
		v = r.u64()
	case 0x01:
		v = r.uleb()
	case 0x02:
		v = uint64(r.u16())
	case 0x03:
		v = uint64(r.u32())
	case 0x04:
		v = r.u64()
	case 0x09:
		v = uint64(r.sleb())
	case 0x0a:
		v = uint64(int64(int16(r.u16())))
	case 0x0b:
		v = uint64(int64(int32(r.u32())))
	case 0x0c:
		v = r.u64()
	default:
		r.err = true
		return 0
	}
	switch enc & 0x70 {
	case 0x00:
	case 0x10: // pcrel
		v += at
	default: // textrel, datarel, funcrel, aligned: not in .eh_frame we read
		r.err = true
	}
	return v
}
