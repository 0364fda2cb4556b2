package symbolize

import (
	"bytes"
	"container/list"
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/culprit-dev/culprit/internal/readbuf"
)

// Options configures a Symbolizer.
type Options struct {
	ProcRoot string // "/proc" by default; tests may point elsewhere
	MaxFiles int    // bound on cached parsed ELF files (default 64); evict LRU
	// MaxPerfMapBytes bounds the memory of the JIT symbols read from all
	// processes' perf maps together (0: DefaultMaxPerfMapBytes; negative:
	// perf maps are not read).
	MaxPerfMapBytes int64
	Log             *slog.Logger // may be nil
}

// Frame is one symbolized stack address.
type Frame struct {
	Addr   uint64
	Func   string // "" when unknown; then callers print Module+offset
	File   string // best effort (Go binaries via .gopclntab), else ""
	Line   int
	Module string // path of the mapped file, "[kernel]" for kernel frames, "[anon]" for anonymous memory
	Offset uint64 // file offset of Addr in Module (for the pprof Mapping); offset in the region for "[anon]"
	// JIT is set when Func comes from the process's perf map: code a
	// runtime compiled (JavaScript under V8, Java, .NET), not an ELF
	// symbol. For JavaScript, Func is the function's name ("(anonymous)"
	// when it has none) and File:Line where its definition starts; the
	// engine's own code keeps V8's kind prefix ("Builtin:ArrayPrototypePush",
	// "BytecodeHandler:LdaZero", "Stub:...", "RegExp:...").
	JIT bool
}

const (
	kernelModule = "[kernel]"
	// anonModule is anonymous executable memory: code a runtime generated.
	anonModule = "[anon]"
)

// String returns the function name, else module+offset, else the address.
// A JIT frame with a source file reads "name (file:line)", the way Node.js
// prints its stack traces: JavaScript names alone are often ambiguous
// (handler, (anonymous)).
func (f Frame) String() string {
	switch {
	case f.JIT && f.File != "" && f.Line > 0:
		return fmt.Sprintf("%s (%s:%d)", f.Func, f.File, f.Line)
	case f.JIT && f.File != "":
		return fmt.Sprintf("%s (%s)", f.Func, f.File)
	case f.Func != "":
		return f.Func
	case f.Module != "" && f.Module != kernelModule:
		return fmt.Sprintf("%s+0x%x", filepath.Base(f.Module), f.Offset)
	}
	return fmt.Sprintf("0x%x", f.Addr)
}

const (
	defaultMaxFiles = 64
	defaultMaxPids  = 256
	// Long enough that one profile build reads each process's maps once,
	// short enough that unmapped and remapped libraries are noticed soon.
	defaultMapsTTL = 5 * time.Second
	// Reading kallsyms costs about 100 ms; retrying a failed read on
	// every stack would cost more than the symbols are worth.
	defaultKallsymsRetry = 10 * time.Second
)

// Symbolizer resolves user and kernel addresses. It is safe for concurrent
// use.
type Symbolizer struct {
	procRoot string
	maxFiles int
	maxPids  int
	mapsTTL  time.Duration
	log      *slog.Logger
	now      func() time.Time

	mu    sync.Mutex
	pids  map[int]*procMaps
	files map[fileKey]*fileEntry
	lru   *list.List // of *fileEntry, front = most recently used
	// sweep evicts the files no lookup used for fileKeep (sweepFiles);
	// armed while the cache holds any.
	sweep      *time.Timer
	sweepArmed bool
	fileKeep   time.Duration

	// perf holds the perf maps of processes with JIT code, at most one per
	// pid of pids; perfBytes is their memory, bounded by maxPerfBytes.
	perf         map[int]*perfState
	perfBytes    int64
	maxPerfBytes int64

	mapsBuf []byte // readMapsLocked's, under mu

	vdsoOnce sync.Once
	vdso     *elfFile

	kmu           sync.Mutex
	ksyms         *kallsyms
	kTried        time.Time
	kallsymsRetry time.Duration
}

