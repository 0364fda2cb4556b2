package rules

import (
	"fmt"
	"slices"
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
	Window    time.Duration `toml:"window" range:"[10s,24h]"`          // where growth began is looked for within this window
	MinGrowth float64       `toml:"min_growth_bytes" range:"[1,1e15]"` // bytes gained since the growth began
	Steady    float64       `toml:"steady" range:"(0,1]"`              // share of the growth's samples that did not go down
	TopSites  int           `toml:"top_sites" range:"[1,100]"`
	// MinDuration: growth must have lasted this long to be a leak, so a
	// cache warming up after a deploy is not one.
	MinDuration time.Duration `toml:"min_duration" range:"[0s,24h]"`
	// HeapFresh: a heap sample older than this is not "now" (three
	// pprof.interval, set by New).
	HeapFresh time.Duration `toml:"-"`
}

// DefaultHeapLeakOptions are the defaults agent.conf documents.
func DefaultHeapLeakOptions() HeapLeakOptions {
	return HeapLeakOptions{Window: 2 * time.Minute, MinGrowth: 32 << 20, Steady: 0.7, TopSites: 5, MinDuration: 30 * time.Second}
}

// HeapLeak names a live heap that grows across windows (seed 000 Problem
// C) and, from two heap profiles, the allocation sites that grew. Without
// a heap source it still reports steady anonymous RSS growth, and says the
// heap side is unknown instead of calling it a leak.
type HeapLeak struct {
	o HeapLeakOptions
	h hysteresis
}

// NewHeapLeak returns the rule; it reads heap profiles from Window.Heap,
// which may be nil (no heap source).
func NewHeapLeak(o HeapLeakOptions) *HeapLeak {
	return &HeapLeak{o: o}
}

func (*HeapLeak) Name() string { return "heap_leak" }

func (*HeapLeak) Needs() []Need {
	return []Need{
		{Component: signals.CollectorPprofHeap, What: "the live heap's growth and the allocation sites that grew (anonymous RSS growth is reported with the heap unknown)"},
		{Component: signals.CollectorMemory, What: "anonymous RSS growth when no heap profile is pulled"},
	}
}

// minSiteShare: allocation sites after the first are named only when
// they grew by at least this share of the heap's growth.
const minSiteShare = 0.01

// leaking says whether g is a leak by the options: present, steady growth
// of at least MinGrowth that has lasted MinDuration. Once it was, it stays
// one while the growth still rises, at a little less.
func (r *HeapLeak) leaking(g growth, ok bool, now time.Time, name string) bool {
	long := ok && g.duration() >= r.o.MinDuration && g.rate > 0
	return r.h.hold(name, now,
		long && g.current && g.increase >= r.o.MinGrowth && g.steady >= r.o.Steady,
		long && g.rising && g.increase >= 0.8*r.o.MinGrowth && g.steady >= r.o.Steady-0.1)
}

