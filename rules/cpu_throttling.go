package rules

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseCPUQuotaThrottled is cpu_throttling's cause.
const CauseCPUQuotaThrottled = "cpu_quota_throttled"

// Defaults of CPUThrottlingOptions, taken by zero fields.
const (
	DefaultCPUThrottlingWindow    = 10 * time.Second
	DefaultCPUMinThrottledRatio   = 0.2
	DefaultCPUMinThrottledPeriods = 5
)

// DefaultCPUThrottlingOptions are the defaults agent.conf documents.
func DefaultCPUThrottlingOptions() CPUThrottlingOptions {
	return CPUThrottlingOptions{Window: DefaultCPUThrottlingWindow, MinThrottledRatio: DefaultCPUMinThrottledRatio, MinThrottledPeriods: DefaultCPUMinThrottledPeriods}
}

const (
	cpuStale         = 3 * time.Second // samples older than this are not the present
	cpuBurstyUsage   = 0.8             // throttled with usage below this share of the quota: bursts
	cpuCriticalRatio = 0.5             // throttled ratio from which the finding is critical
	cpuRatioSignal   = "cgroup_cpu_throttled_periods_total / cgroup_cpu_periods_total"
)

// CPUThrottlingOptions ([rules.cpu_throttling] in agent.conf). Zero fields
// take the defaults.
type CPUThrottlingOptions struct {
	// Window over which periods and throttled periods are counted (10s).
	Window time.Duration `toml:"window" range:"[1s,1h]"`
	// MinThrottledRatio: throttled periods / periods at or above this fires
	// (0.2).
	MinThrottledRatio float64 `toml:"min_throttled_ratio" range:"(0,1]"`
	// MinThrottledPeriods: and at least this many throttled periods in the
	// window (5), so a cgroup that barely ran cannot fire on 1 of 2.
	MinThrottledPeriods float64 `toml:"min_throttled_periods" range:"[1,1000000]"`
}

// CPUThrottling names a CPU limit that throttles the service (seed 000:
// Tokio or GOMAXPROCS sized to the node's cores under a small quota). The
// CFS quota lets the cgroup run quota µs per period, summed over all its
// threads; a pool of N busy threads spends it in period/N and then every
// thread waits for the next period. Average CPU stays at or below the
// limit while requests stall for tens of milliseconds.
type CPUThrottling struct {
	o CPUThrottlingOptions
	h hysteresis
}

func NewCPUThrottling(o CPUThrottlingOptions) *CPUThrottling {
	if o.Window <= 0 {
		o.Window = DefaultCPUThrottlingWindow
	}
	if o.MinThrottledRatio <= 0 {
		o.MinThrottledRatio = DefaultCPUMinThrottledRatio
	}
	if o.MinThrottledPeriods <= 0 {
		o.MinThrottledPeriods = DefaultCPUMinThrottledPeriods
	}
	return &CPUThrottling{o: o}
}

func (*CPUThrottling) Name() string { return "cpu_throttling" }

func (*CPUThrottling) Needs() []Need {
	return []Need{
		{Component: signals.CollectorCPUCgroup, What: "the cgroup's CPU quota and throttled periods", Essential: true},
		{Component: signals.CollectorThreads, What: "how many of the target's threads are runnable"},
	}
}

