package rules

import (
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Whether a sample still stands for "now" is decided here, once. A rule
// that took an older sample for the present would describe the past in
// the present tense: the collector stopped, the target went away, the
// listener closed. Each writer keeps its series fresh at least this often
// while what it measures exists: the shared clock idles to a second, and
// writers rewrite their last value when nothing moved.
const (
	// freshFast: the fast path (the accept-queue sampler and the probes'
	// map polls, 100-200 ms apart while anything moves).
	freshFast = 2 * time.Second
	// freshSlow: a collector run every collect.interval (1 s by default):
	// three of its periods, so one late run is not taken for an ended
	// source.
	freshSlow = 3 * time.Second
	// freshSockets: the sockets collector's series (tcp_sockets and the
	// others of its dumps), which it writes less often while connections
	// churn in a namespace where a dump is dear (signals.SocketsFreshFor).
	freshSockets = signals.SocketsFreshFor
)

// Fresh reports whether a sample taken at t still stands for now: it is no
// older than maxAge at w.Now (freshFast, freshSlow, or a rule's own, such
// as three heap-profile intervals).
func (w Window) Fresh(t time.Time, maxAge time.Duration) bool {
	return w.Now.Sub(t) <= maxAge
}

// FreshLatest is the newest sample of d{ls} when it is Fresh.
func (w Window) FreshLatest(d *signals.Desc, ls signals.Labels, maxAge time.Duration) (signals.Sample, bool) {
	s, ok := w.Store.Latest(d, ls)
	if !ok || !w.Fresh(s.T, maxAge) {
		return signals.Sample{}, false
	}
	return s, true
}
