package symbolize

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// JIT-compiled code (JavaScript under V8, Java, .NET) has no ELF symbols.
// Runtimes that want profilers to name it write a perf map,
// /tmp/perf-PID.map, one line per code object: "START SIZE name", start and
// size in hex, the rest of the line the name. Entries are only ever
// appended; code that is recompiled or whose memory is reused gets a new
// line, so the newest line covering an address is the one that names it.

const (
	// DefaultMaxPerfMapBytes is the memory all perf maps together may hold
	// when Options.MaxPerfMapBytes is 0. A V8 entry costs about 47 bytes
	// (BenchmarkPerfMapLookup), so this is room for some 700k code objects.
	// A read also needs about three times the new lines' table size while
	// it runs (line buffer, sort, merge), briefly.
	DefaultMaxPerfMapBytes = 32 << 20

	// perfMapRecheck rate-limits, per process, the stat (and read of the
	// new lines) a lookup that misses triggers: a JIT runtime compiles
	// continually, and a miss per sample must not become a read per sample.
	perfMapRecheck = time.Second

	// perfHitRecheck rate-limits the check a lookup that hits makes: V8
	// reuses the addresses of code it collected, and the runtime appends
	// the new code's line, so a hit on a table read before that names the
	// collected function (seen: node's execSync handler named as an
	// OpenTelemetry module's anonymous function). The file's size is
	// checked, and what was appended read, before a hit is trusted; a
	// stack is symbolized at least a poll after its code was compiled, so
	// a check this recent already saw the code's line.
	perfHitRecheck = 20 * time.Millisecond

	// maxPerfName bounds one stored name; longer ones (minified code with
	// a data: URL as its script) keep their beginning, where the function
	// name is.
	maxPerfName = 1024

	// perfLineBuf is the read buffer: a line longer than this is garbage
	// for a perf map and is skipped.
	perfLineBuf = 64 << 10

	// perfLineGuess is a short perf map line, to size buffers from the
	// file's size: V8's average 48 bytes.
	perfLineGuess = 32

	// segBytes is what one range costs in the arrays: start, size, name.
	segBytes = 8 + 4 + 4
	// worstSegs is how many ranges one new line can add at most: its own,
	// and the piece of an older range it splits in two.
	worstSegs = 2
	// nameEnd terminates each name in the arena; no name contains it.
	nameEnd = '\n'
)

// perfMap is the JIT symbol table of one process. Ranges are disjoint and
// sorted: overlapping lines were resolved when they were read, each address
// keeping the newest line that covered it. Names live in one string, so a
// lookup allocates nothing and the table is four allocations however many
// entries it has.
type perfMap struct {
	starts []uint64
	sizes  []uint32
	names  []uint32 // offset of the range's name in arena, ended by nameEnd
	arena  string

	// offset is how much of the file has been read: complete lines only,
	// so a line the runtime is still writing is read whole next time.
	offset    int64
	dev, ino  uint64
	truncated bool // reading stopped at the byte limit
	lines     int  // lines taken
	bad       int  // lines skipped as malformed
}

// bytes is the memory the table holds.
func (pm *perfMap) bytes() int64 {
	if pm == nil {
		return 0
	}
	return int64(8*cap(pm.starts) + 4*cap(pm.sizes) + 4*cap(pm.names) + len(pm.arena))
}

// lookup returns the raw name of the code covering pc.
func (pm *perfMap) lookup(pc uint64) (string, bool) {
	if pm == nil {
		return "", false
	}
	i, found := slices.BinarySearch(pm.starts, pc)
	if !found {
		i--
	}
	if i < 0 || pc-pm.starts[i] >= uint64(pm.sizes[i]) {
		return "", false
	}
	return pm.name(pm.names[i]), true
}

func (pm *perfMap) name(off uint32) string {
	s := pm.arena[off:]
	if i := strings.IndexByte(s, nameEnd); i >= 0 {
		return s[:i]
	}
	return s
}

// perfEntry is one line as read, before overlaps are resolved.
type perfEntry struct {
	start uint64
	size  uint32
	name  uint32 // offset in the batch's name buffer
	seq   int    // line order: a higher seq is newer
}

// errPerfMapLimit stops a read that reached its byte limit.
var errPerfMapLimit = errors.New("perf map byte limit reached")