func (r *CPUThrottling) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	fresh := func(s signals.Sample, ok bool) bool { return ok && now.Sub(s.T) <= cpuStale }
	last, ok := st.Latest(signals.CgroupCPUPeriodsTotal, nil)
	quota, okq := st.Latest(signals.CgroupCPUQuotaCores, nil)
	if !fresh(last, ok) || !fresh(quota, okq) || quota.V <= 0 {
		return nil // no quota: nothing can throttle this cgroup itself
	}
	// Throttling that began inside the window, after a quiet time, is
	// counted from where it began: the quiet periods before it would
	// dilute the share and the usage. Throttling that only changed pace
	// inside the window is counted over the whole window, which is what
	// the numbers then say.
	from := now.Add(-r.o.Window)
	base, span := from, coveredSpan(st.Range(signals.CgroupCPUPeriodsTotal, nil, time.Time{}), from)
	began := time.Time{}
	thr := cumulative(st.Range(signals.CgroupCPUThrottledPeriodsTotal, nil, from))
	if g, ok := growthOf(thr); ok && !g.sinceStart && !g.unsure && g.rate > 0 {
		f := g.from()
		if quiet := f.V - thr[0].V; quiet < 1 {
			// Just after the sample the growth is counted from, so that
			// it is Increase's baseline: the counts are from it on, and
			// so is the time.
			began, base, span = f.T, f.T.Add(time.Nanosecond), g.last.T.Sub(f.T)
		}
	}
	over := "over the last " + duration(span)
	if !began.IsZero() {
		over = "since " + began.Format("15:04:05") + " (" + duration(span) + ")"
	}
	periods := st.Increase(signals.CgroupCPUPeriodsTotal, nil, base)
	throttled := st.Increase(signals.CgroupCPUThrottledPeriodsTotal, nil, base)
	ratio := 0.0
	if periods > 0 {
		ratio = min(throttled/periods, 1)
	}
	if !r.h.hold("throttled", now,
		periods > 0 && throttled >= r.o.MinThrottledPeriods && ratio >= r.o.MinThrottledRatio,
		periods > 0 && throttled >= r.o.MinThrottledPeriods/2 && ratio >= 0.75*r.o.MinThrottledRatio) {
		return nil
	}
	path, usageFrom := cpuCgroupInfo(st)
	rate := func(d *signals.Desc) (float64, bool) {
		if s, ok := st.Latest(d, nil); !fresh(s, ok) || span <= 0 {
			return 0, false
		}
		return st.Increase(d, nil, base) / span.Seconds(), true
	}
	// Usage only from the cgroup's own counter: never a root's (the
	// host's), nor another group's.
	usage, haveUsage := 0.0, false
	if !strings.HasPrefix(usageFrom, "unknown") {
		usage, haveUsage = rate(signals.CgroupCPUUsageSecondsTotal)
	}
	waited, haveWaited := rate(signals.CgroupCPUThrottledSecondsTotal)
	q := quotaCores(quota.V)

	ev := []Evidence{
		{Signal: cpuRatioSignal, Value: ratio, Threshold: r.o.MinThrottledRatio, Unit: "ratio", Window: span, Note: "share of CFS periods that ended throttled"},
		{Signal: signals.CgroupCPUThrottledPeriodsTotal.Name, Value: throttled, Threshold: r.o.MinThrottledPeriods, Unit: "periods", Window: span, Note: "periods in which the quota ran out"},
		{Signal: signals.CgroupCPUPeriodsTotal.Name, Value: periods, Unit: "periods", Window: span, Note: "periods with runnable tasks"},
		{Signal: signals.CgroupCPUQuotaCores.Name, Value: quota.V, Unit: "cores", Note: "CFS quota / period"},
	}
	var rc strings.Builder
	fmt.Fprintf(&rc, "a CPU limit of %s (CFS quota) throttled the cgroup in %s of its periods %s", q, percent(ratio), over)
	if haveUsage {
		ev = append(ev, Evidence{Signal: signals.CgroupCPUUsageSecondsTotal.Name, Value: usage, Threshold: quota.V, Unit: "cores", Window: span, Note: "CPU seconds used per second"})
		fmt.Fprintf(&rc, "; it used %s (%s of the limit)", cores(usage), percent(usage/quota.V))
	} else {
		rc.WriteString("; " + unknownUsage(usageFrom))
	}
	if haveWaited {
		ev = append(ev, Evidence{Signal: signals.CgroupCPUThrottledSecondsTotal.Name, Value: waited, Unit: "s/s", Window: span, Note: "time runnable tasks were held back, summed over CPUs"})
		fmt.Fprintf(&rc, "; its tasks were held back %s s per second, summed over CPUs", strconv.FormatFloat(math.Round(waited*100)/100, 'f', -1, 64))
	}
	if runnable, ok := st.Latest(signals.ProcessThreads, signals.L("state", "R")); fresh(runnable, ok) && runnable.V > 0 {
		ev = append(ev, Evidence{Signal: `process_threads{state="R"}`, Value: runnable.V, Threshold: quota.V, Unit: "threads", Note: "threads of the target runnable at the last sample, against the quota"})
		verb := "were"
		if runnable.V == 1 {
			verb = "was"
		}
		fmt.Fprintf(&rc, "; %s of the target %s runnable at the last sample, for %s", count(runnable.V, "thread", ""), verb, q)
	}
	for _, typ := range []string{"some", "full"} {
		p, ok := st.Latest(signals.CgroupCPUPressureAvg10Ratio, signals.L("type", typ))
		if !fresh(p, ok) {
			continue
		}
		ev = append(ev, Evidence{Signal: `cgroup_cpu_pressure_avg10_ratio{type="` + typ + `"}`, Value: p.V, Unit: "ratio", Window: 10 * time.Second, Note: "PSI: share of time tasks waited for a CPU"})
		if typ == "some" && p.V > 0 {
			fmt.Fprintf(&rc, "; CPU pressure (PSI some): tasks waited for a CPU %s of the last 10 s", percent(p.V))
		}
	}
	if haveUsage && usage < cpuBurstyUsage*quota.V {
		rc.WriteString("; usage averages below the limit, so the quota is spent in bursts by more threads than it allows (a worker pool sized to the node's cores)")
	}

	sev := SeverityWarning
	if r.h.hold("critical", now, ratio >= cpuCriticalRatio, ratio >= 0.9*cpuCriticalRatio) {
		sev = SeverityCritical
	}
	workers := max(1, int(math.Ceil(quota.V)))
	observed := " The cgroup's own CPU usage is unknown here, so compare the limit with the service's usage measured elsewhere."
	if haveUsage {
		observed = fmt.Sprintf(" Observed %s against a %s limit.", cores(usage), quotaNum(quota.V)+"-core")
	}
	fix := "Raise the CPU limit above the service's usage (or remove it and keep requests), or request whole cores; " +
		"with a runtime that sizes its worker pool from the host's CPUs, set the worker count to the quota" +
		fmt.Sprintf(" (%d: GOMAXPROCS=%d for Go before 1.25, which does not read the quota; TOKIO_WORKER_THREADS=%d or Builder::worker_threads for Tokio).", workers, workers, workers) +
		observed
	wait := "the next period (100 ms by default)"
	if p, ok := st.Latest(signals.CgroupCPUPeriodSeconds, nil); fresh(p, ok) && p.V > 0 {
		wait = "the next period (" + duration(time.Duration(p.V*float64(time.Second))) + ")"
	}
	key := path
	if key == "" {
		key = "cgroup"
	}
	return []Observation{{
		Key:         key,
		Cause:       CauseCPUQuotaThrottled,
		Title:       fmt.Sprintf("CPU throttled in %s of periods by a %s limit", percent(ratio), quotaNum(quota.V)+"-core"),
		Symptom:     fmt.Sprintf("the cgroup was throttled in %s of %s %s: each time, its runnable threads wait for %s, which shows as latency spikes", num(throttled), count(periods, "CFS period", ""), over, wait),
		RootCause:   rc.String(),
		Severity:    sev,
		Confidence:  0.9,
		Evidence:    ev,
		Artifacts:   []Artifact{{Kind: "cgroup", Value: path, Detail: "CPU quota " + q}},
		Remediation: fix,
		Labels:      map[string]string{"cgroup": path},
	}}
}

