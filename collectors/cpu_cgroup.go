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
	"github.com/culprit-dev/culprit/workload"
)

func init() {
	register(signals.CollectorCPUCgroup, false, func(o Options) (Collector, error) { return newCPUCgroupCollector(o), nil })
}

// cpuCounters are the counters one cgroupCPU read may give.
var cpuCounters = []*signals.Desc{signals.CgroupCPUPeriodsTotal, signals.CgroupCPUThrottledPeriodsTotal,
	signals.CgroupCPUThrottledSecondsTotal, signals.CgroupCPUUsageSecondsTotal}

// cpuSignals are every series this collector writes.
var cpuSignals = append([]*signals.Desc{signals.CgroupCPUInfo, signals.CgroupCPUQuotaCores,
	signals.CgroupCPUPeriodSeconds, signals.CgroupCPUPressureAvg10Ratio}, cpuCounters...)

// Where cgroup_cpu_usage_seconds_total comes from, or why it is unknown
// (the usage label of cgroup_cpu_info). An unknown usage is absent: never
// replaced by a counter that counts something else.
const (
	usageCPUAcct = "cpuacct"  // v1 cpuacct.usage of the same cgroup
	usageCPUStat = "cpu.stat" // v2 usage_usec
	// The target is at the root of the cpuacct hierarchy: the root's
	// counter is the whole host's.
	usageAtRoot = "unknown_root"
	// cpuacct holds the target in another group than cpu does: its usage
	// is not that of the tasks the quota limits.
	usageOtherGroup = "unknown_other_cgroup"
	usageMissing    = "unknown_missing" // no cpuacct hierarchy or usage file
)

