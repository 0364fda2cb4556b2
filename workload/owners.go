package workload

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Role says whose a socket is, as far as findings are concerned.
type Role uint8

const (
	// RoleUnknown: no visible process holds it (a time-wait or request
	// socket, one closed since, or a process in another PID namespace).
	RoleUnknown Role = iota
	// RoleTarget: the target or one of its children holds it.
	RoleTarget
	// RoleAgent: culprit itself holds it (its API, its scrapes). Never in
	// a finding.
	RoleAgent
	// RoleOther: another process of the namespace (a sidecar, a mesh
	// proxy, a log shipper).
	RoleOther
)

// Owner is the process holding a socket.
type Owner struct {
	Role Role
	PID  int
	Comm string
}

// Label is the owner as a metric label value: "target", "agent", the
// command name of another process, or "unknown".
func (o Owner) Label() string {
	switch o.Role {
	case RoleTarget:
		return "target"
	case RoleAgent:
		return "agent"
	case RoleOther:
		if o.Comm != "" {
			return o.Comm
		}
		return "pid " + strconv.Itoa(o.PID)
	}
	return "unknown"
}

// SocketOwnersOptions bound what finding owners may cost. Zero fields take
// the defaults.
type SocketOwnersOptions struct {
	// TargetRescan is the least time between two readings of the target's
	// (and the agent's) fd tables, which happen only when a dump met a
	// socket inode nobody was known to hold. Default 1s.
	TargetRescan time.Duration
	// OthersRescan is the same for every other process of the namespace,
	// which label metrics and namespace-scope findings. Default 2s; a
	// scan that took long waits longer (othersScanGap).
	OthersRescan time.Duration
	// MaxInodes bounds the inodes remembered (the memory bound); a scan
	// stops adding past it. Default 1<<20.
	MaxInodes int
	// MaxChildren bounds the target's children counted as the target (a
	// prefork server's workers). Default 15, as the probes watch.
	MaxChildren int
	// UnknownLife is how long an inode a full scan found nobody holding
	// stays "unknown" before it is looked for again. Such a socket is
	// usually held by a process the agent cannot see (another PID
	// namespace, an fd table it may not read): rescanning every process
	// each OthersRescan for it would cost a full scan every few seconds
	// forever. Default 1m.
	UnknownLife time.Duration
}

func (o SocketOwnersOptions) withDefaults() SocketOwnersOptions {
	if o.TargetRescan <= 0 {
		o.TargetRescan = time.Second
	}
	if o.OthersRescan <= 0 {
		o.OthersRescan = 2 * time.Second
	}
	if o.MaxInodes <= 0 {
		o.MaxInodes = 1 << 20
	}
	if o.MaxChildren <= 0 {
		o.MaxChildren = 15
	}
	if o.UnknownLife <= 0 {
		o.UnknownLife = time.Minute
	}
	return o
}

// SocketOwners maps socket inodes to the processes that hold them, by
// reading the fd tables of the processes the agent can see (in a pod with
// shareProcessNamespace, every container's). In a pod the network
// namespace is shared by every container, so sockets alone say nothing of
// whose they are: a finding about a mesh proxy's connections, or the
// agent's own, is a finding about the wrong program.
//
// Reading fd tables costs one readlink per descriptor, so it happens only
// when a dump met an inode it does not know (Refresh), at most every
// TargetRescan for the target's and the agent's own tables and every
// OthersRescan for everyone else's. Inodes nobody was found holding are
// remembered as unknown until the next full scan, so a socket of a process
// the agent cannot see does not cause a scan per cycle. Safe for
// concurrent use.
type SocketOwners struct {
	procRoot string
	self     int
	o        SocketOwnersOptions
	now      func() time.Time // time.Now; tests move it

	mu       sync.RWMutex
	tgt      Process
	group    []int
	groupAt  time.Time
	byGroup  map[uint32]int       // inode -> pid of the target group or the agent
	byOther  map[uint32]int       // inode -> pid of another process
	unknown  map[uint32]time.Time // inode -> when a full scan found nobody holding it
	comms    map[int]string
	targetAt time.Time
	othersAt time.Time
	// othersTook is how long the last full scan of the other processes
	// took: the next one waits at least othersScanGap times that.
	othersTook time.Duration
	link       []byte
	dents      []byte // scanPID's getdents buffer
	name       []byte // readlinkat's C string
	scanned    uint64
	truncated  bool
	// tables are the other processes' socket inodes as a full scan last
	// read them, with what tells whether their tables changed since
	// (otherTable); skipped counts the tables not read again, ever.
	tables  map[int]*otherTable
	skipped uint64
	// ports the target listens on (or listened on while connections on
	// them remain), as the sockets collector last saw them.
	ports []uint16
}