// unknownUsage says why the cgroup's CPU usage is not given, from the
// usage label of cgroup_cpu_info.
func unknownUsage(from string) string {
	switch from {
	case "unknown_root":
		return "its CPU usage is unknown: the target is at the root of the cpuacct hierarchy, whose counter is the whole host's"
	case "unknown_other_cgroup":
		return "its CPU usage is unknown: cpuacct counts the target in another cgroup than the one the quota limits"
	}
	return "its CPU usage is unknown: the cgroup has no usage counter"
}

// coveredSpan is the time Store.Increase(from) covers for these samples
// (oldest first): from the baseline, the last sample before from (or the
// first one after it), to the newest.
func coveredSpan(s []signals.Sample, from time.Time) time.Duration {
	if len(s) == 0 {
		return 0
	}
	base := 0
	for i, smp := range s {
		if !smp.T.Before(from) {
			break
		}
		base = i
	}
	return s[len(s)-1].T.Sub(s[base].T)
}

// cpuCgroupInfo is the path and usage labels of the newest
// cgroup_cpu_info series.
func cpuCgroupInfo(st *signals.Store) (path, usage string) {
	newest := time.Time{}
	for _, ls := range st.Select(signals.CgroupCPUInfo) {
		if s, ok := st.Latest(signals.CgroupCPUInfo, ls); ok && s.T.After(newest) {
			path, usage, newest = ls.Get("path"), ls.Get("usage"), s.T
		}
	}
	return path, usage
}

// quotaNum prints a quota with the precision it has: 0.25, 1.5, 2 (num
// would round 0.25 to 0.2).
func quotaNum(c float64) string {
	if c >= 10 {
		return strconv.FormatFloat(c, 'f', 0, 64)
	}
	return strconv.FormatFloat(math.Round(c*100)/100, 'f', -1, 64)
}

// quotaCores is a quota in words: "0.25 cores", "1 core".
func quotaCores(c float64) string {
	if s := quotaNum(c); s != "1" {
		return s + " cores"
	}
	return "1 core"
}
