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
}

// DefaultRSTStormOptions are the defaults agent.conf documents.
func DefaultRSTStormOptions() RSTStormOptions {
	return RSTStormOptions{Recent: 5 * time.Second, MinRate: 50}
}

// RSTStorm names why the namespace sends resets in bulk (seed 000
// "Platform": clients see "connection reset by peer"). The path decides
// the fix, and the kernel's counters tell the paths apart:
//   - the accept queue overflows with tcp_abort_on_overflow=1: each
//     overflow is answered with a RST instead of a dropped SYN;
//   - the application aborts connections: it closed with unread data
//     (TCPAbortOnClose), or data arrived after it closed (TCPAbortOnData),
//     or it set SO_LINGER 0;
//   - otherwise segments arrive for no socket: clients connecting to a
//     port nothing listens on (a restart, a wrong port, a health check).
type RSTStorm struct{ o RSTStormOptions }

func NewRSTStorm(o RSTStormOptions) *RSTStorm { return &RSTStorm{o: o} }

func (*RSTStorm) Name() string { return "rst_storm" }

func (r *RSTStorm) Evaluate(w Window) []Observation {
	from := w.Now.Add(-r.o.Recent)
	last, ok := w.Store.Latest("tcp_out_rsts_total", nil)
	if !ok || w.Now.Sub(last.T) > 3*freshnessSlow {
		return nil
	}
	secs := r.o.Recent.Seconds()
	rate := w.Store.Increase("tcp_out_rsts_total", nil, from) / secs
	if rate < r.o.MinRate {
		return nil
	}
	overflows := w.Store.Increase("tcp_ext_listen_overflows_total", nil, from) / secs
	onClose := w.Store.Increase("tcp_ext_abort_on_close_total", nil, from) / secs
	onData := w.Store.Increase("tcp_ext_abort_on_data_total", nil, from) / secs
	aborts := onClose + onData
	abortOnOverflow, _ := w.Store.Latest("sysctl", signals.L("name", "net.ipv4.tcp_abort_on_overflow"))

	ev := []Evidence{{Signal: "tcp_out_rsts_total", Value: rate, Threshold: r.o.MinRate, Unit: "/s", Window: r.o.Recent, Note: "resets sent by the namespace"}}
	// The kernel's own reason for each reset (eBPF tcp_send_reset), when
	// the tcplife probe runs, settles the path.
	top, topRate, reasons := "", 0.0, ""
	for _, ls := range w.Store.Select("tcp_resets_sent_total") {
		v := w.Store.Increase("tcp_resets_sent_total", ls, from) / secs
		if v > topRate {
			top, topRate = ls.Get("reason"), v
		}
	}
	if top != "" {
		reasons = fmt.Sprintf(" The kernel's reason for most of them (%.0f/s): %s.", topRate, top)
		ev = append(ev, Evidence{Signal: fmt.Sprintf("tcp_resets_sent_total{reason=%q}", top), Value: topRate, Unit: "/s", Window: r.o.Recent, Note: "the most frequent reset reason (eBPF)"})
		if strings.HasPrefix(top, "tcp_abort_on_") && aborts < rate/4 {
			aborts = topRate
		}
	}
	o := Observation{Severity: SeverityWarning, Confidence: 0.7}
	switch {
	case abortOnOverflow.V == 1 && overflows >= rate/4:
		o.Key, o.Cause = "accept_overflow", CauseRSTAcceptOverflow
		o.RootCause = fmt.Sprintf("accept queues overflow (%.1f/s) and net.ipv4.tcp_abort_on_overflow=1 answers each overflow with a reset instead of letting the client retry", overflows)
		o.Remediation = "fix the overflow itself (see the accept_overflow finding); set net.ipv4.tcp_abort_on_overflow=0 so clients retry their SYN instead of failing at once"
		ev = append(ev, Evidence{Signal: "tcp_ext_listen_overflows_total", Value: overflows, Unit: "/s", Window: r.o.Recent})
		o.Confidence = 0.85
	case aborts >= rate/4:
		o.Key, o.Cause = "app_abort", CauseRSTAppAbort
		o.RootCause = fmt.Sprintf("the application aborts connections: %.1f/s closed with unread data (TCPAbortOnClose), %.1f/s received data after closing (TCPAbortOnData)", onClose, onData)
		o.Remediation = "read requests fully before closing (or shut down writes and drain); do not set SO_LINGER to 0; in proxies, keep-alive timeouts on both sides consistent so one side does not close while the other sends"
		ev = append(ev, Evidence{Signal: "tcp_ext_abort_on_close_total + tcp_ext_abort_on_data_total", Value: aborts, Unit: "/s", Window: r.o.Recent})
		o.Confidence = 0.8
	default:
		o.Key, o.Cause = "closed_port", CauseRSTClosedPort
		o.RootCause = fmt.Sprintf("the resets answer segments that reach no socket (no overflow with abort, %.1f/s application aborts): clients connect to a port nothing listens on, or send on connections this side already forgot", aborts)
		o.Remediation = "find the clients: connections to a port during a restart (use a readiness probe and drain before stopping), a wrong port in a health check or client config, or a peer that keeps sending on a connection that timed out here (align idle timeouts)"
	}
	if top == "no_socket" && o.Cause == CauseRSTClosedPort {
		o.Confidence = 0.9
	}
	o.RootCause += "." + reasons
	o.Title = fmt.Sprintf("RST storm: %.0f resets/s sent", rate)
	o.Symptom = fmt.Sprintf("the target's network namespace sent %.1f resets per second over the last %s; clients see \"connection reset by peer\" or \"connection refused\"", rate, r.o.Recent)
	o.Evidence = ev
	o.Labels = map[string]string{"path": o.Key}
	return []Observation{o}
}