func (r *HeapLeak) Evaluate(w Window) []Observation {
	now := w.Now
	h := heapOf(w, r.o.Window, r.o.HeapFresh)
	if !h.Known {
		return r.rssOnly(w)
	}
	g := h.Growth
	if !r.leaking(g, h.HasGrowth, now, "heap") {
		return nil
	}
	still, stopped := g.growing()
	estimated := false // the stop's time, from the profiles' rate alone
	by, rateNote := "the last heap profiles", "rate since the growth began (least squares)"
	profiles := w.Store.Range(signals.HeapInuseBytes, nil, now.Add(-r.o.Window))
	if !still {
		// The growth is told as it was up to its last rise: a flat tail
		// fitted with it blends the quiet before the onset into the rate
		// and the start (seen: a leak of 46 s told as 80 s at two thirds
		// of its rate, a profile after it stopped).
		if k := slices.IndexFunc(profiles, func(x signals.Sample) bool { return x.T.After(g.lastRise) }); k > 0 {
			if g2, ok := growthOf(profiles[:k]); ok && g2.rate > 0 {
				g = g2
			}
		}
	}
	if end, began, ok := rssStop(w, g, profiles); ok {
		// Where between its last two profiles the growth stopped: it is
		// told up to there, its rate over the time it ran rather than
		// over the quiet until the profile.
		still, stopped, by = false, "has not grown since "+end.Format("15:04:05"), "its anonymous resident memory, read each second"
		rateNote = "rate while it grew: the growth over the time it ran"
		g.start = began
		g.rate = g.increase / end.Sub(g.start).Seconds()
		g.last.T = end
	} else if end, began, rate, ok := profileStop(profiles, g); ok {
		estimated = true
		stopped, by = "has not grown since about "+end.Format("15:04:05"), "estimated from the heap profiles: at their rate, the last one's level was reached then"
		if still {
			// The newest profile rose by less than the rate before gives:
			// the growth stopped or slowed in its interval, which the
			// next profile tells apart. Neither is "still grows" at a
			// rate blended with it (seen: "384.1 MiB/min for 53 s ...
			// still grows" 7 s after a 45 s leak at 480 ended).
			stopped = "slowed or stopped about " + end.Format("15:04:05")
			by = "estimated from the heap profiles: at their rate, the newest one's level was reached then"
		}
		still = false
		rateNote = "rate of the heap profiles before the stop (least squares)"
		g.start, g.rate, g.last.T = began, rate, end
	}
	perMin := fmtBytes(g.rate*60) + "/min"
	ev := []Evidence{
		{Signal: signals.HeapInuseBytes.Name, Value: h.Inuse, Unit: "bytes", Note: "live heap now"},
		{Signal: signals.HeapInuseBytes.Name, Value: g.increase, Threshold: r.o.MinGrowth, Unit: "bytes", Window: g.duration(),
			Note: fmt.Sprintf("growth since it began; %s of the %s since rising or flat", percent(g.steady), count(float64(g.n), "profile", ""))},
		{Signal: signals.HeapInuseBytes.Name, Value: g.rate * 60, Unit: "bytes/min", Window: g.duration(), Note: rateNote},
	}
	var arts []Artifact
	where := "the heap profiles could not be diffed"
	if w.Heap != nil {
		// The profiles from where the growth began: older ones would mix
		// in what changed before it.
		sites, older, newer, err := w.Heap.GrowthSince(g.from().T, r.o.TopSites)
		switch {
		case err != nil:
			where = "the heap profiles could not be diffed: " + err.Error()
		case len(sites) == 0:
			where = "no allocation site grew between the profiles"
		default:
			var names []string
			for i, s := range sites {
				// A site that grew by a sliver of the growth (the
				// runtime's own bookkeeping) is not where it is.
				if s.Bytes <= 0 || (i > 0 && float64(s.Bytes) < minSiteShare*g.increase) {
					continue
				}
				loc := fmt.Sprintf("%s:%d", s.File, s.Line)
				arts = append(arts, Artifact{Kind: "frame", Value: s.Function, Detail: fmt.Sprintf("%s +%s (%s)", loc, fmtBytes(float64(s.Bytes)), count(float64(s.Objects), "more object", "more objects"))})
				names = append(names, fmt.Sprintf("%s (%s, +%s)", s.Function, loc, fmtBytes(float64(s.Bytes))))
			}
			if len(names) == 0 {
				where = "no allocation site grew between the profiles"
				break
			}
			where = fmt.Sprintf("between the heap profiles of %s and %s the growth is in %s",
				older.Format("15:04:05"), newer.Format("15:04:05"), strings.Join(names, ", "))
		}
	}
	verb, tense, keeps := "growing", "and still grows", "keeps growing"
	// The growth is told from where it began to where it rose last, the
	// same +increase the cause says; a heap that stopped can stand a
	// little above that now (the app's other allocations), which is said
	// apart (seen: "grew from 7 MiB to 249.4 MiB" beside "+238.9 MiB").
	to := h.Inuse
	if !still {
		verb, tense, keeps = "grew", "and "+stopped+" ("+by+")", "grew"
		to = g.from().V + g.increase
		if now := fmtBytes(h.Inuse); now != fmtBytes(to) {
			tense += "; " + now + " now"
		}
	}
	return []Observation{{
		Key:           "process",
		Cause:         CauseHeapLeak,
		Title:         fmt.Sprintf("Live heap %s by %s %s", verb, perMin, g.over()),
		Symptom:       fmt.Sprintf("the live heap grew from %s to %s %s %s", fmtBytes(g.from().V), fmtBytes(to), g.since(), tense),
		RootCause:     fmt.Sprintf("memory the app still references %s (+%s, %s): %s", keeps, fmtBytes(g.increase), perMin, where),
		Severity:      SeverityWarning,
		Confidence:    0.8,
		Evidence:      ev,
		Artifacts:     arts,
		Remediation:   "Find why the named allocation sites keep their objects reachable: caches without a bound or eviction, maps keyed by request or connection that are never deleted from, goroutines/tasks that never end, buffers retained across awaits.",
		Labels:        map[string]string{},
		Stopped:       !still,
		StopEstimated: estimated,
	}}
}

