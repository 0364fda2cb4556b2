package rules

import (
	"strings"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

var (
	dFDs      = &signals.Desc{Name: "process_fds_open"}
	dFDLimit  = &signals.Desc{Name: "process_fd_limit"}
	dFDKind   = &signals.Desc{Name: "process_open_fds"}
	dTCPState = &signals.Desc{Name: "process_tcp_sockets"}
	dRSSKind  = &signals.Desc{Name: "process_memory_rss_bytes"}
	dRSS      = &signals.Desc{Name: "process_resident_memory_bytes"}
	dHeap     = &signals.Desc{Name: "heap_inuse_bytes"}
	dCGUsage  = &signals.Desc{Name: "cgroup_memory_usage_bytes"}
	dCGLimit  = &signals.Desc{Name: "cgroup_memory_limit_bytes"}
	dCGStat   = &signals.Desc{Name: "cgroup_memory_stat_bytes"}
	dCGEvents = &signals.Desc{Name: "cgroup_memory_events_total", Kind: signals.Counter}
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
	series(st, dFDs, nil, now, total)
	series(st, dFDLimit, signals.L("type", "soft"), now, constant(1024))
	series(st, dFDKind, signals.L("kind", "socket"), now, sockets)
	series(st, dFDKind, signals.L("kind", "file"), now, constant(10))
	series(st, dFDKind, signals.L("kind", "pipe"), now, constant(4))
	series(st, dTCPState, signals.L("state", "ESTABLISHED"), now, constant(20))
	series(st, dTCPState, signals.L("state", "CLOSE_WAIT"), now, closeWait)
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
	series(st, dRSSKind, signals.L("kind", "anon"), now, constant(600<<20))
	series(st, dRSS, nil, now, constant(620<<20))
	// No heap source: silent, it cannot tell retention from a leak.
	if obs := rssRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("guessed without a heap source: %+v", obs[0])
	}
	series(st, dHeap, nil, now, constant(80<<20))
	obs := rssRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseAllocatorRetention {
		t.Fatalf("got %+v", obs)
	}
	if !strings.Contains(obs[0].RootCause, "520 MiB") || !strings.Contains(obs[0].Remediation, "GOMEMLIMIT") || !strings.Contains(obs[0].Remediation, "jemalloc") {
		t.Errorf("finding lacks the gap or the fixes: %s / %s", obs[0].RootCause, obs[0].Remediation)
	}
}

func TestRSSWithoutHeapSilentWhenHeapExplainsRSS(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, dRSSKind, signals.L("kind", "anon"), now, constant(300<<20))
	series(st, dHeap, nil, now, constant(250<<20))
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
	series(st, dCGUsage, nil, now, constant(120<<20))
	series(st, dCGLimit, nil, now, constant(128<<20))
	series(st, dCGStat, signals.L("kind", "anon"), now, constant(110<<20))
	series(st, dCGStat, signals.L("kind", "file"), now, constant(8<<20))
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMAnon || !strings.Contains(obs[0].RootCause, "live heap unknown") {
		t.Fatalf("without heap: %+v", obs)
	}
	series(st, dHeap, nil, now, constant(4<<20))
	obs = oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMRetention || !strings.Contains(obs[0].RootCause, "106 MiB held by the allocator") {
		t.Fatalf("with heap: %+v", obs)
	}
}

func TestOOMAheadSilentWithHeadroomAndReportsKills(t *testing.T) {
	now := time.Unix(5000, 0)
	st := signals.New(600, 1000)
	series(st, dCGUsage, nil, now, constant(40<<20))
	series(st, dCGLimit, nil, now, constant(128<<20))
	series(st, dCGEvents, signals.L("event", "oom_kill"), now, constant(0))
	if obs := oomRule().Evaluate(Window{Store: st, Now: now}); len(obs) != 0 {
		t.Fatalf("headroom raised %+v", obs[0])
	}
	st.Put(dCGEvents, signals.L("event", "oom_kill"), 1, now)
	obs := oomRule().Evaluate(Window{Store: st, Now: now})
	if len(obs) != 1 || obs[0].Cause != CauseOOMKilled || obs[0].Severity != SeverityCritical {
		t.Fatalf("oom kill: %+v", obs)
	}
}
