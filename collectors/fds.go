package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorFDs, false, func(o Options) (Collector, error) { return newFDsCollector(o), nil })
}

// fdKinds are written every time, 0 when absent, so that growth of one
// kind can be read from its own series.
var fdKindNames = []string{"socket", "file", "pipe", "anon_eventfd", "anon_eventpoll", "anon_timerfd", "anon_inotify", "anon_other", "other"}

// maxFDsExamined bounds one Collect: past it the kinds are counted on a
// prefix while the total stays exact (it is the directory's length).
const maxFDsExamined = 1 << 20

// fdKind classifies a /proc/PID/fd link target.
func fdKind(link []byte) string {
	switch {
	case bytes.HasPrefix(link, []byte("socket:[")):
		return "socket"
	case bytes.HasPrefix(link, []byte("pipe:[")):
		return "pipe"
	case bytes.HasPrefix(link, []byte("/")):
		return "file"
	case bytes.Equal(link, []byte("anon_inode:[eventfd]")):
		return "anon_eventfd"
	case bytes.Equal(link, []byte("anon_inode:[eventpoll]")):
		return "anon_eventpoll"
	case bytes.Equal(link, []byte("anon_inode:[timerfd]")):
		return "anon_timerfd"
	case bytes.Equal(link, []byte("anon_inode:inotify")):
		return "anon_inotify"
	case bytes.HasPrefix(link, []byte("anon_inode:")):
		return "anon_other"
	}
	return "other"
}

// parseNofile reads "Max open files" from /proc/PID/limits; unlimited
// values are reported as absent (ok false).
func parseNofile(limits []byte) (soft, hard float64, softOK, hardOK bool, err error) {
	for _, line := range bytes.Split(limits, []byte("\n")) {
		if !bytes.HasPrefix(line, []byte("Max open files")) {
			continue
		}
		f := bytes.Fields(line[len("Max open files"):])
		if len(f) < 2 {
			return 0, 0, false, false, fmt.Errorf("short Max open files line %q: %w", line, errParse)
		}
		if v, err := strconv.ParseFloat(string(f[0]), 64); err == nil {
			soft, softOK = v, true
		}
		if v, err := strconv.ParseFloat(string(f[1]), 64); err == nil {
			hard, hardOK = v, true
		}
		return soft, hard, softOK, hardOK, nil
	}
	return 0, 0, false, false, fmt.Errorf("no Max open files line: %w", errParse)
}

type fdsCollector struct {
	procRoot string
	buf      []byte
	link     []byte
}

func newFDsCollector(o Options) *fdsCollector {
	root := o.ProcRoot
	if root == "" {
		root = "/proc"
	}
	return &fdsCollector{procRoot: root, link: make([]byte, 256)}
}

func (*fdsCollector) Name() string { return signals.CollectorFDs }

func (c *fdsCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	now := time.Now()
	pidDir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID))
	fdDir := filepath.Join(pidDir, "fd")
	d, err := os.Open(fdDir)
	if err != nil {
		return fmt.Errorf("pid %d: open fd table: %w", tgt.PID, err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		return fmt.Errorf("pid %d: read fd table: %w", tgt.PID, err)
	}
	counts := make(map[string]float64, len(fdKindNames))
	for i, n := range names {
		if i >= maxFDsExamined {
			break
		}
		l, err := readlinkInto(filepath.Join(fdDir, n), &c.link)
		if err != nil {
			continue // closed between readdir and readlink
		}
		counts[fdKind(l)]++
	}
	for _, k := range fdKindNames {
		store.Put(signals.ProcessOpenFDs, signals.L("kind", k), counts[k], now)
	}
	store.Put(signals.ProcessFDsOpen, nil, float64(len(names)), now)

	b, err := readProcFile(&c.buf, filepath.Join(pidDir, "limits"))
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	soft, hard, softOK, hardOK, err := parseNofile(b)
	if err != nil {
		return fmt.Errorf("pid %d: limits: %w", tgt.PID, err)
	}
	if softOK {
		store.Put(signals.ProcessFDLimit, signals.L("type", "soft"), soft, now)
	}
	if hardOK {
		store.Put(signals.ProcessFDLimit, signals.L("type", "hard"), hard, now)
	}
	return nil
}

// errParse marks a /proc file that is not in the expected format.
var errParse = errors.New("unexpected /proc format")

func readlinkRaw(path string, buf []byte) (int, error) { return syscall.Readlink(path, buf) }

// readlinkInto is os.Readlink without an allocation per call: one
// Collect reads one link per descriptor, thousands on a busy server.
func readlinkInto(path string, buf *[]byte) ([]byte, error) {
	for {
		n, err := readlinkRaw(path, *buf)
		if err != nil {
			return nil, err
		}
		if n < len(*buf) {
			return (*buf)[:n], nil
		}
		*buf = make([]byte, 2*len(*buf))
	}
}