// rssStop tells, from the anonymous RSS (one sample a second), when a
// heap growth stopped, somewhere between two heap profiles, which come
// pprof.interval (10 s) apart. Seen in the demo: a leak of 40 s at 480
// MiB/min told "growing by 392.1 MiB/min for 48.5 s ... and still grows"
// 8 s after it ended, and once, with the profile after the stop a hair
// above the one before (the app's other allocations), 11 s after. It
// answers only when the RSS followed the heap up (it rose by at least
// half of the heap's growth) and climbed at under a quarter of its rate
// since, for long enough that the growth would have left it well behind
// (three times the tolerance, 2 % of the growth); when no heap profile
// since the stop stands above the first one after it; and when that
// profile's rise is no more than growth until the stop explains. A heap that grows inside resident memory (under a
// memory limit, say) is left saying it grows. began is when the growth
// began: where the RSS left its old level, else where the line of the
// profiles before the stop meets it.
func rssStop(w Window, g growth, heap []signals.Sample) (end, began time.Time, ok bool) {
	if g.rate <= 0 || g.increase <= 0 || g.sinceStart {
		return end, began, false
	}
	rss := w.Store.Range(signals.ProcessMemoryRSSBytes, rssAnon, g.from().T)
	if len(rss) < 4 || !w.Fresh(rss[len(rss)-1].T, freshSlow) {
		return end, began, false
	}
	// The stop is the first second from which the RSS never again
	// climbs at a quarter of the growth's rate: after a leak ends, a Go
	// heap's RSS still creeps up towards its GC goal with the app's
	// other allocations, slowly.
	tol := max(float64(1<<20), 0.02*g.increase)
	e := -1
	for i, x := range rss {
		if x.V-rss[0].V < g.increase/2 {
			continue // the RSS has not followed the heap up (yet)
		}
		if !slices.ContainsFunc(rss[i+1:], func(y signals.Sample) bool {
			return y.V-x.V > tol+g.rate/4*y.T.Sub(x.T).Seconds()
		}) {
			e = i
			break
		}
	}
	if e < 0 {
		return end, began, false
	}
	end = rss[e].T
	flat := rss[len(rss)-1].T.Sub(end)
	if !end.After(g.start) || g.rate*flat.Seconds() < 3*tol {
		return end, began, false
	}
	// The first profile after the stop (j), and the rate the ones before
	// it grew at. Every profile from j on must stand where j does: a
	// heap profile a hair above the one before (the app's other
	// allocations) was enough for "still grows" 11 s after a stop.
	j := slices.IndexFunc(heap, func(x signals.Sample) bool { return !x.T.Before(end) })
	if j < 2 {
		return end, began, false
	}
	for _, x := range heap[j:] {
		if x.V > heap[j].V+tol {
			return end, began, false
		}
	}
	prev := heap[j-1]
	before, fits := lineBefore(heap, j)
	began = g.start
	if fits && before.start.Before(end) {
		began = before.start
	} else {
		before.rate = g.rate
	}
	if heap[j].V-prev.V > 1.25*before.rate*end.Sub(prev.T).Seconds()+tol {
		return end, began, false
	}
	// The RSS dates the start as well, to the second: the last sample
	// of its old level before the climb that ends at end (the profiles'
	// line put the demo's start 3 s early).
	k := e
	for ; k > 0 && rss[k].V > rss[0].V+tol; k-- {
	}
	if k > 0 && rss[k].T.After(g.from().T.Add(-time.Second)) {
		began = rss[k].T
	}
	return end, began, true
}

