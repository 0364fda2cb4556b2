package rules

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
)

// series writes f(age) every second for the last 60 s.
func series(st *signals.Store, d *signals.Desc, ls signals.Labels, now time.Time, f func(age time.Duration) float64) {
	for age := 60 * time.Second; age >= 0; age -= time.Second {
		st.Put(d, ls, f(age), now.Add(-age))
	}
}

func constant(v float64) func(time.Duration) float64 { return func(time.Duration) float64 { return v } }

func fdRule() *FDExhaustion {
	return NewFDExhaustion(FDExhaustionOptions{Window: 30 * time.Second, NearRatio: 0.8, MinIncrease: 20, Steady: 0.8, Horizon: time.Hour})
}

func fdStore(now time.Time, total, sockets func(time.Duration) float64, closeWait func(time.Duration) float64) *signals.Store {
	st := signals.New(600, 1000)
	series(st, signals.ProcessFDsOpen, nil, now, total)
	series(st, signals.ProcessFDLimit, signals.L("type", "soft"), now, constant(1024))
	series(st, signals.ProcessOpenFDs, signals.L("kind", "socket"), now, sockets)
	series(st, signals.ProcessOpenFDs, signals.L("kind", "file"), now, constant(10))
	series(st, signals.ProcessOpenFDs, signals.L("kind", "pipe"), now, constant(4))
	series(st, signals.ProcessTCPSockets, signals.L("state", "ESTABLISHED"), now, constant(20))
	series(st, signals.ProcessTCPSockets, signals.L("state", "CLOSE_WAIT"), now, closeWait)
	return st
}

func TestFDExhaustionSilentWhenSteady(t *testing.T) {
	now := time.Unix(5000, 0)
	// A busy server: sockets come and go around 300, far from 1024.
	wobble := func(age time.Duration) float64 { return 300 + float64(int(age.Seconds())%7) }
	st := fdStore(now, wobble, wobble, constant(0))
	if obs := fdRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("steady FDs raised %+v", obs[0])
	}
}

func TestFDExhaustionNamesCloseWaitLeak(t *testing.T) {
	now := time.Unix(5000, 0)
	leak := func(age time.Duration) float64 { return 600 - 2*age.Seconds() } // +2/s
	st := fdStore(now, func(a time.Duration) float64 { return leak(a) + 14 }, leak, func(a time.Duration) float64 { return leak(a) - 20 })
	obs := fdRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	if o.Cause != CauseFDLeak {
		t.Fatalf("cause %s", o.Cause)
	}
	for _, want := range []string{"614 of 1024", "socket descriptors", "CLOSE_WAIT", "limit is hit in"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause lacks %q: %s", want, o.RootCause)
		}
	}
	if !strings.Contains(o.Remediation, "peer closed") {
		t.Errorf("remediation does not address CLOSE_WAIT: %s", o.Remediation)
	}
}

func TestFDExhaustionNearLimitWithoutGrowth(t *testing.T) {
	now := time.Unix(5000, 0)
	st := fdStore(now, constant(1000), constant(986), constant(0))
	obs := fdRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseFDNearLimit || obs[0].Severity != SeverityCritical {
		t.Fatalf("got %+v", obs)
	}
}

func rssRule() *RSSWithoutHeap {
	return NewRSSWithoutHeap(RSSWithoutHeapOptions{Window: 30 * time.Second, MinGap: 64 << 20, MinRatio: 0.5, HeapFresh: 30 * time.Second})
}

func TestRSSWithoutHeap(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"), now, constant(600<<20))
	series(st, signals.ProcessResidentMemoryBytes, nil, now, constant(620<<20))
	// No heap source: silent, it cannot tell retention from a leak.
	if obs := rssRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("guessed without a heap source: %+v", obs[0])
	}
	series(st, signals.HeapInuseBytes, nil, now, constant(80<<20))
	obs := rssRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseAllocatorRetention {
		t.Fatalf("got %+v", obs)
	}
	// Both readings of the gap, and the fix in the target's terms: no Go
	// advice for a runtime culprit does not know, Go's for Go.
	o := obs[0]
	if !strings.Contains(o.RootCause, "520 MiB") || !strings.Contains(o.RootCause, "allocator keeps") || !strings.Contains(o.RootCause, "outside the heap") ||
		strings.Contains(o.Remediation, "GOMEMLIMIT") || !strings.Contains(o.Remediation, "/proc/PID/smaps") {
		t.Errorf("unknown runtime: %s / %s", o.RootCause, o.Remediation)
	}
	goRT := workload.Runtime{Lang: workload.LangGo, Version: "1.26.0"}
	obs = rssRule().Evaluate(Window{Store: st, Now: now, Runtime: goRT, Target: workload.Process{PID: 4242}, HasTarget: true})
	if len(obs) != 1 || !strings.Contains(obs[0].Remediation, "GOMEMLIMIT") || strings.Contains(obs[0].Remediation, "jemalloc") || !strings.Contains(obs[0].Remediation, "/proc/4242/smaps") {
		t.Errorf("Go target: %+v", obs)
	}
}

