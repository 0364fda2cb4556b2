package rules

import (
	"math"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// perSecond is a counter growing by rate every second, at 1000 now.
func perSecond(rate float64) func(time.Duration) float64 {
	return func(age time.Duration) float64 { return 1000 - rate*age.Seconds() }
}

// cpuStore is a cgroup with quota cores (0: unlimited), 10 CFS periods a
// second of which throttledPerSec end throttled, and usage cores used.
func cpuStore(now time.Time, quota, throttledPerSec, usage float64) *signals.Store {
	st := signals.New(600, 1000)
	series(st, signals.CgroupCPUInfo, signals.L("version", "2", "path", "/kubepods/pod1/app"), now, constant(1))
	series(st, signals.CgroupCPUPeriodsTotal, nil, now, perSecond(10))
	series(st, signals.CgroupCPUThrottledPeriodsTotal, nil, now, perSecond(throttledPerSec))
	series(st, signals.CgroupCPUThrottledSecondsTotal, nil, now, perSecond(throttledPerSec*0.08))
	series(st, signals.CgroupCPUUsageSecondsTotal, nil, now, perSecond(usage))
	if quota > 0 {
		series(st, signals.CgroupCPUQuotaCores, nil, now, constant(quota))
	}
	return st
}

func cpuRule() *CPUThrottling { return NewCPUThrottling(CPUThrottlingOptions{}) }

func TestCPUThrottlingDefaults(t *testing.T) {
	want := CPUThrottlingOptions{Window: 10 * time.Second, MinThrottledRatio: 0.2, MinThrottledPeriods: 5}
	if got := cpuRule().o; got != want {
		t.Fatalf("defaults %+v, want %+v", got, want)
	}
	set := CPUThrottlingOptions{Window: time.Minute, MinThrottledRatio: 0.5, MinThrottledPeriods: 50}
	if got := NewCPUThrottling(set).o; got != set {
		t.Fatalf("options %+v overridden to %+v", set, got)
	}
}

// A 0.2-core pod that wants more: 9 of 10 periods throttled, usage at the
// quota, eight runnable threads, and PSI.
func TestCPUThrottlingFiresOnThrottledQuota(t *testing.T) {
	now := time.Unix(5000, 0)
	st := cpuStore(now, 0.2, 9, 0.2)
	series(st, signals.ProcessThreads, signals.L("state", "R"), now, constant(8))
	series(st, signals.CgroupCPUPressureAvg10Ratio, signals.L("type", "some"), now, constant(0.42))
	series(st, signals.CgroupCPUPressureAvg10Ratio, signals.L("type", "full"), now, constant(0.4))
	obs := cpuRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	t.Logf("%s\n%s\n%s\n%s", o.Title, o.Symptom, o.RootCause, o.Remediation)
	if o.Cause != CauseCPUQuotaThrottled || o.Severity != SeverityCritical || o.Labels["cgroup"] != "/kubepods/pod1/app" || o.Key != "/kubepods/pod1/app" {
		t.Fatalf("cause %s severity %s labels %v key %s", o.Cause, o.Severity, o.Labels, o.Key)
	}
	for _, want := range []string{"0.2 cores", "90% of its periods over the last 11 s", "used 0.2 cores (100% of the limit)", "held back 0.72 s per second", "8 threads of the target were runnable", "PSI some", "42%"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause lacks %q: %s", want, o.RootCause)
		}
	}
	if strings.Contains(o.RootCause, "bursts") {
		t.Errorf("usage at the quota called bursty: %s", o.RootCause)
	}
	for _, want := range []string{
		"Raise the CPU limit above the service's usage (or remove it and keep requests), or request whole cores; with a runtime that sizes its worker pool from the host's CPUs, set the worker count to the quota",
		"GOMAXPROCS=1", "TOKIO_WORKER_THREADS=1", "Observed 0.2 cores against a 0.2-core limit",
	} {
		if !strings.Contains(o.Remediation, want) {
			t.Errorf("remediation lacks %q: %s", want, o.Remediation)
		}
	}
	ev := map[string]Evidence{}
	for _, e := range o.Evidence {
		ev[e.Signal] = e
	}
	checks := []struct {
		signal           string
		value, threshold float64
		unit             string
	}{
		{cpuRatioSignal, 0.9, 0.2, "ratio"},
		{signals.CgroupCPUThrottledPeriodsTotal.Name, 99, 5, "periods"}, // 11 s: the baseline is the sample before the window
		{signals.CgroupCPUPeriodsTotal.Name, 110, 0, "periods"},
		{signals.CgroupCPUQuotaCores.Name, 0.2, 0, "cores"},
		{signals.CgroupCPUUsageSecondsTotal.Name, 0.2, 0.2, "cores"},
		{signals.CgroupCPUThrottledSecondsTotal.Name, 0.72, 0, "s/s"},
		{`process_threads{state="R"}`, 8, 0.2, "threads"},
		{`cgroup_cpu_pressure_avg10_ratio{type="some"}`, 0.42, 0, "ratio"},
		{`cgroup_cpu_pressure_avg10_ratio{type="full"}`, 0.4, 0, "ratio"},
	}
	for _, c := range checks {
		e, ok := ev[c.signal]
		if !ok {
			t.Errorf("no evidence %s", c.signal)
			continue
		}
		if math.Abs(e.Value-c.value) > 1e-9 || e.Threshold != c.threshold || e.Unit != c.unit {
			t.Errorf("evidence %s = %v (threshold %v, %s), want %v (threshold %v, %s)", c.signal, e.Value, e.Threshold, e.Unit, c.value, c.threshold, c.unit)
		}
	}
	// The numbers cover 11 s: the baseline is the sample before the window.
	if e := ev[cpuRatioSignal]; e.Window != 11*time.Second {
		t.Errorf("ratio window %s", e.Window)
	}
}

