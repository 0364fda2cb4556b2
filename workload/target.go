package workload

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/prometheus/procfs"
)

// Process is one incarnation of the target. A restart is a new Process
// (another PID or start time), never a mutation of the old one.
type Process struct {
	PID       int
	StartTime uint64 // clock ticks since boot; tells a reused PID apart
	Comm      string
	Cmdline   string
	NetnsIno  uint64 // inode of /proc/PID/ns/net: whose sockets and counters we read
	Found     time.Time
}

func (p Process) String() string { return fmt.Sprintf("%s[%d]", p.Comm, p.PID) }

// Selector says how to find the target. Exactly one field is set.
type Selector struct {
	PID  int
	Port int
	Cmd  *regexp.Regexp
}

func (s Selector) String() string {
	switch {
	case s.PID > 0:
		return fmt.Sprintf("pid %d", s.PID)
	case s.Port > 0:
		return fmt.Sprintf("the process listening on port %d", s.Port)
	case s.Cmd != nil:
		return fmt.Sprintf("the process whose command line matches %q", s.Cmd.String())
	}
	return "nothing"
}

// ErrNotFound means no process matches the selector right now.
var ErrNotFound = errors.New("target not found")

// Resolver finds processes under a procfs root.
type Resolver struct {
	fs   procfs.FS
	root string
	self int
}

// NewResolver reads processes under procRoot (normally /proc).
func NewResolver(procRoot string) (*Resolver, error) {
	fs, err := procfs.NewFS(procRoot)
	if err != nil {
		return nil, fmt.Errorf("open procfs %s: %w", procRoot, err)
	}
	return &Resolver{fs: fs, root: procRoot, self: os.Getpid()}, nil
}

// Resolve finds the process the selector names.
func (r *Resolver) Resolve(sel Selector) (Process, error) {
	switch {
	case sel.PID > 0:
		return r.describe(sel.PID)
	case sel.Port > 0:
		return r.byPort(sel.Port)
	case sel.Cmd != nil:
		return r.byCmd(sel.Cmd)
	}
	return Process{}, fmt.Errorf("no target selector given: %w", ErrNotFound)
}

// Alive reports whether p is still the same running process.
func (r *Resolver) Alive(p Process) bool {
	proc, err := r.fs.Proc(p.PID)
	if err != nil {
		return false
	}
	st, err := proc.Stat()
	if err != nil {
		return false
	}
	return st.Starttime == p.StartTime && st.State != "Z" && st.State != "X"
}

func (r *Resolver) describe(pid int) (Process, error) {
	proc, err := r.fs.Proc(pid)
	if err != nil {
		return Process{}, fmt.Errorf("pid %d: no such process in the agent's PID namespace (a sidecar needs shareProcessNamespace): %w", pid, ErrNotFound)
	}
	st, err := proc.Stat()
	if err != nil {
		return Process{}, fmt.Errorf("pid %d: read stat: %w", pid, ErrNotFound)
	}
	if st.State == "Z" || st.State == "X" {
		return Process{}, fmt.Errorf("pid %d is a zombie: %w", pid, ErrNotFound)
	}
	p := Process{PID: pid, StartTime: st.Starttime, Comm: st.Comm, Found: time.Now()}
	if args, err := proc.CmdLine(); err == nil {
		p.Cmdline = strings.Join(args, " ")
	}
	ino, err := nsInode(filepath.Join(r.root, strconv.Itoa(pid), "ns", "net"))
	if errors.Is(err, os.ErrPermission) {
		return Process{}, fmt.Errorf("pid %d runs as another user and the agent lacks CAP_SYS_PTRACE to read its namespaces: %w", pid, err)
	}
	if err != nil {
		return Process{}, fmt.Errorf("pid %d: network namespace: %w", pid, err)
	}
	p.NetnsIno = ino
	return p, nil
}

func nsInode(path string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Ino, nil
}

func (r *Resolver) byCmd(re *regexp.Regexp) (Process, error) {
	procs, err := r.fs.AllProcs()
	if err != nil {
		return Process{}, fmt.Errorf("list processes: %w", err)
	}
	// A wrapper (timeout, sh -c, tini) repeats its child's command line,
	// so a match whose child also matches is passed over for the child.
	// Among the rest the oldest wins: a shell that merely mentions the
	// pattern is younger than the service in the common case, and the
	// choice stays stable across polls.
	matches := map[int]int{} // pid -> parent pid
	for _, proc := range procs {
		if proc.PID == r.self {
			continue
		}
		args, err := proc.CmdLine()
		if err != nil || len(args) == 0 || !re.MatchString(strings.Join(args, " ")) {
			continue
		}
		st, err := proc.Stat()
		if err != nil {
			continue
		}
		matches[proc.PID] = st.PPID
	}
	wrappers := map[int]bool{}
	for _, ppid := range matches {
		if _, ok := matches[ppid]; ok {
			wrappers[ppid] = true
		}
	}
	var best Process
	found := false
	var lastErr error // why a match could not be watched
	for pid := range matches {
		if wrappers[pid] {
			continue
		}
		p, err := r.describe(pid)
		if err != nil {
			lastErr = err
			continue
		}
		if !found || p.StartTime < best.StartTime || (p.StartTime == best.StartTime && p.PID < best.PID) {
			best, found = p, true
		}
	}
	if !found && lastErr != nil {
		return Process{}, fmt.Errorf("processes match %q but none can be watched: %w", re.String(), lastErr)
	}
	if !found {
		return Process{}, fmt.Errorf("no process matches %q: %w", re.String(), ErrNotFound)
	}
	return best, nil
}

