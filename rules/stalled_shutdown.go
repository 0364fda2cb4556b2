package rules

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseStalledShutdown is stalled_shutdown's root cause.
const CauseStalledShutdown = "connections_outlive_sigterm"

// StalledShutdownOptions ([rules.stalled_shutdown] in agent.conf).
type StalledShutdownOptions struct {
	Grace    time.Duration `toml:"grace" range:"[1s,24h]"` // the pod's terminationGracePeriodSeconds
	Fraction float64       `toml:"fraction" range:"(0,1]"` // still up with connections after this share of it: stalled
}

// DefaultStalledShutdownOptions are the defaults agent.conf documents.
func DefaultStalledShutdownOptions() StalledShutdownOptions {
	return StalledShutdownOptions{Grace: 30 * time.Second, Fraction: 0.5}
}

// StalledShutdown names a graceful shutdown that will not finish (seed
// 000 Problem D): the target got SIGTERM, and after a good part of the
// grace period it still holds connections open (long-lived streams,
// WebSockets, keep-alive clients never told to go), so the kubelet's
// SIGKILL will cut them mid-request.
type StalledShutdown struct{ o StalledShutdownOptions }

func NewStalledShutdown(o StalledShutdownOptions) *StalledShutdown {
	return &StalledShutdown{o: o}
}

func (*StalledShutdown) Name() string { return "stalled_shutdown" }

func (*StalledShutdown) Needs() []Need {
	return []Need{
		{Component: signals.ProbeProcSignals, What: "when SIGTERM reached the target", Essential: true},
		{Component: signals.CollectorSockets, What: "the target's established connections", Essential: true},
	}
}

func (r *StalledShutdown) Evaluate(w Window) []Observation {
	if !w.HasTarget {
		return nil
	}
	var sigAt time.Time
	sender := ""
	for _, ls := range w.Store.Select(signals.ProcessLastSignalTimestampSeconds) {
		if ls.Get("signal") != "SIGTERM" {
			continue
		}
		s, ok := w.Store.Latest(signals.ProcessLastSignalTimestampSeconds, ls)
		// A fresh sample: the probe still sees the target alive.
		if !ok || w.Now.Sub(s.T) > 3*time.Second {
			continue
		}
		if at := time.Unix(0, int64(s.V*1e9)); at.After(sigAt) {
			sigAt, sender = at, ls.Get("sender")
		}
	}
	if sigAt.IsZero() {
		return nil
	}
	elapsed := w.Now.Sub(sigAt)
	if elapsed < time.Duration(r.o.Fraction*float64(r.o.Grace)) || elapsed > 10*r.o.Grace {
		return nil
	}
	// Who is still connected: the target's own ends of its connections
	// only. Its clients' ends, when they live in the same namespace (a
	// sidecar, a test client), are other processes' sockets. The counts
	// are the last dump's, taken after SIGTERM, and told as of then: the
	// sockets collector spaces its dumps up to freshSockets apart while
	// connections churn in a namespace where one is dear, and connections
	// may have ended since.
	total := 0.0
	var who []string
	var at time.Time // of the newest dump counted
	counted := func(s signals.Sample, ok bool) bool {
		if !ok || !w.Fresh(s.T, freshSockets) || !s.T.After(sigAt) || s.V <= 0 {
			return false
		}
		if s.T.After(at) {
			at = s.T
		}
		return true
	}
	for _, ls := range w.Store.Select(signals.TCPSockets) {
		if ls.Get("state") != "ESTABLISHED" || ls.Get("owner") != ownerTarget {
			continue
		}
		if s, ok := w.Store.Latest(signals.TCPSockets, ls); counted(s, ok) {
			total += s.V
			if p := ls.Get("port"); p != "ephemeral" {
				who = append(who, fmt.Sprintf("%s on port %s", num(s.V), p))
			}
		}
	}
	for _, ls := range w.Store.Select(signals.TCPSocketsByRemote) {
		if ls.Get("state") != "ESTABLISHED" || ls.Get("owner") != ownerTarget {
			continue
		}
		if s, ok := w.Store.Latest(signals.TCPSocketsByRemote, ls); counted(s, ok) {
			who = append(who, fmt.Sprintf("%s to %s", num(s.V), ls.Get("remote")))
		}
	}
	if total == 0 {
		return nil
	}
	// When the count was taken, after SIGTERM: what the title says.
	counts := at.Sub(sigAt)
	sort.Strings(who)
	left := r.o.Grace - elapsed
	sev, when := SeverityWarning, fmt.Sprintf("SIGKILL comes in about %s", fmtDur(left.Round(time.Second)))
	if left <= r.o.Grace/5 {
		sev = SeverityCritical
	}
	if left <= 0 {
		when = "the grace period is over: SIGKILL is due now"
	}
	return []Observation{{
		Key:   "shutdown",
		Cause: CauseStalledShutdown,
		Title: fmt.Sprintf("Graceful shutdown stalled: %s still open %s after SIGTERM", count(total, "connection", ""), duration(counts)),
		Symptom: fmt.Sprintf("the target received SIGTERM (from pid %s) %s ago, and %s after it still held %s (%s); %s",
			sender, duration(elapsed), duration(counts), count(total, "established connection", ""), strings.Join(who, ", "), when),
		RootCause:   "the shutdown waits for connections that do not end by themselves: long-lived streams (gRPC, SSE, WebSockets) or keep-alive clients that were never told to go, so the kubelet will SIGKILL the process and cut them mid-request",
		Remediation: w.advice().GracefulShutdown(),
		Severity:    sev,
		Confidence:  0.85,
		Evidence: []Evidence{
			{Signal: `process_signals_total{signal="SIGTERM"}`, Value: elapsed.Seconds(), Threshold: r.o.Fraction * r.o.Grace.Seconds(), Unit: "seconds since", Note: "eBPF signal_generate"},
			{Signal: `tcp_sockets{owner="target",state="ESTABLISHED"}`, Value: total, Unit: "connections", Note: "the target's own ends"},
		},
		Artifacts: []Artifact{{Kind: "endpoint", Value: strings.Join(who, "; "), Detail: "connections still open"}},
	}}
}
