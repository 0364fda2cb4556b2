package collectors

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/target"
)

func init() {
	register("cpu_cgroup", false, func(o Options) (Collector, error) { return newCPUCgroupCollector(o), nil })
}

var (
	cpuInfoDesc = &signals.Desc{Name: "cgroup_cpu_info", Kind: signals.Gauge,
		Help: "1 for the target's CPU cgroup: its version (1 or 2) and path."}
	cpuPeriodsDesc = &signals.Desc{Name: "cgroup_cpu_periods_total", Kind: signals.Counter,
		Help: "CFS bandwidth periods in which the target's cgroup had runnable tasks (v1 and v2 cpu.stat nr_periods; counted only under a quota)."}
	cpuThrottledPeriodsDesc = &signals.Desc{Name: "cgroup_cpu_throttled_periods_total", Kind: signals.Counter,
		Help: "CFS periods in which the target's cgroup used up its quota and was throttled (cpu.stat nr_throttled)."}
	cpuThrottledSecondsDesc = &signals.Desc{Name: "cgroup_cpu_throttled_seconds_total", Kind: signals.Counter,
		Help: "Time the target cgroup's runnable tasks spent throttled, summed over CPUs (v1 cpu.stat throttled_time, v2 throttled_usec)."}
	cpuUsageDesc = &signals.Desc{Name: "cgroup_cpu_usage_seconds_total", Kind: signals.Counter,
		Help: "CPU time used by the target's cgroup (v1 cpuacct.usage, v2 cpu.stat usage_usec)."}
	cpuQuotaDesc = &signals.Desc{Name: "cgroup_cpu_quota_cores", Kind: signals.Gauge,
		Help: "CPU limit of the target's cgroup in cores: CFS quota / period (absent when unlimited)."}
	cpuPressureDesc = &signals.Desc{Name: "cgroup_cpu_pressure_avg10_ratio", Kind: signals.Gauge,
		Help: "Share of the last 10 s tasks of the cgroup waited for a CPU (PSI, v2 only; type some or full)."}
)

// cpuCounters maps the counters of one cgroupCPU read to their signals.
var cpuCounters = map[string]*signals.Desc{
	"cgroup_cpu_periods_total":           cpuPeriodsDesc,
	"cgroup_cpu_throttled_periods_total": cpuThrottledPeriodsDesc,
	"cgroup_cpu_throttled_seconds_total": cpuThrottledSecondsDesc,
	"cgroup_cpu_usage_seconds_total":     cpuUsageDesc,
}

// cgroupCPU is what one read of a CPU cgroup gives.
type cgroupCPU struct {
	Version int
	// Counters by signal name (see cpuCounters); a counter the cgroup does
	// not report is absent (v2 without the cpu controller has no periods).
	Counters map[string]float64
	Quota    float64            // cores; 0: unlimited
	Pressure map[string]float64 // some, full: avg10 as a ratio (v2)
}

// cgroupOf finds controller in a /proc/PID/cgroup file: the v1 hierarchy
// that holds it (mount: the comma list it is mounted under, as
// "cpu,cpuacct") with the path in it, and the v2 path. Empty when absent.
func cgroupOf(b []byte, controller string) (mount, v1, v2 string) {
	for line := range strings.Lines(string(b)) {
		id, rest, ok := strings.Cut(strings.TrimRight(line, "\n"), ":")
		ctrls, path, ok2 := strings.Cut(rest, ":")
		switch {
		case !ok || !ok2:
		case id == "0" && ctrls == "":
			v2 = path
		case slices.Contains(strings.Split(ctrls, ","), controller):
			mount, v1 = ctrls, path
		}
	}
	return mount, v1, v2
}

// v1Dir returns the directory of path in the v1 hierarchy of controller
// that holds file: the hierarchy is mounted under its comma list
// (cpu,cpuacct) or under the controller's own name (systemd's symlinks, or
// a host mounting each controller alone). "" when neither has it.
func v1Dir(base, mount, controller, path, file string) string {
	if path == "" {
		return ""
	}
	for _, m := range []string{mount, controller} {
		if d := filepath.Join(base, m, path); exists(filepath.Join(d, file)) {
			return d
		}
	}
	return ""
}

// readCPUV1 reads a cgroup v1 cpu directory and, when the cpuacct
// hierarchy has the target (acct != ""), its usage. Hybrid hosts like this
// project's mount cpu and cpuacct apart; most mount them together, and
// then acct is the same directory.
func readCPUV1(dir, acct string) (cgroupCPU, error) {
	m := cgroupCPU{Version: 1, Counters: map[string]float64{}}
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return m, err
	}
	st := parseKV(b)
	m.Counters["cgroup_cpu_periods_total"] = st["nr_periods"]
	m.Counters["cgroup_cpu_throttled_periods_total"] = st["nr_throttled"]
	m.Counters["cgroup_cpu_throttled_seconds_total"] = st["throttled_time"] / 1e9
	quota, err := readNumber(filepath.Join(dir, "cpu.cfs_quota_us"))
	if err != nil {
		return m, err
	}
	period, err := readNumber(filepath.Join(dir, "cpu.cfs_period_us"))
	if err != nil {
		return m, err
	}
	if quota > 0 && period > 0 { // -1: unlimited
		m.Quota = quota / period
	}
	if acct != "" {
		if u, err := readNumber(filepath.Join(acct, "cpuacct.usage")); err == nil {
			m.Counters["cgroup_cpu_usage_seconds_total"] = u / 1e9
		}
	}
	return m, nil
}

