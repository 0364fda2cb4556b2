package rules

import (
	"fmt"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of syn_backlog.
const (
	CauseSYNFlood = "syn_flood"
	CauseSYNBurst = "syn_burst"
)

// SYNBacklogOptions ([rules.syn_backlog] in agent.conf).
type SYNBacklogOptions struct {
	Recent     time.Duration `toml:"recent" range:"[1s,1h]"`          // overflows are counted over this
	MinDrops   float64       `toml:"min_drops" range:"[1,1000000]"`   // SYNs dropped or answered with a cookie before the rule speaks
	MinSources float64       `toml:"min_sources" range:"[2,1000000]"` // this many distinct half-open sources (or half of them, if fewer) is a flood
}

// DefaultSYNBacklogOptions are the defaults agent.conf documents.
func DefaultSYNBacklogOptions() SYNBacklogOptions {
	return SYNBacklogOptions{Recent: 5 * time.Second, MinDrops: 10, MinSources: 20}
}

// SYNBacklog names a full SYN queue (seed 000 Problem B's first half):
// the kernel drops SYNs (TCPReqQFullDrop) or, with tcp_syncookies, answers
// them statelessly (TCPReqQFullDoCookies). A legitimate burst of clients
// needs a longer queue; a flood (many sources, handshakes that never
// complete) needs syncookies kept on and filtering upstream, and a longer
// queue would only give the attacker more memory.
type SYNBacklog struct{ o SYNBacklogOptions }

func NewSYNBacklog(o SYNBacklogOptions) *SYNBacklog { return &SYNBacklog{o: o} }

func (*SYNBacklog) Name() string { return "syn_backlog" }

func (*SYNBacklog) Needs() []Need {
	return []Need{
		{Component: signals.CollectorNetstat, What: "the namespace's SYN queue overflows and completed handshakes", Essential: true},
		{Component: signals.CollectorAcceptQueue, What: "half-open connections per listener and their sources", Essential: true},
		{Component: signals.CollectorSysctl, What: "tcp_max_syn_backlog and tcp_syncookies in the remedy"},
	}
}

func (r *SYNBacklog) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Recent)
	drops := w.Store.Increase(signals.TCPExtReqQFullDropTotal, nil, from)
	cookies := w.Store.Increase(signals.TCPExtReqQFullDoCookiesTotal, nil, from)
	if drops+cookies < r.o.MinDrops {
		return nil
	}
	// The namespace counts overflows; the listener with the most
	// half-open connections is the one whose queue is full.
	// Half-open connections are dumped once a second: judge on a dump
	// taken after the overflow began, not on one from before it.
	began := firstIncrease(w.Store, from, signals.TCPExtReqQFullDropTotal, signals.TCPExtReqQFullDoCookiesTotal)
	var (
		best    signals.Labels
		synRecv float64
	)
	for _, ls := range w.Store.Select(signals.ListenSynRecv) {
		s, ok := w.Store.Latest(signals.ListenSynRecv, ls)
		if ok && s.T.After(began) && w.Fresh(s.T, freshSlow) && s.V > synRecv {
			best, synRecv = ls, s.V
		}
	}
	if best == nil {
		return nil
	}
	endpoint := joinHostPort(best.Get("addr"), best.Get("port"))
	sources, _ := w.Store.Latest(signals.ListenSynRecvSources, best)
	completed := w.Store.Increase(signals.TCPPassiveOpensTotal, nil, from)
	maxSyn, _ := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_max_syn_backlog"))
	cookiesOn, _ := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_syncookies"))
	backlog, _ := w.Store.Latest(signals.ListenBacklog, best)
	rate := (drops + cookies) / r.o.Recent.Seconds()
	ev := []Evidence{
		{Signal: signals.TCPExtReqQFullDropTotal.Name, Value: drops, Unit: "SYNs", Window: r.o.Recent, Note: "dropped: SYN queue full, no syncookies"},
		{Signal: signals.TCPExtReqQFullDoCookiesTotal.Name, Value: cookies, Unit: "SYNs", Window: r.o.Recent, Note: "answered with a syncookie: SYN queue full"},
		{Signal: signals.ListenSynRecv.Name + best.String(), Value: synRecv, Unit: "connections", Note: "half-open now"},
		{Signal: signals.ListenSynRecvSources.Name + best.String(), Value: sources.V, Threshold: r.o.MinSources, Unit: "addresses"},
		{Signal: signals.TCPPassiveOpensTotal.Name, Value: completed, Unit: "connections", Window: r.o.Recent, Note: "handshakes completed"},
	}
	o := Observation{
		Key:      endpoint,
		Symptom:  fmt.Sprintf("the SYN queue of %s is full: %.0f SYNs/s dropped or answered with cookies over %s, %.0f half-open connections from %.0f addresses", endpoint, rate, r.o.Recent, synRecv, sources.V),
		Evidence: ev,
		Labels:   map[string]string{"port": best.Get("port"), "addr": best.Get("addr")},
	}
	// A small queue holds fewer half-open connections than MinSources: then
	// most of them coming from distinct addresses is enough.
	if sources.V >= min(r.o.MinSources, synRecv/2) && sources.V > 1 && completed < synRecv {
		o.Cause, o.Severity, o.Confidence = CauseSYNFlood, SeverityCritical, 0.8
		o.Title = fmt.Sprintf("SYN flood on %s: %.0f half-open connections from %.0f addresses", endpoint, synRecv, sources.V)
		o.RootCause = fmt.Sprintf("many distinct sources send SYNs whose handshakes never complete (%.0f completed in %s against %.0f half-open): a SYN flood, not clients", completed, r.o.Recent, synRecv)
		cookiesAdvice := "Keep net.ipv4.tcp_syncookies=1 so real clients still connect"
		if cookiesOn.V == 0 {
			cookiesAdvice = "Turn syncookies on (net.ipv4.tcp_syncookies=1): they are off here, so real clients' SYNs are dropped with the flood's"
		}
		o.Remediation = cookiesAdvice + ". Filter or rate-limit SYNs upstream (cloud DDoS protection, the load balancer). Do not raise the backlog: it only gives the flood more memory."
		return []Observation{o}
	}
	// A burst on a listener whose accept queue overflows too is one fault:
	// both queues are bounded by the same listen backlog, and the
	// accept_overflow finding names it with the same remedy. The SYN
	// counters can show the burst half a second before the accept queue's
	// drops are attributed (seen: syn_burst opened 0.5 s ahead of
	// accept_overflow for one burst), so a burst is judged only once the
	// accept side has been sampled after it began.
	if w.Now.Sub(began) < synBurstSettle || acceptQueueOverflowed(w, best.Get("port"), w.Now.Add(-2*r.o.Recent)) {
		return nil
	}
	o.Cause, o.Severity, o.Confidence = CauseSYNBurst, SeverityWarning, 0.7
	o.Title = fmt.Sprintf("SYN queue of %s overflowing under a burst of clients", endpoint)
	o.RootCause = fmt.Sprintf("clients complete their handshakes (%.0f in %s) but arrive faster than the SYN queue holds: the queue is bounded by the listen backlog (%.0f) and net.ipv4.tcp_max_syn_backlog (%.0f)", completed, r.o.Recent, backlog.V, maxSyn.V)
	o.Remediation = fmt.Sprintf("Raise the listen backlog and net.core.somaxconn, and net.ipv4.tcp_max_syn_backlog (now %.0f), above the burst; keep tcp_syncookies=1 as the safety net.", maxSyn.V)
	return []Observation{o}
}

