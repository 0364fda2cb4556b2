package rules

import (
	"fmt"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseAllocatorRetention is rss_without_heap's one cause.
const CauseAllocatorRetention = "allocator_retention"

// RSSWithoutHeapOptions ([rules.rss_without_heap]).
type RSSWithoutHeapOptions struct {
	Window   time.Duration `toml:"window" range:"[10s,24h]"`       // heap flatness is judged over this window
	MinGap   float64       `toml:"min_gap_bytes" range:"[1,1e15]"` // bytes of anonymous RSS not explained by the heap
	MinRatio float64       `toml:"min_ratio" range:"(0,1]"`        // and at least this share of anonymous RSS
	// HeapFresh: a heap sample older than this is not "now" (set by New).
	HeapFresh time.Duration `toml:"-"`
}

// DefaultRSSWithoutHeapOptions are the defaults agent.conf documents.
func DefaultRSSWithoutHeapOptions() RSSWithoutHeapOptions {
	return RSSWithoutHeapOptions{Window: time.Minute, MinGap: 256 << 20, MinRatio: 0.5}
}

// RSSWithoutHeap tells allocator retention from a leak (seed 000 Problem
// C: "true leak vs. allocator behaviour is often confused"): resident
// anonymous memory far above the live heap, while the heap is flat or
// falling, is memory the allocator keeps, not memory the app holds.
type RSSWithoutHeap struct {
	o RSSWithoutHeapOptions
	h hysteresis
}

func NewRSSWithoutHeap(o RSSWithoutHeapOptions) *RSSWithoutHeap { return &RSSWithoutHeap{o: o} }

func (*RSSWithoutHeap) Name() string { return "rss_without_heap" }

func (*RSSWithoutHeap) Needs() []Need {
	return []Need{
		{Component: signals.CollectorMemory, What: "anonymous resident memory", Essential: true},
		{Component: signals.CollectorPprofHeap, What: "the live heap, which tells retention from a leak", Essential: true},
	}
}

// flatShare: the heap counts as flat while it changed by less than this
// share of the gap over the window (twice that keeps an open finding).
const flatShare = 0.05

func (r *RSSWithoutHeap) Evaluate(w Window) []Observation {
	now := w.Now
	anon, ok := w.FreshLatest(signals.ProcessMemoryRSSBytes, rssAnon, freshSlow)
	if !ok || anon.V <= 0 {
		return nil
	}
	h := heapOf(w, r.o.Window, r.o.HeapFresh)
	if !h.Known || !h.HasChange {
		return nil // without a heap source this cannot be told from a leak
	}
	gap := anon.V - h.Inuse
	// A growing heap is heap_leak's to name: the heap must be flat or
	// falling over the window, and not growing now.
	growingNow := h.HasGrowth && h.Growth.current && h.Growth.increase > flatShare*gap
	enter := gap >= r.o.MinGap && gap/anon.V >= r.o.MinRatio && h.Change <= flatShare*gap && !growingNow
	stay := gap >= 0.9*r.o.MinGap && gap/anon.V >= 0.9*r.o.MinRatio && h.Change <= 2*flatShare*gap && !growingNow
	if !r.h.hold("retention", now, enter, stay) {
		return nil
	}
	ev := []Evidence{
		{Signal: `process_memory_rss_bytes{kind="anon"}`, Value: anon.V, Unit: "bytes", Note: "anonymous resident memory"},
		{Signal: signals.HeapInuseBytes.Name, Value: h.Inuse, Unit: "bytes", Note: "live heap from the app's heap profile"},
		{Signal: "anon RSS - live heap", Value: gap, Threshold: r.o.MinGap, Unit: "bytes", Note: "resident but not live"},
		{Signal: signals.HeapInuseBytes.Name, Value: h.Change, Unit: "bytes", Window: h.Span, Note: "heap change over the window, from its oldest profile to its newest"},
	}
	symptom := fmt.Sprintf("anonymous RSS %s while the live heap is %s and not growing", fmtBytes(anon.V), fmtBytes(h.Inuse))
	if rss, ok := w.FreshLatest(signals.ProcessResidentMemoryBytes, nil, freshSlow); ok {
		symptom = fmt.Sprintf("RSS %s (anonymous %s) while the live heap is %s and not growing", fmtBytes(rss.V), fmtBytes(anon.V), fmtBytes(h.Inuse))
	}
	change := "flat"
	if h.Change < 0 {
		change = "falling"
	}
	// The heap profile covers the heap only: memory the app or a library
	// maps itself (mmap, cgo, native code) is resident beside it just as
	// freed memory the allocator keeps is, and the words say both (the
	// demo's retain fault, an mmap, was once called retention outright).
	smaps := "/proc/PID/smaps"
	if w.HasTarget {
		smaps = fmt.Sprintf("/proc/%d/smaps", w.Target.PID)
	}
	return []Observation{{
		Key:     "process",
		Cause:   CauseAllocatorRetention,
		Title:   fmt.Sprintf("%s resident beyond a %s live heap: kept by the allocator or held outside the heap, not a heap leak", fmtBytes(gap), change),
		Symptom: symptom,
		RootCause: fmt.Sprintf("%s of anonymous memory (%s) is resident but not in the live heap: freed memory the allocator keeps (arenas, fragmentation, pages not yet returned to the OS), or memory the app or its libraries allocate outside the heap its profile covers (mmap, cgo, native code). Not a heap leak: the heap is %s (changed by %s over the last %s)",
			fmtBytes(gap), percent(gap/anon.V), change, plusBytes(h.Change), duration(h.Span)),
		Severity:    SeverityWarning,
		Confidence:  0.8,
		Evidence:    ev,
		Remediation: w.advice().AllocatorRetention() + " Memory mapped outside the heap is not returned by any of this: the largest anonymous mappings in " + smaps + " show where it is.",
		Labels:      map[string]string{},
	}}
}

// plusBytes is a change in bytes with its sign: "+2 MiB", "-1.5 GiB", "0 B".
func plusBytes(b float64) string {
	if b > 0 {
		return "+" + fmtBytes(b)
	}
	return fmtBytes(b)
}
