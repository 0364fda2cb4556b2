package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorCgroup, false, func(o Options) (Collector, error) { return newCgroupCollector(o), nil })
}

// v1 reports "unlimited" as a huge page-aligned number.
const v1Unlimited = 1 << 62

// cgroupMemory is what one read of a memory cgroup gives.
type cgroupMemory struct {
	Version  int
	Usage    float64
	Limit    float64 // 0: unlimited
	Stat     map[string]float64
	Events   map[string]float64
	Pressure map[string]float64 // some, full: avg10 as a ratio
}

// memoryCgroupPaths returns the v1 memory path and the v2 path of a
// /proc/PID/cgroup file ("" when absent).
func memoryCgroupPaths(b []byte) (v1, v2 string) {
	_, v1, v2 = cgroupOf(b, "memory")
	return v1, v2
}

// parseKV parses "key value" lines (memory.stat, memory.events,
// memory.oom_control).
func parseKV(b []byte) map[string]float64 {
	out := map[string]float64{}
	scanKV(b, func(k []byte, v float64) { out[string(k)] = v })
	return out
}

// scanKV calls fn with each "key value" line of b whose value is a
// number, in file order; key aliases b. It is parseKV without the map:
// the memory cgroup's memory.stat has ~35 lines and the collector reads it
// every second for three or five of them.
func scanKV(b []byte, fn func(key []byte, v float64)) {
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		k, rest := nextSNMPField(line)
		val, rest := nextSNMPField(rest)
		if len(val) == 0 {
			continue
		}
		if extra, _ := nextSNMPField(rest); len(extra) > 0 {
			continue // not two fields
		}
		if v, err := parseCounter(val); err == nil {
			fn(k, v)
		}
	}
}

// The keys of the memory cgroup's files the collector keeps, and the name
// each is kept under: v1's total_* include descendants, as usage_in_bytes
// does. A key the file lacks stays absent: unknown, not zero.
var (
	v1StatKeys  = map[string]string{"total_rss": "anon", "total_cache": "file", "total_shmem": "shmem"}
	v1OOMKeys   = map[string]string{"oom_kill": "oom_kill"}
	v2StatKeys  = map[string]string{"anon": "anon", "file": "file", "shmem": "shmem", "kernel": "kernel", "sock": "sock"}
	v2EventKeys = map[string]string{"oom": "oom", "oom_kill": "oom_kill", "max": "max", "high": "high"}
)

// keepKeys is a scanKV callback storing the lines of want's keys in dst,
// under want's names: the lookup by string(key) and the stored names
// allocate nothing per read.
func keepKeys(dst map[string]float64, want map[string]string) func([]byte, float64) {
	return func(k []byte, v float64) {
		if name, ok := want[string(k)]; ok {
			dst[name] = v
		}
	}
}

// parsePressure reads "some avg10=1.50 ..." lines into avg10 ratios.
func parsePressure(b []byte) map[string]float64 {
	out := map[string]float64{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		f := bytes.Fields(line)
		if len(f) < 2 {
			continue
		}
		for _, kv := range f[1:] {
			if v, ok := bytes.CutPrefix(kv, []byte("avg10=")); ok {
				if x, err := strconv.ParseFloat(string(v), 64); err == nil {
					out[string(f[0])] = x / 100
				}
			}
		}
	}
	return out
}

// readFn reads a whole file: os.ReadFile, or a collector's fileCache.
type readFn func(path string) ([]byte, error)

func readNumber(path string) (float64, error) { return readNumberWith(os.ReadFile, path) }

func readNumberWith(rd readFn, path string) (float64, error) {
	b, err := rd(path)
	if err != nil {
		return 0, err
	}
	s := string(bytes.TrimSpace(b))
	if s == "max" {
		return 0, nil
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q: %w", path, s, errParse)
	}
	return v, nil
}

// readV1 reads a cgroup v1 memory directory.
func readV1(dir string) (cgroupMemory, error) { return readV1With(os.ReadFile, dir) }

