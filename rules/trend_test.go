package rules

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// samples is f(i) at one sample per step, the last at now.
func samples(now time.Time, n int, step time.Duration, f func(i int) float64) []signals.Sample {
	out := make([]signals.Sample, n)
	for i := range out {
		out[i] = signals.Sample{T: now.Add(-time.Duration(n-1-i) * step), V: f(i)}
	}
	return out
}

// A quiet series that starts to climb: the rate is the climb's, not the
// window's average, and the onset is where it began.
func TestGrowthRampAfterFlat(t *testing.T) {
	now := time.Unix(10000, 0)
	// 60 s flat at 50, then +40/s for 15 s (the leaker's FD leak).
	s := samples(now, 76, time.Second, func(i int) float64 { return 50 + 40*math.Max(0, float64(i-60)) })
	g, ok := growthOf(s)
	if !ok {
		t.Fatal("no growth")
	}
	if math.Abs(g.rate-40) > 1e-6 || g.start != now.Add(-15*time.Second) || g.base.V != 50 || g.increase != 600 {
		t.Fatalf("rate %v start %v ago from %v, increase %v, want 40/s from 15 s ago at 50, +600", g.rate, now.Sub(g.start), g.base.V, g.increase)
	}
	if !g.current || !g.rising || g.sinceStart || g.steady != 1 || g.duration() != 15*time.Second {
		t.Fatalf("%+v", g)
	}
	if got := g.over(); got != "for 15 s (since "+g.start.Format("15:04:05")+")" {
		t.Errorf("over %q", got)
	}
	// What the old fit said: least squares over the whole window.
	tr, _ := trendOf(s)
	t.Logf("window fit %.1f/s, onset fit %.1f/s", tr.slope, g.rate)
	if tr.slope > 20 {
		t.Fatalf("the whole-window fit was expected to be far off: %v", tr.slope)
	}
	if eta, ok := g.until(20000); !ok || math.Abs(eta.Seconds()-(20000-650)/40.0) > 0.01 {
		t.Errorf("until %v %v", eta, ok)
	}
}

// The same with noise on both parts and irregular sampling: the rate is
// within 10%, the onset within a few samples.
func TestGrowthNoisyRamp(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	now := time.Unix(10000, 0)
	for trial := range 20 {
		var s []signals.Sample
		start := now.Add(-90 * time.Second)
		onset := start.Add(60 * time.Second)
		for tm := start; !tm.After(now); tm = tm.Add(time.Duration(800+rng.IntN(400)) * time.Millisecond) {
			v := 1000 + rng.NormFloat64()*8
			if tm.After(onset) {
				v += 25 * tm.Sub(onset).Seconds()
			}
			s = append(s, signals.Sample{T: tm, V: v})
		}
		g, ok := growthOf(s)
		if !ok || math.Abs(g.rate-25)/25 > 0.1 || g.start.Sub(onset).Abs() > 2*time.Second || !g.current {
			t.Fatalf("trial %d: rate %.2f start %s off, current %v", trial, g.rate, g.start.Sub(onset), g.current)
		}
	}
}

// A step (FDs opened at once, then flat near a limit) is no growth: the
// present regime is flat, nothing is forecast.
func TestGrowthStepThenFlat(t *testing.T) {
	now := time.Unix(10000, 0)
	s := samples(now, 60, time.Second, func(i int) float64 {
		if i < 15 {
			return 10
		}
		return 106
	})
	g, ok := growthOf(s)
	if !ok {
		t.Fatal("no growth")
	}
	// (increase counts the step: the series did go from 10 to 106.)
	if g.rate != 0 || g.current || g.rising {
		t.Fatalf("a step then 45 s flat reads as growth: %+v", g)
	}
	if _, ok := g.until(128); ok {
		t.Error("a forecast from a flat series")
	}
	tr, _ := trendOf(s)
	t.Logf("window fit %.2f/s (%.1f/min) where nothing grows", tr.slope, 60*tr.slope)
}

// A ramp that stopped: the growth is over; too recent a stop to be its
// own regime still makes the growth not current.
func TestGrowthStopped(t *testing.T) {
	now := time.Unix(10000, 0)
	s := samples(now, 60, time.Second, func(i int) float64 { return 10 + 5*math.Min(float64(i), 50) })
	g, _ := growthOf(s)
	if g.current || g.rising || g.rate > 0.5 {
		t.Fatalf("stopped 10 s ago: %+v", g)
	}
	s = samples(now, 60, time.Second, func(i int) float64 { return 10 + 5*math.Min(float64(i), 57) })
	g, _ = growthOf(s)
	if g.current {
		t.Fatalf("stopped 2 s ago, still current: %+v", g)
	}
}