// The seed's case: a worker pool sized to the node spends a 1-core quota
// in bursts. Usage averages a quarter of the quota, yet 3 periods in 10
// are throttled.
func TestCPUThrottlingNamesBurstsBelowTheLimit(t *testing.T) {
	now := time.Unix(5000, 0)
	st := cpuStore(now, 1, 3, 0.25)
	obs := cpuRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Severity != SeverityWarning {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	if !strings.Contains(o.RootCause, "bursts") || !strings.Contains(o.RootCause, "25% of the limit") {
		t.Errorf("root cause does not name bursts below the limit: %s", o.RootCause)
	}
	if strings.Contains(o.RootCause, "PSI") || strings.Contains(o.RootCause, "runnable") {
		t.Errorf("mentions pressure it has no signal for: %s", o.RootCause)
	}
	if !strings.Contains(o.Remediation, "GOMAXPROCS=1") {
		t.Errorf("remediation: %s", o.Remediation)
	}
}

func TestCPUThrottlingSilence(t *testing.T) {
	now := time.Unix(5000, 0)
	cases := map[string]struct {
		st  *signals.Store
		now time.Time
	}{
		"no throttling":            {cpuStore(now, 0.5, 0, 0.3), now},
		"throttling below ratio":   {cpuStore(now, 2, 1, 1.2), now}, // 10% of periods
		"no quota":                 {cpuStore(now, 0, 9, 0.2), now},
		"stale samples":            {cpuStore(now, 0.2, 9, 0.2), now.Add(10 * time.Second)},
		"no cgroup signals at all": {signals.New(16, 100), now},
	}
	// Few periods (a mostly idle cgroup): 4 of 4 throttled in 10 s is
	// under MinThrottledPeriods.
	idle := signals.New(600, 1000)
	series(idle, signals.CgroupCPUQuotaCores, nil, now, constant(0.2))
	series(idle, signals.CgroupCPUPeriodsTotal, nil, now, perSecond(0.3))
	series(idle, signals.CgroupCPUThrottledPeriodsTotal, nil, now, perSecond(0.3))
	cases["too few throttled periods"] = struct {
		st  *signals.Store
		now time.Time
	}{idle, now}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if obs := cpuRule().Evaluate(Window{Store: c.st, Now: c.now}); len(obs) != 0 {
				t.Fatalf("raised %+v", obs[0])
			}
		})
	}
}

func TestCoveredSpan(t *testing.T) {
	t0 := time.Unix(100, 0)
	s := []signals.Sample{{T: t0}, {T: t0.Add(time.Second)}, {T: t0.Add(3 * time.Second)}}
	for _, c := range []struct {
		from time.Time
		want time.Duration
	}{
		{t0.Add(-time.Hour), 3 * time.Second},      // no baseline before: from the first
		{t0.Add(2 * time.Second), 2 * time.Second}, // baseline at 1 s
		{t0.Add(5 * time.Second), 0},               // nothing in the window
	} {
		if got := coveredSpan(s, c.from); got != c.want {
			t.Errorf("from %s: %s, want %s", c.from.Sub(t0), got, c.want)
		}
	}
	if coveredSpan(nil, t0) != 0 {
		t.Error("empty")
	}
}

