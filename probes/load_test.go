package probes

import (
	"testing"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// A counter whose key first shows up after the first poll (the first
// connect errors toward a remote) starts at 0 at the poll before: an
// increase over a window that holds both polls counts all of its value.
// Keys of the first poll are the baseline; gauges get no 0.
func TestSeriesSetCounterBornAtZero(t *testing.T) {
	st := signals.New(64, 64)
	errs := newSeriesSet[string](st, signals.ProcessConnectErrorsTotal)
	gauge := newSeriesSet[string](st, signals.ProcessUnreadOldestSeconds)
	t0 := time.Now()
	l := func(remote string) func() signals.Labels {
		return func() signals.Labels { return signals.L("errno", "EADDRNOTAVAIL", "remote", remote) }
	}
	errs.put("a", l("10.0.0.1:80"), 7, t0)
	errs.put("a", l("10.0.0.1:80"), 7, t0.Add(100*time.Millisecond))
	errs.touch(t0.Add(150 * time.Millisecond)) // no read: the map did not move
	errs.put("b", l("10.0.0.2:80"), 500, t0.Add(200*time.Millisecond))
	if ss := st.Range(signals.ProcessConnectErrorsTotal, l("10.0.0.2:80")(), t0); len(ss) != 2 || !ss[0].T.Equal(t0.Add(100*time.Millisecond)) || ss[0].V != 0 {
		t.Errorf("the new counter's samples %v, want 0 at the last read (+100ms), then 500", ss)
	}
	gauge.touch(t0.Add(100 * time.Millisecond))
	gauge.put("g", func() signals.Labels { return nil }, 3, t0.Add(200*time.Millisecond))

	if got := st.Increase(signals.ProcessConnectErrorsTotal, l("10.0.0.2:80")(), t0); got != 500 {
		t.Errorf("increase of the counter born at the third poll: %v, want 500", got)
	}
	if got := st.Increase(signals.ProcessConnectErrorsTotal, l("10.0.0.1:80")(), t0); got != 0 {
		t.Errorf("increase of the first poll's counter: %v, want 0 (its first value is the baseline)", got)
	}
	if s, ok := st.Latest(signals.ProcessUnreadOldestSeconds, nil); !ok || s.V != 3 {
		t.Errorf("gauge latest %v %v, want 3", s, ok)
	}
	if n := len(st.Range(signals.ProcessUnreadOldestSeconds, nil, t0)); n != 1 {
		t.Errorf("gauge has %d samples, want 1 (no 0 before a gauge)", n)
	}
}