// read appends the complete lines of r (positioned at pm.offset) to the
// table, keeping the table's memory within limit bytes. At the limit it
// stops before the line that does not fit and sets truncated; the lines
// after it stay unread. hint is how many bytes r probably holds: growing
// the buffers by append would allocate five times what they end up as.
func (pm *perfMap) read(r io.Reader, hint, limit int64) error {
	br := bufio.NewReaderSize(r, perfLineBuf)
	hint = max(0, min(hint, limit))
	var (
		batch   = make([]perfEntry, 0, hint/perfLineGuess)
		names   = make([]byte, 0, hint)
		pending []byte // a line read but not yet taken
		cost    int64  // worst-case bytes the batch adds
		eof     bool
	)
	flush := func() {
		if len(batch) > 0 {
			pm.merge(batch, names)
			batch, names, cost = batch[:0], names[:0], 0
		}
	}
	for {
		line := pending
		pending = nil
		if line == nil && !eof {
			var err error
			line, err = readLine(br)
			switch {
			case errors.Is(err, io.EOF):
				eof = true
			case errors.Is(err, bufio.ErrBufferFull):
				// A line no runtime writes: skip it whole, then go on.
				n, ferr := discardLine(br)
				if ferr != nil {
					// It is still being written: read it again next time.
					eof = true
					line = nil
					break
				}
				pm.offset += int64(len(line)) + n
				pm.bad++
				continue
			case err != nil:
				flush()
				return fmt.Errorf("read perf map: %w", err)
			}
		}
		if line == nil {
			flush()
			return nil
		}
		e, name, ok := parsePerfLine(line)
		if !ok {
			pm.offset += int64(len(line))
			pm.bad++
			continue
		}
		need := int64(worstSegs*segBytes + len(name) + 1)
		if pm.bytes()+cost+need > limit {
			if len(batch) > 0 {
				// The batch's real cost is known only once merged; it is
				// usually half the worst case, so there may be room still.
				flush()
				pending = line
				continue
			}
			pm.truncated = true
			return errPerfMapLimit
		}
		e.name = uint32(len(names))
		e.seq = len(batch)
		names = append(names, name...)
		names = append(names, nameEnd)
		batch = append(batch, e)
		cost += need
		pm.offset += int64(len(line))
		pm.lines++
	}
}

// readLine returns the next line with its '\n', or io.EOF with no line when
// only a partial line (still being written) or nothing is left.
func readLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if errors.Is(err, io.EOF) {
		return nil, io.EOF
	}
	if errors.Is(err, bufio.ErrBufferFull) {
		return slices.Clone(line), err
	}
	return line, err
}

// discardLine skips to after the next '\n' and says how many bytes that
// was; io.EOF when there is none.
func discardLine(br *bufio.Reader) (int64, error) {
	var n int64
	for {
		chunk, err := br.ReadSlice('\n')
		n += int64(len(chunk))
		if err == nil {
			return n, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return n, fmt.Errorf("skip long perf map line: %w", err)
		}
	}
}

// parsePerfLine parses "START SIZE name\n". Sizes past 4 GiB and ranges
// that wrap are garbage: no runtime emits code objects that large.
func parsePerfLine(line []byte) (perfEntry, []byte, bool) {
	line = bytes.TrimLeft(bytes.TrimRight(line, "\r\n"), " ")
	startField, rest, ok := bytes.Cut(line, []byte{' '})
	if !ok {
		return perfEntry{}, nil, false
	}
	sizeField, name, ok := bytes.Cut(bytes.TrimLeft(rest, " "), []byte{' '})
	if !ok {
		return perfEntry{}, nil, false
	}
	start, ok := parseHex(startField)
	if !ok {
		return perfEntry{}, nil, false
	}
	size, ok := parseHex(sizeField)
	if !ok || size == 0 || size > 1<<32-1 || start+size < start {
		return perfEntry{}, nil, false
	}
	name = bytes.TrimSpace(name)
	if len(name) == 0 || bytes.IndexByte(name, 0) >= 0 {
		return perfEntry{}, nil, false
	}
	if len(name) > maxPerfName {
		name = name[:maxPerfName]
	}
	return perfEntry{start: start, size: uint32(size)}, name, true
}

// parseHex parses a hex number with an optional 0x. It is written out
// because strconv would copy every field of every line to a string.
func parseHex(b []byte) (uint64, bool) {
	if len(b) > 2 && b[0] == '0' && (b[1] == 'x' || b[1] == 'X') {
		b = b[2:]
	}
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint64(c)
	}
	return v, true
}

// segs is a list of disjoint ranges sorted by start.
type segs struct {
	starts []uint64
	sizes  []uint32
	names  []uint32
}

