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
type CPUThrottling struct{ o CPUThrottlingOptions }

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

func (r *CPUThrottling) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	fresh := func(s signals.Sample, ok bool) bool { return ok && now.Sub(s.T) <= cpuStale }
	last, ok := st.Latest("cgroup_cpu_periods_total", nil)
	quota, okq := st.Latest("cgroup_cpu_quota_cores", nil)
	if !fresh(last, ok) || !fresh(quota, okq) || quota.V <= 0 {
		return nil // no quota: nothing can throttle this cgroup itself
	}
	from := now.Add(-r.o.Window)
	periods := st.Increase("cgroup_cpu_periods_total", nil, from)
	throttled := st.Increase("cgroup_cpu_throttled_periods_total", nil, from)
	if periods <= 0 || throttled < r.o.MinThrottledPeriods {
		return nil
	}
	ratio := min(throttled/periods, 1)
	if ratio < r.o.MinThrottledRatio {
		return nil
	}
	span := coveredSpan(st.Range("cgroup_cpu_periods_total", nil, time.Time{}), from)
	rate := func(name string) (float64, bool) {
		if _, ok := st.Latest(name, nil); !ok || span <= 0 {
			return 0, false
		}
		return st.Increase(name, nil, from) / span.Seconds(), true
	}
	over := r.o.Window // what the numbers cover: less while the series is young
	if span > 0 && span < over {
		over = span
	}
	usage, haveUsage := rate("cgroup_cpu_usage_seconds_total")
	waited, haveWaited := rate("cgroup_cpu_throttled_seconds_total")
	path := cpuCgroupPath(st)
	q := fmtCores(quota.V)

	ev := []Evidence{
		{Signal: cpuRatioSignal, Value: ratio, Threshold: r.o.MinThrottledRatio, Unit: "ratio", Window: r.o.Window, Note: "share of CFS periods that ended throttled"},
		{Signal: "cgroup_cpu_throttled_periods_total", Value: throttled, Threshold: r.o.MinThrottledPeriods, Unit: "periods", Window: r.o.Window, Note: "periods in which the quota ran out"},
		{Signal: "cgroup_cpu_periods_total", Value: periods, Unit: "periods", Window: r.o.Window, Note: "periods with runnable tasks"},
		{Signal: "cgroup_cpu_quota_cores", Value: quota.V, Unit: "cores", Note: "CFS quota / period"},
	}
	var rc strings.Builder
	fmt.Fprintf(&rc, "a CPU limit of %s cores (CFS quota) throttled the cgroup in %.0f%% of its periods", q, 100*ratio)
	if haveUsage {
		ev = append(ev, Evidence{Signal: "cgroup_cpu_usage_seconds_total", Value: usage, Threshold: quota.V, Unit: "cores", Window: r.o.Window, Note: "CPU seconds used per second"})
		fmt.Fprintf(&rc, "; it used %s cores over the last %s (%.0f%% of the limit)", fmtCores(usage), fmtDur(over), 100*usage/quota.V)
	}
	if haveWaited {
		ev = append(ev, Evidence{Signal: "cgroup_cpu_throttled_seconds_total", Value: waited, Unit: "s/s", Window: r.o.Window, Note: "time runnable tasks were held back, summed over CPUs"})
		fmt.Fprintf(&rc, "; its tasks were held back %.2f s per second", waited)
	}
	if runnable, ok := st.Latest("process_threads", signals.L("state", "R")); fresh(runnable, ok) && runnable.V > 0 {
		ev = append(ev, Evidence{Signal: `process_threads{state="R"}`, Value: runnable.V, Threshold: quota.V, Unit: "threads", Note: "threads runnable at once (run queue) against the quota"})
		fmt.Fprintf(&rc, "; %.0f threads were runnable at once for %s cores", runnable.V, q)
	}
	for _, typ := range []string{"some", "full"} {
		p, ok := st.Latest("cgroup_cpu_pressure_avg10_ratio", signals.L("type", typ))
		if !fresh(p, ok) {
			continue
		}
		ev = append(ev, Evidence{Signal: `cgroup_cpu_pressure_avg10_ratio{type="` + typ + `"}`, Value: p.V, Unit: "ratio", Window: 10 * time.Second, Note: "PSI: share of time tasks waited for a CPU"})
		if typ == "some" && p.V > 0 {
			fmt.Fprintf(&rc, "; CPU pressure (PSI some): tasks waited for a CPU %.0f%% of the last 10 s", 100*p.V)
		}
	}
	if haveUsage && usage < cpuBurstyUsage*quota.V {
		rc.WriteString("; usage averages below the limit, so the quota is spent in bursts by more threads than it allows (a worker pool sized to the node's cores)")
	}

	sev := SeverityWarning
	if ratio >= cpuCriticalRatio {
		sev = SeverityCritical
	}
	workers := max(1, int(math.Ceil(quota.V)))
	observed := ""
	if haveUsage {
		observed = fmt.Sprintf(" Observed %s cores against a %s-core limit.", fmtCores(usage), q)
	}
	fix := "Raise the CPU limit above the observed usage (or remove it and keep requests), or request whole cores; " +
		"with a runtime that sizes its worker pool from the host's CPUs, set the worker count to the quota" +
		fmt.Sprintf(" (%d: GOMAXPROCS=%d for Go before 1.25, which does not read the quota; TOKIO_WORKER_THREADS=%d or Builder::worker_threads for Tokio).", workers, workers, workers) +
		observed
	key := path
	if key == "" {
		key = "cgroup"
	}
	return []Observation{{
		Key:         key,
		Cause:       CauseCPUQuotaThrottled,
		Title:       fmt.Sprintf("CPU throttled in %.0f%% of periods by a %s-core limit", 100*ratio, q),
		Symptom:     fmt.Sprintf("the cgroup was throttled in %.0f of %.0f CFS periods over the last %s: each time, its runnable threads wait for the next period (100 ms by default), which shows as latency spikes", throttled, periods, fmtDur(over)),
		RootCause:   rc.String(),
		Severity:    sev,
		Confidence:  0.9,
		Evidence:    ev,
		Artifacts:   []Artifact{{Kind: "cgroup", Value: path, Detail: "CPU quota " + q + " cores"}},
		Remediation: fix,
		Labels:      map[string]string{"cgroup": path},
	}}
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

// cpuCgroupPath is the path label of the newest cgroup_cpu_info series.
func cpuCgroupPath(st *signals.Store) string {
	path, newest := "", time.Time{}
	for _, ls := range st.Select("cgroup_cpu_info") {
		if s, ok := st.Latest("cgroup_cpu_info", ls); ok && s.T.After(newest) {
			path, newest = ls.Get("path"), s.T
		}
	}
	return path
}

// fmtCores prints cores with the precision a quota has: 0.2, 1.5, 2.
func fmtCores(c float64) string {
	if c >= 10 {
		return strconv.FormatFloat(c, 'f', 0, 64)
	}
	return strconv.FormatFloat(math.Round(c*100)/100, 'f', -1, 64)
}
