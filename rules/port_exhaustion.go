package rules

import (
	"fmt"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// CauseNoConnectionReuse is port_exhaustion's root cause.
const CauseNoConnectionReuse = "no_connection_reuse"

// PortExhaustionOptions ([rules.port_exhaustion] in agent.conf).
type PortExhaustionOptions struct {
	Window    time.Duration `toml:"window" range:"[1s,1h]"`         // growth is judged over this window
	NearRatio float64       `toml:"near_ratio" range:"(0,1]"`        // TIME_WAIT toward one remote / usable ports at or above this is near
	Horizon   time.Duration `toml:"horizon" range:"[1s,24h]"`       // forecasts further out than this stay silent
	MinCount  float64       `toml:"min_count" range:"[1,1000000]"` // below this many TIME_WAIT sockets, silence
}

// DefaultPortExhaustionOptions are the defaults agent.conf documents.
func DefaultPortExhaustionOptions() PortExhaustionOptions {
	return PortExhaustionOptions{Window: 30 * time.Second, NearRatio: 0.5, Horizon: 5 * time.Minute, MinCount: 100}
}

// PortExhaustion names a client that opens a new connection per request to
// one remote and closes it first (seed 000 Problem H): every such
// connection leaves a TIME_WAIT socket holding its local port for 60 s, and
// a 4-tuple toward one remote ip:port can only use ip_local_port_range's
// ports. At a few hundred connections a second connect() fails with
// EADDRNOTAVAIL.
type PortExhaustion struct{ o PortExhaustionOptions }

func NewPortExhaustion(o PortExhaustionOptions) *PortExhaustion { return &PortExhaustion{o: o} }

func (*PortExhaustion) Name() string { return "port_exhaustion" }

func (r *PortExhaustion) Evaluate(w Window) []Observation {
	lo, ok1 := w.Store.Latest("sysctl", signals.L("name", "net.ipv4.ip_local_port_range.min"))
	hi, ok2 := w.Store.Latest("sysctl", signals.L("name", "net.ipv4.ip_local_port_range.max"))
	if !ok1 || !ok2 || hi.V < lo.V {
		return nil
	}
	usable := hi.V - lo.V + 1
	reuse, haveReuse := w.Store.Latest("sysctl", signals.L("name", "net.ipv4.tcp_tw_reuse"))
	from := w.Now.Add(-r.o.Window)
	var out []Observation
	for _, ls := range w.Store.Select("tcp_sockets_by_remote") {
		remote := ls.Get("remote")
		if ls.Get("state") != "TIME_WAIT" || remote == "other" {
			continue
		}
		ss := w.Store.Range("tcp_sockets_by_remote", ls, from)
		if len(ss) == 0 || w.Now.Sub(ss[len(ss)-1].T) > 3*freshnessSlow {
			continue
		}
		cur := ss[len(ss)-1].V
		if cur < r.o.MinCount {
			continue
		}
		ratio := cur / usable
		tr, haveTrend := trendOf(ss)
		eta, etaOK := time.Duration(0), false
		if haveTrend && tr.span() >= r.o.Window/2 {
			eta, etaOK = tr.until(usable)
		}
		if ratio < r.o.NearRatio && !(etaOK && eta <= r.o.Horizon) {
			continue
		}
		est, _ := w.Store.Latest("tcp_sockets_by_remote", signals.L("remote", remote, "state", "ESTABLISHED"))
		forecast := "at the current rate it does not grow further"
		if etaOK && eta > 0 {
			forecast = fmt.Sprintf("at the current rate (%.1f/s) the ports run out in %s", tr.slope, fmtDur(eta))
		} else if ratio >= 1 {
			forecast = "the ports have run out: connect() fails with EADDRNOTAVAIL"
		}
		sev := SeverityWarning
		if ratio >= 0.9 {
			sev = SeverityCritical
		}
		reuseNote := ""
		if haveReuse && reuse.V == 0 {
			reuseNote = " net.ipv4.tcp_tw_reuse=0 here, so none of them can be reused for new outbound connections."
		}
		out = append(out, Observation{
			Key:   remote,
			Cause: CauseNoConnectionReuse,
			Title: fmt.Sprintf("Ephemeral ports toward %s running out: %.0f of %.0f in TIME_WAIT", remote, cur, usable),
			Symptom: fmt.Sprintf("%.0f sockets toward %s are in TIME_WAIT (%.0f%% of the %.0f usable local ports, ip_local_port_range %.0f-%.0f) with %.0f established; %s",
				cur, remote, 100*ratio, usable, lo.V, hi.V, est.V, forecast),
			RootCause: fmt.Sprintf("the app opens a new connection to %s for each request and closes it first, so each leaves its local port in TIME_WAIT for 60 s: it does not reuse connections to this remote.%s", remote, reuseNote),
			Remediation: fmt.Sprintf("reuse connections to %s: HTTP keep-alive and a connection pool (Go: share one http.Client and drain/close bodies; raise MaxIdleConnsPerHost), or a persistent client for the database/cache; "+
				"as stopgaps widen net.ipv4.ip_local_port_range and set net.ipv4.tcp_tw_reuse=1", remote),
			Severity:   sev,
			Confidence: 0.85,
			Evidence: []Evidence{
				{Signal: "tcp_sockets_by_remote" + ls.String(), Value: cur, Threshold: r.o.NearRatio * usable, Unit: "sockets"},
				{Signal: `sysctl{name="net.ipv4.ip_local_port_range"}`, Value: usable, Unit: "ports", Note: fmt.Sprintf("%.0f-%.0f", lo.V, hi.V)},
			},
			Artifacts: []Artifact{{Kind: "endpoint", Value: remote, Detail: "the remote the app does not reuse connections to"}},
			Labels:    map[string]string{"remote": remote},
		})
	}
	return out
}