func TestRSSWithoutHeapSilentWhenHeapExplainsRSS(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"), now, constant(300<<20))
	series(st, signals.HeapInuseBytes, nil, now, constant(250<<20))
	if obs := rssRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("healthy heap raised %+v", obs[0])
	}
}

func oomRule() *OOMAhead {
	return NewOOMAhead(OOMAheadOptions{NearRatio: 0.9, Window: 30 * time.Second, HeapFresh: 30 * time.Second})
}

func TestOOMAheadSaysWhatFillsIt(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.CgroupMemoryUsageBytes, nil, now, constant(120<<20))
	series(st, signals.CgroupMemoryLimitBytes, nil, now, constant(128<<20))
	series(st, signals.CgroupMemoryStatBytes, signals.L("kind", "anon"), now, constant(110<<20))
	series(st, signals.CgroupMemoryStatBytes, signals.L("kind", "file"), now, constant(8<<20))
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMAnon || !strings.Contains(obs[0].RootCause, "live heap unknown") {
		t.Fatalf("without heap: %+v", obs)
	}
	series(st, signals.HeapInuseBytes, nil, now, constant(4<<20))
	obs = oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMRetention || !strings.Contains(obs[0].RootCause, "live heap is 4 MiB and 106 MiB is beyond it (held by the allocator") {
		t.Fatalf("with heap: %+v", obs)
	}
}

func TestOOMAheadSilentWithHeadroomAndReportsKills(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.CgroupMemoryUsageBytes, nil, now, constant(40<<20))
	series(st, signals.CgroupMemoryLimitBytes, nil, now, constant(128<<20))
	series(st, signals.CgroupMemoryEventsTotal, signals.L("event", "oom_kill"), now, constant(0))
	if obs := oomRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("headroom raised %+v", obs[0])
	}
	st.Put(signals.CgroupMemoryEventsTotal, signals.L("event", "oom_kill"), 1, now)
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMKilled || obs[0].Severity != SeverityCritical {
		t.Fatalf("oom kill: %+v", obs)
	}
}

// ramp is flat at base until onset ago, then rises by perSec.
func ramp(base, perSec float64, onset time.Duration) func(time.Duration) float64 {
	return func(age time.Duration) float64 { return base + perSec*max(0, (onset-age).Seconds()) }
}

// FDs quiet for 45 s, then leaking 40/s for 15 s (the leaker's real
// shape, and the case reported at a seventh of its rate): the rate is
// 40/s from where it began, the growth is named with its kind, and the
// forecast is from the present rate.
func TestFDLeakRateFromItsOnset(t *testing.T) {
	now := time.Unix(5000, 0)
	st := fdStore(now, ramp(30, 40, 15*time.Second), constant(10), constant(0))
	series(st, signals.ProcessOpenFDs, signals.L("kind", "pipe"), now, ramp(4, 40, 15*time.Second))
	series(st, signals.ProcessFDLimit, signals.L("type", "soft"), now, constant(20000))
	r := NewFDExhaustion(FDExhaustionOptions{Window: time.Minute, NearRatio: 0.8, MinIncrease: 20, Steady: 0.8, Horizon: time.Hour, MinDuration: 10 * time.Second})
	obs := r.Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	t.Logf("%s\n%s", o.Title, o.RootCause)
	since := now.Add(-15 * time.Second).Format("15:04:05")
	for _, want := range []string{"630 of 20000", "rising by 40/s for 15 s (since " + since + "), +600 (+600 of them pipe descriptors)", "limit is hit in 8m4s"} {
		if !strings.Contains(o.RootCause, want) {
			t.Errorf("root cause lacks %q: %s", want, o.RootCause)
		}
	}
	if o.Cause != CauseFDLeak || !strings.Contains(o.Title, "40/s pipe FDs") || !strings.Contains(o.Remediation, "Pipes leak") {
		t.Errorf("%s: %s / %s", o.Cause, o.Title, o.Remediation)
	}
	var rate *Evidence
	for i, e := range o.Evidence {
		if e.Unit == "fds/min" {
			rate = &o.Evidence[i]
		}
	}
	if rate == nil || rate.Value != 2400 || rate.Window != 15*time.Second {
		t.Errorf("rate evidence %+v, want 2400 fds/min over 15s", rate)
	}
	// Not yet MinDuration into the leak: nothing (a burst is not a leak).
	st = fdStore(now, ramp(30, 40, 8*time.Second), constant(10), constant(0))
	series(st, signals.ProcessFDLimit, signals.L("type", "soft"), now, constant(20000))
	r = NewFDExhaustion(r.o)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("8 s into the growth: %s", obs[0].RootCause)
	}
}