// cgroupCPU is what one read of a CPU cgroup gives.
type cgroupCPU struct {
	Version int
	// Counters by signal (see cpuCounters); a counter the cgroup does
	// not report is absent (v2 without the cpu controller has no periods).
	Counters map[*signals.Desc]float64
	Quota    float64            // cores; 0: unlimited
	Period   float64            // seconds, with a quota
	Pressure map[string]float64 // some, full: avg10 as a ratio (v2)
	Usage    string             // where the usage counter comes from (usage* above)
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

// isV1Root says whether dir, found at path of a v1 hierarchy, is that
// hierarchy's root: only the root has release_agent. A container with its
// own cgroup namespace sees its cgroup as "/", without that file.
func isV1Root(dir, path string) bool {
	return path == "/" && (exists(filepath.Join(dir, "release_agent")) || exists(filepath.Join(dir, "cgroup.sane_behavior")))
}

// isV2Root says whether dir, found for path, is the root of the v2
// hierarchy: only non-root cgroups have cgroup.type and cgroup.events. A
// path of "/" (or out of the agent's namespace, "/..") may be a container's
// namespace root, which is an ordinary cgroup.
func isV2Root(dir, path string) bool {
	if path != "/" && !strings.HasPrefix(path, "/..") {
		return false
	}
	return !exists(filepath.Join(dir, "cgroup.type")) && !exists(filepath.Join(dir, "cgroup.events"))
}

// readCPUV1With reads a cgroup v1 cpu directory and, when acct is not "", the
// usage in acct (a cpuacct directory holding the same tasks; usage says
// where it comes from or why it is unknown). Hybrid hosts like this
// project's mount cpu and cpuacct apart; most mount them together, and
// then acct is the same directory.
func readCPUV1With(rd readFn, dir, acct, usage string) (cgroupCPU, error) {
	m := cgroupCPU{Version: 1, Counters: map[*signals.Desc]float64{}, Usage: usage}
	b, err := rd(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return m, err
	}
	st := parseKV(b)
	m.Counters[signals.CgroupCPUPeriodsTotal] = st["nr_periods"]
	m.Counters[signals.CgroupCPUThrottledPeriodsTotal] = st["nr_throttled"]
	m.Counters[signals.CgroupCPUThrottledSecondsTotal] = st["throttled_time"] / 1e9
	quota, err := readNumberWith(rd, filepath.Join(dir, "cpu.cfs_quota_us"))
	if err != nil {
		return m, err
	}
	period, err := readNumberWith(rd, filepath.Join(dir, "cpu.cfs_period_us"))
	if err != nil {
		return m, err
	}
	if quota > 0 && period > 0 { // -1: unlimited
		m.Quota, m.Period = quota/period, period/1e6
	}
	if acct != "" {
		switch u, err := readNumberWith(rd, filepath.Join(acct, "cpuacct.usage")); {
		case errors.Is(err, os.ErrNotExist):
			m.Usage = usageMissing
		case err != nil:
			return m, err
		default:
			m.Counters[signals.CgroupCPUUsageSecondsTotal] = u / 1e9
		}
	}
	return m, nil
}

// readCPUV2With reads a cgroup v2 directory. cpu.stat always has usage_usec;
// the throttling fields and cpu.max need the cpu controller enabled.
func readCPUV2With(rd readFn, dir string) (cgroupCPU, error) {
	m := cgroupCPU{Version: 2, Counters: map[*signals.Desc]float64{}, Usage: usageMissing}
	b, err := rd(filepath.Join(dir, "cpu.stat"))
	if err != nil {
		return m, err
	}
	st := parseKV(b)
	for key, d := range map[string]*signals.Desc{
		"usage_usec":     signals.CgroupCPUUsageSecondsTotal,
		"nr_periods":     signals.CgroupCPUPeriodsTotal,
		"nr_throttled":   signals.CgroupCPUThrottledPeriodsTotal,
		"throttled_usec": signals.CgroupCPUThrottledSecondsTotal,
	} {
		if v, ok := st[key]; ok {
			if strings.HasSuffix(key, "_usec") {
				v /= 1e6
			}
			m.Counters[d] = v
		}
	}
	if _, ok := m.Counters[signals.CgroupCPUUsageSecondsTotal]; ok {
		m.Usage = usageCPUStat
	}
	switch b, err := rd(filepath.Join(dir, "cpu.max")); {
	case errors.Is(err, os.ErrNotExist): // no cpu controller, or the root
	case err != nil:
		return m, err
	default:
		if m.Quota, m.Period, err = parseCPUMax(b); err != nil {
			return m, fmt.Errorf("%s: %w", filepath.Join(dir, "cpu.max"), err)
		}
	}
	if b, err := rd(filepath.Join(dir, "cpu.pressure")); err == nil {
		m.Pressure = parsePressure(b)
	}
	return m, nil
}

// parseCPUMax reads cpu.max, "$MAX $PERIOD", into cores and the period
// in seconds (0, 0: "max").
func parseCPUMax(b []byte) (cores, period float64, err error) {
	f := bytes.Fields(b)
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("%q: %w", b, errParse)
	}
	if string(f[0]) == "max" {
		return 0, 0, nil
	}
	quota, err := strconv.ParseFloat(string(f[0]), 64)
	if err != nil {
		return 0, 0, fmt.Errorf("%q: %w", b, errParse)
	}
	us, err := strconv.ParseFloat(string(f[1]), 64)
	if err != nil || us <= 0 {
		return 0, 0, fmt.Errorf("%q: %w", b, errParse)
	}
	return quota / us, us / 1e6, nil
}

// cpuCgroupCollector has the roots of the memory one.
type cpuCgroupCollector cgroupCollector

func newCPUCgroupCollector(o Options) *cpuCgroupCollector {
	return (*cpuCgroupCollector)(newCgroupCollector(o))
}

func (*cpuCgroupCollector) Name() string { return signals.CollectorCPUCgroup }

// Close closes the files kept open.
func (c *cpuCgroupCollector) Close() error { return (*cgroupCollector)(c).Close() }