type procMaps struct {
	maps   []mapping
	objs   []object // parallel to maps, resolved lazily
	loaded time.Time
	used   time.Time
	sum    uint64 // maphash of the maps file as read
}

// mapsSeed hashes maps files (procMaps.sum).
var mapsSeed = maphash.MakeSeed()

// readMapsLocked reads /proc/PID/maps into the symbolizer's buffer, valid
// until the next call.
func (s *Symbolizer) readMapsLocked(pid int) ([]byte, error) {
	b, err := readbuf.File(filepath.Join(s.procRoot, strconv.Itoa(pid), "maps"), &s.mapsBuf)
	if err != nil {
		return nil, err
	}
	return b, nil
}

// object is the file behind one mapping. It points into the file cache
// rather than at the parsed file, so that eviction really frees the memory
// even while the process's maps stay cached.
type object struct {
	tried bool
	vdso  bool
	entry *fileEntry // nil when no file could be opened
}

type fileKey struct {
	dev, ino uint64
	size     int64
	mtime    int64
}

type fileEntry struct {
	key     fileKey
	file    *elfFile // nil caches a failure, so a bad file is parsed once
	elem    *list.Element
	evicted bool
	used    bool // since the last sweep
}

// fileKeep is how long a parsed file stays cached with no lookup in it.
// A file holds its symbols, line tables and unwind tables (a python
// target's executable, libpython and libc: ~2 MB); once the target's
// stacks are known (the sched probe keeps the text of each thread's sleep
// sites) nothing may look there for long, and the tables would stay for
// the agent's life. Not much shorter: reading them again costs 30-50 ms of
// CPU and allocates ~5 MB (measured, python), and even an idle target is
// sampled by the CPU profiler or sleeps somewhere new every minute or two
// (with a minute, the files of the footprint benchmark's target were read
// again every other minute).
const fileKeep = 10 * time.Minute