func readV1With(rd readFn, dir string) (cgroupMemory, error) {
	m := cgroupMemory{Version: 1, Events: map[string]float64{}, Stat: map[string]float64{}}
	var err error
	if m.Usage, err = readNumberWith(rd, filepath.Join(dir, "memory.usage_in_bytes")); err != nil {
		return m, err
	}
	if m.Limit, err = readNumberWith(rd, filepath.Join(dir, "memory.limit_in_bytes")); err != nil {
		return m, err
	}
	if m.Limit >= v1Unlimited {
		m.Limit = 0
	}
	if b, err := rd(filepath.Join(dir, "memory.stat")); err == nil {
		scanKV(b, keepKeys(m.Stat, v1StatKeys))
	}
	if b, err := rd(filepath.Join(dir, "memory.oom_control")); err == nil {
		scanKV(b, keepKeys(m.Events, v1OOMKeys))
	}
	if v, err := readNumberWith(rd, filepath.Join(dir, "memory.failcnt")); err == nil {
		m.Events["max"] = v
	}
	return m, nil
}

// readV2 reads a cgroup v2 directory.
func readV2(dir string) (cgroupMemory, error) { return readV2With(os.ReadFile, dir) }

func readV2With(rd readFn, dir string) (cgroupMemory, error) {
	m := cgroupMemory{Version: 2, Stat: map[string]float64{}, Events: map[string]float64{}}
	var err error
	if m.Usage, err = readNumberWith(rd, filepath.Join(dir, "memory.current")); err != nil {
		return m, err
	}
	if m.Limit, err = readNumberWith(rd, filepath.Join(dir, "memory.max")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return m, err
	}
	if b, err := rd(filepath.Join(dir, "memory.stat")); err == nil {
		scanKV(b, keepKeys(m.Stat, v2StatKeys))
	}
	if b, err := rd(filepath.Join(dir, "memory.events")); err == nil {
		scanKV(b, keepKeys(m.Events, v2EventKeys))
	}
	if b, err := rd(filepath.Join(dir, "memory.pressure")); err == nil {
		m.Pressure = parsePressure(b)
	}
	return m, nil
}

// cgroupCollector reads the target's memory cgroup each cycle: /proc/PID/
// cgroup, a few stats for the directory, and five or six small files kept
// open (fileCache): ~20 us.
type cgroupCollector struct {
	procRoot, sysRoot string
	files             fileCache
	cg                procFile // /proc/PID/cgroup
	cgBuf             []byte
}

// Close closes the files kept open.
func (c *cgroupCollector) Close() error {
	c.files.close()
	c.cg.close()
	return nil
}

func newCgroupCollector(o Options) *cgroupCollector {
	c := &cgroupCollector{procRoot: o.ProcRoot, sysRoot: o.SysRoot}
	if c.procRoot == "" {
		c.procRoot = "/proc"
	}
	if c.sysRoot == "" {
		c.sysRoot = "/sys"
	}
	return c
}

func (*cgroupCollector) Name() string { return signals.CollectorCgroup }

// v2Dir is the directory of the target's v2 cgroup that holds file, or "".
// It is looked for under /sys/fs/cgroup (pure v2) and unified/ (hybrid);
// and, when the path climbs out of the agent's own cgroup namespace
// ("/../app": in a pod every container has its own, and the agent's
// /sys/fs/cgroup shows only its own cgroup), through the target's own
// mount of it, /proc/PID/root/sys/fs/cgroup, which is rooted at the
// target's cgroup.
func (c *cgroupCollector) v2Dir(pid int, v2, file string) string {
	base := filepath.Join(c.sysRoot, "fs", "cgroup")
	dirs := []string{filepath.Join(base, v2), filepath.Join(base, "unified", v2)}
	if strings.HasPrefix(v2, "/..") {
		dirs = []string{filepath.Join(c.procRoot, strconv.Itoa(pid), "root", "sys", "fs", "cgroup")}
	}
	for _, d := range dirs {
		if exists(filepath.Join(d, file)) {
			return d
		}
	}
	return ""
}

// memorySignals are every series this collector writes.
var memorySignals = []*signals.Desc{signals.CgroupInfo, signals.CgroupMemoryUsageBytes, signals.CgroupMemoryLimitBytes, signals.CgroupMemoryStatBytes, signals.CgroupMemoryEventsTotal, signals.CgroupMemoryPressureAvg10Ratio}

