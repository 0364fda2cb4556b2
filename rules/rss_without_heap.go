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
	Window   time.Duration `toml:"window" range:"[10s,24h]"`     // heap flatness is judged over this window
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
type RSSWithoutHeap struct{ o RSSWithoutHeapOptions }

func NewRSSWithoutHeap(o RSSWithoutHeapOptions) *RSSWithoutHeap { return &RSSWithoutHeap{o: o} }

func (*RSSWithoutHeap) Name() string { return "rss_without_heap" }

func (r *RSSWithoutHeap) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	anon, ok := st.Latest("process_memory_rss_bytes", signals.L("kind", "anon"))
	if !ok || now.Sub(anon.T) > 3*time.Second {
		return nil
	}
	h := heapOf(st, now, r.o.Window, r.o.HeapFresh)
	if !h.Known {
		return nil // without a heap source this cannot be told from a leak
	}
	gap := anon.V - h.Inuse
	if gap < r.o.MinGap || gap/anon.V < r.o.MinRatio {
		return nil
	}
	// A growing heap is heap_leak's to name; here the heap must be flat
	// or falling (within 5% of the gap over the window).
	if h.Trendy && h.Trend.increase > 0.05*gap {
		return nil
	}
	rss, _ := st.Latest("process_resident_memory_bytes", nil)
	ev := []Evidence{
		{Signal: `process_memory_rss_bytes{kind="anon"}`, Value: anon.V, Unit: "bytes", Note: "anonymous resident memory"},
		{Signal: "heap_inuse_bytes", Value: h.Inuse, Unit: "bytes", Note: "live heap from the app's heap profile"},
		{Signal: "anon RSS - live heap", Value: gap, Threshold: r.o.MinGap, Unit: "bytes", Note: "resident but not live"},
	}
	if h.Trendy {
		ev = append(ev, Evidence{Signal: "heap_inuse_bytes", Value: h.Trend.increase, Unit: "bytes", Window: h.Trend.span(), Note: "heap change over the window: flat or falling"})
	}
	return []Observation{{
		Key:   "process",
		Cause: CauseAllocatorRetention,
		Title: fmt.Sprintf("%s resident beyond the live heap: allocator retention, not a leak", fmtBytes(gap)),
		Symptom: fmt.Sprintf("RSS %s (anonymous %s) while the live heap is %s and not growing",
			fmtBytes(rss.V), fmtBytes(anon.V), fmtBytes(h.Inuse)),
		RootCause: fmt.Sprintf("%s of anonymous memory (%.0f%%) is resident but not in the live heap: the allocator keeps freed memory (arenas, fragmentation, or pages not yet returned to the OS). It is not a leak: the heap is flat",
			fmtBytes(gap), 100*gap/anon.V),
		Severity:    SeverityWarning,
		Confidence:  0.8,
		Evidence:    ev,
		Remediation: goAndNativeFix,
		Labels:      map[string]string{},
	}}
}