// Throttling that began 5 s ago in a 10 s window: the share and the
// usage are those since it began, not diluted by the quiet periods
// before, and the text says since when.
func TestCPUThrottlingFromItsOnset(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.CgroupCPUInfo, signals.L("version", "1", "path", "/app", "usage", "cpuacct"), now, constant(1))
	series(st, signals.CgroupCPUQuotaCores, nil, now, constant(0.5))
	series(st, signals.CgroupCPUPeriodsTotal, nil, now, perSecond(10))
	onset := func(perSec float64) func(time.Duration) float64 {
		return func(age time.Duration) float64 { return 100 + perSec*max(0, 5-age.Seconds()) }
	}
	series(st, signals.CgroupCPUThrottledPeriodsTotal, nil, now, onset(9))
	series(st, signals.CgroupCPUUsageSecondsTotal, nil, now, func(age time.Duration) float64 {
		return 1000 - 0.05*age.Seconds() + 0.45*max(0, 5-age.Seconds()) // 0.05 cores, then 0.5
	})
	obs := cpuRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	t.Logf("%s\n%s\n%s", o.Title, o.Symptom, o.RootCause)
	since := "since " + now.Add(-5*time.Second).Format("15:04:05") + " (5 s)"
	for _, want := range []string{"90% of its periods " + since, "used 0.5 cores (100% of the limit)"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause lacks %q: %s", want, o.RootCause)
		}
	}
	if !strings.Contains(o.Symptom, "45 of 50 CFS periods "+since) || !strings.Contains(o.Title, "90% of periods") {
		t.Errorf("symptom/title: %s / %s", o.Symptom, o.Title)
	}
	// What the window average would have said.
	if w := st.Increase(signals.CgroupCPUThrottledPeriodsTotal, nil, now.Add(-10*time.Second)) / st.Increase(signals.CgroupCPUPeriodsTotal, nil, now.Add(-10*time.Second)); w > 0.5 {
		t.Fatalf("window share %v: the case does not dilute", w)
	}
}

// The cpu cgroup has a quota but cpuacct holds the target at its root:
// the usage series (here the host's 1.4 cores) must not be used, and the
// text says the usage is unknown.
func TestCPUThrottlingUsageUnknownAtTheRoot(t *testing.T) {
	now := time.Unix(5000, 0)
	for _, from := range []string{"unknown_root", "unknown_other_cgroup", "unknown_missing"} {
		st := cpuStore(now, 0.2, 9, 1.4)
		st.Forget(signals.CgroupCPUInfo, func(signals.Labels) bool { return false })
		series(st, signals.CgroupCPUInfo, signals.L("version", "1", "path", "/app", "usage", from), now, constant(1))
		obs := cpuRule().Evaluate(Window{Store: st, Now: now})
		if len(obs) != 1 {
			t.Fatalf("%s: got %d observations", from, len(obs))
		}
		o := obs[0]
		text := o.Title + o.Symptom + o.RootCause + o.Remediation
		if strings.Contains(text, "1.4") || strings.Contains(text, "700%") || strings.Contains(o.RootCause, "used") || strings.Contains(text, "bursts") {
			t.Errorf("%s: a usage that is not the cgroup's: %s / %s", from, o.RootCause, o.Remediation)
		}
		if !strings.Contains(o.RootCause, "its CPU usage is unknown") || !strings.Contains(o.Remediation, "usage is unknown here") {
			t.Errorf("%s: does not say the usage is unknown: %s", from, o.RootCause)
		}
		for _, e := range o.Evidence {
			if e.Signal == signals.CgroupCPUUsageSecondsTotal.Name {
				t.Errorf("%s: usage evidence %+v", from, e)
			}
		}
		if from == "unknown_root" && !strings.Contains(o.RootCause, "root of the cpuacct hierarchy") {
			t.Errorf("does not say why: %s", o.RootCause)
		}
	}
}

// A share of throttled periods hovering at the threshold does not make
// the finding come and go: once on, it stays on above 3/4 of it.
func TestCPUThrottlingHysteresis(t *testing.T) {
	r := cpuRule()
	start := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	var periods, throttled float64
	seen := 0
	for i := 0; i <= 60; i++ {
		now := start.Add(time.Duration(i) * time.Second)
		periods += 10
		// 2 or 1.8 of 10 periods throttled, alternating every 5 s: at
		// and just under the 20% threshold.
		if (i/5)%2 == 0 {
			throttled += 2.2
		} else {
			throttled += 1.8
		}
		st.Put(signals.CgroupCPUPeriodsTotal, nil, periods, now)
		st.Put(signals.CgroupCPUThrottledPeriodsTotal, nil, throttled, now)
		st.Put(signals.CgroupCPUQuotaCores, nil, 1, now)
		obs := r.Evaluate(Window{Store: st, Now: now})
		if i >= 12 && len(obs) == 0 && seen > 0 {
			t.Fatalf("second %d: the finding went away at a share just under the threshold", i)
		}
		seen += len(obs)
	}
	if seen == 0 {
		t.Fatal("never fired")
	}
	// Well under it, it ends.
	for i := 61; i <= 90; i++ {
		now := start.Add(time.Duration(i) * time.Second)
		periods += 10
		throttled += 0.5
		st.Put(signals.CgroupCPUPeriodsTotal, nil, periods, now)
		st.Put(signals.CgroupCPUThrottledPeriodsTotal, nil, throttled, now)
		st.Put(signals.CgroupCPUQuotaCores, nil, 1, now)
		if i == 90 {
			if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
				t.Fatalf("5%% throttled still raised %s", obs[0].RootCause)
			}
		}
	}
}
