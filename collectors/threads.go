package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorThreads, false, func(o Options) (Collector, error) { return newThreadsCollector(o, o.MaxThreads), nil })
}

// defaultMaxThreads bounds how many threads one Collect examines, so that
// a process with a runaway thread count costs a bounded number of reads.
// Options has no field for it yet; the factory uses this default.
const defaultMaxThreads = 4096

// userHZ is the unit of utime/stime in /proc stat files: fixed at 100 by
// the kernel's ABI whatever CONFIG_HZ is.
const userHZ = 100

// taskStat is what a /proc/PID/task/TID/stat line tells about a thread.
type taskStat struct {
	State string
	Comm  string
	CPU   float64 // utime+stime, seconds
}

// parseTaskStat parses a /proc/PID/task/TID/stat line. The command name is
// in parentheses and may itself contain spaces and parentheses, so fields
// are counted after the last ')'.
func parseTaskStat(b []byte) (taskStat, error) {
	open := bytes.IndexByte(b, '(')
	i := bytes.LastIndexByte(b, ')')
	if open < 0 || i < open || i+2 >= len(b) || b[i+1] != ' ' {
		return taskStat{}, fmt.Errorf("stat: no state after the command name in %q", truncate(b, 64))
	}
	f := bytes.Fields(b[i+2:])
	// state is field 3 of stat(5); utime and stime are 14 and 15.
	if len(f) < 13 {
		return taskStat{}, fmt.Errorf("stat: %d fields after the command name, want at least 13", len(f))
	}
	ut, err1 := strconv.ParseUint(string(f[11]), 10, 64)
	st, err2 := strconv.ParseUint(string(f[12]), 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return taskStat{}, fmt.Errorf("stat: utime/stime: %w", err)
	}
	return taskStat{State: string(f[0][:1]), Comm: string(b[open+1 : i]), CPU: float64(ut+st) / userHZ}, nil
}