// FDs opened at once and then flat at 106 of 128 for 45 s: near the
// limit, never "rising" and never "hit in" (the old whole-window fit said
// "rising steadily by 177.7/min, limit hit in 7.4s" here).
func TestFDFlatNearLimitIsNotALeak(t *testing.T) {
	now := time.Unix(5000, 0)
	step := func(age time.Duration) float64 {
		if age > 45*time.Second {
			return 10
		}
		return 106
	}
	st := fdStore(now, step, constant(2), constant(0))
	series(st, signals.ProcessOpenFDs, signals.L("kind", "pipe"), now, func(a time.Duration) float64 { return step(a) - 16 })
	series(st, signals.ProcessFDLimit, signals.L("type", "soft"), now, constant(128))
	r := NewFDExhaustion(DefaultFDExhaustionOptions())
	obs := r.Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	t.Logf("%s\n%s", o.Title, o.RootCause)
	if o.Cause != CauseFDNearLimit || !strings.Contains(o.RootCause, "near the limit") || !strings.Contains(o.RootCause, "mostly pipe descriptors (90)") {
		t.Fatalf("%s: %s", o.Cause, o.RootCause)
	}
	for _, bad := range []string{"rising", "hit in", "leak"} {
		if strings.Contains(o.Title+o.RootCause, bad) {
			t.Errorf("says %q of flat FDs: %s / %s", bad, o.Title, o.RootCause)
		}
	}
	if tr, _ := trendOf(st.Range(signals.ProcessFDsOpen, nil, now.Add(-time.Minute))); tr.slope <= 0 {
		t.Fatalf("the case does not reproduce the old fit: %v", tr.slope)
	}
}

// Bursts of connections that open and close again (seen: 300 sockets for
// one sample every 4-5 s, 11 between them) are no leak, even when the
// newest sample is a burst's peak: the floor did not move. The same
// series with its floor rising is one.
func TestFDBurstsAreNotALeak(t *testing.T) {
	now := time.Unix(5000, 0)
	for _, lift := range []float64{0, 3} {
		burst := func(age time.Duration) float64 {
			s := int(age / time.Second)
			v := 11 + lift*float64(60-s)
			if s%5 == 0 {
				v += 300
			}
			return v
		}
		st := fdStore(now, burst, constant(10), constant(0))
		obs := NewFDExhaustion(DefaultFDExhaustionOptions()).Evaluate(Window{Store: st, Now: now})
		switch {
		case lift == 0 && len(obs) != 0:
			t.Errorf("bursts on a flat floor: %s: %s", obs[0].Title, obs[0].RootCause)
		case lift > 0 && (len(obs) != 1 || obs[0].Cause != CauseFDLeak):
			t.Errorf("bursts on a floor rising 3/s: %d observations, want the leak", len(obs))
		}
	}
}

// A count hovering at near_ratio keeps one finding open instead of one
// per crossing; far under it, the finding ends.
func TestFDNearLimitHysteresis(t *testing.T) {
	r := NewFDExhaustion(DefaultFDExhaustionOptions())
	start := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	on := 0
	for i := 0; i < 40; i++ {
		now := start.Add(time.Duration(i) * time.Second)
		v := 102.0 // 0.797 of 128, under 0.8
		if i%3 == 0 {
			v = 103 // 0.805
		}
		st.Put(signals.ProcessFDsOpen, nil, v, now)
		st.Put(signals.ProcessFDLimit, signals.L("type", "soft"), 128, now)
		obs := r.Evaluate(Window{Store: st, Now: now})
		if len(obs) == 0 && on > 0 {
			t.Fatalf("second %d: gone at %v of 128", i, v)
		}
		on += len(obs)
	}
	now := start.Add(41 * time.Second)
	st.Put(signals.ProcessFDsOpen, nil, 90, now)
	st.Put(signals.ProcessFDLimit, signals.L("type", "soft"), 128, now)
	if obs := r.Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("90 of 128 still near: %s", obs[0].RootCause)
	}
}

// Heap flat for 40 s, then leaking 8 MiB/s: the rule says 480 MiB/min
// since the onset and diffs the profiles from there.
func TestHeapLeakRateFromItsOnset(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.HeapInuseBytes, nil, now, ramp(100<<20, 8<<20, 20*time.Second))
	h := &recordingHistory{fixedHistory: fixedHistory{sites: []AllocSite{{Function: "main.leak", File: "/src/main.go", Line: 7, Bytes: 160 << 20, Objects: 1}}, older: now.Add(-20 * time.Second), newer: now}}
	r := NewHeapLeak(HeapLeakOptions{Window: time.Minute, MinGrowth: 32 << 20, Steady: 0.7, TopSites: 3, MinDuration: 10 * time.Second, HeapFresh: 30 * time.Second})
	obs := r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Heap: h}})
	if len(obs) != 1 {
		t.Fatalf("got %d observations", len(obs))
	}
	o := obs[0]
	t.Logf("%s\n%s\n%s", o.Title, o.Symptom, o.RootCause)
	since := now.Add(-20 * time.Second).Format("15:04:05")
	if o.Title != "Live heap growing by 480 MiB/min for 20 s (since "+since+")" ||
		!strings.Contains(o.Symptom, "from 100 MiB to 260 MiB since "+since+" (20 s)") ||
		!strings.Contains(o.RootCause, "(+160 MiB, 480 MiB/min)") || !strings.Contains(o.RootCause, "main.leak (/src/main.go:7, +160 MiB)") {
		t.Errorf("%s / %s / %s", o.Title, o.Symptom, o.RootCause)
	}
	if !h.from.Equal(now.Add(-20 * time.Second)) {
		t.Errorf("profiles diffed from %s, want the onset %s", h.from, now.Add(-20*time.Second))
	}
	if strings.Contains(o.Artifacts[0].Detail, "1 more objects") {
		t.Errorf("plural: %s", o.Artifacts[0].Detail)
	}
}

