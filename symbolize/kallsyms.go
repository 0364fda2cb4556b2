package symbolize

import (
	"bufio"
	"cmp"
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
// The table is big (a 6.18 kernel has ~120-150k text symbols: ~2 MB of
// entries and ~3-5 MB of names in one arena) and little of it is ever
// asked for: kernel stacks come from the sched probe's sleeps, which keep
// entering the same few hundred functions. So every answer is kept in a
// small cache (names copied out of the arena), and the table itself is
// dropped once no lookup has missed the cache for kallsymsKeep; a later
// miss reads /proc/kallsyms again (20-40 ms of CPU as root here, ~100 ms
// elsewhere), keeping only the answers unless misses come in a burst
// (lookupAll). Safe for concurrent use.
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
	// streamedAt is the last pass over the file for the cache's misses
	// while the table was dropped (lookupAll).
	streamedAt time.Time
	// hint is the size of the table last read: a read again after a drop
	// allocates it at once instead of growing it (growing the arena by
	// appends allocated ~5 times its size, 25 MB of garbage a read).
	hint ksSize
}

// ksName is a cached answer.
type ksName struct {
	name string
	ok   bool
}

// ksTable holds the text symbols sorted by address; each name is a slice
// of one arena (names[off:off+n]), which stays in file order: sorting moves
// 16 bytes per symbol, never the names. Neither holds a pointer, so the
// garbage collector does not scan them.
type ksTable struct {
	ents  []ksEnt
	names []byte
}

type ksEnt struct {
	addr   uint64
	off    uint32
	n      uint16
	global bool
}

// ksSize is how big a table was: symbols and bytes of names.
type ksSize struct{ syms, bytes int }

// defaultKsSize is the first read's guess, a little over this project's
// 6.18 kernel (122k text symbols, 2.9 MB of names): a read that fits does
// not grow its arrays.
var defaultKsSize = ksSize{syms: 128 << 10, bytes: 3 << 20}

const (
	// kallsymsKeep is how long the table stays in memory after the last
	// lookup that needed it. Half a minute: past the first stacks of a
	// target the misses are rare, and one costs a pass over the file
	// (lookupAll) rather than the table's 5 MB for a minute more; misses
	// that come again within it bring the table back.
	kallsymsKeep = 30 * time.Second
	// maxKallsymsCache bounds the cached answers (~64 bytes each).
	maxKallsymsCache = 8192
)

// parseKallsyms parses "addr type name [module]" lines. Only text symbols are
// kept. It reports ok=false when every address is zero, which is what an
// unprivileged reader (kptr_restrict) sees: names without addresses cannot
// symbolize anything. When r is a file, the table is read from its path
// again after it was dropped.
func parseKallsyms(r io.Reader) (ks *kallsyms, ok bool, err error) {
	tab, ok, err := readKallsyms(r, defaultKsSize)
	if err != nil || !ok {
		return nil, ok, err
	}
	ks = &kallsyms{tab: tab, cache: map[uint64]ksName{}, keep: kallsymsKeep, loads: 1, missAt: time.Now(), hint: tab.size()}
	if f, isFile := r.(*os.File); isFile {
		ks.path = f.Name()
	}
	ks.scheduleDrop()
	return ks, true, nil
}

// scanKallsyms calls fn with each symbol line of r (name aliases the
// reader's buffer: copy it to keep it) and says whether any address was
// not 0 (all are 0 under kptr_restrict). ReadSlice avoids a string per
// line: the file has over 100k of them.
func scanKallsyms(r io.Reader, fn func(addr uint64, global bool, name []byte)) (nonZero bool, err error) {
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
				fn(addr, g, name)
			}
		}
		if err == io.EOF {
			return nonZero, nil
		}
		if err != nil {
			return nonZero, err
		}
	}
}

// readKallsyms reads the table: straight into its entries, the names into
// one arena, both allocated at the size of hint. /proc/kallsyms is mostly
// in address order (the kernel's symbols, then each module's), but BPF
// programs and modules interleave, so the entries are sorted in place when
// they must be.
func readKallsyms(r io.Reader, hint ksSize) (*ksTable, bool, error) {
	t := &ksTable{ents: make([]ksEnt, 0, hint.syms), names: make([]byte, 0, hint.bytes)}
	sorted := true
	nonZero, err := scanKallsyms(r, func(addr uint64, g bool, name []byte) {
		if n := len(t.ents); n > 0 && addr < t.ents[n-1].addr {
			sorted = false
		}
		t.ents = append(t.ents, ksEnt{addr: addr, off: uint32(len(t.names)), n: uint16(len(name)), global: g})
		t.names = append(t.names, name...)
	})
	if err != nil {
		return nil, false, fmt.Errorf("read kallsyms: %w", err)
	}
	if !nonZero {
		return nil, false, nil
	}
	if !sorted {
		// Stable: file order among equal addresses, for dedupe.
		slices.SortStableFunc(t.ents, func(a, b ksEnt) int { return cmp.Compare(a.addr, b.addr) })
	}
	t.dedupe()
	return t, true, nil
}