// Collect prefers the v1 cpu controller when the target is in one
// (hybrid hosts mount it only there); otherwise v2, at the root of
// /sys/fs/cgroup (pure v2, as most pods) or under unified/ (hybrid, usage
// and PSI only). A target at the root of a hierarchy gets nothing from
// it: the root has no quota and its counters are the whole host's.
func (c *cpuCgroupCollector) Collect(_ context.Context, tgt workload.Process, store *signals.Store) error {
	b, err := c.cg.read(&c.cgBuf, filepath.Join(c.procRoot, strconv.Itoa(tgt.PID), "cgroup"))
	if err != nil {
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	m, path, err := c.read(tgt.PID, b)
	if err != nil {
		// What was known of another cgroup (or of this one before it
		// became unreadable) is not this target's now.
		for _, d := range cpuSignals {
			store.Forget(d, func(signals.Labels) bool { return false })
		}
		return fmt.Errorf("pid %d: %w", tgt.PID, err)
	}
	now := time.Now()
	info := signals.L("version", strconv.Itoa(m.Version), "path", path, "usage", m.Usage)
	store.Forget(signals.CgroupCPUInfo, func(ls signals.Labels) bool { return ls.String() == info.String() })
	store.Put(signals.CgroupCPUInfo, info, 1, now)
	for _, d := range cpuCounters {
		if v, ok := m.Counters[d]; ok {
			store.Put(d, nil, v, now)
		} else {
			store.Forget(d, func(signals.Labels) bool { return false })
		}
	}
	if m.Quota > 0 {
		store.Put(signals.CgroupCPUQuotaCores, nil, m.Quota, now)
		store.Put(signals.CgroupCPUPeriodSeconds, nil, m.Period, now)
	} else {
		store.Forget(signals.CgroupCPUQuotaCores, func(signals.Labels) bool { return false })
		store.Forget(signals.CgroupCPUPeriodSeconds, func(signals.Labels) bool { return false })
	}
	if len(m.Pressure) == 0 {
		store.Forget(signals.CgroupCPUPressureAvg10Ratio, func(signals.Labels) bool { return false })
	}
	for k, v := range m.Pressure {
		store.Put(signals.CgroupCPUPressureAvg10Ratio, signals.L("type", k), v, now)
	}
	return nil
}

// read finds and reads the target's CPU cgroup from its /proc/PID/cgroup.
func (c *cpuCgroupCollector) read(pid int, procCgroup []byte) (cgroupCPU, string, error) {
	base := filepath.Join(c.sysRoot, "fs", "cgroup")
	mount, v1, v2 := cgroupOf(procCgroup, "cpu")
	if dir := v1Dir(base, mount, "cpu", v1, "cpu.cfs_quota_us"); dir != "" && !isV1Root(dir, v1) {
		acct, usage := dir, usageCPUAcct
		if !exists(filepath.Join(dir, "cpuacct.usage")) {
			acct, usage = v1Acct(base, procCgroup, v1)
		}
		m, err := readCPUV1With(c.files.read, dir, acct, usage)
		if err != nil {
			return m, v1, fmt.Errorf("cgroup v1 cpu %s: %w", v1, err)
		}
		return m, v1, nil
	}
	if v2 == "" {
		return cgroupCPU{}, "", fmt.Errorf("no CPU cgroup in /proc/PID/cgroup: %w", ErrNoData)
	}
	dir := (*cgroupCollector)(c).v2Dir(pid, v2, "cpu.stat")
	switch {
	case dir == "":
		return cgroupCPU{}, "", fmt.Errorf("no CPU cgroup mounted for it: %w", ErrNoData)
	case isV2Root(dir, v2):
		return cgroupCPU{}, "", fmt.Errorf("in the root cgroup, whose CPU counters are the host's: %w", ErrNoData)
	}
	m, err := readCPUV2With(c.files.read, dir)
	if err != nil {
		return m, v2, fmt.Errorf("cgroup v2 %s: %w", v2, err)
	}
	return m, v2, nil
}

// v1Acct finds the cpuacct directory that counts the tasks of the v1 cpu
// cgroup at cpuPath, on a host that mounts cpuacct apart. Its usage is
// the quota's tasks' only when cpuacct holds the target in a cgroup of
// the same path (as runtimes and systemd make them); at its root the
// counter is the host's. Otherwise the usage is unknown: "" and why.
func v1Acct(base string, procCgroup []byte, cpuPath string) (string, string) {
	am, ap, _ := cgroupOf(procCgroup, "cpuacct")
	dir := v1Dir(base, am, "cpuacct", ap, "cpuacct.usage")
	switch {
	case dir == "":
		return "", usageMissing
	case isV1Root(dir, ap):
		return "", usageAtRoot
	case ap != cpuPath:
		return "", usageOtherGroup
	}
	return dir, usageCPUAcct
}