type recordingHistory struct {
	fixedHistory
	from time.Time
}

func (h *recordingHistory) GrowthSince(from time.Time, top int) ([]AllocSite, time.Time, time.Time, error) {
	h.from = from
	return h.fixedHistory.GrowthSince(from, top)
}

// A heap that grew and stopped is not leaking now.
func TestHeapLeakSilentAfterGrowthStopped(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.HeapInuseBytes, nil, now, func(age time.Duration) float64 {
		return float64(100<<20) + float64(4<<20)*min(60-age.Seconds(), 40) // grew for 40 s, flat 20 s
	})
	if obs := evalHeap(nil, st, now); len(obs) != 0 {
		t.Fatalf("a heap flat for 20 s raised %s", obs[0].RootCause)
	}
}

// Memory rules say unknown for what they did not read: no "RSS 0 B", no
// "page cache 0 B".
func TestMemoryRulesSayUnknown(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.ProcessMemoryRSSBytes, signals.L("kind", "anon"), now, constant(600<<20))
	series(st, signals.HeapInuseBytes, nil, now, constant(80<<20))
	obs := rssRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || strings.Contains(obs[0].Symptom, "0 B") || !strings.Contains(obs[0].RootCause, "heap is flat (changed by 0 B over the last 30 s)") {
		t.Fatalf("without process_resident_memory_bytes: %+v", obs)
	}
	st = signals.New(600, 1000)
	series(st, signals.CgroupMemoryUsageBytes, nil, now, constant(120<<20))
	series(st, signals.CgroupMemoryLimitBytes, nil, now, constant(128<<20))
	obs = oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || !strings.Contains(obs[0].RootCause, "anonymous unknown, page cache unknown") || obs[0].Cause != CauseOOMAnon {
		t.Fatalf("without memory.stat: %+v", obs)
	}
}

// Usage climbing toward the limit: the forecast is from the climb's rate
// since it began.
func TestOOMAheadForecastsFromTheOnset(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.CgroupMemoryUsageBytes, nil, now, ramp(100<<20, 1<<20, 20*time.Second)) // 120 MiB now, +1 MiB/s
	series(st, signals.CgroupMemoryLimitBytes, nil, now, constant(130<<20))
	series(st, signals.CgroupMemoryStatBytes, signals.L("kind", "anon"), now, constant(110<<20))
	series(st, signals.CgroupMemoryStatBytes, signals.L("kind", "file"), now, constant(8<<20))
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || !strings.Contains(obs[0].Symptom, "usage grows by 60 MiB/min for 20 s") || !strings.Contains(obs[0].Symptom, "limit is reached in 10 s") {
		t.Fatalf("%+v", obs)
	}
}

// Kills are counted in words that agree with their number.
func TestOOMAheadOneKill(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, signals.CgroupMemoryUsageBytes, nil, now, constant(40<<20))
	series(st, signals.CgroupMemoryLimitBytes, nil, now, constant(128<<20))
	series(st, signals.CgroupMemoryEventsTotal, signals.L("event", "oom_kill"), now, func(a time.Duration) float64 {
		if a < 5*time.Second {
			return 1
		}
		return 0
	})
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || !strings.HasPrefix(obs[0].Title, "1 OOM kill in the cgroup in the last 30 s") || !strings.Contains(obs[0].Symptom, "OOM-killed 1 process;") {
		t.Fatalf("%+v", obs)
	}
}

// Sockets that grow in SYN_SENT are connects in progress (an upstream that
// does not answer, a full accept queue on the other end): they end when
// the connect gives up. Far from the limit, that is no leak.
func TestFDGrowthOfPendingConnectsIsNotALeak(t *testing.T) {
	now := time.Unix(5000, 0)
	grow := func(age time.Duration) float64 { return 600 - 2*age.Seconds() } // +2/s
	st := fdStore(now, func(a time.Duration) float64 { return grow(a) + 14 }, grow, constant(0))
	series(st, signals.ProcessTCPSockets, signals.L("state", "SYN_SENT"), now, func(a time.Duration) float64 { return grow(a) - 20 })
	if obs := fdRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Errorf("connects in progress called a leak: %s: %s", obs[0].Title, obs[0].RootCause)
	}
}