func (r *Resolver) byPort(port int) (Process, error) {
	// sock_diag of the agent's own namespace: as a sidecar that is the
	// pod's, where the app listens.
	inodes := map[uint64]bool{}
	c, err := sockdiag.Open(r.root, 0, 0)
	if err != nil {
		return Process{}, fmt.Errorf("find the process listening on port %d: %w", port, err)
	}
	defer c.Close()
	err = c.Dump(context.Background(), sockdiag.Of(sockdiag.Listen), false, func(s *sockdiag.Socket) bool {
		if int(s.LocalPort) == port {
			inodes[uint64(s.Inode)] = true
		}
		return true
	})
	if err != nil {
		return Process{}, fmt.Errorf("sock_diag dump of listening sockets: %w", err)
	}
	if len(inodes) == 0 {
		return Process{}, fmt.Errorf("nothing listens on port %d: %w", port, ErrNotFound)
	}
	procs, err := r.fs.AllProcs()
	if err != nil {
		return Process{}, fmt.Errorf("list processes: %w", err)
	}
	denied := false // some process's fd table was unreadable
	for _, proc := range procs {
		if proc.PID == r.self {
			continue
		}
		owns, err := ownsSocket(filepath.Join(r.root, strconv.Itoa(proc.PID), "fd"), inodes)
		if errors.Is(err, os.ErrPermission) {
			denied = true
		}
		if owns {
			return r.describe(proc.PID)
		}
	}
	if denied {
		return Process{}, fmt.Errorf("port %d listens, but /proc/PID/fd of other users' processes is unreadable: missing CAP_SYS_PTRACE: %w", port, ErrNotFound)
	}
	return Process{}, fmt.Errorf("port %d listens but no process of the agent's PID namespace owns it: the owner is in another PID namespace (a sidecar needs shareProcessNamespace): %w", port, ErrNotFound)
}

// ownsSocket reports whether the fd table fdDir holds one of inodes; the
// error says why it could not be read.
func ownsSocket(fdDir string, inodes map[uint64]bool) (bool, error) {
	d, err := os.Open(fdDir)
	if err != nil {
		return false, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return false, err
	}
	for _, n := range names {
		link, err := os.Readlink(filepath.Join(fdDir, n))
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]"), 10, 64)
		if err == nil && inodes[ino] {
			return true, nil
		}
	}
	return false, nil
}

// SocketInodes returns the inodes of every socket the process holds open,
// which is how collectors tell the target's sockets from its neighbours'.
func SocketInodes(procRoot string, pid int) (map[uint64]bool, error) {
	fdDir := filepath.Join(procRoot, strconv.Itoa(pid), "fd")
	d, err := os.Open(fdDir)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", fdDir, err)
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", fdDir, err)
	}
	out := make(map[uint64]bool, len(names))
	for _, n := range names {
		link, err := os.Readlink(filepath.Join(fdDir, n))
		if err != nil || !strings.HasPrefix(link, "socket:[") {
			continue
		}
		if ino, err := strconv.ParseUint(link[len("socket:["):len(link)-1], 10, 64); err == nil {
			out[ino] = true
		}
	}
	return out, nil
}

// Tracker keeps the current Process up to date.
type Tracker struct {
	res      *Resolver
	sel      Selector
	interval time.Duration
	log      *slog.Logger

	mu       sync.RWMutex
	cur      Process
	ok       bool
	changes  uint64
	reason   string   // why the last resolve failed; "" while the target is watched
	onChange []func() // called when the target is (re)found
}

// OnChange has f called, on the goroutine that refreshes and without the
// tracker's lock, each time the target is (re)found: the probes then
// watch a restarted target from that moment, not from their next poll
// (a SIGTERM in the first second after a restart was missed so).
func (t *Tracker) OnChange(f func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.onChange = append(t.onChange, f)
}

// NewTracker follows the process sel names, checking every interval.
func NewTracker(res *Resolver, sel Selector, interval time.Duration, log *slog.Logger) *Tracker {
	return &Tracker{res: res, sel: sel, interval: interval, log: log}
}

// Current returns the target as last seen, and false while there is none.
func (t *Tracker) Current() (Process, bool) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.cur, t.ok
}

// Changes counts how often the target was (re)found.
func (t *Tracker) Changes() uint64 {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.changes
}

// Reason says why the target is not watched: the last failure to find or
// read it ("" while it is watched).
func (t *Tracker) Reason() string {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.reason
}

// Selector returns what the tracker looks for.
func (t *Tracker) Selector() Selector { return t.sel }

// Refresh checks the current target once and re-resolves it if it is gone.
func (t *Tracker) Refresh() {
	t.mu.RLock()
	cur, ok := t.cur, t.ok
	t.mu.RUnlock()
	if ok && t.res.Alive(cur) {
		return
	}
	p, err := t.res.Resolve(t.sel)
	t.mu.Lock()
	if err != nil {
		defer t.mu.Unlock()
		if t.ok {
			t.log.Warn("target gone; looking for it again", "target", t.cur.String(), "selector", t.sel.String())
		}
		// Said once per reason, not every refind_interval.
		if reason := strings.TrimSuffix(err.Error(), ": "+ErrNotFound.Error()); reason != t.reason {
			t.log.Warn("target cannot be watched", "selector", t.sel.String(), "reason", reason)
			t.reason = reason
		}
		t.ok = false
		return
	}
	t.cur, t.ok, t.reason = p, true, ""
	t.changes++
	hooks := t.onChange
	t.mu.Unlock()
	t.log.Info("watching target", "pid", p.PID, "comm", p.Comm, "cmdline", p.Cmdline, "netns", p.NetnsIno)
	for _, f := range hooks {
		f()
	}
}

// Run refreshes until ctx ends.
func (t *Tracker) Run(ctx context.Context) {
	tick := time.NewTicker(t.interval)
	defer tick.Stop()
	for {
		t.Refresh()
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