// Flat series, with and without noise: no growth, no forecast.
func TestGrowthFlat(t *testing.T) {
	now := time.Unix(10000, 0)
	g, ok := growthOf(samples(now, 60, time.Second, func(int) float64 { return 300 }))
	if !ok || g.rate != 0 || g.current || g.increase != 0 || !g.sinceStart {
		t.Fatalf("constant: %+v", g)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for trial := range 50 {
		s := samples(now, 60, time.Second, func(int) float64 { return 300 + float64(rng.IntN(7)) })
		g, _ := growthOf(s)
		// Whatever regime noise is cut into, it does not grow steadily
		// by more than the noise.
		if g.current && g.steady >= 0.8 && g.increase >= 20 {
			t.Fatalf("trial %d: noise read as growth %+v", trial, g)
		}
	}
}

// A steady leak across the whole window: no change point, the rate is
// the line's.
func TestGrowthSteadyThroughout(t *testing.T) {
	now := time.Unix(10000, 0)
	g, _ := growthOf(samples(now, 30, 10*time.Second, func(i int) float64 { return 1e9 + 4e6*float64(i) }))
	if !g.sinceStart || math.Abs(g.rate-4e5) > 1e-3 || !g.current || g.over() != "for at least 4m50s" {
		t.Fatalf("%+v %q", g, g.over())
	}
}

// A leak that sped up: the rate is the present one.
func TestGrowthSpedUp(t *testing.T) {
	now := time.Unix(10000, 0)
	g, _ := growthOf(samples(now, 60, time.Second, func(i int) float64 {
		if i < 30 {
			return float64(i)
		}
		return 30 + 10*float64(i-30)
	}))
	if math.Abs(g.rate-10) > 1e-6 || g.sinceStart {
		t.Fatalf("%+v", g)
	}
}

func TestGrowthShortAndCounter(t *testing.T) {
	if _, ok := growthOf(samples(time.Unix(0, 0), 3, time.Second, func(i int) float64 { return float64(i) })); ok {
		t.Error("3 samples gave a growth")
	}
	// A counter that resets keeps counting from the new value.
	c := cumulative([]signals.Sample{{V: 5}, {V: 7}, {V: 2}, {V: 4}})
	if c[0].V != 0 || c[1].V != 2 || c[2].V != 4 || c[3].V != 6 {
		t.Errorf("cumulative %+v", c)
	}
}

// A condition entered at a threshold stays on while the value sits just
// under it, and lapses when the rule stopped looking.
func TestHysteresis(t *testing.T) {
	var h hysteresis
	now := time.Unix(100, 0)
	if h.hold("near", now, false, true) {
		t.Fatal("stay alone turned it on")
	}
	if !h.hold("near", now, true, true) || !h.hold("near", now.Add(time.Second), false, true) {
		t.Fatal("did not stay on")
	}
	if h.hold("near", now.Add(2*time.Second), false, false) {
		t.Fatal("did not turn off")
	}
	h.hold("near", now, true, true)
	if h.hold("near", now.Add(time.Minute), false, true) {
		t.Fatal("did not lapse")
	}
	if fmtBytes(10.04*(1<<20)) != "10 MiB" || fmtBytes(9.5*(1<<20)) != "9.5 MiB" || fmtBytes(512) != "512 B" {
		t.Errorf("fmtBytes %q %q", fmtBytes(10.04*(1<<20)), fmtBytes(9.5*(1<<20)))
	}
}

// Noise around one line is not cut into regimes: a false change point
// would report a rate over a needlessly short time.
func TestChangePointIgnoresNoise(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	now := time.Unix(10000, 0)
	for _, n := range []int{30, 60, 600} {
		splits := 0
		for range 200 {
			s := samples(now, n, time.Second, func(i int) float64 { return 5*float64(i) + rng.NormFloat64()*8 })
			if changePoint(s, minSegment, n) != 0 {
				splits++
			}
		}
		if splits > 2 {
			t.Errorf("%d samples: %d of 200 noisy lines cut", n, splits)
		}
	}
}

// A leak that begins between two samples: the rate is the leak's, not
// blended with the quiet part of the interval, and the start is where it
// began, not the last quiet sample.
func TestGrowthBeginsBetweenSamples(t *testing.T) {
	now := time.Unix(10000, 0)
	// Sampled every 2 s; the leak begins 1.5 s after sample 20.
	s := samples(now, 26, 2*time.Second, func(i int) float64 { return 100 + 8*math.Max(0, float64(2*i)-41.5) })
	g, _ := growthOf(s)
	if math.Abs(g.rate-8) > 1e-9 || g.start.Sub(s[20].T) != 1500*time.Millisecond || g.base != s[20] {
		t.Fatalf("rate %v start %s after sample 20, base %v", g.rate, g.start.Sub(s[20].T), g.base)
	}
	if g.duration() != 8500*time.Millisecond || g.increase != 68 {
		t.Fatalf("duration %s increase %v", g.duration(), g.increase)
	}
}

// A change in the last two or three samples cannot be fitted yet, but it
// is seen: the old regime's rate is not the present one, and nothing is
// forecast from it (the cgroup usage of a process that just retained
// 200 MiB read "1.5 GiB/min for at least 6 s").
func TestGrowthTooYoungToMeasure(t *testing.T) {
	now := time.Unix(10000, 0)
	s := samples(now, 9, time.Second, func(i int) float64 {
		if i < 7 {
			return 20 + float64(i%2)
		}
		return 20 + 100*float64(i-6)
	})
	g, _ := growthOf(s)
	if g.current || !g.young || !g.rising {
		t.Fatalf("%+v", g)
	}
	// Noise at the end is not taken for a young regime.
	rng := rand.New(rand.NewPCG(5, 6))
	young := 0
	for range 200 {
		g, _ := growthOf(samples(now, 60, time.Second, func(i int) float64 { return 5*float64(i) + rng.NormFloat64()*8 }))
		if g.young {
			young++
		}
	}
	if young > 4 {
		t.Errorf("%d of 200 noisy lines read as a young change", young)
	}
}

// A window that keeps only one or two quiet samples before the leak: the
// rate is still the leak's.
func TestGrowthOnsetAtTheWindowStart(t *testing.T) {
	now := time.Unix(10000, 0)
	for quiet := 1; quiet <= 3; quiet++ {
		s := samples(now, 10, time.Second, func(i int) float64 { return 100 + 8*math.Max(0, float64(i-quiet+1)) })
		g, _ := growthOf(s)
		if math.Abs(g.rate-8) > 1e-9 || g.increase != 8*float64(10-quiet) {
			t.Errorf("%d quiet samples: rate %v increase %v", quiet, g.rate, g.increase)
		}
	}
}