// Collect prefers the v1 memory controller when the target is in one
// (hybrid hosts mount memory only there); otherwise v2, at the root of
// /sys/fs/cgroup (pure v2, as most pods today) or under unified/ (hybrid).
// A target at the root of the hierarchy gets nothing: the root has no
// limit, and its usage and OOM kills are the whole host's.
func (c *cgroupCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	m, path, err := c.read(tgt.PID)
	if err != nil {
		// What was read of another cgroup is not this target's now.
		for _, d := range memorySignals {
			store.Forget(d, func(signals.Labels) bool { return false })
		}
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	now := time.Now()
	store.Forget(signals.CgroupInfo, func(ls signals.Labels) bool { return ls.Get("path") == path })
	store.Put(signals.CgroupInfo, signals.L("version", strconv.Itoa(m.Version), "path", path), 1, now)
	store.Put(signals.CgroupMemoryUsageBytes, nil, m.Usage, now)
	if m.Limit > 0 {
		store.Put(signals.CgroupMemoryLimitBytes, nil, m.Limit, now)
	} else {
		store.Forget(signals.CgroupMemoryLimitBytes, func(signals.Labels) bool { return false })
	}
	store.Forget(signals.CgroupMemoryStatBytes, func(ls signals.Labels) bool { _, ok := m.Stat[ls.Get("kind")]; return ok })
	for k, v := range m.Stat {
		store.Put(signals.CgroupMemoryStatBytes, signals.L("kind", k), v, now)
	}
	for k, v := range m.Events {
		store.Put(signals.CgroupMemoryEventsTotal, signals.L("event", k), v, now)
	}
	for k, v := range m.Pressure {
		store.Put(signals.CgroupMemoryPressureAvg10Ratio, signals.L("type", k), v, now)
	}
	return nil
}

// read finds and reads the target's memory cgroup.
func (c *cgroupCollector) read(pid int) (cgroupMemory, string, error) {
	b, err := c.cg.read(&c.cgBuf, filepath.Join(c.procRoot, strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return cgroupMemory{}, "", err
	}
	v1, v2 := memoryCgroupPaths(b)
	base := filepath.Join(c.sysRoot, "fs", "cgroup")
	if dir := filepath.Join(base, "memory", v1); v1 != "" && exists(filepath.Join(dir, "memory.usage_in_bytes")) {
		if isV1Root(dir, v1) {
			return cgroupMemory{}, "", fmt.Errorf("at the root of the v1 memory hierarchy, whose usage is the host's: %w", ErrNoData)
		}
		m, err := readV1With(c.files.read, dir)
		if err != nil {
			return m, v1, fmt.Errorf("cgroup v1 %s: %w", v1, err)
		}
		return m, v1, nil
	}
	if v2 == "" {
		return cgroupMemory{}, "", fmt.Errorf("no memory cgroup mounted for it: %w", ErrNoData)
	}
	// The v2 root has no memory.current; a container's namespace root,
	// which looks like it, does.
	dir := c.v2Dir(pid, v2, "memory.current")
	switch {
	case dir == "":
		return cgroupMemory{}, "", fmt.Errorf("no memory cgroup mounted for it: %w", ErrNoData)
	case isV2Root(dir, v2):
		return cgroupMemory{}, "", fmt.Errorf("in the root cgroup, whose usage is the host's: %w", ErrNoData)
	}
	m, err := readV2With(c.files.read, dir)
	if err != nil {
		return m, v2, fmt.Errorf("cgroup v2 %s: %w", v2, err)
	}
	return m, v2, nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// MemoryLimitOf is the memory limit of pid's cgroup (v1
// memory.limit_in_bytes or v2 memory.max, found through /proc/PID/cgroup as
// the cgroup collector finds the target's), and the cgroup's path; 0 when
// the cgroup has no limit or none can be read. The agent reads its own, to
// keep its Go heap under its container's limit.
func MemoryLimitOf(procRoot, sysRoot string, pid int) (int64, string, error) {
	c := newCgroupCollector(Options{ProcRoot: procRoot, SysRoot: sysRoot})
	defer c.Close()
	m, path, err := c.read(pid)
	if err != nil {
		return 0, path, err
	}
	return int64(m.Limit), path, nil
}