// parseSchedstat returns the run-queue wait of /proc/.../schedstat
// ("run_ns wait_ns slices"), in seconds.
func parseSchedstat(b []byte) (float64, error) {
	f := bytes.Fields(b)
	if len(f) < 2 {
		return 0, fmt.Errorf("schedstat: %q", truncate(b, 64))
	}
	ns, err := strconv.ParseUint(string(f[1]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("schedstat: %w", err)
	}
	return float64(ns) / 1e9, nil
}

// syscallNamesAMD64 names the system calls a blocked thread of a web
// service usually sits in. Numbers are x86_64's; other architectures get
// syscall_<n> until they have a table.
var syscallNamesAMD64 = map[int]string{
	0: "read", 1: "write", 7: "poll", 17: "pread64", 18: "pwrite64", 23: "select",
	26: "msync", 35: "nanosleep", 42: "connect", 43: "accept", 44: "sendto",
	45: "recvfrom", 46: "sendmsg", 47: "recvmsg", 61: "wait4", 73: "flock", 74: "fsync",
	75: "fdatasync", 128: "rt_sigtimedwait", 202: "futex", 230: "clock_nanosleep",
	232: "epoll_wait", 257: "openat", 270: "pselect6", 271: "ppoll",
	277: "sync_file_range", 281: "epoll_pwait", 288: "accept4", 426: "io_uring_enter",
	441: "epoll_pwait2", 34: "pause", 130: "rt_sigsuspend", 16: "ioctl", 72: "fcntl",
	19: "readv", 20: "writev", 299: "recvmmsg", 307: "sendmmsg",
}

func syscallName(nr int) string {
	if nr < 0 {
		return "none"
	}
	if runtime.GOARCH == "amd64" {
		if n, ok := syscallNamesAMD64[nr]; ok {
			return n
		}
	}
	return "syscall_" + strconv.Itoa(nr)
}

// parseTaskSyscall reads /proc/PID/task/TID/syscall: "running", or the
// system call number (-1 when blocked outside a system call) followed by
// its arguments and the stack and instruction pointers.
func parseTaskSyscall(b []byte) (nr int, running bool, err error) {
	b = bytes.TrimSpace(b)
	if bytes.Equal(b, []byte("running")) {
		return 0, true, nil
	}
	f := b
	if i := bytes.IndexByte(b, ' '); i >= 0 {
		f = b[:i]
	}
	nr, err = strconv.Atoi(string(f))
	if err != nil {
		return 0, false, fmt.Errorf("syscall: %q: %w", truncate(b, 64), err)
	}
	return nr, false, nil
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// threadCounts is what one pass over the threads found.
type threadCounts struct {
	Total       int
	PerThread   []sample       // CPU and run-queue wait of each examined thread
	States      map[string]int // the target's threads and its children's
	ChildStates map[string]int // its children's alone
	Syscalls    map[string]int
	Examined    int
	Unreadable  int // syscall files we were not allowed to read
}

// threadSamples turns counts into samples, writing 0 for states and system
// calls seen last time and gone now, so that a gauge does not keep its
// last non-zero value forever.
func threadSamples(c threadCounts, prevStates, prevChild, prevSyscalls map[string]bool) []sample {
	out := []sample{{Desc: signals.ProcessNumThreads, Value: float64(c.Total)}}
	for _, k := range sortedKeys(c.States, prevStates) {
		out = append(out, sample{Desc: signals.ProcessThreads, Labels: signals.L("state", k), Value: float64(c.States[k])})
	}
	for _, k := range sortedKeys(c.ChildStates, prevChild) {
		out = append(out, sample{Desc: signals.ProcessChildThreads, Labels: signals.L("state", k), Value: float64(c.ChildStates[k])})
	}
	for _, k := range sortedKeys(c.Syscalls, prevSyscalls) {
		out = append(out, sample{Desc: signals.ProcessThreadsInSyscall, Labels: signals.L("syscall", k), Value: float64(c.Syscalls[k])})
	}
	return out
}

func sortedKeys(now map[string]int, prev map[string]bool) []string {
	keys := make([]string, 0, len(now)+len(prev))
	for k := range now {
		keys = append(keys, k)
	}
	for k := range prev {
		if _, ok := now[k]; !ok {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	return keys
}

// threadsCollector counts the target's threads by state and by the system
// call the sleeping ones wait in: a worker pool stuck in futex, fsync or
// read is what "threads waiting" looks like from outside.
type threadsCollector struct {
	procRoot   string
	maxThreads int
	buf        []byte
	prevStates map[string]bool
	prevChild  map[string]bool
	prevCalls  map[string]bool
}

func newThreadsCollector(o Options, maxThreads int) *threadsCollector {
	if maxThreads <= 0 {
		maxThreads = defaultMaxThreads
	}
	return &threadsCollector{procRoot: procRootOf(o), maxThreads: maxThreads, buf: make([]byte, 0, 1024)}
}

func (c *threadsCollector) Name() string { return signals.CollectorThreads }

func (c *threadsCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	counts, err := c.count(tgt.PID)
	if err != nil {
		return err
	}
	putSamples(store, time.Now(), threadSamples(counts, c.prevStates, c.prevChild, c.prevCalls))
	putSamples(store, time.Now(), counts.PerThread)
	live := make(map[string]bool, len(counts.PerThread))
	for _, s := range counts.PerThread {
		live[s.Labels.Get("tid")] = true
	}
	for _, d := range []*signals.Desc{signals.ThreadStatCPUSecondsTotal, signals.ThreadSchedstatRunqWaitSecondsTotal} {
		store.Forget(d, func(ls signals.Labels) bool { return live[ls.Get("tid")] })
	}
	c.prevStates = keysOf(counts.States)
	c.prevChild = keysOf(counts.ChildStates)
	c.prevCalls = keysOf(counts.Syscalls)
	if counts.Unreadable > 0 {
		return fmt.Errorf("pid %d: %d threads' syscall files unreadable (needs CAP_SYS_PTRACE): %w", tgt.PID, counts.Unreadable, fs.ErrPermission)
	}
	return nil
}

func keysOf(m map[string]int) map[string]bool {
	out := make(map[string]bool, len(m))
	for k := range m {
		out[k] = true
	}
	return out
}

// count counts the threads of the target and of its children (a prefork
// server's workers: nginx's master only supervises, and a stop, a blocking
// call or a lock wait that holds up its connections is its workers').
// Total is the target's own; at most maxThreads are examined in all, the
// target's first.
func (c *threadsCollector) count(pid int) (threadCounts, error) {
	counts := threadCounts{States: map[string]int{}, ChildStates: map[string]int{}, Syscalls: map[string]int{}}
	total, err := c.countProcess(&counts, pid, false)
	if err != nil {
		return threadCounts{}, err
	}
	counts.Total = total
	for _, child := range workload.Children(c.procRoot, pid, workload.MaxGroupChildren) {
		if counts.Examined >= c.maxThreads {
			break
		}
		// A child that exits while it is read (gone, or its task
		// directory already empty) is simply not counted.
		if _, err := c.countProcess(&counts, child, true); err != nil && !gone(err) && !errors.Is(err, ErrNoData) {
			return threadCounts{}, fmt.Errorf("child %d: %w", child, err)
		}
	}
	return counts, nil
}

// countProcess adds the threads of pid (a child of the target: child) to
// counts, within what is left of maxThreads, and returns how many threads
// pid has.
func (c *threadsCollector) countProcess(counts *threadCounts, pid int, child bool) (int, error) {
	dir := filepath.Join(c.procRoot, strconv.Itoa(pid), "task")
	d, err := os.Open(dir)
	if err != nil {
		return 0, fmt.Errorf("pid %d: open %s: %w", pid, dir, err)
	}
	tids, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return 0, fmt.Errorf("pid %d: read %s: %w", pid, dir, err)
	}
	if len(tids) == 0 {
		return 0, fmt.Errorf("pid %d: %s is empty: %w", pid, dir, ErrNoData)
	}
	total := len(tids)
	if left := c.maxThreads - counts.Examined; len(tids) > left {
		// Lowest TIDs first: the long-lived pool threads, stable across polls.
		sort.Slice(tids, func(i, j int) bool { return tidLess(tids[i], tids[j]) })
		tids = tids[:max(left, 0)]
	}
	for _, tid := range tids {
		taskDir := filepath.Join(dir, tid)
		b, err := readProcFile(&c.buf, filepath.Join(taskDir, "stat"))
		if gone(err) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("pid %d: %w", pid, err)
		}
		ts, err := parseTaskStat(b)
		if err != nil {
			return 0, fmt.Errorf("pid %d: %s/stat: %w", pid, taskDir, err)
		}
		state := ts.State
		ls := signals.L("tid", tid, "thread", ts.Comm)
		counts.PerThread = append(counts.PerThread, sample{Desc: signals.ThreadStatCPUSecondsTotal, Labels: ls, Value: ts.CPU})
		if b, err := readProcFile(&c.buf, filepath.Join(taskDir, "schedstat")); err == nil {
			if wait, err := parseSchedstat(b); err == nil {
				counts.PerThread = append(counts.PerThread, sample{Desc: signals.ThreadSchedstatRunqWaitSecondsTotal, Labels: ls, Value: wait})
			}
		}
		counts.States[state]++
		if child {
			counts.ChildStates[state]++
		}
		counts.Examined++
		// A stopped thread (T: a stop signal, t: a tracer) shows the
		// system call it was in when it stopped: it waits in none.
		if state == "R" || state == "T" || state == "t" {
			continue
		}
		b, err = readProcFile(&c.buf, filepath.Join(taskDir, "syscall"))
		if gone(err) {
			continue
		}
		if errors.Is(err, fs.ErrPermission) {
			counts.Unreadable++
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("pid %d: %w", pid, err)
		}
		nr, running, err := parseTaskSyscall(b)
		if err != nil {
			return 0, fmt.Errorf("pid %d: %s/syscall: %w", pid, taskDir, err)
		}
		if !running { // it woke up between the two reads
			counts.Syscalls[syscallName(nr)]++
		}
	}
	return total, nil
}

// gone reports an error that means the thread exited while we read it.
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

func tidLess(a, b string) bool {
	if len(a) != len(b) {
		return len(a) < len(b)
	}
	return a < b
}