// dedupe keeps one symbol per address: among aliases the first global one,
// else the first. The entries are compacted in place; a table read far
// smaller than its hint is copied to its size (a table that fits its hint
// is kept as it is: copying it would raise the peak).
func (t *ksTable) dedupe() {
	w := 0 // symbols kept
	for i := 0; i < len(t.ents); {
		j, pick := i, i
		for j < len(t.ents) && t.ents[j].addr == t.ents[i].addr {
			if t.ents[j].global && !t.ents[pick].global {
				pick = j
			}
			j++
		}
		t.ents[w] = t.ents[pick]
		w++
		i = j
	}
	t.ents = t.ents[:w]
	if cap(t.ents) > w+w/4+1024 {
		t.ents = slices.Clone(t.ents)
	}
	if n := len(t.names); cap(t.names) > n+n/4+(64<<10) {
		t.names = slices.Clone(t.names)
	}
}

// size is the table's size as a hint for the next read: the symbols and
// names read, before aliases were dropped, and a little room.
func (t *ksTable) size() ksSize {
	n := len(t.ents)
	return ksSize{syms: n + n/8, bytes: len(t.names) + len(t.names)/16}
}

func (t *ksTable) name(i int) []byte {
	e := t.ents[i]
	return t.names[e.off : e.off+uint32(e.n)]
}

// find returns the symbol at or below addr. kallsyms has no sizes, so the
// nearest lower symbol is the best available answer.
func (t *ksTable) find(addr uint64) (string, bool) {
	if t == nil || len(t.ents) == 0 {
		return "", false
	}
	i, found := slices.BinarySearchFunc(t.ents, addr, func(e ksEnt, a uint64) int { return cmp.Compare(e.addr, a) })
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
// the table (lookupAll).
func (k *kallsyms) lookup(addr uint64) (string, bool) {
	var out [1]ksName
	k.lookupAll([]uint64{addr}, out[:])
	return out[0].name, out[0].ok
}

// lookupAll answers every address of addrs into out (as long): from the
// cache, else from the table. With the table dropped, the addresses the
// cache lacks are looked for in one pass over the file (streamKallsyms,
// which keeps nothing but their answers); only when misses come again
// within keep of such a pass (a profile being built, a burst of new
// stacks) is the whole table read back in. A new kernel path of an idle
// target (seen once every minute or two) then costs one pass of the file,
// 20-40 ms, and no memory, rather than 5 MB of table held for keep.
func (k *kallsyms) lookupAll(addrs []uint64, out []ksName) {
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	var miss []uint64
	for i, a := range addrs {
		if c, ok := k.cache[a]; ok {
			out[i] = c
		} else {
			miss = append(miss, a)
		}
	}
	if len(miss) == 0 {
		return
	}
	now := time.Now()
	if k.tab == nil {
		switch {
		case k.path == "":
			return
		case !k.streamedAt.IsZero() && now.Sub(k.streamedAt) < k.keep:
			if !k.reloadLocked() {
				return
			}
		default:
			names, ok := streamKallsyms(k.path, miss)
			if !ok {
				return
			}
			k.streamedAt = now
			k.loads++
			for i, a := range miss {
				k.cacheLocked(a, names[i])
			}
		}
	}
	if k.tab != nil {
		k.missAt = now
		for _, a := range miss {
			name, ok := k.tab.find(a)
			k.cacheLocked(a, ksName{name, ok})
		}
	}
	for i, a := range addrs {
		if out[i] == (ksName{}) {
			out[i] = k.cache[a]
		}
	}
}

func (k *kallsyms) cacheLocked(addr uint64, n ksName) {
	if len(k.cache) >= maxKallsymsCache {
		clear(k.cache)
	}
	k.cache[addr] = n
}

// streamKallsyms answers addrs (the symbol at or below each, as
// ksTable.find does: among aliases the first global one, else the first)
// in one pass over the file at path, keeping nothing of it. The addresses
// are sorted, and each symbol of the file is noted in the bucket of the
// first address at or above it, if it is the highest there so far: the
// answer for an address is the highest symbol of the nearest bucket at or
// below its own. Names are copied into each bucket's buffer only when its
// best changes. ok is false when the file cannot be read or has no
// addresses (kptr_restrict).
func streamKallsyms(path string, addrs []uint64) ([]ksName, bool) {
	f, err := os.Open(path)
	if err != nil {
		return nil, false
	}
	defer f.Close()
	sorted := slices.Clone(addrs)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	type bucket struct {
		addr   uint64
		global bool
		set    bool
		name   []byte
	}
	bs := make([]bucket, len(sorted))
	nonZero, err := scanKallsyms(f, func(addr uint64, g bool, name []byte) {
		if i, _ := slices.BinarySearch(sorted, addr); i < len(bs) {
			b := &bs[i]
			switch {
			case !b.set || addr > b.addr:
				b.addr, b.global, b.set, b.name = addr, g, true, append(b.name[:0], name...)
			case addr == b.addr && g && !b.global:
				b.global, b.name = true, append(b.name[:0], name...)
			}
		}
	})
	if err != nil || !nonZero {
		return nil, false
	}
	// The answer for sorted[i] is the nearest set bucket at or below i.
	ans := make([]ksName, len(sorted))
	var last ksName
	for i := range bs {
		if bs[i].set {
			last = ksName{string(bs[i].name), true}
		}
		ans[i] = last
	}
	out := make([]ksName, len(addrs))
	for i, a := range addrs {
		j, _ := slices.BinarySearch(sorted, a)
		out[i] = ans[j]
	}
	return out, true
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
	tab, ok, err := readKallsyms(f, k.hint)
	if err != nil || !ok {
		return false
	}
	k.tab = tab
	k.hint = tab.size()
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