// A leak that stopped at the newest profile is still held open (its
// growth rose over the last profiles), but is not said to grow: "grew",
// and since when it has not. Profiles 10 s apart, as pprof.interval
// takes them (the demo's leak-heap fault, seen saying "still grows" a
// profile after it stopped).
func TestHeapLeakSaysWhenItStoppedGrowing(t *testing.T) {
	now := time.Unix(5000, 0)
	r := NewHeapLeak(DefaultHeapLeakOptions())
	r.o.HeapFresh = 30 * time.Second
	h := fixedHistory{sites: []AllocSite{{Function: "main.leak", File: "/src/main.go", Line: 7, Bytes: 300 << 20, Objects: 1}}, older: now.Add(-50 * time.Second), newer: now}
	st := signals.New(600, 1000)
	mib := []float64{7, 7, 7, 55, 135, 215, 295, 375, 375} // 80 s ago .. 0 s ago
	at := func(i int) time.Time { return now.Add(time.Duration(i-len(mib)+1) * 10 * time.Second) }
	for i, v := range mib[:len(mib)-1] {
		st.Put(signals.HeapInuseBytes, nil, v*(1<<20), at(i))
	}
	obs := r.Evaluate(Window{Store: st, Now: at(len(mib) - 2), Inputs: Inputs{Heap: h}})
	if len(obs) != 1 || !strings.HasPrefix(obs[0].Title, "Live heap growing by") || !strings.HasSuffix(obs[0].Symptom, "and still grows") {
		t.Fatalf("while it grows: %+v", obs)
	}
	// One more profile, a hair above the last (the app's other
	// allocations): no growth.
	st.Put(signals.HeapInuseBytes, nil, (mib[len(mib)-1]+0.2)*(1<<20), now)
	obs = r.Evaluate(Window{Store: st, Now: now, Inputs: Inputs{Heap: h}})
	if len(obs) == 0 {
		t.Fatal("dropped at the first flat profile: the words after a stop are not tested")
	}
	o := obs[0]
	want := "has not grown since " + at(len(mib)-2).Format("15:04:05")
	if !strings.HasPrefix(o.Title, "Live heap grew by 480 MiB/min") || strings.Contains(o.Symptom, "still grows") || !strings.Contains(o.Symptom, want) {
		t.Errorf("after it stopped: %q / %q, want the rate up to its stop (480 MiB/min) and %q", o.Title, o.Symptom, want)
	}
	if !o.Stopped {
		t.Error("the past tense is not marked Stopped: watchers would not be told of it")
	}
	// The numbers agree: from 7 to 375 is the +368 the cause says, and
	// the hair above it since is said apart.
	if !strings.Contains(o.Symptom, "grew from 7 MiB to 375 MiB") || !strings.Contains(o.RootCause, "+368 MiB") || !strings.HasSuffix(o.Symptom, "; 375.2 MiB now") {
		t.Errorf("after it stopped: %q / %q, want 'grew from 7 MiB to 375 MiB', '+368 MiB' and '; 375.2 MiB now'", o.Symptom, o.RootCause)
	}
	t.Logf("%s\n%s", o.Title, o.Symptom)
}

// A leak that stopped between two heap profiles, 10 s apart: the newest
// profile still rose, but the anonymous RSS, read each second, has stood
// still since the stop. The demo's leak-heap fault (8 MiB/s for 40 s) was
// told "growing by 392.1 MiB/min for 48.5 s ... and still grows" 8 s
// after it ended. The finding says when it stopped and the rate it grew
// at; a heap still growing, or growing while the RSS stands still (inside
// a memory limit), is still said to grow.
func TestHeapLeakStoppedBetweenProfilesByRSS(t *testing.T) {
	now := time.Unix(5000, 0)
	start, stop := now.Add(-48*time.Second), now.Add(-8*time.Second)
	const mib = 1 << 20
	leak := func(at, end time.Time) float64 { // 8 MiB/s from start to end
		if at.Before(start) {
			return 5 * mib
		}
		if at.After(end) {
			at = end
		}
		return 5*mib + 8*mib*at.Sub(start).Seconds()
	}
	hair := map[time.Time]float64{} // added to the heap profile at a time
	creep := 0.5 * mib              // RSS per second after the leak
	// run fills the store a second at a time up to now, evaluates, and
	// with later goes on to now+later and evaluates again (the same rule:
	// an open finding is held).
	run := func(heapEnd, rssEnd time.Time, later ...time.Duration) Observation {
		t.Helper()
		st := signals.New(600, 1000)
		r := NewHeapLeak(DefaultHeapLeakOptions())
		r.o.HeapFresh = 30 * time.Second
		h := fixedHistory{sites: []AllocSite{{Function: "main.leak", File: "/src/main.go", Line: 7, Bytes: 300 << 20, Objects: 1}}, older: start, newer: now}
		var obs []Observation
		fill := func(from, to time.Time) {
			for at := from; !at.After(to); at = at.Add(time.Second) {
				// After the leak, the RSS creeps up at 0.5 MiB/s (a Go
				// heap's garbage towards its GC goal).
				st.Put(signals.ProcessMemoryRSSBytes, rssAnon, 20*mib+1.2*leak(at, rssEnd)+creep*max(0, at.Sub(rssEnd).Seconds()), at)
				if at.Sub(now)%(10*time.Second) == 0 {
					st.Put(signals.HeapInuseBytes, nil, leak(at, heapEnd)+hair[at], at)
				}
			}
			obs = r.Evaluate(Window{Store: st, Now: to, Inputs: Inputs{Heap: h}})
		}
		fill(now.Add(-110*time.Second), now)
		for _, d := range later {
			fill(now.Add(time.Second), now.Add(d))
		}
		if len(obs) != 1 {
			t.Fatalf("got %+v", obs)
		}
		return obs[0]
	}

	o := run(stop, stop)
	want := "and has not grown since " + stop.Format("15:04:05") + " (its anonymous resident memory, read each second)"
	if !strings.HasPrefix(o.Title, "Live heap grew by 48") || !strings.HasSuffix(o.Symptom, want) || strings.Contains(o.RootCause, "keeps growing") {
		t.Errorf("stopped 8 s before the last profile:\n%s\n%s\n%s\nwant grew by ~480 MiB/min, %q", o.Title, o.Symptom, o.RootCause, want)
	}
	if !strings.Contains(o.Title, "for 40 s") {
		t.Errorf("title %q: the leak ran 40 s", o.Title)
	}
	t.Logf("%s\n%s", o.Title, o.Symptom)
	// A profile later, flat: the same words, not the profile's time and
	// the rate blended with the quiet until it.
	if o2 := run(stop, stop, 10*time.Second); o2.Title != o.Title || !strings.HasSuffix(o2.Symptom, want) {
		t.Errorf("a flat profile later:\n%s\n%s\nwant %q and %q", o2.Title, o2.Symptom, o.Title, want)
	}

	// Stopped a second before a profile, and the profile after that a
	// hair above it (the app's other allocations): the growth stopped.
	early := now.Add(-11 * time.Second)
	hair[now] = 0.1 * mib
	want = "and has not grown since " + early.Format("15:04:05")
	if o := run(early, early); !strings.Contains(o.Symptom, want) || !strings.HasPrefix(o.Title, "Live heap grew by 48") {
		t.Errorf("stopped 11 s before the last profile, which rose by 0.1 MiB:\n%s\n%s\nwant ~480 MiB/min and %q", o.Title, o.Symptom, want)
	}
	clear(hair)

	if o := run(now, now); !strings.HasSuffix(o.Symptom, "and still grows") {
		t.Errorf("a heap that grows to the last second: %q", o.Symptom)
	}
	// The heap keeps growing while the RSS stands still (a memory limit
	// holds it): the last profile's rise is more than growth until the
	// RSS stopped explains.
	if o := run(now, stop); !strings.HasSuffix(o.Symptom, "and still grows") {
		t.Errorf("a heap growing inside a flat RSS said to have stopped: %q", o.Symptom)
	}
}

