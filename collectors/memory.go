package collectors

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorMemory, false, func(o Options) (Collector, error) { return newMemoryCollector(o), nil })
}

// parseKBLines reads "Key:   123 kB" lines for the wanted keys, in bytes.
func parseKBLines(b []byte, want ...string) map[string]float64 {
	out := make(map[string]float64, len(want))
	for line := range bytes.Lines(b) {
		k, v, ok := bytes.Cut(bytes.TrimSuffix(line, []byte("\n")), []byte(":"))
		if !ok {
			continue
		}
		for _, w := range want {
			if string(k) == w {
				f := bytes.Fields(v)
				if len(f) >= 1 {
					n, err := strconv.ParseFloat(string(f[0]), 64)
					switch {
					case err != nil || len(f) > 2:
					case len(f) == 2 && string(f[1]) == "kB":
						out[w] = n * 1024
					case len(f) == 1:
						out[w] = n // a count, not a size
					}
				}
			}
		}
	}
	return out
}

// statusMemory is what /proc/PID/status says of memory, in bytes.
type statusMemory struct {
	VmRSS, VmSize, RssAnon, RssFile, RssShmem float64
}

// parseStatusMemory reads the kB lines of /proc/PID/status it needs.
func parseStatusMemory(b []byte) (statusMemory, error) {
	kb := parseKBLines(b, "VmRSS", "VmSize", "RssAnon", "RssFile", "RssShmem")
	if len(kb) < 5 {
		// Kernel threads and zombies have no memory lines.
		return statusMemory{}, fmt.Errorf("memory lines missing from status: %w", ErrNoData)
	}
	return statusMemory{VmRSS: kb["VmRSS"], VmSize: kb["VmSize"], RssAnon: kb["RssAnon"], RssFile: kb["RssFile"], RssShmem: kb["RssShmem"]}, nil
}

// What a cycle costs: /proc/PID/status, read through a file kept open and
// parsed in place, every cycle; smaps_rollup (the kernel walks the whole
// address space for it: tens of ms for a process of gigabytes) and every
// thread's status (for the context switches: a file per thread) every
// slowEvery cycles, the values written again in between. Neither is read by
// a rule; both are for dashboards.
type memoryCollector struct {
	procRoot   string
	maxThreads int
	buf        []byte
	status     procFile
	pid        int
	cycle      int
	slow       []sample // Pss, Swap and the context switches, as last read
	h          [5]*signals.Handle
}

// slowEvery is how many cycles pass between two readings of
// smaps_rollup and the threads' status files.
const slowEvery = 10

func newMemoryCollector(o Options) *memoryCollector {
	root := o.ProcRoot
	if root == "" {
		root = "/proc"
	}
	max := o.MaxThreads
	if max <= 0 {
		max = defaultMaxThreads
	}
	return &memoryCollector{procRoot: root, maxThreads: max}
}

func (*memoryCollector) Name() string { return signals.CollectorMemory }

func (c *memoryCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	if tgt.PID != c.pid {
		c.pid, c.cycle, c.slow = tgt.PID, 0, nil
		c.status.close()
	}
	path := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "status")
	b, err := c.status.read(&c.buf, path)
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	m, err := parseStatusMemory(b)
	if err != nil {
		return fmt.Errorf("pid %d: %s: %w", tgt.PID, path, err)
	}
	now := time.Now()
	if c.h[0] == nil {
		c.h = [5]*signals.Handle{store.Handle(signals.ProcessResidentMemoryBytes, nil), store.Handle(signals.ProcessVirtualMemoryBytes, nil),
			store.Handle(signals.ProcessMemoryRSSBytes, signals.L("kind", "anon")), store.Handle(signals.ProcessMemoryRSSBytes, signals.L("kind", "file")),
			store.Handle(signals.ProcessMemoryRSSBytes, signals.L("kind", "shmem"))}
	}
	c.h[0].Put(m.VmRSS, now)
	c.h[1].Put(m.VmSize, now)
	c.h[2].Put(m.RssAnon, now)
	c.h[3].Put(m.RssFile, now)
	c.h[4].Put(m.RssShmem, now)

	c.cycle++
	if c.cycle%slowEvery != 1 && c.slow != nil {
		putSamples(store, now, c.slow)
		return nil
	}
	c.slow = c.slow[:0]
	pidDir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID))
	if b, err := readProcFile(&c.buf, filepath.Join(pidDir, "smaps_rollup")); err == nil {
		// A line the kernel did not write is unknown, not 0 bytes.
		kb := parseKBLines(b, "Pss", "Swap")
		if v, ok := kb["Pss"]; ok {
			c.slow = append(c.slow, sample{Desc: signals.ProcessMemoryPSSBytes, Value: v})
		}
		if v, ok := kb["Swap"]; ok {
			c.slow = append(c.slow, sample{Desc: signals.ProcessMemorySwapBytes, Value: v})
		}
	}
	// Context switches are per thread: sum them, over at most maxThreads.
	var vol, nonvol float64
	if tasks, err := os.ReadDir(filepath.Join(pidDir, "task")); err == nil {
		for i, task := range tasks {
			if i >= c.maxThreads {
				break
			}
			b, err := readProcFile(&c.buf, filepath.Join(pidDir, "task", task.Name(), "status"))
			if err != nil {
				continue // the thread ended
			}
			cs := parseKBLines(b, "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
			vol += cs["voluntary_ctxt_switches"]
			nonvol += cs["nonvoluntary_ctxt_switches"]
		}
		c.slow = append(c.slow, sample{Desc: signals.ProcessContextSwitchesTotal, Labels: signals.L("kind", "voluntary"), Value: vol},
			sample{Desc: signals.ProcessContextSwitchesTotal, Labels: signals.L("kind", "nonvoluntary"), Value: nonvol})
	}
	if c.slow == nil {
		c.slow = []sample{} // read: written again until the next reading
	}
	putSamples(store, now, c.slow)
	return nil
}