// synBurstSettle is how long a SYN-queue burst waits for the accept
// queue's verdict: a few of its 100 ms samples and one netstat read.
const synBurstSettle = 1500 * time.Millisecond

// acceptQueueOverflowed reports whether a listener on port had its accept
// queue full, or dropped connections on it, since from.
func acceptQueueOverflowed(w Window, port string, from time.Time) bool {
	for _, ls := range w.Store.Select(signals.ListenBacklog) {
		if ls.Get("port") != port {
			continue
		}
		if w.Store.Increase(signals.ListenOverflowsTotal, ls, from) > 0 || fraction(w.Store.Range(signals.ListenQueueFull, ls, from)) > 0 {
			return true
		}
	}
	return false
}

// firstIncrease is the time of the first sample, since from, at which any
// of the counters had grown since the sample before.
func firstIncrease(st *signals.Store, from time.Time, ds ...*signals.Desc) time.Time {
	first := time.Time{}
	for _, d := range ds {
		if t, ok := riseIn(st.Range(d, nil, from)); ok && (first.IsZero() || t.Before(first)) {
			first = t
		}
	}
	return first
}

// riseIn is the time of the first sample of a counter above the one
// before it.
func riseIn(ss []signals.Sample) (time.Time, bool) {
	if i := firstRiseAt(ss); i > 0 {
		return ss[i].T, true
	}
	return time.Time{}, false
}

// firstRiseAt is the index of the first sample at which a counter rose, 0
// when it never did.
func firstRiseAt(ss []signals.Sample) int {
	for i := 1; i < len(ss); i++ {
		if ss[i].V > ss[i-1].V {
			return i
		}
	}
	return 0
}
