package target

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strconv"
)

// Children returns the PIDs (at most max, lowest first) whose parent is
// pid. A prefork server (nginx, gunicorn, php-fpm) serves from its
// children: the master holds the listener and the workers do the work, so
// what runs on a CPU or blocks is theirs.
func Children(procRoot string, pid, max int) []int {
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