// readCPUV2 reads a cgroup v2 directory. cpu.stat always has usage_usec;
// the throttling fields and cpu.max need the cpu controller enabled.
func readCPUV2(dir string) (cgroupCPU, error) {
	m := cgroupCPU{Version: 2, Counters: map[string]float64{}}
	b, err := os.ReadFile(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return m, err
	}
	st := parseKV(b)
	for key, name := range map[string]string{
		"usage_usec":     "cgroup_cpu_usage_seconds_total",
		"nr_periods":     "cgroup_cpu_periods_total",
		"nr_throttled":   "cgroup_cpu_throttled_periods_total",
		"throttled_usec": "cgroup_cpu_throttled_seconds_total",
	} {
		if v, ok := st[key]; ok {
			if strings.HasSuffix(key, "_usec") {
				v /= 1e6
			}
			m.Counters[name] = v
		}
	}
	switch b, err := os.ReadFile(filepath.Join(dir, "cpu.max")); {
	case errors.Is(err, os.ErrNotExist): // no cpu controller, or the root
	case err != nil:
		return m, err
	default:
		if m.Quota, err = parseCPUMax(b); err != nil {
			return m, fmt.Errorf("%s: %w", filepath.Join(dir, "cpu.max"), err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cpu.pressure")); err == nil {
		m.Pressure = parsePressure(b)
	}
	return m, nil
}

// parseCPUMax reads cpu.max, "$MAX $PERIOD", into cores (0: "max").
func parseCPUMax(b []byte) (float64, error) {
	f := bytes.Fields(b)
	if len(f) != 2 {
		return 0, fmt.Errorf("%q: %w", b, errParse)
	}
	if string(f[0]) == "max" {
		return 0, nil
	}
	quota, err := strconv.ParseFloat(string(f[0]), 64)
	if err != nil {
		return 0, fmt.Errorf("%q: %w", b, errParse)
	}
	period, err := strconv.ParseFloat(string(f[1]), 64)
	if err != nil || period <= 0 {
		return 0, fmt.Errorf("%q: %w", b, errParse)
	}
	return quota / period, nil
}

// cpuCgroupCollector has the roots of the memory one.
type cpuCgroupCollector cgroupCollector

func newCPUCgroupCollector(o Options) *cpuCgroupCollector {
	return (*cpuCgroupCollector)(newCgroupCollector(o))
}

func (*cpuCgroupCollector) Name() string { return "cpu_cgroup" }

// Collect prefers the v1 cpu controller when the target is in one (hybrid
// hosts mount it only there); otherwise v2, at the root of /sys/fs/cgroup
// (pure v2, as most pods) or under unified/ (hybrid, usage and PSI only).
func (c *cpuCgroupCollector) Collect(_ context.Context, tgt target.Process, store *signals.Store) error {
	b, err := os.ReadFile(filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "cgroup"))
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	m, path, err := c.read(tgt.PID, b)
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	now := time.Now()
	store.Forget("cgroup_cpu_info", func(ls signals.Labels) bool { return ls.Get("path") == path })
	store.Put(cpuInfoDesc, signals.L("version", strconv.Itoa(m.Version), "path", path), 1, now)
	for name, v := range m.Counters {
		store.Put(cpuCounters[name], nil, v, now)
	}
	if m.Quota > 0 {
		store.Put(cpuQuotaDesc, nil, m.Quota, now)
	} else {
		store.Forget("cgroup_cpu_quota_cores", func(signals.Labels) bool { return false })
	}
	for k, v := range m.Pressure {
		store.Put(cpuPressureDesc, signals.L("type", k), v, now)
	}
	return nil
}

// read finds and reads the target's CPU cgroup from its /proc/PID/cgroup.
func (c *cpuCgroupCollector) read(pid int, procCgroup []byte) (cgroupCPU, string, error) {
	base := filepath.Join(c.sysRoot, "fs", "cgroup")
	mount, v1, v2 := cgroupOf(procCgroup, "cpu")
	if dir := v1Dir(base, mount, "cpu", v1, "cpu.cfs_quota_us"); dir != "" {
		acct := dir
		if !exists(filepath.Join(dir, "cpuacct.usage")) {
			am, ap, _ := cgroupOf(procCgroup, "cpuacct")
			acct = v1Dir(base, am, "cpuacct", ap, "cpuacct.usage")
		}
		m, err := readCPUV1(dir, acct)
		if err != nil {
			return m, v1, fmt.Errorf("cgroup v1 cpu %s: %w", v1, err)
		}
		return m, v1, nil
	}
	if v2 == "" {
		return cgroupCPU{}, "", fmt.Errorf("no CPU cgroup in /proc/PID/cgroup: %w", ErrNoData)
	}
	if dir := (*cgroupCollector)(c).v2Dir(pid, v2, "cpu.stat"); dir != "" {
		m, err := readCPUV2(dir)
		if err != nil {
			return m, v2, fmt.Errorf("cgroup v2 %s: %w", v2, err)
		}
		return m, v2, nil
	}
	return cgroupCPU{}, "", fmt.Errorf("no CPU cgroup mounted for it: %w", ErrNoData)
}
