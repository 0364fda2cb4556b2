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
	"github.com/culprit-dev/culprit/target"
)

func init() {
	register("memory", false, func(o Options) (Collector, error) { return newMemoryCollector(o), nil })
}

var (
	residentDesc = &signals.Desc{Name: "process_resident_memory_bytes", Kind: signals.Gauge,
		Help: "Resident memory of the target (VmRSS)."}
	rssKindDesc = &signals.Desc{Name: "process_memory_rss_bytes", Kind: signals.Gauge,
		Help: "Resident memory of the target by kind: anon (heap, stacks, allocator arenas), file (mapped files), shmem."}
	virtualDesc = &signals.Desc{Name: "process_virtual_memory_bytes", Kind: signals.Gauge,
		Help: "Virtual memory size of the target (VmSize)."}
	pssDesc = &signals.Desc{Name: "process_memory_pss_bytes", Kind: signals.Gauge,
		Help: "Proportional set size of the target (smaps_rollup Pss): shared pages split among their users."}
	swapDesc = &signals.Desc{Name: "process_memory_swap_bytes", Kind: signals.Gauge,
		Help: "Memory of the target swapped out (smaps_rollup Swap)."}
	ctxSwitchesDesc = &signals.Desc{Name: "process_context_switches_total", Kind: signals.Counter,
		Help: "Context switches of the target's threads: voluntary (blocked, waiting) or nonvoluntary (preempted)."}
)

// parseKBLines reads "Key:   123 kB" lines for the wanted keys, in bytes.
func parseKBLines(b []byte, want ...string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		k, v, ok := bytes.Cut(line, []byte(":"))
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

type memoryCollector struct {
	procRoot   string
	maxThreads int
	buf        []byte
}

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

func (*memoryCollector) Name() string { return "memory" }

func (c *memoryCollector) Collect(_ context.Context, tgt target.Process, store *signals.Store) error {
	path := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "status")
	b, err := readProcFile(&c.buf, path)
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	m, err := parseStatusMemory(b)
	if err != nil {
		return fmt.Errorf("pid %d: %s: %w", tgt.PID, path, err)
	}
	now := time.Now()
	store.Put(residentDesc, nil, m.VmRSS, now)
	store.Put(virtualDesc, nil, m.VmSize, now)
	store.Put(rssKindDesc, signals.L("kind", "anon"), m.RssAnon, now)
	store.Put(rssKindDesc, signals.L("kind", "file"), m.RssFile, now)
	store.Put(rssKindDesc, signals.L("kind", "shmem"), m.RssShmem, now)

	pidDir := filepath.Join(c.procRoot, strconv.Itoa(tgt.PID))
	if b, err := readProcFile(&c.buf, filepath.Join(pidDir, "smaps_rollup")); err == nil {
		// A line the kernel did not write is unknown, not 0 bytes.
		kb := parseKBLines(b, "Pss", "Swap")
		if v, ok := kb["Pss"]; ok {
			store.Put(pssDesc, nil, v, now)
		}
		if v, ok := kb["Swap"]; ok {
			store.Put(swapDesc, nil, v, now)
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
		store.Put(ctxSwitchesDesc, signals.L("kind", "voluntary"), vol, now)
		store.Put(ctxSwitchesDesc, signals.L("kind", "nonvoluntary"), nonvol, now)
	}
	return nil
}