// NewSocketOwners reads fd tables under procRoot (normally /proc).
func NewSocketOwners(procRoot string, o SocketOwnersOptions) *SocketOwners {
	return &SocketOwners{
		procRoot: procRoot,
		self:     os.Getpid(),
		now:      time.Now,
		o:        o.withDefaults(),
		byGroup:  map[uint32]int{},
		byOther:  map[uint32]int{},
		unknown:  map[uint32]time.Time{},
		comms:    map[int]string{},
		tables:   map[int]*otherTable{},
		link:     make([]byte, 64),
	}
}

// SetTarget says whose sockets are the target's: p and its children. A new
// process forgets what was known.
func (s *SocketOwners) SetTarget(p Process) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tgt.PID == p.PID && s.tgt.StartTime == p.StartTime {
		return
	}
	s.tgt = p
	s.group = nil
	s.groupAt = time.Time{}
	clear(s.byGroup)
	clear(s.byOther)
	clear(s.unknown)
	clear(s.comms)
	clear(s.tables)
	s.ports = s.ports[:0]
	s.targetAt, s.othersAt = time.Time{}, time.Time{}
}

// SetTargetPorts notes the target's listening ports (the sockets
// collector's, each cycle). A connection on one of them is the server side
// of a connection to the target, even once its socket is gone and no fd
// table can say whose it was (a connection that ended before a scan).
func (s *SocketOwners) SetTargetPorts(ports []uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ports = append(s.ports[:0], ports...)
}

// IsTargetPort reports whether port is one of the target's listening
// ports as last noted.
func (s *SocketOwners) IsTargetPort(port uint16) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Contains(s.ports, port)
}

// Owner returns who holds the socket with that inode, from what is known;
// ok is false for an inode not yet looked for (Refresh then helps).
func (s *SocketOwners) Owner(ino uint32) (Owner, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.ownerLocked(ino)
}

func (s *SocketOwners) ownerLocked(ino uint32) (Owner, bool) {
	if ino == 0 {
		return Owner{}, true
	}
	if pid, ok := s.byGroup[ino]; ok {
		if pid == s.self && !s.inGroup(pid) {
			return Owner{Role: RoleAgent, PID: pid, Comm: "culprit"}, true
		}
		return Owner{Role: RoleTarget, PID: pid, Comm: s.comms[pid]}, true
	}
	if pid, ok := s.byOther[ino]; ok {
		return Owner{Role: RoleOther, PID: pid, Comm: s.comms[pid]}, true
	}
	if at, ok := s.unknown[ino]; ok {
		// Only sockets nobody visible holds come here: reading the
		// clock for them is cheap.
		return Owner{}, s.now().Sub(at) < s.o.UnknownLife
	}
	return Owner{}, false
}

// Group is the target and its children, as last read.
func (s *SocketOwners) Group() []int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return append([]int(nil), s.group...)
}

// IsTarget reports whether pid is the target or one of its children.
func (s *SocketOwners) IsTarget(pid int) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for _, p := range s.group {
		if p == pid {
			return true
		}
	}
	return false
}

// Refresh reads fd tables again when missing inodes were met and the rate
// limits allow: the target's and the agent's first, everyone else's less
// often. It returns how many fd table entries it read (the cost).
func (s *SocketOwners) Refresh(now time.Time, missing []uint32) int {
	return s.refresh(now, missing, true)
}

