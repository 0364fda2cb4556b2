package symbolize

import (
	"debug/elf"
	"strings"
	"time"
)

// MaxUnwindFrames bounds the frames one unwind from copied stack bytes
// adds: as deep as the kernel's own frame-pointer walk goes
// (perf_event_max_stack, 127). From a blocking call or a hot loop in
// native code to the JavaScript function that made it, Node.js needs
// 10-25 frames (libc, libuv, node::, V8's C++ and builtins); 127 leaves
// room for deep middleware chains above it. The copied bytes bound it too:
// every frame takes at least 16 of them.
const MaxUnwindFrames = 127

// maxEHFrame bounds the .eh_frame section kept per file: beyond it (huge
// C++ binaries) leaf frames are not recovered.
const maxEHFrame = 32 << 20

// RecoverLeaf returns stack (user addresses, leaf first, as walked by frame
// pointers) with what that walk missed put back. A leaf built without
// frame pointers (a libc syscall wrapper) leaves rbp pointing at its
// caller's caller, so the function that made the call, the one a finding
// must name, is missing; code that uses rbp as a general register
// (OpenSSL's assembly, a C library built without frame pointers) leaves no
// walk at all. sp and bp are the user registers when the stack was taken
// and words the user stack copied from sp upward: the stack is unwound
// from them (Unwind) and joined to the walked stack where the two meet.
// Where they never meet, the unwound frames are all that is returned: the
// walk's frames above its first skip cannot be placed under them without
// guessing what lies between. With no CFI for the leaf, the stack comes
// back as it came.
func (s *Symbolizer) RecoverLeaf(pid int, stack []uint64, sp, bp uint64, words []uint64) []uint64 {
	return s.RecoverLeafAt(pid, stack, sp, bp, sp, words)
}

// RecoverLeafAt is RecoverLeaf for a copy of the stack that starts at
// base, at or below sp: a copy that includes the red zone, the 128 bytes
// below sp that code may use without moving sp (OpenSSL's SHA-512 keeps
// its caller's sp there).
func (s *Symbolizer) RecoverLeafAt(pid int, stack []uint64, sp, bp, base uint64, words []uint64) []uint64 {
	if len(stack) == 0 || sp == 0 || base > sp || len(words) == 0 {
		return stack
	}
	s.mu.Lock()
	found := s.unwindLocked(pid, stack[0], sp, bp, base, words, &callState{now: s.now()})
	s.mu.Unlock()
	return join(stack, found)
}

// join places the frames unwound from the copy (found, callers of
// stack[0]) on the walked stack. At the first frame both have, the two
// continue together: the longer one is kept when they agree, the unwound
// one when they part (the walk is what goes wrong through code without
// frame pointers; every unwound frame was checked).
func join(stack, found []uint64) []uint64 {
	if len(found) == 0 {
		return stack
	}
	at := make(map[uint64]int, len(stack))
	for j := len(stack) - 1; j >= 1; j-- {
		at[stack[j]] = j
	}
	out := make([]uint64, 0, 1+len(found)+len(stack))
	out = append(out, stack[0])
	for k, ra := range found {
		j, ok := at[ra]
		if !ok {
			out = append(out, ra)
			continue
		}
		rest, walked := found[k:], stack[j:]
		n := min(len(rest), len(walked))
		for i := 0; i < n; i++ {
			if rest[i] != walked[i] {
				return append(out, rest...)
			}
		}
		if len(walked) > len(rest) {
			return append(out, walked...)
		}
		return append(out, rest...)
	}
	return out
}

// Unwind returns the callers of pc, innermost first, unwound from a copy
// of the user stack: sp and bp are the registers at pc, words the stack
// from sp upward. Each frame is unwound by its file's CFI (.eh_frame);
// code with none that a runtime generated (in anonymous executable
// memory, or named by the process's perf map: V8's JIT code and embedded
// builtins, which keep frame pointers) is unwound by its frame pointer.
// Every step must move up the stack and stay within words, and every
// return address must point at code; the unwind ends where no rule
// applies: frames are never guessed.
func (s *Symbolizer) Unwind(pid int, pc, sp, bp uint64, words []uint64) []uint64 {
	if pc == 0 || sp == 0 || len(words) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unwindLocked(pid, pc, sp, bp, sp, words, &callState{now: s.now()})
}

