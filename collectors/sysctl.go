package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/sockdiag"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorSysctl, false, func(o Options) (Collector, error) { return newSysctlCollector(o) })
}

// sysctlNames are the settings that bound accept queues, SYN queues and
// ephemeral ports, and how long a client retries a dropped SYN
// (tcp_syn_retries, and tcp_syn_linear_timeouts from Linux 6.5: how long
// a stalled accept queue's clients come back as a herd). All of them are per network namespace on current
// kernels, so they must be read in the target's namespace.
var sysctlNames = []string{
	"net.core.somaxconn",
	"net.ipv4.tcp_max_syn_backlog",
	"net.ipv4.tcp_abort_on_overflow",
	"net.ipv4.tcp_syncookies",
	"net.ipv4.tcp_syn_retries",
	"net.ipv4.tcp_syn_linear_timeouts",
	"net.ipv4.ip_local_port_range",
	"net.ipv4.tcp_tw_reuse",
	"net.ipv4.tcp_fin_timeout",
}

// sysctlPath is the file of a sysctl relative to the procfs root.
func sysctlPath(name string) string {
	return filepath.Join("sys", strings.ReplaceAll(name, ".", "/"))
}

// parseSysctl turns the content of one sysctl file into samples: one for a
// single integer, name.min and name.max for ip_local_port_range.
func parseSysctl(name string, b []byte) ([]sample, error) {
	fields := bytes.Fields(b)
	if len(fields) == 0 {
		return nil, fmt.Errorf("sysctl %s: empty value", name)
	}
	suffixes := []string{""}
	if name == "net.ipv4.ip_local_port_range" {
		suffixes = []string{".min", ".max"}
	}
	if len(fields) != len(suffixes) {
		return nil, fmt.Errorf("sysctl %s: want %d fields, got %q", name, len(suffixes), b)
	}
	out := make([]sample, 0, len(fields))
	for i, f := range fields {
		v, err := strconv.ParseInt(string(f), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("sysctl %s: %w", name, err)
		}
		out = append(out, sample{Desc: signals.Sysctl, Labels: signals.L("name", name+suffixes[i]), Value: float64(v)})
	}
	return out, nil
}

// readSysctls reads every known sysctl under procRoot. A sysctl the kernel
// does not have is skipped: older kernels lack some, and the others are
// still worth reporting.
func readSysctls(procRoot string) ([]sample, error) {
	var out []sample
	for _, name := range sysctlNames {
		path := filepath.Join(procRoot, sysctlPath(name))
		b, err := os.ReadFile(path)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", path, err)
		}
		ss, err := parseSysctl(name, b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		out = append(out, ss...)
	}
	return out, nil
}

// sysctlCollector reads net sysctls as the target sees them.
//
// What /proc/sys/net shows is decided by the network namespace of the
// thread that opens the file, not by the namespace of whoever mounted /proc
// and not by the path: measured on Linux 6.18 with a child in its own netns
// whose somaxconn was set to 4242, /proc/CHILD/root/proc/sys/net/core/somaxconn
// read from the agent showed the agent's 4096 (the child shares the agent's
// root, so that path is the same /proc mount), while the same read after
// setns into the child's netns showed 4242. So for a target in another
// namespace the collector opens and reads the files on an OS thread that
// has joined the target's namespace.
//
// The files are opened once per target namespace, on such a thread, and
// kept open: a file opened there goes on showing that namespace's value
// whichever thread reads it (measured the same way: an fd opened after
// setns still read 4242 once the thread had gone back). A cycle is then one
// pread per sysctl, with no setns, no path walk and no extra thread; the
// value parsed is only built into samples when its bytes changed.
type sysctlCollector struct {
	procRoot string
	files    []sysctlFile
	netns    uint64
	pid      int
	buf      []byte
	last     []sample
}

type sysctlFile struct {
	name string
	f    *os.File
	raw  []byte // as last read
}

func newSysctlCollector(o Options) (*sysctlCollector, error) {
	return &sysctlCollector{procRoot: procRootOf(o)}, nil
}

func (c *sysctlCollector) Name() string { return signals.CollectorSysctl }

func (c *sysctlCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	ss, err := c.readOpen(tgt)
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	if len(ss) == 0 {
		return fmt.Errorf("pid %d: none of the net sysctls exist: %w", tgt.PID, ErrNoData)
	}
	putSamples(store, time.Now(), ss)
	return nil
}

// readOpen reads the sysctls through the files opened in the target's
// namespace, opening them first when there are none yet (or the namespace
// changed).
func (c *sysctlCollector) readOpen(tgt workload.Process) ([]sample, error) {
	if c.files == nil || c.netns != tgt.NetnsIno || c.pid != tgt.PID {
		c.close()
		err := sockdiag.InTargetNetns(c.procRoot, tgt.PID, tgt.NetnsIno, func() error {
			for _, name := range sysctlNames {
				path := filepath.Join(c.procRoot, sysctlPath(name))
				f, err := os.Open(path)
				if errors.Is(err, fs.ErrNotExist) {
					continue
				}
				if err != nil {
					return fmt.Errorf("open %s: %w", path, err)
				}
				c.files = append(c.files, sysctlFile{name: name, f: f})
			}
			return nil
		})
		if err != nil {
			c.close()
			return nil, err
		}
		if c.files == nil {
			c.files = []sysctlFile{}
		}
		c.netns, c.pid = tgt.NetnsIno, tgt.PID
	}
	changed := c.last == nil
	for i := range c.files {
		sf := &c.files[i]
		if len(c.buf) < 128 {
			c.buf = make([]byte, 128)
		}
		n, err := sf.f.ReadAt(c.buf, 0)
		if err != nil && !errors.Is(err, io.EOF) {
			c.close()
			return nil, fmt.Errorf("read %s: %w", sf.name, err)
		}
		if !bytes.Equal(sf.raw, c.buf[:n]) {
			sf.raw = append(sf.raw[:0], c.buf[:n]...)
			changed = true
		}
	}
	if !changed {
		return c.last, nil
	}
	var out []sample
	for _, sf := range c.files {
		ss, err := parseSysctl(sf.name, sf.raw)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", sysctlPath(sf.name), err)
		}
		out = append(out, ss...)
	}
	c.last = out
	return out, nil
}

func (c *sysctlCollector) close() {
	for _, sf := range c.files {
		sf.f.Close()
	}
	c.files, c.last = nil, nil
}

// Close releases the files.
func (c *sysctlCollector) Close() error {
	c.close()
	return nil
}
