package rules

import (
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// trend summarises a gauge over a window: how much it grew, how steadily,
// and at what rate, by least squares over every sample. It averages over
// the whole window, quiet time included, so it is right only for a series
// that behaved the same throughout; leak and limit rules use growthOf,
// which measures from where the growth began.
type trend struct {
	first, last signals.Sample
	n           int
	increase    float64 // last - first
	steady      float64 // share of steps that did not go down, 0..1
	slope       float64 // least-squares rate, per second
}

func trendOf(s []signals.Sample) (trend, bool) {
	if len(s) < 3 {
		return trend{}, false
	}
	t := trend{first: s[0], last: s[len(s)-1], n: len(s)}
	t.increase = t.last.V - t.first.V
	t.steady = steadyShare(s)
	t.slope = slopeOf(s)
	return t, true
}

// growth is the present growth of a gauge, measured from where it began.
// A leak that starts after a quiet hour must be reported at its own rate,
// not at the hour's average, and a series that rose once and then stayed
// flat near a limit is not growing at all. So the series is cut at its
// change points (where its slope changed) and only the last regime, the
// one the series is in now, is fitted.
type growth struct {
	// base is the last sample before the present regime, at the old
	// level: what the growth is counted from (the whole series' first
	// sample when sinceStart). last is the newest sample.
	base, last signals.Sample
	first      signals.Sample // the regime's first sample
	// start is when the growth began: where the regime's line meets the
	// old level, between base and the regime's first fitted sample (base's
	// time when sinceStart).
	start    time.Time
	n        int     // samples in the regime
	rate     float64 // per second, least squares over the regime only
	increase float64 // last - from()
	steady   float64 // share of the regime's steps that did not go down
	// current: the newest quarter of the regime (at least 3 samples) rose
	// at no less than half the regime's rate: the growth is present, so a
	// forecast from it means something. rising is the looser "it still
	// rose at all", which is what keeps an open finding open.
	current, rising bool
	// lastRise is the newest sample of the regime that rose above the one
	// before it by a quarter of the rate's step at least: last's time
	// while the series still grows, earlier once it went flat (a finding
	// held open by rising must not say "still grows" of a heap that
	// stopped at the last profile).
	lastRise time.Time
	// pause is the longest the regime went between two rises (from its
	// first sample): a leak in bursts pauses between them, and is not
	// over until it stayed flat for longer than that (stopped).
	pause time.Duration
	// floor is how far the regime's newest samples (the same tail as
	// current's) all stand above its oldest ones (as many, from from()
	// on): the level the series holds, not its peaks. Bursts that come and go (FDs of connections opened and
	// closed again) raise the peaks but leave the floor where it was; a
	// leak raises the floor.
	floor float64
	// sinceStart: no change point was found, the regime spans every
	// sample given: it began at or before the first of them.
	sinceStart bool
	// unsure: every sample before the regime stands on its line, within
	// the regime's own noise: nothing says they are an old level rather
	// than the growth itself (a pause between bursts looks flat), so it
	// may have begun before them. Its duration is then a lower bound, and
	// its start no onset (seen: a leak in bursts for two minutes told
	// "rising ... for 58 s (since T)", T a little after the window's
	// start).
	unsure bool
	// young: the newest few samples (fewer than minSegment) already
	// broke from the regime: a change too recent to be fitted. The
	// regime's rate is then not the present one, so it is not current.
	young bool
}

// Change points are looked for only where the regime has minSegment
// samples (3 steps, so one noisy step is no trend). Before it one sample
// is enough: a leak that began just after the window's first sample must
// not be blended with it (seen: a fifth off when 2 quiet samples were
// left in the window); a split there that noise alone suggests only drops
// a sample or two from the fit, and the penalty below makes it rare.
const (
	minBefore  = 1
	minSegment = 4
	maxRegimes = 4 // change points looked for at most, newest regime last
	bicPenalty = 6
)

// growthOf measures the regime a series is in now (see growth). It needs
// minSegment samples.
func growthOf(s []signals.Sample) (growth, bool) {
	if len(s) < minSegment {
		return growth{}, false
	}
	k := lastRegime(s)
	// Samples that open the regime still at its old level (see level) are
	// not its growth: it begins at the last of them. Seen on heap
	// profiles: three flat ones and a jump made a regime whose line said
	// "growing by 89.5 MiB/min for 31 s", 6 s into a leak of 480 MiB/min,
	// and opened the finding.
	flatFirst := false
	if seg := s[k:]; len(seg) >= 3 {
		n := len(seg)
		if span := seg[n-1].T.Sub(seg[0].T).Seconds(); span > 0 {
			rate := (seg[n-1].V - seg[0].V) / span
			// level: b stands where a does, by the rate (under a quarter
			// of its step) and by the level (2 % of the regime's rise: a
			// profile taken 2 s into a leak is not at the old level).
			level := func(a, b signals.Sample) bool {
				d := b.V - a.V
				return d < rate/4*b.T.Sub(a.T).Seconds() && d < 0.02*(seg[n-1].V-seg[0].V)
			}
			i := 0
			for i < n-3 && rate > 0 && level(seg[i], seg[i+1]) {
				i++
			}
			// The first sample alone can be at the old level too: it
			// stands where the sample before the regime does. Only when
			// what follows is growth itself: a jump and a plateau
			// (CLOSE_WAIT sockets leaked in a burst) keeps its line
			// through the jump, as before.
			first := i > 0 || (k > 0 && rate > 0 && level(s[k-1], seg[0]))
			if rest := seg[i+1:]; first && (rest[len(rest)-1].V-rest[0].V) >= rate/4*rest[len(rest)-1].T.Sub(rest[0].T).Seconds() {
				k, flatFirst = k+i, true
			}
		}
	}
	seg := s[k:]
	n := len(seg)
	g := growth{base: s[max(k-1, 0)], first: seg[0], last: seg[n-1], start: s[0].T, n: n, sinceStart: k == 0}
	// The regime's first sample may still be at the old level (the split
	// is ambiguous by one sample; it is when flatFirst): fitting through
	// it would blend up to one quiet interval into the rate (a quarter of
	// it, seen on 6 heap profiles). So after a change point the rate is
	// fitted on the rest, and the start is where that line meets the old
	// level.
	fit := seg
	if (k > 0 && n > minSegment) || (flatFirst && n >= 3) {
		fit = seg[1:]
	}
	g.rate = slopeOf(fit)
	if k > 0 {
		g.start = g.base.T
		old := g.base
		if flatFirst {
			old = seg[0]
		}
		if g.rate > 0 {
			back := time.Duration((fit[0].V - old.V) / g.rate * float64(time.Second))
			g.start = fit[0].T.Add(-max(0, min(back, fit[0].T.Sub(old.T))))
		}
	}
	g.increase = g.last.V - g.from().V
	if k > 0 && g.rate > 0 {
		g.unsure = onLine(fit, g.rate, s[:k])
	}
	g.steady = steadyShare(s[max(k-1, 0):])
	// A break in the newest 2 or 3 samples, looked for in the regime and
	// a few samples before it (a short regime alone is too short a line).
	lo := max(0, k-3)
	g.young = lo+changePoint(s[lo:], 2, minSegment-1) > k
	// A regime that opened at the old level and rose in fewer samples
	// than a line needs is the same young change, found by its flat start.
	g.young = g.young || (flatFirst && n-1 < minSegment)
	tail := seg[n-max(3, n/4):]
	rose := tail[len(tail)-1].V - tail[0].V
	expected := g.rate * tail[len(tail)-1].T.Sub(tail[0].T).Seconds()
	g.rising = rose > 0
	// A rise is a step of at least a quarter of what the rate predicts
	// over it: a heap profile a hair above the one before (the app's
	// other allocations, after a leak stopped) is no growth.
	g.lastRise = seg[0].T
	for i := 1; i < n; i++ {
		if d := seg[i].V - seg[i-1].V; d > 0 && d >= g.rate/4*seg[i].T.Sub(seg[i-1].T).Seconds() {
			g.pause = max(g.pause, seg[i].T.Sub(g.lastRise))
			g.lastRise = seg[i].T
		}
	}
	g.floor = lowest(tail) - lowest(s[max(k-1, 0):][:len(tail)])
	g.current = g.rate > 0 && rose > 0 && rose >= expected/2 && !g.young
	return g, true
}

// from is the sample to count the growth from: the newest one at or
// before its start (the regime's first sample when it is still at the
// old level, else base). Counters (CFS periods) and kinds (FDs by kind)
// are counted from it, and heap profiles diffed from its time.
func (g growth) from() signals.Sample {
	if !g.first.T.After(g.start) {
		return g.first
	}
	return g.base
}

// growing reports whether the newest sample still rose; else, the words
// for when it last did ("has not grown since 15:04:05").
func (g growth) growing() (bool, string) {
	if !g.lastRise.Before(g.last.T) {
		return true, ""
	}
	return false, "has not grown since " + g.lastRise.Format("15:04:05")
}

// stopped reports whether the growth is over: no rise for longer than
// the longest pause it made while it grew, and for two sampling intervals
// at least. growing's "has not grown since" is true of any flat sample;
// a leak in bursts (a descriptor lost every few seconds, sampled each
// second) is flat between them, and telling each pause as a stop would
// turn the words to the past tense and back at every burst.
func (g growth) stopped() bool {
	flat := g.last.T.Sub(g.lastRise)
	step := time.Duration(0)
	if g.n > 1 {
		step = g.last.T.Sub(g.first.T) / time.Duration(g.n-1)
	}
	return flat > g.pause && flat >= 2*step
}

// duration is how long the present regime has lasted (at least, when
// sinceStart).
func (g growth) duration() time.Duration { return g.last.T.Sub(g.start) }

// until returns how long until the value reaches limit at the present
// rate, or false when it is not growing.
func (g growth) until(limit float64) (time.Duration, bool) {
	return untilLimit(g.last.V, g.rate, limit)
}

// over says for how long the growth has run, for prose: "for 15 s (since
// 12:00:03)", or "for at least 1m0s" when it began before the samples.
func (g growth) over() string {
	if g.sinceStart || g.unsure {
		return "for at least " + duration(g.duration())
	}
	return "for " + duration(g.duration()) + " (since " + g.start.Format("15:04:05") + ")"
}

// since says when the growth began, for prose: "since 12:00:03 (15 s
// ago)", or "over the last 1m0s (it began earlier)".
func (g growth) since() string {
	if g.sinceStart {
		return "over the last " + duration(g.duration()) + " (it began earlier)"
	}
	if g.unsure {
		return "over the last " + duration(g.duration()) + " (it may have begun earlier)"
	}
	return "since " + g.start.Format("15:04:05") + " (" + duration(g.duration()) + ")"
}

func untilLimit(last, rate, limit float64) (time.Duration, bool) {
	if rate <= 0 {
		return 0, false
	}
	if limit <= last {
		return 0, true
	}
	secs := (limit - last) / rate
	if secs > math.MaxInt64/float64(time.Second) {
		return 0, false
	}
	return time.Duration(secs * float64(time.Second)), true
}

// lastRegime returns the index where the series' present regime begins:
// it splits at the best change point, then looks again in what follows,
// so a leak that sped up is measured at its new rate.
func lastRegime(s []signals.Sample) int {
	k := 0
	for range maxRegimes {
		j := changePoint(s[k:], minSegment, len(s))
		if j == 0 {
			break
		}
		k += j
	}
	return k
}

// changePoint is the index of the best change of slope in s that leaves
// minPost to maxPost samples after it, or 0 when one straight line
// describes s about as well. Each side gets its own
// least-squares line; the split is kept when it cuts the squared error
// by more than the Bayesian information criterion asks for three more
// parameters (the second line and the change's place): SSE2 < SSE1 ·
// n^(-3/n). Among splits that fit equally well the earliest wins: for a
// flat series that starts to climb, that is the last flat sample.
func changePoint(s []signals.Sample, minPost, maxPost int) int {
	n := len(s)
	if n < minBefore+minPost {
		return 0
	}
	// Prefix sums over centred, scaled values keep the subtraction of
	// sums accurate for byte counts in the billions.
	var mx, my float64
	for _, p := range s {
		mx += p.T.Sub(s[0].T).Seconds()
		my += p.V
	}
	mx /= float64(n)
	my /= float64(n)
	var scale float64
	for _, p := range s {
		scale = max(scale, math.Abs(p.V-my))
	}
	if scale == 0 {
		return 0 // constant
	}
	pre := make([]lineSums, n+1)
	for i, p := range s {
		x, y := p.T.Sub(s[0].T).Seconds()-mx, (p.V-my)/scale
		pre[i+1] = pre[i].add(x, y)
	}
	all := pre[n]
	sse1 := all.sse()
	tol := 1e-9 * all.syy()
	if sse1 <= tol {
		return 0 // already one line
	}
	best, bestSSE := 0, math.Inf(1)
	for k := max(minBefore, n-maxPost); k <= n-minPost; k++ {
		e := pre[k].sse() + all.sub(pre[k]).sse()
		if e < bestSSE-tol {
			best, bestSSE = k, e
		}
	}
	if best == 0 || bestSSE >= sse1*math.Pow(float64(n), -bicPenalty/float64(n)) {
		return 0
	}
	return best
}

// lineSums are the sums a least-squares line needs.
type lineSums struct{ n, x, y, xx, xy, yy float64 }

func (a lineSums) add(x, y float64) lineSums {
	return lineSums{a.n + 1, a.x + x, a.y + y, a.xx + x*x, a.xy + x*y, a.yy + y*y}
}

func (a lineSums) sub(b lineSums) lineSums {
	return lineSums{a.n - b.n, a.x - b.x, a.y - b.y, a.xx - b.xx, a.xy - b.xy, a.yy - b.yy}
}

func (a lineSums) syy() float64 {
	if a.n < 1 {
		return 0
	}
	return max(a.yy-a.y*a.y/a.n, 0)
}

// sse is the squared error left by the best line through the points.
func (a lineSums) sse() float64 {
	if a.n < 3 {
		return 0
	}
	sxx := a.xx - a.x*a.x/a.n
	sxy := a.xy - a.x*a.y/a.n
	if sxx <= 0 {
		return a.syy()
	}
	return max(a.syy()-sxy*sxy/sxx, 0)
}

// slopeOf is the least-squares rate of s, per second.
func slopeOf(s []signals.Sample) float64 {
	if len(s) < 2 {
		return 0
	}
	var sx, sy float64
	for _, p := range s {
		sx += p.T.Sub(s[0].T).Seconds()
		sy += p.V
	}
	n := float64(len(s))
	mx, my := sx/n, sy/n
	var sxx, sxy float64
	for _, p := range s {
		dx := p.T.Sub(s[0].T).Seconds() - mx
		sxx += dx * dx
		sxy += dx * (p.V - my)
	}
	if sxx <= 0 {
		return 0
	}
	return sxy / sxx
}

// onLine reports whether every sample of ps stands on the least-squares
// line of s with slope rate, within the largest distance of any sample
// of s from it.
func onLine(s []signals.Sample, rate float64, ps []signals.Sample) bool {
	if len(s) == 0 || len(ps) == 0 {
		return false
	}
	var mt, mv float64
	for _, x := range s {
		mt += x.T.Sub(s[0].T).Seconds()
		mv += x.V
	}
	mt /= float64(len(s))
	mv /= float64(len(s))
	at := func(t time.Time) float64 { return mv + rate*(t.Sub(s[0].T).Seconds()-mt) }
	tol := 0.0
	for _, x := range s {
		tol = max(tol, math.Abs(x.V-at(x.T)))
	}
	for _, p := range ps {
		if math.Abs(p.V-at(p.T)) > tol {
			return false
		}
	}
	return true
}

// steadyShare is the share of steps of s that did not go down.
func steadyShare(s []signals.Sample) float64 {
	if len(s) < 2 {
		return 0
	}
	up := 0
	for i := 1; i < len(s); i++ {
		if s[i].V >= s[i-1].V {
			up++
		}
	}
	return float64(up) / float64(len(s)-1)
}

// cumulative turns a counter's samples into its increase since the first
// one, counting a drop as a reset (as Store.Increase does), so growthOf
// can find where a counter started to climb.
func cumulative(s []signals.Sample) []signals.Sample {
	out := make([]signals.Sample, len(s))
	var acc float64
	for i, p := range s {
		if i > 0 {
			if d := p.V - s[i-1].V; d >= 0 {
				acc += d
			} else {
				acc += p.V
			}
		}
		out[i] = signals.Sample{T: p.T, V: acc}
	}
	return out
}

// hysteresis keeps a rule from turning a finding on and off every tick
// while a value hovers at its threshold: a condition that held at the
// last evaluation stays on while a looser one (the value a little below
// the threshold) holds. Rules report what they see now, so this is the
// only state they keep; it lapses when the rule has not looked for
// hysteresisLapse (the target went away), and then the strict condition
// applies again.
type hysteresis struct {
	mu sync.Mutex
	on map[string]time.Time // condition -> when it last held
}

const (
	hysteresisLapse = 10 * time.Second
	// releaseBand: a condition entered at a share of a limit (near_ratio)
	// is left only below this fraction of that share.
	releaseBand = 0.95
)

// hold returns whether the named condition holds now: enter, or stay
// while it held at the previous evaluation.
func (h *hysteresis) hold(name string, now time.Time, enter, stay bool) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	last, was := h.on[name]
	was = was && !now.Before(last) && now.Sub(last) <= hysteresisLapse
	if !enter && !(was && stay) {
		delete(h.on, name)
		return false
	}
	if h.on == nil {
		h.on = map[string]time.Time{}
	}
	h.on[name] = now
	return true
}

func fmtBytes(b float64) string {
	switch {
	case math.Abs(b) >= 1<<30:
		return trimFloat(b/(1<<30)) + " GiB"
	case math.Abs(b) >= 1<<20:
		return trimFloat(b/(1<<20)) + " MiB"
	case math.Abs(b) >= 1<<10:
		return trimFloat(b/(1<<10)) + " KiB"
	}
	return trimFloat(b) + " B"
}

// trimFloat prints at most one decimal and no trailing zero: "10", "9.5",
// never "10.0".
func trimFloat(f float64) string {
	s := strconv.FormatFloat(f, 'f', 1, 64)
	s = strings.TrimSuffix(s, ".0")
	if s == "-0" {
		return "0"
	}
	return s
}

// lowest is the smallest value in s (which is not empty).
func lowest(s []signals.Sample) float64 {
	v := s[0].V
	for _, x := range s[1:] {
		v = min(v, x.V)
	}
	return v
}