func (s *segs) add(start, end uint64, name uint32) {
	if n := len(s.starts); n > 0 && s.names[n-1] == name && s.starts[n-1]+uint64(s.sizes[n-1]) == start {
		s.sizes[n-1] += uint32(end - start) // a range split by nothing
		return
	}
	s.starts = append(s.starts, start)
	s.sizes = append(s.sizes, uint32(end-start))
	s.names = append(s.names, name)
}

func (s *segs) end(i int) uint64 { return s.starts[i] + uint64(s.sizes[i]) }

// merge adds a batch of new lines, newer than everything in the table:
// where a new line covers an old range, the old range loses that part.
func (pm *perfMap) merge(batch []perfEntry, names []byte) {
	base := uint32(len(pm.arena))
	fresh := flatten(batch, base)
	old := segs{pm.starts, pm.sizes, pm.names}
	out := overlay(old, fresh)
	pm.arena += string(names)
	pm.starts, pm.sizes, pm.names = out.starts, out.sizes, out.names
	pm.compact()
	// The slices grew by append; the budget counts capacity, so drop the
	// slack when it is worth a copy.
	if c := cap(pm.starts); c > len(pm.starts)+len(pm.starts)/8 {
		pm.starts, pm.sizes, pm.names = slices.Clone(pm.starts), slices.Clone(pm.sizes), slices.Clone(pm.names)
	}
}

// flatten resolves overlaps among one batch: every address gets the newest
// line covering it. A sweep over the lines sorted by start keeps the lines
// covering the current address in a heap by age; a range ends where a
// newer line starts or where the newest one ends.
func flatten(batch []perfEntry, base uint32) segs {
	sorted := slices.Clone(batch)
	slices.SortFunc(sorted, func(a, b perfEntry) int {
		if c := cmp.Compare(a.start, b.start); c != 0 {
			return c
		}
		return cmp.Compare(a.seq, b.seq)
	})
	out := segs{
		starts: make([]uint64, 0, len(sorted)),
		sizes:  make([]uint32, 0, len(sorted)),
		names:  make([]uint32, 0, len(sorted)),
	}
	var active newestFirst
	i := 0
	var cur uint64
	for i < len(sorted) || len(active) > 0 {
		if len(active) == 0 {
			cur = sorted[i].start
		}
		for i < len(sorted) && sorted[i].start <= cur {
			active.push(sorted[i])
			i++
		}
		for len(active) > 0 && active[0].start+uint64(active[0].size) <= cur {
			active.pop()
		}
		if len(active) == 0 {
			continue
		}
		w := active[0]
		next := w.start + uint64(w.size)
		if i < len(sorted) && sorted[i].start < next {
			next = sorted[i].start
		}
		out.add(cur, next, base+w.name)
		cur = next
	}
	return out
}

// newestFirst is a binary heap of lines, the newest at [0]. It is written
// out rather than built on container/heap, whose interface would box every
// line pushed.
type newestFirst []perfEntry

func (h *newestFirst) push(e perfEntry) {
	*h = append(*h, e)
	a := *h
	for i := len(a) - 1; i > 0; {
		p := (i - 1) / 2
		if a[p].seq >= a[i].seq {
			break
		}
		a[p], a[i] = a[i], a[p]
		i = p
	}
}

func (h *newestFirst) pop() {
	a := *h
	n := len(a) - 1
	a[0] = a[n]
	a = a[:n]
	for i := 0; ; {
		l, r, top := 2*i+1, 2*i+2, i
		if l < n && a[l].seq > a[top].seq {
			top = l
		}
		if r < n && a[r].seq > a[top].seq {
			top = r
		}
		if top == i {
			break
		}
		a[i], a[top] = a[top], a[i]
		i = top
	}
	*h = a
}

// overlay lays fresh ranges over old ones: both are disjoint and sorted,
// and fresh wins where they meet. done is the address below which the
// output is final, so the output stays sorted.
func overlay(old, fresh segs) segs {
	if len(old.starts) == 0 {
		return fresh
	}
	n := len(old.starts) + len(fresh.starts)
	out := segs{make([]uint64, 0, n), make([]uint32, 0, n), make([]uint32, 0, n)}
	var done uint64
	i, j := 0, 0
	for i < len(old.starts) || j < len(fresh.starts) {
		if i < len(old.starts) {
			lo, hi := max(old.starts[i], done), old.end(i)
			if hi <= lo {
				i++ // entirely covered by fresh ranges already out
				continue
			}
			if j == len(fresh.starts) || lo < fresh.starts[j] {
				end := hi
				if j < len(fresh.starts) {
					end = min(hi, fresh.starts[j])
				}
				out.add(lo, end, old.names[i])
				done = end
				if end == hi {
					i++
				}
				continue
			}
		}
		out.add(fresh.starts[j], fresh.end(j), fresh.names[j])
		done = fresh.end(j)
		j++
	}
	return out
}

