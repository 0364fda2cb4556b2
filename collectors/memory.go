package collectors

import (
	"bytes"
	"context"
	"fmt"
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
)

// statusMemory is what /proc/PID/status says of memory, in bytes.
type statusMemory struct {
	VmRSS, VmSize, RssAnon, RssFile, RssShmem float64
}

// parseStatusMemory reads the kB lines of /proc/PID/status it needs.
func parseStatusMemory(b []byte) (statusMemory, error) {
	var m statusMemory
	found := 0
	for _, line := range bytes.Split(b, []byte("\n")) {
		k, v, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue
		}
		var dst *float64
		switch string(k) {
		case "VmRSS":
			dst = &m.VmRSS
		case "VmSize":
			dst = &m.VmSize
		case "RssAnon":
			dst = &m.RssAnon
		case "RssFile":
			dst = &m.RssFile
		case "RssShmem":
			dst = &m.RssShmem
		default:
			continue
		}
		f := bytes.Fields(v)
		if len(f) != 2 || string(f[1]) != "kB" {
			return m, fmt.Errorf("%s line %q: %w", k, line, errParse)
		}
		n, err := strconv.ParseFloat(string(f[0]), 64)
		if err != nil {
			return m, fmt.Errorf("%s value %q: %w", k, f[0], errParse)
		}
		*dst = n * 1024
		found++
	}
	if found < 5 {
		// Kernel threads and zombies have no memory lines.
		return m, fmt.Errorf("memory lines missing from status: %w", ErrNoData)
	}
	return m, nil
}

type memoryCollector struct {
	procRoot string
	buf      []byte
}

func newMemoryCollector(o Options) *memoryCollector {
	root := o.ProcRoot
	if root == "" {
		root = "/proc"
	}
	return &memoryCollector{procRoot: root}
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
	return nil
}