// RefreshTarget is Refresh limited to the target's and the agent's fd
// tables: for an inode worth knowing only if it is the target's, at a cost
// that follows the target's descriptors, not the namespace's.
func (s *SocketOwners) RefreshTarget(now time.Time, missing []uint32) int {
	return s.refresh(now, missing, false)
}

// othersScanGap bounds what the full scans cost when the namespace's
// connections churn: every OthersRescan, each cycle met new sockets of some
// client of the target (nginx under wrk closes each connection after 1000
// requests: 150 new sockets a second), and a full scan read the 10,000
// descriptors of a neighbour holding connections, 30 ms each, 1.5 % of a
// core for labels of other processes' series. Waiting 200 times the last
// scan's duration keeps them under 0.5 % of a core, whatever the
// namespace holds; the price is that another process's new sockets are
// labelled "unknown" for longer (the target's own are read every
// TargetRescan, whatever this says).
const othersScanGap = 200

func (s *SocketOwners) refresh(now time.Time, missing []uint32, others bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tgt.PID == 0 {
		return 0
	}
	read := 0
	if now.Sub(s.groupAt) >= s.o.TargetRescan || s.group == nil {
		s.group = append(append(s.group[:0], s.tgt.PID), Children(s.procRoot, s.tgt.PID, s.o.MaxChildren)...)
		s.groupAt = now
	}
	var need []uint32
	for _, ino := range missing {
		if _, ok := s.ownerLocked(ino); !ok {
			need = append(need, ino)
		}
	}
	first := s.targetAt.IsZero()
	if (len(need) > 0 || first) && now.Sub(s.targetAt) >= s.o.TargetRescan {
		clear(s.byGroup)
		// The agent first: a socket both hold (inherited) is the target's.
		if !s.inGroup(s.self) {
			read += s.scanPID(s.self, s.byGroup, nil)
		}
		for _, pid := range s.group {
			read += s.scanPID(pid, s.byGroup, nil)
		}
		s.targetAt = now
		need = need[:0]
		for _, ino := range missing {
			if _, ok := s.ownerLocked(ino); !ok {
				need = append(need, ino)
			}
		}
	}
	if others && (len(need) > 0 || s.othersAt.IsZero()) && now.Sub(s.othersAt) >= max(s.o.OthersRescan, othersScanGap*s.othersTook) {
		start := time.Now()
		read += s.scanOthers(now)
		s.othersTook = time.Since(start)
		s.othersAt = now
		// Every inode still unknown was just looked for by this scan,
		// which read every fd table: each is nobody's as of now. Dated
		// now, they are looked for again together, by one scan per
		// UnknownLife; dated from when each was first met, each expired
		// apart and cost a full scan of its own (measured beside 40,000
		// sockets of a neighbour: two scans of 40k descriptors a minute,
		// 140 ms each, for two sockets of a process the agent cannot see).
		for ino := range s.unknown {
			if _, ok := s.byOther[ino]; ok {
				delete(s.unknown, ino)
			} else if _, ok := s.byGroup[ino]; ok {
				delete(s.unknown, ino)
			} else {
				s.unknown[ino] = now
			}
		}
		for _, ino := range need {
			if _, ok := s.ownerLocked(ino); !ok && len(s.unknown) < s.o.MaxInodes {
				s.unknown[ino] = now // nobody visible holds it: not looked for again for UnknownLife
			}
		}
	}
	s.scanned += uint64(read)
	return read
}