// After a leak and its release, three flat heap profiles and one that
// jumped (6 s into a new leak of 8 MiB/s) made a regime whose line read
// "growing by 89.5 MiB/min for 31 s": the flat profiles were taken for
// growth, and the finding opened at once. Now nothing opens on one
// profile; once the growth has run, its start and rate are the leak's.
func TestHeapLeakFlatProfilesAreNotItsGrowth(t *testing.T) {
	const mib = 1 << 20
	// The leak began lead before the first profile that rose.
	for _, lead := range []time.Duration{2 * time.Second, 6 * time.Second, 9 * time.Second} {
		t0 := time.Unix(5000, 0)
		begin := t0.Add(-lead)
		prof := []float64{5, 85, 165, 245, 280, 280, 5.5, 5.5, 5.5, 5.5} // 100 s ago .. 10 s ago
		st := signals.New(600, 1000)
		for i, v := range prof {
			st.Put(signals.HeapInuseBytes, nil, v*mib, t0.Add(time.Duration(i-len(prof))*10*time.Second))
		}
		r := NewHeapLeak(DefaultHeapLeakOptions())
		r.o.HeapFresh = 30 * time.Second
		h := fixedHistory{sites: []AllocSite{{Function: "main.leak", File: "/src/main.go", Line: 7, Bytes: 50 << 20, Objects: 1}}, older: begin, newer: t0}
		var obs []Observation
		for i := 0; i < 6; i++ {
			at := t0.Add(time.Duration(i) * 10 * time.Second)
			st.Put(signals.HeapInuseBytes, nil, 5.5*mib+8*mib*at.Sub(begin).Seconds(), at)
			obs = r.Evaluate(Window{Store: st, Now: at, Inputs: Inputs{Heap: h}})
			if i == 0 && len(obs) != 0 {
				t.Fatalf("lead %s: opened on one profile that rose: %s / %s", lead, obs[0].Title, obs[0].Symptom)
			}
			// Whenever it opens, the start and rate are the leak's: a
			// line through the regime's first profile, still at the old
			// level, put the start up to a profile early at five sixths
			// of the rate (seen in the demo: "402.2 MiB/min for 32 s" 28 s
			// into a leak at 480).
			want := fmt.Sprintf("Live heap growing by 480 MiB/min for %s (since %s)", duration(at.Sub(begin)), begin.Format("15:04:05"))
			if len(obs) == 1 && obs[0].Title != want {
				t.Errorf("lead %s, after %d rising profiles: %q, want %q", lead, i+1, obs[0].Title, want)
			}
		}
		if len(obs) != 1 {
			t.Errorf("lead %s: a leak of %s at 480 MiB/min not seen: %+v", lead, 50*time.Second+lead, obs)
		}
	}
}

