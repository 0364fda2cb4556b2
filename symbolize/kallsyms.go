package symbolize

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"time"
)

// kallsyms resolves kernel addresses with the kernel's text symbols.
//
// The table is big (a 6.18 kernel has ~150k text symbols: ~1.6 MB of
// addresses, ~0.6 MB of name offsets and ~5 MB of names in one arena) and
// little of it is ever asked for: kernel stacks come from the sched probe's
// sleeps, which keep entering the same few hundred functions. So every
// answer is kept in a small cache (names copied out of the arena), and the
// table itself is dropped once no lookup has missed the cache for
// kallsymsKeep; a later miss reads /proc/kallsyms again (100-300 ms). Safe
// for concurrent use.
type kallsyms struct {
	mu    sync.Mutex
	tab   *ksTable
	path  string // where to read the table again after a drop; "" if it cannot be
	cache map[uint64]ksName
	// missAt is the last lookup that needed the table; dropTimer checks it.
	missAt    time.Time
	dropTimer *time.Timer
	keep      time.Duration
	loads     int // tables read, ever (tests)
}

// ksName is a cached answer.
type ksName struct {
	name string
	ok   bool
}

// ksTable holds the text symbols sorted by address; each name is a slice
// of one arena (names[offs[i]:offs[i]+lens[i]]), which stays in file order:
// sorting moves 14 bytes per symbol, never the names.
type ksTable struct {
	addrs []uint64
	offs  []uint32
	lens  []uint16
	names []byte
}

const (
	// kallsymsKeep is how long the table stays in memory after the last
	// lookup that needed it.
	kallsymsKeep = time.Minute
	// maxKallsymsCache bounds the cached answers (~64 bytes each).
	maxKallsymsCache = 8192
)

// parseKallsyms parses "addr type name [module]" lines. Only text symbols are
// kept. It reports ok=false when every address is zero, which is what an
// unprivileged reader (kptr_restrict) sees: names without addresses cannot
// symbolize anything. When r is a file, the table is read from its path
// again after it was dropped.
func parseKallsyms(r io.Reader) (ks *kallsyms, ok bool, err error) {
	tab, ok, err := readKallsyms(r)
	if err != nil || !ok {
		return nil, ok, err
	}
	ks = &kallsyms{tab: tab, cache: map[uint64]ksName{}, keep: kallsymsKeep, loads: 1, missAt: time.Now()}
	if f, isFile := r.(*os.File); isFile {
		ks.path = f.Name()
	}
	ks.scheduleDrop()
	return ks, true, nil
}

// readKallsyms reads the table: straight into its arrays, the names into
// one arena. /proc/kallsyms is mostly in address order (the kernel's
// symbols, then each module's), but BPF programs and modules interleave,
// so the arrays are sorted through a permutation when they must be.
func readKallsyms(r io.Reader) (*ksTable, bool, error) {
	t := &ksTable{}
	var global []bool
	nonZero, sorted := false, true
	// ReadSlice avoids a string per line: the file has over 100k of them.
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		for err == bufio.ErrBufferFull {
			// No real line is that long; skip the rest of it.
			line = nil
			_, err = br.ReadSlice('\n')
		}
		if len(line) > 0 {
			if addr, g, name, ok := parseKallsymsLine(line); ok && len(name) <= 1<<16-1 {
				nonZero = nonZero || addr != 0
				if n := len(t.addrs); n > 0 && addr < t.addrs[n-1] {
					sorted = false
				}
				t.addrs = append(t.addrs, addr)
				t.offs = append(t.offs, uint32(len(t.names)))
				t.lens = append(t.lens, uint16(len(name)))
				t.names = append(t.names, name...)
				global = append(global, g)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, false, fmt.Errorf("read kallsyms: %w", err)
		}
	}
	if !nonZero {
		return nil, false, nil
	}
	if !sorted {
		global = t.sort(global)
	}
	t.dedupe(global)
	return t, true, nil
}

// sort puts the arrays in address order (stable: file order among equal
// addresses) and returns global in the same order.
func (t *ksTable) sort(global []bool) []bool {
	perm := make([]int32, len(t.addrs))
	for i := range perm {
		perm[i] = int32(i)
	}
	slices.SortStableFunc(perm, func(a, b int32) int {
		switch {
		case t.addrs[a] < t.addrs[b]:
			return -1
		case t.addrs[a] > t.addrs[b]:
			return 1
		}
		return 0
	})
	addrs, offs, lens, g := make([]uint64, len(perm)), make([]uint32, len(perm)), make([]uint16, len(perm)), make([]bool, len(perm))
	for i, p := range perm {
		addrs[i], offs[i], lens[i], g[i] = t.addrs[p], t.offs[p], t.lens[p], global[p]
	}
	t.addrs, t.offs, t.lens = addrs, offs, lens
	return g
}