// New returns a Symbolizer with defaults filled in.
func New(o Options) *Symbolizer {
	s := &Symbolizer{
		procRoot:      o.ProcRoot,
		maxFiles:      o.MaxFiles,
		maxPids:       defaultMaxPids,
		mapsTTL:       defaultMapsTTL,
		log:           o.Log,
		now:           time.Now,
		pids:          make(map[int]*procMaps),
		files:         make(map[fileKey]*fileEntry),
		lru:           list.New(),
		perf:          make(map[int]*perfState),
		maxPerfBytes:  o.MaxPerfMapBytes,
		kallsymsRetry: defaultKallsymsRetry,
		fileKeep:      fileKeep,
	}
	if s.maxPerfBytes == 0 {
		s.maxPerfBytes = DefaultMaxPerfMapBytes
	}
	if s.procRoot == "" {
		s.procRoot = "/proc"
	}
	if s.maxFiles <= 0 {
		s.maxFiles = defaultMaxFiles
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// resolved is a Frame plus what a pprof Mapping needs.
type resolved struct {
	Frame
	// code is false for an address in no executable mapping and in no
	// perf map entry: no code lives there, so a stack walk that reached
	// it had left the stack (frame pointers through code without them).
	code                        bool
	mapped                      bool
	mapStart, mapEnd, mapOffset uint64
	buildID                     string
}

// callState is shared by the lookups of one call: maps are re-read at most
// once per pid per call, and the clock is read once (it is slow on some
// VMs and would otherwise dominate cached lookups).
type callState struct {
	now    time.Time
	reread map[int]bool
}

// User symbolizes addrs of process pid, leaf first as bpf_get_stackid
// returns them. The result has the same length as addrs; unknown addresses
// keep only Addr (and Module/Offset when they fall in a mapped file). For
// a walked stack, whose frames must never include addresses where no code
// is, use UserStack.
func (s *Symbolizer) User(pid int, addrs []uint64) []Frame {
	st := &callState{now: s.now()}
	out := make([]Frame, len(addrs))
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, a := range addrs {
		out[i] = s.resolveUserLocked(pid, a, i == 0, st).Frame
	}
	return out
}

// UserStack symbolizes a user stack of process pid, leaf first as
// bpf_get_stackid returns it, and ends it at the first address where no
// code is: one in no executable mapping of the process and in no entry of
// its perf map (and at a zero, an unused slot). A frame-pointer walk that
// meets code built without frame pointers reads a saved register or data
// as the next return address (0x2e71800000000000): that frame and every
// one after it are garbage, so they are dropped rather than shown. Frames
// in executable memory without a symbol stay (module+0xoffset, or
// [anon]+0xoffset for generated code): that much is known to be code.
// The result is at most as long as addrs and may be empty.
func (s *Symbolizer) UserStack(pid int, addrs []uint64) []Frame {
	st := &callState{now: s.now()}
	out := make([]Frame, 0, len(addrs))
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, a := range addrs {
		r := s.resolveUserLocked(pid, a, i == 0, st)
		if !r.code {
			break
		}
		out = append(out, r.Frame)
	}
	return out
}

// Forget drops the cached maps and perf map of pid, for callers that know
// it exited or exec'd.
func (s *Symbolizer) Forget(pid int) {
	s.mu.Lock()
	delete(s.pids, pid)
	s.dropPerfLocked(pid)
	s.mu.Unlock()
}

// lookupAddr is the address to resolve the function from. Every frame but
// the leaf holds a return address, which may already be the first
// instruction of the next function or line.
func lookupAddr(addr uint64, leaf bool) uint64 {
	if leaf || addr == 0 {
		return addr
	}
	return addr - 1
}

func (s *Symbolizer) resolveUser(pid int, addr uint64, leaf bool, st *callState) resolved {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resolveUserLocked(pid, addr, leaf, st)
}

func (s *Symbolizer) resolveUserLocked(pid int, addr uint64, leaf bool, st *callState) resolved {
	r := resolved{Frame: Frame{Addr: addr}}
	if addr == 0 {
		return r
	}
	pc := lookupAddr(addr, leaf)
	pm := s.procMapsLocked(pid, false, st.now)
	idx := findMapping(pm.maps, pc)
	if idx < 0 && !st.reread[pid] {
		// A miss may be a library dlopen'ed or a JIT region created since
		// the maps were read.
		if st.reread == nil {
			st.reread = make(map[int]bool)
		}
		st.reread[pid] = true
		pm = s.procMapsLocked(pid, true, st.now)
		idx = findMapping(pm.maps, pc)
	}
	if idx < 0 {
		// No code is mapped there now, but a runtime may have freed code
		// its perf map still names. A process without maps is gone, and
		// its perf map with it.
		if len(pm.maps) > 0 {
			s.jitFrameLocked(pid, pc, &r, st)
		}
		return r
	}
	r.code = true
	m := pm.maps[idx]
	r.mapped = true
	r.mapStart, r.mapEnd, r.mapOffset = m.Start, m.End, m.Offset
	r.Module = m.Path
	r.Offset = max(addr, m.Start) - m.Start + m.Offset
	if m.Path == "" {
		// No file: the offset in the region is all there is to tell two
		// unnamed frames apart.
		r.Module, r.Offset = anonModule, max(addr, m.Start)-m.Start
	}
	if isFileBacked(m) {
		if ef := s.objectLocked(pid, pm, idx); ef != nil {
			r.buildID = ef.buildID
			if vaddr, err := ef.vaddr(pc - m.Start + m.Offset); err == nil {
				r.Func, r.File, r.Line = ef.lookup(vaddr)
			}
		}
	}
	if r.Func == "" {
		// Generated code lives in anonymous memory, but V8 also names the
		// builtins embedded in its binary, and .NET maps its JIT code
		// from a memfd: any code without an ELF name may be in the map.
		s.jitFrameLocked(pid, pc, &r, st)
	}
	return r
}

// jitFrameLocked names r from pid's perf map, if it has pc.
func (s *Symbolizer) jitFrameLocked(pid int, pc uint64, r *resolved, st *callState) {
	name, ok := s.jitLocked(pid, pc, st.now)
	if !ok {
		return
	}
	r.code, r.JIT = true, true
	r.Func, r.File, r.Line = jitFunc(name)
}

// procMapsLocked returns the cached maps of pid, re-reading them when stale
// or when force is set. Unreadable maps (the process exited) are empty.
func (s *Symbolizer) procMapsLocked(pid int, force bool, now time.Time) *procMaps {
	pm := s.pids[pid]
	if pm != nil && !force && now.Sub(pm.loaded) < s.mapsTTL {
		pm.used = now
		return pm
	}
	data, err := s.readMapsLocked(pid)
	sum := maphash.Bytes(mapsSeed, data)
	if err == nil && pm != nil && pm.sum == sum && len(pm.maps) > 0 {
		// Unchanged since the last read (a process that maps no new code
		// after its start, the usual case): the parsed maps and the files
		// resolved for them stand. A profile of a busy thread reads the
		// maps every mapsTTL; parsing them was most of what it allocated.
		pm.loaded, pm.used = now, now
		return pm
	}
	if err != nil {
		// Cached as empty, so that a stack of an exited process costs one
		// failed read rather than one per frame.
		s.log.Debug("symbolize: read maps", "pid", pid, "err", err)
		// Its JIT code went with it.
		s.dropPerfLocked(pid)
	}
	maps := parseMaps(data)
	npm := &procMaps{maps: maps, objs: make([]object, len(maps)), loaded: now, used: now, sum: sum}
	if pm != nil {
		// Keep files already resolved for unchanged mappings, so a re-read
		// costs no re-open.
		for i, m := range maps {
			if j := findMapping(pm.maps, m.Start); j >= 0 && pm.maps[j] == m {
				npm.objs[i] = pm.objs[j]
			}
		}
	}
	s.pids[pid] = npm
	s.evictPidsLocked()
	return npm
}

func (s *Symbolizer) evictPidsLocked() {
	for len(s.pids) > s.maxPids {
		oldest, first := 0, true
		var t time.Time
		for pid, pm := range s.pids {
			if first || pm.used.Before(t) {
				oldest, t, first = pid, pm.used, false
			}
		}
		delete(s.pids, oldest)
		s.dropPerfLocked(oldest)
	}
}

func (s *Symbolizer) objectLocked(pid int, pm *procMaps, idx int) *elfFile {
	o := &pm.objs[idx]
	if o.tried {
		switch {
		case o.vdso:
			return s.vdsoFile()
		case o.entry == nil:
			return nil
		case !o.entry.evicted:
			s.lru.MoveToFront(o.entry.elem)
			o.entry.used = true
			return o.entry.file
		}
		// Evicted meanwhile: open it again.
	}
	o.tried = true
	m := pm.maps[idx]
	if m.Path == "[vdso]" {
		o.vdso = true
		return s.vdsoFile()
	}
	if isPseudoPath(m.Path) {
		return nil
	}
	e, err := s.openLocked(pid, m)
	if err != nil {
		s.log.Debug("symbolize: open mapped file", "pid", pid, "path", m.Path, "err", err)
	}
	o.entry = e
	if e == nil {
		return nil
	}
	return e.file
}

// openLocked finds the file behind mapping m and parses it through the
// cache. The target may live in another mount namespace, so its root comes
// first; a file replaced or deleted since it was mapped no longer matches
// the inode in maps, and map_files still reaches the mapped one.
func (s *Symbolizer) openLocked(pid int, m mapping) (*fileEntry, error) {
	pidDir := filepath.Join(s.procRoot, strconv.Itoa(pid))
	candidates := []string{
		filepath.Join(pidDir, "root", m.Path),
		m.Path,
		filepath.Join(pidDir, "map_files", fmt.Sprintf("%x-%x", m.Start, m.End)),
	}
	if m.Deleted {
		candidates[0], candidates[2] = candidates[2], candidates[0]
	}
	var (
		fallback    *os.File
		fallbackKey fileKey
		errs        []error
	)
	defer func() {
		if fallback != nil {
			fallback.Close()
		}
	}()
	for _, p := range candidates {
		f, key, err := openStat(p)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if m.Inode == 0 || key.ino == m.Inode {
			defer f.Close()
			return s.parseCachedLocked(f, key)
		}
		if fallback == nil {
			fallback, fallbackKey = f, key
		} else {
			f.Close()
		}
	}
	if fallback != nil {
		// Some filesystems (overlayfs) report different inodes in maps and
		// stat; a file at the right path beats no symbols.
		return s.parseCachedLocked(fallback, fallbackKey)
	}
	return nil, errors.Join(errs...)
}

func openStat(path string) (*os.File, fileKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fileKey{}, fmt.Errorf("open: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fileKey{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fileKey{}, fmt.Errorf("%s is not a regular file", path)
	}
	key := fileKey{size: fi.Size(), mtime: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		key.dev, key.ino = st.Dev, st.Ino
	}
	return f, key, nil
}

func (s *Symbolizer) parseCachedLocked(f *os.File, key fileKey) (*fileEntry, error) {
	if e, ok := s.files[key]; ok {
		s.lru.MoveToFront(e.elem)
		e.used = true
		return e, nil
	}
	ef, err := parseELF(f)
	if err != nil {
		err = fmt.Errorf("%s: %w", f.Name(), err)
	}
	e := &fileEntry{key: key, file: ef, used: true}
	e.elem = s.lru.PushFront(e)
	s.files[key] = e
	s.armSweepLocked()
	for s.lru.Len() > s.maxFiles {
		old := s.lru.Remove(s.lru.Back()).(*fileEntry)
		delete(s.files, old.key)
		old.evicted, old.file = true, nil
	}
	return e, err
}

// armSweepLocked arms the sweep of unused files, if it is not armed.
func (s *Symbolizer) armSweepLocked() {
	if s.sweepArmed || s.fileKeep <= 0 {
		return
	}
	s.sweepArmed = true
	if s.sweep == nil {
		s.sweep = time.AfterFunc(s.fileKeep, s.sweepFiles)
		return
	}
	s.sweep.Reset(s.fileKeep)
}

// sweepFiles evicts the files no lookup used since the last sweep (one to
// two fileKeep ago), as the LRU evicts: a process's mapping that still
// points at one opens and parses it again at its next lookup. It runs
// every fileKeep while the cache holds files.
func (s *Symbolizer) sweepFiles() {
	s.mu.Lock()
	evicted := 0
	for el := s.lru.Back(); el != nil; {
		prev := el.Prev()
		if e := el.Value.(*fileEntry); e.used {
			e.used = false
		} else {
			s.lru.Remove(el)
			delete(s.files, e.key)
			e.evicted, e.file = true, nil
			evicted++
		}
		el = prev
	}
	s.sweepArmed = false
	if s.lru.Len() > 0 {
		s.armSweepLocked()
	}
	s.mu.Unlock()
	if evicted > 0 {
		// Megabytes of tables just became garbage, once: give them back
		// now rather than when the scavenger gets to them.
		debug.FreeOSMemory()
	}
}

// cachedFiles is how many parsed files the cache holds (tests).
func (s *Symbolizer) cachedFiles() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lru.Len()
}

// vdsoFile parses this process's vDSO. Every process on the host maps the
// same kernel-provided image, and the target's copy can only be read with
// ptrace rights, while ours is always readable.
func (s *Symbolizer) vdsoFile() *elfFile {
	s.vdsoOnce.Do(func() {
		ef, err := readVDSO(s.procRoot)
		if err != nil {
			s.log.Debug("symbolize: read vdso", "err", err)
		}
		s.vdso = ef
	})
	return s.vdso
}

func readVDSO(procRoot string) (*elfFile, error) {
	data, err := os.ReadFile(filepath.Join(procRoot, "self", "maps"))
	if err != nil {
		return nil, fmt.Errorf("read own maps: %w", err)
	}
	for _, m := range parseMaps(data) {
		if m.Path != "[vdso]" {
			continue
		}
		mem, err := os.Open(filepath.Join(procRoot, "self", "mem"))
		if err != nil {
			return nil, fmt.Errorf("open own mem: %w", err)
		}
		defer mem.Close()
		buf := make([]byte, m.End-m.Start)
		if _, err := mem.ReadAt(buf, int64(m.Start)); err != nil {
			return nil, fmt.Errorf("read vdso: %w", err)
		}
		return parseELF(bytes.NewReader(buf))
	}
	return nil, errors.New("no [vdso] mapping")
}

// Kernel symbolizes kernel addresses, leaf first, with kallsyms. Without
// readable kallsyms the frames carry only their addresses.
func (s *Symbolizer) Kernel(addrs []uint64) []Frame {
	ks := s.kernelSyms()
	out := make([]Frame, len(addrs))
	// One lookup for the whole stack: with the table dropped, the
	// addresses it lacks are looked for in one pass over kallsyms.
	pcs := make([]uint64, 0, len(addrs))
	for i, a := range addrs {
		out[i] = Frame{Addr: a, Module: kernelModule}
		if a != 0 {
			pcs = append(pcs, lookupAddr(a, i == 0))
		}
	}
	names := make([]ksName, len(pcs))
	ks.lookupAll(pcs, names)
	j := 0
	for i, a := range addrs {
		if a != 0 {
			out[i].Func = names[j].name
			j++
		}
	}
	return out
}

func kernelFrame(ks *kallsyms, addr uint64, leaf bool) Frame {
	f := Frame{Addr: addr, Module: kernelModule}
	if addr == 0 {
		return f
	}
	f.Func, _ = ks.lookup(lookupAddr(addr, leaf))
	return f
}

func (s *Symbolizer) kernelSyms() *kallsyms {
	s.kmu.Lock()
	defer s.kmu.Unlock()
	if s.ksyms != nil {
		return s.ksyms
	}
	now := s.now()
	if !s.kTried.IsZero() && now.Sub(s.kTried) < s.kallsymsRetry {
		return nil
	}
	first := s.kTried.IsZero()
	s.kTried = now
	ks, err := s.loadKallsyms()
	if err != nil {
		// Warn once; the retries would otherwise repeat it forever.
		level := slog.LevelDebug
		if first {
			level = slog.LevelWarn
		}
		s.log.Log(context.Background(), level, "symbolize: kernel symbols unavailable", "err", err)
		return nil
	}
	s.ksyms = ks
	return ks
}

func (s *Symbolizer) loadKallsyms() (*kallsyms, error) {
	path := filepath.Join(s.procRoot, "kallsyms")
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open kallsyms: %w", err)
	}
	defer f.Close()
	ks, ok, err := parseKallsyms(f)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if !ok {
		return nil, fmt.Errorf("%s: no text symbols with addresses (kptr_restrict or no privilege)", path)
	}
	return ks, nil
}

// cLibraries are the file names of the C library's parts, glibc's and
// musl's.
var cLibraries = []string{"libc.so", "libc-", "libpthread.so", "libpthread-", "libresolv.so", "libnss_", "ld-linux", "ld-musl", "libc.musl"}

// IsCLibrary reports whether module (a mapped file's path) is part of the
// C library: frames there are what the app called, not who called it.
func IsCLibrary(module string) bool {
	base := filepath.Base(module)
	for _, p := range cLibraries {
		if strings.HasPrefix(base, p) {
			return true
		}
	}
	return false
}