// unwindLocked unwinds as Unwind does, from a copy of the stack that
// starts at base (at or below sp).
func (s *Symbolizer) unwindLocked(pid int, pc, sp, bp, base uint64, words []uint64, st *callState) []uint64 {
	var out []uint64
	for leaf := true; ; leaf = false {
		if len(out) >= MaxUnwindFrames {
			return out
		}
		// Each step either stops or moves sp up (cfa > sp), within words:
		// the loop ends.
		var cfa, ra, nbp uint64
		if row, ok := s.rowLocked(pid, pc, leaf, st); ok {
			if cfa, ok = row.cfa(words, base, sp, bp); !ok {
				return out // the CFA's slot is past the copy
			}
			if cfa <= sp {
				return out // a caller's frame is above its callee's
			}
			if ra, ok = wordAt(words, base, cfa+uint64(row.raOff)); !ok {
				return out // past the copy
			}
			nbp = bp
			if row.rbpSaved {
				if nbp, ok = wordAt(words, base, cfa+uint64(row.rbpOff)); !ok {
					if ra != 0 && s.codeLocked(pid, ra, st) {
						out = append(out, ra) // the caller is known; its rbp is not
					}
					return out
				}
			}
		} else if s.generatedLocked(pid, pc, leaf, st) {
			// [bp] is the caller's bp, [bp+8] the return address, and the
			// caller's sp is what is above them.
			if bp < sp || bp%8 != 0 {
				return out // no frame pointer: it would point into this frame's callees, or between words
			}
			if leaf && s.interpreterLocked(pid, pc, true, st) {
				// The leaf runs the bytecode of the function whose frame
				// bp is: that function is the leaf's caller in all but
				// name.
				if fn, ok := s.interpretedLocked(pid, bp, words, base, st); ok {
					out = append(out, fn)
				}
			}
			var ok1, ok2 bool
			nbp, ok1 = wordAt(words, base, bp)
			ra, ok2 = wordAt(words, base, bp+8)
			if !ok1 || !ok2 {
				return out // the chain leaves the copy
			}
			cfa = bp + 16
		} else {
			return out // no CFI, and not code known to keep frame pointers
		}
		if ra == 0 {
			return out // the thread's first frame
		}
		if !s.codeLocked(pid, ra, st) {
			return out // a rule that does not hold here: what it read is no return address
		}
		frame := ra
		if s.interpreterLocked(pid, ra, false, st) {
			if fn, ok := s.interpretedLocked(pid, nbp, words, base, st); ok {
				frame = fn
			}
		}
		out = append(out, frame)
		pc, sp, bp = ra, cfa, nbp
	}
}

// V8 runs every function it has not compiled yet in one piece of code,
// the interpreter's entry trampoline and its bytecode handlers, so a
// return address into it names no function (with --perf-basic-prof alone;
// --interpreted-frames-native-stack gives each function a copy). Which
// function an interpreted frame runs is in the frame: the bytecode array
// and the offset of the bytecode being run, at fixed places below its
// frame pointer (x64 since V8 9; node's postmortem metadata says the same,
// v8dbg_off_fp_bytecode_array and v8dbg_off_fp_bytecode_offset), and the
// perf map names each function's bytecode ("JS:~name file:line:col").
const (
	v8FPBytecodeArray  = 32 // below fp: the tagged BytecodeArray
	v8FPBytecodeOffset = 40 // below fp: a Smi, the bytecode's offset from that tagged pointer
	v8HeapObjectTag    = 1
)

// interpreterLocked reports whether pc is V8's interpreter: a frame whose
// return address is there is an interpreted function's.
func (s *Symbolizer) interpreterLocked(pid int, pc uint64, leaf bool, st *callState) bool {
	name, ok := s.perfNameLocked(pid, pc, leaf, st)
	return ok && (strings.HasPrefix(name, "Builtin:InterpreterEntryTrampoline") || strings.HasPrefix(name, "BytecodeHandler:"))
}

// interpretedLocked returns an address naming the function the
// interpreted frame at fp runs: one past the bytecode being run, so that
// a caller's frame resolves (at address-1) to its perf map entry. It is
// only returned when the perf map names that address as an interpreted
// function's bytecode: a slot that holds anything else names nothing.
func (s *Symbolizer) interpretedLocked(pid int, fp uint64, words []uint64, base uint64, st *callState) (uint64, bool) {
	if fp < v8FPBytecodeOffset {
		return 0, false
	}
	arr, ok1 := wordAt(words, base, fp-v8FPBytecodeArray)
	off, ok2 := wordAt(words, base, fp-v8FPBytecodeOffset)
	if !ok1 || !ok2 || arr&v8HeapObjectTag == 0 {
		return 0, false
	}
	// Smis are the upper half of the word, or with pointer compression a
	// 31-bit value shifted by one.
	for _, o := range []int64{int64(off) >> 32, int64(int32(uint32(off))) >> 1} {
		if o <= 0 || o > 1<<30 {
			continue
		}
		at := arr + uint64(o)
		if name, ok := s.jitFreshLocked(pid, at, st); ok && interpretedJS(name) {
			return at + 1, true
		}
	}
	return 0, false
}