// dedupe keeps one symbol per address: among aliases the first global one,
// else the first. The arrays are compacted and copied to their final size.
func (t *ksTable) dedupe(global []bool) {
	w := 0 // symbols kept
	for i := 0; i < len(t.addrs); {
		j, pick := i, i
		for j < len(t.addrs) && t.addrs[j] == t.addrs[i] {
			if global[j] && !global[pick] {
				pick = j
			}
			j++
		}
		t.addrs[w], t.offs[w], t.lens[w] = t.addrs[i], t.offs[pick], t.lens[pick]
		w++
		i = j
	}
	t.addrs = slices.Clone(t.addrs[:w])
	t.offs = slices.Clone(t.offs[:w])
	t.lens = slices.Clone(t.lens[:w])
	t.names = slices.Clip(t.names) // copying 5 MB to save its growth slack would raise the peak
}

func (t *ksTable) name(i int) []byte {
	return t.names[t.offs[i] : t.offs[i]+uint32(t.lens[i])]
}

// find returns the symbol at or below addr. kallsyms has no sizes, so the
// nearest lower symbol is the best available answer.
func (t *ksTable) find(addr uint64) (string, bool) {
	if t == nil || len(t.addrs) == 0 {
		return "", false
	}
	i, found := slices.BinarySearch(t.addrs, addr)
	if !found {
		i--
	}
	if i < 0 {
		return "", false
	}
	return string(t.name(i)), true // a copy: the arena may be dropped
}

// parseKallsymsLine returns the address, globalness and name of a text
// symbol line.
func parseKallsymsLine(line []byte) (addr uint64, global bool, name []byte, ok bool) {
	a, rest := nextByteField(line)
	t, rest := nextByteField(rest)
	name, _ = nextByteField(rest)
	if len(a) == 0 || len(t) != 1 || len(name) == 0 {
		return 0, false, nil, false
	}
	switch t[0] {
	case 'T', 'W':
		global = true
	case 't', 'w':
	default:
		return 0, false, nil, false
	}
	addr, err := strconv.ParseUint(string(a), 16, 64) // does not allocate
	if err != nil {
		return 0, false, nil, false
	}
	return addr, global, name, true
}

// nextByteField is nextField for bytes, splitting on any ASCII white space.
func nextByteField(b []byte) (field, rest []byte) {
	i := 0
	for i < len(b) && isSpace(b[i]) {
		i++
	}
	j := i
	for j < len(b) && !isSpace(b[j]) {
		j++
	}
	return b[i:j], b[j:]
}

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// lookup returns the symbol at or below addr, from the cache, else from
// the table (read again if it was dropped).
func (k *kallsyms) lookup(addr uint64) (string, bool) {
	if k == nil {
		return "", false
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if c, ok := k.cache[addr]; ok {
		return c.name, c.ok
	}
	if k.tab == nil {
		if !k.reloadLocked() {
			return "", false
		}
	}
	k.missAt = time.Now()
	name, ok := k.tab.find(addr)
	if len(k.cache) >= maxKallsymsCache {
		clear(k.cache)
	}
	k.cache[addr] = ksName{name, ok}
	return name, ok
}

// reloadLocked reads the table again after a drop.
func (k *kallsyms) reloadLocked() bool {
	if k.path == "" {
		return false
	}
	f, err := os.Open(k.path)
	if err != nil {
		return false
	}
	defer f.Close()
	tab, ok, err := readKallsyms(f)
	if err != nil || !ok {
		return false
	}
	k.tab = tab
	k.loads++
	k.scheduleDropLocked()
	return true
}

func (k *kallsyms) scheduleDrop() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.scheduleDropLocked()
}

// scheduleDropLocked arms the timer that drops the table once no lookup
// needed it for keep. A table that cannot be read again is kept.
func (k *kallsyms) scheduleDropLocked() {
	if k.path == "" || k.keep <= 0 {
		return
	}
	if k.dropTimer != nil {
		k.dropTimer.Reset(k.keep)
		return
	}
	k.dropTimer = time.AfterFunc(k.keep, k.maybeDrop)
}

func (k *kallsyms) maybeDrop() {
	k.mu.Lock()
	if k.tab == nil {
		k.mu.Unlock()
		return
	}
	if idle := time.Since(k.missAt); idle < k.keep {
		k.dropTimer.Reset(k.keep - idle)
		k.mu.Unlock()
		return
	}
	k.tab = nil
	k.mu.Unlock()
	// Megabytes just became garbage, once: give them back to the system
	// now rather than when the scavenger gets to them (a collection, a few
	// milliseconds, once per load).
	debug.FreeOSMemory()
}

// loaded reports whether the table is in memory (tests).
func (k *kallsyms) loaded() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.tab != nil
}
