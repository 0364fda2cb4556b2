package symbolize

// maxLeafFrames bounds how many frames RecoverLeaf unwinds by CFI before it
// must meet the frame-pointer walk again.
const maxLeafFrames = 8

// maxEHFrame bounds the .eh_frame section kept per file: beyond it (huge
// C++ binaries) leaf frames are not recovered.
const maxEHFrame = 32 << 20

// RecoverLeaf returns stack (user addresses, leaf first, as walked by frame
// pointers) with the frames that walk skipped at its leaf put back. A leaf
// built without frame pointers (a libc syscall wrapper) leaves rbp pointing
// at its caller's caller, so the function that made the call, the one a
// finding must name, is missing. sp and bp are the user registers when the
// stack was taken and words the user stack from sp upward; the skipped
// frames are unwound from them by each file's .eh_frame until they meet
// the walked stack again. Without CFI, or when the words run out, the
// stack is returned as it came or with the frames found so far: never a
// guessed frame.
func (s *Symbolizer) RecoverLeaf(pid int, stack []uint64, sp, bp uint64, words []uint64) []uint64 {
	if len(stack) == 0 || sp == 0 || len(words) == 0 {
		return stack
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	st := &callState{now: s.now()}
	var found []uint64
	pc, curSP, curBP := stack[0], sp, bp
	for i := 0; i < maxLeafFrames; i++ {
		row, ok := s.rowLocked(pid, pc, i == 0, st)
		if !ok {
			break
		}
		var cfa uint64
		if row.cfaReg == dwRBP {
			cfa = curBP + uint64(row.cfaOff)
		} else {
			cfa = curSP + uint64(row.cfaOff)
		}
		ra, ok := wordAt(words, sp, cfa+uint64(row.raOff))
		if !ok || ra == 0 {
			break
		}
		if len(stack) > 1 && ra == stack[1] {
			break // the frame-pointer walk has this frame and the rest
		}
		if row.rbpSaved {
			if curBP, ok = wordAt(words, sp, cfa+uint64(row.rbpOff)); !ok {
				found = append(found, ra)
				break
			}
		}
		found = append(found, ra)
		pc, curSP = ra, cfa
	}
	if len(found) == 0 {
		return stack
	}
	out := make([]uint64, 0, len(stack)+len(found))
	out = append(out, stack[0])
	out = append(out, found...)
	return append(out, stack[1:]...)
}

// wordAt reads the stack word at addr from words, copied from sp upward.
func wordAt(words []uint64, sp, addr uint64) (uint64, bool) {
	if addr < sp || (addr-sp)%8 != 0 {
		return 0, false
	}
	i := (addr - sp) / 8
	if i >= uint64(len(words)) {
		return 0, false
	}
	return words[i], true
}

// rowLocked finds the unwind rule at the process address pc.
func (s *Symbolizer) rowLocked(pid int, pc uint64, leaf bool, st *callState) (frameRow, bool) {
	pc = lookupAddr(pc, leaf)
	pm := s.procMapsLocked(pid, false, st.now)
	idx := findMapping(pm.maps, pc)
	if idx < 0 || pm.maps[idx].Path == "" {
		return frameRow{}, false
	}
	m := pm.maps[idx]
	ef := s.objectLocked(pid, pm, idx)
	if ef == nil || ef.cfi == nil {
		return frameRow{}, false
	}
	vaddr, err := ef.vaddr(pc - m.Start + m.Offset)
	if err != nil {
		return frameRow{}, false
	}
	return ef.cfi.row(vaddr)
}
