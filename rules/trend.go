package rules

import (
	"math"
	"strconv"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// trend summarises a gauge over a window: how much it grew, how steadily,
// and at what rate. Leak rules need "steadily" as much as "grew": a busy
// service's FDs or heap go up and down; a leak's only go up.
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
	up := 0
	for i := 1; i < len(s); i++ {
		if s[i].V >= s[i-1].V {
			up++
		}
	}
	t.steady = float64(up) / float64(len(s)-1)
	// Least squares on (seconds since first, value).
	var sx, sy, sxx, sxy float64
	for _, x := range s {
		dx := x.T.Sub(t.first.T).Seconds()
		sx += dx
		sy += x.V
		sxx += dx * dx
		sxy += dx * x.V
	}
	n := float64(len(s))
	if den := n*sxx - sx*sx; den > 0 {
		t.slope = (n*sxy - sx*sy) / den
	}
	return t, true
}

// span is the time the samples cover.
func (t trend) span() time.Duration { return t.last.T.Sub(t.first.T) }

// until returns how long until the value reaches limit at the current
// slope, or false when it is not growing.
func (t trend) until(limit float64) (time.Duration, bool) {
	if t.slope <= 0 || limit <= t.last.V {
		return 0, t.slope > 0 && limit <= t.last.V
	}
	secs := (limit - t.last.V) / t.slope
	if secs > math.MaxInt64/float64(time.Second) {
		return 0, false
	}
	return time.Duration(secs * float64(time.Second)), true
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

func trimFloat(f float64) string {
	if f == math.Trunc(f) {
		return strconv.FormatInt(int64(f), 10)
	}
	return strconv.FormatFloat(f, 'f', 1, 64)
}