// A leak that stopped inside the interval between two heap profiles,
// with no RSS that tells (memory resident from an earlier spike is
// reused): a rate fitted through the last, partial step was low and the
// growth ran to that profile (seen: a 42 s leak at 480 MiB/min told
// "grew by 402 MiB/min for 49.9 s"). It is told by the profiles before
// the stop, up to where their line reaches the last one.
func TestHeapLeakStopInsideAProfileInterval(t *testing.T) {
	now := time.Unix(5000, 0)
	const mib = 1 << 20
	r := NewHeapLeak(DefaultHeapLeakOptions())
	r.o.HeapFresh = 30 * time.Second
	h := fixedHistory{sites: []AllocSite{{Function: "main.leak", File: "/src/main.go", Line: 7, Bytes: 300 << 20, Objects: 1}}, older: now.Add(-60 * time.Second), newer: now}
	st := signals.New(600, 1000)
	// 8 MiB/s from 65 s ago (7 MiB) until 20 s ago, profiles every 10 s.
	begin, stop := now.Add(-65*time.Second), now.Add(-25*time.Second)
	heap := func(at time.Time) float64 {
		d := min(max(at.Sub(begin), 0), stop.Sub(begin))
		return 7*mib + 8*mib*d.Seconds()
	}
	var obs []Observation
	for age := 100 * time.Second; age >= 10*time.Second; age -= 10 * time.Second { // to the first flat profile
		at := now.Add(-age)
		st.Put(signals.HeapInuseBytes, nil, heap(at), at)
		obs = r.Evaluate(Window{Store: st, Now: at, Inputs: Inputs{Heap: h}})
		// At the profile 5 s after the stop, which rose by half a step:
		// stopped or slowed, not "still grows" at a blended rate (seen:
		// "growing by 384.1 MiB/min for 53 s ... and still grows" 7 s
		// after a 45 s leak at 480 ended).
		if age == 20*time.Second {
			want := "and slowed or stopped about " + stop.Format("15:04:05")
			if len(obs) != 1 || !strings.HasPrefix(obs[0].Title, "Live heap grew by 480 MiB/min for 40 s") || !strings.Contains(obs[0].Symptom, want) {
				t.Errorf("at the profile after the stop: %+v, want 480 MiB/min for 40 s and %q", obs, want)
			}
		}
	}
	if len(obs) != 1 {
		t.Fatalf("got %+v", obs)
	}
	o := obs[0]
	want := "has not grown since about " + stop.Format("15:04:05")
	if !strings.HasPrefix(o.Title, "Live heap grew by 480 MiB/min for 40 s (since "+begin.Format("15:04:05")+")") || !strings.Contains(o.Symptom, want) {
		t.Errorf("%q / %q, want 480 MiB/min for 40 s and %q", o.Title, o.Symptom, want)
	}
	t.Logf("%s\n%s", o.Title, o.Symptom)
}

// fdLeakRun evaluates an FD leak second by second, as the engine does,
// with the open FDs at second t given by open(t), and returns each
// second's observations (nil when none).
func fdLeakRun(t *testing.T, seconds int, open func(t int) float64) [][]Observation {
	t.Helper()
	st := signals.New(600, 1000)
	r := NewFDExhaustion(FDExhaustionOptions{Window: time.Minute, NearRatio: 0.8, MinIncrease: 20, Steady: 0.8, Horizon: time.Hour, MinDuration: 10 * time.Second})
	start := time.Unix(5000, 0)
	var out [][]Observation
	for s := 0; s <= seconds; s++ {
		now := start.Add(time.Duration(s) * time.Second)
		st.Put(signals.ProcessFDsOpen, nil, open(s), now)
		st.Put(signals.ProcessFDLimit, signals.L("type", "soft"), 20000, now)
		st.Put(signals.ProcessOpenFDs, signals.L("kind", "pipe"), open(s)-26, now)
		st.Put(signals.ProcessOpenFDs, signals.L("kind", "file"), 26, now)
		out = append(out, r.Evaluate(Window{Store: st, Now: now}))
	}
	return out
}

// A leak of 40 FDs a second for 15 s that then stops: from the second
// flat sample on it is never told as rising or heading for the limit. It
// drops there (the series' change point splits the flat seconds off) and
// resolves a hold-down later; it is never told as stopped while it grew.
func TestFDLeakThatStoppedIsNotToldAsRising(t *testing.T) {
	run := fdLeakRun(t, 50, func(s int) float64 { return 30 + 40*float64(min(max(s-30, 0), 15)) })
	for s, obs := range run {
		for _, o := range obs {
			if s <= 45 && o.Stopped {
				t.Errorf("second %d, while it grew: told as stopped: %s", s, o.RootCause)
			}
			if s >= 47 && !o.Stopped {
				t.Errorf("second %d, flat since second 45: %s / %s", s, o.Title, o.RootCause)
			}
		}
	}
	if len(run[44]) != 1 || !strings.Contains(run[44][0].RootCause, "rising by 40/s") {
		t.Errorf("during the leak: %+v", run[44])
	}
}