// perfMapFresh rate-limits the perf map reads jitFreshLocked forces, per
// process: 50 a second at most, each a stat and a read of the lines added.
const perfMapFresh = 20 * time.Millisecond

// jitFreshLocked is jitLocked for a lookup decided once: which function an
// interpreted frame runs is settled when the stack is unwound, and V8
// compiles a function (and writes its perf map line) at its first call,
// a moment before the stack is read. So a miss reads the lines added
// since the last read now, not after perfMapRecheck.
func (s *Symbolizer) jitFreshLocked(pid int, pc uint64, st *callState) (string, bool) {
	if name, ok := s.jitLocked(pid, pc, st.now); ok {
		return name, true
	}
	ps := s.perf[pid]
	if ps == nil || ps.checked.IsZero() || st.now.Sub(ps.checked) < perfMapFresh {
		return "", false
	}
	ps.checked = time.Time{}
	return s.jitLocked(pid, pc, st.now)
}

// interpretedJS reports whether a perf map name is a JavaScript function's
// bytecode: "JS:~name ...", V8's tier marker ~ for the interpreter.
func interpretedJS(name string) bool {
	kind, rest, ok := strings.Cut(name, ":")
	_, js := v8JSKinds[kind]
	return ok && js && strings.HasPrefix(rest, "~")
}

// cfa computes the CFA (the caller's sp) of row from the registers and
// the copied stack.
func (r frameRow) cfa(words []uint64, base, sp, bp uint64) (uint64, bool) {
	v := sp
	if r.cfaReg == dwRBP {
		v = bp
	}
	v += uint64(r.cfaOff)
	if !r.cfaDeref {
		return v, true
	}
	w, ok := wordAt(words, base, v)
	return w + uint64(r.cfaAdd), ok
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

// generatedLocked reports whether pc is code a runtime generated: in
// anonymous executable memory, or named by pid's perf map (V8 names its
// builtins embedded in the node binary there too; they have no CFI).
func (s *Symbolizer) generatedLocked(pid int, pc uint64, leaf bool, st *callState) bool {
	pm := s.procMapsLocked(pid, false, st.now)
	if idx := findMapping(pm.maps, lookupAddr(pc, leaf)); idx >= 0 && pm.maps[idx].Path == "" {
		return true
	}
	_, ok := s.perfNameLocked(pid, pc, leaf, st)
	return ok
}

// perfNameLocked is pid's perf map name of the code at pc. V8 also maps
// its embedded builtins a second time, next to its JIT code (short
// builtin calls), and names them at their address in the binary only: a
// pc in a file mapping is looked up at the file's own address too.
func (s *Symbolizer) perfNameLocked(pid int, pc uint64, leaf bool, st *callState) (string, bool) {
	pc = lookupAddr(pc, leaf)
	if name, ok := s.jitLocked(pid, pc, st.now); ok {
		return name, true
	}
	pm := s.procMapsLocked(pid, false, st.now)
	idx := findMapping(pm.maps, pc)
	if idx < 0 || pm.maps[idx].Path == "" {
		return "", false
	}
	m := pm.maps[idx]
	ef := s.objectLocked(pid, pm, idx)
	if ef == nil || ef.typ != elf.ET_EXEC {
		// A shared object's addresses are relative to where it loads:
		// its own address is no process address a perf map could name.
		return "", false
	}
	vaddr, err := ef.vaddr(pc - m.Start + m.Offset)
	if err != nil || vaddr == pc {
		return "", false
	}
	return s.jitLocked(pid, vaddr, st.now)
}

// codeLocked reports whether the return address ra points into code: an
// executable mapping of pid (read again once per call on a miss: code
// mapped since the maps were read).
func (s *Symbolizer) codeLocked(pid int, ra uint64, st *callState) bool {
	pc := lookupAddr(ra, false)
	if findMapping(s.procMapsLocked(pid, false, st.now).maps, pc) >= 0 {
		return true
	}
	if st.reread[pid] {
		return false
	}
	if st.reread == nil {
		st.reread = make(map[int]bool)
	}
	st.reread[pid] = true
	return findMapping(s.procMapsLocked(pid, true, st.now).maps, pc) >= 0
}