// profileStop is rssStop for a heap whose RSS does not tell (it did not
// follow the heap up: memory resident from an earlier spike is reused):
// when the last profile that rose (g.last) rose by less than three
// quarters of what the profiles before it grew at, the growth stopped
// inside that last interval, and a rate fitted through it is low (seen:
// a 42 s leak at 480 MiB/min told "grew by 402 MiB/min for 49.9 s"). The
// growth is then told by the profiles before, up to where their line
// reaches the last one: the start is found the same way.
func profileStop(heap []signals.Sample, g growth) (end, began time.Time, rate float64, ok bool) {
	i := slices.IndexFunc(heap, func(x signals.Sample) bool { return x.T.Equal(g.last.T) })
	if i < minSegment {
		return end, began, 0, false
	}
	before, fits := lineBefore(heap, i)
	if !fits || !before.start.Before(heap[i-1].T) {
		return end, began, 0, false
	}
	prev := heap[i-1]
	step := g.last.V - prev.V
	if step <= 0 || step >= 0.75*before.rate*g.last.T.Sub(prev.T).Seconds() {
		return end, began, 0, false
	}
	end = prev.T.Add(time.Duration(step / before.rate * float64(time.Second)))
	return end, before.start, before.rate, true
}

// lineBefore is the growth of the profiles before heap[i], when they grew
// from a start they show: the rate and start a stop inside the interval
// to heap[i] does not bend.
func lineBefore(heap []signals.Sample, i int) (growth, bool) {
	g, ok := growthOf(heap[:i])
	return g, ok && g.rate > 0 && !g.sinceStart
}

// rssOnly is the rule without a heap source: steady anonymous RSS growth,
// reported as such.
var rssAnon = signals.L("kind", "anon")

func (r *HeapLeak) rssOnly(w Window) []Observation {
	st, now := w.Store, w.Now
	if _, ok := w.FreshLatest(signals.ProcessMemoryRSSBytes, rssAnon, freshSlow); !ok {
		return nil
	}
	g, ok := growthOf(st.Range(signals.ProcessMemoryRSSBytes, rssAnon, now.Add(-r.o.Window)))
	if !r.leaking(g, ok, now, "rss") {
		return nil
	}
	perMin := fmtBytes(g.rate*60) + "/min"
	return []Observation{{
		Key:   "process",
		Cause: CauseRSSGrowthNoHeap,
		Title: fmt.Sprintf("Anonymous memory growing by %s %s (heap unknown)", perMin, g.over()),
		Symptom: fmt.Sprintf("anonymous RSS grew from %s to %s %s and still grows",
			fmtBytes(g.from().V), fmtBytes(g.last.V), g.since()),
		RootCause: fmt.Sprintf("the process's anonymous memory grows steadily (+%s, %s); without a heap profile culprit cannot tell a leak from allocator retention", fmtBytes(g.increase), perMin),
		Severity:  SeverityInfo,
		Evidence: []Evidence{
			{Signal: `process_memory_rss_bytes{kind="anon"}`, Value: g.increase, Threshold: r.o.MinGrowth, Unit: "bytes", Window: g.duration(),
				Note: fmt.Sprintf("growth since it began; %s of the %s since rising or flat", percent(g.steady), count(float64(g.n), "sample", ""))},
			{Signal: `process_memory_rss_bytes{kind="anon"}`, Value: g.rate * 60, Unit: "bytes/min", Window: g.duration(), Note: "rate since the growth began (least squares)"},
		},
		Confidence:  0.5,
		Remediation: "Expose a heap profile (Go: net/http/pprof; Rust: pprof-rs or jemalloc's prof) and set pprof.heap_url so culprit can name the allocation sites.",
		Labels:      map[string]string{},
	}}
}
