package rules

import (
	"fmt"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of oom_ahead: what fills the cgroup.
const (
	CauseOOMHeap      = "heap"
	CauseOOMRetention = "allocator_retention"
	CauseOOMPageCache = "page_cache"
	CauseOOMAnon      = "anonymous_memory" // heap side unknown
	CauseOOMKilled    = "oom_killed"
)

// OOMAheadOptions ([rules.oom_ahead]).
type OOMAheadOptions struct {
	NearRatio float64       `toml:"near_ratio" range:"(0,1]"` // usage/limit at or above this is near
	Window    time.Duration `toml:"window" range:"[10s,24h]"` // oom_kill events this recent count; usage growth is looked for over it
	HeapFresh time.Duration `toml:"-"`                        // set by New
}

// DefaultOOMAheadOptions are the defaults agent.conf documents.
func DefaultOOMAheadOptions() OOMAheadOptions {
	return OOMAheadOptions{NearRatio: 0.9, Window: 5 * time.Minute}
}

// OOMAhead warns before the cgroup's memory limit kills the pod (seed 000
// Problem C: "pod evictions & OOMKills") and says which part of memory
// fills it, because the fix differs: a leak, allocator retention, or page
// cache the kernel would reclaim anyway.
type OOMAhead struct {
	o OOMAheadOptions
	h hysteresis
}

func NewOOMAhead(o OOMAheadOptions) *OOMAhead { return &OOMAhead{o: o} }

func (*OOMAhead) Name() string { return "oom_ahead" }

func (*OOMAhead) Needs() []Need {
	return []Need{
		{Component: signals.CollectorCgroup, What: "the cgroup's memory usage, limit, breakdown and OOM kills", Essential: true},
		{Component: signals.CollectorPprofHeap, What: "how much of the memory is live heap and how much the allocator keeps (causes heap and allocator_retention)"},
	}
}

func (r *OOMAhead) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	usage, ok := w.FreshLatest(signals.CgroupMemoryUsageBytes, nil, freshSlow)
	if !ok {
		return nil
	}
	limit, okl := w.FreshLatest(signals.CgroupMemoryLimitBytes, nil, freshSlow)
	okl = okl && limit.V > 0
	kills := st.Increase(signals.CgroupMemoryEventsTotal, signals.L("event", "oom_kill"), now.Add(-r.o.Window))
	share := 0.0
	if okl {
		share = usage.V / limit.V
	}
	near := r.h.hold("near", now, okl && share >= r.o.NearRatio, okl && share >= r.o.NearRatio*releaseBand)
	if !near && kills == 0 {
		return nil
	}
	// What fills it, from memory.stat when it was read with the usage: a
	// kind the cgroup did not report is unknown, not zero.
	stat := func(kind string) (float64, bool) {
		s, ok := st.Latest(signals.CgroupMemoryStatBytes, signals.L("kind", kind))
		if !ok || s.T.Before(usage.T.Add(-freshSlow)) {
			return 0, false
		}
		return s.V, true
	}
	anon, okAnon := stat("anon")
	file, okFile := stat("file")
	h := heapOf(w, r.o.Window, r.o.HeapFresh)

	cause := CauseOOMAnon
	var parts []string
	bytesOr := func(v float64, ok bool) string {
		if !ok {
			return "unknown"
		}
		return fmtBytes(v)
	}
	parts = append(parts, "anonymous "+bytesOr(anon, okAnon), "page cache "+bytesOr(file, okFile))
	switch {
	case okAnon && okFile && file > anon:
		cause = CauseOOMPageCache
	case okAnon && h.Known && h.Inuse >= anon/2:
		cause = CauseOOMHeap
	case okAnon && h.Known:
		cause = CauseOOMRetention
	}
	switch {
	case h.Known && okAnon:
		// The heap is the target's; anon is the whole cgroup's, so what
		// is beyond the heap is the allocator's and everything else's.
		parts = append(parts, fmt.Sprintf("of the anonymous memory the target's live heap is %s and %s is beyond it (held by the allocator, mapped outside the heap, or stacks and other processes' memory)", fmtBytes(h.Inuse), fmtBytes(max(anon-h.Inuse, 0))))
	case h.Known:
		parts = append(parts, "the target's live heap is "+fmtBytes(h.Inuse))
	default:
		parts = append(parts, "live heap unknown (no heap profile source: set pprof.heap_url)")
	}
	ev := []Evidence{{Signal: signals.CgroupMemoryUsageBytes.Name, Value: usage.V, Unit: "bytes"}}
	if okAnon {
		ev = append(ev, Evidence{Signal: `cgroup_memory_stat_bytes{kind="anon"}`, Value: anon, Unit: "bytes"})
	}
	if okFile {
		ev = append(ev, Evidence{Signal: `cgroup_memory_stat_bytes{kind="file"}`, Value: file, Unit: "bytes"})
	}
	var title, symptom, forecast string
	sev := SeverityWarning
	if okl {
		ev = append(ev, Evidence{Signal: signals.CgroupMemoryLimitBytes.Name, Value: limit.V, Threshold: r.o.NearRatio * limit.V, Unit: "bytes"})
		symptom = fmt.Sprintf("the cgroup uses %s of its %s limit (%s)", fmtBytes(usage.V), fmtBytes(limit.V), percent(share))
		title = fmt.Sprintf("Memory at %s of the cgroup limit: OOM kill ahead", percent(share))
		// A forecast only from growth that is happening now, at its own
		// rate since it began.
		if g, ok := growthOf(st.Range(signals.CgroupMemoryUsageBytes, nil, now.Add(-r.o.Window))); ok && g.current {
			if eta, ok := g.until(limit.V); ok && eta > 0 {
				forecast = fmt.Sprintf("; usage grows by %s/min %s: at this rate the limit is reached in %s", fmtBytes(g.rate*60), g.over(), duration(eta))
				ev = append(ev, Evidence{Signal: signals.CgroupMemoryUsageBytes.Name, Value: g.rate * 60, Unit: "bytes/min", Window: g.duration(), Note: "growth rate since it began (least squares)"})
			}
		}
	}
	if kills > 0 {
		sev = SeverityCritical
		ev = append(ev, Evidence{Signal: `cgroup_memory_events_total{event="oom_kill"}`, Value: kills, Unit: "kills", Window: r.o.Window})
		title = fmt.Sprintf("%s in the cgroup in the last %s", count(kills, "OOM kill", ""), duration(r.o.Window))
		symptom = strings.TrimSuffix(fmt.Sprintf("the kernel OOM-killed %s; %s", count(kills, "process", "processes"), symptom), "; ")
		if !near {
			cause = CauseOOMKilled
		}
	}
	fix := map[string]string{
		CauseOOMHeap:      "The live heap fills the limit: find what grows (see heap_leak's allocation sites) or raise the limit to the real working set.",
		CauseOOMRetention: "Most of it is resident beyond the live heap (memory the allocator keeps, or mapped outside the heap). " + w.advice().AllocatorRetention(),
		CauseOOMPageCache: "Page cache fills the cgroup; the kernel reclaims it before killing, so an OOM is unlikely unless anonymous memory grows too: check file I/O patterns (large reads, mmap) before raising the limit.",
		CauseOOMAnon:      "Anonymous memory fills the limit; expose a heap profile (pprof.heap_url) to tell a leak from allocator retention, and meanwhile raise the limit or cap buffers.",
		CauseOOMKilled:    "Processes were OOM-killed: raise the memory limit to the peak working set, or find what grows (heap_leak) before it happens again.",
	}[cause]
	return []Observation{{
		Key:         "cgroup",
		Cause:       cause,
		Title:       title,
		Symptom:     symptom + forecast,
		RootCause:   fmt.Sprintf("what fills it: %s", strings.Join(parts, ", ")),
		Severity:    sev,
		Confidence:  0.8,
		Evidence:    ev,
		Remediation: fix,
		Labels:      map[string]string{},
	}}
}
