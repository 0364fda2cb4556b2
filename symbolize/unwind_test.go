package symbolize

import (
	"fmt"
	"slices"
	"testing"
)

// unwindProc is a fake process (fakeProc) with one anonymous executable
// mapping at jit, and the Symbolizer that reads it.
func unwindProc(t *testing.T, pid int, jit uint64, perf string) *Symbolizer {
	t.Helper()
	root := t.TempDir()
	fakeProc(t, root, pid, pid, fmt.Sprintf("%x-%x r-xp 00000000 00:00 0 \n", jit, jit+0x100000), perf)
	return New(Options{ProcRoot: root})
}

// frameStack lays out n words of stack from base with the given address
// -> value pairs set (those past the n words are not copied).
func frameStack(base uint64, n int, set map[uint64]uint64) []uint64 {
	w := make([]uint64, n)
	for a, v := range set {
		if i := (a - base) / 8; i < uint64(n) {
			w[i] = v
		}
	}
	return w
}

// Code in anonymous executable memory (a JIT's) has no CFI: it is unwound
// by its frame pointers, within the copy and upward only, and every return
// address must be code. Each broken chain stops where it breaks, keeping
// the frames before it.
func TestUnwindFramePointersThroughJITCode(t *testing.T) {
	const (
		pid  = 4242
		jit  = 0x7f0000000000
		base = 0x10000
	)
	s := unwindProc(t, pid, jit, "")
	ra1, ra2, ra3 := uint64(jit+0x200), uint64(jit+0x300), uint64(jit+0x400)
	good := map[uint64]uint64{
		0x10010: 0x10040, 0x10018: ra1, // leaf's frame: caller's bp, return address
		0x10040: 0x10080, 0x10048: ra2,
		0x10080: 0x100c0, 0x10088: ra3,
		0x100c0: 0, 0x100c8: 0, // the thread's first frame
	}
	tests := []struct {
		name   string
		bp     uint64
		change map[uint64]uint64
		words  int
		want   []uint64
	}{
		{"whole chain", 0x10010, nil, 64, []uint64{ra1, ra2, ra3}},
		{"chain turns down", 0x10010, map[uint64]uint64{0x10040: 0x10020}, 64, []uint64{ra1, ra2}},
		{"chain leaves the copy", 0x10010, map[uint64]uint64{0x10040: 0x90000}, 64, []uint64{ra1, ra2}},
		{"copy ends inside a frame", 0x10010, nil, 0x4c / 8, []uint64{ra1}},
		{"misaligned frame pointer", 0x10010, map[uint64]uint64{0x10040: 0x10084}, 64, []uint64{ra1, ra2}},
		{"return address where no code is", 0x10010, map[uint64]uint64{0x10048: 0x5000}, 64, []uint64{ra1}},
		{"bp below sp", base - 16, nil, 64, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			set := maps(good, tc.change)
			got := s.Unwind(pid, jit+0x100, base, tc.bp, frameStack(base, tc.words, set))
			if !slices.Equal(got, tc.want) {
				t.Errorf("Unwind = %x, want %x", got, tc.want)
			}
		})
	}
}

func maps(a, b map[uint64]uint64) map[uint64]uint64 {
	out := make(map[uint64]uint64, len(a)+len(b))
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

// A frame that returns into V8's interpreter is named by the bytecode its
// frame runs, when the perf map names that bytecode as an interpreted
// function's; a slot holding anything else leaves the interpreter's name.
func TestUnwindNamesInterpretedFrames(t *testing.T) {
	const (
		pid        = 4343
		jit        = 0x7f0000000000
		trampoline = jit + 0x1000 // the interpreter's entry trampoline
		bytecode   = 0x5a0000     // a JS function's bytecode in V8's heap
		base       = 0x10000
	)
	perf := fmt.Sprintf("%x 100 Builtin:InterpreterEntryTrampoline\n%x 40 JS:~handler /app/server.js:12:20\n", trampoline, bytecode)
	s := unwindProc(t, pid, jit, perf)
	array := uint64(bytecode - 0x30 + 1) // tagged: the array's header, then its bytecode
	ret := uint64(trampoline + 0x80)     // return address into the trampoline
	caller := uint64(jit + 0x500)        // what called the interpreted function
	frame := func(arr, off uint64) map[uint64]uint64 {
		return map[uint64]uint64{
			0x10010: 0x10080, 0x10018: ret, // the leaf's frame, called from interpreted code
			0x10080 - 32: arr, 0x10080 - 40: off, // the interpreted frame's bytecode array and offset (a Smi)
			0x10080: 0, 0x10088: caller,
		}
	}
	smi := func(v uint64) uint64 { return v << 32 }
	for _, tc := range []struct {
		name     string
		set      map[uint64]uint64
		want     uint64
		wantName string
	}{
		// V8's offset counts from the tagged pointer: the header less the
		// tag, then the bytecode's index (5 here).
		{"interpreted", frame(array, smi(0x30-1+5)), bytecode + 5 + 1, "handler (/app/server.js:12)"},
		{"compressed Smi", frame(array, (0x30-1+5)<<1), bytecode + 5 + 1, "handler (/app/server.js:12)"},
		{"untagged array", frame(array-1, smi(0x30-1+5)), ret, "Builtin:InterpreterEntryTrampoline"},
		{"offset past the bytecode", frame(array, smi(0x30-1+0x80)), ret, "Builtin:InterpreterEntryTrampoline"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := s.Unwind(pid, jit+0x100, base, 0x10010, frameStack(base, 32, tc.set))
			if len(got) != 2 || got[0] != tc.want || got[1] != caller {
				t.Fatalf("Unwind = %x, want [%x %x]", got, tc.want, caller)
			}
			fs := s.UserStack(pid, append([]uint64{jit + 0x100}, got...))
			if len(fs) != 3 || fs[1].String() != tc.wantName {
				t.Errorf("frames %v, want %q second", fs, tc.wantName)
			}
		})
	}
}

// join keeps the walked stack's frames only where the unwound ones meet
// them, and never places the walk's frames under unwound ones they do not
// follow.
func TestJoinUnwoundAndWalked(t *testing.T) {
	for _, tc := range []struct {
		name                string
		walked, found, want []uint64
	}{
		{"nothing unwound", []uint64{1, 5, 6}, nil, []uint64{1, 5, 6}},
		{"the leaf's caller put back", []uint64{1, 5, 6, 7}, []uint64{4, 5}, []uint64{1, 4, 5, 6, 7}},
		{"unwound deeper, agreeing", []uint64{1, 5}, []uint64{4, 5, 6, 7}, []uint64{1, 4, 5, 6, 7}},
		{"the walk went wrong after meeting", []uint64{1, 5, 99, 98}, []uint64{4, 5, 6, 7}, []uint64{1, 4, 5, 6, 7}},
		{"never met: the walk's frames dropped", []uint64{1, 99, 98}, []uint64{4, 5}, []uint64{1, 4, 5}},
		{"walk of the leaf alone", []uint64{1}, []uint64{4, 5}, []uint64{1, 4, 5}},
	} {
		if got := join(tc.walked, tc.found); !slices.Equal(got, tc.want) {
			t.Errorf("%s: join(%v, %v) = %v, want %v", tc.name, tc.walked, tc.found, got, tc.want)
		}
	}
}
