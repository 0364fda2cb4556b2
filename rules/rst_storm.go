package rules

import (
	"fmt"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// Causes of rst_storm: which path the resets come from.
const (
	CauseRSTAcceptOverflow = "rst_on_accept_overflow"
	CauseRSTAppAbort       = "rst_app_abort"
	CauseRSTClosedPort     = "rst_closed_port"
)

// RSTStormOptions ([rules.rst_storm] in agent.conf).
type RSTStormOptions struct {
	Recent  time.Duration `toml:"recent" range:"[1s,1h]"`       // the rate is measured over this
	MinRate float64       `toml:"min_rate" range:"(0,1000000]"` // resets sent per second at or above this is a storm
	// MinShare: and at least this share of the connections on the
	// target's ports end in a reset (resets / (resets + accepts), or
	// handshakes while accepts are not counted), so a busy healthy
	// service's ordinary resets are not a storm.
	MinShare float64 `toml:"min_share" range:"(0,1]"`
}

// DefaultRSTStormOptions are the defaults agent.conf documents.
func DefaultRSTStormOptions() RSTStormOptions {
	return RSTStormOptions{Recent: 5 * time.Second, MinRate: 50, MinShare: 0.1}
}

// RSTStorm names why the target sends resets in bulk (seed 000
// "Platform": clients see "connection reset by peer"). The path decides
// the fix, and the kernel tells the paths apart (eBPF tcp_send_reset's
// reason, and counters):
//   - the accept queue overflows with tcp_abort_on_overflow=1: each
//     overflow is answered with a RST instead of a dropped SYN;
//   - the application aborts connections: it closed with unread data
//     (TCPAbortOnClose), or data arrived after it closed (TCPAbortOnData),
//     or it set SO_LINGER 0;
//   - otherwise segments arrive for no socket: clients connecting to a
//     port the target does not listen on right now (a restart), or sending
//     on connections it already forgot.
//
// The namespace is shared with other containers, so only resets on the
// target's ports count (its listening ports now, or in the last
// listenMemory: a restart closes them): the tcplife probe counts resets by
// local port. Without it the namespace's counters cannot say whose resets
// they are, and the rule stays silent unless told to watch the whole
// namespace.
type RSTStorm struct {
	o        RSTStormOptions
	listened map[string]time.Time // the target's listening ports, when last seen
}

// listenMemory is how long a port the target listened on stays its own.
const listenMemory = 10 * time.Minute

func NewRSTStorm(o RSTStormOptions) *RSTStorm {
	return &RSTStorm{o: o, listened: map[string]time.Time{}}
}

func (*RSTStorm) Name() string { return "rst_storm" }

func (*RSTStorm) Needs() []Need {
	return []Need{
		{Component: signals.ProbeTCPLife, What: "the resets sent on the target's ports and the kernel's reason for each (only scope namespace still runs, on the namespace's counters)"},
		{Component: signals.CollectorSockets, What: "which ports are the target's (only scope namespace still runs)"},
		{Component: signals.CollectorNetstat, What: "accept overflows and application aborts, which tell those resets from resets on closed ports"},
		{Component: signals.ProbeSockCalls, What: "the share of accepted connections that end in a reset"},
		{Component: signals.ProbeTCPListen, What: "the handshakes on the target's ports, for that share while its accepts are not counted"},
		{Component: signals.CollectorSysctl, What: "whether tcp_abort_on_overflow turns accept overflows into resets"},
	}
}

func (r *RSTStorm) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Recent)
	secs := r.o.Recent.Seconds()
	for _, ls := range w.Store.Select(signals.TCPSockets) {
		if ls.Get("owner") == ownerTarget && ls.Get("state") == "LISTEN" {
			if s, ok := w.Store.Latest(signals.TCPSockets, ls); ok && s.V > 0 && w.Fresh(s.T, freshSockets) {
				r.listened[ls.Get("port")] = w.Now
			}
		}
	}
	for p, t := range r.listened {
		if w.Now.Sub(t) > listenMemory {
			delete(r.listened, p)
		}
	}
	namespace := w.Scope == ScopeNamespace
	probe := w.Store.Running(signals.ProbeTCPLife)
	byReason := map[string]float64{}
	total := 0.0
	if probe {
		for _, ls := range w.Store.Select(signals.TCPResetsSentTotal) {
			if _, mine := r.listened[ls.Get("port")]; !mine && !namespace {
				continue
			}
			v, _ := rateIn(w.Store, signals.TCPResetsSentTotal, ls, from, w.Now)
			byReason[ls.Get("reason")] += v
			total += v
		}
	} else {
		if !namespace {
			return nil // the namespace's counters alone cannot say whose resets they are
		}
		last, ok := w.Store.Latest(signals.TCPOutRstsTotal, nil)
		if !ok || !w.Fresh(last.T, freshSlow) {
			return nil
		}
		total = w.Store.Increase(signals.TCPOutRstsTotal, nil, from) / secs
	}
	if total < r.o.MinRate {
		return nil
	}
	// Resets against the connections the target accepted on the same
	// ports: a busy healthy service resets a few percent of them. The
	// sockcalls probe counts accepts only while a queue fills up:
	// when it did not count them all through the window, the handshakes
	// completed on those ports stand in (tcplisten; each is a connection
	// made, accepted or not). A count over part of the window would make
	// a healthy service's few resets look like all its connections.
	conns, acceptsKnown, what := 0.0, false, signals.ProcessAcceptsTotal
	if _, said := w.Store.Latest(signals.ProcessAcceptsCountedSince, nil); said {
		if af, on := acceptsCountedSince(w.Store, nil, w.Now); !on || af.After(from) {
			what = signals.TCPListenHandshakesTotal
		}
	}
	for _, ls := range w.Store.Select(what) {
		acceptsKnown = true
		if _, mine := r.listened[ls.Get("port")]; mine || namespace {
			v, _ := rateIn(w.Store, what, ls, from, w.Now)
			conns += v
		}
	}
	share := total / (total + conns)
	if acceptsKnown && share < r.o.MinShare {
		return nil
	}
	overflows := w.Store.Increase(signals.TCPExtListenOverflowsTotal, nil, from) / secs
	onClose := w.Store.Increase(signals.TCPExtAbortOnCloseTotal, nil, from) / secs
	onData := w.Store.Increase(signals.TCPExtAbortOnDataTotal, nil, from) / secs
	aborts := onClose + onData
	abortOnOverflow, _ := w.Store.Latest(signals.Sysctl, signals.L("name", "net.ipv4.tcp_abort_on_overflow"))

	whose := "on the target's ports"
	if namespace {
		whose = "by the namespace"
	}
	ev := []Evidence{}
	top, topRate, reasons := "", 0.0, ""
	for reason, v := range byReason {
		if v > topRate || (v == topRate && reason < top) {
			top, topRate = reason, v
		}
	}
	if probe {
		ev = append(ev, Evidence{Signal: signals.TCPResetsSentTotal.Name, Value: total, Threshold: r.o.MinRate, Unit: "/s", Window: r.o.Recent, Note: "resets sent " + whose + " (eBPF tcp_send_reset)"})
	} else {
		ev = append(ev, Evidence{Signal: signals.TCPOutRstsTotal.Name, Value: total, Threshold: r.o.MinRate, Unit: "/s", Window: r.o.Recent, Note: "resets sent by the namespace"})
	}
	if acceptsKnown {
		made := "accepts"
		if what == signals.TCPListenHandshakesTotal {
			made = "handshakes"
		}
		ev = append(ev, Evidence{Signal: "resets / (resets + " + made + ")", Value: share, Threshold: r.o.MinShare, Unit: "ratio", Window: r.o.Recent, Note: "share of the connections on the target's ports that end in a reset"})
	}
	if top != "" {
		reasons = fmt.Sprintf(" The kernel's reason for most of them (%s): %s.", rate(topRate), top)
		ev = append(ev, Evidence{Signal: fmt.Sprintf("tcp_resets_sent_total{reason=%q}", top), Value: topRate, Unit: "/s", Window: r.o.Recent, Note: "the most frequent reset reason (eBPF)"})
		if strings.HasPrefix(top, "tcp_abort_on_") && aborts < total/4 {
			aborts = topRate
		}
	}
	o := Observation{Severity: SeverityWarning, Confidence: 0.7}
	switch {
	case abortOnOverflow.V == 1 && overflows >= total/4:
		o.Key, o.Cause = "accept_overflow", CauseRSTAcceptOverflow
		o.RootCause = fmt.Sprintf("accept queues overflow (%s) and net.ipv4.tcp_abort_on_overflow=1 answers each overflow with a reset instead of letting the client retry", rate(overflows))
		o.Remediation = "Fix the overflow itself (see the accept_overflow finding), and set net.ipv4.tcp_abort_on_overflow=0 so clients retry their SYN instead of failing at once."
		ev = append(ev, Evidence{Signal: signals.TCPExtListenOverflowsTotal.Name, Value: overflows, Unit: "/s", Window: r.o.Recent})
		o.Confidence = 0.85
	case aborts >= total/4:
		o.Key, o.Cause = "app_abort", CauseRSTAppAbort
		o.RootCause = fmt.Sprintf("the application aborts connections: %s closed with unread data (TCPAbortOnClose), %s received data after closing (TCPAbortOnData)", rate(onClose), rate(onData))
		o.Remediation = "Read requests fully before closing (or shut down writes and drain), and do not set SO_LINGER to 0. In proxies, keep the keep-alive timeouts of both sides consistent so one side does not close while the other sends."
		ev = append(ev, Evidence{Signal: "tcp_ext_abort_on_close_total + tcp_ext_abort_on_data_total", Value: aborts, Unit: "/s", Window: r.o.Recent})
		o.Confidence = 0.8
	default:
		o.Key, o.Cause = "closed_port", CauseRSTClosedPort
		o.RootCause = fmt.Sprintf("the resets answer segments that reach no socket (no overflow with abort, %s application aborts): clients connect to a port nothing listens on right now, or send on connections this side already forgot", rate(aborts))
		o.Remediation = "Find the clients: connections during a restart (use a readiness probe and drain before stopping), a wrong port in a health check or client config, or a peer that keeps sending on a connection that timed out here (align idle timeouts)."
	}
	if top == "no_socket" && o.Cause == CauseRSTClosedPort {
		o.Confidence = 0.9
	}
	o.RootCause += "." + reasons
	o.Title = fmt.Sprintf("RST storm: resets sent %s at %s", whose, rate(total))
	o.Symptom = fmt.Sprintf("resets were sent %s at %s over the last %s; clients see \"connection reset by peer\" or \"connection refused\"", whose, rate(total), duration(r.o.Recent))
	o.Evidence = ev
	o.Labels = map[string]string{"path": o.Key}
	return []Observation{o}
}
