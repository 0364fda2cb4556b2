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
	NearRatio float64       `toml:"near_ratio" range:"(0,1]"`  // usage/limit at or above this is near
	Window    time.Duration `toml:"window" range:"[10s,24h]"` // oom_kill events this recent count
	HeapFresh time.Duration `toml:"-"`                         // set by New
}

// DefaultOOMAheadOptions are the defaults agent.conf documents.
func DefaultOOMAheadOptions() OOMAheadOptions {
	return OOMAheadOptions{NearRatio: 0.9, Window: 5 * time.Minute}
}

// OOMAhead warns before the cgroup's memory limit kills the pod (seed 000
// Problem C: "pod evictions & OOMKills") and says which part of memory
// fills it, because the fix differs: a leak, allocator retention, or page
// cache the kernel would reclaim anyway.
type OOMAhead struct{ o OOMAheadOptions }

func NewOOMAhead(o OOMAheadOptions) *OOMAhead { return &OOMAhead{o: o} }

func (*OOMAhead) Name() string { return "oom_ahead" }

func (r *OOMAhead) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	usage, ok := st.Latest("cgroup_memory_usage_bytes", nil)
	limit, okl := st.Latest("cgroup_memory_limit_bytes", nil)
	if !ok || now.Sub(usage.T) > 3*time.Second {
		return nil
	}
	kills := st.Increase("cgroup_memory_events_total", signals.L("event", "oom_kill"), now.Add(-r.o.Window))
	near := okl && limit.V > 0 && usage.V/limit.V >= r.o.NearRatio
	if !near && kills == 0 {
		return nil
	}
	stat := func(kind string) float64 {
		s, _ := st.Latest("cgroup_memory_stat_bytes", signals.L("kind", kind))
		return s.V
	}
	anon, file := stat("anon"), stat("file")
	h := heapOf(st, now, r.o.Window, r.o.HeapFresh)

	cause := CauseOOMAnon
	var parts []string
	parts = append(parts, fmt.Sprintf("anonymous %s", fmtBytes(anon)), fmt.Sprintf("page cache %s", fmtBytes(file)))
	switch {
	case file > anon:
		cause = CauseOOMPageCache
	case h.Known && h.Inuse >= anon/2:
		cause = CauseOOMHeap
	case h.Known:
		cause = CauseOOMRetention
	}
	if h.Known {
		parts = append(parts, fmt.Sprintf("of which live heap %s and %s held by the allocator beyond it", fmtBytes(h.Inuse), fmtBytes(max(anon-h.Inuse, 0))))
	} else {
		parts = append(parts, "live heap unknown (no heap profile source: set pprof.heap_url)")
	}
	ev := []Evidence{
		{Signal: "cgroup_memory_usage_bytes", Value: usage.V, Unit: "bytes"},
		{Signal: `cgroup_memory_stat_bytes{kind="anon"}`, Value: anon, Unit: "bytes"},
		{Signal: `cgroup_memory_stat_bytes{kind="file"}`, Value: file, Unit: "bytes"},
	}
	var title, symptom string
	sev := SeverityWarning
	if okl && limit.V > 0 {
		ev = append(ev, Evidence{Signal: "cgroup_memory_limit_bytes", Value: limit.V, Threshold: r.o.NearRatio * limit.V, Unit: "bytes"})
		symptom = fmt.Sprintf("the cgroup uses %s of its %s limit (%.0f%%)", fmtBytes(usage.V), fmtBytes(limit.V), 100*usage.V/limit.V)
		title = fmt.Sprintf("memory at %.0f%% of the cgroup limit: OOM kill ahead", 100*usage.V/limit.V)
	}
	if kills > 0 {
		sev = SeverityCritical
		ev = append(ev, Evidence{Signal: `cgroup_memory_events_total{event="oom_kill"}`, Value: kills, Unit: "kills", Window: r.o.Window})
		title = fmt.Sprintf("%.0f OOM kills in the cgroup in the last %s", kills, fmtDur(r.o.Window))
		symptom = strings.TrimSpace(fmt.Sprintf("the kernel OOM-killed %.0f processes; %s", kills, symptom))
		if !near {
			cause = CauseOOMKilled
		}
	}
	fix := map[string]string{
		CauseOOMHeap:      "The live heap fills the limit: find what grows (see heap_leak's allocation sites) or raise the limit to the real working set.",
		CauseOOMRetention: "Most of it is memory the allocator keeps beyond the live heap. " + goAndNativeFix,
		CauseOOMPageCache: "Page cache fills the cgroup; the kernel reclaims it before killing, so an OOM is unlikely unless anonymous memory grows too: check file I/O patterns (large reads, mmap) before raising the limit.",
		CauseOOMAnon:      "Anonymous memory fills the limit; expose a heap profile (pprof.heap_url) to tell a leak from allocator retention, and meanwhile raise the limit or cap buffers.",
		CauseOOMKilled:    "Processes were OOM-killed: raise the memory limit to the peak working set, or find what grows (heap_leak) before it happens again.",
	}[cause]
	return []Observation{{
		Key:         "cgroup",
		Cause:       cause,
		Title:       title,
		Symptom:     symptom,
		RootCause:   fmt.Sprintf("what fills it: %s", strings.Join(parts, ", ")),
		Severity:    sev,
		Confidence:  0.8,
		Evidence:    ev,
		Remediation: fix,
		Labels:      map[string]string{},
	}}
}
