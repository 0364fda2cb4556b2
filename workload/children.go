package workload

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"
)

// MaxGroupChildren is how many children of the target are watched with it
// (the probes' target_tgids hold the target and these: bpf/headers/
// targets.h MAX_TARGETS; the threads collector counts their threads).
const MaxGroupChildren = 15

// Children returns the PIDs (at most max, lowest first) whose parent is
// pid. A prefork server (nginx, gunicorn, php-fpm) serves from its
// children: the master holds the listener and the workers do the work, so
// what runs on a CPU or blocks is theirs.
//
// The kernel lists each thread's children in /proc/PID/task/TID/children
// (CONFIG_PROC_CHILDREN): reading those costs one file per thread of the
// target, where scanning every process's stat costs one per process on
// the host, several times a second. The scan is the fallback.
//
// Several readers ask at once (the probes that watch the group refresh it
// on the same tick of the shared clock): an answer is reused for
// childrenReuse, so the files are read once per tick, not once per reader.
func Children(procRoot string, pid, max int) []int {
	k := childrenKey{procRoot, pid, max}
	now := time.Now()
	childrenMu.Lock()
	if c, ok := childrenCache[k]; ok && now.Sub(c.at) < childrenReuse {
		childrenMu.Unlock()
		return slices.Clone(c.pids)
	}
	childrenMu.Unlock()
	out, ok := childrenFiles(procRoot, pid, max)
	if !ok {
		out = childrenScan(procRoot, pid, max)
	}
	childrenMu.Lock()
	if len(childrenCache) >= 16 {
		clear(childrenCache) // a handful of targets at most; bounded anyway
	}
	childrenCache[k] = childrenAnswer{now, out}
	childrenMu.Unlock()
	return slices.Clone(out)
}

// childrenReuse is how long one reading of a target's children serves.
const childrenReuse = 100 * time.Millisecond

type childrenKey struct {
	root     string
	pid, max int
}

type childrenAnswer struct {
	at   time.Time
	pids []int
}

var (
	childrenMu    sync.Mutex
	childrenCache = map[childrenKey]childrenAnswer{}
)

// childrenFiles reads the children files of pid's threads; ok is false
// when the kernel has none (or they cannot be read).
func childrenFiles(procRoot string, pid, max int) ([]int, bool) {
	taskDir := filepath.Join(procRoot, strconv.Itoa(pid), "task")
	d, err := os.Open(taskDir)
	if err != nil {
		return nil, false
	}
	tids, _ := d.Readdirnames(-1)
	d.Close()
	var out []int
	read := false
	for _, tid := range tids {
		b, err := os.ReadFile(filepath.Join(taskDir, tid, "children"))
		if err != nil {
			continue
		}
		read = true
		for _, f := range bytes.Fields(b) {
			if c, err := strconv.Atoi(string(f)); err == nil && c != pid {
				out = append(out, c)
			}
		}
	}
	if !read {
		return nil, false
	}
	sort.Ints(out)
	out = slices.Compact(out)
	if len(out) > max {
		out = out[:max]
	}
	return out, true
}

// childrenScan finds pid's children by the parent in every process's stat.
func childrenScan(procRoot string, pid, max int) []int {
	d, err := os.Open(procRoot)
	if err != nil {
		return nil
	}
	names, _ := d.Readdirnames(-1)
	d.Close()
	var out []int
	for _, n := range names {
		child, err := strconv.Atoi(n)
		if err != nil || child == pid {
			continue
		}
		b, err := os.ReadFile(filepath.Join(procRoot, n, "stat"))
		if err != nil {
			continue // gone, or not a process
		}
		if ppid, ok := parsePPID(b); ok && ppid == pid {
			out = append(out, child)
		}
	}
	sort.Ints(out)
	if len(out) > max {
		out = out[:max]
	}
	return out
}

// parsePPID reads field 4 of /proc/PID/stat, after the command name in
// parentheses (which may itself hold spaces and parentheses).
func parsePPID(b []byte) (int, bool) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := bytes.Fields(b[i+1:])
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(string(f[1]))
	return ppid, err == nil
}
