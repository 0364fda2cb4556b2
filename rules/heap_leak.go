package rules

import (
	"fmt"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of heap_leak.
const (
	CauseHeapLeak        = "heap_leak"
	CauseRSSGrowthNoHeap = "rss_growth_heap_unknown"
)

// AllocSite is one allocation site whose live heap grew between two heap
// profiles.
type AllocSite struct {
	Function string
	File     string
	Line     int64
	Bytes    int64
	Objects  int64
}

// HeapHistory gives the rule the diff of two heap profiles. The agent
// implements it over the bounded profile store; rules do not parse pprof.
type HeapHistory interface {
	// GrowthSince diffs the oldest profile taken at or after from with the
	// newest, returning the top sites by growth and the two profiles' times.
	GrowthSince(from time.Time, top int) (sites []AllocSite, older, newer time.Time, err error)
}

// HeapLeakOptions ([rules.heap_leak]).
type HeapLeakOptions struct {
	Window    time.Duration `toml:"window" range:"[10s,24h]"`
	MinGrowth float64       `toml:"min_growth_bytes" range:"[1,1e15]"` // bytes over Window
	Steady    float64       `toml:"steady" range:"(0,1]"`
	TopSites  int           `toml:"top_sites" range:"[1,100]"`
	// HeapFresh: a heap sample older than this is not "now" (three
	// pprof.interval, set by New).
	HeapFresh time.Duration `toml:"-"`
}

// DefaultHeapLeakOptions are the defaults agent.conf documents.
func DefaultHeapLeakOptions() HeapLeakOptions {
	return HeapLeakOptions{Window: 2 * time.Minute, MinGrowth: 32 << 20, Steady: 0.7, TopSites: 5}
}

// HeapLeak names a live heap that grows across windows (seed 000 Problem
// C) and, from two heap profiles, the allocation sites that grew. Without
// a heap source it still reports steady anonymous RSS growth, and says the
// heap side is unknown instead of calling it a leak.
type HeapLeak struct {
	o HeapLeakOptions
}

// NewHeapLeak returns the rule; it reads heap profiles from Window.Heap,
// which may be nil (no heap source).
func NewHeapLeak(o HeapLeakOptions) *HeapLeak {
	return &HeapLeak{o: o}
}

func (*HeapLeak) Name() string { return "heap_leak" }

func (r *HeapLeak) Evaluate(w Window) []Observation {
	st, now := w.Store, w.Now
	h := heapOf(st, now, r.o.Window, r.o.HeapFresh)
	if !h.Known {
		return r.rssOnly(w)
	}
	if !h.Trendy || h.Trend.increase < r.o.MinGrowth || h.Trend.steady < r.o.Steady || h.Trend.span() < r.o.Window/2 {
		return nil
	}
	ev := []Evidence{
		{Signal: "heap_inuse_bytes", Value: h.Inuse, Unit: "bytes", Note: "live heap now"},
		{Signal: "heap_inuse_bytes", Value: h.Trend.increase, Threshold: r.o.MinGrowth, Unit: "bytes", Window: h.Trend.span(),
			Note: fmt.Sprintf("growth, %.0f%% of profiles rising or flat", 100*h.Trend.steady)},
	}
	var arts []Artifact
	where := "the heap profiles could not be diffed"
	if w.Heap != nil {
		sites, older, newer, err := w.Heap.GrowthSince(now.Add(-r.o.Window), r.o.TopSites)
		switch {
		case err != nil:
			where = "the heap profiles could not be diffed: " + err.Error()
		case len(sites) == 0:
			where = "no allocation site grew between the profiles"
		default:
			var names []string
			for _, s := range sites {
				if s.Bytes <= 0 {
					continue
				}
				loc := fmt.Sprintf("%s:%d", s.File, s.Line)
				arts = append(arts, Artifact{Kind: "frame", Value: s.Function, Detail: fmt.Sprintf("%s +%s (+%d objects)", loc, fmtBytes(float64(s.Bytes)), s.Objects)})
				names = append(names, fmt.Sprintf("%s (%s, +%s)", s.Function, loc, fmtBytes(float64(s.Bytes))))
			}
			where = fmt.Sprintf("between the heap profiles of %s and %s the growth is in %s",
				older.Format("15:04:05"), newer.Format("15:04:05"), strings.Join(names, ", "))
		}
	}
	return []Observation{{
		Key:         "process",
		Cause:       CauseHeapLeak,
		Title:       fmt.Sprintf("live heap growing: +%s in %s", fmtBytes(h.Trend.increase), fmtDur(h.Trend.span())),
		Symptom:     fmt.Sprintf("the live heap grew from %s to %s and does not come back down", fmtBytes(h.Trend.first.V), fmtBytes(h.Inuse)),
		RootCause:   fmt.Sprintf("memory the app still references keeps growing (%s/min): %s", fmtBytes(h.Trend.slope*60), where),
		Severity:    SeverityWarning,
		Confidence:  0.8,
		Evidence:    ev,
		Artifacts:   arts,
		Remediation: "Find why the named allocation sites keep their objects reachable: caches without a bound or eviction, maps keyed by request or connection that are never deleted from, goroutines/tasks that never end, buffers retained across awaits.",
		Labels:      map[string]string{},
	}}
}

// rssOnly is the rule without a heap source: steady anonymous RSS growth,
// reported as such.
var rssAnon = signals.L("kind", "anon")

func (r *HeapLeak) rssOnly(w Window) []Observation {
	st, now := w.Store, w.Now
	s := st.Range("process_memory_rss_bytes", rssAnon, now.Add(-r.o.Window))
	tr, ok := trendOf(s)
	if !ok || tr.increase < r.o.MinGrowth || tr.steady < r.o.Steady || tr.span() < r.o.Window/2 {
		return nil
	}
	return []Observation{{
		Key:   "process",
		Cause: CauseRSSGrowthNoHeap,
		Title: fmt.Sprintf("anonymous memory growing: +%s in %s (heap unknown)", fmtBytes(tr.increase), fmtDur(tr.span())),
		Symptom: fmt.Sprintf("anonymous RSS grew from %s to %s steadily",
			fmtBytes(tr.first.V), fmtBytes(tr.last.V)),
		RootCause: "the process's anonymous memory grows steadily; without a heap profile culprit cannot tell a leak from allocator retention",
		Severity:  SeverityInfo,
		Evidence: []Evidence{{Signal: `process_memory_rss_bytes{kind="anon"}`, Value: tr.increase, Threshold: r.o.MinGrowth, Unit: "bytes", Window: tr.span(),
			Note: fmt.Sprintf("%.0f%% of samples rising or flat", 100*tr.steady)}},
		Confidence:  0.5,
		Remediation: "Expose a heap profile (Go: net/http/pprof; Rust: pprof-rs or jemalloc's prof) and set pprof.heap_url so culprit can name the allocation sites.",
		Labels:      map[string]string{},
	}}
}