// A steady leak that stops is, after a few flat samples, a flat regime of
// its own: measured alone it is no growth, and the finding resolved with
// its last words ("leaking ... heading for the limit", the demo's
// leak-fds) while the leaked descriptors stayed open. It is told as a
// leak that stopped, in the past tense, while its growth is in the
// window and the descriptors are still open; once they are closed it is
// not.
func TestFDLeakThatStoppedStaysToldWhileItsFDsStayOpen(t *testing.T) {
	// 40 FDs a second from second 30 to 45; flat after, until they are
	// closed at second 70.
	run := fdLeakRun(t, 80, func(s int) float64 {
		if s >= 70 {
			return 30
		}
		return 30 + 40*float64(min(max(s-30, 0), 15))
	})
	for s := 47; s < 70; s++ {
		obs := run[s]
		if len(obs) != 1 || !obs[0].Stopped || !strings.Contains(obs[0].RootCause, "+600 (+600 of them pipe descriptors), and have not grown since") {
			t.Fatalf("second %d, flat since second 45 with the 600 FDs open: %+v", s, obs)
		}
		for _, bad := range []string{"rising by", "at this rate", "heading for"} {
			if strings.Contains(obs[0].RootCause+obs[0].Title, bad) {
				t.Errorf("second %d, stopped, says %q: %s / %s", s, bad, obs[0].Title, obs[0].RootCause)
			}
		}
	}
	t.Logf("%s\n%s", run[60][0].Title, run[60][0].RootCause)
	for s := 70; s <= 80; s++ {
		if len(run[s]) != 0 {
			t.Errorf("second %d, the FDs closed: %s / %s", s, run[s][0].Title, run[s][0].RootCause)
		}
	}
}

// A leak in bursts that lasts longer than the window (60 s): once its
// onset left the window, the series may still be cut a little after the
// window's start (a pause between bursts looks like an old level), but
// nothing there says the growth began then: it is told "for at least",
// never "since" a time after the onset. And its pauses are not stops.
func TestFDLeakInBurstsLongerThanTheWindow(t *testing.T) {
	// 20 FDs every 3 s from second 20 to 150; flat after.
	run := fdLeakRun(t, 170, func(s int) float64 { return 30 + 20*float64(min(max(s-20, 0), 130)/3) })
	told := 0
	for s, obs := range run {
		for _, o := range obs {
			if s <= 152 && o.Stopped {
				t.Fatalf("second %d, within the bursts' rhythm: told as stopped: %s / %s", s, o.Title, o.RootCause)
			}
			if s >= 83 && (strings.Contains(o.RootCause, "(since ") || !strings.Contains(o.RootCause, "for at least")) {
				t.Errorf("second %d, the onset (second 20) out of the window: %s", s, o.RootCause)
			}
			if o.Stopped {
				told++
			}
		}
	}
	if told == 0 {
		t.Error("the stop after second 150 was never told")
	}
}

// A leak in bursts (40 FDs every 3 s) is flat between them: those pauses
// are not stops, so the words never turn to the past tense and back. When
// the bursts end and it stays flat for longer than it ever paused, the
// stop is told in the past tense (Stopped, so that watchers get it), with
// the rate of the growth itself, not averaged over the flat seconds after
// it, and without a forecast.
func TestFDLeakInBurstsIsToldStoppedOnlyWhenItStops(t *testing.T) {
	// Bursts at seconds 23, 26, ... 50; flat after.
	run := fdLeakRun(t, 60, func(s int) float64 { return 30 + 40*float64(min(max(s-20, 0), 30)/3) })
	leaking, told := 0, 0
	for s, obs := range run {
		for _, o := range obs {
			if o.Cause == CauseFDLeak {
				leaking++
			}
			switch {
			case s <= 53 && o.Stopped:
				t.Errorf("second %d, within the bursts' rhythm: told as stopped: %s", s, o.RootCause)
			case o.Stopped:
				told++
				t.Logf("second %d: %s\n  %s", s, o.Title, o.RootCause)
				for _, bad := range []string{"rising by", "at this rate", "heading for"} {
					if strings.Contains(o.RootCause+o.Title, bad) {
						t.Errorf("second %d, stopped, says %q: %s / %s", s, bad, o.Title, o.RootCause)
					}
				}
				if !strings.Contains(o.RootCause, "(+360 of them pipe descriptors), and have not grown since") || !strings.Contains(o.Title, "pipe FDs until") {
					t.Errorf("second %d: %s / %s", s, o.Title, o.RootCause)
				}
				for _, e := range o.Evidence {
					// 360 FDs from the line's start to the last burst.
					if e.Unit == "fds/min" && (e.Value < 13.3*60*0.9 || e.Value > 13.3*60*1.15 || e.Window > 30*time.Second) {
						t.Errorf("second %d: rate evidence %.0f fds/min over %s, want ~800 over the bursts' span", s, e.Value, e.Window)
					}
				}
			}
		}
	}
	if leaking == 0 || told == 0 {
		t.Errorf("leak reported %d times, its stop told %d times", leaking, told)
	}
}