// scanOthers reads the fd table of every visible process in the target's
// network namespace but the target group and the agent. Inodes still
// unknown within their UnknownLife stay so (a socket held where the agent
// cannot see is not looked for at every scan); the expired are dropped.
func (s *SocketOwners) scanOthers(now time.Time) int {
	clear(s.byOther)
	for ino, at := range s.unknown {
		if now.Sub(at) >= s.o.UnknownLife {
			delete(s.unknown, ino)
		}
	}
	d, err := os.Open(s.procRoot)
	if err != nil {
		return 0
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	read := 0
	seen := map[int]bool{}
	for _, n := range names {
		pid, err := strconv.Atoi(n)
		if err != nil || pid == s.self || s.inGroup(pid) {
			continue
		}
		if s.tgt.NetnsIno != 0 {
			var st syscall.Stat_t
			if syscall.Stat(filepath.Join(s.procRoot, n, "ns", "net"), &st) != nil || st.Ino != s.tgt.NetnsIno {
				continue
			}
		}
		seen[pid] = true
		id := tableID(filepath.Join(s.procRoot, n))
		if t := s.tables[pid]; t != nil && t.unchanged(id, now, s.o.UnknownLife) {
			s.skipped++
			for _, ino := range t.inodes {
				if len(s.byOther) >= s.o.MaxInodes {
					s.truncated = true
					break
				}
				s.byOther[ino] = pid
			}
			continue
		}
		t := s.tables[pid]
		if t == nil {
			t = &otherTable{}
			s.tables[pid] = t
		}
		t.id, t.at, t.inodes = id, now, t.inodes[:0]
		delete(s.comms, pid) // read again: it may have been renamed
		read += s.scanPID(pid, s.byOther, &t.inodes)
	}
	for pid := range s.tables {
		if !seen[pid] {
			delete(s.tables, pid)
		}
	}
	for pid := range s.comms {
		if !s.inGroup(pid) && !seen[pid] {
			delete(s.comms, pid)
		}
	}
	return read
}

// otherTable is another process's socket inodes as its fd table was last
// read. Most of a namespace's descriptors are usually a neighbour's
// long-held connections (a pool, a proxy's upstreams), while the sockets
// that send a scan are new ones of a process that churns (a load
// generator, the target's clients): reading every table again at each
// scan was ~15 % of the agent's CPU beside nginx flat out and a
// neighbour holding 10,000 connections. A table is not read again, for up
// to UnknownLife, while its process is the same, holds as many
// descriptors and made no read or write call since: a process that
// replaced a socket without reading or writing anything has the new one
// labelled unknown until then, never another process's.
type otherTable struct {
	id     fdTableID
	at     time.Time
	inodes []uint32
}

// fdTableID tells whether a process's fd table may have changed: the
// inode of its /proc/PID directory (a new process with a reused PID gets
// a new one), its number of open descriptors (the size of /proc/PID/fd,
// since Linux 6.2; 0 before, which never matches) and its read and write
// calls, all threads' (/proc/PID/io syscr + syscw: a process that
// reconnects a pooled connection keeps its count of descriptors, but
// talks on the new one).
type fdTableID struct {
	dirIno uint64
	fds    int64
	calls  uint64
}

func tableID(procPID string) fdTableID {
	var dir, fd syscall.Stat_t
	if syscall.Stat(procPID, &dir) != nil || syscall.Stat(filepath.Join(procPID, "fd"), &fd) != nil {
		return fdTableID{}
	}
	b, err := os.ReadFile(filepath.Join(procPID, "io"))
	if err != nil {
		return fdTableID{}
	}
	calls, ok := ioCalls(b)
	if !ok {
		return fdTableID{}
	}
	return fdTableID{dirIno: dir.Ino, fds: fd.Size, calls: calls}
}

// ioCalls is syscr + syscw of a /proc/PID/io.
func ioCalls(b []byte) (uint64, bool) {
	var sum uint64
	found := 0
	for line := range bytes.Lines(b) {
		k, v, ok := bytes.Cut(bytes.TrimSpace(line), []byte(": "))
		if !ok || (!bytes.Equal(k, []byte("syscr")) && !bytes.Equal(k, []byte("syscw"))) {
			continue
		}
		n, err := strconv.ParseUint(string(v), 10, 64)
		if err != nil {
			return 0, false
		}
		sum += n
		found++
	}
	return sum, found == 2
}

// unchanged reports whether the table read at t.at can stand for now.
func (t *otherTable) unchanged(id fdTableID, now time.Time, life time.Duration) bool {
	return id.fds > 0 && id.dirIno != 0 && id == t.id && now.Sub(t.at) < life
}

func (s *SocketOwners) inGroup(pid int) bool {
	for _, p := range s.group {
		if p == pid {
			return true
		}
	}
	return false
}

// scanPID adds the socket inodes pid holds to m and learns its command
// name. Threads share the fd table, so /proc/PID/fd covers them all.
//
// A full scan reads every descriptor of the namespace's processes (beside
// 40,000 sockets of a neighbour, 40,000 links), so it reads them without an
// allocation per descriptor: the directory through getdents into a reused
// buffer, each link with readlinkat relative to the directory (no path to
// build, and one lookup in the kernel instead of a walk from /proc). With
// Readdirnames and a path string per link, a scan allocated ~2.5 MB.
func (s *SocketOwners) scanPID(pid int, m map[uint32]int, list *[]uint32) int {
	dir := filepath.Join(s.procRoot, strconv.Itoa(pid), "fd")
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	defer unix.Close(dfd)
	if _, ok := s.comms[pid]; !ok {
		if b, err := os.ReadFile(filepath.Join(s.procRoot, strconv.Itoa(pid), "comm")); err == nil {
			s.comms[pid] = string(bytes.TrimSpace(b))
		}
	}
	if s.dents == nil {
		s.dents = make([]byte, 32<<10)
	}
	prefix := []byte("socket:[")
	read := 0
	for {
		n, err := unix.Getdents(dfd, s.dents)
		if err != nil || n <= 0 {
			return read
		}
		for b := s.dents[:n]; len(b) >= direntNameOff; {
			reclen := int(binary.NativeEndian.Uint16(b[direntReclenOff:]))
			if reclen < direntNameOff || reclen > len(b) {
				return read
			}
			name := b[direntNameOff:reclen]
			b = b[reclen:]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			if len(name) == 0 || name[0] == '.' {
				continue
			}
			read++
			if len(m) >= s.o.MaxInodes {
				s.truncated = true
				continue
			}
			k, ok := s.readlinkat(dfd, name)
			if !ok || k < len(prefix)+2 || k >= len(s.link) || !bytes.HasPrefix(s.link[:k], prefix) {
				continue
			}
			if ino, ok := parseInode(s.link[len(prefix) : k-1]); ok {
				m[ino] = pid
				if list != nil {
					*list = append(*list, ino)
				}
			}
		}
	}
}

// Offsets in struct linux_dirent64.
const (
	direntReclenOff = 16
	direntNameOff   = 19
)

// readlinkat reads the link name (relative to dirfd) into s.link and
// returns its length. The name is made a C string in a reused buffer:
// unix.Readlinkat would allocate one for every descriptor.
func (s *SocketOwners) readlinkat(dirfd int, name []byte) (int, bool) {
	s.name = append(append(s.name[:0], name...), 0)
	n, _, e := unix.Syscall6(unix.SYS_READLINKAT, uintptr(dirfd), uintptr(unsafe.Pointer(&s.name[0])),
		uintptr(unsafe.Pointer(&s.link[0])), uintptr(len(s.link)), 0, 0)
	if e != 0 {
		return 0, false
	}
	return int(n), true
}

func parseInode(b []byte) (uint32, bool) {
	if len(b) == 0 || len(b) > 10 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + uint64(c-'0')
	}
	return uint32(v), v <= 1<<32-1
}

// Stats are the index's size and cost, for the agent's own metrics.
type SocketOwnersStats struct {
	Inodes    int
	FDsRead   uint64
	Truncated bool
	// TablesKept counts other processes' fd tables a full scan did not
	// read again: unchanged since the last (otherTable).
	TablesKept uint64
}

func (s *SocketOwners) Stats() SocketOwnersStats {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return SocketOwnersStats{Inodes: len(s.byGroup) + len(s.byOther), FDsRead: s.scanned, Truncated: s.truncated, TablesKept: s.skipped}
}