// compact rebuilds the arena when names no range refers to any more
// (code recompiled over) take more room than the live ones.
func (pm *perfMap) compact() {
	live := 0
	for i, off := range pm.names {
		if i > 0 && pm.names[i-1] == off {
			continue
		}
		live += len(pm.name(off)) + 1
	}
	if len(pm.arena) <= 2*live+4096 {
		return
	}
	var b strings.Builder
	b.Grow(live)
	moved := make(map[uint32]uint32, len(pm.names))
	for i, off := range pm.names {
		if n, ok := moved[off]; ok {
			pm.names[i] = n
			continue
		}
		n := uint32(b.Len())
		b.WriteString(pm.name(off))
		b.WriteByte(nameEnd)
		moved[off] = n
		pm.names[i] = n
	}
	pm.arena = b.String()
}

// perfState is the perf map of one process as the symbolizer tracks it.
type perfState struct {
	m       *perfMap // nil until read, or after eviction
	bytes   int64    // m's size as counted in Symbolizer.perfBytes
	path    string   // "" until the process's PID namespace was read
	checked time.Time
	used    time.Time
	warned  bool
}

// perfPath is where process pid's perf map is seen from here: the runtime
// names it with its PID in its own PID namespace and writes it into its own
// mount namespace's /tmp.
func perfPath(procRoot string, pid int) (string, error) {
	status := filepath.Join(procRoot, strconv.Itoa(pid), "status")
	data, err := os.ReadFile(status)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", status, err)
	}
	nspid := strconv.Itoa(pid)
	for line := range strings.Lines(string(data)) {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				nspid = f[len(f)-1]
			}
			break
		}
	}
	return filepath.Join(procRoot, strconv.Itoa(pid), "root", "tmp", "perf-"+nspid+".map"), nil
}

// jitLocked names pc from process pid's perf map, reading it on the first
// miss and again, at most once per perfMapRecheck, when a miss finds the
// file grown; a hit reads what was appended (at most once per
// perfHitRecheck) before it is trusted.
func (s *Symbolizer) jitLocked(pid int, pc uint64, now time.Time) (string, bool) {
	if s.maxPerfBytes < 0 {
		return "", false
	}
	ps := s.perf[pid]
	if ps == nil {
		ps = &perfState{}
		s.perf[pid] = ps
	}
	ps.used = now
	if name, ok := ps.m.lookup(pc); ok {
		if now.Sub(ps.checked) < perfHitRecheck {
			return name, true
		}
		ps.checked = now
		if err := s.loadPerfMapLocked(pid, ps); err != nil {
			s.log.Debug("symbolize: perf map", "pid", pid, "err", err)
		}
		if name, ok := ps.m.lookup(pc); ok {
			return name, true
		}
		return "", false
	}
	if !ps.checked.IsZero() && now.Sub(ps.checked) < perfMapRecheck {
		return "", false
	}
	ps.checked = now
	if err := s.loadPerfMapLocked(pid, ps); err != nil {
		s.log.Debug("symbolize: perf map", "pid", pid, "err", err)
	}
	return ps.m.lookup(pc)
}

// loadPerfMapLocked reads what was appended to pid's perf map since the
// last read, or the whole file when it is new or was replaced.
func (s *Symbolizer) loadPerfMapLocked(pid int, ps *perfState) error {
	if ps.path == "" {
		p, err := perfPath(s.procRoot, pid)
		if err != nil {
			return err
		}
		ps.path = p
	}
	f, err := os.Open(ps.path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			s.setPerfMapLocked(ps, nil) // gone: the process exited or restarted
		}
		return fmt.Errorf("open perf map: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat %s: %w", ps.path, err)
	}
	var dev, ino uint64
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		dev, ino = st.Dev, st.Ino
	}
	pm := ps.m
	if pm == nil || pm.dev != dev || pm.ino != ino || fi.Size() < pm.offset {
		pm = &perfMap{dev: dev, ino: ino}
	} else if pm.truncated || fi.Size() == pm.offset {
		return nil // nothing new, or nothing more it may hold
	}
	for {
		// read buffers ahead: each pass starts again after the last line
		// it took.
		if _, serr := f.Seek(pm.offset, io.SeekStart); serr != nil {
			err = fmt.Errorf("seek: %w", serr)
			break
		}
		// What this process's table holds now is either replaced or grown
		// by the read, so it is not part of what the others hold.
		room := s.maxPerfBytes - (s.perfBytes - ps.bytes)
		err = pm.read(f, fi.Size()-pm.offset, room)
		if !errors.Is(err, errPerfMapLimit) || !s.evictPerfMapLocked(ps) {
			break
		}
		// Another process's table made room; go on where reading stopped.
		pm.truncated = false
	}
	s.setPerfMapLocked(ps, pm)
	switch {
	case errors.Is(err, errPerfMapLimit):
		if !ps.warned {
			ps.warned = true
			s.log.Warn("symbolize: perf map larger than profiling.max_perf_map_bytes: read stopped there; JIT code compiled later stays unnamed",
				"pid", pid, "path", ps.path, "read_bytes", pm.offset, "file_bytes", fi.Size(), "limit", s.maxPerfBytes)
		}
		return nil
	case err != nil:
		return fmt.Errorf("%s: %w", ps.path, err)
	}
	s.log.Debug("symbolize: perf map read", "pid", pid, "path", ps.path, "lines", pm.lines, "bad", pm.bad, "ranges", len(pm.starts), "bytes", pm.bytes())
	return nil
}

