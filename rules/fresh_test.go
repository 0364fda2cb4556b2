package rules

import (
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

func TestFreshIsTheOnePlaceAgeIsJudged(t *testing.T) {
	st := signals.New(16, 16)
	t0 := time.Unix(1000, 0)
	st.Put(signals.ProcessFDsOpen, nil, 7, t0)
	for _, c := range []struct {
		at   time.Duration
		want bool
	}{{0, true}, {freshSlow, true}, {freshSlow + time.Millisecond, false}} {
		w := Window{Store: st, Now: t0.Add(c.at)}
		if got := w.Fresh(t0, freshSlow); got != c.want {
			t.Errorf("Fresh %v after the sample = %v, want %v", c.at, got, c.want)
		}
		s, ok := w.FreshLatest(signals.ProcessFDsOpen, nil, freshSlow)
		if ok != c.want || (ok && s.V != 7) {
			t.Errorf("FreshLatest %v after the sample = %v %v, want %v", c.at, s, ok, c.want)
		}
	}
	if _, ok := (Window{Store: st, Now: t0}).FreshLatest(signals.ProcessFDLimit, nil, freshSlow); ok {
		t.Error("FreshLatest of a series never written is ok")
	}
}