// setPerfMapLocked sets ps's table, which may be the same one grown, and
// keeps the total in step.
func (s *Symbolizer) setPerfMapLocked(ps *perfState, pm *perfMap) {
	n := pm.bytes()
	s.perfBytes += n - ps.bytes
	ps.m, ps.bytes = pm, n
}

// evictPerfMapLocked drops the least recently used table other than
// keep's, so that keep's may grow. It reports false when there is none.
func (s *Symbolizer) evictPerfMapLocked(keep *perfState) bool {
	var victim *perfState
	for _, ps := range s.perf {
		if ps != keep && ps.m != nil && (victim == nil || ps.used.Before(victim.used)) {
			victim = ps
		}
	}
	if victim == nil {
		return false
	}
	s.setPerfMapLocked(victim, nil)
	victim.checked = time.Time{} // read again on its next miss
	return true
}

// dropPerfLocked forgets pid's perf map, for a process gone or forgotten.
func (s *Symbolizer) dropPerfLocked(pid int) {
	if ps := s.perf[pid]; ps != nil {
		s.setPerfMapLocked(ps, nil)
		delete(s.perf, pid)
	}
}

// V8 prefixes each name with the kind of code. These kinds are JavaScript
// functions; the rest (Builtin, BytecodeHandler, Stub, Handler, RegExp...)
// are the engine's own code and keep their name as V8 wrote it.
var v8JSKinds = map[string]string{
	"JS":          "(anonymous)",
	"LazyCompile": "(anonymous)",
	"Function":    "(anonymous)",
	"Script":      "(script)",
	"Eval":        "(eval)",
}

// jitFunc turns a perf map name into a function and its source location.
// V8 writes "JS:*name /app/x.js:12:20": kind, tier marker (* optimized,
// ~ interpreted, ^ baseline, + Maglev), the function's name, and where its
// definition starts. That becomes name, /app/x.js, 12. Names of other
// runtimes (Java, .NET) and the engine's own code are kept as written.
func jitFunc(raw string) (fn, file string, line int) {
	kind, rest, ok := strings.Cut(raw, ":")
	anon, js := v8JSKinds[kind]
	if !ok || !js {
		return raw, "", 0
	}
	rest = strings.TrimLeft(rest, "*~^+")
	// The location is the last field: "file:line:col". Function names may
	// hold spaces ("get foo"), so the name is everything before it.
	name, loc := "", rest
	if i := strings.LastIndexByte(rest, ' '); i >= 0 {
		name, loc = strings.TrimSpace(rest[:i]), rest[i+1:]
	}
	file, line, ok = splitLocation(loc)
	if !ok {
		name, file, line = strings.TrimSpace(rest), "", 0
	}
	if name == "" {
		name = anon
	}
	return name, file, line
}

// splitLocation splits "file:line:col" and drops the file:// scheme, which
// ES modules have, so a location reads the same as a CommonJS one.
func splitLocation(loc string) (file string, line int, ok bool) {
	i := strings.LastIndexByte(loc, ':')
	if i < 0 {
		return "", 0, false
	}
	if _, err := strconv.Atoi(loc[i+1:]); err != nil {
		return "", 0, false
	}
	j := strings.LastIndexByte(loc[:i], ':')
	if j < 0 { // j == 0: code with no script name (new Function)
		return "", 0, false
	}
	line, err := strconv.Atoi(loc[j+1 : i])
	if err != nil {
		return "", 0, false
	}
	return strings.TrimPrefix(loc[:j], "file://"), line, true
}
